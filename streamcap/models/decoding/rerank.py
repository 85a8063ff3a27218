"""Reranking of sampled caption candidates (pure: floats in, candidates out).

The blended score of a candidate is

    score = encoder_weight * encoder_score + decoder_weight * decoder_score

where ``encoder_score`` is the cosine similarity between the retriever's
audio embedding and its text embedding of the candidate, and
``decoder_score`` the captioner's mean token log-probability. Raw scores are
blended (no z-scoring), as in the DCASE2023 hybrid reranker the EnCLAP
DCASE2024 system follows.

When no retriever is configured (``encoder_scores`` is None) the score is the
decoder score alone, unweighted, so that it stays on the log-probability
scale; the ranking is the same as with any positive decoder weight.

The fluency filter: a candidate whose ``error_prob`` is strictly greater than
``fluency_threshold`` is flagged. The chosen caption is the best candidate not
flagged; if every candidate is flagged, the best one overall is chosen and the
result is marked ``flagged``. Without error probabilities nothing is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from streamcap.messages import CaptionCandidate


@dataclass(frozen=True, slots=True, kw_only=True)
class RerankOptions:
    """Weights of the blended score and the fluency threshold."""

    encoder_weight: float = 0.7
    decoder_weight: float = 0.3
    fluency_threshold: float = 0.9  # error_prob > threshold flags a candidate

    def __post_init__(self) -> None:
        self._verify()

    def _verify(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        for name in ("encoder_weight", "decoder_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"RerankOptions.{name} must be a finite number >= 0, got {value}")
        if self.encoder_weight == 0.0 and self.decoder_weight == 0.0:
            raise ValueError("RerankOptions.encoder_weight and decoder_weight cannot both be 0")
        if not 0.0 <= self.fluency_threshold <= 1.0:
            raise ValueError(
                f"RerankOptions.fluency_threshold must be in [0, 1], got {self.fluency_threshold}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RerankResult:
    """The chosen caption and every candidate, best first.

    ``candidates`` are sorted by blended score (descending), then decoder
    score (descending), then input position; ``best`` is one of them and
    ``best_index`` is its position in the *input* sequences.
    """

    best: CaptionCandidate
    best_index: int
    candidates: tuple[CaptionCandidate, ...]

    @property
    def flagged(self) -> bool:
        """True when every candidate failed the fluency filter."""
        return self.best.flagged


def _floats(name: str, values: Sequence[float], n: int) -> list[float]:
    if len(values) != n:
        raise ValueError(f"rerank: {name} has {len(values)} values, texts has {n}")
    out = [float(v) for v in values]
    if any(math.isnan(v) for v in out):
        raise ValueError(f"rerank: {name} contains NaN")
    return out


def rerank(
    texts: Sequence[str],
    decoder_scores: Sequence[float],
    encoder_scores: Sequence[float] | None,
    error_probs: Sequence[float] | None,
    options: RerankOptions,
) -> RerankResult:
    """Blend the scores, apply the fluency filter and pick the caption.

    Args:
        texts: the candidate captions (already deduplicated), at least one.
        decoder_scores: mean token log-probability of each candidate.
        encoder_scores: retriever cosine similarity of each candidate, or
            None when there is no retriever (then score = decoder score).
        error_probs: fluency-error probability of each candidate in [0, 1],
            or None when there is no fluency filter (nothing is flagged).
        options: the weights and the threshold.

    Returns:
        The chosen caption and all candidates with their scores, sorted.

    Raises:
        ValueError: no texts, a length mismatch, or a NaN score.
    """
    n = len(texts)
    if n == 0:
        raise ValueError("rerank: texts is empty; there is nothing to choose from")
    dec = _floats("decoder_scores", decoder_scores, n)
    enc = None if encoder_scores is None else _floats("encoder_scores", encoder_scores, n)
    err = None if error_probs is None else _floats("error_probs", error_probs, n)
    candidates = []
    for i in range(n):
        if enc is None:
            score = dec[i]
        else:
            score = options.encoder_weight * enc[i] + options.decoder_weight * dec[i]
        candidates.append(
            CaptionCandidate(
                text=texts[i],
                decoder_score=dec[i],
                encoder_score=None if enc is None else enc[i],
                score=score,
                flagged=err is not None and err[i] > options.fluency_threshold,
                error_prob=None if err is None else err[i],
            )
        )
    order = sorted(range(n), key=lambda i: (-candidates[i].score, -dec[i], i))
    chosen = next((i for i in order if not candidates[i].flagged), order[0])
    return RerankResult(
        best=candidates[chosen],
        best_index=chosen,
        candidates=tuple(candidates[i] for i in order),
    )
