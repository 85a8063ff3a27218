"""How a trigger scores a window, and the "auto" threshold: pure numpy, no model, no I/O.

Everything here works on L2-normalised embeddings of the retriever's joint
audio-text space, so a cosine is a dot product.

**Score.** A window's score for a trigger is the best cosine of the window's
audio embedding with the trigger's *positives*: the text embeddings of its
``text`` phrasings and the audio embeddings of its ``examples``
(:func:`score_window`). Its *negative* score is the best cosine with its
``negative`` phrasings (``-inf`` without any), and its *background* score the
best cosine with the generic :data:`BACKGROUND_PHRASES`.

**Hit.** A window is a hit when its score is at or above the threshold *and*
beats the best negative phrasing (``score > negative``): a trigger "a dog
barks" with the negative "a dog whines" does not fire on whining however high
both score (:func:`is_hit`).

**Threshold.** A number in the trigger's spec is used as it is; so is a
calibrated threshold (``streamcap triggers calibrate`` writes one per trigger
and model). Otherwise the threshold is "auto" (:class:`AutoThreshold`), the
larger of two floors, because raw cosines are not comparable across phrasings
or models (one phrasing sits at 0.3 on everything, another at -0.2):

1. *background floor*: the window's background score plus
   :data:`BACKGROUND_MARGIN`. The trigger's phrasing must explain the window
   better than "background noise", "a quiet room", ... explain the same
   window: both are audio-text cosines of the same audio, so they are on the
   same scale whatever the model.
2. *source floor*: ``median + K * max(1.4826 * MAD, MIN_SPREAD)`` of the
   trigger's scores on this source's recent *non-hit* windows (the last
   :data:`HISTORY_MAX`), once there are :data:`MIN_HISTORY` of them: a source
   whose background happens to sit close to the phrasing (a fan under "an
   engine runs") must rise clearly above its own usual level. Median and MAD
   are robust: a few loud windows do not move them. Hits are left out so that
   the sound itself never becomes the reference. Learned per (source,
   trigger) and kept in the state directory, so a restart does not start cold.

"Non-hit" here means below the source floor (the background floor plays no
part): until the history holds :data:`MIN_HISTORY` windows every window
enters it, afterwards only those below the floor. So a sound that is there
from the very first window (an engine that scores high on "a siren") fires at
most until the history is full (20 windows, 20 s at the default hop) and is
then the source's usual level; had the background floor decided what is a
non-hit, such a source would never get a history and would fire forever. The
other way round, a source whose usual level rises for good (a new fan) is
not learned upward, since windows above the floor never enter the history:
its history file can be deleted, or a fixed threshold chosen instead.

**Calibration** (``streamcap triggers calibrate``, the benchmark): a
labelled file's *firing score* (:func:`firing_score` of its windows'
:func:`hit_score`) is the highest fixed threshold at which the trigger turns on
while it plays; :func:`sweep` counts true and false firings at every distinct
firing score and :func:`best_row` chooses the best F1.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

BACKGROUND_PHRASES: Final = (
    "background noise",
    "a quiet room",
    "silence",
    "distant traffic",
    "people talking quietly",
)
"""Generic phrasings of "nothing in particular" that a trigger must beat on the same window."""

BACKGROUND_MARGIN: Final = 0.05
"""How much better than the best background phrasing a trigger must explain a window (cosine)."""

K: Final = 4.0
"""Robust standard deviations above the median of the recent non-hit scores."""

MIN_SPREAD: Final = 0.02
"""Least spread (cosine) assumed for the non-hit scores: a steady source has a MAD near 0."""

MAD_TO_SIGMA: Final = 1.4826
"""MAD times this is the standard deviation of normally distributed scores."""

MIN_HISTORY: Final = 20
"""Non-hit windows needed before the source floor applies."""

HISTORY_MAX: Final = 600
"""Non-hit scores kept per (source, trigger): 10 minutes at the default hop of 1 s."""


@dataclass(frozen=True, slots=True)
class WindowScore:
    """A window's cosines for one trigger (see the module doc)."""

    score: float  # best cosine with the trigger's phrasings and examples
    negative: float  # best cosine with its negative phrasings; -inf without any
    background: float  # best cosine with BACKGROUND_PHRASES; -inf without them


def _best(audio: FloatArray, vectors: FloatArray) -> float:
    if vectors.size == 0:
        return -math.inf
    return float(np.max(vectors @ audio))


def score_window(audio: FloatArray, positives: FloatArray, negatives: FloatArray,
                 background: FloatArray) -> WindowScore:
    """Score one window's audio embedding for one trigger.

    Args:
        audio: float32 (d,), the window's L2-normalised audio embedding.
        positives: float32 (n, d), n >= 1: the trigger's phrasings and examples.
        negatives: float32 (m, d), m >= 0: its negative phrasings.
        background: float32 (k, d), k >= 0: the background phrasings.

    Raises:
        ValueError: no positives, or the dimensions disagree.
    """
    if positives.ndim != 2 or positives.shape[0] == 0:
        raise ValueError("score_window: a trigger needs at least one positive embedding")
    for name, vectors in (("positives", positives), ("negatives", negatives),
                          ("background", background)):
        if vectors.size and (vectors.ndim != 2 or vectors.shape[1] != audio.shape[0]):
            raise ValueError(f"score_window: {name} have shape {vectors.shape}, "
                             f"the audio embedding {audio.shape}")
    return WindowScore(score=_best(audio, positives), negative=_best(audio, negatives),
                       background=_best(audio, background))


def is_hit(score: WindowScore, threshold: float) -> bool:
    """At or above ``threshold`` and better than every negative phrasing."""
    return score.score >= threshold and score.score > score.negative


def robust_floor(scores: Sequence[float] | npt.NDArray[np.float64], *, k: float = K,
                 min_spread: float = MIN_SPREAD) -> float:
    """``median + k * max(1.4826 * MAD, min_spread)`` of ``scores`` (at least one)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("robust_floor: no scores")
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median + k * max(MAD_TO_SIGMA * mad, min_spread)


class AutoThreshold:
    """The "auto" rule for one (source, trigger): background floor and source floor.

    Feed every scored window to :meth:`observe` after deciding it with
    :meth:`threshold`; :attr:`history` is what a restart restores.
    ``min_history`` is at least 1.
    """

    def __init__(self, history: Iterable[float] = (), *, margin: float = BACKGROUND_MARGIN,
                 min_history: int = MIN_HISTORY, history_max: int = HISTORY_MAX) -> None:
        self.margin = margin
        self.min_history = min_history
        self._history: deque[float] = deque(
            (float(v) for v in history if math.isfinite(v)), maxlen=history_max)
        self._floor: float | None = None  # cached source floor; None: recompute

    @property
    def history(self) -> tuple[float, ...]:
        """The recent non-hit scores, oldest first."""
        return tuple(self._history)

    def source_floor(self) -> float:
        """The source floor, or -inf while the history is shorter than ``min_history``."""
        if len(self._history) < self.min_history:
            return -math.inf
        if self._floor is None:
            self._floor = robust_floor(np.fromiter(self._history, dtype=np.float64))
        return self._floor

    def threshold(self, score: WindowScore) -> float:
        """The threshold for this window: the larger of the two floors."""
        return max(score.background + self.margin, self.source_floor())

    def observe(self, score: WindowScore) -> None:
        """Remember the window's score unless the source floor counts it as a hit."""
        if not math.isfinite(score.score):
            return
        if len(self._history) < self.min_history or score.score < self.source_floor():
            self._history.append(score.score)
            self._floor = None


def hit_score(score: WindowScore) -> float:
    """The highest threshold at which the window is a hit: its score, or ``-inf`` when a
    negative phrasing explains it at least as well.

    For every finite ``t``: ``is_hit(score, t) == (hit_score(score) >= t)``.
    """
    return score.score if score.score > score.negative else -math.inf


def decide(score: WindowScore, threshold: float | None, auto: AutoThreshold,
           ) -> tuple[float, bool]:
    """The daemon's rule for one window of one (source, trigger): ``(threshold, hit)``.

    ``threshold`` is the trigger's fixed one (its number or a calibrated one), None for
    "auto": then ``auto`` decides. ``auto`` observes every window either way, so that its
    history is ready should the fixed threshold go.
    """
    used = threshold if threshold is not None else auto.threshold(score)
    hit = is_hit(score, used)
    auto.observe(score)
    return used, hit


# ----------------------------------------------------------------------------- calibration


def firing_score(window_scores: Sequence[float], min_hits: int, of_windows: int) -> float:
    """The highest threshold at which ``min_hits`` of some ``of_windows`` consecutive
    windows reach it: the max over runs of the run's ``min_hits``-th best score.

    Fed each window's :func:`hit_score`, this is the highest fixed threshold at which
    the :class:`~streamcap.triggers.detector.Detector` turns on over these windows
    (``-inf``: at none). A sequence shorter than ``of_windows`` is one run; one shorter
    than ``min_hits`` needs all its windows (its lowest score).

    Raises:
        ValueError: no window scores, or ``min_hits``/``of_windows`` below 1.
    """
    if not window_scores:
        raise ValueError("firing_score: no window scores")
    if min_hits < 1 or of_windows < 1:
        raise ValueError("firing_score: min_hits and of_windows must be >= 1")
    scores = [float(s) for s in window_scores]
    span = min(of_windows, len(scores))
    k = min(min_hits, span)
    return max(sorted(scores[i:i + span], reverse=True)[k - 1]
               for i in range(len(scores) - span + 1))


@dataclass(frozen=True, slots=True)
class SweepRow:
    """Counts at one threshold (an item counts as detected when its score is ``>= threshold``)."""

    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        """tp / (tp + fp); 1.0 when nothing is detected (no false firing was made)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """tp / (tp + fn); 0.0 without positives."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """2 tp / (2 tp + fp + fn): the harmonic mean of precision and recall (0 when tp = 0)."""
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {"threshold": self.threshold, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "tn": self.tn, "precision": round(self.precision, 6),
                "recall": round(self.recall, 6), "f1": round(self.f1, 6)}


def at_threshold(positives: Sequence[float], negatives: Sequence[float],
                 threshold: float) -> SweepRow:
    """The counts of ``positives`` and ``negatives`` scores at ``threshold``."""
    tp = sum(1 for s in positives if s >= threshold)
    fp = sum(1 for s in negatives if s >= threshold)
    return SweepRow(threshold, tp, fp, len(positives) - tp, len(negatives) - fp)


def sweep(positives: Sequence[float], negatives: Sequence[float]) -> tuple[SweepRow, ...]:
    """One row per distinct finite score (every threshold that changes a count), highest first.

    ``positives`` are the scores of items that hold the sound, ``negatives`` of items
    that do not; ``-inf`` is an item detected at no threshold (see :func:`hit_score`).

    Raises:
        ValueError: no positive score, a score that is NaN or ``+inf``, or no finite score.
    """
    if not positives:
        raise ValueError("sweep: at least one positive score is needed")
    everything = [float(s) for s in (*positives, *negatives)]
    if any(math.isnan(s) or s == math.inf for s in everything):
        raise ValueError("sweep: every score must be finite or -inf")
    finite = {s for s in everything if math.isfinite(s)}
    if not finite:
        raise ValueError("sweep: no item reaches any threshold (every score is -inf)")
    return tuple(at_threshold(positives, negatives, t) for t in sorted(finite, reverse=True))


def best_row(rows: Sequence[SweepRow]) -> SweepRow:
    """The row with the best F1; of equal F1 the one with the higher threshold.

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("best_row: no rows")
    return max(rows, key=lambda r: (r.f1, r.threshold))
