"""The one bounded drop queue: a FIFO that never blocks its producer and counts every drop.

Where a consumer can fall behind a producer that must not wait (windows for the
captioner, messages for a sink), items wait in a :class:`BoundedQueue`. Offering
never blocks: when the queue is full, an item is dropped by a named
:class:`DropPolicy`, and :meth:`BoundedQueue.offer` returns every dropped item
with the reason, so that the owner counts it (metrics) and says so (logs).
Items leave oldest first. Pure data, no asyncio and no locking: the owner makes
it awaitable and calls it from one thread.

Queues bounded in another way keep their own types: the WebSocket client queue
(bounded in bytes, dropping by priority tier), the replay history (a ring of the
newest frames, where falling out is not a loss) and the MQTT outbox (on disk).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = ["BoundedQueue", "DropPolicy", "DropReason", "Dropped"]

T = TypeVar("T")


class DropPolicy(StrEnum):
    """What an offer does when items pile up.

    * ``drop_oldest``: the item joins the end of the queue; when the queue is
      over its bound, the oldest pending item is dropped.
    * ``latest_per_source``: a pending item with the same key (its source) is
      dropped and the new one joins the end of the queue (only the newest per
      key matters); if the queue is still over its bound, the oldest goes.
    """

    DROP_OLDEST = "drop_oldest"
    LATEST_PER_SOURCE = "latest_per_source"


class DropReason(StrEnum):
    """Why an item was dropped."""

    FULL = "full"
    SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class Dropped(Generic[T]):
    """An item an offer dropped, and why."""

    item: T
    reason: DropReason


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``max_items`` items with named drop policies.

    Args:
        max_items: Most items held at once (an integer >= 1).
        name: Names the queue in the error for a bad bound.

    Raises:
        ValueError: ``max_items`` is not an integer >= 1.
    """

    def __init__(self, max_items: int, *, name: str = "queue") -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"{name}: the bound must be an integer >= 1, got {max_items!r}")
        self.max_items = max_items
        self._items: OrderedDict[int, tuple[T, Hashable | None]] = OrderedDict()
        self._latest: dict[Hashable, int] = {}  # key -> position in _items
        self._next = 0
        self.dropped = 0
        """Items dropped by offers so far (what :meth:`clear` removes is not counted here)."""

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[T]:
        """The pending items, oldest first (they stay pending)."""
        return iter([item for item, _ in self._items.values()])

    def offer(self, item: T, *, policy: DropPolicy = DropPolicy.DROP_OLDEST,
              key: Hashable | None = None) -> list[Dropped[T]]:
        """Queue ``item`` without waiting; returns what was dropped to make room, oldest first.

        Args:
            item: The new item.
            policy: How to make room (see :class:`DropPolicy`).
            key: The item's source, for ``latest_per_source`` (required there).

        Raises:
            ValueError: ``latest_per_source`` without a key.
        """
        dropped: list[Dropped[T]] = []
        if policy is DropPolicy.LATEST_PER_SOURCE:
            if key is None:
                raise ValueError("latest_per_source needs the item's key")
            old = self._latest.pop(key, None)
            if old is not None:
                victim, _ = self._items.pop(old)
                dropped.append(Dropped(victim, DropReason.SUPERSEDED))
            self._latest[key] = self._append(item, key)
        else:
            self._append(item, None)
        while len(self._items) > self.max_items:
            dropped.append(Dropped(self._pop_oldest(), DropReason.FULL))
        self.dropped += len(dropped)
        return dropped

    def pop(self) -> T | None:
        """The oldest pending item, removed; None when empty."""
        return self._pop_oldest() if self._items else None

    def clear(self) -> list[T]:
        """Remove every pending item; returns them oldest first."""
        out = [item for item, _ in self._items.values()]
        self._items.clear()
        self._latest.clear()
        return out

    def _append(self, item: T, key: Hashable | None) -> int:
        position = self._next
        self._next += 1
        self._items[position] = (item, key)
        return position

    def _pop_oldest(self) -> T:
        position, (item, key) = self._items.popitem(last=False)
        if key is not None and self._latest.get(key) == position:
            del self._latest[key]
        return item
