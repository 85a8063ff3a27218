"""A source's health as a pure state machine: stalls, retries with backoff, give-up.

No I/O and no asyncio: :class:`SourceWatchdog` is fed events with the time
they happened (``now``: monotonic seconds; ``at``: wall clock for the
published status) and answers with the :class:`~streamcap.messages.SourceStatus`
to publish when the state changed, else ``None``. The supervisor
(:mod:`streamcap.sources.supervisor`) does the waiting.

States::

    STARTING --data--> RUNNING --no data for stall_s--> STALLED
       |                  |                                 |
       +--no data for start_timeout_s--> STALLED            |
       +--error---------> RETRYING (backoff) <-------error--+
                              |--started--> STARTING
    permanent error, or more than max_retries attempts --> FAILED
    end of input or shutdown --> STOPPED
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from streamcap.backoff import Backoff
from streamcap.errors import ConfigError
from streamcap.messages import SourceState, SourceStatus
from streamcap.redact import redact

_ACTIVE = frozenset({SourceState.STARTING, SourceState.RUNNING, SourceState.STALLED})


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchdogOptions:
    """How a source's health is judged and how failures are retried.

    Attributes:
        stall_s: A running source that delivers nothing for this long is stalled.
        start_timeout_s: A starting source that delivers nothing for this long
            is stalled (connecting and probing take longer than a block).
        max_retries: Give up after this many consecutive failed attempts;
            ``None`` retries forever.
        backoff_initial_s, backoff_max_s, backoff_multiplier, backoff_jitter,
        backoff_reset_after_s: See :class:`~streamcap.backoff.Backoff`.
    """

    stall_s: float = 5.0
    start_timeout_s: float = 15.0
    max_retries: int | None = None
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 1.0
    backoff_reset_after_s: float = 30.0

    def __post_init__(self) -> None:
        problems = []
        if not self.stall_s > 0:
            problems.append(f"watchdog stall_s: expected > 0, got {self.stall_s}")
        if not self.start_timeout_s > 0:
            problems.append(f"watchdog start_timeout_s: expected > 0, got {self.start_timeout_s}")
        if self.max_retries is not None and self.max_retries < 0:
            problems.append(f"watchdog max_retries: expected >= 0 or none, got {self.max_retries}")
        if problems:
            raise ConfigError(problems)

    def make_backoff(self, rng: random.Random | None = None) -> Backoff:
        """The :class:`Backoff` these options describe."""
        return Backoff(
            self.backoff_initial_s,
            self.backoff_max_s,
            self.backoff_multiplier,
            self.backoff_jitter,
            self.backoff_reset_after_s,
            rng=rng,
        )


def _describe(reason: str | BaseException) -> str:
    """The status reason, redacted: it is published and shown by /healthz."""
    if isinstance(reason, BaseException):
        return redact(str(reason) or type(reason).__name__)
    return redact(reason)


class SourceWatchdog:
    """The health state of one source, driven by events.

    Every method takes ``now`` (monotonic seconds) and optionally ``at``
    (wall clock for the status; defaults to ``now``) and returns the
    :class:`SourceStatus` to publish if the state changed, else ``None``.

    Args:
        source_id: Copied into every status.
        options: Thresholds and retry policy.
        rng: Random source for the backoff jitter.
    """

    def __init__(
        self,
        source_id: str,
        options: WatchdogOptions | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.source_id = source_id
        self.options = options or WatchdogOptions()
        self.backoff = self.options.make_backoff(rng)
        self.state = SourceState.STOPPED
        self.attempt = 0
        """Consecutive failed attempts; reset once data flows for ``backoff_reset_after_s``."""
        self.samples = 0
        """Samples received since the last ``started``."""
        self._started_at = 0.0
        self._last_data_at = 0.0
        self._running_since = 0.0
        self._stall_reason = ""
        self.last_status: SourceStatus | None = None

    # -- helpers ---------------------------------------------------------------------------

    def _to(
        self,
        state: SourceState,
        reason: str,
        now: float,
        at: float | None,
        retry_in_s: float | None = None,
    ) -> SourceStatus:
        self.state = state
        status = SourceStatus(
            source_id=self.source_id,
            state=state,
            reason=reason,
            at=now if at is None else at,
            retry_in_s=retry_in_s,
            attempt=self.attempt,
        )
        self.last_status = status
        return status

    @property
    def active(self) -> bool:
        """Whether a source is open (starting, running or stalled)."""
        return self.state in _ACTIVE

    def deadline(self) -> float | None:
        """The monotonic time at which :meth:`tick` will declare a stall, if no data comes first."""
        if self.state is SourceState.STARTING:
            return self._started_at + self.options.start_timeout_s
        if self.state is SourceState.RUNNING:
            return self._last_data_at + self.options.stall_s
        return None

    # -- events ----------------------------------------------------------------------------

    def started(self, now: float, *, at: float | None = None) -> SourceStatus:
        """The source is being opened (first start or a retry)."""
        self._started_at = now
        self._last_data_at = now
        self.samples = 0
        if self.attempt:
            reason = (
                f"reopening after {self.attempt} failed attempt{'s' if self.attempt > 1 else ''}"
            )
        else:
            reason = "opening"
        return self._to(SourceState.STARTING, reason, now, at)

    def data(self, n_samples: int, now: float, *, at: float | None = None) -> SourceStatus | None:
        """``n_samples`` samples arrived; ignored unless a source is open."""
        if not self.active:
            return None
        self.samples += n_samples
        self._last_data_at = now
        if self.state is SourceState.RUNNING:
            if self.backoff.healthy(now - self._running_since):
                self.attempt = 0
            return None
        if self.state is SourceState.STALLED:
            reason = f"data resumed after stall ({self._stall_reason})"
        else:
            reason = f"receiving data ({now - self._started_at:.2f} s after opening)"
        self._running_since = now
        return self._to(SourceState.RUNNING, reason, now, at)

    def tick(self, now: float, *, at: float | None = None) -> SourceStatus | None:
        """Time passed; declare a stall if the deadline is over."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        if self.state is SourceState.STARTING:
            reason = f"no data within {self.options.start_timeout_s:g} s of opening"
        else:
            reason = (
                f"no data for {now - self._last_data_at:.1f} s (stall_s={self.options.stall_s:g})"
            )
        self._stall_reason = reason
        return self._to(SourceState.STALLED, reason, now, at)

    def error(
        self,
        reason: str | BaseException,
        *,
        permanent: bool,
        now: float,
        at: float | None = None,
    ) -> SourceStatus:
        """The source failed (or was given up on after a stall).

        Returns:
            RETRYING with ``retry_in_s`` set, or FAILED for a permanent error
            or once ``max_retries`` consecutive attempts have failed.
        """
        text = _describe(reason)
        if permanent:
            return self._to(SourceState.FAILED, text, now, at)
        self.attempt += 1
        limit = self.options.max_retries
        if limit is not None and self.attempt > limit:
            return self._to(
                SourceState.FAILED,
                f"gave up after {self.attempt} failed attempts; last: {text}",
                now,
                at,
            )
        delay = self.backoff.next_delay()
        return self._to(SourceState.RETRYING, text, now, at, retry_in_s=delay)

    def ended(
        self, now: float, *, at: float | None = None, reason: str = "end of input"
    ) -> SourceStatus:
        """The source returned normally (end of a file)."""
        return self._to(SourceState.STOPPED, reason, now, at)

    def stopped(
        self, now: float, *, at: float | None = None, reason: str = "shutdown"
    ) -> SourceStatus:
        """The source was stopped from outside (cancellation, daemon shutdown)."""
        return self._to(SourceState.STOPPED, reason, now, at)
