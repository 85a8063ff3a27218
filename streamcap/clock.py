"""The one clock protocol: monotonic seconds for timeouts and rates, wall seconds for messages.

Code that reads time takes a :class:`Clock` (default :class:`SystemClock`), so
that tests drive it with a :class:`FakeClock` instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    """Where time is read: ``monotonic`` for durations, ``wall`` (Unix seconds) for timestamps."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """``time.monotonic`` and ``time.time``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told: ``now`` (monotonic) is set or advanced by the test.

    Args:
        now: The monotonic reading.
        wall_offset: ``wall() == now + wall_offset``.
    """

    def __init__(self, now: float = 0.0, *, wall_offset: float = 0.0) -> None:
        self.now = now
        self.wall_offset = wall_offset

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.wall_offset

    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds``."""
        self.now += seconds
