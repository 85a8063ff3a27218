"""CNext: the ConvNeXt-Tiny audio encoder (AudioSet-pretrained) used by the retriever.

Input is a 32 kHz mono waveform; :class:`~streamcap.models.retrieval.melspec.LogMel`
turns it into a (B, 1, T, 224) log-mel image. A ``BatchNorm2d`` normalises
each mel bin (the spectrogram is transposed so that mel bins are the channel
axis), then a one-channel ConvNeXt runs over (time, mel):

* stem: ``Conv2d(1, 96, kernel 4, stride 4, padding (4, 0))`` + channels-first
  LayerNorm: 10 s (1001 frames x 224 mels) becomes 252 x 56;
* four stages of ConvNeXt blocks (depths 3, 3, 9, 3; widths 96, 192, 384,
  768): 7x7 depthwise conv, channels-last LayerNorm, Linear 4x, GELU,
  Linear back, per-channel layer scale, residual;
* between stages: channels-first LayerNorm + ``Conv2d(k=2, s=2)``.

Outputs: frame embeddings (B, 768, T') are the last stage averaged over the
mel axis (T' ~ 3.1 frames/s); the clip embedding is max-over-time plus
mean-over-time of those, through ``LayerNorm(768)``; an optional AudioSet
head maps it to 527 logits.

Parameter and buffer names follow the published ``convnext_tiny_*``
checkpoints (state dict under the key ``"model"``): ``bn0``,
``downsample_layers.{i}.{j}``, ``stages.{i}.{j}.{dwconv,norm,pwconv1,pwconv2,gamma}``,
``norm``, ``head_audioset``. Those files also hold the fixed STFT and mel
matrices of the original front end (``spectrogram_extractor.stft.conv_real``,
``...conv_imag``, ``logmel_extractor.melW``); the loader checks them against
:class:`LogMel` instead of loading them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.weights import check_state, read_state_dict, state_dict_from
from streamcap.models.retrieval.melspec import LogMel, MelConfig

__all__ = [
    "CNEXT_TINY",
    "CNEXT_TOY",
    "FRONTEND_KEYS",
    "CNext",
    "CNextConfig",
    "CNextOutput",
    "load_cnext_checkpoint",
]

#: Keys of the original torchlibrosa front end found in the published checkpoints.
FRONTEND_KEYS = (
    "spectrogram_extractor.stft.conv_real.weight",
    "spectrogram_extractor.stft.conv_imag.weight",
    "logmel_extractor.melW",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CNextConfig:
    """Architecture of a CNext encoder; the defaults are the published ConvNeXt-Tiny.

    Attributes:
        mel: Log-mel front end; ``mel.n_mels`` is also the BatchNorm width.
        depths: Blocks per stage (4 stages).
        dims: Channels per stage (4 stages); ``dims[-1]`` is the embedding size.
        stem_kernel: Stem conv kernel (time, mel).
        stem_stride: Stem conv stride (time, mel).
        stem_padding: Stem conv zero padding (time, mel).
        layer_scale_init: Initial value of the per-channel block scale ``gamma``.
        drop_path_rate: Maximum stochastic-depth rate (training only; 0 disables).
        num_classes: Size of the AudioSet head (527); 0 builds no head.
    """

    mel: MelConfig = field(default_factory=MelConfig)
    depths: tuple[int, int, int, int] = (3, 3, 9, 3)
    dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    stem_kernel: tuple[int, int] = (4, 4)
    stem_stride: tuple[int, int] = (4, 4)
    stem_padding: tuple[int, int] = (4, 0)
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.0
    num_classes: int = 527

    def __post_init__(self) -> None:
        problems: list[str] = []
        if len(self.depths) != 4 or any(d <= 0 for d in self.depths):
            problems.append(f"audio.depths: expected 4 positive integers, got {self.depths}")
        if len(self.dims) != 4 or any(d <= 0 for d in self.dims):
            problems.append(f"audio.dims: expected 4 positive integers, got {self.dims}")
        for name in ("stem_kernel", "stem_stride", "stem_padding"):
            value = getattr(self, name)
            if len(value) != 2 or any(v < 0 for v in value):
                problems.append(f"audio.{name}: expected 2 non-negative integers, got {value}")
        if self.layer_scale_init <= 0.0:
            problems.append(f"audio.layer_scale_init: expected > 0, got {self.layer_scale_init}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"audio.drop_path_rate: expected in [0, 1), got {self.drop_path_rate}")
        if self.num_classes < 0:
            problems.append(f"audio.num_classes: expected >= 0, got {self.num_classes}")
        if problems:
            raise ConfigError(problems)

    @property
    def embed_dim(self) -> int:
        """Size of frame and clip embeddings, ``dims[-1]``."""
        return self.dims[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-compatible; tuples become lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MelConfig):
                out[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "audio") -> CNextConfig:
        """Build from a dict; unknown keys raise :class:`ConfigError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"{where}.{k}: unknown key" for k in unknown])
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "mel":
                kwargs[key] = MelConfig.from_dict(dict(value), where=f"{where}.mel")
            elif isinstance(value, list):
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


#: The published ConvNeXt-Tiny audio encoder (28,222,767 parameters with head).
CNEXT_TINY = CNextConfig()

#: A toy encoder for tests: 64 mels, one block per stage, widths 8-64, 10 classes.
CNEXT_TOY = CNextConfig(
    mel=MelConfig(n_mels=64, fmax=14_000.0),
    depths=(1, 1, 1, 1),
    dims=(8, 16, 32, 64),
    num_classes=10,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CNextOutput:
    """Everything one CNext forward pass produces.

    Attributes:
        frames: float32 (B, C, T') frame embeddings, C = ``dims[-1]``.
        clip: float32 (B, C) clip embedding (max + mean over time, LayerNorm).
        logits: float32 (B, num_classes) AudioSet logits, or None without a head.
    """

    frames: Tensor
    clip: Tensor
    logits: Tensor | None


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise float (B, C, H, W) over C; returns the same shape."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        """Scale (B, ...) by a per-sample keep mask / keep probability; identity in eval."""
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """ConvNeXt block: dwconv 7x7, LayerNorm, Linear 4x, GELU, Linear, layer scale, residual."""

    def __init__(self, dim: int, *, layer_scale_init: float, drop_path: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map float32 (B, C, H, W) to the same shape."""
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        out: Tensor = x + self.drop_path(y)
        return out


class CNext(nn.Module):
    """ConvNeXt audio encoder with its log-mel front end (see module docstring)."""

    def __init__(self, config: CNextConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else CNextConfig()
        self.config = cfg
        dims = cfg.dims
        self.frontend = LogMel(cfg.mel)
        self.bn0 = nn.BatchNorm2d(cfg.mel.n_mels)
        stem = nn.Sequential(
            nn.Conv2d(
                1,
                dims[0],
                kernel_size=cfg.stem_kernel,
                stride=cfg.stem_stride,
                padding=cfg.stem_padding,
            ),
            ChannelsFirstLayerNorm(dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    ChannelsFirstLayerNorm(dims[i]),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        self.stages = nn.ModuleList()
        cursor = 0
        for i in range(4):
            blocks = [
                Block(dims[i], layer_scale_init=cfg.layer_scale_init, drop_path=rates[cursor + j])
                for j in range(cfg.depths[i])
            ]
            self.stages.append(nn.Sequential(*blocks))
            cursor += cfg.depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_audioset: nn.Linear | None = (
            nn.Linear(dims[-1], cfg.num_classes) if cfg.num_classes > 0 else None
        )
        self.apply(_init_weights)

    def min_samples(self) -> int:
        """Shortest waveform (samples) that survives the stem and the 3 downsamplings."""
        cfg = self.config
        kt, st, pt = cfg.stem_kernel[0], cfg.stem_stride[0], cfg.stem_padding[0]
        kf, sf, pf = cfg.stem_kernel[1], cfg.stem_stride[1], cfg.stem_padding[1]
        if (cfg.mel.n_mels + 2 * pf - kf) // sf + 1 < 8:
            raise ModelError(
                f"CNext: {cfg.mel.n_mels} mel bins give fewer than 8 after the stem; "
                "the three 2x downsamplings need at least 8"
            )
        # stem output along time must be >= 8: (T + 2 pt - kt) // st + 1 >= 8
        min_frames = max(7 * st + kt - 2 * pt, 1)
        n = (min_frames - 1) * cfg.mel.hop_length
        return max(n, cfg.mel.n_fft // 2 + 1)

    def normalise(self, logmel: Tensor) -> Tensor:
        """Apply the per-mel-bin BatchNorm.

        Args:
            logmel: float32 (B, 1, T, n_mels).

        Returns:
            float32 (B, 1, T, n_mels).
        """
        out: Tensor = self.bn0(logmel.transpose(1, 3)).transpose(1, 3)
        return out

    def feature_map(self, logmel: Tensor) -> Tensor:
        """Run stem and stages on a normalised log-mel image.

        Args:
            logmel: float32 (B, 1, T, n_mels), already through :meth:`normalise`.

        Returns:
            float32 (B, dims[-1], T', F') last-stage feature map.
        """
        x = logmel
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return x

    def pool(self, frames: Tensor) -> Tensor:
        """Clip embedding from frame embeddings.

        Args:
            frames: float32 (B, C, T').

        Returns:
            float32 (B, C): ``LayerNorm(max_t + mean_t)``.
        """
        out: Tensor = self.norm(frames.amax(dim=2) + frames.mean(dim=2))
        return out

    def forward(self, wave: Tensor) -> CNextOutput:
        """Encode a batch of waveforms.

        Args:
            wave: float32 (B, n) mono waveform at ``config.mel.sample_rate`` Hz,
                ``n >= min_samples()``.

        Returns:
            :class:`CNextOutput` with frames (B, C, T'), clip (B, C) and logits.
        """
        if wave.ndim != 2:
            raise ModelError(
                f"CNext: expected a (batch, samples) waveform, got shape {tuple(wave.shape)}"
            )
        needed = self.min_samples()
        if wave.shape[1] < needed:
            raise ModelError(
                f"CNext: waveform of {wave.shape[1]} samples is too short; need at least {needed}"
            )
        return self.encode_logmel(self.frontend(wave))

    def encode_logmel(self, logmel: Tensor) -> CNextOutput:
        """Encode log-mel images computed elsewhere (the trigger path caches them).

        Args:
            logmel: float32 (B, 1, T, n_mels), as :class:`LogMel` makes them.

        Returns:
            As :meth:`forward`.
        """
        x = self.feature_map(self.normalise(logmel))
        frames = x.mean(dim=3)
        clip = self.pool(frames)
        logits = self.head_audioset(clip) if self.head_audioset is not None else None
        return CNextOutput(frames=frames, clip=clip, logits=logits)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _read_state_dict(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """The state dict of ``source`` (a file or a loaded checkpoint) and how to name it."""
    if isinstance(source, str | Path):
        return read_state_dict(source, nested=("model",)), str(source)
    return state_dict_from(source, "state dict", nested=("model",)), "state dict"


def _frontend_problems(model: CNext, extras: Mapping[str, Tensor], atol: float) -> list[str]:
    """Compare the original front end's fixed matrices with ours."""
    problems: list[str] = []
    cfg = model.config.mel
    mel = extras.get("logmel_extractor.melW")
    if mel is not None:
        ours = model.frontend.mel_basis
        if tuple(mel.shape) != tuple(ours.shape):
            problems.append(
                f"logmel_extractor.melW: shape {tuple(mel.shape)}, expected {tuple(ours.shape)}"
            )
        else:
            diff = float((mel.float() - ours).abs().max())
            if diff > atol * float(ours.abs().max()):
                problems.append(
                    f"logmel_extractor.melW: differs from the Slaney filterbank of {cfg} "
                    f"(max abs diff {diff:.3g}); the features would not match training"
                )
    n = torch.arange(cfg.n_fft, dtype=torch.float64)
    k = torch.arange(cfg.n_freqs, dtype=torch.float64)
    phase = 2.0 * math.pi * torch.outer(k, n) / cfg.n_fft
    window = model.frontend.window.double()
    for key, basis in (
        ("spectrogram_extractor.stft.conv_real.weight", torch.cos(phase) * window),
        ("spectrogram_extractor.stft.conv_imag.weight", -torch.sin(phase) * window),
    ):
        stored = extras.get(key)
        if stored is None:
            continue
        expected_shape = (cfg.n_freqs, 1, cfg.n_fft)
        if tuple(stored.shape) != expected_shape:
            problems.append(f"{key}: shape {tuple(stored.shape)}, expected {expected_shape}")
            continue
        diff = float((stored[:, 0, :].double() - basis).abs().max())
        if diff > atol:
            problems.append(
                f"{key}: differs from a Hann-windowed DFT basis (max abs diff {diff:.3g})"
            )
    return problems


def load_cnext_checkpoint(
    source: str | Path | Mapping[str, Any],
    *,
    config: CNextConfig | None = None,
    check_frontend: bool = True,
    frontend_atol: float = 1e-4,
) -> CNext:
    """Build a :class:`CNext` and load published or own weights into it.

    Accepted sources: a ``.pth`` file holding ``{"model": state_dict}`` (the
    Zenodo ``convnext_tiny_*`` files; read with ``weights_only=True``), a
    ``.pth`` holding a bare state dict, a ``.safetensors`` file (the Hugging
    Face ``model.safetensors``), or such a dict in memory.

    The original front end's fixed matrices (:data:`FRONTEND_KEYS`) are not
    loaded; when ``check_frontend`` is set and they are present, they must
    match this module's STFT basis and mel filterbank (relative tolerance
    ``frontend_atol`` for the filterbank, absolute for the DFT basis).

    Args:
        source: Path or state dict as above.
        config: Architecture; defaults to :data:`CNEXT_TINY`.
        check_frontend: Compare stored front-end matrices with ours.
        frontend_atol: Tolerance of that comparison.

    Returns:
        The model in eval mode, on CPU, float32.

    Raises:
        WeightsError: unreadable file, missing or unexpected keys, shape
            mismatches or a front-end mismatch; the message lists every
            offending key.
    """
    state, where = _read_state_dict(source)
    model = CNext(config if config is not None else CNEXT_TINY)
    extras = {k: state.pop(k) for k in FRONTEND_KEYS if k in state}
    check_state(
        model.state_dict(),
        state,
        f"{where}: CNext checkpoint does not match the model",
        extra=_frontend_problems(model, extras, frontend_atol) if check_frontend else (),
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
