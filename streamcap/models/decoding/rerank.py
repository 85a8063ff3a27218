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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from streamcap.messages import CaptionCandidate
from streamcap.models.decoding.candidates import DecodedCaption, dedupe
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.enclap.tokenizer import NO_CAPTION_TEXT

TextScorer = Callable[[Sequence[str]], Sequence[float]]
"""Scores of texts, one float per text: retriever cosine, or fluency-error probability."""

BatchTextScorer = Callable[[Sequence[str]], Sequence[Sequence[float]]]
"""Scores of texts for each of several windows: one row per window, one float per text
(the retriever cosine of each text with each window's audio)."""


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
    options: DecodingOptions,
) -> RerankResult:
    """Blend the scores, apply the fluency filter and pick the caption.

    Args:
        texts: the candidate captions (already deduplicated), at least one.
        decoder_scores: mean token log-probability of each candidate.
        encoder_scores: retriever cosine similarity of each candidate, or
            None when there is no retriever (then score = decoder score).
        error_probs: fluency-error probability of each candidate in [0, 1],
            or None when there is no fluency filter (nothing is flagged).
        options: the weights and the fluency threshold.

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


def no_caption(decoder_score: float) -> RerankResult:
    """What is published when the model wrote nothing readable: a placeholder, flagged.

    Its score stays the decoder's, so that it is honest; being flagged, it is
    never preferred to a readable candidate.
    """
    placeholder = CaptionCandidate(text=NO_CAPTION_TEXT, decoder_score=decoder_score,
                                   score=decoder_score, flagged=True)
    return RerankResult(best=placeholder, best_index=0, candidates=(placeholder,))


class Ranker:
    """Picks one of a decoder's captions.

    With ``blend`` (sampling), the retriever cosine of each distinct caption is
    blended with its decoder score and the fluency filter flags captions; without
    (beam search's single caption), the decoder score alone ranks and nothing is
    flagged. A decoder that wrote nothing readable gives :func:`no_caption`.
    """

    def __init__(self, options: DecodingOptions, *, blend: bool) -> None:
        self.options, self.blend = options, blend

    def rank(self, decoded: Sequence[DecodedCaption], *, similarity: TextScorer | None,
             fluency: TextScorer | None, lap: Callable[[str], None]) -> RerankResult:
        """Rank ``decoded`` (texts attached); ``lap`` books the scorers' time by stage.

        Args:
            decoded: at least one caption, texts attached.
            similarity: the retriever's cosine of each text with the audio, or None.
            fluency: the fluency-error probability of each text, or None.
            lap: called with ``"text_encoder"`` and ``"fluency"`` after those stages.
        """
        rows = None if similarity is None else _one_row(similarity)
        return self.rank_batch([decoded], similarity=rows, fluency=fluency, lap=lap)[0]

    def rank_batch(self, decoded: Sequence[Sequence[DecodedCaption]], *,
                   similarity: BatchTextScorer | None, fluency: TextScorer | None,
                   lap: Callable[[str], None]) -> list[RerankResult]:
        """:meth:`rank` of several windows' captions; each scorer runs once, over the
        distinct texts of all windows (``similarity`` gives one row per window)."""
        uniques = [dedupe(d) for d in decoded]  # also drops captions whose text is empty
        texts = list(dict.fromkeys(c.text for unique in uniques for c in unique))
        cosines: list[list[float]] | None = None
        errors: list[float] | None = None
        if self.blend and texts:
            if similarity is not None:
                cosines = [_floats("encoder_scores", row, len(texts))
                           for row in similarity(texts)]
                if len(cosines) != len(decoded):
                    raise ValueError(f"rerank: similarity gave {len(cosines)} rows for "
                                     f"{len(decoded)} windows")
                lap("text_encoder")
            errors = None if fluency is None else _floats("error_probs", fluency(texts),
                                                          len(texts))
            lap("fluency")
        at = {text: i for i, text in enumerate(texts)}
        results = []
        for w, (captions, unique) in enumerate(zip(decoded, uniques, strict=True)):
            if not unique:
                results.append(no_caption(max(d.decoder_score for d in captions)))
                continue
            index = [at[c.text] for c in unique]
            results.append(rerank(
                [c.text for c in unique], [c.decoder_score for c in unique],
                None if cosines is None else [cosines[w][i] for i in index],
                None if errors is None else [errors[i] for i in index], self.options))
        return results


def _one_row(similarity: TextScorer) -> BatchTextScorer:
    """A one-window scorer as a batch scorer of one row."""

    def rows(texts: Sequence[str]) -> list[Sequence[float]]:
        return [similarity(texts)]

    return rows
