"""Tests of streamcap.audio.dsp: downmix, PCM conversion and levels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamcap.audio.dsp import (
    SILENCE_DBFS,
    clip_full_scale,
    downmix,
    pcm_bytes_to_float32,
    pcm_to_float32,
    peak_dbfs,
    rms_dbfs,
    zero_nonfinite,
)


def test_downmix_averages_channels_to_float32() -> None:
    frames = np.array([[1.0, 0.0], [0.5, -0.5], [0.25, 0.75]], dtype=np.float32)
    mono = downmix(frames)
    assert mono.dtype == np.float32
    assert mono.shape == (3,)
    np.testing.assert_array_equal(mono, np.array([0.5, 0.0, 0.5], dtype=np.float32))


def test_downmix_passes_mono_through_without_copy() -> None:
    x = np.arange(5, dtype=np.float32)
    assert downmix(x) is x
    np.testing.assert_array_equal(downmix(x[:, None]), x)


@pytest.mark.parametrize("shape", [(2, 2, 2), (4, 0)])
def test_downmix_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="downmix"):
        downmix(np.zeros(shape, dtype=np.float32))


def test_pcm_int16_scale() -> None:
    pcm = np.array([-32768, 0, 16384, 32767], dtype=np.int16)
    out = pcm_to_float32(pcm)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 0.0, 0.5, 32767 / 32768], rtol=0, atol=1e-7)


def test_pcm_int32_scale() -> None:
    pcm = np.array([-(2**31), 0, 2**30, 2**31 - 1], dtype=np.int32)
    out = pcm_to_float32(pcm)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 0.0, 0.5, 1.0], rtol=0, atol=1e-7)
    assert out[0] == -1.0


def test_pcm_rejects_unsigned() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pcm_to_float32(np.zeros(3, dtype=np.uint8))


def test_pcm_bytes_stereo_s16le() -> None:
    frames = np.array([[16384, -16384], [32767, 32767]], dtype="<i2")
    out = pcm_bytes_to_float32(frames.tobytes(), sample_format="s16le", channels=2)
    np.testing.assert_allclose(out, [0.0, 32767 / 32768], atol=1e-7)
    with pytest.raises(ValueError, match="whole number"):
        pcm_bytes_to_float32(b"\x00\x01\x02", sample_format="s16le", channels=1)
    with pytest.raises(ValueError, match="sample_format"):
        pcm_bytes_to_float32(b"", sample_format="u8")


def test_levels_of_full_scale_sine() -> None:
    t = np.arange(48000) / 48000
    sine = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    assert rms_dbfs(sine) == pytest.approx(-3.0103, abs=0.01)
    assert peak_dbfs(sine) == pytest.approx(0.0, abs=0.01)
    assert rms_dbfs(0.1 * sine) == pytest.approx(-23.0103, abs=0.01)


@pytest.mark.parametrize("x", [np.zeros(100, dtype=np.float32), np.zeros(0, dtype=np.float32)])
def test_silence_gives_floor_not_inf(x: np.ndarray) -> None:
    for level in (rms_dbfs(x), peak_dbfs(x)):
        assert level == SILENCE_DBFS
        assert math.isfinite(level)


def test_tiny_signal_is_floored() -> None:
    x = np.full(10, 1e-12, dtype=np.float32)
    assert rms_dbfs(x) == SILENCE_DBFS
    assert peak_dbfs(x) == SILENCE_DBFS


def test_nan_is_an_error() -> None:
    x = np.array([0.0, np.nan], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        rms_dbfs(x)
    with pytest.raises(ValueError, match="NaN"):
        peak_dbfs(x)


def test_zero_nonfinite_replaces_nan_and_inf_and_counts_them() -> None:
    x = np.array([0.5, np.nan, -0.25, np.inf, -np.inf, 0.0], dtype=np.float32)
    x.flags.writeable = False
    clean, count, first = zero_nonfinite(x)
    np.testing.assert_array_equal(clean, [0.5, 0.0, -0.25, 0.0, 0.0, 0.0])
    assert clean.dtype == np.float32
    assert (count, first) == (3, 1)
    assert np.isnan(x[1])  # the input is not modified
    assert rms_dbfs(clean) == pytest.approx(rms_dbfs(np.array([0.5, 0, -0.25, 0, 0, 0])))


def test_zero_nonfinite_passes_finite_samples_through() -> None:
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    clean, count, first = zero_nonfinite(x)
    assert clean is x
    assert (count, first) == (0, -1)


def test_clip_full_scale_clips_and_counts_overs() -> None:
    x = np.array([0.5, 1e30, -2.0, 1.0, -1.0, 3.4e38], dtype=np.float32)
    clipped, count, first = clip_full_scale(x)
    np.testing.assert_array_equal(clipped, [0.5, 1.0, -1.0, 1.0, -1.0, 1.0])
    assert (count, first) == (3, 1)
    assert clipped.dtype == np.float32 and x[1] == np.float32(1e30)  # input untouched


def test_clip_full_scale_passes_samples_within_full_scale_through() -> None:
    x = np.array([0.5, -1.0, 1.0], dtype=np.float32)
    clipped, count, first = clip_full_scale(x)
    assert clipped is x and (count, first) == (0, -1)
