"""SourceSupervisor with scripted in-test sources: restarts, epochs, stalls, failures, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from streamcap.audio.watchdog import WatchdogOptions
from streamcap.errors import ConfigError, SourceFormatError, SourceUnavailable
from streamcap.messages import AudioBlock, SourceState, SourceStatus, make_block
from streamcap.sources.supervisor import SourceSupervisor

RATE = 1000
FAST = WatchdogOptions(
    stall_s=0.3,
    start_timeout_s=0.5,
    backoff_initial_s=0.02,
    backoff_max_s=0.05,
    backoff_jitter=0.0,
)


@dataclass
class ScriptedSource:
    """Yields ``n_blocks`` blocks of 100 samples, then ends, raises, or hangs."""

    n_blocks: int
    then: str = "end"  # "end" | "hang" | "raise"
    error: Exception | None = None
    source_id: str = "src"
    closed: list[bool] = field(default_factory=list)

    async def blocks(self) -> AsyncIterator[AudioBlock]:
        try:
            for i in range(self.n_blocks):
                await asyncio.sleep(0.001)
                yield make_block(
                    source_id=self.source_id,
                    start_sample=i * 100,
                    sample_rate_hz=RATE,
                    samples=np.full(100, i, dtype=np.float32),
                    captured_at=1.0 + i / 10,
                )
            if self.then == "hang":
                await asyncio.Event().wait()
            if self.then == "raise" and self.error is not None:
                raise self.error
        finally:
            self.closed.append(True)


class Factory:
    def __init__(self, sources: Sequence[ScriptedSource | Exception]) -> None:
        self.sources = list(sources)
        self.made: list[ScriptedSource] = []

    def __call__(self) -> ScriptedSource:
        item = self.sources[min(len(self.made), len(self.sources) - 1)]
        if isinstance(item, Exception):
            self.made.append(ScriptedSource(0))
            raise item
        src = ScriptedSource(item.n_blocks, item.then, item.error, item.source_id)
        self.made.append(src)
        return src


@dataclass
class Recorder:
    blocks: list[AudioBlock] = field(default_factory=list)
    statuses: list[SourceStatus] = field(default_factory=list)

    def on_block(self, block: AudioBlock) -> None:
        self.blocks.append(block)

    async def on_status(self, status: SourceStatus) -> None:
        self.statuses.append(status)

    @property
    def states(self) -> list[SourceState]:
        return [s.state for s in self.statuses]


async def run(factory: Factory, options: WatchdogOptions = FAST) -> tuple[SourceStatus, Recorder]:
    rec = Recorder()
    sup = SourceSupervisor(factory, "kitchen", options)
    async with asyncio.timeout(10):
        final = await sup.run(rec.on_block, rec.on_status)
    return final, rec


S = SourceState


async def test_finite_source_runs_to_stopped() -> None:
    final, rec = await run(Factory([ScriptedSource(3)]))
    assert rec.states == [S.STARTING, S.RUNNING, S.STOPPED]
    assert final.state is S.STOPPED and final.reason == "end of input"
    assert [b.start_sample for b in rec.blocks] == [0, 100, 200]
    assert {b.epoch for b in rec.blocks} == {0}
    assert {b.source_id for b in rec.blocks} == {"kitchen"}  # rewritten to the supervisor's id


async def test_errors_restart_with_new_epochs_from_sample_zero() -> None:
    lost = SourceUnavailable("tcp://127.0.0.1:9: Connection refused")
    factory = Factory(
        [
            ScriptedSource(2, "raise", lost),
            ScriptedSource(0, "raise", lost),
            ScriptedSource(2, "end"),
        ]
    )
    final, rec = await run(factory)
    assert rec.states == [
        S.STARTING, S.RUNNING, S.RETRYING,
        S.STARTING, S.RETRYING,
        S.STARTING, S.RUNNING, S.STOPPED,
    ]  # fmt: skip
    retries = [s for s in rec.statuses if s.state is S.RETRYING]
    assert [s.attempt for s in retries] == [1, 2]
    assert [s.retry_in_s for s in retries] == [0.02, 0.04]
    assert all("Connection refused" in s.reason for s in retries)
    assert [(b.epoch, b.start_sample) for b in rec.blocks] == [(0, 0), (0, 100), (2, 0), (2, 100)]
    assert all(src.closed for src in factory.made)
    assert final.state is S.STOPPED


async def test_stall_cancels_and_restarts_the_source() -> None:
    factory = Factory([ScriptedSource(2, "hang"), ScriptedSource(1, "end")])
    rec = Recorder()
    sup = SourceSupervisor(factory, "kitchen", FAST)
    async with asyncio.timeout(10):
        await sup.run(rec.on_block, rec.on_status)
    assert rec.states == [
        S.STARTING, S.RUNNING, S.STALLED, S.RETRYING, S.STARTING, S.RUNNING, S.STOPPED,
    ]  # fmt: skip
    stalled = rec.statuses[2]
    assert "no data for" in stalled.reason
    assert rec.statuses[3].reason == stalled.reason
    assert factory.made[0].closed == [True]  # the hung generator was cancelled and cleaned up
    assert sup.restarts == 1 and sup.epoch == 1
    assert rec.blocks[-1].epoch == 1 and rec.blocks[-1].start_sample == 0


async def test_silent_start_stalls_on_start_timeout() -> None:
    factory = Factory([ScriptedSource(0, "hang"), ScriptedSource(1)])
    final, rec = await run(factory)
    assert rec.states[:3] == [S.STARTING, S.STALLED, S.RETRYING]
    assert "within 0.5 s of opening" in rec.statuses[1].reason
    assert final.state is S.STOPPED


async def test_format_error_fails_without_retry() -> None:
    err = SourceFormatError("file source f: /x.wav cannot be decoded")
    factory = Factory([ScriptedSource(1, "raise", err)])
    final, rec = await run(factory)
    assert rec.states == [S.STARTING, S.RUNNING, S.FAILED]
    assert final.state is S.FAILED and "/x.wav" in final.reason
    assert len(factory.made) == 1


async def test_factory_errors_are_classified() -> None:
    final, rec = await run(Factory([SourceUnavailable("no device"), ScriptedSource(1)]))
    assert rec.states == [S.STARTING, S.RETRYING, S.STARTING, S.RUNNING, S.STOPPED]
    final, rec = await run(Factory([ConfigError("unknown option 'x'")]))
    assert rec.states == [S.STARTING, S.FAILED]
    assert "unknown option 'x'" in final.reason


async def test_unexpected_exception_fails_with_its_type() -> None:
    factory = Factory([ScriptedSource(1, "raise", ZeroDivisionError("oops"))])
    final, _ = await run(factory)
    assert final.state is S.FAILED
    assert final.reason == "unexpected ZeroDivisionError: oops"


async def test_max_retries_gives_up() -> None:
    opts = WatchdogOptions(
        stall_s=0.3, start_timeout_s=0.5, backoff_initial_s=0.01, backoff_jitter=0, max_retries=2
    )
    final, rec = await run(Factory([SourceUnavailable("refused")]), opts)
    assert rec.states.count(S.RETRYING) == 2
    assert final.state is S.FAILED and "gave up after 3 failed attempts" in final.reason


async def test_cancellation_reports_stopped_and_closes_the_source() -> None:
    factory = Factory([ScriptedSource(1, "hang")])
    rec = Recorder()
    opts = WatchdogOptions(stall_s=60, start_timeout_s=60)
    sup = SourceSupervisor(factory, "kitchen", opts)
    task = sup.start(rec.on_block, rec.on_status)
    assert task.get_name() == "streamcap[source:kitchen].supervisor"
    async with asyncio.timeout(5):
        while len(rec.blocks) < 1:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rec.states == [S.STARTING, S.RUNNING, S.STOPPED]
    assert rec.statuses[-1].reason == "shutdown"
    assert factory.made[0].closed == [True]


async def test_cancellation_during_backoff_reports_stopped() -> None:
    opts = WatchdogOptions(backoff_initial_s=30, backoff_max_s=30, backoff_jitter=0)
    rec = Recorder()
    sup = SourceSupervisor(Factory([SourceUnavailable("refused")]), "kitchen", opts)
    task = sup.start(rec.on_block, rec.on_status)
    async with asyncio.timeout(5):
        while S.RETRYING not in rec.states:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rec.states == [S.STARTING, S.RETRYING, S.STOPPED]
    assert rec.statuses[1].retry_in_s == 30


async def test_async_block_callback_is_awaited() -> None:
    seen: list[int] = []

    async def on_block(block: AudioBlock) -> None:
        await asyncio.sleep(0)
        seen.append(block.start_sample)

    sup = SourceSupervisor(Factory([ScriptedSource(3)]), "kitchen", FAST)
    async with asyncio.timeout(5):
        await sup.run(on_block, lambda status: None)
    assert seen == [0, 100, 200]


@dataclass
class DeafSource:
    """A source that catches its cancellation and goes on: with more blocks, or by
    raising an error that the supervisor would otherwise retry. Only the first cancellation
    of all the sources of one test is ignored, so that a failing test does not hang."""

    then: str  # "blocks" | "unavailable"
    ignored: list[int]  # cancellations ignored so far, shared by the sources of a test
    source_id: str = "src"

    async def blocks(self) -> AsyncIterator[AudioBlock]:
        i = 0
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if self.ignored:
                    raise
                self.ignored.append(1)
                if self.then == "unavailable":
                    raise SourceUnavailable("lost the input") from None
            yield make_block(source_id=self.source_id, start_sample=i * 100, sample_rate_hz=RATE,
                             samples=np.zeros(100, dtype=np.float32), captured_at=1.0 + i / 10)
            i += 1


@pytest.mark.parametrize("then", ["blocks", "unavailable"])
async def test_a_source_that_swallows_its_cancellation_still_stops(then: str) -> None:
    made: list[DeafSource] = []
    ignored: list[int] = []

    def factory() -> DeafSource:
        made.append(DeafSource(then, ignored))
        return made[-1]

    rec = Recorder()
    sup = SourceSupervisor(factory, "kitchen", WatchdogOptions(
        stall_s=60, start_timeout_s=60, backoff_initial_s=0.01, backoff_max_s=0.01,
        backoff_jitter=0.0))
    task = sup.start(rec.on_block, rec.on_status)
    async with asyncio.timeout(10):
        while len(rec.blocks) < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)
    assert done, f"the supervisor kept running after its cancellation: {rec.states}"
    assert task.cancelled()
    assert ignored == [1] and len(made) == 1, "restarted after the cancellation"
    assert rec.states[-1] is S.STOPPED and rec.statuses[-1].reason == "shutdown"
    assert S.RETRYING not in rec.states
