"""Retriever training with the m-LTM loss (entropic OT, epsilon 0.03).

A batch pairs B clips with one of their captions each (the caption is drawn
with the loop's random generator, so resume reproduces it). The loss is
:class:`streamcap.training.trainers.mltm.MLTMLoss` over the L2-normalised joint
embeddings; its per-dimension metric weights train with the model.

Two audio modes:

* ``"wave"``: waveforms at the CNext rate (32 kHz) go through the whole
  retriever, CNext included (end-to-end, as the reference, which fine-tunes
  both encoders);
* ``"embedding"``: precomputed CNext clip embeddings go through the audio
  projection only; CNext stays frozen (fast; the clip embeddings the
  captioner reads stay valid).

Stages: pretrain on a mix of sets, then finetune (e.g. on Clotho) from the
pretrained weights; a stage is one call with its own data and settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from streamcap.errors import ConfigError
from streamcap.models.retrieval.retriever import AudioTextRetriever
from streamcap.training.data.audio_io import load_audio
from streamcap.training.trainers.loop import LoopConfig, StepResult, Trainer, TrainHistory
from streamcap.training.trainers.mltm import MLTMLoss, MLTMOptions
from streamcap.training.trainers.optim import OptimConfig

AudioMode = Literal["wave", "embedding"]


def _retriever_optim() -> OptimConfig:
    return OptimConfig(lr=5e-5, weight_decay=0.01, warmup_steps=0, schedule="constant",
                       clip_norm=1.0)


def _retriever_loop() -> LoopConfig:
    return LoopConfig(epochs=10, batch_size=256, seed=1997, drop_last=True, min_batch=2)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrievalExample:
    """One clip for retrieval training or evaluation.

    Attributes:
        clip_id: the clip.
        captions: its reference captions (at least one).
        audio: the audio file (``"wave"`` mode).
        clip_embedding: float32 (D,) CNext clip embedding (``"embedding"`` mode).
    """

    clip_id: str
    captions: tuple[str, ...]
    audio: Path | None = None
    clip_embedding: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrieverTrainConfig:
    """A retriever training stage.

    Attributes:
        stage: a label stored in checkpoints (``"pretrain"`` / ``"finetune"``).
        audio_mode: ``"wave"`` (end-to-end) or ``"embedding"`` (frozen CNext).
        clip_s: waveforms are cut or zero-padded to this length (``"wave"`` mode).
        max_text_tokens: captions are truncated to this many tokens.
        mltm: the m-LTM loss options (epsilon 0.03).
        optim: optimiser settings (default: lr 5e-5, constant, clip 1.0).
        loop: epochs, batch, seed, checkpoints, device (batch >= 2).
        cache_audio: keep decoded waveforms in memory between epochs.
    """

    stage: str = "pretrain"
    audio_mode: AudioMode = "wave"
    clip_s: float = 10.0
    max_text_tokens: int = 64
    mltm: MLTMOptions = field(default_factory=MLTMOptions)
    optim: OptimConfig = field(default_factory=_retriever_optim)
    loop: LoopConfig = field(default_factory=_retriever_loop)
    cache_audio: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.audio_mode not in ("wave", "embedding"):
            problems.append(f"retriever.audio_mode: expected 'wave' or 'embedding', "
                            f"got {self.audio_mode!r}")
        if not self.clip_s > 0:
            problems.append(f"retriever.clip_s: expected > 0, got {self.clip_s}")
        if self.loop.min_batch < 2:
            problems.append("retriever: loop.min_batch must be >= 2 (m-LTM needs 2 pairs)")
        if problems:
            raise ConfigError(problems)


class WaveLoader:
    """Waveforms of examples at a fixed rate and length, optionally cached (float16)."""

    def __init__(self, sample_rate_hz: int, clip_s: float, *, cache: bool = True) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.n_samples = round(clip_s * sample_rate_hz)
        self.cache = cache
        self._store: dict[Path, npt.NDArray[np.float16]] = {}

    def load(self, path: Path) -> npt.NDArray[np.float32]:
        """float32 (n_samples,) the start of ``path``, zero-padded."""
        held = self._store.get(path)
        if held is not None:
            return held.astype(np.float32)
        wave = load_audio(path, self.sample_rate_hz, max_s=self.n_samples / self.sample_rate_hz)
        out = np.zeros(self.n_samples, dtype=np.float32)
        out[: min(wave.size, self.n_samples)] = wave[: self.n_samples]
        if self.cache:
            self._store[path] = out.astype(np.float16)
            return self._store[path].astype(np.float32)
        return out

    def batch(self, paths: Sequence[Path]) -> torch.Tensor:
        """float32 (B, n_samples)."""
        return torch.from_numpy(np.stack([self.load(p) for p in paths]))


def retrieval_examples(items: Iterable[Any], *, with_embeddings: bool) -> list[RetrievalExample]:
    """Examples from manifest rows or feature items (anything with clip_id, captions, audio).

    Args:
        items: ``ManifestRow`` or ``FeatureItem`` objects.
        with_embeddings: also take ``item.clip_embedding`` (feature items).
    """
    out = []
    for item in items:
        captions = tuple(c for c in item.captions if c.strip())
        if not captions:
            continue
        emb = np.asarray(item.clip_embedding, dtype=np.float32) if with_embeddings else None
        out.append(RetrievalExample(clip_id=item.clip_id, captions=captions,
                                    audio=getattr(item, "audio", None), clip_embedding=emb))
    return out


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (B, L) ids and attention mask of ``texts``."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens,
                    return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


class _AudioTower:
    """Joint audio embeddings of a batch of examples, in either mode."""

    def __init__(self, retriever: AudioTextRetriever, config: RetrieverTrainConfig,
                 device: torch.device) -> None:
        self.retriever = retriever
        self.config = config
        self.device = device
        self.loader = WaveLoader(retriever.config.audio.mel.sample_rate, config.clip_s,
                                 cache=config.cache_audio)

    def __call__(self, examples: Sequence[RetrievalExample]) -> torch.Tensor:
        if self.config.audio_mode == "embedding":
            clip = torch.from_numpy(np.stack([_embedding(e) for e in examples])).to(self.device)
            joint = self.retriever.audio_proj(clip)
            return nn.functional.normalize(joint, dim=-1)
        wave = self.loader.batch([_audio(e) for e in examples]).to(self.device)
        return self.retriever.embed_audio(wave)[1]


def _embedding(e: RetrievalExample) -> npt.NDArray[np.float32]:
    if e.clip_embedding is None:
        raise ConfigError(f"clip {e.clip_id}: no clip embedding (audio_mode 'embedding' needs "
                          "precomputed features)")
    return e.clip_embedding


def _audio(e: RetrievalExample) -> Path:
    if e.audio is None:
        raise ConfigError(f"clip {e.clip_id}: no audio file (audio_mode 'wave')")
    return e.audio


def retriever_trainer(retriever: AudioTextRetriever, loss: MLTMLoss, tokenizer: Any,
                      examples: Sequence[RetrievalExample], config: RetrieverTrainConfig,
                      metadata: Mapping[str, Any] | None = None) -> Trainer:
    """A :class:`Trainer` for ``retriever`` (and the loss's metric weights) on ``examples``."""
    if len(examples) < 2:
        raise ConfigError(f"retriever training: {len(examples)} examples; need at least 2")
    check = _embedding if config.audio_mode == "embedding" else _audio
    for e in examples:
        check(e)
    device = torch.device(config.loop.device)
    tower = _AudioTower(retriever, config, device)
    modules: list[tuple[str, nn.Module]] = [("retriever", retriever), ("mltm", loss)]
    if config.audio_mode == "embedding":
        retriever.audio_encoder.requires_grad_(False)

    def step_fn(batch: Sequence[int], rng: np.random.Generator) -> StepResult:
        picked = [examples[i] for i in batch]
        texts = [e.captions[int(rng.integers(len(e.captions)))] for e in picked]
        if config.audio_mode == "embedding":
            retriever.audio_encoder.eval()
        audio = tower(picked)
        ids, mask = tokenize(tokenizer, texts, config.max_text_tokens, device)
        text = retriever.embed_text(ids, mask)
        value = loss(audio.float(), text.float())
        return value, {}

    meta = {"stage": config.stage, "audio_mode": config.audio_mode,
            "retriever_config": retriever.config.to_dict(), **dict(metadata or {})}
    return Trainer("retriever", modules, len(examples), step_fn, config.optim, config.loop, meta)


def train_retriever(retriever: AudioTextRetriever, tokenizer: Any,
                    examples: Sequence[RetrievalExample], config: RetrieverTrainConfig, *,
                    loss: MLTMLoss | None = None, resume: Path | None = None,
                    metadata: Mapping[str, Any] | None = None) -> tuple[TrainHistory, MLTMLoss]:
    """Trains ``retriever`` in place with m-LTM; returns the history and the loss module.

    Args:
        retriever: the model (its text encoder must match ``tokenizer``).
        tokenizer: the text encoder's tokenizer.
        examples: training clips.
        config: the stage's settings.
        loss: an m-LTM loss to continue (its learned metric); a new one otherwise.
        resume: a checkpoint (or checkpoint directory) of this stage to continue.
        metadata: JSON-ready facts to store in checkpoints.
    """
    mltm = loss if loss is not None else MLTMLoss(retriever.config.joint_dim, config.mltm)
    trainer = retriever_trainer(retriever, mltm, tokenizer, examples, config, metadata)
    if resume is not None:
        trainer.resume(resume)
    history = trainer.run()
    retriever.eval()
    return history, mltm
