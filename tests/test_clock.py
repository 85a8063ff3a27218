"""The clock protocol: the system clock and the fake one tests drive."""

from __future__ import annotations

import time

from streamcap.clock import Clock, FakeClock, SystemClock


def test_system_clock_reads_monotonic_and_wall_time() -> None:
    clock: Clock = SystemClock()
    before_m, before_w = time.monotonic(), time.time()
    m, w = clock.monotonic(), clock.wall()
    assert before_m <= m <= time.monotonic()
    assert before_w <= w <= time.time()


def test_fake_clock_moves_only_when_told() -> None:
    fake = FakeClock(10.0, wall_offset=1_000.0)
    clock: Clock = fake
    assert (clock.monotonic(), clock.wall()) == (10.0, 1_010.0)
    assert (clock.monotonic(), clock.wall()) == (10.0, 1_010.0)
    fake.advance(2.5)
    assert (clock.monotonic(), clock.wall()) == (12.5, 1_012.5)
    fake.now = 20.0
    assert (clock.monotonic(), clock.wall()) == (20.0, 1_020.0)
