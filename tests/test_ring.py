"""Tests of streamcap.audio.ring.RingBuffer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcap.audio.ring import RingBuffer


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 50),
    sizes=st.lists(st.integers(0, 80), min_size=1, max_size=20),
    start_index=st.integers(0, 1000),
)
def test_ring_holds_last_capacity_samples(
    capacity: int, sizes: list[int], start_index: int
) -> None:
    ring = RingBuffer(capacity, start_index=start_index)
    stream = np.arange(sum(sizes), dtype=np.float32)
    pos = 0
    for n in sizes:
        ring.append(stream[pos : pos + n])
        pos += n
        assert ring.end == start_index + pos
        assert len(ring) == min(pos, capacity)
        held = ring.read(ring.start, ring.end)
        np.testing.assert_array_equal(held, stream[pos - len(ring) : pos])


def test_reserve_keeps_content_and_discard_clamps() -> None:
    ring = RingBuffer(4, start_index=10)
    ring.append(np.arange(6, dtype=np.float32))  # keeps 2, 3, 4, 5 at 12..15
    ring.reserve(9)
    assert ring.capacity == 9
    ring.append(np.array([6, 7, 8], dtype=np.float32))
    np.testing.assert_array_equal(ring.read(12, 19), np.arange(2, 9, dtype=np.float32))
    ring.discard_before(15)
    assert ring.start == 15
    with pytest.raises(IndexError, match="outside"):
        ring.read(14, 16)
    ring.discard_before(100)
    assert ring.start == ring.end == 19


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(0)
