"""Tests of streamcap.audio.resample: chunk invariance, timing, frequency response."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcap.audio.dsp import rms_dbfs
from streamcap.audio.resample import StreamResampler, resample

RATE_PAIRS = [
    (44100, 24000),
    (48000, 32000),
    (16000, 24000),
    (22050, 32000),
    (96000, 16000),
    (8000, 48000),
    (44100, 48000),
    (32000, 22050),
    (11025, 24000),
    (44101, 24000),  # a ratio too fine for the phase table: taps computed per block
]


def _stream(rs: StreamResampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    parts = []
    pos = 0
    i = 0
    while pos < x.size:
        n = sizes[i % len(sizes)]
        i += 1
        parts.append(rs.feed(x[pos : pos + n]))
        pos += n
    parts.append(rs.flush())
    return np.concatenate(parts)


@settings(max_examples=30, deadline=None)
@given(
    pair=st.sampled_from(RATE_PAIRS),
    sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=12),
    n=st.integers(0, 12000),
    seed=st.integers(0, 2**32 - 1),
)
def test_chunk_invariance(pair: tuple[int, int], sizes: list[int], n: int, seed: int) -> None:
    in_rate, out_rate = pair
    x = np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)
    whole = resample(x, in_rate, out_rate)
    assert whole.dtype == np.float32
    assert whole.size == -(-n * out_rate // in_rate)
    streamed = _stream(StreamResampler(in_rate, out_rate), x, sizes)
    assert streamed.size == whole.size
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(pair=st.sampled_from(RATE_PAIRS), n=st.integers(0, 6000))
def test_latency_is_the_documented_lookahead(pair: tuple[int, int], n: int) -> None:
    rs = StreamResampler(*pair)
    up, down = rs.ratio
    out = rs.feed(np.zeros(n, dtype=np.float32))
    ready = n - rs.lookahead_in
    expected = -(-ready * up // down) if ready > 0 else 0
    assert out.size == expected == rs.samples_out
    assert rs.samples_in == n
    tail = rs.flush()
    assert out.size + tail.size == -(-n * up // down)
    assert rs.samples_in == rs.samples_out == 0  # flush resets


@pytest.mark.parametrize("pair", RATE_PAIRS[:-1])
def test_sine_keeps_frequency_amplitude_and_time_origin(pair: tuple[int, int]) -> None:
    in_rate, out_rate = pair
    freq = 0.3 * min(in_rate, out_rate)  # well inside the pass band
    freq = round(freq / 10) * 10
    t_in = np.arange(in_rate) / in_rate  # one second
    x = (0.5 * np.sin(2 * np.pi * freq * t_in)).astype(np.float32)
    y = resample(x, in_rate, out_rate).astype(np.float64)
    assert y.size == out_rate
    mid = y[out_rate // 4 : 3 * out_rate // 4]  # away from the zero-padded ends
    spectrum = np.abs(np.fft.rfft(mid * np.hanning(mid.size)))
    peak_hz = np.argmax(spectrum) * out_rate / mid.size
    assert peak_hz == pytest.approx(freq, abs=2 * out_rate / mid.size)
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.5 / np.sqrt(2), rel=1e-3)
    # Output n sits at time n / out_rate: it matches the analytic sine there.
    t_out = np.arange(out_rate) / out_rate
    ref = 0.5 * np.sin(2 * np.pi * freq * t_out)[out_rate // 4 : 3 * out_rate // 4]
    assert np.max(np.abs(mid - ref)) < 1e-3


@pytest.mark.parametrize(
    ("in_rate", "out_rate", "freq"),
    [(44100, 16000, 12000.0), (48000, 24000, 15000.0), (96000, 8000, 20000.0)],
)
def test_downsampling_suppresses_aliases(in_rate: int, out_rate: int, freq: float) -> None:
    t = np.arange(in_rate) / in_rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    y = resample(x, in_rate, out_rate)
    mid = y[out_rate // 4 : 3 * out_rate // 4]
    assert rms_dbfs(mid) < -70.0


def test_identity_returns_input_without_copy() -> None:
    rs = StreamResampler(24000, 24000)
    x = np.arange(10, dtype=np.float32)
    assert rs.feed(x) is x
    assert rs.flush().size == 0
    assert rs.taps == 0
    np.testing.assert_array_equal(resample(x, 24000, 24000), x)


def test_impulse_response_is_symmetric_and_unit_gain() -> None:
    # An impulse in the middle of the input, upsampled 2x, lands on output 2*k and
    # the response is symmetric around it (a linear-phase, zero-delay filter).
    x = np.zeros(400, dtype=np.float32)
    x[200] = 1.0
    y = resample(x, 16000, 32000).astype(np.float64)
    assert int(np.argmax(y)) == 400
    np.testing.assert_allclose(y[400 - 60 : 400], y[401 : 401 + 60][::-1], atol=1e-7)
    dc = resample(np.ones(4000, dtype=np.float32), 44100, 24000)
    np.testing.assert_allclose(dc[500:-500], 1.0, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"in_rate_hz": 0, "out_rate_hz": 16000}, "in_rate_hz"),
        ({"in_rate_hz": 16000, "out_rate_hz": -1}, "out_rate_hz"),
        ({"in_rate_hz": 16000, "out_rate_hz": 8000, "rolloff": 1.5}, "rolloff"),
        ({"in_rate_hz": 16000, "out_rate_hz": 8000, "zero_crossings": 0}, "zero_crossings"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs: dict[str, int | float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        StreamResampler(**kwargs)  # type: ignore[arg-type]


def test_feed_rejects_2d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        StreamResampler(16000, 24000).feed(np.zeros((4, 2), dtype=np.float32))
