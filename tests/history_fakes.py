"""An in-memory :class:`~streamcap.history.store.HistoryStore` and record makers, for unit tests.

``FakeHistory`` keeps the Protocol's promises the search relies on: span filtering
(``since`` inclusive, ``until`` exclusive, on a window's ``start_at`` and an event's
``captured_at``), text matches as whole words (never as query syntax), exact cosine
over one model's windows, time-ordered pages with opaque cursors in both orders, and
HistoryCursorError for a cursor it did not make. Tests of a user-facing path (the CLI, the
live page, the daemon) use the real SQLite store instead.

Use it as ``from history_fakes import FakeHistory, window, event`` (pytest puts
``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from streamcap.errors import HistoryCursorError
from streamcap.history.records import (
    HistoryItem,
    HistoryPage,
    Span,
    StoreStats,
    WindowRecord,
    unit_vector,
)
from streamcap.messages import Float32Array, TriggerEvent, TriggerState

MODEL = "streamcap-test-model"


def window(source: str, start_at: float, text: str, *, length_s: float = 10.0,
           vector: Sequence[float] | np.ndarray | None = None, model: str = MODEL,
           candidates: Sequence[str] = (), seq: int | None = None,
           window_id: str | None = None) -> WindowRecord:
    """A window record of ``source`` starting at ``start_at`` (UNIX seconds)."""
    seq = int(start_at) if seq is None else seq
    return WindowRecord(
        window_id=window_id or f"run1:{source}:0:{seq}", source_id=source, run_id="run1",
        seq=seq, start_s=float(seq), end_s=float(seq) + length_s, start_at=start_at,
        end_at=start_at + length_s, model=model, text=text, score=-1.0,
        candidates=tuple(candidates) or (text,),
        embedding=None if vector is None else unit_vector(np.asarray(vector, np.float32)))


def event(source: str, at: float, trigger: str = "dog", *, state: str = "on",
          event_id: str | None = None) -> TriggerEvent:
    """A trigger event of ``source`` at ``at`` (UNIX seconds)."""
    return TriggerEvent(event_id=event_id or f"run1:{trigger}:{source}:{at:.3f}",
                        trigger=trigger, source_id=source, state=TriggerState(state),
                        score=0.5, threshold=0.3, start_s=0.0, end_s=5.0, captured_at=at,
                        model=MODEL, run_id="run1")


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def _time(item: HistoryItem) -> float:
    return item.start_at if isinstance(item, WindowRecord) else item.captured_at


def _key(item: HistoryItem) -> tuple[float, int, str]:
    if isinstance(item, WindowRecord):
        return (item.start_at, 0, item.window_id)
    return (item.captured_at, 1, item.event_id)


class FakeHistory:
    """An in-memory history store (see the module docstring)."""

    def __init__(self, location: str = "memory:fake") -> None:
        self._location = location
        self.windows_by_id: dict[str, WindowRecord] = {}
        self.events_by_id: dict[str, TriggerEvent] = {}
        self.closed = False
        self.readers: list[FakeHistory] = []
        self.calls: list[str] = []

    @property
    def location(self) -> str:
        return self._location

    def write(self, items: Sequence[HistoryItem]) -> None:
        for item in items:
            if isinstance(item, WindowRecord):
                self.windows_by_id[item.window_id] = item
            else:
                self.events_by_id[item.event_id] = item

    def _in(self, span: Span) -> list[HistoryItem]:
        items: list[HistoryItem] = [*self.windows_by_id.values(), *self.events_by_id.values()]
        return sorted((i for i in items if span.holds(i.source_id, _time(i))), key=_key)

    def vector_search(self, vector: Float32Array, *, model: str, span: Span,
                      limit: int) -> list[tuple[str, float]]:
        self.calls.append(f"vector_search:{limit}")
        query = unit_vector(vector)
        scored = [(w.window_id, float(np.dot(unit_vector(w.embedding), query)))
                  for w in self._in(span)
                  if isinstance(w, WindowRecord) and w.model == model and w.embedding is not None
                  and w.embedding.shape == query.shape]
        scored.sort(key=lambda pair: -pair[1])
        return scored[:limit]

    def text_search(self, terms: Sequence[str], *, span: Span, limit: int) -> list[str]:
        self.calls.append(f"text_search:{limit}")
        wanted = {t.lower() for t in terms}
        found = []
        for w in self._in(span):
            if not isinstance(w, WindowRecord):
                continue
            have = _words(" ".join((w.text, *w.candidates)))
            if n := len(wanted & have):
                found.append((n, w.start_at, w.window_id))
        found.sort(key=lambda f: (-f[0], -f[1]))
        return [f[2] for f in found[:limit]]

    def windows(self, window_ids: Sequence[str], *, vectors: bool = False
                ) -> dict[str, WindowRecord]:
        out = {}
        for window_id in window_ids:
            record = self.windows_by_id.get(window_id)
            if record is not None:
                out[window_id] = record if vectors else replace(record, embedding=None)
        return out

    def page(self, span: Span, *, cursor: str | None, limit: int,
             newest_first: bool = False) -> HistoryPage:
        items = self._in(span)
        if newest_first:
            items.reverse()
        if cursor is not None:
            after = self._decode(cursor, newest_first)
            items = [i for i in items
                     if (_key(i) < after if newest_first else _key(i) > after)]
        page = items[:limit]
        more = len(items) > limit
        next_cursor = self._encode(_key(page[-1]), newest_first) if more and page else None
        return HistoryPage(items=tuple(page), next_cursor=next_cursor)

    @staticmethod
    def _encode(key: tuple[float, int, str], newest_first: bool) -> str:
        raw = json.dumps([key[0], key[1], key[2], newest_first]).encode()
        return base64.urlsafe_b64encode(raw).decode()

    def _decode(self, cursor: str, newest_first: bool) -> tuple[float, int, str]:
        try:
            at, kind, ident, order = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            if order != newest_first:
                raise ValueError("another order")
            return (float(at), int(kind), str(ident))
        except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
            raise HistoryCursorError(f"{self.location}: not a cursor of this store: "
                               f"{cursor[:40]!r}") from None

    def recent(self, limit: int, *, per_source: bool) -> list[HistoryItem]:
        windows = sorted(self.windows_by_id.values(), key=_key)
        chosen: list[WindowRecord] = []
        if per_source:
            for source in {w.source_id for w in windows}:
                chosen += [w for w in windows if w.source_id == source][-limit:]
        else:
            chosen = windows[-limit:]
        if not chosen:
            return []
        first = min(w.start_at for w in chosen)
        events = [e for e in self.events_by_id.values() if e.captured_at >= first]
        return sorted([*chosen, *events], key=_key)

    def enforce_retention(self, now: float) -> int:
        return 0

    def stats(self) -> StoreStats:
        times = [_time(i) for i in self._in(Span())]
        return StoreStats(windows=len(self.windows_by_id), events=len(self.events_by_id),
                          bytes=0, oldest_at=min(times) if times else None)

    def reader(self) -> FakeHistory:
        """A handle on the same records (the dictionaries are shared)."""
        other = FakeHistory(self._location)
        other.windows_by_id = self.windows_by_id
        other.events_by_id = self.events_by_id
        other.calls = self.calls
        self.readers.append(other)
        return other

    def close(self) -> None:
        self.closed = True
