"""The history writer thread with a real SQLite store: batches, a bounded queue whose
drops are counted, failures counted without stopping the thread, retention, close."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_history_sqlite import T0, event, window
from timing import scaled

from streamcap.errors import HistoryError
from streamcap.history.records import HistoryItem, Span, WindowRecord
from streamcap.history.sqlite import SqliteHistory
from streamcap.history.writer import THREAD_NAME, HistoryRecorder
from streamcap.messages import Caption
from streamcap.stats import Metrics


def wait_until(check: object, timeout_s: float = scaled(30)) -> None:
    done = threading.Event()
    deadline = timeout_s
    step = 0.02
    while not check():  # type: ignore[operator]
        if deadline <= 0:
            raise AssertionError("condition not met in time")
        done.wait(step)
        deadline -= step


class Gate:
    """A real store whose writes wait until the gate opens, or fail while ``failing``."""

    def __init__(self, store: SqliteHistory) -> None:
        self.inner = store
        self.open = threading.Event()
        self.entered = threading.Event()
        self.failing = 0
        self.batches: list[int] = []

    @property
    def location(self) -> str:
        return self.inner.location

    def write(self, items: Sequence[HistoryItem]) -> None:
        self.entered.set()
        self.open.wait(scaled(60))
        if self.failing:
            self.failing -= 1
            raise HistoryError(f"history store {self.location}: cannot write (disk full)")
        self.batches.append(len(items))
        self.inner.write(items)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "history.sqlite3"


def test_records_are_written_in_batches_on_a_named_thread(path: Path) -> None:
    metrics = Metrics()
    gate = Gate(SqliteHistory(path))
    recorder = HistoryRecorder(gate, metrics=metrics, queue_size=1000)  # type: ignore[arg-type]
    recorder.start()
    assert THREAD_NAME in {t.name for t in threading.enumerate()}
    recorder.record(window(0))
    gate.entered.wait(scaled(30))
    for i in range(1, 300):  # queued while the first write waits
        recorder.record(window(i))
    recorder.record(event(0, at=T0 + 1))
    gate.open.set()
    assert recorder.close(scaled(30))
    assert gate.batches[0] == 1 and max(gate.batches) <= 256 and sum(gate.batches) == 301
    assert len(gate.batches) <= 3  # everything waiting went in at most two transactions
    reader = SqliteHistory(path, read_only=True)
    try:
        stats = reader.stats()
        assert (stats.windows, stats.events) == (300, 1)
    finally:
        reader.close()
    assert metrics.counter("streamcap_history_writes_total", "").value() == 301
    assert THREAD_NAME not in {t.name for t in threading.enumerate()}


def test_a_full_queue_drops_the_oldest_and_counts_it(path: Path) -> None:
    metrics = Metrics()
    gate = Gate(SqliteHistory(path))
    recorder = HistoryRecorder(gate, metrics=metrics, queue_size=10)  # type: ignore[arg-type]
    recorder.start()
    recorder.record(window(0))
    assert gate.entered.wait(scaled(30))
    for i in range(1, 26):
        recorder.record(window(i))  # never blocks though the writer is stuck
    assert recorder.pending() == 10
    dropped = metrics.counter("streamcap_history_dropped_total", "", ["reason"])
    assert dropped.value("queue_full") == 15
    gate.open.set()
    assert recorder.close(scaled(30))
    reader = SqliteHistory(path, read_only=True)
    try:
        kept = reader.page(Span(), cursor=None, limit=100).items
    finally:
        reader.close()
    # the first (being written) and the newest ten
    assert [i.seq for i in kept if isinstance(i, WindowRecord)] == [0, *range(16, 26)]


def test_a_failed_batch_is_retried_once_then_dropped_and_the_writer_goes_on(
        path: Path) -> None:
    metrics = Metrics()
    gate = Gate(SqliteHistory(path))
    gate.open.set()
    gate.failing = 1  # the retry succeeds
    recorder = HistoryRecorder(gate, metrics=metrics)  # type: ignore[arg-type]
    recorder.start()
    failures = metrics.counter("streamcap_history_write_failures_total", "")
    dropped = metrics.counter("streamcap_history_dropped_total", "", ["reason"])
    recorder.record(window(0))
    wait_until(lambda: recorder.written == 1)
    assert (failures.value(), dropped.value("write_failed")) == (1, 0)
    gate.failing = 2  # the batch (of one: nothing to split) and its retry fail: dropped
    recorder.record(window(1))
    wait_until(lambda: dropped.value("write_failed") == 1)
    assert failures.value() == 3
    recorder.record(window(2))  # the writer is still there
    wait_until(lambda: recorder.written == 2)
    assert recorder.close(scaled(30))
    reader = SqliteHistory(path, read_only=True)
    try:
        assert sorted(reader.windows(["kitchen-0", "kitchen-1", "kitchen-2"])) == [
            "kitchen-0", "kitchen-2"]
    finally:
        reader.close()


class Poisoned:
    """A real store that refuses every write holding one of the ``poison`` records."""

    def __init__(self, store: SqliteHistory, poison: set[str]) -> None:
        self.inner = store
        self.poison = poison
        self.open = threading.Event()
        self.calls: list[int] = []

    @property
    def location(self) -> str:
        return self.inner.location

    def write(self, items: Sequence[HistoryItem]) -> None:
        self.open.wait(scaled(60))
        self.calls.append(len(items))
        if any(isinstance(i, WindowRecord) and i.window_id in self.poison for i in items):
            raise HistoryError(f"history store {self.location}: cannot write (constraint)")
        self.inner.write(items)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_one_bad_record_costs_only_itself_not_its_batch(path: Path) -> None:
    metrics = Metrics()
    store = Poisoned(SqliteHistory(path), {"kitchen-2"})
    recorder = HistoryRecorder(store, metrics=metrics)  # type: ignore[arg-type]
    recorder.start()
    for i in range(5):  # queued while the store waits: one batch of five
        recorder.record(window(i))
    store.open.set()
    dropped = metrics.counter("streamcap_history_dropped_total", "", ["reason"])
    wait_until(lambda: recorder.written == 4)
    assert dropped.value("write_failed") == 1
    assert store.calls[:2] == [5, 5]  # the batch and its retry, then one at a time
    assert recorder.close(scaled(30))
    reader = SqliteHistory(path, read_only=True)
    try:
        assert sorted(reader.windows([f"kitchen-{i}" for i in range(5)])) == [
            "kitchen-0", "kitchen-1", "kitchen-3", "kitchen-4"]
    finally:
        reader.close()


def test_a_trigger_announcement_does_not_fail_its_batch(path: Path) -> None:
    from dataclasses import replace
    from math import nan

    from streamcap.messages import TriggerState

    metrics = Metrics()
    recorder = HistoryRecorder(SqliteHistory(path), metrics=metrics)
    recorder.start()
    announcement = replace(event(0, at=T0), score=nan, threshold=nan, fired_id="",
                           state=TriggerState.OFF)
    recorder.record(window(0))
    recorder.record(announcement)
    recorder.record(window(1))
    wait_until(lambda: recorder.written == 3)
    assert metrics.counter("streamcap_history_write_failures_total", "").value() == 0
    assert recorder.close(scaled(30))


def test_a_store_that_cannot_be_written_is_counted_never_raised(path: Path) -> None:
    SqliteHistory(path).close()
    metrics = Metrics()
    recorder = HistoryRecorder(SqliteHistory(path, read_only=True), metrics=metrics,
                               retention_interval_s=3600)
    recorder.start()
    for i in range(3):
        recorder.record(window(i))
    dropped = metrics.counter("streamcap_history_dropped_total", "", ["reason"])
    wait_until(lambda: dropped.value("write_failed") == 3)
    assert metrics.counter("streamcap_history_write_failures_total", "").value() >= 2
    assert recorder.close(scaled(30))
    assert "streamcap_history_write_failures_total" in metrics.render()


def test_retention_runs_on_the_writer_thread(path: Path) -> None:
    metrics = Metrics()
    store = SqliteHistory(path, keep_days=1)
    store.write([window(0, at=T0 - 3 * 86400), window(1, at=T0)])
    recorder = HistoryRecorder(store, metrics=metrics, retention_interval_s=0.05,
                               wall=lambda: T0 + 60)
    recorder.start()
    deleted = metrics.counter("streamcap_history_retention_deleted_total", "")
    wait_until(lambda: deleted.value() == 1)
    wait_until(lambda: metrics.gauge("streamcap_history_windows", "").value() == 1)
    assert metrics.gauge("streamcap_history_bytes", "").value() > 0
    assert recorder.close(scaled(30))


def test_records_after_close_are_dropped_and_counted(path: Path) -> None:
    metrics = Metrics()
    recorder = HistoryRecorder(SqliteHistory(path), metrics=metrics)
    recorder.start()
    assert recorder.close(scaled(30))
    recorder.record(window(0))
    assert metrics.counter("streamcap_history_dropped_total", "",
                           ["reason"]).value("shutdown") == 1
    assert recorder.close(scaled(30))  # again: nothing to do


def test_close_is_bounded_when_the_store_hangs(path: Path) -> None:
    metrics = Metrics()
    gate = Gate(SqliteHistory(path))
    recorder = HistoryRecorder(gate, metrics=metrics)  # type: ignore[arg-type]
    recorder.start()
    recorder.record(window(0))
    assert gate.entered.wait(scaled(30))
    recorder.record(window(1))
    assert recorder.close(0.1) is False
    assert metrics.counter("streamcap_history_dropped_total", "",
                           ["reason"]).value("shutdown") == 1
    gate.open.set()


def test_a_second_close_after_a_timeout_returns_at_once(path: Path) -> None:
    gate = Gate(SqliteHistory(path))
    recorder = HistoryRecorder(gate, metrics=Metrics())  # type: ignore[arg-type]
    recorder.start()
    recorder.record(window(0))
    assert gate.entered.wait(scaled(30))
    assert recorder.close(0.1) is False
    opener = threading.Timer(0.5, gate.open.set)  # the thread could finish meanwhile
    opener.start()
    try:
        assert recorder.close(scaled(30)) is False  # it does not wait a second time
    finally:
        opener.join()


class SlowRetention:
    """A real store whose retention runs until it is interrupted."""

    def __init__(self, store: SqliteHistory) -> None:
        self.inner = store
        self.entered = threading.Event()
        self.stop = threading.Event()

    @property
    def location(self) -> str:
        return self.inner.location

    def enforce_retention(self, now: float) -> int:
        self.entered.set()
        if not self.stop.wait(scaled(120)):
            return 0
        raise HistoryError(f"history store {self.location}: cannot enforce retention "
                           "(interrupted)")

    def interrupt(self) -> None:
        self.stop.set()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_close_interrupts_a_retention_run_and_writes_what_is_queued(path: Path) -> None:
    metrics = Metrics()
    store = SlowRetention(SqliteHistory(path))
    recorder = HistoryRecorder(store, metrics=metrics)  # type: ignore[arg-type]
    recorder.start()
    assert store.entered.wait(scaled(30))
    recorder.record(window(0))
    assert recorder.close(scaled(60)) is True
    assert store.stop.is_set()
    assert metrics.counter("streamcap_history_write_failures_total", "").value() == 0
    reader = SqliteHistory(path, read_only=True)
    try:
        assert list(reader.windows(["kitchen-0"])) == ["kitchen-0"]
    finally:
        reader.close()


def test_interrupt_stops_a_size_retention_between_rounds(path: Path) -> None:
    store = SqliteHistory(path, max_bytes=2 ** 40)
    try:
        store.write([window(i, text="z " * 500, at=T0 + i) for i in range(100)])
        store.max_bytes = store.size_bytes() // 2
        store.interrupt()  # no statement running: only the rounds see it
        assert store.enforce_retention(T0 + 200) == 0
        assert store.stats().windows == 100
    finally:
        store.close()


def test_recent_gives_captions_for_a_backfill(path: Path) -> None:
    store = SqliteHistory(path)
    store.write([window(i, at=T0 + i) for i in range(5)] + [event(0, at=T0 + 3.5)])
    recorder = HistoryRecorder(store, metrics=Metrics(), wall=lambda: T0 + 10)
    recorder.start()
    try:
        got = recorder.recent(2, False)
        assert [type(m).__name__ for m in got] == ["Caption", "TriggerEvent", "Caption"]
        assert isinstance(got[0], Caption) and got[0].window_id == "kitchen-3"
        handle = recorder.reader()
        try:
            assert handle.stats().windows == 5
        finally:
            handle.close()
    finally:
        assert recorder.close(scaled(30))


def test_the_writer_keeps_an_attached_vector_index_up(path: Path) -> None:
    from test_history_sqlite import DIM, unit

    from streamcap.history.vectors import HistoryVectorIndex, VectorIndex

    metrics = Metrics()
    store = SqliteHistory(path, keep_days=1)
    store.write([window(i, at=T0 - 3 * 86400 + i, embedding=unit(i)) for i in range(5)])
    index = HistoryVectorIndex(path.with_suffix(".vectors"), DIM, "m1")
    assert index.reset_reason is not None and "does not exist" in index.reset_reason
    recorder = HistoryRecorder(store, metrics=metrics, retention_interval_s=3600,
                               wall=lambda: T0 + 60)
    recorder.start()  # retention runs first: the five old windows go
    wait_until(lambda: metrics.counter("streamcap_history_retention_deleted_total",
                                       "").value() == 5)
    store.vector_index = index
    recorder.attach_index(index)
    for i in range(5, 45):
        recorder.record(window(i, embedding=unit(i)))
    wait_until(lambda: len(index.index) == 40)  # caught up on the writer thread, when idle
    assert index.index.watermark > 5
    assert recorder.close(scaled(30))
    saved = VectorIndex.open(path.with_suffix(".vectors"), DIM, "m1")  # saved at close
    assert saved.reset_reason is None and len(saved) == 40
    assert saved.watermark == index.index.watermark


def test_retention_drops_deleted_rows_from_the_vector_index(path: Path) -> None:
    from test_history_sqlite import DIM, unit

    from streamcap.history.vectors import HistoryVectorIndex

    metrics = Metrics()
    store = SqliteHistory(path, keep_days=1)
    store.write([window(i, at=T0 - (3 * 86400 if i < 4 else 0) + i, embedding=unit(i))
                 for i in range(10)])
    index = HistoryVectorIndex(path.with_suffix(".vectors"), DIM, "m1")
    index.step(store)
    assert len(index.index) == 10
    store.vector_index = index
    recorder = HistoryRecorder(store, metrics=metrics, retention_interval_s=3600,
                               wall=lambda: T0 + 60)
    recorder.attach_index(index)
    recorder.start()
    wait_until(lambda: len(index.index) == 6)
    assert recorder.close(scaled(30))
