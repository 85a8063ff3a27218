"""Held-out evaluation of a captioner (or an ensemble) and its retriever.

For every clip of a manifest split: DAC codes and retriever embeddings are
computed from the audio with the model's own codec and retriever; captions
are decoded by beam search (EnCLAP's default; ``num_beams=1`` is greedy) or
by sampling + reranking (``0.7 * retriever cosine + 0.3 * mean log-prob``,
as the daemon does, without the fluency filter). Several models decode as an
output ensemble (:mod:`streamcap.models.decoding.ensemble`); they must share the
first model's codec and retriever inputs (a soup or finetunes of one init).

Metrics: BLEU-1..4, METEOR (when Java runs), ROUGE-L, CIDEr-D, vocabulary
size (:func:`streamcap.training.evaluation.metrics.caption_metrics`), text-to-audio and
audio-to-text R@1/5/10 and mAP@10 of the retriever, and, when the scenes of
a synthetic corpus are known, keyword accuracy per event type.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.components import Components
from streamcap.models.decoding.ensemble import CaptionEnsemble
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.decoding.task import DecodingTask
from streamcap.models.retrieval.retriever import AudioTextRetriever
from streamcap.training.data.audio_io import load_audio
from streamcap.training.data.corpus import Scene, keyword_accuracy
from streamcap.training.data.manifest import ManifestRow
from streamcap.training.evaluation.metrics import audio_text_retrieval, caption_metrics
from streamcap.training.trainers.loop import Progress
from streamcap.training.trainers.retriever import tokenize


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalOptions:
    """How captions are decoded and what is measured.

    Attributes:
        decoding: ``"beam"`` or ``"sample"`` (sampling + reranking).
        num_beams: beams of beam search (1: greedy).
        max_length: decoder length limit (decoder start included).
        n_candidates: samples per clip for ``"sample"``.
        seed: seeds sampling.
        max_s: use at most this many seconds of each clip.
        with_meteor: run METEOR (needs Java).
        device: where the models run.
        progress: progress bar on a terminal.
    """

    decoding: Literal["beam", "sample"] = "beam"
    num_beams: int = 4
    max_length: int = 30
    n_candidates: int = 20
    seed: int = 0
    max_s: float | None = None
    with_meteor: bool = True
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.decoding not in ("beam", "sample"):
            raise ConfigError(f"eval.decoding: expected 'beam' or 'sample', got {self.decoding!r}")
        if self.num_beams < 1 or self.n_candidates < 1 or self.max_length < 3:
            raise ConfigError("eval: num_beams and n_candidates must be >= 1, max_length >= 3")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClipInputs:
    """What the models read of one clip.

    Attributes:
        clip_id: the clip.
        codes: int16 (K, T) codec codes.
        clip_embedding: float32 (D,) retriever clip embedding (EnCLAP row 0).
        audio_joint: float32 (J,) L2-normalised joint audio embedding.
        captions: reference captions.
    """

    clip_id: str
    codes: npt.NDArray[np.int16]
    clip_embedding: npt.NDArray[np.float32]
    audio_joint: npt.NDArray[np.float32]
    captions: tuple[str, ...]


def retriever_of(components: Components) -> AudioTextRetriever:
    """The components' retriever; :class:`ModelError` when the model has none."""
    if components.retriever is None:
        raise ModelError(f"{components.model_id}: this model has no retriever; evaluation "
                         "needs one (for the clip embedding and retrieval metrics)")
    return components.retriever


@torch.inference_mode()
def clip_inputs(components: Components, rows: Sequence[ManifestRow], options: EvalOptions
                ) -> list[ClipInputs]:
    """Codes and embeddings of ``rows`` computed with ``components``' codec and retriever."""
    device = torch.device(options.device)
    retriever = retriever_of(components).to(device).eval()
    codec_rate = components.codec.config.sample_rate_hz
    retr_rate = retriever.config.audio.mel.sample_rate
    out = []
    bar = Progress(len(rows), "embed", enabled=options.progress)
    for row in rows:
        codes = components.codec.encode(load_audio(row.audio, codec_rate, max_s=options.max_s))
        wave = torch.from_numpy(load_audio(row.audio, retr_rate, max_s=options.max_s))
        clip, joint = retriever.embed_audio(wave[None].to(device))
        out.append(ClipInputs(clip_id=row.clip_id, codes=codes,
                              clip_embedding=clip[0].float().cpu().numpy(),
                              audio_joint=joint[0].float().cpu().numpy(),
                              captions=row.captions))
        bar.update()
    bar.close()
    return out


def text_embeddings(components: Components, texts: Sequence[str], device: torch.device,
                    batch: int = 64) -> npt.NDArray[np.float32]:
    """float32 (N, J) L2-normalised retriever text embeddings."""
    retriever = retriever_of(components).eval()
    parts = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            ids, mask = tokenize(components.text_tokenizer, texts[i:i + batch], 64, device)
            parts.append(retriever.embed_text(ids, mask).float().cpu().numpy())
    if not parts:
        return np.zeros((0, retriever.config.joint_dim), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32)


def caption_clips(members: Sequence[Components], clips: Sequence[ClipInputs],
                  options: EvalOptions) -> list[str]:
    """One caption per clip from the ensemble of ``members`` (one member: that model)."""
    device = torch.device(options.device)
    ensemble = CaptionEnsemble([m.captioner.to(device).eval() for m in members])
    # EnCLAP's reference decoding settings: no repeated 3-grams in either mode.
    decoding = DecodingOptions(mode=options.decoding, num_beams=options.num_beams,
                               beam_max_length=options.max_length,
                               max_new_tokens=options.max_length - 1,
                               n_candidates=options.n_candidates, no_repeat_ngram_size=3,
                               seed=options.seed)
    task = DecodingTask(decoding, members[0].tokenizer, device=device)
    texts = []
    bar = Progress(len(clips), "caption", enabled=options.progress)
    for clip in clips:
        codes = torch.from_numpy(clip.codes.astype(np.int64))[None].to(device)
        seq = torch.from_numpy(clip.clip_embedding)[None].to(device)
        inference = ensemble.inference(ensemble.encode(codes, [seq] * len(members)))

        def cosine(cands: Sequence[str], audio: npt.NDArray[np.float32] = clip.audio_joint
                   ) -> list[float]:
            scores: list[float] = (text_embeddings(members[0], cands, device) @ audio).tolist()
            return scores

        ranked = task.run(inference, similarity=cosine)
        # Without a fluency filter only the placeholder for an unreadable caption is flagged.
        texts.append("" if ranked.flagged else ranked.best.text)
        bar.update()
    bar.close()
    return texts


def retrieval_scores(components: Components, clips: Sequence[ClipInputs],
                     device: torch.device) -> dict[str, Any]:
    """Text-to-audio and audio-to-text ranking metrics over ``clips`` and all their captions."""
    texts: list[str] = []
    owner: list[int] = []
    for i, clip in enumerate(clips):
        texts.extend(clip.captions)
        owner.extend([i] * len(clip.captions))
    audio = np.stack([c.audio_joint for c in clips])
    sim = audio @ text_embeddings(components, texts, device).T
    scores = audio_text_retrieval(sim, owner)
    out: dict[str, Any] = {k: asdict(v) for k, v in scores.items()}
    out["chance_r1"] = {"text_to_audio": 1.0 / len(clips),
                        "audio_to_text": float(np.mean([len(c.captions) for c in clips]))
                        / len(texts)}
    return out


def evaluate(members: Sequence[Components], rows: Sequence[ManifestRow], options: EvalOptions,
             *, scenes: Mapping[str, Scene] | None = None) -> dict[str, Any]:
    """Caption and retrieval metrics of ``members`` (an ensemble when several) on ``rows``.

    Returns:
        A JSON-ready dict: ``captions`` (metrics), ``retrieval``, ``keywords`` (when
        ``scenes`` covers the clips), ``examples`` (first 20 predictions), counts, timing.

    Raises:
        ConfigError: no rows or no models.
    """
    if not members:
        raise ConfigError("eval: no model")
    if not rows:
        raise ConfigError("eval: no clips to evaluate (empty split?)")
    started = time.monotonic()
    device = torch.device(options.device)
    clips = clip_inputs(members[0], rows, options)
    predictions = caption_clips(members, clips, options)
    refs = [list(c.captions) for c in clips]
    scores = caption_metrics(predictions, refs, with_meteor=options.with_meteor)
    result: dict[str, Any] = {
        "models": [m.model_id for m in members],
        "clips": len(clips),
        "decoding": asdict(options),
        "captions": dict(scores.scores),
        "unavailable": dict(scores.unavailable),
        "retrieval": retrieval_scores(members[0], clips, device) if len(clips) > 1 else None,
    }
    if scenes is not None:
        known = [(p, scenes[c.clip_id]) for p, c in zip(predictions, clips, strict=True)
                 if c.clip_id in scenes]
        if known:
            kw = keyword_accuracy([p for p, _ in known], [s.kinds for _, s in known])
            result["keywords"] = {"recall": dict(kw.recall),
                                  "false_positive_rate": dict(kw.false_positive_rate),
                                  "support": dict(kw.support), "mean_recall": kw.mean_recall,
                                  "exact": kw.exact, "clips": len(known)}
    result["examples"] = [{"clip_id": c.clip_id, "prediction": p, "reference": c.captions[0]}
                          for p, c in list(zip(predictions, clips, strict=True))[:20]]
    result["seconds"] = time.monotonic() - started
    return result
