"""Run a source under a watchdog: open it, detect stalls, restart it with backoff.

:class:`SourceSupervisor` drives a :class:`~streamcap.audio.watchdog.SourceWatchdog`
with what really happens to a source and hands blocks and status changes to
two callbacks. Every (re)start is a new clock epoch: blocks of epoch ``k``
start again at ``start_sample`` 0 and carry ``epoch=k``, so that windows never
span a gap.

Usage::

    sup = SourceSupervisor(lambda: create_source("kitchen", uri, opts), "kitchen")
    task = sup.start(on_block=windower_feed, on_status=bus.publish)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from streamcap.audio.watchdog import SourceWatchdog, WatchdogOptions
from streamcap.clock import Clock, SystemClock
from streamcap.errors import SourceUnavailable, StreamcapError
from streamcap.logs import get_logger
from streamcap.messages import AudioBlock, SourceState, SourceStatus
from streamcap.sources.base import AudioSource

_log = get_logger(__name__)

_T = TypeVar("_T")

BlockCallback = Callable[[AudioBlock], Awaitable[None] | None]
StatusCallback = Callable[[SourceStatus], Awaitable[None] | None]

CLOSE_TIMEOUT_S = 5.0
"""How long a source may take to clean up after it is cancelled or closed."""


async def _call(callback: Callable[[_T], Awaitable[None] | None], item: _T) -> None:
    result = callback(item)
    if inspect.isawaitable(result):
        await result


def _raise_if_cancelling() -> None:
    """Raise CancelledError if this task was asked to stop.

    A source that catches the cancellation and goes on (delivers another block,
    or ends so that the supervisor would retry) must not keep the supervisor
    running: the request to stop still counts.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class SourceSupervisor:
    """Keep one source running: restart it after errors and stalls, report every state change.

    Args:
        source_factory: Builds a fresh source for each attempt (may raise
            ``SourceError``; a ``ConfigError`` or any other exception fails the source).
        source_id: Name in status messages and task names.
        options: Stall thresholds and retry policy.
        clock: Time source (tests inject a fake one).
        rng: Random source for the backoff jitter.
    """

    def __init__(
        self,
        source_factory: Callable[[], AudioSource],
        source_id: str,
        options: WatchdogOptions | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._factory = source_factory
        self.source_id = source_id
        self.options = options or WatchdogOptions()
        self._clock = clock or SystemClock()
        self.watchdog = SourceWatchdog(source_id, self.options, rng=rng)
        self.epoch = -1
        """The clock epoch of the current attempt (0 for the first)."""
        self.restarts = 0
        """How many times the source was reopened after a failure or stall."""
        self.status: SourceStatus | None = None
        """The last status reported."""

    @property
    def task_prefix(self) -> str:
        return f"streamcap[source:{self.source_id}]"

    def start(
        self, on_block: BlockCallback, on_status: StatusCallback
    ) -> asyncio.Task[SourceStatus]:
        """Run :meth:`run` in a task named ``streamcap[source:<id>].supervisor``."""
        return asyncio.create_task(
            self.run(on_block, on_status), name=f"{self.task_prefix}.supervisor"
        )

    async def _report(self, on_status: StatusCallback, status: SourceStatus | None) -> None:
        if status is None:
            return
        self.status = status
        log = (
            _log.warning
            if status.state in (SourceState.STALLED, SourceState.RETRYING)
            else (_log.error if status.state is SourceState.FAILED else _log.info)
        )
        log("source state", source_id=self.source_id, state=status.state.value,
            reason=status.reason, retry_in_s=status.retry_in_s, attempt=status.attempt)
        await _call(on_status, status)

    async def run(self, on_block: BlockCallback, on_status: StatusCallback) -> SourceStatus:
        """Run the source until it ends, fails for good, or the task is cancelled.

        Args:
            on_block: Called with every block (sync or async). Blocks carry
                the current ``epoch`` and this supervisor's ``source_id``.
            on_status: Called with every state change (sync or async).

        Returns:
            The final status: STOPPED (end of input) or FAILED.

        Raises:
            asyncio.CancelledError: on cancellation, after reporting STOPPED; also when the
                source swallowed the cancellation (the request still ends the supervisor).
        """
        clock = self._clock
        wd = self.watchdog
        try:
            while True:
                self.epoch += 1
                if self.epoch:
                    self.restarts += 1
                await self._report(on_status, wd.started(clock.monotonic(), at=clock.wall()))
                final = await self._run_once(on_block, on_status)
                _raise_if_cancelling()  # the source swallowed the cancellation: never restart
                if final is not None:
                    return final
                status = wd.last_status
                delay = status.retry_in_s if status and status.retry_in_s is not None else 0.0
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            stopped = wd.stopped(clock.monotonic(), at=clock.wall(), reason="shutdown")
            with contextlib.suppress(Exception):
                await self._report(on_status, stopped)
            raise

    async def _run_once(
        self, on_block: BlockCallback, on_status: StatusCallback
    ) -> SourceStatus | None:
        """One attempt: open, pump blocks, classify the outcome.

        Returns:
            The final status if the supervisor should stop, ``None`` to retry
            (the watchdog is then RETRYING).
        """
        clock = self._clock
        wd = self.watchdog
        try:
            source = self._factory()
            blocks = source.blocks()
        except Exception as exc:  # noqa: BLE001
            return await self._fail(on_status, exc)
        try:
            while True:
                deadline = wd.deadline()
                timeout = None if deadline is None else max(0.0, deadline - clock.monotonic())
                try:
                    async with asyncio.timeout(timeout):
                        block = await anext(blocks)
                except TimeoutError:
                    stalled = wd.tick(max(clock.monotonic(), deadline or 0.0), at=clock.wall())
                    if stalled is None:  # the clock disagrees with asyncio's timer; go on waiting
                        continue
                    await self._report(on_status, stalled)
                    await self._close(blocks)
                    retry = wd.error(
                        stalled.reason, permanent=False, now=clock.monotonic(), at=clock.wall()
                    )
                    await self._report(on_status, retry)
                    return retry if retry.state is SourceState.FAILED else None
                except StopAsyncIteration:
                    return await self._end(on_status)
                except Exception as exc:  # noqa: BLE001
                    return await self._fail(on_status, exc)
                _raise_if_cancelling()  # a source that swallowed its cancellation ends here
                if block.epoch != self.epoch or block.source_id != self.source_id:
                    block = dataclasses.replace(block, epoch=self.epoch, source_id=self.source_id)
                await self._report(
                    on_status, wd.data(len(block.samples), clock.monotonic(), at=clock.wall())
                )
                try:
                    await _call(on_block, block)
                except Exception as exc:  # noqa: BLE001  (a block the windower refuses: a bug)
                    return await self._fail(on_status, exc)
        finally:
            await self._close(blocks)

    async def _end(self, on_status: StatusCallback) -> SourceStatus:
        _raise_if_cancelling()  # ended because it was cancelled: "stopped (shutdown)" follows
        status = self.watchdog.ended(self._clock.monotonic(), at=self._clock.wall())
        await self._report(on_status, status)
        return status

    async def _fail(self, on_status: StatusCallback, exc: Exception) -> SourceStatus | None:
        """Classify an exception: SourceUnavailable retries, anything else fails for good."""
        _raise_if_cancelling()  # no "retrying" for an error the shutdown caused
        clock = self._clock
        permanent = not isinstance(exc, SourceUnavailable)
        reason: str | BaseException = exc
        if not isinstance(exc, StreamcapError):
            _log.exception("source raised an unexpected error", source_id=self.source_id)
            reason = f"unexpected {type(exc).__name__}: {exc}"
        status = self.watchdog.error(
            reason, permanent=permanent, now=clock.monotonic(), at=clock.wall()
        )
        await self._report(on_status, status)
        return status if status.state is SourceState.FAILED else None

    async def _close(self, blocks: AsyncIterator[AudioBlock] | None) -> None:
        """Close the source's generator (runs its cleanup: close devices, kill ffmpeg)."""
        aclose = getattr(blocks, "aclose", None)
        if aclose is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await aclose()
        except TimeoutError:
            _log.error("source did not close in time", source_id=self.source_id,
                       timeout_s=CLOSE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            _log.warning("source raised while closing", source_id=self.source_id, error=str(exc))
