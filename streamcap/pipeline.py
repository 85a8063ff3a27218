"""From windows to published messages: fair per-source window queues and one inference worker.

Capture never waits for inference. Windows wait in a :class:`WindowQueue`: a
small FIFO per source (bounded; when inference falls behind, that source's
*oldest* window is dropped and counted, so its captions stay current), served
round-robin across the sources that have windows waiting, so that no source
can starve another. A single worker hands each window to the captioner on the
inference thread (never on the event loop), then publishes the caption and the
retriever's audio embedding.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from streamcap.clock import Clock, SystemClock
from streamcap.logs import get_logger
from streamcap.messages import Caption, CaptionResult, Embedding, Published, Window
from streamcap.queues import BoundedQueue, DropPolicy
from streamcap.stats import Metrics

_log = get_logger(__name__)


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

    def pop(self) -> Window | None:
        """The oldest window of the source whose turn it is, or None when none waits."""
        if not self._turns:
            return None
        source_id = self._turns.popleft()
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


class InferenceWorker:
    """Caption windows one at a time, as the queue serves them, and publish the results.

    On shutdown, :meth:`finish_by` bounds the drain: the worker starts no
    window it does not expect to finish by the deadline (expected: as long as
    the last one took), and returns, leaving the rest in the queue.

    Args:
        captioner: runs on the inference thread through ``run_blocking``.
        queue: where windows wait.
        publish: the bus's non-blocking publish.
        publish_result: publishes one window's caption and embedding together
            (the daemon's: history, triggers, then the bus); ``publish`` is then
            used for nothing else.
        run_blocking: ``InferenceRuntime.run``: calls a function on the single
            inference thread and awaits its result.
        metrics: where inference time, lag and failures are counted.
        clock: where the wall clock is read, for lag.
    """

    def __init__(
        self,
        captioner: WindowCaptioner,
        queue: WindowQueue,
        publish: Callable[[Published], None],
        run_blocking: Callable[[Callable[[Window], CaptionResult | SkippedWindow], Window],
                               Awaitable[CaptionResult | SkippedWindow]],
        metrics: Metrics,
        clock: Clock | None = None,
        *,
        publish_result: Callable[[Caption, Embedding | None], None] | None = None,
    ) -> None:
        self._captioner = captioner
        self._queue = queue
        self._publish = publish
        self._publish_result = publish_result
        self._run = run_blocking
        self._clock = clock or SystemClock()
        self.processed = 0
        self.failed = 0
        self.last_lag_s = 0.0
        self.last_latency_s = 0.0
        self.in_flight: Window | None = None
        """The window being captioned now (its result is lost if the worker is cancelled)."""
        self._deadline: float | None = None
        self._seconds = metrics.histogram(
            "streamcap_inference_seconds", "Compute time per window, by stage", ["stage"],
        )
        self._lag = metrics.gauge(
            "streamcap_lag_seconds",
            "Publish time minus the end of the window, latest caption, by source", ["source"],
        )
        self._captions = metrics.counter(
            "streamcap_captions_total", "Captions published, by source", ["source"])
        self._failures = metrics.counter(
            "streamcap_inference_failures_total", "Windows whose captioning raised", ["source"])
        self._skipped = metrics.counter(
            "streamcap_windows_skipped_total",
            "Windows the captioner chose not to caption, by source and reason",
            ["source", "reason"])
        self.skipped = 0

    def finish_by(self, deadline: float) -> None:
        """Start no window that is not expected to finish by ``deadline`` (``time.monotonic``)."""
        self._deadline = deadline

    def _may_start(self) -> bool:
        return self._deadline is None or time.monotonic() + self.last_latency_s < self._deadline

    async def run(self) -> None:
        """Consume the queue until it is closed and drained, or :meth:`finish_by` says stop."""
        while self._may_start() and (window := await self._queue.get()) is not None:
            await self.process(window)

    async def process(self, window: Window) -> None:
        started = time.monotonic()
        self.in_flight = window
        try:
            result = await self._run(self._captioner.caption, window)
        except Exception:  # noqa: BLE001 - logged with its traceback and counted; the worker goes on
            self.in_flight = None
            self.failed += 1
            self._failures.inc(1, window.source_id)
            _log.exception("captioning failed", window_id=window.window_id,
                           source_id=window.source_id)
            return
        self.in_flight = None
        latency_s = time.monotonic() - started
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
                  latency_ms=caption.latency_ms, lag_s=caption.lag_s)
        self.processed += 1
        self.last_lag_s = lag_s
        self.last_latency_s = latency_s
        self._seconds.observe(latency_s, "total")
        for stage, seconds in result.stage_seconds.items():
            self._seconds.observe(seconds, stage)
        self._lag.set(lag_s, window.source_id)
        self._captions.inc(1, window.source_id)
