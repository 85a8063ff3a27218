"""Log-mel front end against an independent numpy computation and known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamcap.errors import ConfigError, ModelError
from streamcap.models.retrieval.melspec import (
    LogMel,
    MelConfig,
    mel_filterbank,
    slaney_hz_to_mel,
    slaney_mel_to_hz,
)

torch.set_num_threads(1)


def _ref_hz_to_mel(f: float) -> float:
    # Written independently: 3 mel per 200 Hz up to 1 kHz, then 27 mel per octave-of-6.4.
    if f < 1000.0:
        return 3.0 * f / 200.0
    return float(15.0 + 27.0 * np.log(f / 1000.0) / np.log(6.4))


def _ref_mel_to_hz(m: float) -> float:
    if m < 15.0:
        return 200.0 * m / 3.0
    return float(1000.0 * 6.4 ** ((m - 15.0) / 27.0))


def _ref_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangles by piecewise-linear interpolation, area-normalised."""
    lo, hi = _ref_hz_to_mel(fmin), _ref_hz_to_mel(fmax)
    mels = lo + (hi - lo) * np.arange(n_mels + 2) / (n_mels + 1)
    edges = np.array([_ref_mel_to_hz(m) for m in mels], dtype=np.float64)
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    bank = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        tri = np.interp(freqs, edges[m : m + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0)
        bank[:, m] = tri * 2.0 / (edges[m + 2] - edges[m])
    return bank


def test_slaney_scale_known_values() -> None:
    assert slaney_hz_to_mel(1000.0) == pytest.approx(15.0)
    assert slaney_hz_to_mel(200.0 / 3.0) == pytest.approx(1.0)
    assert slaney_hz_to_mel(6400.0) == pytest.approx(42.0)
    assert slaney_hz_to_mel(0.0) == pytest.approx(0.0)
    for f in (50.0, 440.0, 999.0, 1000.0, 3000.0, 14_000.0):
        assert slaney_hz_to_mel(f) == pytest.approx(_ref_hz_to_mel(f), rel=1e-12)
    grid = np.linspace(0.0, 16_000.0, 101)
    np.testing.assert_allclose(slaney_mel_to_hz(slaney_hz_to_mel(grid)), grid, atol=1e-9)


@pytest.mark.parametrize("n_mels", [224, 64])
def test_filterbank_matches_independent_reference(n_mels: int) -> None:
    ours = mel_filterbank(sample_rate=32_000, n_fft=1024, n_mels=n_mels, fmin=50.0, fmax=14_000.0)
    ref = _ref_filterbank(32_000, 1024, n_mels, 50.0, 14_000.0)
    assert ours.shape == (513, n_mels)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def test_filterbank_properties() -> None:
    bank = mel_filterbank(sample_rate=32_000, n_fft=1024, n_mels=224, fmin=50.0, fmax=14_000.0)
    freqs = np.arange(513) * 32_000 / 1024
    assert np.all(bank >= 0.0)
    assert np.all(bank[freqs < 50.0] == 0.0)
    assert np.all(bank[freqs > 14_000.0] == 0.0)
    assert np.all(bank.sum(axis=0) > 0.0)  # no empty filter at this resolution
    peaks = bank.argmax(axis=0)
    assert np.all(np.diff(peaks) >= 0)  # centres increase with the mel index


def _numpy_logmel(wave: np.ndarray, cfg: MelConfig) -> np.ndarray:
    half = cfg.n_fft // 2
    padded = np.pad(wave.astype(np.float64), (half, half), mode="reflect")
    n = np.arange(cfg.n_fft)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / cfg.n_fft)  # periodic Hann
    n_frames = len(wave) // cfg.hop_length + 1
    frames = np.stack(
        [padded[i * cfg.hop_length : i * cfg.hop_length + cfg.n_fft] for i in range(n_frames)]
    )
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    bank = _ref_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    logmel: np.ndarray = 10.0 * np.log10(np.maximum(cfg.amin, power @ bank))
    return logmel


def test_logmel_matches_numpy() -> None:
    cfg = MelConfig()
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(8000).astype(np.float32) * 0.1
    out = LogMel(cfg)(torch.from_numpy(wave)[None])
    assert out.shape == (1, 1, 8000 // 320 + 1, 224)
    assert out.dtype == torch.float32
    ref = _numpy_logmel(wave, cfg)
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=2e-3)


def test_pure_tone_lands_in_its_mel_band() -> None:
    cfg = MelConfig()
    tone_hz = 2000.0
    t = np.arange(32_000) / 32_000
    wave = np.sin(2 * np.pi * tone_hz * t).astype(np.float32)
    out = LogMel(cfg)(torch.from_numpy(wave)[None])[0, 0]
    band = int(out[50].argmax())
    edges = slaney_mel_to_hz(
        np.linspace(slaney_hz_to_mel(cfg.fmin), slaney_hz_to_mel(cfg.fmax), cfg.n_mels + 2)
    )
    assert edges[band] < tone_hz < edges[band + 2]
    assert abs(edges[band + 1] - tone_hz) < (edges[band + 2] - edges[band])


def test_silence_is_floor() -> None:
    out = LogMel(MelConfig(n_mels=64))(torch.zeros(2, 4000))
    torch.testing.assert_close(out, torch.full_like(out, -100.0))


def test_buffers_not_in_state_dict() -> None:
    assert LogMel().state_dict() == {}


def test_bad_inputs_and_config() -> None:
    mel = LogMel(MelConfig(n_mels=64))
    with pytest.raises(ModelError, match="too short"):
        mel(torch.zeros(1, 100))
    with pytest.raises(ModelError, match="batch, samples"):
        mel(torch.zeros(1000))
    with pytest.raises(ConfigError, match="fmax"):
        MelConfig(fmax=20_000.0)
    with pytest.raises(ConfigError, match="mel.bogus: unknown key"):
        MelConfig.from_dict({"bogus": 1})
    assert MelConfig.from_dict(MelConfig(n_mels=32).to_dict()) == MelConfig(n_mels=32)
