"""From windows to published messages: fair per-source window queues and one inference worker.

Capture never waits for inference. Windows wait in a :class:`WindowQueue`: a
small FIFO per source (bounded; when inference falls behind, that source's
*oldest* window is dropped and counted, so its captions stay current), served
round-robin across the sources that have windows waiting, so that no source
can starve another. A single worker takes a *batch*: the window whose turn it is,
then up to ``[model] batch_max`` windows in all of *other* sources that wait (at
most ``batch_wait_ms`` for more to arrive; never two windows of one source). It
hands the batch to the captioner on the inference thread (never on the event
loop) in one call, then publishes each window's caption and the retriever's
audio embedding, in batch order (docs/batching.md).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final, Protocol, TypeVar

from streamcap.clock import Clock, SystemClock
from streamcap.logs import get_logger
from streamcap.messages import Caption, CaptionResult, Embedding, Published, Window
from streamcap.queues import BoundedQueue, DropPolicy
from streamcap.stats import Metrics

_log = get_logger(__name__)

_A = TypeVar("_A")
_T = TypeVar("_T")

BATCH_SIZE_BUCKETS: Final = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
"""Buckets of ``streamcap_inference_batch_size`` (``[model] batch_max`` is at most 256)."""
BATCH_RECOVERY: Final = 10
"""Successful captioner calls after which a worker whose batch size a failed batch
halved goes back to ``batch_max``."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SkippedWindow:
    """A captioner's answer for a window it chose not to caption (the speech guard's
    ``[privacy] speech = "skip"``): nothing is published, stored or clipped for it; the
    worker counts it in ``streamcap_windows_skipped_total{source, reason}``."""

    window_id: str
    source_id: str
    reason: str  # a metric label: "speech"
    detail: str = ""  # for the debug log


class WindowCaptioner(Protocol):
    """Anything that turns a window into a caption; runs on the inference thread."""

    @property
    def model_id(self) -> str: ...

    @property
    def sample_rates_hz(self) -> tuple[int, ...]: ...

    def caption(self, window: Window) -> CaptionResult | SkippedWindow: ...

    def caption_batch(self, windows: Sequence[Window]
                      ) -> Sequence[CaptionResult | SkippedWindow]:
        """Caption windows of distinct sources together; one result per window, in order.

        Each result is what :meth:`caption` gives for that window alone (with a fixed
        decoding seed: the same texts, scores equal to float rounding). A batch holding two
        windows of one source is a ``ValueError``. Every result carries ``batch_size`` and
        the whole batch's ``stage_seconds``.
        """
        ...


class RoundRobinWindows:
    """Pure scheduling of waiting windows: a bounded FIFO per source, served in turn.

    Each source holds at most ``per_source`` windows in a
    :class:`~streamcap.queues.BoundedQueue` of its own; one more drops that
    source's oldest (``drop_oldest``, per source), never another source's. :meth:`pop` serves the sources that have windows waiting in
    turn (a source that gets a window while it had none joins the end of the
    line), the oldest window of a source first: with ``n`` busy sources each
    gets every ``n``-th caption, however their windows interleave.
    """

    def __init__(self, per_source: int) -> None:
        if per_source < 1:
            raise ValueError(f"per_source must be >= 1 (got {per_source})")
        self.per_source = per_source
        self._waiting: dict[str, BoundedQueue[Window]] = {}
        self._turns: collections.deque[str] = collections.deque()  # sources with windows, in turn
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def depth(self, source_id: str) -> int:
        """Windows of ``source_id`` waiting."""
        waiting = self._waiting.get(source_id)
        return len(waiting) if waiting else 0

    def offer(self, window: Window) -> Window | None:
        """Queue ``window``; returns the window dropped to make room for it, if any."""
        waiting = self._waiting.get(window.source_id)
        if waiting is None:
            waiting = self._waiting[window.source_id] = BoundedQueue(
                self.per_source, name="per_source")
        if not waiting:
            self._turns.append(window.source_id)  # its turn comes after those already waiting
        dropped = waiting.offer(window, policy=DropPolicy.DROP_OLDEST)
        if not dropped:
            self._size += 1
            return None
        return dropped[0].item

    def pop(self, exclude: Collection[str] = ()) -> Window | None:
        """The oldest window of the source whose turn it is, or None when none waits.

        Sources in ``exclude`` (those already in the batch being gathered) are passed
        over and keep their place in line: the first source in line that is not
        excluded is served (and goes to the end of the line if it has more waiting).
        """
        for position, source_id in enumerate(self._turns):
            if source_id not in exclude:
                del self._turns[position]
                break
        else:
            return None
        waiting = self._waiting[source_id]
        window = waiting.pop()
        assert window is not None  # a source is in line only while it has windows waiting
        if waiting:
            self._turns.append(source_id)
        self._size -= 1
        return window

    def clear(self) -> list[Window]:
        """Remove every waiting window; returns them in the order they would have been served."""
        out: list[Window] = []
        while (window := self.pop()) is not None:
            out.append(window)
        return out


class WindowQueue:
    """Where windows wait for the captioner: :class:`RoundRobinWindows` made awaitable.

    ``offer`` never blocks: capture must not wait for inference. Every drop is
    counted (``dropped`` in all, ``dropped_by_source``) and reported through
    ``on_drop``; every change of the number of waiting windows (all sources
    together) is reported through ``on_depth``.

    Args:
        per_source: Windows each source may have waiting (``[daemon]
            max_pending_windows``); at most ``per_source`` times the number of
            sources wait in all.
    """

    def __init__(self, per_source: int,
                 on_drop: Callable[[Window], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self._windows = RoundRobinWindows(per_source)
        self.per_source = per_source
        self._ready = asyncio.Event()
        self._closed = False
        self._on_drop = on_drop
        self._on_depth = on_depth
        self.dropped = 0
        self.dropped_by_source: dict[str, int] = {}

    def _depth_changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._windows))

    def __len__(self) -> int:
        return len(self._windows)

    def depth(self, source_id: str) -> int:
        """Windows of ``source_id`` waiting."""
        return self._windows.depth(source_id)

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, window: Window) -> None:
        if self._closed:
            raise RuntimeError("window queue is closed")
        old = self._windows.offer(window)
        if old is not None:
            self.dropped += 1
            self.dropped_by_source[old.source_id] = self.dropped_by_source.get(old.source_id, 0) + 1
            if self._on_drop is not None:
                self._on_drop(old)
        self._depth_changed()
        self._ready.set()

    def close(self, *, drop_pending: bool = False) -> list[Window]:
        """Stop accepting windows; returns the windows discarded when ``drop_pending``.

        Safe to call again (to discard what is still waiting after a drain).
        """
        self._closed = True
        discarded: list[Window] = []
        if drop_pending:
            discarded = self._windows.clear()
            if discarded:
                self._depth_changed()
        self._ready.set()
        return discarded

    async def get(self) -> Window | None:
        """The next window (see :class:`RoundRobinWindows`), or None once closed and empty."""
        while not self._windows:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        window = self._windows.pop()
        assert window is not None  # the loop above waited for one
        self._depth_changed()
        return window

    def take(self, exclude: Collection[str] = ()) -> Window | None:
        """The next window of a source not in ``exclude``, if one waits now (never waits).

        Served as :meth:`RoundRobinWindows.pop` serves; a batch gathers its windows with it.
        """
        window = self._windows.pop(exclude)
        if window is not None:
            self._depth_changed()
        return window

    async def wait_for_offer(self, timeout_s: float) -> bool:
        """Wait until the next :meth:`offer` or :meth:`close`, at most ``timeout_s``;
        False when the time ran out first (True at once when the queue is closed)."""
        if self._closed:
            return True
        self._ready.clear()
        try:
            await asyncio.wait_for(self._ready.wait(), max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True


class RunBlocking(Protocol):
    """``InferenceRuntime.run``: calls ``fn(arg)`` on the inference thread, awaits its result."""

    def __call__(self, fn: Callable[[_A], _T], arg: _A, /) -> Awaitable[_T]: ...


class InferenceWorker:
    """Caption windows in batches across sources, as the queue serves them, and publish them.

    A batch is the window whose turn it is (round robin, :class:`RoundRobinWindows`),
    then windows of *other* sources that wait, taken in their turn, up to
    ``batch_max`` windows in all; when fewer wait, the worker waits at most
    ``batch_wait_s`` for more to arrive (0: only what waits already). A batch never
    holds two windows of one source, so a chatty source gets one window per batch like
    any other. The batch goes to ``captioner.caption_batch`` in one call on the
    inference thread. Should that call raise, each of its windows is captioned alone,
    so that one bad window does not lose the others; each window that still fails is
    counted in ``streamcap_inference_failures_total``. A failed batch also halves the
    worker's batch size (:attr:`batch_limit`; counted in
    ``streamcap_inference_batch_failures_total`` and logged), so a batch that always fails
    (out of memory) does not cost every window twice for ever; after
    :data:`BATCH_RECOVERY` successful batches it is back to ``batch_max``. Results are published per
    window, in batch order, each with the batch's wall time as ``latency_ms`` and its
    own ``lag_s``.

    On shutdown, :meth:`finish_by` bounds the drain: the worker starts no batch it
    does not expect to finish by the deadline (expected: the last call's seconds per
    window, :attr:`per_window_s`, times the windows the next batch can hold), and
    returns, leaving the rest in the queue.

    Args:
        captioner: runs on the inference thread through ``run_blocking``.
        queue: where windows wait.
        publish: the bus's non-blocking publish.
        publish_result: publishes one window's caption and embedding together
            (the daemon's: history, triggers, then the bus); ``publish`` is then
            used for nothing else.
        run_blocking: ``InferenceRuntime.run``: calls a function on the single
            inference thread and awaits its result.
        metrics: where inference time, batch sizes, lag and failures are counted.
        clock: where the wall clock is read, for lag.
        batch_max: windows (of distinct sources) captioned together at most; 1 = one
            at a time (``[model] batch_max``).
        batch_wait_s: how long a batch that is not full waits for windows of other
            sources to join (``[model] batch_wait_ms`` / 1000).

    Raises:
        ValueError: ``batch_max`` below 1 or ``batch_wait_s`` below 0.
    """

    def __init__(
        self,
        captioner: WindowCaptioner,
        queue: WindowQueue,
        publish: Callable[[Published], None],
        run_blocking: RunBlocking,
        metrics: Metrics,
        clock: Clock | None = None,
        *,
        publish_result: Callable[[Caption, Embedding | None], None] | None = None,
        batch_max: int = 1,
        batch_wait_s: float = 0.0,
    ) -> None:
        if batch_max < 1:
            raise ValueError(f"batch_max must be >= 1 (got {batch_max})")
        if not batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s must be >= 0 (got {batch_wait_s})")
        self._captioner = captioner
        self._queue = queue
        self._publish = publish
        self._publish_result = publish_result
        self._run = run_blocking
        self._clock = clock or SystemClock()
        self.batch_max = batch_max
        self.batch_limit = batch_max
        """The largest batch the worker forms now: ``batch_max``, or less for a while after
        a batch failed."""
        self._good_calls = 0  # successful batches since the limit was last lowered
        self.batch_wait_s = batch_wait_s
        self.processed = 0
        self.failed = 0
        self.batches = 0
        self.last_lag_s = 0.0
        self.last_latency_s = 0.0
        """Wall time of the last captioner call (a whole batch)."""
        self.per_window_s = 0.0
        """Wall time per window of the last captioner call (its seconds / its windows)."""
        self.in_flight: tuple[Window, ...] = ()
        """The windows taken from the queue whose results are not published yet: the batch
        being gathered or captioned (lost if the worker is cancelled)."""
        self._deadline: float | None = None
        self._seconds = metrics.histogram(
            "streamcap_inference_seconds",
            "Compute time per captioner call (one batch of windows), by stage", ["stage"],
        )
        self._batch_size = metrics.histogram(
            "streamcap_inference_batch_size",
            "Windows (of distinct sources) per captioner call", buckets=BATCH_SIZE_BUCKETS,
        )
        self._lag = metrics.gauge(
            "streamcap_lag_seconds",
            "Publish time minus the end of the window, latest caption, by source", ["source"],
        )
        self._captions = metrics.counter(
            "streamcap_captions_total", "Captions published, by source", ["source"])
        self._failures = metrics.counter(
            "streamcap_inference_failures_total", "Windows whose captioning raised", ["source"])
        self._batch_failures = metrics.counter(
            "streamcap_inference_batch_failures_total",
            "Captioner calls of several windows that raised (the windows were retried one at "
            "a time and the batch size halved for a while)")
        self._skipped = metrics.counter(
            "streamcap_windows_skipped_total",
            "Windows the captioner chose not to caption, by source and reason",
            ["source", "reason"])
        self.skipped = 0

    def finish_by(self, deadline: float) -> None:
        """Start no batch that is not expected to finish by ``deadline`` (``time.monotonic``)."""
        self._deadline = deadline

    def _may_start(self) -> bool:
        if self._deadline is None:
            return True
        return time.monotonic() + self.per_window_s * self.expected_batch() < self._deadline

    def expected_batch(self) -> int:
        """Windows the next batch is expected to hold: those waiting, up to the batch limit
        (at least one)."""
        return max(1, min(self.batch_limit, len(self._queue)))

    async def run(self) -> None:
        """Consume the queue until it is closed and drained, or :meth:`finish_by` says stop."""
        while self._may_start() and (batch := await self.gather()):
            await self.process_batch(batch)

    async def gather(self) -> tuple[Window, ...]:
        """The next batch (see the class); empty once the queue is closed and drained.

        The windows taken are :attr:`in_flight` from the moment they leave the queue.
        """
        first = await self._queue.get()
        if first is None:
            return ()
        batch: tuple[Window, ...] = (first,)
        self.in_flight = batch
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_limit:
            more = self._queue.take(exclude={w.source_id for w in batch})
            if more is not None:
                batch = self.in_flight = (*batch, more)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._queue.closed:
                break
            await self._queue.wait_for_offer(remaining)
        return batch

    async def process_batch(self, batch: Sequence[Window]) -> None:
        """Caption ``batch`` (windows of distinct sources) in one call and publish each result."""
        windows = tuple(batch)
        if not windows:
            return
        started = time.monotonic()
        self.in_flight = windows  # stays set if this task is cancelled: those are lost
        try:
            results = await self._run(self._captioner.caption_batch, windows)
            _check_results(windows, results)
        except Exception as exc:  # noqa: BLE001 - each window is retried or counted
            if len(windows) == 1:
                self.in_flight = ()
                self._count_failure(windows[0])
                return
            self._batch_failed(len(windows))
            _log.warning("batch captioning failed; captioning its windows one at a time",
                         windows=[w.window_id for w in windows],
                         error=f"{type(exc).__name__}: {exc}", batch_limit=self.batch_limit)
            await self._one_at_a_time(windows, started)
            return
        self._batch_done()
        latency_s = time.monotonic() - started
        self._observe(latency_s, len(windows), results)
        for n, (window, result) in enumerate(zip(windows, results, strict=True)):
            self.in_flight = windows[n + 1:]
            self._deliver(window, result, latency_s, len(windows))

    async def _one_at_a_time(self, windows: tuple[Window, ...], started: float) -> None:
        """After a failed batch call: each window alone; a window that fails again is counted."""
        for n, window in enumerate(windows):
            self.in_flight = windows[n:]
            call_started = time.monotonic()
            try:
                results = await self._run(self._captioner.caption_batch, (window,))
                _check_results((window,), results)
            except Exception:  # noqa: BLE001 - logged with its traceback and counted; the rest go on
                self.in_flight = windows[n + 1:]
                self._count_failure(window)
                continue
            self.in_flight = windows[n + 1:]
            self._observe(time.monotonic() - call_started, 1, results)
            self._deliver(window, results[0], time.monotonic() - started, 1)

    def _batch_failed(self, size: int) -> None:
        """A call of ``size`` windows raised: halve the batch size for the next batches."""
        self._batch_failures.inc()
        self.batch_limit = max(1, min(self.batch_limit, size) // 2)
        self._good_calls = 0

    def _batch_done(self) -> None:
        """A batch call succeeded: after :data:`BATCH_RECOVERY` of them, back to ``batch_max``."""
        if self.batch_limit == self.batch_max:
            return
        self._good_calls += 1
        if self._good_calls >= BATCH_RECOVERY:
            self.batch_limit = self.batch_max
            _log.info("batch size restored", batch_limit=self.batch_limit,
                      after_batches=self._good_calls)

    def _count_failure(self, window: Window) -> None:
        self.failed += 1
        self._failures.inc(1, window.source_id)
        _log.exception("captioning failed", window_id=window.window_id,
                       source_id=window.source_id)

    def _observe(self, seconds: float, size: int,
                 results: Sequence[CaptionResult | SkippedWindow]) -> None:
        """One captioner call: its wall time, its size and its stages (the whole batch's)."""
        self.batches += 1
        self.last_latency_s = seconds
        self.per_window_s = seconds / size
        self._seconds.observe(seconds, "total")
        self._batch_size.observe(size)
        captioned = next((r for r in results if isinstance(r, CaptionResult)), None)
        if captioned is not None:
            for stage, stage_seconds in captioned.stage_seconds.items():
                self._seconds.observe(stage_seconds, stage)

    def _deliver(self, window: Window, result: CaptionResult | SkippedWindow,
                 latency_s: float, batch_size: int) -> None:
        """Publish one window's result (or count its skip); ``latency_s``: the wall time
        from the start of its batch to its result; ``batch_size``: the windows of the
        captioner call that gave it (logged)."""
        if isinstance(result, SkippedWindow):
            self.skipped += 1
            self._skipped.inc(1, result.source_id, result.reason)
            _log.debug("window not captioned", window_id=result.window_id,
                       source_id=result.source_id, reason=result.reason, detail=result.detail)
            return
        now = self._clock.wall()
        lag_s = max(0.0, now - (window.captured_at + window.duration_s))
        caption = dataclasses.replace(
            result.caption, latency_ms=round(latency_s * 1000, 1), lag_s=round(lag_s, 3))
        if self._publish_result is not None:
            self._publish_result(caption, result.embedding)
        else:
            self._publish(caption)
            if result.embedding is not None:
                self._publish(result.embedding)
        _log.info("caption", window_id=caption.window_id, source_id=caption.source_id,
                  text=caption.text[:200], score=round(caption.score, 3),
                  latency_ms=caption.latency_ms, lag_s=caption.lag_s, batch_size=batch_size)
        self.processed += 1
        self.last_lag_s = lag_s
        self._lag.set(lag_s, window.source_id)
        self._captions.inc(1, window.source_id)


def _check_results(windows: Sequence[Window],
                   results: Sequence[CaptionResult | SkippedWindow]) -> None:
    """A captioner's answer must be one result per window, in order.

    Raises:
        RuntimeError: it is not (a captioner bug; the batch is then retried window by window).
    """
    if len(results) != len(windows):
        raise RuntimeError(f"caption_batch returned {len(results)} results for "
                           f"{len(windows)} windows")
    for window, result in zip(windows, results, strict=True):
        got = result.window_id if isinstance(result, SkippedWindow) else result.caption.window_id
        if got != window.window_id:
            raise RuntimeError(f"caption_batch answered {got} in the place of {window.window_id}")
