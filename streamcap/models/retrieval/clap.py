"""LAION-CLAP audio embedding (HTSAT-tiny with feature fusion): the EnCLAP row-0 embedding.

The published EnCLAP checkpoints project a 512-d, L2-normalised LAION-CLAP audio
embedding into encoder row 0. The checkpoint is ``630k-audioset-fusion-best.pt``
(HF repo ``lukewys/laion_clap``); its ``transformers`` conversion is the model id
``laion/clap-htsat-fused`` (``ClapModel``; the audio half is
``ClapAudioModelWithProjection``). :class:`ClapEmbedder` runs the audio half only.

Input features, computed here in torch (no librosa, no ``ClapFeatureExtractor``),
as LAION-CLAP's inference path does for a fusion model:

1. the 48 kHz mono clip is quantised to int16 and back (clip to [-1, 1], x 32767);
2. a clip of at most 10 s (480,000 samples) is repeated whole as often as it fits
   and zero-padded to 10 s ("repeatpad"); its log-mel spectrogram (1,001 x 64) is
   stacked four times and ``is_longer`` is False (only the global branch runs);
3. a longer clip: the log-mel of the whole clip, plus three 1,001-frame crops from
   its front, middle and back thirds and the whole spectrogram bilinearly shrunk to
   1,001 frames, stacked as ``[shrunk, front, middle, back]`` with ``is_longer``
   True (the fusion branch runs).

Log-mel: power STFT (n_fft 1,024, Hann window 1,024, hop 480, centred, reflect
padding), 64 HTK mel filters 50 Hz-14 kHz without area normalisation, then
``10 * log10(max(x, 1e-10))``.

Departure from the reference: LAION picks each crop of step 3 at random; streamcap
takes the start in the middle of each third, so the embedding of a window is
deterministic. (``ClapFeatureExtractor`` also marks a random short clip of a batch as
"longer"; streamcap does not, as LAION does not.)

Weights: the ``ClapAudioModelWithProjection`` layout (``audio_model.*``,
``audio_projection.*``); :func:`convert_laion_state_dict` maps the original LAION
layout onto it and :func:`audio_state_from_clap_model` takes the audio half of a
``ClapModel`` state dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ClapAudioConfig, ClapAudioModelWithProjection
from transformers.audio_utils import mel_filter_bank

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.weights import check_state, state_shapes
from streamcap.models.codecs.base import Float32Array

CLAP_MODEL_ID = "laion/clap-htsat-fused"
"""The Hugging Face conversion of LAION's ``630k-audioset-fusion-best.pt``."""

_HTSAT_TINY_FUSED: dict[str, Any] = {
    "enable_fusion": True, "fusion_type": "aff_2d", "spec_size": 256, "window_size": 8,
    "num_mel_bins": 64, "patch_size": 4, "patch_stride": [4, 4], "patch_embeds_hidden_size": 96,
    "depths": [2, 2, 6, 2], "num_attention_heads": [4, 8, 16, 32], "hidden_size": 768,
    "projection_dim": 512, "num_classes": 527, "mlp_ratio": 4.0,
}
_HTSAT_TOY: dict[str, Any] = {
    **_HTSAT_TINY_FUSED, "patch_embeds_hidden_size": 8, "depths": [1, 1],
    "num_attention_heads": [1, 2], "hidden_size": 16, "projection_dim": 32, "num_classes": 10,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClapEmbedderConfig:
    """Front end and network of the CLAP audio embedding.

    Attributes:
        sample_rate_hz: input rate (48 kHz).
        n_fft / hop_length / f_min_hz / f_max_hz: log-mel settings (``n_mels`` is
            ``audio["num_mel_bins"]``).
        max_samples: the fixed clip length of the global branch (10 s).
        audio: ``transformers.ClapAudioConfig`` fields.
    """

    sample_rate_hz: int = 48000
    n_fft: int = 1024
    hop_length: int = 480
    f_min_hz: float = 50.0
    f_max_hz: float = 14000.0
    max_samples: int = 480000
    audio: Mapping[str, Any] = field(default_factory=lambda: dict(_HTSAT_TINY_FUSED))

    def __post_init__(self) -> None:
        problems = [f"seq_embedder.{name}: expected a positive integer, got {getattr(self, name)!r}"
                    for name in ("sample_rate_hz", "n_fft", "hop_length", "max_samples")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0]
        if not 0 <= self.f_min_hz < self.f_max_hz <= self.sample_rate_hz / 2:
            problems.append(f"seq_embedder.f_min_hz/f_max_hz: expected 0 <= f_min < f_max <= "
                            f"Nyquist, got {self.f_min_hz}, {self.f_max_hz}")
        if not self.audio.get("enable_fusion", False):
            problems.append("seq_embedder.audio.enable_fusion: streamcap runs the fusion "
                            "HTSAT model only; expected true")
        if problems:
            raise ConfigError(problems)

    @property
    def n_mels(self) -> int:
        return int(self.audio.get("num_mel_bins", 64))

    @property
    def embed_dim(self) -> int:
        """Size of the output embedding (``projection_dim``, 512 for LAION-CLAP)."""
        return int(self.audio.get("projection_dim", 512))

    @property
    def chunk_frames(self) -> int:
        """Mel frames of a ``max_samples`` clip (1,001)."""
        return self.max_samples // self.hop_length + 1

    def hf_config(self) -> ClapAudioConfig:
        return ClapAudioConfig(**dict(self.audio))

    def to_dict(self) -> dict[str, Any]:
        return {"sample_rate_hz": self.sample_rate_hz, "n_fft": self.n_fft,
                "hop_length": self.hop_length, "f_min_hz": self.f_min_hz,
                "f_max_hz": self.f_max_hz, "max_samples": self.max_samples,
                "audio": dict(self.audio)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClapEmbedderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        known = {"sample_rate_hz", "n_fft", "hop_length", "f_min_hz", "f_max_hz", "max_samples",
                 "audio"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"seq_embedder.{k}: unknown key (expected one of {sorted(known)})"
                               for k in unknown])
        values = dict(data)
        if "audio" in values:
            values["audio"] = {**_HTSAT_TINY_FUSED, **dict(values["audio"])}
        return cls(**values)

    @classmethod
    def from_hf_config(cls, data: Mapping[str, Any], where: str = "config.json"
                       ) -> ClapEmbedderConfig:
        """The config of a ``ClapModel`` (or ``ClapAudioConfig``) ``config.json`` dict."""
        audio = data.get("audio_config", data)
        if not isinstance(audio, Mapping):
            raise ConfigError(f"{where}: audio_config: expected an object")
        keys = set(_HTSAT_TINY_FUSED) | {"enable_patch_layer_norm", "flatten_patch_embeds",
                                         "layer_norm_eps", "aff_block_r", "qkv_bias",
                                         "hidden_act", "projection_hidden_act"}
        values = {k: audio[k] for k in keys if k in audio}
        merged = {**_HTSAT_TINY_FUSED, **values}
        if not merged.get("enable_fusion"):
            raise ConfigError(f"{where}: audio_config.enable_fusion is false; EnCLAP needs the "
                              f"fusion model ({CLAP_MODEL_ID})")
        return cls(audio=merged)


CLAP_PRESETS: Mapping[str, ClapEmbedderConfig] = {
    "clap-tiny": ClapEmbedderConfig(audio=dict(_HTSAT_TOY)),
    "clap-htsat-fused": ClapEmbedderConfig(),
}


def clap_preset(name: str) -> ClapEmbedderConfig:
    """The preset ``name`` (``clap-tiny`` or ``clap-htsat-fused``)."""
    try:
        return CLAP_PRESETS[name]
    except KeyError:
        raise ConfigError(f"seq_embedder.preset: unknown CLAP preset {name!r} "
                          f"(expected one of {sorted(CLAP_PRESETS)})") from None


# --------------------------------------------------------------------------- features


class ClapFeatures:
    """The fusion input features of one clip (pure torch)."""

    def __init__(self, config: ClapEmbedderConfig) -> None:
        self.config = config
        bank = mel_filter_bank(num_frequency_bins=config.n_fft // 2 + 1,
                               num_mel_filters=config.n_mels, min_frequency=config.f_min_hz,
                               max_frequency=config.f_max_hz,
                               sampling_rate=config.sample_rate_hz, norm=None, mel_scale="htk")
        self.mel_filters = torch.from_numpy(np.asarray(bank, dtype=np.float32))  # (bins, mels)
        self.window = torch.hann_window(config.n_fft)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """float32 (n,) -> float32 (n // hop + 1, n_mels) log-mel in dB."""
        spec = torch.stft(wave, self.config.n_fft, hop_length=self.config.hop_length,
                          win_length=self.config.n_fft, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        power = spec.abs().pow(2)  # (bins, frames)
        mel = power.T @ self.mel_filters
        return 10.0 * torch.log10(mel.clamp_min(1e-10))

    def __call__(self, audio: Float32Array) -> tuple[torch.Tensor, bool]:
        """Features of one clip.

        Args:
            audio: float32 (n,) mono at ``config.sample_rate_hz``, n >= 1.

        Returns:
            float32 (4, chunk_frames, n_mels) and ``is_longer``.

        Raises:
            ModelError: empty, not 1-D, or not finite.
        """
        samples = np.asarray(audio, dtype=np.float32)
        if samples.ndim != 1 or samples.shape[0] == 0:
            raise ModelError(f"CLAP input: expected non-empty mono audio (n,), got {samples.shape}")
        if not np.all(np.isfinite(samples)):
            raise ModelError("CLAP input: audio holds NaN or inf samples")
        quantised = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
        wave = torch.from_numpy(quantised.astype(np.float32) / 32767.0)
        cfg = self.config
        chunk = cfg.chunk_frames
        if wave.shape[0] > cfg.max_samples:
            mel = self.log_mel(wave)
            total = mel.shape[0]
            if total == chunk:
                return mel[None].expand(4, -1, -1).contiguous(), False
            starts = [int(part[len(part) // 2]) if len(part) else 0
                      for part in np.array_split(np.arange(total - chunk + 1), 3)]
            crops = [mel[s:s + chunk] for s in starts]
            shrunk = F.interpolate(mel[None, None], size=(chunk, cfg.n_mels), mode="bilinear",
                                   align_corners=False)[0, 0]
            return torch.stack([shrunk, *crops]), True
        if wave.shape[0] < cfg.max_samples:
            repeats = cfg.max_samples // wave.shape[0]
            wave = F.pad(wave.repeat(repeats), (0, cfg.max_samples - wave.shape[0] * repeats))
        mel = self.log_mel(wave)
        return mel[None].expand(4, -1, -1).contiguous(), False


# --------------------------------------------------------------------------- weights


def audio_state_from_clap_model(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The audio half of a ``ClapModel`` (or ``ClapAudioModelWithProjection``) state dict."""
    return {k: v for k, v in state.items()
            if k.startswith(("audio_model.", "audio_projection."))}


_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^audio_branch\.", "audio_model.audio_encoder."),
    (r"\.bn0\.", ".batch_norm."),
    (r"\.attn\.proj\.", ".attention.output.dense."),
    (r"\.attn\.", ".attention.self."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"^audio_projection\.0\.", "audio_projection.linear1."),
    (r"^audio_projection\.2\.", "audio_projection.linear2."),
)
# LAION keys with no counterpart in the audio embedding path.
_DROPPED = re.compile(
    r"^(text_branch|text_projection|text_transform|audio_transform|logit_scale_[at])\b"
    r"|^audio_branch\.(spectrogram_extractor|logmel_extractor)\."
    r"|\.attn_mask$"
)


def convert_laion_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a LAION-CLAP checkpoint state dict onto the ``ClapAudioModelWithProjection`` layout.

    Handles the ``module.`` prefix of DDP checkpoints, splits the fused ``qkv``
    projections into ``query``/``key``/``value``, renames the Swin blocks and the
    projection MLP, and drops the text tower, the spectrogram front end (computed by
    :class:`ClapFeatures`) and the Swin attention-mask buffers.

    Args:
        state: ``{"module.audio_branch...": tensor, ...}`` or without the prefix.

    Returns:
        A state dict for :meth:`ClapEmbedder.load_state_dict`.
    """
    out: dict[str, torch.Tensor] = {}
    for raw_key, value in state.items():
        key = raw_key.removeprefix("module.")
        if _DROPPED.search(key):
            continue
        for pattern, new in _RENAMES:
            key = re.sub(pattern, new, key)
        if ".attention.self.qkv." in key:
            query, key_part, value_part = value.chunk(3, dim=0)
            for name, part in (("query", query), ("key", key_part), ("value", value_part)):
                out[key.replace(".qkv.", f".{name}.")] = part
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- embedder


class ClapEmbedder:
    """48 kHz mono clip -> 512-d L2-normalised CLAP audio embedding.

    Args:
        config: features and network sizes.
        model: a ``ClapAudioModelWithProjection`` of matching size, or None for random
            weights (load real ones with :meth:`load_state_dict`).
    """

    def __init__(self, config: ClapEmbedderConfig,
                 model: ClapAudioModelWithProjection | None = None) -> None:
        self.config = config
        self.features = ClapFeatures(config)
        self.model = (model if model is not None
                      else ClapAudioModelWithProjection(config.hf_config()))
        nn.Module.eval(self.model)
        self._expected = state_shapes(self.model.state_dict())

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def sample_rate_hz(self) -> int:
        return self.config.sample_rate_hz

    def to(self, device: torch.device | str) -> ClapEmbedder:
        nn.Module.to(self.model, device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load ``ClapAudioModelWithProjection`` weights (a full ``ClapModel``'s are cut).

        Buffers that ``transformers`` recomputes (``relative_position_index``,
        ``num_batches_tracked``, position ids) may be absent.

        Raises:
            WeightsError: missing, unexpected or mis-shaped keys, named.
        """
        kept = audio_state_from_clap_model(state)
        check_state(self._expected, kept,
                    "CLAP audio weights do not match the configured HTSAT model",
                    optional=("relative_position_index", "num_batches_tracked", "position_ids"))
        self.model.load_state_dict(kept, strict=False)
        nn.Module.eval(self.model)

    @torch.inference_mode()
    def embed_tensor(self, audio: Float32Array) -> torch.Tensor:
        """The embedding of one clip.

        Args:
            audio: float32 (n,) mono at 48 kHz.

        Returns:
            float32 (1, embed_dim), L2-normalised, on the model's device.
        """
        feats, longer = self.features(audio)
        param = next(self.model.parameters())
        out = self.model(input_features=feats[None].to(param.device, param.dtype),
                         is_longer=torch.tensor([[longer]], device=param.device))
        embeds: torch.Tensor = out.audio_embeds
        return F.normalize(embeds.float(), dim=-1)

    def embed(self, audio: Float32Array) -> Float32Array:
        """float32 (embed_dim,) L2-normalised embedding of one 48 kHz mono clip."""
        vector: Float32Array = self.embed_tensor(audio)[0].cpu().numpy().astype(np.float32)
        return vector
