"""Audio-text retriever: CNext audio encoder + transformer text encoder + projections.

Both modalities are mapped into one joint space of ``joint_dim`` dimensions
and L2-normalised there, so the cosine similarity is a dot product. The
audio branch also returns the raw CNext clip embedding (768-d for the
published encoder), which the captioner feeds to EnCLAP as its first
encoder row.

Tokenising captions is the caller's job: :meth:`AudioTextRetriever.embed_text`
takes token ids and an attention mask from whatever tokenizer matches the
text encoder.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn
from transformers import PreTrainedModel

from streamcap.errors import ConfigError, ModelError, WeightsError
from streamcap.models.retrieval.cnext import (
    CNEXT_TINY,
    CNext,
    CNextConfig,
    CNextOutput,
    load_cnext_checkpoint,
)

__all__ = ["AudioTextRetriever", "Projection", "RetrieverConfig"]

_POOLINGS = ("cls", "mean")
_AUDIO_SOURCES = ("clip", "frames_mean")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrieverConfig:
    """Architecture of the retriever.

    Attributes:
        audio: CNext encoder architecture.
        audio_source: Which CNext output feeds the audio projection:
            ``"clip"`` (LayerNorm of max + mean over time, the default) or
            ``"frames_mean"`` (plain mean of the frame embeddings over time).
        text_model_type: transformers ``model_type`` of the text encoder
            (``"bert"`` also for BGE models, ``"roberta"``, ``"xlm-roberta"``, ...).
        text_config: Keyword arguments of that model type's config class
            (e.g. ``hidden_size``); empty means the library defaults.
        text_pooling: ``"cls"`` (first token) or ``"mean"`` (mask-weighted mean
            of the last hidden states).
        text_dropout: Dropout on the pooled text vector before projection.
        joint_dim: Size of the joint embedding space.
        audio_hidden: Hidden width of the audio projection MLP (0: one Linear).
        text_hidden: Hidden width of the text projection MLP (0: one Linear).
    """

    audio: CNextConfig = CNEXT_TINY
    audio_source: Literal["clip", "frames_mean"] = "clip"
    text_model_type: str = "bert"
    text_config: Mapping[str, Any] = field(default_factory=dict)
    text_pooling: Literal["cls", "mean"] = "cls"
    text_dropout: float = 0.2
    joint_dim: int = 1024
    audio_hidden: int = 2048
    text_hidden: int = 2048

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.audio_source not in _AUDIO_SOURCES:
            problems.append(
                f"retriever.audio_source: expected one of {_AUDIO_SOURCES}, got {self.audio_source!r}"
            )
        if self.text_pooling not in _POOLINGS:
            problems.append(
                f"retriever.text_pooling: expected one of {_POOLINGS}, got {self.text_pooling!r}"
            )
        if not 0.0 <= self.text_dropout < 1.0:
            problems.append(f"retriever.text_dropout: expected in [0, 1), got {self.text_dropout}")
        if self.joint_dim <= 0:
            problems.append(f"retriever.joint_dim: expected > 0, got {self.joint_dim}")
        for name in ("audio_hidden", "text_hidden"):
            if getattr(self, name) < 0:
                problems.append(f"retriever.{name}: expected >= 0, got {getattr(self, name)}")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-compatible if ``text_config`` is)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, CNextConfig):
                out[f.name] = value.to_dict()
            elif f.name == "text_config":
                out[f.name] = copy.deepcopy(dict(value))
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "retriever") -> RetrieverConfig:
        """Build from a dict; unknown keys (also nested ones) raise :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"{where}.{k}: unknown key" for k in unknown])
        kwargs = dict(data)
        if "audio" in kwargs:
            kwargs["audio"] = CNextConfig.from_dict(dict(kwargs["audio"]), where=f"{where}.audio")
        if "text_config" in kwargs:
            kwargs["text_config"] = copy.deepcopy(dict(kwargs["text_config"]))
        return cls(**kwargs)


class Projection(nn.Module):
    """Linear -> ReLU -> Linear (or one Linear when ``hidden == 0``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
            )
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map float (B, in_dim) to (B, out_dim)."""
        out: Tensor = self.net(x)
        return out


def _build_text_encoder(
    config: RetrieverConfig, text_encoder_dir: str | Path | None
) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModel

    if text_encoder_dir is not None:
        directory = Path(text_encoder_dir)
        if not (directory / "config.json").is_file():
            raise WeightsError(
                f"{directory}: no config.json; expected a local transformers model directory"
            )
        try:
            model = AutoModel.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{directory}: cannot load text encoder: {exc}") from exc
        found = getattr(model.config, "model_type", None)
        if found != config.text_model_type:
            raise ConfigError(
                f"retriever.text_model_type: {config.text_model_type!r} but {directory}/config.json "
                f"has model_type {found!r}"
            )
        if not isinstance(model, PreTrainedModel):
            raise WeightsError(f"{directory}: not a transformers model directory")
        return model
    try:
        defaults = AutoConfig.for_model(config.text_model_type)
    except ValueError as exc:
        raise ConfigError(
            f"retriever.text_model_type: unknown transformers model type {config.text_model_type!r}"
        ) from exc
    unknown = sorted(k for k in config.text_config if not hasattr(defaults, k))
    if unknown:
        raise ConfigError(
            [f"retriever.text_config.{k}: not a {type(defaults).__name__} field" for k in unknown]
        )
    text_cfg = AutoConfig.for_model(config.text_model_type, **dict(config.text_config))
    built: PreTrainedModel = AutoModel.from_config(text_cfg)  # type: ignore[no-untyped-call]
    return built


class AudioTextRetriever(nn.Module):
    """Embeds audio and text into one L2-normalised joint space.

    Args:
        config: Architecture.
        text_encoder_dir: Optional local transformers model directory
            (``config.json`` + weights) to load the text encoder from instead of
            building it randomly initialised from ``config.text_config``.
    """

    def __init__(
        self, config: RetrieverConfig, *, text_encoder_dir: str | Path | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.audio_encoder = CNext(config.audio)
        self.text_encoder: PreTrainedModel = _build_text_encoder(config, text_encoder_dir)
        hidden_size = getattr(self.text_encoder.config, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ConfigError(
                f"retriever.text_model_type: {config.text_model_type!r} config has no integer hidden_size"
            )
        self.text_dropout = nn.Dropout(config.text_dropout)
        self.audio_proj = Projection(config.audio.embed_dim, config.audio_hidden, config.joint_dim)
        self.text_proj = Projection(hidden_size, config.text_hidden, config.joint_dim)

    def load_audio_encoder(self, source: str | Path | Mapping[str, Any]) -> None:
        """Load CNext weights (published ``{"model": sd}`` file or state dict).

        Raises:
            WeightsError: as :func:`~streamcap.models.retrieval.cnext.load_cnext_checkpoint`.
        """
        loaded = load_cnext_checkpoint(source, config=self.config.audio)
        self.audio_encoder.load_state_dict(loaded.state_dict(), strict=True)

    def embed_audio(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """Embed waveforms.

        Args:
            wave: float32 (B, n) mono waveform at 32 kHz (``config.audio.mel.sample_rate``).

        Returns:
            ``(clip, joint)``: float32 (B, C) raw CNext clip embedding
            (C = 768 for the published encoder; EnCLAP's first encoder row)
            and float32 (B, joint_dim) L2-normalised joint embedding.
        """
        return self._project(self.audio_encoder(wave))

    def embed_logmel(self, logmel: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`embed_audio` of log-mel images (B, 1, T, n_mels) computed elsewhere."""
        return self._project(self.audio_encoder.encode_logmel(logmel))

    def _project(self, out: CNextOutput) -> tuple[Tensor, Tensor]:
        if self.config.audio_source == "clip":
            source = out.clip
        else:
            source = out.frames.mean(dim=2)
        joint = nn.functional.normalize(self.audio_proj(source), dim=-1)
        return out.clip, joint

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embed tokenised captions.

        Args:
            input_ids: int64 (B, L) token ids from the text encoder's tokenizer.
            attention_mask: int64 or bool (B, L), 1 on real tokens.

        Returns:
            float32 (B, joint_dim) L2-normalised joint embedding.
        """
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ModelError(
                f"embed_text: expected equal (B, L) input_ids and attention_mask, got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        hidden: Tensor = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        joint = self.text_proj(self.text_dropout(pooled))
        return nn.functional.normalize(joint, dim=-1)

    def forward(
        self, wave: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Joint embeddings of a batch of pairs, for training.

        Returns:
            ``(audio_joint, text_joint)``, each float32 (B, joint_dim), L2-normalised.
        """
        _, audio = self.embed_audio(wave)
        return audio, self.embed_text(input_ids, attention_mask)

    @staticmethod
    def similarity(audio: Tensor, text: Tensor) -> Tensor:
        """Cosine similarity of every audio with every text.

        Args:
            audio: float (Na, D) joint audio embeddings.
            text: float (Nt, D) joint text embeddings.

        Returns:
            float (Na, Nt) cosine similarities in [-1, 1].
        """
        a = nn.functional.normalize(audio, dim=-1)
        t = nn.functional.normalize(text, dim=-1)
        return a @ t.T
