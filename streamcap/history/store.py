"""The interface of a history backend; SQLite implements it, a server database may too.

Every method is blocking and is called from one thread at a time: the daemon's
history writer thread writes, searches run on worker threads with a connection of
their own (:meth:`HistoryStore.reader`). Nothing here is called on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from streamcap.history.records import HistoryItem, HistoryPage, Span, StoreStats, WindowRecord
from streamcap.messages import Float32Array


class HistoryStore(Protocol):
    """A durable history of captioned windows and trigger events."""

    @property
    def location(self) -> str:
        """Where the store is (a path, or a URL without credentials), for messages."""
        ...

    def write(self, items: Sequence[HistoryItem]) -> None:
        """Store ``items`` in one transaction: all of them are durable on return, or none.

        A window or event already stored (same window_id / event_id) is replaced.

        Raises:
            HistoryError: the store cannot be written (disk full, read-only, corrupt).
        """
        ...

    def vector_search(self, vector: Float32Array, *, model: str, span: Span,
                      limit: int) -> list[tuple[str, float]]:
        """The windows of ``model`` in ``span`` whose embeddings are nearest ``vector``.

        Returns ``(window_id, cosine)`` pairs, best first, at most ``limit``.
        """
        ...

    def text_search(self, terms: Sequence[str], *, span: Span, limit: int) -> list[str]:
        """Window ids in ``span`` whose caption or candidates contain any of ``terms``
        (plain words, matched as words, never as query syntax), best match first."""
        ...

    def windows(self, window_ids: Sequence[str], *, vectors: bool = False
                ) -> dict[str, WindowRecord]:
        """The stored records of those of ``window_ids`` that exist (embeddings if ``vectors``)."""
        ...

    def page(self, span: Span, *, cursor: str | None, limit: int,
             newest_first: bool = False) -> HistoryPage:
        """Captions and trigger events in ``span`` in time order, ``limit`` at most, from
        ``cursor`` (a :attr:`HistoryPage.next_cursor`; None: the start).

        Raises:
            HistoryCursorError: ``cursor`` is not one this store made.
            HistoryError: the store cannot be read.
        """
        ...

    def recent(self, limit: int, *, per_source: bool) -> list[HistoryItem]:
        """The newest ``limit`` captions (each source's newest ``limit`` if ``per_source``),
        with the trigger events of the same period, oldest first: a backfill."""
        ...

    def enforce_retention(self, now: float) -> int:
        """Delete what is older than the age limit, then the oldest until under the size
        limit (event clips go with their events); returns how many records went."""
        ...

    def stats(self) -> StoreStats:
        ...

    def reader(self) -> HistoryStore:
        """A new handle on the same store for another thread (searches, pages)."""
        ...

    def close(self) -> None:
        ...
