"""A sink's bounded inbox: a per-kind drop policy, a drop counter, an async ``get``.

The bus offers every message to each interested sink's :class:`Inbox`;
``offer`` is synchronous and never waits, so a sink that stops reading costs
memory up to ``max_pending`` messages and nothing else. What happens when a
sink falls behind is decided per message kind by a
:class:`~streamcap.queues.DropPolicy` of the :class:`~streamcap.queues.BoundedQueue`
it is built on:

* ``drop_oldest`` (captions by default): the message joins the queue; when
  the queue is full, the oldest pending message is dropped.
* ``latest_per_source`` (embeddings and status by default): a pending message
  of the same kind and source is replaced by the new one, which joins the end
  of the queue; if the queue is still full, the oldest pending message goes.

Nothing is dropped silently: every drop is counted by kind in
:attr:`Inbox.dropped`, reported to ``on_drop`` (the bus turns it into
``streamcap_sink_dropped_total{sink,kind}``) and logged with the window id;
caption drops are warnings. Messages leave in the order they were offered.

The queue is plain data guarded by nothing: call every method on the event
loop's thread (the bus moves publishes from other threads onto the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from streamcap.bus.wire import KINDS, kind_of
from streamcap.errors import InboxClosed
from streamcap.logs import get_logger
from streamcap.messages import Published, SourceStatus, TriggerEvent
from streamcap.queues import BoundedQueue, DropPolicy, DropReason

_log = get_logger(__name__)


DEFAULT_POLICIES: Final[Mapping[str, DropPolicy]] = MappingProxyType(
    {
        "caption": DropPolicy.DROP_OLDEST,
        "embedding": DropPolicy.LATEST_PER_SOURCE,
        "status": DropPolicy.LATEST_PER_SOURCE,
        "trigger": DropPolicy.DROP_OLDEST,
    }
)
DEFAULT_MAX_PENDING: Final = 256

DropHook = Callable[[str, Published], None]
"""``on_drop(kind, message)``: called once for every dropped message."""


def _window_id(msg: Published) -> str | None:
    if isinstance(msg, SourceStatus):
        return None
    return msg.event_id if isinstance(msg, TriggerEvent) else msg.window_id


class Inbox:
    """A bounded FIFO of published messages with per-kind drop policies.

    Args:
        name: The sink instance it belongs to (used in logs).
        max_pending: Most messages held at once (>= 1).
        policies: Drop policy per kind; kinds not given keep the defaults
            (caption: drop_oldest; embedding, status: latest_per_source).
        on_drop: Called with ``(kind, message)`` for every dropped message.
        on_depth: Called with the new depth whenever it changes.

    Raises:
        ValueError: ``max_pending`` < 1 or a policy names an unknown kind.
    """

    def __init__(
        self,
        name: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        policies: Mapping[str, DropPolicy] | None = None,
        on_drop: DropHook | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        merged = dict(DEFAULT_POLICIES)
        for kind, policy in (policies or {}).items():
            if kind not in KINDS:
                raise ValueError(f"inbox {name!r}: no message kind {kind!r} "
                                 f"(expected one of {', '.join(sorted(KINDS))})")
            merged[kind] = DropPolicy(policy)
        self.name = name
        self.max_pending = max_pending
        self.policies: Mapping[str, DropPolicy] = MappingProxyType(merged)
        self._on_drop = on_drop
        self._on_depth = on_depth
        self._items: BoundedQueue[Published] = BoundedQueue(
            max_pending, name=f"inbox {name!r}: max_pending")
        self._dropped: dict[str, int] = {kind: 0 for kind in sorted(KINDS)}
        self._closed = False
        self._wakeup = asyncio.Event()

    # ------------------------------------------------------------------ state

    @property
    def depth(self) -> int:
        """Messages pending."""
        return len(self._items)

    @property
    def dropped(self) -> Mapping[str, int]:
        """Messages dropped so far, by kind (every kind present, zero included)."""
        return MappingProxyType(dict(self._dropped))

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (pending messages may remain)."""
        return self._closed

    # ------------------------------------------------------------------ producer side

    def offer(self, msg: Published) -> None:
        """Queue ``msg`` without waiting, dropping per policy if the sink is behind.

        A message offered after :meth:`close` is dropped (and counted).
        """
        kind = kind_of(msg)
        if self._closed:
            self._drop(kind, msg, "inbox closed")
            return
        for dropped in self._items.offer(msg, policy=self.policies[kind],
                                         key=(kind, msg.source_id)):
            victim = dropped.item
            reason = (f"inbox full ({self.max_pending} pending)"
                      if dropped.reason is DropReason.FULL
                      else "superseded by a newer message from the same source")
            self._drop(kind_of(victim), victim, reason)
        self._changed()
        self._wakeup.set()

    def close(self) -> None:
        """Stop accepting messages; readers get what is pending, then :class:`InboxClosed`."""
        self._closed = True
        self._wakeup.set()

    def discard(self, reason: str) -> int:
        """Drop every pending message (counted and logged); returns how many."""
        pending = self._items.clear()
        for msg in pending:
            self._drop(kind_of(msg), msg, reason)
        if pending:
            self._changed()
        return len(pending)

    # ------------------------------------------------------------------ consumer side

    def get_nowait(self) -> Published | None:
        """The oldest pending message, or None if there is none."""
        msg = self._items.pop()
        if msg is not None:
            self._changed()
        return msg

    async def get(self) -> Published:
        """Wait for and return the oldest pending message.

        Raises:
            InboxClosed: The inbox is closed and nothing is pending.
        """
        while True:
            msg = self.get_nowait()
            if msg is not None:
                return msg
            if self._closed:
                raise InboxClosed(f"inbox {self.name!r} is closed")
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Published:
        try:
            return await self.get()
        except InboxClosed:
            raise StopAsyncIteration from None

    # ------------------------------------------------------------------ internals

    def _changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._items))

    def _drop(self, kind: str, msg: Published, reason: str) -> None:
        self._dropped[kind] += 1
        fields = {
            "sink": self.name,
            "kind": kind,
            "source_id": msg.source_id,
            "window_id": _window_id(msg),
            "reason": reason,
            "dropped_total": self._dropped[kind],
        }
        if kind == "caption":
            _log.warning("caption dropped", **fields)
        else:
            _log.debug("message dropped", **fields)
        if self._on_drop is not None:
            self._on_drop(kind, msg)
