"""streamcap.pipeline: the fair per-source window queue and the inference worker.

The worker tests use the real :class:`InferenceRuntime` (its single inference
thread) with fake captioners: one held back by the test, so that an overloaded
worker is simulated exactly (every window "takes" two hops) and so that the
batches the worker forms across sources are seen call by call, and one that
sleeps, run through the whole :class:`Daemon` with a real file source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from timing import scaled

from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import SinkContext
from streamcap.clock import FakeClock
from streamcap.config import parse_config
from streamcap.daemon import Daemon
from streamcap.messages import Caption, CaptionResult, Embedding, Published, Window, make_window
from streamcap.models.runtime import THREAD_NAME_PREFIX, InferenceRuntime, RuntimeOptions
from streamcap.pipeline import (
    BATCH_RECOVERY,
    InferenceWorker,
    RoundRobinWindows,
    SkippedWindow,
    WindowQueue,
)
from streamcap.stats import Metrics

WAIT_S = scaled(30.0)  # upper bound for something that must happen; never a timing assertion
RATE = 16000
HOP_S = 5.0
WINDOW_S = 10.0
T0 = 1_000_000.0  # wall clock of the first window's first sample


def window(seq: int, source: str = "s") -> Window:
    """Window ``seq`` of a 10 s / 5 s hop stream that started at ``T0``."""
    start = seq * HOP_S
    return make_window(source_id=source, seq=seq, epoch=0, start_ms=round(start * 1000),
                       end_ms=round((start + WINDOW_S) * 1000),
                       captured_at=T0 + start, level_dbfs=-20.0,
                       audio={RATE: np.zeros(8, dtype=np.float32)})


def arrival(seq: int) -> float:
    """Wall clock at which window ``seq`` is complete (its end)."""
    return T0 + seq * HOP_S + WINDOW_S


def result_for(win: Window) -> CaptionResult:
    caption = Caption(window_id=win.window_id, source_id=win.source_id, seq=win.seq,
                      start_s=win.start_s, end_s=win.end_s, captured_at=win.captured_at,
                      text=f"window {win.seq}", score=0.5, model="fake-captioner")
    vector = np.full(4, 0.5, dtype=np.float32)
    embedding = Embedding(window_id=win.window_id, source_id=win.source_id, seq=win.seq,
                          start_s=win.start_s, end_s=win.end_s, model="fake-retriever",
                          vector=vector)
    return CaptionResult(caption=caption, embedding=embedding, stage_seconds={"fake": 0.001})


def sample_value(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The value of one sample in Prometheus text (labels in any order); ``default`` when
    the sample is absent and a default is given."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        if found == labels:
            return float(match[3])
    if default is not None:
        return default
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


# --------------------------------------------------------------------------- WindowQueue


def test_queue_refuses_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="per_source must be >= 1"):
        WindowQueue(0)


async def test_queue_is_bounded_and_drops_the_oldest() -> None:
    dropped: list[Window] = []
    q = WindowQueue(3, on_drop=dropped.append)
    for seq in range(7):
        q.offer(window(seq))
        assert len(q) == min(seq + 1, 3)
    assert q.dropped == 4
    assert [w.seq for w in dropped] == [0, 1, 2, 3]
    got = [await q.get() for _ in range(3)]
    assert [w.seq for w in got if w is not None] == [4, 5, 6]
    assert len(q) == 0


def test_round_robin_serves_every_source_in_turn() -> None:
    rr = RoundRobinWindows(2)
    for seq in range(3):
        for source in ("a", "b", "c"):
            assert rr.offer(window(seq, source)) is None or seq == 2
    assert len(rr) == 6
    served = [(w.source_id, w.seq) for w in rr.clear()]
    # each source kept its two newest windows; sources take turns, oldest window first
    assert served == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2)]
    assert len(rr) == 0 and rr.pop() is None


def test_round_robin_drops_only_the_offering_sources_oldest() -> None:
    rr = RoundRobinWindows(2)
    rr.offer(window(0, "quiet"))
    dropped = [rr.offer(window(seq, "busy")) for seq in range(5)]
    assert [w.seq if w else None for w in dropped] == [None, None, 0, 1, 2]
    assert (rr.depth("quiet"), rr.depth("busy"), len(rr)) == (1, 2, 3)
    assert [(w.source_id, w.seq) for w in rr.clear()] == [("quiet", 0), ("busy", 3),
                                                          ("busy", 4)]


def test_round_robin_a_burst_from_one_source_does_not_take_every_turn() -> None:
    """The arrival order that starved a source in a single drop-oldest FIFO: one source's
    window always arrives first, so it was always the oldest, hence always the one dropped."""
    rr = RoundRobinWindows(1)
    served: list[str] = []
    for seq in range(30):
        for source in ("first", "second", "third"):
            rr.offer(window(seq, source))
        got = rr.pop()  # inference keeps up with one window per hop for three sources
        assert got is not None
        served.append(got.source_id)
    assert {s: served.count(s) for s in ("first", "second", "third")} == {
        "first": 10, "second": 10, "third": 10}


def test_a_newly_busy_source_joins_the_end_of_the_line() -> None:
    rr = RoundRobinWindows(4)
    for seq in range(3):
        rr.offer(window(seq, "a"))
    rr.offer(window(0, "b"))
    first = rr.pop()
    rr.offer(window(0, "c"))
    rest = rr.clear()
    assert first is not None and (first.source_id, first.seq) == ("a", 0)
    assert [(w.source_id, w.seq) for w in rest] == [("b", 0), ("a", 1), ("c", 0), ("a", 2)]


async def test_queue_drops_per_source_and_counts_by_source() -> None:
    dropped: list[Window] = []
    depths: list[int] = []
    q = WindowQueue(1, on_drop=dropped.append, on_depth=depths.append)
    for seq in range(3):
        q.offer(window(seq, "a"))
    q.offer(window(0, "b"))
    assert [(w.source_id, w.seq) for w in dropped] == [("a", 0), ("a", 1)]
    assert q.dropped == 2 and q.dropped_by_source == {"a": 2}
    assert (len(q), q.depth("a"), q.depth("b")) == (2, 1, 1)
    assert depths == [1, 1, 1, 2]
    got = [await q.get(), await q.get()]
    assert [(w.source_id, w.seq) for w in got if w is not None] == [("a", 2), ("b", 0)]
    assert depths[-2:] == [1, 0]


async def test_depth_is_reported_on_every_change() -> None:
    depths: list[int] = []
    q = WindowQueue(2, on_depth=depths.append)
    for seq in range(3):
        q.offer(window(seq))
    await q.get()
    await q.get()
    assert depths == [1, 2, 2, 1, 0]
    q.offer(window(3))
    q.offer(window(4))
    q.close(drop_pending=True)
    assert depths[-3:] == [1, 2, 0]


async def test_get_waits_for_a_window() -> None:
    q = WindowQueue(2)
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    q.offer(window(0))
    got = await asyncio.wait_for(waiter, WAIT_S)
    assert got is not None and got.seq == 0


async def test_close_lets_the_queue_drain_then_ends_it() -> None:
    q = WindowQueue(4)
    q.offer(window(0))
    q.offer(window(1))
    assert q.close() == []
    assert q.closed
    with pytest.raises(RuntimeError, match="closed"):
        q.offer(window(2))
    first, second, end = await q.get(), await q.get(), await q.get()
    assert (first and first.seq, second and second.seq, end) == (0, 1, None)
    assert await q.get() is None  # stays ended
    assert q.dropped == 0


async def test_close_dropping_pending_returns_them() -> None:
    q = WindowQueue(4)
    for seq in range(3):
        q.offer(window(seq))
    discarded = q.close(drop_pending=True)
    assert [w.seq for w in discarded] == [0, 1, 2]
    assert len(q) == 0
    assert await q.get() is None


async def test_close_wakes_a_waiting_get() -> None:
    q = WindowQueue(1)
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.close()
    assert await asyncio.wait_for(waiter, WAIT_S) is None


def test_pop_passes_over_excluded_sources_and_they_keep_their_place() -> None:
    rr = RoundRobinWindows(4)
    for source in ("a", "b", "c"):
        for seq in range(2):
            rr.offer(window(seq, source))
    got = rr.pop(exclude={"a"})
    assert got is not None and (got.source_id, got.seq) == ("b", 0)
    assert rr.pop(exclude={"a", "b", "c"}) is None
    assert len(rr) == 5
    # "a" was passed over, not sent to the end of the line; "b" went there
    assert [(w.source_id, w.seq) for w in rr.clear()] == [("a", 0), ("c", 0), ("b", 1),
                                                          ("a", 1), ("c", 1)]


async def test_take_never_waits_and_reports_the_depth() -> None:
    depths: list[int] = []
    q = WindowQueue(2, on_depth=depths.append)
    assert q.take() is None
    q.offer(window(0, "a"))
    q.offer(window(0, "b"))
    assert q.take(exclude={"a", "b"}) is None
    got = q.take(exclude={"a"})
    assert got is not None and got.source_id == "b"
    assert depths == [1, 2, 1]


async def test_wait_for_offer_wakes_on_an_offer_or_a_close() -> None:
    q = WindowQueue(2)
    waiter = asyncio.create_task(q.wait_for_offer(10 * WAIT_S))
    await asyncio.sleep(0)
    assert not waiter.done()
    q.offer(window(0))
    assert await asyncio.wait_for(waiter, WAIT_S) is True
    waiter = asyncio.create_task(q.wait_for_offer(10 * WAIT_S))
    await asyncio.sleep(0)
    q.close()
    assert await asyncio.wait_for(waiter, WAIT_S) is True
    assert await asyncio.wait_for(q.wait_for_offer(10 * WAIT_S), WAIT_S) is True  # closed
    assert await WindowQueue(1).wait_for_offer(0.01) is False  # nothing came



# --------------------------------------------------------------------------- InferenceWorker


class HeldCaptioner:
    """A captioner that takes as long as the test says: each call (a batch) waits for a permit.

    It reports every window it starts on ``started``, every call's windows as
    ``(source, seq)`` pairs in ``calls``, and the thread it ran on. A call holding a
    window whose seq is in ``fail_seqs`` (or whose ``(source, seq)`` is in
    ``fail_windows``) raises, as a batch that a bad window breaks would.
    """

    model_id = "fake-captioner"
    sample_rates_hz = (RATE,)

    def __init__(self, fail_seqs: frozenset[int] = frozenset(),
                 fail_windows: frozenset[tuple[str, int]] = frozenset()) -> None:
        self.started: queue.Queue[int] = queue.Queue()
        self.called: queue.Queue[list[tuple[str, int]]] = queue.Queue()
        self.calls: list[list[tuple[str, int]]] = []
        self.permits = threading.Semaphore(0)
        self.threads: set[str] = set()
        self.fail_seqs = fail_seqs
        self.fail_windows = fail_windows

    def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
        self.threads.add(threading.current_thread().name)
        keys = [(w.source_id, w.seq) for w in windows]
        assert len({source for source, _ in keys}) == len(keys), f"one source twice: {keys}"
        self.calls.append(keys)
        self.called.put(keys)
        for win in windows:
            self.started.put(win.seq)
        if not self.permits.acquire(timeout=WAIT_S):
            raise TimeoutError("the test never let this batch finish")
        for win in windows:
            if win.seq in self.fail_seqs or (win.source_id, win.seq) in self.fail_windows:
                raise RuntimeError(f"model failed on window {win.source_id} {win.seq}")
        return [dataclasses.replace(result_for(w), batch_size=len(windows)) for w in windows]

    def caption(self, win: Window) -> CaptionResult:
        return self.caption_batch([win])[0]

    async def next_started(self) -> int:
        return await asyncio.to_thread(self.started.get, True, WAIT_S)

    async def next_call(self) -> list[tuple[str, int]]:
        return await asyncio.to_thread(self.called.get, True, WAIT_S)


@pytest.fixture
async def runtime() -> AsyncIterator[InferenceRuntime]:
    rt = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32", num_threads=1))
    try:
        yield rt
    finally:
        await rt.aclose()


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def captions_of(published: list[Published]) -> list[Caption]:
    return [m for m in published if isinstance(m, Caption)]


def count_is(published: list[Published], n: int) -> Callable[[], bool]:
    return lambda: len(captions_of(published)) == n


async def test_an_overloaded_worker_drops_the_oldest_and_its_lag_grows_to_a_bound(
        runtime: InferenceRuntime) -> None:
    """Each window takes two hops to caption: half the windows must go, the oldest ones."""
    captioner = HeldCaptioner()
    clock = FakeClock(T0)
    metrics = Metrics()
    dropped: list[Window] = []
    published: list[Published] = []
    q = WindowQueue(2, on_drop=dropped.append)
    worker = InferenceWorker(captioner, q, published.append, runtime.run, metrics, clock=clock)
    task = asyncio.create_task(worker.run())

    clock.now = arrival(0)
    q.offer(window(0))
    in_progress = [await captioner.next_started()]
    offered = 1
    for rounds in range(1, 5):
        for _ in range(2):  # two windows arrive while one is captioned
            clock.now = arrival(offered)
            q.offer(window(offered))
            offered += 1
        captioner.permits.release()
        await wait_until(count_is(published, rounds), f"caption {rounds}")
        in_progress.append(await captioner.next_started())
    # The source stops: the queue is closed and what is queued is captioned.
    q.close()
    captioner.permits.release(2)
    await asyncio.wait_for(task, WAIT_S)

    captions = captions_of(published)
    assert [c.seq for c in captions] == [0, 1, 3, 5, 7, 8]
    assert in_progress == [0, 1, 3, 5, 7]
    assert [w.seq for w in dropped] == [2, 4, 6]
    assert q.dropped == 3
    # Every dropped window is older than the window captioned after it: the newest survive.
    for w in dropped:
        assert any(c.seq > w.seq for c in captions)
    # Lag (publish time - window end) grows from one window to the bound the queue sets,
    # then shrinks while the backlog is worked off after the source stopped.
    assert [c.lag_s for c in captions] == [10.0, 15.0, 15.0, 15.0, 5.0, 0.0]
    assert worker.last_lag_s == 0.0
    assert all(c.latency_ms >= 0 for c in captions)
    # Each caption is followed by its window's embedding.
    kinds = [(type(m).__name__, m.seq) for m in published if isinstance(m, Caption | Embedding)]
    assert len(kinds) == len(published)
    assert kinds == [(kind, seq) for seq in (0, 1, 3, 5, 7, 8)
                     for kind in ("Caption", "Embedding")]
    # The model ran on the inference thread, never on the event loop's.
    assert len(captioner.threads) == 1
    assert next(iter(captioner.threads)).startswith(THREAD_NAME_PREFIX)
    assert worker.processed == 6
    text = metrics.render()
    assert sample_value(text, "streamcap_captions_total", source="s") == 6
    assert sample_value(text, "streamcap_lag_seconds", source="s") == 0.0
    assert sample_value(text, "streamcap_inference_seconds_count", stage="total") == 6
    assert sample_value(text, "streamcap_inference_seconds_count", stage="fake") == 6


async def test_a_failing_window_is_counted_and_the_worker_goes_on(
        runtime: InferenceRuntime) -> None:
    captioner = HeldCaptioner(fail_seqs=frozenset({1}))
    metrics = Metrics()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = InferenceWorker(captioner, q, published.append, runtime.run, metrics,
                             clock=FakeClock(T0))
    for seq in range(3):
        q.offer(window(seq))
    q.close()
    captioner.permits.release(3)
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert [c.seq for c in captions_of(published)] == [0, 2]
    assert (worker.processed, worker.failed) == (2, 1)
    assert sample_value(metrics.render(), "streamcap_inference_failures_total", source="s") == 1


def batch_worker(captioner: HeldCaptioner, q: WindowQueue, runtime: InferenceRuntime,
                 published: list[Published], metrics: Metrics, *, batch_max: int,
                 batch_wait_s: float = 0.0) -> InferenceWorker:
    return InferenceWorker(captioner, q, published.append, runtime.run, metrics,
                           clock=FakeClock(arrival(10)), batch_max=batch_max,
                           batch_wait_s=batch_wait_s)


def test_the_worker_refuses_a_batch_max_below_one(runtime: InferenceRuntime) -> None:
    with pytest.raises(ValueError, match="batch_max must be >= 1"):
        InferenceWorker(HeldCaptioner(), WindowQueue(1), print, runtime.run, Metrics(),
                        batch_max=0)
    with pytest.raises(ValueError, match="batch_wait_s must be >= 0"):
        InferenceWorker(HeldCaptioner(), WindowQueue(1), print, runtime.run, Metrics(),
                        batch_wait_s=-1.0)


async def test_windows_of_three_sources_waiting_go_in_one_batch(
        runtime: InferenceRuntime) -> None:
    captioner = HeldCaptioner()
    metrics = Metrics()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, metrics, batch_max=8)
    for source in ("a", "b", "c"):
        q.offer(window(0, source))
    q.close()
    captioner.permits.release(1)
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert captioner.calls == [[("a", 0), ("b", 0), ("c", 0)]]
    captions = captions_of(published)
    assert [c.source_id for c in captions] == ["a", "b", "c"]  # in batch order
    # each window: the batch's wall time, its own lag (all three ended at the same time)
    assert len({c.latency_ms for c in captions}) == 1
    assert [c.lag_s for c in captions] == [HOP_S * 10] * 3
    kinds = [(type(m).__name__, m.source_id) for m in published
             if isinstance(m, Caption | Embedding)]
    assert kinds == [(k, s) for s in "abc" for k in ("Caption", "Embedding")]
    assert (worker.processed, worker.batches, worker.in_flight) == (3, 1, ())
    text = metrics.render()
    # stage seconds once per batch, not once per window
    assert sample_value(text, "streamcap_inference_seconds_count", stage="total") == 1
    assert sample_value(text, "streamcap_inference_seconds_count", stage="fake") == 1
    assert sample_value(text, "streamcap_inference_batch_size_count") == 1
    assert sample_value(text, "streamcap_inference_batch_size_sum") == 3
    for source in "abc":
        assert sample_value(text, "streamcap_captions_total", source=source) == 1


async def test_batch_max_splits_the_waiting_windows(runtime: InferenceRuntime) -> None:
    captioner = HeldCaptioner()
    metrics = Metrics()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, metrics, batch_max=2)
    for source in ("a", "b", "c"):
        q.offer(window(0, source))
    q.close()
    captioner.permits.release(2)
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert captioner.calls == [[("a", 0), ("b", 0)], [("c", 0)]]
    assert [c.source_id for c in captions_of(published)] == ["a", "b", "c"]
    text = metrics.render()
    assert sample_value(text, "streamcap_inference_batch_size_count") == 2
    assert sample_value(text, "streamcap_inference_batch_size_sum") == 3
    assert sample_value(text, "streamcap_inference_seconds_count", stage="total") == 2


async def test_a_chatty_source_gets_one_window_per_batch_and_starves_no_one(
        runtime: InferenceRuntime) -> None:
    """"a" has four windows waiting, "b" and "c" one each: a batch never holds two windows
    of one source, and the quiet sources are served in their turn, not after a's backlog."""
    captioner = HeldCaptioner()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=2)
    for seq in range(4):
        q.offer(window(seq, "a"))
    q.offer(window(0, "b"))
    q.offer(window(0, "c"))
    q.close()
    captioner.permits.release(4)
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert captioner.calls == [[("a", 0), ("b", 0)], [("c", 0), ("a", 1)], [("a", 2)],
                               [("a", 3)]]
    assert worker.processed == 6


async def test_a_chatty_source_never_fills_a_batch_with_itself(
        runtime: InferenceRuntime) -> None:
    """Three sources, one of them with three windows per batch, over many batches: each
    batch holds each source at most once, the quiet sources lose nothing, and the chatty
    one's excess is dropped from its own queue only."""
    captioner = HeldCaptioner()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=8)
    task = asyncio.create_task(worker.run())
    offered = {"chatty": 0, "b": 0, "c": 0}

    def offer(source: str) -> None:
        q.offer(window(offered[source], source))
        offered[source] += 1

    for rounds in range(6):
        for _ in range(3):
            offer("chatty")
        if rounds % 2 == 0:
            offer("b")
        if rounds % 3 == 0:
            offer("c")
        captioner.permits.release()
        await captioner.next_call()
    q.close()
    captioner.permits.release(100)
    await asyncio.wait_for(task, WAIT_S)
    for call in captioner.calls:
        sources = [source for source, _ in call]
        assert len(sources) == len(set(sources)), call
    assert worker.failed == 0
    # the quiet sources lose nothing to the chatty one: all their windows are captioned
    for source in ("b", "c"):
        seqs = [c.seq for c in captions_of(published) if c.source_id == source]
        assert seqs == list(range(offered[source])), source
    # the chatty one outruns one window per batch: its own oldest windows are dropped
    chatty = [c.seq for c in captions_of(published) if c.source_id == "chatty"]
    assert chatty == sorted(set(chatty))
    assert len(chatty) + q.dropped_by_source.get("chatty", 0) == offered["chatty"]
    assert q.dropped == q.dropped_by_source.get("chatty", 0)


async def test_a_window_arriving_during_batch_wait_joins_the_batch(
        runtime: InferenceRuntime) -> None:
    """The worker took a's window and waits (far longer than this test lasts) for other
    sources: a window of a's own does not join, b's does and fills the batch."""
    captioner = HeldCaptioner()
    depths: list[int] = []
    published: list[Published] = []
    q = WindowQueue(4, on_depth=depths.append)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=2,
                          batch_wait_s=10 * WAIT_S)
    task = asyncio.create_task(worker.run())
    q.offer(window(0, "a"))
    await wait_until(lambda: depths[-1] == 0, "the worker taking a's window")
    assert [(w.source_id, w.seq) for w in worker.in_flight] == [("a", 0)]
    q.offer(window(1, "a"))  # the same source: it waits for the next batch
    await asyncio.sleep(0)
    q.offer(window(0, "b"))
    assert await captioner.next_call() == [("a", 0), ("b", 0)]
    captioner.permits.release()
    await wait_until(count_is(published, 2), "the batch's captions")
    q.close()  # the next batch (a's second window alone) is not kept waiting by the wait
    assert await captioner.next_call() == [("a", 1)]
    captioner.permits.release()
    await asyncio.wait_for(task, WAIT_S)
    assert [(c.source_id, c.seq) for c in captions_of(published)] == [("a", 0), ("b", 0),
                                                                       ("a", 1)]


async def test_without_batch_wait_a_late_window_goes_in_the_next_batch(
        runtime: InferenceRuntime) -> None:
    captioner = HeldCaptioner()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=2)
    task = asyncio.create_task(worker.run())
    q.offer(window(0, "a"))
    assert await captioner.next_call() == [("a", 0)]  # only what waited already
    q.offer(window(0, "b"))
    captioner.permits.release(2)
    assert await captioner.next_call() == [("b", 0)]
    q.close()
    await asyncio.wait_for(task, WAIT_S)
    assert worker.processed == 2


async def test_a_raising_batch_is_retried_window_by_window(runtime: InferenceRuntime) -> None:
    """b's window breaks the batch: a's and c's are captioned alone and published; only
    b's is lost, and it is counted once."""
    captioner = HeldCaptioner(fail_windows=frozenset({("b", 0)}))
    metrics = Metrics()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, metrics, batch_max=8)
    for source in ("a", "b", "c"):
        q.offer(window(0, source))
    q.close()
    captioner.permits.release(4)
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert captioner.calls == [[("a", 0), ("b", 0), ("c", 0)], [("a", 0)], [("b", 0)],
                               [("c", 0)]]
    assert [c.source_id for c in captions_of(published)] == ["a", "c"]
    assert (worker.processed, worker.failed) == (2, 1)
    text = metrics.render()
    assert sample_value(text, "streamcap_inference_failures_total", source="b") == 1
    assert sample_value(text, "streamcap_inference_failures_total", 0.0, source="a") == 0
    assert sample_value(text, "streamcap_inference_failures_total", 0.0, source="c") == 0
    # the failed batch call is not observed; the two retries that succeeded are
    assert sample_value(text, "streamcap_inference_batch_size_count") == 2


async def test_a_batch_that_always_fails_halves_the_batch_size_for_a_while(
        runtime: InferenceRuntime) -> None:
    """A captioner that runs out of memory above two windows: each failed batch halves
    the batch size (counted), so the retries stop doubling the work; after BATCH_RECOVERY
    successful batches the worker tries batch_max again."""

    class OutOfMemoryAbove2(HeldCaptioner):
        def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
            results = super().caption_batch(windows)
            if len(windows) > 2:
                raise MemoryError(f"out of memory for {len(windows)} windows")
            return results

    captioner = OutOfMemoryAbove2()
    metrics = Metrics()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, metrics, batch_max=8)
    captioner.permits.release(1000)
    sources = "abcdefgh"

    async def hop(seq: int) -> list[int]:
        """One window of every source; the sizes of the calls that captioned them."""
        before = len(captioner.calls)
        for source in sources:
            q.offer(window(seq, source))
        while len(q):
            await asyncio.wait_for(worker.process_batch(await worker.gather()), WAIT_S)
        return [len(call) for call in captioner.calls[before:]]

    def batch_failures() -> float:
        return sample_value(metrics.render(), "streamcap_inference_batch_failures_total")

    assert await hop(0) == [8] + [1] * 8  # failed, each window alone
    assert (worker.batch_limit, batch_failures()) == (4, 1)
    assert await hop(1) == [4, 1, 1, 1, 1, 2, 2]  # failed again at 4; 2 works
    assert (worker.batch_limit, batch_failures()) == (2, 2)
    assert await hop(2) == [2, 2, 2, 2]  # 6 successful batches at 2
    assert await hop(3) == [2, 2, 2, 2]  # the 10th restores batch_max
    assert BATCH_RECOVERY == 10 and worker.batch_limit == 8
    assert await hop(4) == [8] + [1] * 8  # tried again, halved again
    assert (worker.batch_limit, batch_failures()) == (4, 3)
    assert worker.failed == 0 and worker.processed == 5 * len(sources)
    assert len(captions_of(published)) == 5 * len(sources)


async def test_the_batch_in_flight_is_every_window_not_yet_published(
        runtime: InferenceRuntime) -> None:
    """What the daemon counts as lost when it cancels the worker on shutdown."""
    captioner = HeldCaptioner()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=8)
    task = asyncio.create_task(worker.run())
    q.offer(window(0, "a"))
    q.offer(window(0, "b"))
    assert await captioner.next_call() == [("a", 0), ("b", 0)]
    assert [(w.source_id, w.seq) for w in worker.in_flight] == [("a", 0), ("b", 0)]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(worker.in_flight) == 2  # left for the daemon's accounting
    captioner.permits.release()
    assert captions_of(published) == []


async def test_skipped_windows_of_a_batch_are_counted_and_the_rest_published(
        runtime: InferenceRuntime) -> None:
    class SkipsB(HeldCaptioner):
        def caption_batch(  # type: ignore[override]
                self, windows: Sequence[Window]) -> list[CaptionResult | SkippedWindow]:
            return [SkippedWindow(window_id=w.window_id, source_id=w.source_id, reason="speech")
                    if w.source_id == "b" else r
                    for w, r in zip(windows, super().caption_batch(windows), strict=True)]

    captioner = SkipsB()
    metrics = Metrics()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, metrics, batch_max=8)
    for source in ("a", "b", "c"):
        q.offer(window(0, source))
    q.close()
    captioner.permits.release()
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert [c.source_id for c in captions_of(published)] == ["a", "c"]
    assert (worker.processed, worker.skipped, worker.failed) == (2, 1, 0)
    assert sample_value(metrics.render(), "streamcap_windows_skipped_total", source="b",
                        reason="speech") == 1


async def test_a_captioner_answering_out_of_order_is_retried_window_by_window(
        runtime: InferenceRuntime) -> None:
    class Reversed(HeldCaptioner):
        def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
            return list(reversed(super().caption_batch(windows)))

    captioner = Reversed()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=8)
    windows = [window(0, "a"), window(0, "b")]
    for win in windows:
        q.offer(win)
    q.close()
    captioner.permits.release(3)
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert captioner.calls == [[("a", 0), ("b", 0)], [("a", 0)], [("b", 0)]]
    assert [c.window_id for c in captions_of(published)] == [w.window_id for w in windows]
    assert worker.failed == 0



async def test_finish_by_starts_no_batch_expected_to_end_after_the_deadline(
        runtime: InferenceRuntime) -> None:
    """The shutdown drain: a batch is started only if the last batch's time still fits."""
    captioner = HeldCaptioner()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=8)
    for source in ("a", "b"):
        q.offer(window(0, source))
    captioner.permits.release()
    await asyncio.wait_for(worker.process_batch([w for w in (q.take(), q.take()) if w]), WAIT_S)
    assert worker.processed == 2 and worker.last_latency_s > 0
    for source in ("a", "b"):
        q.offer(window(1, source))
    q.close()
    worker.finish_by(time.monotonic() + worker.last_latency_s / 2)  # no time for a batch
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert len(captioner.calls) == 1 and len(q) == 2 and worker.in_flight == ()
    worker.finish_by(time.monotonic() + 10 * WAIT_S)
    captioner.permits.release()
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert captioner.calls[1] == [("a", 1), ("b", 1)] and len(q) == 0


async def test_finish_by_scales_the_time_per_window_by_the_next_batch(
        runtime: InferenceRuntime) -> None:
    """The last call may have held one window (a solo retry, a quiet moment): the drain
    estimate is seconds per window times the windows the next batch will hold."""
    captioner = HeldCaptioner()
    published: list[Published] = []
    q = WindowQueue(4)
    worker = batch_worker(captioner, q, runtime, published, Metrics(), batch_max=8)
    captioner.permits.release()
    await asyncio.wait_for(worker.process_batch([window(0, "a")]), WAIT_S)
    assert worker.per_window_s == worker.last_latency_s > 0  # a call of one window
    worker.per_window_s = 10.0  # a known time per window (the fake takes none)
    for source in "abcd":
        q.offer(window(1, source))
    assert worker.expected_batch() == 4
    worker.finish_by(time.monotonic() + 25.0)  # two windows' time, not four
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert len(captioner.calls) == 1 and len(q) == 4
    q.take()
    q.take()
    q.close()
    assert worker.expected_batch() == 2  # now it fits
    captioner.permits.release()
    await asyncio.wait_for(worker.run(), WAIT_S)
    assert captioner.calls[1:] == [[("c", 1), ("d", 1)]] and len(q) == 0
    assert worker.per_window_s == pytest.approx(worker.last_latency_s / 2)


# --------------------------------------------------------------------------- through the Daemon


class SleepyCaptioner:
    """A deliberately slow captioner: every window takes ``seconds`` of sleep."""

    model_id = "sleepy"
    sample_rates_hz = (RATE,)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
        time.sleep(self.seconds * len(windows))
        return [result_for(w) for w in windows]

    def caption(self, win: Window) -> CaptionResult:
        return self.caption_batch([win])[0]


class Recorder:
    """An in-process sink that keeps every message."""

    accepts = frozenset({"caption", "embedding", "status"})

    def __init__(self) -> None:
        self.got: list[Published] = []

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        ctx.ready()
        async for msg in inbox:
            self.got.append(msg)


@pytest.fixture
def wav(tmp_path: Path) -> Iterator[Path]:
    t = np.arange(12 * RATE) / RATE
    noise = np.random.default_rng(0).normal(0.0, 0.05, t.size)
    path = tmp_path / "tone.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32), RATE)
    yield path


async def test_daemon_counts_dropped_windows_when_the_captioner_is_slow(
        tmp_path: Path, wav: Path, runtime: InferenceRuntime,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file read faster than real time into a captioner that sleeps: windows are dropped,
    counted in streamcap_windows_dropped_total, and every window is accounted for."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    config = parse_config({
        "daemon": {"node_id": "slow", "max_pending_windows": 2, "state_dir": str(tmp_path)},
        "sources": {"tone": {"uri": f"file:{wav}?loop=true", "window_s": 10, "hop_s": 5,
                             "realtime": False}},
        "http": {"enabled": False},
    })
    recorder = Recorder()
    daemon = Daemon(config, lambda: SleepyCaptioner(0.3), runtime=runtime,
                    extra_sinks={"rec": recorder})
    run = asyncio.create_task(daemon.run())

    def enough() -> bool:
        if run.done():
            raise AssertionError(f"the daemon stopped early: {run.result()}")
        return len(captions_of(recorder.got)) >= 4 and daemon.queue.dropped >= 3

    await wait_until(enough, "captions and dropped windows")
    daemon.request_stop()
    assert await asyncio.wait_for(run, WAIT_S) == 0

    captions = captions_of(recorder.got)
    seqs = [c.seq for c in captions]
    assert seqs == sorted(set(seqs)), "captions out of order or repeated"
    assert any(b - a > 1 for a, b in itertools.pairwise(seqs)), seqs
    text = daemon.metrics.render()
    dropped = sample_value(text, "streamcap_windows_dropped_total", source="tone",
                           reason="queue_full")
    assert dropped == daemon.queue.dropped >= 3
    # drain_on_stop: what was queued at the stop was captioned, so every window is either
    # a caption or a counted drop.
    windows = sample_value(text, "streamcap_windows_total", source="tone")
    assert windows == len(captions) + dropped
    assert sample_value(text, "streamcap_windows_dropped_total", 0.0, source="tone",
                        reason="shutdown") == 0
    assert sample_value(text, "streamcap_captions_total", source="tone") == len(captions)
    # the queue was drained: its depth gauge must say so, not the depth at the last offer
    assert len(daemon.queue) == 0
    assert sample_value(text, "streamcap_window_queue_depth") == 0
    # The embedding of every captioned window was published too.
    embedded = [m.window_id for m in recorder.got if isinstance(m, Embedding)]
    assert embedded == [c.window_id for c in captions]
    states = [m.state.value for m in recorder.got if not isinstance(m, Caption | Embedding)]
    assert states[0] in ("starting", "running") and states[-1] == "stopped"


def write_tone(path: Path, frequency_hz: float, seconds: float = 12.0) -> Path:
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(int(frequency_hz)).normal(0.0, 0.05, t.size)
    sf.write(path, (0.3 * np.sin(2 * np.pi * frequency_hz * t) + noise).astype(np.float32), RATE)
    return path


async def test_daemon_captions_every_source_when_inference_falls_behind(
        tmp_path: Path, runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three looped files in real time, a new window of each every 0.5 s, and a captioner
    that takes 0.5 s per window: two windows in three must go. Every source still gets its
    turn, drops are counted per source, and every window is accounted for."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    names = ("first", "second", "third")
    sources = {name: {"uri": f"file:{write_tone(tmp_path / f'{name}.wav', 300 + 200 * i)}"
                             "?loop=true",
                      "window_s": 10, "hop_s": 0.5}
               for i, name in enumerate(names)}
    config = parse_config({
        "daemon": {"node_id": "fair", "max_pending_windows": 2, "state_dir": str(tmp_path)},
        "sources": sources,
        "http": {"enabled": False},
    })
    recorder = Recorder()
    daemon = Daemon(config, lambda: SleepyCaptioner(0.5), runtime=runtime,
                    extra_sinks={"rec": recorder})
    run = asyncio.create_task(daemon.run())

    def per_source() -> dict[str, int]:
        captions = captions_of(recorder.got)
        return {name: sum(c.source_id == name for c in captions) for name in names}

    def enough() -> bool:
        if run.done():
            raise AssertionError(f"the daemon stopped early: {run.result()}")
        return len(captions_of(recorder.got)) >= 24

    try:
        await wait_until(enough, "24 captions")
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(run, WAIT_S) == 0
    counts = per_source()
    assert daemon.queue.dropped > 0, "the captioner was meant to fall behind"
    # round-robin: with three sources always waiting, each gets every third caption
    assert min(counts.values()) >= 6, counts
    text = daemon.metrics.render()
    for name in names:
        seqs = [c.seq for c in captions_of(recorder.got) if c.source_id == name]
        assert seqs == sorted(set(seqs)), f"{name}: captions out of order or repeated"
        windows = sample_value(text, "streamcap_windows_total", source=name)
        full = sample_value(text, "streamcap_windows_dropped_total", source=name,
                            reason="queue_full")
        shutdown = sample_value(text, "streamcap_windows_dropped_total", 0.0, source=name,
                                reason="shutdown")
        assert full == daemon.queue.dropped_by_source.get(name, 0)
        assert windows == counts[name] + full + shutdown, name
    assert sample_value(text, "streamcap_window_queue_depth") == len(daemon.queue) == 0
