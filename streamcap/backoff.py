"""The one retry schedule: capped exponential backoff with jitter, reset after healthy time.

Used by every place that retries: a source's watchdog (reopening a source),
the plugin bus (restarting a failed sink) and the MQTT sink (reconnecting to
its broker). Pure logic: no clock and no sleeping; the caller says how long
things have been healthy and waits the delays itself.

The n-th delay since the last reset (n = 0, 1, ...) has the bound
``cap(n) = min(max_s, initial_s * multiplier**n)`` and is drawn uniformly from
``[cap(n) * (1 - jitter), cap(n)]``: ``jitter=1`` is "full jitter" (anything
from zero to the bound), ``jitter=0.5`` keeps at least half of the bound,
``jitter=0`` is a fixed schedule. Jitter spreads out the retries of daemons
that failed together (a broker or camera outage) so that they do not retry
in lockstep.
"""

from __future__ import annotations

import math
import random

from streamcap.errors import ConfigError

__all__ = ["Backoff"]


class Backoff:
    """Capped exponential backoff with jitter, reset after a healthy period.

    Args:
        initial_s: Upper bound of the first delay (> 0).
        max_s: Upper bound of every delay (>= initial_s).
        multiplier: Growth of the bound per attempt (>= 1).
        jitter: Fraction of the bound that is randomised, in [0, 1].
        reset_after_s: Being healthy for this long resets the schedule (>= 0).
        rng: Random source (seed it in tests).

    Raises:
        ConfigError: a parameter is out of range (every problem is listed).
    """

    def __init__(
        self,
        initial_s: float = 1.0,
        max_s: float = 60.0,
        multiplier: float = 2.0,
        jitter: float = 1.0,
        reset_after_s: float = 30.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        problems = []
        if not initial_s > 0:
            problems.append(f"backoff initial_s: expected > 0, got {initial_s}")
        if not max_s >= initial_s:
            problems.append(f"backoff max_s: expected >= initial_s ({initial_s}), got {max_s}")
        if not multiplier >= 1:
            problems.append(f"backoff multiplier: expected >= 1, got {multiplier}")
        if not 0 <= jitter <= 1:
            problems.append(f"backoff jitter: expected a fraction in [0, 1], got {jitter}")
        if not reset_after_s >= 0:
            problems.append(f"backoff reset_after_s: expected >= 0, got {reset_after_s}")
        if problems:
            raise ConfigError(problems)
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self.jitter = jitter
        self.reset_after_s = reset_after_s
        self._rng = rng or random.Random()
        self.attempt = 0
        """How many delays were handed out since the last reset."""

    def cap(self, attempt: int) -> float:
        """The upper bound of the delay for ``attempt`` (0-based); never overflows."""
        if attempt <= 0 or self.multiplier == 1 or self.initial_s >= self.max_s:
            return self.initial_s
        if attempt >= math.log(self.max_s / self.initial_s, self.multiplier):
            return self.max_s
        return min(self.max_s, self.initial_s * self.multiplier**attempt)

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; advances the schedule."""
        cap = self.cap(self.attempt)
        self.attempt += 1
        return cap - self.jitter * cap * self._rng.random()

    def healthy(self, healthy_for_s: float) -> bool:
        """Report healthy time (data flowing, a run or a connection lasting); reset once it
        reaches ``reset_after_s``.

        Returns:
            Whether the schedule was reset now.
        """
        if self.attempt and healthy_for_s >= self.reset_after_s:
            self.reset()
            return True
        return False

    def reset(self) -> None:
        """Start the schedule again from ``initial_s``."""
        self.attempt = 0
