"""The shared bounded drop queue: FIFO order, named drop policies, every drop returned and counted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamcap.queues import BoundedQueue, Dropped, DropPolicy, DropReason


def test_fifo_within_the_bound() -> None:
    q: BoundedQueue[int] = BoundedQueue(3)
    assert [q.offer(i) for i in range(3)] == [[], [], []]
    assert len(q) == 3 and list(q) == [0, 1, 2]
    assert [q.pop(), q.pop(), q.pop(), q.pop()] == [0, 1, 2, None]
    assert q.dropped == 0 and not q


def test_drop_oldest_drops_the_oldest_and_counts_it() -> None:
    q: BoundedQueue[str] = BoundedQueue(2)
    q.offer("a")
    q.offer("b")
    assert q.offer("c") == [Dropped("a", DropReason.FULL)]
    assert q.offer("d", policy=DropPolicy.DROP_OLDEST) == [Dropped("b", DropReason.FULL)]
    assert list(q) == ["c", "d"] and q.dropped == 2


def test_latest_per_source_replaces_the_pending_item_of_its_source() -> None:
    q: BoundedQueue[str] = BoundedQueue(10)
    latest = DropPolicy.LATEST_PER_SOURCE
    q.offer("a1", policy=latest, key="a")
    q.offer("caption")
    q.offer("b1", policy=latest, key="b")
    assert q.offer("a2", policy=latest, key="a") == [Dropped("a1", DropReason.SUPERSEDED)]
    assert list(q) == ["caption", "b1", "a2"]  # the newer one joins the end
    assert q.pop() == "caption" and q.pop() == "b1"
    # b1 left the queue: a new b supersedes nothing
    assert q.offer("b2", policy=latest, key="b") == []
    assert list(q) == ["a2", "b2"] and q.dropped == 1


def test_latest_per_source_still_respects_the_bound() -> None:
    q: BoundedQueue[str] = BoundedQueue(2)
    q.offer("x")
    q.offer("a1", policy=DropPolicy.LATEST_PER_SOURCE, key="a")
    assert q.offer("b1", policy=DropPolicy.LATEST_PER_SOURCE, key="b") == [
        Dropped("x", DropReason.FULL)]
    assert q.offer("a2", policy=DropPolicy.LATEST_PER_SOURCE, key="a") == [
        Dropped("a1", DropReason.SUPERSEDED)]
    assert list(q) == ["b1", "a2"]


def test_latest_per_source_needs_a_key() -> None:
    with pytest.raises(ValueError, match="key"):
        BoundedQueue[int](1).offer(1, policy=DropPolicy.LATEST_PER_SOURCE)


def test_clear_returns_everything_pending_without_counting_it_as_dropped() -> None:
    q: BoundedQueue[int] = BoundedQueue(5)
    for i in range(4):
        q.offer(i, policy=DropPolicy.LATEST_PER_SOURCE, key=i % 2)
    assert q.clear() == [2, 3]
    assert len(q) == 0 and q.dropped == 2
    assert q.offer(9, policy=DropPolicy.LATEST_PER_SOURCE, key=0) == []  # no stale key left


@pytest.mark.parametrize("bound", [0, -1, 1.5, True, "3"])
def test_the_bound_must_be_a_positive_integer(bound: object) -> None:
    with pytest.raises(ValueError, match=r"inbox 'x': the bound must be an integer >= 1"):
        BoundedQueue(bound, name="inbox 'x'")  # type: ignore[arg-type]


@given(st.integers(1, 6), st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=60))
def test_nothing_is_lost_unaccounted(bound: int, offers: list[tuple[bool, int]]) -> None:
    """Every item offered is pending, popped or returned as dropped: exactly once."""
    q: BoundedQueue[int] = BoundedQueue(bound)
    seen: list[int] = []
    for n, (latest, key) in enumerate(offers):
        policy = DropPolicy.LATEST_PER_SOURCE if latest else DropPolicy.DROP_OLDEST
        seen += [d.item for d in q.offer(n, policy=policy, key=key)]
        assert len(q) <= bound
        if n % 3 == 2:
            popped = q.pop()
            assert popped is not None
            seen.append(popped)
    pending = list(q)
    assert pending == sorted(pending)  # oldest first
    assert sorted(seen + pending) == list(range(len(offers)))
