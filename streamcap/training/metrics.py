"""Caption and retrieval metrics, computed offline.

BLEU-1..4, ROUGE-L and CIDEr-D are our own pure-Python implementations of the
COCO caption evaluation definitions (corpus BLEU with the closest reference
length, ROUGE-L F with beta 1.2, CIDEr-D with sigma 6, clipping and x10);
on the same tokens they give pycocoevalcap's numbers. METEOR needs the
METEOR 1.5 jar that ships with ``pycocoevalcap`` (``pip install
'streamcap[eval]'``) and a Java runtime; without them it is reported as
unavailable with the reason, never raised. SPICE (and so SPIDEr) needs the
Stanford CoreNLP models, which pycocoevalcap downloads on first use; it is
reported unavailable offline.

Text is normalised like the PTB tokenizer of the COCO tools: lower case,
clitics split off, punctuation dropped.

A FENSE-style score combines a pluggable sentence embedder with the fluency
filter: ``mean cosine to the references x (1 - 0.9 x flagged)``.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from streamcap.errors import ConfigError

_CLITIC_RE = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|n't|'[a-z]+")

Tokens = list[str]


def tokenize(text: str) -> str:
    """Lower-case, split clitics (``dog's`` -> ``dog 's``), drop punctuation; space-joined."""
    text = _CLITIC_RE.sub(r" \1", text.lower())
    return " ".join(_TOKEN_RE.findall(text))


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str):
        raise ConfigError("metrics: expected a sequence of candidate captions, got one str")
    if len(candidates) != len(references):
        raise ConfigError(f"metrics: {len(candidates)} candidates but {len(references)} "
                          f"reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ConfigError(f"metrics: references[{i}] must be a non-empty list of captions")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..n on tokenized text (COCO definition, closest reference length).

    Returns:
        ``[BLEU-1, ..., BLEU-n]``.
    """
    _check(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        words = cand.split()
        counts = _ngrams(words, n)
        max_ref: dict[tuple[str, ...], int] = {}
        lengths = []
        for ref in refs:
            rw = ref.split()
            lengths.append(len(rw))
            for gram, c in _ngrams(rw, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), c)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in lengths)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]],
            beta: float = 1.2) -> tuple[float, list[float]]:
    """ROUGE-L F-measure (max precision and max recall over references), mean and per caption."""
    _check(candidates, references)
    per: list[float] = []
    for cand, refs in zip(candidates, references, strict=True):
        c = cand.split()
        precs, recs = [], []
        for ref in refs:
            r = ref.split()
            lcs = _lcs(r, c)
            precs.append(lcs / len(c) if c else 0.0)
            recs.append(lcs / len(r) if r else 0.0)
        p, r_ = max(precs), max(recs)
        per.append((1 + beta**2) * p * r_ / (r_ + beta**2 * p) if p and r_ else 0.0)
    return (float(np.mean(per)) if per else 0.0), per


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D (document frequencies from this corpus's references), mean and per caption."""
    _check(candidates, references)
    crefs = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    ctest = [_ngrams(c.split(), n) for c in candidates]
    df: Counter[tuple[str, ...]] = Counter()
    for refs in crefs:
        for gram in {g for r in refs for g in r}:
            df[gram] += 1
    log_n = math.log(float(len(crefs)))

    def vec(counts: Counter[tuple[str, ...]]
            ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        v: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            v[k][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
            norm[k] += v[k][gram] ** 2
            if k == 1:  # the COCO code measures length in bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    per: list[float] = []
    for test, refs in zip(ctest, crefs, strict=True):
        vh, nh, lh = vec(test)
        total = np.zeros(n)
        for ref in refs:
            vr, nr, lr = vec(ref)
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        per.append(float(np.mean(total)) / len(refs) * 10.0)
    return (float(np.mean(per)) if per else 0.0), per


def vocabulary_size(captions: Sequence[str]) -> int:
    """Number of distinct tokens over ``captions`` (after :func:`tokenize`)."""
    return len({w for c in captions for w in tokenize(c).split()})


def java_available() -> str | None:
    """None when ``java -version`` runs, else why not."""
    java = shutil.which("java")
    if java is None:
        return "no 'java' executable on PATH (install a Java runtime, e.g. default-jre-headless)"
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'java -version' failed ({exc})"
    return None


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]
           ) -> tuple[float | None, str | None]:
    """METEOR 1.5 through pycocoevalcap's jar on tokenized text.

    Returns:
        ``(score, None)``, or ``(None, reason)`` when pycocoevalcap or Java is missing
        or the scorer fails.
    """
    _check(candidates, references)
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None, "pycocoevalcap is not installed (pip install 'streamcap[eval]')"
    reason = java_available()
    if reason is not None:
        return None, reason
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    try:
        scorer = Meteor()
        try:
            score, _ = scorer.compute_score(gts, res)
        finally:
            close = getattr(scorer, "close", None)
            if callable(close):
                close()
    except Exception as exc:  # noqa: BLE001 - a Java child can fail in many ways
        return None, f"METEOR scorer failed ({type(exc).__name__}: {exc})"
    return float(score), None


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptionScores:
    """Corpus caption metrics; metrics that could not run are in ``unavailable``."""

    scores: Mapping[str, float]
    unavailable: Mapping[str, str] = field(default_factory=dict)
    per_caption: Mapping[str, list[float]] = field(default_factory=dict)


SPICE_UNAVAILABLE = ("SPICE needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap "
                     "downloads on first use; not run offline")


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
                    with_meteor: bool = True) -> CaptionScores:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and vocabulary size of ``candidates``.

    Keys: ``bleu_1`` .. ``bleu_4``, ``meteor``, ``rouge_l``, ``cider_d``,
    ``vocabulary``. SPICE and SPIDEr are always in ``unavailable``.
    """
    _check(candidates, references)
    cands = [tokenize(c) for c in candidates]
    refs = [[tokenize(r) for r in rs] for rs in references]
    scores: dict[str, float] = {}
    unavailable: dict[str, str] = {"spice": SPICE_UNAVAILABLE, "spider": SPICE_UNAVAILABLE}
    for k, value in enumerate(bleu(cands, refs), start=1):
        scores[f"bleu_{k}"] = value
    scores["rouge_l"], rouge_per = rouge_l(cands, refs)
    scores["cider_d"], cider_per = cider_d(cands, refs)
    if with_meteor:
        value_m, reason = meteor(cands, refs)
        if value_m is None:
            unavailable["meteor"] = reason or "unknown"
        else:
            scores["meteor"] = value_m
    else:
        unavailable["meteor"] = "not requested"
    scores["vocabulary"] = float(vocabulary_size(candidates))
    return CaptionScores(scores=scores, unavailable=unavailable,
                         per_caption={"rouge_l": rouge_per, "cider_d": cider_per})


class SentenceEmbedder(Protocol):
    """Maps sentences to vectors: float32 (N, D), any norm."""

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FenseScores:
    """FENSE-style scores: mean, per caption, similarity alone and fluency flags."""

    fense: float
    similarity: float
    per_caption: list[float]
    flagged: list[bool]


def fense(candidates: Sequence[str], references: Sequence[Sequence[str]],
          embed: SentenceEmbedder,
          error_probs: Callable[[Sequence[str]], Any] | None = None, *,
          threshold: float = 0.9, penalty: float = 0.9) -> FenseScores:
    """``mean cosine(candidate, references) x (1 - penalty x [error_prob > threshold])``.

    Args:
        candidates: Captions to score.
        references: Reference captions per candidate.
        embed: Sentence embedder (e.g. :class:`RetrieverTextEmbedder` or an SBERT wrapper).
        error_probs: Fluency error probability per caption (e.g.
            ``FluencyFilter.error_probs``); None scores similarity only.
        threshold: Error probability above which a caption is disfluent.
        penalty: Fraction of the similarity a disfluent caption loses.
    """
    _check(candidates, references)
    if not candidates:
        return FenseScores(fense=0.0, similarity=0.0, per_caption=[], flagged=[])
    flat = [r for refs in references for r in refs]
    vectors = np.asarray(embed([*candidates, *flat]), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cand_v, ref_v = vectors[: len(candidates)], vectors[len(candidates):]
    sims: list[float] = []
    at = 0
    for i, refs in enumerate(references):
        sims.append(float(np.mean(ref_v[at:at + len(refs)] @ cand_v[i])))
        at += len(refs)
    if error_probs is None:
        flagged = [False] * len(candidates)
    else:
        flagged = [bool(p > threshold) for p in np.asarray(error_probs(candidates)).tolist()]
    per = [s * (1 - penalty * f) for s, f in zip(sims, flagged, strict=True)]
    return FenseScores(fense=float(np.mean(per)), similarity=float(np.mean(sims)),
                       per_caption=per, flagged=flagged)


class RetrieverTextEmbedder:
    """The retriever's text tower as a :class:`SentenceEmbedder` (joint space, L2-normalised).

    Args:
        retriever: An ``AudioTextRetriever``.
        tokenizer: Its text tokenizer.
        max_length: Token limit.
        batch_size: Sentences per forward pass.
    """

    def __init__(self, retriever: Any, tokenizer: Any, *, max_length: int = 64,
                 batch_size: int = 64) -> None:
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        import torch

        parts = []
        device = next(self.retriever.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                     truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                out = self.retriever.embed_text(enc["input_ids"].to(device),
                                                enc["attention_mask"].to(device))
                parts.append(out.float().cpu().numpy())
        if not parts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrievalScores:
    """Ranking metrics of a retrieval direction (fractions in [0, 1]; ranks 1-based)."""

    r1: float
    r5: float
    r10: float
    map10: float
    median_rank: float
    mean_rank: float


def retrieval_metrics(similarity: npt.ArrayLike, relevant: npt.ArrayLike) -> RetrievalScores:
    """R@1/5/10 and mAP@10 of ranking the columns for every row (query).

    Ties are broken by column index (stable). Ranks are those of each
    query's best-ranked relevant item. mAP@10 is, per query,
    ``sum_{k<=10} P@k x rel_k / min(n_relevant, 10)``, averaged (with one
    relevant item: ``1/rank`` if rank <= 10, else 0).

    Args:
        similarity: float (Q, C): higher = more similar.
        relevant: bool (Q, C): True where column c is a correct answer to query q.

    Raises:
        ConfigError: shapes differ, or a query has no relevant item.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    rel = np.asarray(relevant, dtype=bool)
    if sim.ndim != 2 or sim.shape != rel.shape:
        raise ConfigError(f"retrieval_metrics: expected similarity and relevant of the same "
                          f"(Q, C) shape, got {sim.shape} and {rel.shape}")
    n_rel = rel.sum(axis=1)
    if sim.shape[0] == 0 or np.any(n_rel == 0):
        bad = np.flatnonzero(n_rel == 0)[:5].tolist()
        raise ConfigError(f"retrieval_metrics: queries {bad} have no relevant item")
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(rel, order, axis=1)
    first = hits.argmax(axis=1) + 1
    top = hits[:, :10].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision * top).sum(axis=1) / np.minimum(n_rel, 10)
    return RetrievalScores(r1=float(np.mean(first <= 1)), r5=float(np.mean(first <= 5)),
                           r10=float(np.mean(first <= 10)), map10=float(np.mean(ap)),
                           median_rank=float(np.median(first)), mean_rank=float(np.mean(first)))


def audio_text_retrieval(similarity: npt.ArrayLike, text_audio: Sequence[int]
                         ) -> dict[str, RetrievalScores]:
    """Both directions from an audio x text similarity matrix.

    Args:
        similarity: float (A, T) audio-text similarities.
        text_audio: For every text column, the index of its audio row.

    Returns:
        ``{"text_to_audio": ..., "audio_to_text": ...}``.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(text_audio, dtype=np.int64)
    if sim.ndim != 2 or owner.shape != (sim.shape[1],):
        raise ConfigError(f"audio_text_retrieval: expected text_audio of length "
                          f"{sim.shape[1] if sim.ndim == 2 else '?'}, got {owner.shape}")
    rel = owner[None, :] == np.arange(sim.shape[0])[:, None]
    return {"text_to_audio": retrieval_metrics(sim.T, rel.T),
            "audio_to_text": retrieval_metrics(sim, rel)}
