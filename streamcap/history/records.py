"""What the history store holds and gives back: frozen records, no I/O.

Times named ``*_at`` are wall-clock UNIX seconds (UTC); ``*_s`` are seconds on a
source's stream clock, as in :mod:`streamcap.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamcap.messages import Caption, CaptionCandidate, Embedding, Float32Array, TriggerEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowRecord:
    """One captioned window as the history keeps it.

    ``embedding`` is the retriever's L2-normalised audio embedding as stored
    (a backend may keep it compactly, e.g. int8 with a scale, and gives back the
    decoded float32 vector, read-only), or None when the model has no retriever
    or the record was read without vectors.
    """

    window_id: str
    source_id: str
    run_id: str
    seq: int
    start_s: float  # stream clock
    end_s: float
    start_at: float  # wall clock of the window's first sample (Caption.captured_at)
    end_at: float  # start_at + window duration
    model: str
    text: str
    score: float
    confidence: float | None = None
    abstained: bool = False
    flagged: bool = False
    speech: bool | None = None  # None: the speech guard was off
    candidates: tuple[str, ...] = ()  # every candidate caption's text, best first
    embedding: Float32Array | None = field(default=None, repr=False)

    @classmethod
    def from_caption(cls, caption: Caption, embedding: Embedding | None) -> WindowRecord:
        """The record of a published caption and its window's embedding (same window_id)."""
        if embedding is not None and embedding.window_id != caption.window_id:
            raise ValueError(f"embedding of {embedding.window_id} given with the caption of "
                             f"{caption.window_id}")
        return cls(
            window_id=caption.window_id, source_id=caption.source_id, run_id=caption.run_id,
            seq=caption.seq, start_s=caption.start_s, end_s=caption.end_s,
            start_at=caption.captured_at,
            end_at=caption.captured_at + (caption.end_s - caption.start_s),
            model=caption.model, text=caption.text, score=caption.score,
            confidence=caption.confidence, abstained=caption.abstained,
            flagged=caption.flagged, speech=caption.speech,
            candidates=tuple(c.text for c in caption.candidates),
            embedding=None if embedding is None else embedding.vector)

    def to_caption(self) -> Caption:
        """The caption message again (candidates carry only their text), for a backfill."""
        return Caption(
            window_id=self.window_id, source_id=self.source_id, seq=self.seq,
            start_s=self.start_s, end_s=self.end_s, captured_at=self.start_at, text=self.text,
            score=self.score, flagged=self.flagged,
            candidates=tuple(CaptionCandidate(text=t, decoder_score=float("nan"))
                             for t in self.candidates),
            model=self.model, run_id=self.run_id, confidence=self.confidence,
            abstained=self.abstained, speech=self.speech)


HistoryItem = WindowRecord | TriggerEvent
"""What the history holds, in time order: captioned windows and trigger events."""


def to_message(item: HistoryItem) -> Caption | TriggerEvent:
    """The published message of a history item: a window's caption (``to_caption``), or
    the trigger event itself (for a backfill, or a frame of ``/api/history``)."""
    return item.to_caption() if isinstance(item, WindowRecord) else item


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """Which part of the history: some sources (empty = all) between two wall-clock times.

    ``since`` is inclusive and ``until`` exclusive, compared with a window's
    ``start_at`` (an event's ``captured_at``); None is unbounded.
    """

    sources: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None

    def holds(self, source_id: str, at: float) -> bool:
        return ((not self.sources or source_id in self.sources)
                and (self.since is None or at >= self.since)
                and (self.until is None or at < self.until))


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryPage:
    """One page of history in time order, and the opaque cursor of the next (None: no more)."""

    items: tuple[HistoryItem, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchHit:
    """Adjacent matching windows of one source, grouped into one hit.

    ``score`` is the blended score of the best window (``best_window_id``);
    ``similarity`` its text-to-audio cosine (None: no comparable embedding) and
    ``text_match`` its caption match in [0, 1]. ``captions`` are the distinct
    captions of the grouped windows in time order.
    """

    source_id: str
    start_at: float
    end_at: float
    score: float
    similarity: float | None
    text_match: float
    best_window_id: str
    window_ids: tuple[str, ...]
    captions: tuple[str, ...]
    model: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStats:
    """How much the store holds, for metrics and reports."""

    windows: int
    events: int
    bytes: int  # on disk, clips included
    oldest_at: float | None


def unit_vector(vector: Float32Array) -> Float32Array:
    """``vector`` as a read-only float32 (dim,) copy scaled to unit length (zero stays zero)."""
    v = np.array(vector, dtype=np.float32, copy=True).reshape(-1)
    norm = float(np.linalg.norm(v))
    if norm > 0:
        v /= norm
    v.flags.writeable = False
    return v
