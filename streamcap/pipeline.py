"""From windows to published messages: a bounded window queue and one inference worker.

Capture never waits for inference. Windows wait in a :class:`WindowQueue`
(bounded; when inference falls behind, the *oldest* window is dropped and
counted, so captions stay current), and a single worker hands each window to
the captioner on the inference thread (never on the event loop), then
publishes the caption and the retriever's audio embedding.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from streamcap.messages import CaptionResult, Published, Window
from streamcap.stats import Metrics

_LOGGER = logging.getLogger(__name__)


class WindowCaptioner(Protocol):
    """Anything that turns a window into a caption; runs on the inference thread."""

    @property
    def model_id(self) -> str: ...

    @property
    def sample_rates_hz(self) -> tuple[int, ...]: ...

    def caption(self, window: Window) -> CaptionResult: ...


class WindowQueue:
    """A bounded FIFO of windows whose drop policy is *drop the oldest*.

    ``offer`` never blocks: capture must not wait for inference. Every drop is
    counted (``dropped``) and reported through ``on_drop``; every change of the
    number of waiting windows is reported through ``on_depth``.
    """

    def __init__(self, max_windows: int,
                 on_drop: Callable[[Window], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 (got {max_windows})")
        self.max_windows = max_windows
        self._items: collections.deque[Window] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._on_drop = on_drop
        self._on_depth = on_depth
        self.dropped = 0

    def _depth_changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, window: Window) -> None:
        if self._closed:
            raise RuntimeError("window queue is closed")
        if len(self._items) >= self.max_windows:
            old = self._items.popleft()
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(old)
        self._items.append(window)
        self._depth_changed()
        self._ready.set()

    def close(self, *, drop_pending: bool = False) -> list[Window]:
        """Stop accepting windows; returns the windows discarded when ``drop_pending``."""
        self._closed = True
        discarded: list[Window] = []
        if drop_pending:
            discarded = list(self._items)
            self._items.clear()
            self._depth_changed()
        self._ready.set()
        return discarded

    async def get(self) -> Window | None:
        """The next window, or None once the queue is closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        window = self._items.popleft()
        self._depth_changed()
        return window


class InferenceWorker:
    """Caption windows one at a time, in order, and publish the results.

    Args:
        captioner: runs on the inference thread through ``run_blocking``.
        queue: where windows wait.
        publish: the bus's non-blocking publish.
        run_blocking: ``InferenceRuntime.run``: calls a function on the single
            inference thread and awaits its result.
        metrics: where inference time, lag and failures are counted.
        clock: wall clock, for lag.
    """

    def __init__(
        self,
        captioner: WindowCaptioner,
        queue: WindowQueue,
        publish: Callable[[Published], None],
        run_blocking: Callable[[Callable[[Window], CaptionResult], Window],
                               Awaitable[CaptionResult]],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._captioner = captioner
        self._queue = queue
        self._publish = publish
        self._run = run_blocking
        self._clock = clock
        self.processed = 0
        self.failed = 0
        self.last_lag_s = 0.0
        self.last_latency_s = 0.0
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

    async def run(self) -> None:
        """Consume the queue until it is closed and drained."""
        while (window := await self._queue.get()) is not None:
            await self.process(window)

    async def process(self, window: Window) -> None:
        started = time.monotonic()
        try:
            result = await self._run(self._captioner.caption, window)
        except Exception:
            self.failed += 1
            self._failures.inc(1, window.source_id)
            _LOGGER.exception("captioning window %s failed", window.window_id)
            return
        latency_s = time.monotonic() - started
        now = self._clock()
        lag_s = max(0.0, now - (window.captured_at + window.duration_s))
        caption = dataclasses.replace(
            result.caption, latency_ms=round(latency_s * 1000, 1), lag_s=round(lag_s, 3))
        self._publish(caption)
        _LOGGER.info("caption %s [%s]: %s (score %.3f, %.0f ms, lag %.2f s)",
                     caption.window_id, caption.source_id, caption.text[:200], caption.score,
                     caption.latency_ms, caption.lag_s)
        if result.embedding is not None:
            self._publish(result.embedding)
        self.processed += 1
        self.last_lag_s = lag_s
        self.last_latency_s = latency_s
        self._seconds.observe(latency_s, "total")
        for stage, seconds in result.stage_seconds.items():
            self._seconds.observe(seconds, stage)
        self._lag.set(lag_s, window.source_id)
        self._captions.inc(1, window.source_id)
