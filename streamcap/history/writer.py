"""The history writer: records go into a bounded queue and one thread writes them.

:meth:`HistoryRecorder.record` never blocks (the event loop and the inference path
call it): it appends to a bounded queue, the oldest record being dropped and counted
when it is full. The thread ``streamcap-history`` owns the store's write handle; it
writes what is waiting in batches (one transaction each), retries a failed batch once,
then writes its records one at a time, dropping (counted, logged at most once a minute:
no unbounded retry loop) only those that fail alone,
and applies the retention limits every ``retention_interval_s``. A write failure never
reaches the caller and never stops the thread.

A vector index attached with :meth:`HistoryRecorder.attach_index` is kept up by the same
thread: one bounded :meth:`IndexUpkeep.step` whenever no record waits (catch-up with the
store, the graph grown, a save now and then), :meth:`IndexUpkeep.forget_before` after
retention deleted records, and :meth:`IndexUpkeep.close` (a save) before the store closes.
An index failure is logged and counted like a write failure; writing goes on.

Metrics: ``streamcap_history_writes_total`` (records written),
``streamcap_history_write_failures_total`` (failed transactions),
``streamcap_history_dropped_total{reason}`` (queue_full, write_failed, shutdown),
``streamcap_history_queue_depth``, ``streamcap_history_bytes``,
``streamcap_history_windows``, ``streamcap_history_events`` and
``streamcap_history_retention_deleted_total``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final, Protocol

from streamcap.errors import HistoryError
from streamcap.history.records import HistoryItem, to_message
from streamcap.history.store import HistoryStore
from streamcap.logs import Throttle, get_logger
from streamcap.messages import Published, TriggerEvent
from streamcap.stats import Metrics

_log = get_logger(__name__)

THREAD_NAME: Final = "streamcap-history"
MAX_BATCH: Final = 256
"""Records written in one transaction at most."""
RETRY_PAUSE_S: Final = 0.5
"""Pause before the one retry of a failed batch."""
STATS_INTERVAL_S: Final = 5.0
"""Least time between two refreshes of the size gauges (they count rows)."""
FAILURE_LOG_INTERVAL_S: Final = 60.0
MAX_FAILED_IN_A_ROW: Final = 4
"""Records of a failed batch written alone that fail one after the other before the rest
of the batch is dropped (the store fails, not a record: a locked store would cost up to
the busy timeout per record)."""
DROP_REASONS: Final = ("queue_full", "write_failed", "shutdown")


class IndexUpkeep(Protocol):
    """What the writer thread does for a vector index
    (:class:`streamcap.history.vectors.HistoryVectorIndex`)."""

    def step(self, store: Any) -> bool:
        """Bounded idle work against the store; True while there is more."""
        ...

    def forget_before(self, at: float | None) -> int:
        """Retention kept nothing older than ``at`` (None: nothing at all)."""
        ...

    def close(self) -> None:
        """Save what is unsaved."""
        ...


class HistoryRecorder:
    """Writes history records off the caller's thread, never blocking it.

    Args:
        store: the write handle; the recorder's thread owns it from :meth:`start`
            and closes it in :meth:`close`.
        metrics: where writes, failures, drops and sizes are counted.
        queue_size: records waiting at most; the oldest is dropped beyond.
        retention_interval_s: how often ``store.enforce_retention`` runs (first at start).
        wall: the wall clock retention compares with (UNIX seconds).
    """

    def __init__(self, store: HistoryStore, *, metrics: Metrics, queue_size: int = 1000,
                 retention_interval_s: float = 60.0,
                 wall: Callable[[], float] = time.time) -> None:
        if queue_size < 1 or not retention_interval_s > 0:
            raise ValueError(f"HistoryRecorder: queue_size must be >= 1 and "
                             f"retention_interval_s > 0 (got {queue_size}, "
                             f"{retention_interval_s})")
        self.store = store
        self._queue: deque[HistoryItem] = deque()
        self._queue_size = queue_size
        self._retention_interval_s = retention_interval_s
        self._wall = wall
        self._cond = threading.Condition()
        self._closing = False
        self._closed = False
        self._gave_up = False  # a close timed out
        self._retaining = False  # a retention run is in progress (guarded by _cond)
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._index: IndexUpkeep | None = None
        self._index_more = False  # the index may have work (set by writes and attach)
        self._throttle = Throttle(FAILURE_LOG_INTERVAL_S)
        self.written = 0
        """Records written so far (committed)."""
        m = metrics
        self._writes = m.counter("streamcap_history_writes_total",
                                 "History records written (committed)")
        self._failures = m.counter("streamcap_history_write_failures_total",
                                   "History transactions that failed (writes and retention)")
        self._dropped = m.counter("streamcap_history_dropped_total",
                                  "History records never written, by reason", ["reason"])
        self._depth = m.gauge("streamcap_history_queue_depth",
                              "History records waiting to be written")
        self._bytes = m.gauge("streamcap_history_bytes",
                              "Bytes of the history store that max_bytes limits "
                              "(database pages in use, clips)")
        self._windows = m.gauge("streamcap_history_windows", "Windows in the history store")
        self._events = m.gauge("streamcap_history_events",
                               "Trigger events in the history store")
        self._deleted = m.counter("streamcap_history_retention_deleted_total",
                                  "History records deleted by the retention limits")
        for reason in DROP_REASONS:
            self._dropped.inc(0, reason)

    @property
    def location(self) -> str:
        return self.store.location

    # -- the callers' side -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def record(self, item: HistoryItem) -> None:
        """Queue ``item`` for writing; never blocks. Full: the oldest waiting is dropped."""
        with self._cond:
            if self._closing:
                self._dropped.inc(1, "shutdown")
                return
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self._dropped.inc(1, "queue_full")
                if (held := self._throttle.allow("queue_full")) is not None:
                    _log.warning("history writer is behind: dropped the oldest waiting record",
                                 queue_size=self._queue_size, suppressed=held)
            self._queue.append(item)
            self._depth.set(len(self._queue))
            self._cond.notify()

    def attach_index(self, index: IndexUpkeep) -> None:
        """Keep ``index`` up from now on, on the writer thread (see the module docstring)."""
        with self._cond:
            self._index = index
            self._index_more = True
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def reader(self) -> HistoryStore:
        """A new read handle on the store, for another thread (the caller closes it)."""
        return self.store.reader()

    def recent(self, limit: int, per_source: bool) -> list[Published]:
        """A backfill (``streamcap.bus.plugin.RecentHistory``): the newest captions with
        the events of their period, oldest first; empty when the store cannot be read."""
        try:
            handle = self.reader()
            try:
                items = handle.recent(limit, per_source=per_source)
            finally:
                handle.close()
        except HistoryError as exc:
            _log.error("cannot read the history for a backfill", error=str(exc))
            return []
        return [to_message(i) for i in items]

    def close(self, timeout_s: float) -> bool:
        """Write what is queued, then close the store; at most ``timeout_s``.

        Returns False when the thread was still busy at the end (it is a daemon thread:
        it does not keep the process alive; a transaction cut short is rolled back by
        SQLite on the next open).
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
            retaining = self._retaining
        if self._gave_up:  # a close timed out already: the thread is on its own
            return False
        if retaining:  # a retention run may take long: cut it short (it goes on next start)
            interrupt = getattr(self.store, "interrupt", None)
            if callable(interrupt):
                interrupt()
        if not self._thread.is_alive() and not self._closed:
            if self._thread.ident is None:  # never started
                self._close_store()
            return True
        self._thread.join(max(0.0, timeout_s))
        if self._thread.is_alive():
            with self._cond:
                left = len(self._queue)
                self._queue.clear()
            if left:
                self._dropped.inc(left, "shutdown")
            self._gave_up = True
            _log.error("history writer did not finish in time; records dropped",
                       dropped=left, timeout_s=round(timeout_s, 2))
            return False
        return True

    # -- the writer thread -----------------------------------------------------------

    def _close_store(self) -> None:
        self._closed = True
        with self._cond:
            index, self._index = self._index, None
        if index is not None:
            self._index_call("save the vector index", index.close)
        try:
            self.store.close()
        except Exception as exc:  # noqa: BLE001 - closing must not raise on shutdown
            _log.error("cannot close the history store", error=str(exc))

    def _run(self) -> None:
        next_retention = time.monotonic()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        wait_s = next_retention - time.monotonic()
                        if wait_s <= 0 or (self._index is not None and self._index_more):
                            break
                        self._cond.wait(wait_s)
                    batch = [self._queue.popleft()
                             for _ in range(min(MAX_BATCH, len(self._queue)))]
                    self._depth.set(len(self._queue))
                    closing = self._closing
                    index = self._index
                if batch:
                    self._write(batch)
                    self._index_more = True
                elif index is not None and self._index_more and not closing:
                    # idle: one bounded step (a record arriving waits for one step at most)
                    self._index_more = bool(self._index_call(
                        "update the vector index", partial(index.step, self.store)))
                if time.monotonic() >= next_retention and not closing:
                    self._retain()
                    next_retention = time.monotonic() + self._retention_interval_s
                if closing and not batch:
                    return
        finally:
            self._close_store()

    def _write(self, batch: Sequence[HistoryItem]) -> None:
        for attempt in (1, 2):
            try:
                self.store.write(batch)
            except HistoryError as exc:
                self._failures.inc()
                if (held := self._throttle.allow("write")) is not None:
                    _log.error("cannot write history" + ("; retrying once" if attempt == 1
                                                         else "; records dropped"),
                               error=str(exc), records=len(batch), suppressed=held)
                if attempt == 1:
                    with self._cond:
                        if not self._closing:
                            self._cond.wait(RETRY_PAUSE_S)
                    continue
                if len(batch) > 1:
                    self._write_one_by_one(batch)
                else:
                    self._dropped.inc(len(batch), "write_failed")
                return
            self.written += len(batch)
            self._writes.inc(len(batch))
            self._refresh_stats(force=False)
            return

    def _write_one_by_one(self, batch: Sequence[HistoryItem]) -> None:
        """A batch failed twice: its records one transaction each, so that one bad record
        cannot take the others with it (each that fails is dropped and counted)."""
        written = failed_in_a_row = 0
        for n, item in enumerate(batch):
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:  # the store fails, not a record
                self._dropped.inc(len(batch) - n, "write_failed")
                break
            try:
                self.store.write([item])
            except HistoryError as exc:
                failed_in_a_row += 1
                self._failures.inc()
                self._dropped.inc(1, "write_failed")
                if (held := self._throttle.allow("write_one")) is not None:
                    _log.error("cannot write a history record; dropped", error=str(exc),
                               record=_describe(item), suppressed=held)
                continue
            failed_in_a_row = 0
            written += 1
        if written:
            self.written += written
            self._writes.inc(written)
            self._refresh_stats(force=False)

    _stats_at = -float("inf")

    def _refresh_stats(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._stats_at < STATS_INTERVAL_S:
            return
        self._stats_at = now
        try:
            stats = self.store.stats()
        except HistoryError:
            return
        self._bytes.set(stats.bytes)
        self._windows.set(stats.windows)
        self._events.set(stats.events)

    def _retain(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._retaining = True
        try:
            deleted = self.store.enforce_retention(self._wall())
        except HistoryError as exc:
            with self._cond:
                closing = self._closing
            if closing:  # interrupted by close(): what it deleted so far is committed
                _log.info("history retention cut short by shutdown", error=str(exc))
                return
            self._failures.inc()
            if (held := self._throttle.allow("retention")) is not None:
                _log.error("cannot apply the history retention limits", error=str(exc),
                           suppressed=held)
            return
        finally:
            with self._cond:
                self._retaining = False
        if deleted:
            self._deleted.inc(deleted)
            _log.info("history retention deleted old records", deleted=deleted)
        self._refresh_stats(force=True)
        index = self._index
        if deleted and index is not None:
            try:
                oldest = self.store.stats().oldest_at
            except HistoryError:
                return
            self._index_call("drop deleted rows from the vector index",
                             lambda: index.forget_before(oldest))

    def _index_call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``; a failure is counted and logged (throttled), never raised."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the index is a cache: writing goes on
            self._failures.inc()
            if (held := self._throttle.allow("index")) is not None:
                _log.error(f"cannot {what}", error=str(exc), suppressed=held)
            return None


def _describe(item: HistoryItem) -> str:
    """A record's id, for a log line."""
    return item.event_id if isinstance(item, TriggerEvent) else item.window_id
