"""streamcap.bus.inbox: order, drop policies, drop accounting, async get and close."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from streamcap.bus.inbox import Inbox
from streamcap.errors import InboxClosed
from streamcap.messages import Caption, Embedding, Published, SourceState, SourceStatus
from streamcap.queues import DropPolicy


def cap(i: int, source: str = "a") -> Caption:
    return Caption(window_id=f"{source}:0:{i * 1000}", source_id=source, seq=i, start_s=float(i),
                   end_s=i + 10.0, captured_at=1.0, text=f"caption {i}", score=0.5)


def emb(i: int, source: str = "a") -> Embedding:
    return Embedding(window_id=f"{source}:0:{i * 1000}", source_id=source, seq=i,
                     start_s=float(i), end_s=i + 10.0, model="m",
                     vector=np.zeros(4, dtype=np.float32))


def stat(state: SourceState, source: str = "a") -> SourceStatus:
    return SourceStatus(source_id=source, state=state)


def drain(inbox: Inbox) -> list[Published]:
    out: list[Published] = []
    while (m := inbox.get_nowait()) is not None:
        out.append(m)
    return out


def test_messages_leave_in_offer_order_across_kinds() -> None:
    inbox = Inbox("s")
    msgs: list[Published] = [stat(SourceState.RUNNING), cap(0), emb(0), cap(1, "b"), emb(0, "b")]
    for m in msgs:
        inbox.offer(m)
    assert inbox.depth == 5
    assert [id(m) for m in drain(inbox)] == [id(m) for m in msgs]
    assert inbox.depth == 0
    assert dict(inbox.dropped) == {"caption": 0, "embedding": 0, "status": 0, "trigger": 0}


def test_full_inbox_drops_oldest_caption_counts_reports_and_warns() -> None:
    seen: list[tuple[str, str]] = []
    depths: list[int] = []
    inbox = Inbox("slow", max_pending=3,
                  on_drop=lambda kind, m: seen.append((kind, getattr(m, "window_id", ""))),
                  on_depth=depths.append)
    with capture_logs() as logs:
        for i in range(5):
            inbox.offer(cap(i))
    assert [m.seq for m in drain(inbox)] == [2, 3, 4]  # type: ignore[union-attr]
    assert inbox.dropped["caption"] == 2
    assert seen == [("caption", "a:0:0"), ("caption", "a:0:1000")]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [w["window_id"] for w in warnings] == ["a:0:0", "a:0:1000"]
    assert all(w["sink"] == "slow" and w["kind"] == "caption" for w in warnings)
    assert depths[:5] == [1, 2, 3, 3, 3] and depths[-1] == 0


def test_latest_per_source_keeps_only_newest_embedding_and_status_per_source() -> None:
    inbox = Inbox("s")
    e0a, e0b, e1a, e2a = emb(0, "a"), emb(0, "b"), emb(1, "a"), emb(2, "a")
    starting, running = stat(SourceState.STARTING, "a"), stat(SourceState.RUNNING, "a")
    c1 = cap(1, "a")
    for m in (e0a, starting, e0b, c1, e1a, running):  # e1a replaces e0a, running replaces starting
        inbox.offer(m)
    out = drain(inbox)
    assert [id(m) for m in out] == [id(e0b), id(c1), id(e1a), id(running)]
    assert inbox.dropped["embedding"] == 1 and inbox.dropped["status"] == 1
    assert inbox.dropped["caption"] == 0
    # After a message leaves, the next one of the same source is not a replacement.
    inbox.offer(e2a)
    assert inbox.dropped["embedding"] == 1
    assert [id(m) for m in drain(inbox)] == [id(e2a)]


def test_policies_can_be_overridden_per_kind() -> None:
    inbox = Inbox("s", policies={"caption": DropPolicy.LATEST_PER_SOURCE,
                                 "embedding": DropPolicy.DROP_OLDEST})
    for i in range(3):
        inbox.offer(cap(i))
        inbox.offer(emb(i))
    out = drain(inbox)
    assert [type(m).__name__ for m in out] == ["Embedding", "Embedding", "Caption", "Embedding"]
    assert inbox.dropped["caption"] == 2 and inbox.dropped["embedding"] == 0
    assert inbox.policies["status"] is DropPolicy.LATEST_PER_SOURCE


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_invalid_max_pending_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="max_pending"):
        Inbox("s", max_pending=bad)  # type: ignore[arg-type]


def test_unknown_kind_in_policies_is_rejected() -> None:
    with pytest.raises(ValueError, match="no message kind 'source_status'"):
        Inbox("s", policies={"source_status": DropPolicy.DROP_OLDEST})


async def test_get_waits_for_offer() -> None:
    inbox = Inbox("s")
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    inbox.offer(cap(7))
    assert await asyncio.wait_for(getter, 5) == cap(7)


async def test_close_drains_then_raises_and_wakes_waiters() -> None:
    inbox = Inbox("s")
    waiter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.close()
    with pytest.raises(InboxClosed):
        await asyncio.wait_for(waiter, 5)
    inbox2 = Inbox("s")
    inbox2.offer(cap(1))
    inbox2.offer(cap(2))
    inbox2.close()
    assert inbox2.closed
    assert [m async for m in inbox2] == [cap(1), cap(2)]
    with pytest.raises(InboxClosed):
        await inbox2.get()
    assert inbox2.get_nowait() is None


async def test_async_for_ends_when_closed_later() -> None:
    inbox = Inbox("s")
    got: list[Published] = []

    async def consume() -> None:
        async for m in inbox:
            got.append(m)

    task = asyncio.create_task(consume())
    inbox.offer(cap(1))
    await asyncio.sleep(0)
    inbox.offer(cap(2))
    inbox.close()
    await asyncio.wait_for(task, 5)
    assert got == [cap(1), cap(2)]


def test_offer_after_close_and_discard_are_counted_drops() -> None:
    dropped: list[str] = []
    inbox = Inbox("s", on_drop=lambda kind, m: dropped.append(kind))
    inbox.offer(cap(1))
    inbox.offer(emb(1))
    with capture_logs() as logs:
        assert inbox.discard("shutdown") == 2
        inbox.close()
        inbox.offer(cap(2))
    assert inbox.depth == 0
    assert dict(inbox.dropped) == {"caption": 2, "embedding": 1, "status": 0, "trigger": 0}
    assert dropped == ["caption", "embedding", "caption"]
    assert [e["window_id"] for e in logs if e["log_level"] == "warning"] == ["a:0:1000", "a:0:2000"]


_ops = st.lists(
    st.tuples(st.sampled_from(["caption", "embedding", "status", "get"]),
              st.sampled_from(["a", "b", "c"])),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, max_pending=st.integers(1, 6))
def test_every_offered_message_is_delivered_pending_or_counted(
    ops: list[tuple[str, str]], max_pending: int
) -> None:
    inbox = Inbox("p", max_pending=max_pending)
    offered: dict[str, int] = {"caption": 0, "embedding": 0, "status": 0}
    delivered: dict[str, int] = {"caption": 0, "embedding": 0, "status": 0}
    last_seq: dict[tuple[str, str], int] = {}
    for i, (op, source) in enumerate(ops):
        if op == "get":
            m = inbox.get_nowait()
            if m is not None:
                kind = type(m).__name__.lower().replace("sourcestatus", "status")
                delivered[kind] += 1
                seq = getattr(m, "seq", i)
                assert seq > last_seq.get((kind, m.source_id), -1)  # order kept per source
                last_seq[(kind, m.source_id)] = seq
            continue
        msg: Published = (cap(i, source) if op == "caption" else emb(i, source)
                          if op == "embedding" else stat(SourceState.RUNNING, source))
        inbox.offer(msg)
        offered[op] += 1
        assert inbox.depth <= max_pending
    pending = {"caption": 0, "embedding": 0, "status": 0}
    for m in drain(inbox):
        pending[type(m).__name__.lower().replace("sourcestatus", "status")] += 1
    for kind, n in offered.items():
        assert n == delivered[kind] + pending[kind] + inbox.dropped[kind]
