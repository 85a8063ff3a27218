"""Captioner training: caption + MCM loss (pretraining), caption loss only (finetuning).

Examples are (codec codes, clip embedding, one caption): a clip with five
captions gives five examples, as in the reference recipe (one row per
caption); with ``captions="one"`` an epoch visits each clip once with one
of its captions drawn by the loop's random generator (5x shorter epochs). Each batch pads the codes to its longest clip with the codec pad id
(a frame mask marks real frames) and the token labels with -100. In
pretraining every batch is span-masked for masked codec modelling
(:func:`streamcap.training.trainers.masking.mask_codes`) with the loop's random
generator, so masks are reproduced exactly on resume. The caption loss is
label-smoothed (``EnclapConfig.label_smoothing``, 0.2); the total is
``caption + mcm_loss_scale * mcm`` (0.7).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from streamcap.errors import ConfigError
from streamcap.models.enclap.model import IGNORE_INDEX, EnclapModel
from streamcap.training.trainers.loop import LoopConfig, StepResult, Trainer, TrainHistory
from streamcap.training.trainers.masking import mask_codes
from streamcap.training.trainers.optim import OptimConfig

Stage = Literal["pretrain", "finetune"]


class CaptionFeatures(Protocol):
    """What the captioner needs of a precomputed clip (``FeatureItem`` fits)."""

    @property
    def clip_id(self) -> str: ...
    @property
    def codes(self) -> npt.NDArray[np.int16]: ...
    @property
    def clip_embedding(self) -> npt.NDArray[np.float32]: ...
    @property
    def captions(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptionExample:
    """One training pair.

    Attributes:
        clip_id: the clip.
        codes: int16 (K, T) codec codes.
        clip_embedding: float32 (D,) sequence-level embedding (encoder row 0).
        captions: the target caption (several for a per-clip example, one drawn per visit).
    """

    clip_id: str
    codes: npt.NDArray[np.int16]
    clip_embedding: npt.NDArray[np.float32]
    captions: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptionerTrainConfig:
    """A captioner training stage.

    Attributes:
        stage: ``"pretrain"`` (caption + MCM) or ``"finetune"`` (caption only).
        captions: ``"all"``: one example per (clip, caption); ``"one"``: one per clip,
            its caption drawn at random each time.
        max_caption_tokens: captions are truncated to this many tokens (BOS/EOS included).
        optim: optimiser settings (reference: AdamW 0.01, inverse-sqrt, clip 1.0).
        loop: epochs, batch, seed, checkpoints, device.
    """

    stage: Stage = "pretrain"
    captions: Literal["all", "one"] = "all"
    max_caption_tokens: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise ConfigError(f"captioner.stage: expected 'pretrain' or 'finetune', "
                              f"got {self.stage!r}")
        if self.max_caption_tokens < 3:
            raise ConfigError(f"captioner.max_caption_tokens: expected >= 3, "
                              f"got {self.max_caption_tokens}")

    @property
    def use_mcm(self) -> bool:
        return self.stage == "pretrain"


def caption_examples(items: Iterable[CaptionFeatures], *,
                     per_clip: bool = False) -> list[CaptionExample]:
    """One example per (clip, caption), empty captions skipped.

    With ``per_clip`` there is one example per clip holding all its captions
    (for ``captions="one"``).
    """
    out: list[CaptionExample] = []
    for item in items:
        texts = [c.strip() for c in item.captions if c.strip()]
        if per_clip and texts:
            out.append(CaptionExample(clip_id=item.clip_id, codes=item.codes,
                                      clip_embedding=item.clip_embedding,
                                      captions=tuple(texts)))
            continue
        for caption in texts:
            out.append(CaptionExample(clip_id=item.clip_id, codes=item.codes,
                                      clip_embedding=item.clip_embedding, captions=(caption,)))
    return out



def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids ``[<s>, ..., </s>]`` of each caption, truncated to ``max_tokens``."""
    encoded = tokenizer(list(captions), truncation=True, max_length=max_tokens)
    return [list(map(int, ids)) for ids in encoded["input_ids"]]


@dataclass(frozen=True, slots=True)
class CaptionBatch:
    """A padded batch.

    Attributes:
        codes: int64 (B, K, T) codes, the pad id beyond each clip's frames.
        frame_mask: bool (B, T), True on real frames.
        seq_embed: float32 (B, D).
        labels: int64 (B, N) caption ids, -100 as padding.
    """

    codes: torch.Tensor
    frame_mask: torch.Tensor
    seq_embed: torch.Tensor
    labels: torch.Tensor


def collate(examples: Sequence[CaptionExample], token_ids: Sequence[Sequence[int]],
            *, pad_id: int) -> CaptionBatch:
    """Pads ``examples`` (with their tokenised captions) into one batch."""
    k = examples[0].codes.shape[0]
    width = max(int(e.codes.shape[1]) for e in examples)
    codes = np.full((len(examples), k, width), pad_id, dtype=np.int64)
    frame_mask = np.zeros((len(examples), width), dtype=np.bool_)
    for i, e in enumerate(examples):
        t = int(e.codes.shape[1])
        codes[i, :, :t] = e.codes
        frame_mask[i, :t] = True
    n = max(len(ids) for ids in token_ids)
    labels = np.full((len(examples), n), IGNORE_INDEX, dtype=np.int64)
    for i, ids in enumerate(token_ids):
        labels[i, : len(ids)] = ids
    seq = np.stack([np.asarray(e.clip_embedding, dtype=np.float32) for e in examples])
    return CaptionBatch(codes=torch.from_numpy(codes), frame_mask=torch.from_numpy(frame_mask),
                        seq_embed=torch.from_numpy(seq), labels=torch.from_numpy(labels))


def _check_examples(model: EnclapModel, examples: Sequence[CaptionExample]) -> None:
    cfg = model.config
    problems: list[str] = []
    for e in examples:
        if e.codes.ndim != 2 or e.codes.shape[0] != cfg.n_codebooks:
            problems.append(f"clip {e.clip_id}: codes of shape {e.codes.shape}, expected "
                            f"({cfg.n_codebooks}, T)")
        elif e.codes.shape[1] > cfg.max_frames or e.codes.shape[1] == 0:
            problems.append(f"clip {e.clip_id}: {e.codes.shape[1]} frames, expected 1.."
                            f"{cfg.max_frames}")
        if e.clip_embedding.shape != (cfg.seq_embed_dim,):
            problems.append(f"clip {e.clip_id}: clip embedding of shape {e.clip_embedding.shape}"
                            f", expected ({cfg.seq_embed_dim},)")
        if len(problems) >= 10:
            break
    if problems:
        raise ConfigError(problems)


def captioner_trainer(model: EnclapModel, tokenizer: Any, examples: Sequence[CaptionExample],
                      config: CaptionerTrainConfig,
                      metadata: Mapping[str, Any] | None = None) -> Trainer:
    """A :class:`Trainer` for ``model`` on ``examples`` (call ``.resume()`` / ``.run()``).

    Raises:
        ConfigError: no examples, or examples that do not fit the model (listed).
    """
    if not examples:
        raise ConfigError("captioner training: no examples (empty split?)")
    _check_examples(model, examples)
    cfg = model.config
    flat: list[str] = []
    first: list[int] = []
    counts: list[int] = []
    for e in examples:
        texts = list(e.captions) if config.captions == "one" else [e.captions[0]]
        first.append(len(flat))
        counts.append(len(texts))
        flat.extend(texts)
    token_ids = tokenize_captions(tokenizer, flat, config.max_caption_tokens)
    device = torch.device(config.loop.device)

    def step_fn(batch: Sequence[int], rng: np.random.Generator) -> StepResult:
        picked = [examples[i] for i in batch]
        rows = [first[i] + (int(rng.integers(counts[i])) if config.captions == "one" else 0)
                for i in batch]
        b = collate(picked, [token_ids[r] for r in rows], pad_id=cfg.codec_pad_id)
        codes = b.codes
        mcm_labels = None
        if config.use_mcm:
            masked = mask_codes(codes, pad_id=cfg.codec_pad_id, rng=rng, frame_mask=b.frame_mask,
                                prob=cfg.mcm_mask_prob, span=cfg.mcm_mask_span)
            codes, mcm_labels = masked.codes, masked.labels.to(device)
        out = model(codes.to(device), b.seq_embed.to(device), b.labels.to(device),
                    frame_mask=b.frame_mask.to(device), mcm_labels=mcm_labels)
        terms = {"caption_loss": float(out.caption_loss.detach()),
                 "mcm_loss": float(out.mcm_loss.detach())}
        return out.loss.float(), terms

    meta = {"stage": config.stage, "model_config": cfg.to_dict(), **dict(metadata or {})}
    return Trainer("captioner", [("captioner", model)], len(examples), step_fn, config.optim,
                   config.loop, meta)


def train_captioner(model: EnclapModel, tokenizer: Any, examples: Sequence[CaptionExample],
                    config: CaptionerTrainConfig, *, resume: Path | None = None,
                    metadata: Mapping[str, Any] | None = None) -> TrainHistory:
    """Trains ``model`` in place; resumes from ``resume`` (a checkpoint or directory) if given.

    Returns:
        Per-step and per-epoch losses; the model is left in eval mode.
    """
    trainer = captioner_trainer(model, tokenizer, examples, config, metadata)
    if resume is not None:
        trainer.resume(resume)
    history = trainer.run()
    model.eval()
    return history
