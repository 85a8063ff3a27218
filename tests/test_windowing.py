"""Tests of streamcap.audio.windowing.Windower.

Test-only allowance: production windows are 10-30 s (enforced by the config),
but the Windower accepts any positive whole-millisecond ``window_s``; these
tests use 0.05-0.6 s windows over 1-2 s signals to stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcap.audio import resample as resample_module
from streamcap.audio.dsp import rms_dbfs
from streamcap.audio.resample import resample
from streamcap.audio.windowing import RestartReason, Windower
from streamcap.messages import AudioBlock, Window, make_block

IN_RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000]
TARGETS = [(24000,), (16000,), (24000, 16000), (48000, 32000), (44100,)]
T0 = 1_700_000_000.0

Array = np.ndarray


def _blocks(
    x: Array, rate: int, sizes: Sequence[int], *, epoch: int = 0, source_id: str = "mic"
) -> list[AudioBlock]:
    out = []
    pos = 0
    i = 0
    while pos < x.size:
        n = sizes[i % len(sizes)]
        i += 1
        out.append(
            make_block(
                source_id=source_id,
                start_sample=pos,
                sample_rate_hz=rate,
                samples=x[pos : pos + n],
                captured_at=T0 + pos / rate,
                epoch=epoch,
            )
        )
        pos += n
    return out


def _run(w: Windower, blocks: Sequence[AudioBlock], *, flush: bool = True) -> list[Window]:
    windows: list[Window] = []
    for b in blocks:
        cut = w.feed(b)
        assert cut.restart is None
        windows.extend(cut.windows)
    if flush:
        windows.extend(w.flush())
    return windows


def _signal(seed: int, n: int) -> Array:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    in_rate=st.sampled_from(IN_RATES),
    rates=st.sampled_from(TARGETS),
    window_ms=st.integers(50, 600),
    hop_frac=st.sampled_from([1.0, 0.5, 0.25, 0.37, 1.3]),
    sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=8),
    duration_ms=st.integers(0, 2000),
    seed=st.integers(0, 2**32 - 1),
)
def test_windows_are_exact_slices_of_the_resampled_stream(
    in_rate: int,
    rates: tuple[int, ...],
    window_ms: int,
    hop_frac: float,
    sizes: list[int],
    duration_ms: int,
    seed: int,
) -> None:
    hop_ms = max(1, round(window_ms * hop_frac))
    x = _signal(seed, duration_ms * in_rate // 1000)
    w = Windower("mic", window_ms / 1000, hop_ms / 1000, rates, run_id="run1")
    windows = _run(w, _blocks(x, in_rate, sizes))
    refs = {r: resample(x, in_rate, r) for r in rates}
    # No window skipped or duplicated: exactly the windows whose audio exists at every rate.
    expected_count = 0
    while all(w.window_indices(expected_count, r)[1] <= refs[r].size for r in rates):
        expected_count += 1
    assert len(windows) == expected_count
    for k, win in enumerate(windows):
        assert win.seq == k
        assert win.epoch == 0
        assert (win.start_ms, win.end_ms) == (k * hop_ms, k * hop_ms + window_ms)
        assert win.start_s == k * hop_ms / 1000 and win.end_s == (k * hop_ms + window_ms) / 1000
        assert win.window_id == f"mic:run1:0:{k * hop_ms}" and win.run_id == "run1"
        for r in rates:
            start = -(-k * hop_ms * r // 1000)
            end = -(-(k * hop_ms + window_ms) * r // 1000)
            assert (win.start_sample(r), win.end_sample(r)) == (start, end)
            np.testing.assert_allclose(win.samples(r), refs[r][start:end], rtol=0, atol=1e-6)
        assert win.captured_at == pytest.approx(T0 + k * hop_ms / 1000, abs=1e-6)
        assert win.level_dbfs == pytest.approx(rms_dbfs(win.samples(rates[0])))
    if hop_ms == window_ms:
        # Tiling: the concatenation is the resampled stream, no sample skipped or repeated.
        for r in rates:
            cat = np.concatenate([win.samples(r) for win in windows]) if windows else refs[r][:0]
            np.testing.assert_allclose(cat, refs[r][: cat.size], rtol=0, atol=1e-6)
            assert cat.size == w.window_indices(len(windows), r)[0]


@settings(max_examples=20, deadline=None)
@given(
    in_rate=st.sampled_from(IN_RATES),
    rates=st.sampled_from(TARGETS),
    window_ms=st.integers(50, 400),
    hop_ms=st.integers(20, 400),
    sizes_a=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
    sizes_b=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_size_invariance(
    in_rate: int,
    rates: tuple[int, ...],
    window_ms: int,
    hop_ms: int,
    sizes_a: list[int],
    sizes_b: list[int],
    seed: int,
) -> None:
    x = _signal(seed, in_rate * 3 // 2)
    got = []
    for sizes in (sizes_a, sizes_b):
        w = Windower("mic", window_ms / 1000, hop_ms / 1000, rates, run_id="r")
        got.append(_run(w, _blocks(x, in_rate, sizes), flush=False))
    a, b = got
    assert [win.window_id for win in a] == [win.window_id for win in b]
    for wa, wb in zip(a, b, strict=True):
        assert wa.seq == wb.seq
        assert wa.captured_at == pytest.approx(wb.captured_at, abs=1e-6)
        for r in rates:
            np.testing.assert_allclose(wa.samples(r), wb.samples(r), rtol=0, atol=1e-6)


def test_resampling_runs_once_per_block_per_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = resample_module.StreamResampler.feed

    def spy(self: resample_module.StreamResampler, samples: Array) -> Array:
        calls.append(self.out_rate_hz)
        return original(self, samples)

    monkeypatch.setattr(resample_module.StreamResampler, "feed", spy)
    x = _signal(1, 44100 * 2)
    blocks = _blocks(x, 44100, [4410])  # 20 blocks of 0.1 s
    w = Windower("mic", 0.4, 0.05, (24000, 16000))  # 8 windows overlap each sample
    windows = _run(w, blocks, flush=False)
    assert len(windows) > len(blocks)  # more windows than blocks: per-window resampling would show
    assert sorted(calls) == sorted([24000, 16000] * len(blocks))


def test_ring_buffers_stay_bounded() -> None:
    x = _signal(2, 16000 * 6)
    w = Windower("mic", 0.5, 0.25, (24000, 16000))
    _run(w, _blocks(x, 16000, [320]), flush=False)
    for r in (24000, 16000):
        # window + hop (+1), grown at most for one block: nothing older is kept.
        assert w.buffer_capacity(r) <= (0.5 + 0.25) * r + 2 + 320 * r / 16000 * 2


def test_epoch_change_resets_clock_but_not_seq() -> None:
    a = _signal(3, 16000)
    b = _signal(4, 12000)
    w = Windower("mic", 0.3, 0.3, (24000,), run_id="r0")
    first = _run(w, _blocks(a, 16000, [1000]), flush=False)
    assert [win.seq for win in first] == [0, 1, 2]  # 1.0 s of audio; 0.9-1.2 s is incomplete
    blocks = _blocks(b, 16000, [777], epoch=1)
    cut = w.feed(blocks[0])
    assert cut.restart is not None and cut.restart.reason is RestartReason.SOURCE_RESTART
    assert cut.restart.epoch == 1 and w.restarts[RestartReason.SOURCE_RESTART] == 1
    second = [*cut.windows, *_run(w, blocks[1:], flush=True)]
    assert [win.seq for win in second] == [3, 4]  # 0.75 s: 0.6-0.9 s never completes
    assert [win.epoch for win in second] == [1, 1]
    assert [win.start_s for win in second] == [0.0, 0.3]
    assert second[0].window_id == "mic:r0:1:0"
    # The new epoch is windowed exactly as if it were a fresh stream.
    alone = _run(Windower("mic", 0.3, 0.3, (24000,)), _blocks(b, 16000, [777]))
    for got, ref in zip(second, alone, strict=True):
        np.testing.assert_array_equal(got.samples(24000), ref.samples(24000))


def test_new_epoch_may_change_the_input_rate() -> None:
    w = Windower("mic", 0.2, 0.2, (16000,))
    _run(w, _blocks(_signal(5, 4800), 48000, [480]), flush=False)
    blocks = _blocks(_signal(6, 8000), 8000, [800], epoch=2)
    first = w.feed(blocks[0])
    assert first.restart is not None and first.restart.epoch == 1
    out = [*first.windows, *_run(w, blocks[1:])]
    # The windower counts its own epochs: the source's epoch 2 is window epoch 1.
    assert [win.epoch for win in out] == [1] * 5
    assert all(win.samples(16000).size == 3200 for win in out)


def test_forward_gap_is_zero_filled_and_counted() -> None:
    x = _signal(7, 16000)
    x[4000:4400] = 0.0
    gapped = [b for b in _blocks(x, 16000, [400]) if b.start_sample != 4000]
    w_gap = Windower("mic", 0.25, 0.125, (24000,))
    w_ref = Windower("mic", 0.25, 0.125, (24000,))
    got = _run(w_gap, gapped)
    ref = _run(w_ref, _blocks(x, 16000, [400]))
    assert w_gap.gaps_filled == 1
    assert w_gap.gap_samples_filled == 400
    assert w_ref.gaps_filled == 0
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.samples(24000), r.samples(24000))


def _blk(
    start: int, *, rate: int = 16000, epoch: int = 0, source: str = "mic", n: int = 10
) -> AudioBlock:
    return make_block(
        source_id=source,
        start_sample=start,
        sample_rate_hz=rate,
        samples=np.zeros(n, dtype=np.float32),
        captured_at=T0,
        epoch=epoch,
    )


def test_overlap_and_bad_blocks_raise() -> None:
    w = Windower("mic", 0.2, 0.1, (16000,), max_gap_s=0.5)
    w.feed(_blk(0, n=1600))
    with pytest.raises(ValueError, match="overlaps"):
        w.feed(_blk(1000))
    cut = w.feed(_blk(1600 + 8000))  # exactly max_gap_s is zero-filled
    assert cut.restart is None and w.gap_samples_filled == 8000
    with pytest.raises(ValueError, match="sample_rate_hz"):
        w.feed(_blk(9610, rate=8000))
    with pytest.raises(ValueError, match="'other'"):
        w.feed(_blk(9610, source="other"))
    assert w.feed(_blk(0, epoch=3)).restart is not None
    with pytest.raises(ValueError, match="older"):
        w.feed(_blk(0, epoch=2))
    w.flush()
    assert w.epoch is None
    with pytest.raises(ValueError, match="flushed"):
        w.feed(_blk(10, epoch=3))
    assert w.feed(_blk(0, epoch=4)).restart is not None
    assert w.restarts == {RestartReason.SOURCE_RESTART: 2, RestartReason.GAP: 0}


def test_a_gap_above_max_gap_s_restarts_the_clock_at_the_block_after_it() -> None:
    a = _signal(8, 8000)
    b = _signal(9, 9000)
    w = Windower("mic", 0.25, 0.125, (24000,), max_gap_s=0.5, run_id="r")
    before = _run(w, _blocks(a, 16000, [400]), flush=False)
    after_blocks = [make_block(source_id="mic", start_sample=blk.start_sample + 8000 + 8001,
                               sample_rate_hz=16000, samples=blk.samples,
                               captured_at=blk.captured_at + 2.0)
                    for blk in _blocks(b, 16000, [500])]
    cut = w.feed(after_blocks[0])
    assert cut.restart is not None
    assert (cut.restart.reason, cut.restart.epoch) == (RestartReason.GAP, 1)
    assert cut.restart.lost_s == pytest.approx(8001 / 16000)
    assert "max_gap_s" in cut.restart.detail
    assert w.restarts[RestartReason.GAP] == 1 and w.gaps_filled == 0
    after = [*cut.windows, *_run(w, after_blocks[1:], flush=False)]
    # Nothing spans the gap and nothing after it is lost: the audio after the gap is
    # windowed exactly as a fresh stream, in epoch 1, its clock at 0 at the block.
    alone = _run(Windower("mic", 0.25, 0.125, (24000,), run_id="r"),
                 _blocks(b, 16000, [500]), flush=False)
    assert [win.window_id for win in after] == [
        win.window_id.replace(":r:0:", ":r:1:") for win in alone]
    assert [win.seq for win in after] == list(range(len(before), len(before) + len(alone)))
    assert after[0].captured_at == pytest.approx(T0 + 2.0)
    for got, ref in zip(after, alone, strict=True):
        np.testing.assert_array_equal(got.samples(24000), ref.samples(24000))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_samples_are_a_bug_not_a_restart(bad: float) -> None:
    w = Windower("mic", 0.2, 0.1, (16000,))
    w.feed(_blk(0, n=1600))
    samples = np.zeros(160, dtype=np.float32)
    samples[7] = bad
    block = make_block(source_id="mic", start_sample=1600, sample_rate_hz=16000,
                       samples=samples, captured_at=T0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        w.feed(block)
    assert w.restarts == {RestartReason.SOURCE_RESTART: 0, RestartReason.GAP: 0}
    assert w.feed(_blk(1600, n=1600)).restart is None  # the clock was not touched


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window_s": 0.0005, "hop_s": 0.1}, "window_s"),
        ({"window_s": 10.0, "hop_s": 0.0}, "hop_s"),
        ({"window_s": 10.0, "hop_s": 2.0001}, "hop_s"),
        ({"window_s": float("nan"), "hop_s": 1.0}, "window_s"),
    ],
)
def test_lengths_must_be_whole_milliseconds(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Windower("mic", rates_hz=(16000,), **kwargs)


@pytest.mark.parametrize("rates", [(), (16000, 16000), (0,)])
def test_rates_are_validated(rates: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="rates_hz"):
        Windower("mic", 10.0, 5.0, rates)


def test_production_sized_window_and_level() -> None:
    rate = 44100
    t = np.arange(rate * 12) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    w = Windower("mic", 10.0, 1.0, (24000, 16000))
    windows = _run(w, _blocks(x, rate, [1024]), flush=False)
    assert [win.start_s for win in windows] == [0.0, 1.0]
    assert windows[0].samples(24000).size == 240000
    assert windows[0].samples(16000).size == 160000
    # 0.5-amplitude sine: 20*log10(0.5/sqrt(2)) = -9.03 dBFS (first window has a zero-padded start).
    assert windows[1].level_dbfs == pytest.approx(-9.03, abs=0.02)
    assert not windows[0].samples(24000).flags.writeable


def test_window_ids_never_repeat_across_runs() -> None:
    """A restarted daemon (a new Windower, a new run id) cuts the same stream times again,
    with seq from 0 again, but never a window id of the previous run."""
    x = _signal(5, 16000)
    runs = [_run(Windower("mic", 0.25, 0.25, (16000,)), _blocks(x, 16000, [400]))
            for _ in range(2)]
    first, second = runs
    assert [w.seq for w in first] == [w.seq for w in second] == [0, 1, 2, 3]
    assert [w.start_s for w in first] == [w.start_s for w in second]
    assert first[0].run_id != second[0].run_id
    assert not {w.window_id for w in first} & {w.window_id for w in second}
    for w in first:  # "<source_id>:<run_id>:<epoch>:<start_ms>"
        assert w.window_id.split(":") == ["mic", w.run_id, "0", str(round(w.start_s * 1000))]
    assert len({w.run_id for w in first}) == 1


@pytest.mark.parametrize("run_id", ["", "a:b", "x" * 65, "spa ce"])
def test_a_run_id_that_would_break_window_ids_is_refused(run_id: str) -> None:
    with pytest.raises(ValueError, match="Windower: run_id"):
        Windower("mic", 0.25, 0.25, (16000,), run_id=run_id)
