"""Log-mel front end of the CNext audio encoder.

The published CNext checkpoints were trained on log-mel spectrograms with a
Slaney-style mel filterbank (the scale and area normalisation of the
Auditory Toolbox, as also used by librosa by default). This module computes
the same features with ``torch.stft`` and a filterbank built here from the
formulas:

* power spectrogram: periodic Hann window, ``n_fft = win_length = 1024``,
  hop 320 samples (100 frames/s at 32 kHz), centred frames with reflect
  padding of ``n_fft // 2`` samples on each side;
* mel filterbank: triangular filters on the Slaney mel scale (linear below
  1 kHz, logarithmic above), each filter scaled by ``2 / (f_hi - f_lo)`` so
  that every filter has the same area in Hz;
* ``10 * log10(max(amin, mel_power))`` with a reference of 1.0 (so no
  offset) and no dynamic-range clipping.

The filterbank is kept as a (n_freqs, n_mels) float32 buffer, the layout the
checkpoints store under ``logmel_extractor.melW``, so that a loader can
compare the two (see :func:`streamcap.models.retrieval.cnext.load_cnext_checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from streamcap.errors import ConfigError, ModelError

__all__ = [
    "LogMel",
    "MelConfig",
    "mel_filterbank",
    "slaney_hz_to_mel",
    "slaney_mel_to_hz",
]

# Slaney mel scale: 3 mel per 200 Hz below 1 kHz, then 27 mel per factor 6.4.
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _LINEAR_HZ_PER_MEL  # 15.0 mel
_LOG_STEP = math.log(6.4) / 27.0  # natural-log Hz ratio per mel above the break


@dataclass(frozen=True, slots=True, kw_only=True)
class MelConfig:
    """Parameters of the log-mel front end; the defaults are CNext's.

    Attributes:
        sample_rate: Input sample rate in Hz; the waveform must already be at it.
        n_fft: FFT size in samples.
        hop_length: Hop between frames in samples.
        win_length: Hann window length in samples (zero-padded to ``n_fft``).
        n_mels: Number of mel bands.
        fmin: Lowest filter edge in Hz.
        fmax: Highest filter edge in Hz (at most ``sample_rate / 2``).
        amin: Floor applied to mel power before the logarithm.
        ref: Reference power; the output is ``10 log10(x) - 10 log10(max(amin, ref))``.
    """

    sample_rate: int = 32_000
    n_fft: int = 1024
    hop_length: int = 320
    win_length: int = 1024
    n_mels: int = 224
    fmin: float = 50.0
    fmax: float = 14_000.0
    amin: float = 1e-10
    ref: float = 1.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels"):
            if getattr(self, name) <= 0:
                problems.append(
                    f"mel.{name}: expected a positive integer, got {getattr(self, name)}"
                )
        if self.win_length > self.n_fft:
            problems.append(
                f"mel.win_length: expected <= n_fft ({self.n_fft}), got {self.win_length}"
            )
        if not 0.0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            problems.append(
                f"mel.fmin/fmax: expected 0 <= fmin < fmax <= sample_rate/2 "
                f"({self.sample_rate / 2}), got fmin={self.fmin}, fmax={self.fmax}"
            )
        if self.amin <= 0.0 or self.ref <= 0.0:
            problems.append(f"mel.amin/ref: expected positive values, got {self.amin}, {self.ref}")
        if problems:
            raise ConfigError(problems)

    @property
    def n_freqs(self) -> int:
        """Number of one-sided FFT bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    def n_frames(self, n_samples: int) -> int:
        """Number of centred frames produced for ``n_samples`` input samples."""
        return n_samples // self.hop_length + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-compatible)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "mel") -> MelConfig:
        """Build from a dict; unknown keys raise :class:`ConfigError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"{where}.{k}: unknown key" for k in unknown])
        return cls(**data)


def slaney_hz_to_mel(hz: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Convert frequencies in Hz to Slaney mels (1000 Hz -> 15.0 mel).

    Args:
        hz: Frequencies in Hz, any shape, non-negative.

    Returns:
        float64 array of the same shape.
    """
    f = np.asarray(hz, dtype=np.float64)
    linear = f / _LINEAR_HZ_PER_MEL
    with np.errstate(divide="ignore"):
        logarithmic = _BREAK_MEL + np.log(np.maximum(f, 1e-300) / _BREAK_HZ) / _LOG_STEP
    return np.where(f >= _BREAK_HZ, logarithmic, linear)


def slaney_mel_to_hz(mel: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Inverse of :func:`slaney_hz_to_mel`.

    Args:
        mel: Slaney mel values, any shape.

    Returns:
        float64 array of frequencies in Hz, same shape.
    """
    m = np.asarray(mel, dtype=np.float64)
    linear = m * _LINEAR_HZ_PER_MEL
    logarithmic = _BREAK_HZ * np.exp(_LOG_STEP * (m - _BREAK_MEL))
    return np.where(m >= _BREAK_MEL, logarithmic, linear)


def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> npt.NDArray[np.float32]:
    """Slaney-normalised triangular mel filterbank.

    ``n_mels + 2`` edge frequencies are spaced evenly on the Slaney mel scale
    between ``fmin`` and ``fmax``; filter ``m`` rises linearly from edge ``m``
    to edge ``m + 1`` and falls to edge ``m + 2``, and is scaled by
    ``2 / (edge[m + 2] - edge[m])``. Computed in float64, returned as float32.

    Returns:
        float32 array (n_fft // 2 + 1, n_mels): column ``m`` holds filter ``m``
        sampled at the FFT bin frequencies ``k * sample_rate / n_fft``.
    """
    bin_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_mel = np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2)
    edges_hz = slaney_mel_to_hz(edges_mel)
    widths = np.diff(edges_hz)  # (n_mels + 1,)
    # offsets[i, k] = edge_i - bin_k
    offsets = edges_hz[:, None] - bin_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return np.ascontiguousarray(weights.T.astype(np.float32))


class LogMel(nn.Module):
    """Waveform -> log-mel spectrogram, the CNext input.

    The window and filterbank are non-persistent buffers: they are derived
    from :class:`MelConfig` and never stored in a state dict.
    """

    window: Tensor
    mel_basis: Tensor

    def __init__(self, config: MelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else MelConfig()
        cfg = self.config
        window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float32)
        if cfg.win_length < cfg.n_fft:
            left = (cfg.n_fft - cfg.win_length) // 2
            window = nn.functional.pad(window, (left, cfg.n_fft - cfg.win_length - left))
        self.register_buffer("window", window, persistent=False)
        basis = mel_filterbank(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            n_mels=cfg.n_mels,
            fmin=cfg.fmin,
            fmax=cfg.fmax,
        )
        self.register_buffer("mel_basis", torch.from_numpy(basis), persistent=False)

    def power_spectrogram(self, wave: Tensor, *, center: bool = True) -> Tensor:
        """Power spectrogram of centred, reflect-padded Hann frames.

        Args:
            wave: float32 (B, n) mono waveform at ``config.sample_rate``;
                ``n`` must exceed ``n_fft // 2`` (reflect padding).
            center: False: no padding, frame ``t`` starts at sample ``t * hop_length``
                (``T = (n - n_fft) // hop_length + 1``; ``n >= n_fft``), as the
                centred frames whose samples all lie inside the waveform.

        Returns:
            float32 (B, T, n_fft // 2 + 1), ``T = n // hop_length + 1``.
        """
        cfg = self.config
        if wave.ndim != 2:
            raise ModelError(
                f"LogMel: expected a (batch, samples) waveform, got shape {tuple(wave.shape)}"
            )
        if not center and wave.shape[1] < cfg.n_fft:
            raise ModelError(
                f"LogMel: waveform of {wave.shape[1]} samples is too short; "
                f"need at least {cfg.n_fft} without padding"
            )
        if center and wave.shape[1] <= cfg.n_fft // 2:
            raise ModelError(
                f"LogMel: waveform of {wave.shape[1]} samples is too short; "
                f"need more than {cfg.n_fft // 2} for reflect padding"
            )
        spec = torch.stft(
            wave.to(torch.float32),
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.n_fft,
            window=self.window,
            center=center,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        return power.transpose(1, 2)

    def forward(self, wave: Tensor) -> Tensor:
        """Log-mel spectrogram in dB.

        Args:
            wave: float32 (B, n) mono waveform at ``config.sample_rate``.

        Returns:
            float32 (B, 1, T, n_mels) with ``T = n // hop_length + 1``.
        """
        return self.power_to_db(self.power_spectrogram(wave)).unsqueeze(1)

    def power_to_db(self, power: Tensor) -> Tensor:
        """(B, T, n_fft // 2 + 1) power spectrogram -> (B, T, n_mels) log-mel in dB."""
        cfg = self.config
        mel = torch.matmul(power, self.mel_basis)
        db = 10.0 * torch.log10(torch.clamp(mel, min=cfg.amin))
        offset = 10.0 * math.log10(max(cfg.amin, cfg.ref))
        if offset != 0.0:
            db = db - offset
        return db
