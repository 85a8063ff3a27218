"""The history store in a real ``streamcap run`` subprocess (the tiny preset on one thread,
a looping file read faster than real time).

One daemon records captions; it is killed with SIGKILL while it writes and started
again on the same state directory: the store opens (its quick_check passes), every
window committed before the kill is still there, and the retention limits still
apply. A corrupt store file is an error naming its path: the daemon captions on
without history when ``[history] required = false``, and exits with status 2 when
it is ``true``.

Waits are generous upper bounds; nothing asserts how long anything took.
"""

from __future__ import annotations

import signal
import subprocess
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import free_port
from daemon_process import (
    WAIT_S,
    DaemonProcess,
    http_get,
    metric_samples,
    streamcap_command,
    tiny_model_toml,
)
from test_history_sqlite import event, window
from test_pipeline import runtime
from timing import scaled

from streamcap.config import parse_config
from streamcap.daemon import Daemon
from streamcap.errors import HistoryError
from streamcap.history.records import Span
from streamcap.history.sqlite import SqliteHistory
from streamcap.history.vectors import VectorIndex
from streamcap.messages import TriggerEvent, TriggerState
from streamcap.models.runtime import InferenceRuntime

pytestmark = pytest.mark.slow
__all__ = ["runtime"]  # the fixture: one inference thread on the CPU

RATE = 16000
MAX_BYTES = 1024 * 1024
OLD_AT = 1_000_000_000.0  # 2001: far beyond keep_days


def write_wav(path: Path) -> Path:
    t = np.arange(12 * RATE) / RATE
    noise = np.random.default_rng(1).normal(0.0, 0.05, t.size)
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32), RATE)
    return path


def write_config(tmp: Path, *, http_port: int, history: str) -> Path:
    config = tmp / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "hist"
state_dir = "{tmp / 'state'}"
log_format = "json"
max_pending_windows = 2
stop_timeout_s = 20

{tiny_model_toml(n_candidates=2, max_new_tokens=8)}
[sources.loop]
uri = "file:{write_wav(tmp / 'tone.wav')}?loop=true"
window_s = 10
hop_s = 5
realtime = false

[http]
port = {http_port}

[history]
{history}
""", encoding="utf-8")
    return config


def start(tmp: Path, http_port: int, log: str) -> DaemonProcess:
    return DaemonProcess.start(tmp / "streamcap.toml", env={}, log=tmp / log,
                               jsonl=tmp / "none.jsonl", http_port=http_port)


def stored_windows(path: Path) -> set[str]:
    """Window ids committed so far, read through a read-only handle."""
    try:
        reader = SqliteHistory(path, read_only=True, check=False)
    except HistoryError:
        return set()
    try:
        return {i.window_id for i in reader.page(Span(), cursor=None, limit=100000).items
                if hasattr(i, "window_id")}
    finally:
        reader.close()


def wait_windows(proc: DaemonProcess, path: Path, n: int) -> set[str]:
    def probe() -> tuple[set[str], bool]:
        found = stored_windows(path)
        return found, len(found) >= n
    return proc.poll(probe, lambda found: f"only {len(found)} of {n} windows stored:\n"
                                          f"{proc.log_tail()}", interval_s=0.2)


def wait_metric(proc: DaemonProcess, name: str, labels: str, ok: Callable[[float], bool]) -> str:
    """Poll /metrics (once HTTP is up: it starts after the model) until ``ok(value)``."""
    def probe() -> tuple[tuple[str, float | None], bool]:
        try:
            _, _, text = http_get(proc.http("/metrics"))
        except urllib.error.URLError:
            return ("", None), False
        value = metric_samples(text, name).get(labels)
        return (text, value), value is not None and ok(value)

    text, _ = proc.poll(probe, lambda got: f"{name}{labels} = {got[1]} never satisfied the "
                                           f"check:\n{proc.log_tail()}", interval_s=0.2)
    return text


def events(proc: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.log_events() if e.get("event") == name]


def test_captions_land_in_the_store_and_survive_kill_9(tmp_path: Path) -> None:
    tmp, http_port = tmp_path, free_port()
    write_config(tmp, http_port=http_port,
                 history=f"keep_days = 30\nmax_bytes = {MAX_BYTES}\nretention_interval_s = 1")
    path = tmp / "state" / "history" / "history.sqlite3"
    proc = start(tmp, http_port, "first.log")
    try:
        killed_and_restarted(proc, tmp, http_port, path)
    finally:
        proc.kill()


def killed_and_restarted(proc: DaemonProcess, tmp: Path, http_port: int, path: Path) -> None:
    wait_windows(proc, path, 3)
    text = wait_metric(proc, "streamcap_history_writes_total", "", lambda v: v >= 3)
    assert metric_samples(text, "streamcap_history_write_failures_total")[""] == 0
    # what the daemon published is what it stored: the caption log lines' windows
    logged = {e["window_id"] for e in events(proc, "caption")}
    stored = stored_windows(path)
    assert stored and stored <= logged
    reader = SqliteHistory(path, read_only=True, check=False)
    try:
        some = reader.windows(sorted(stored)[:3], vectors=True)
    finally:
        reader.close()
    for record in some.values():
        assert record.source_id == "loop" and record.text and record.model
        assert record.embedding is not None and record.embedding.size > 0  # the tiny retriever
        assert record.end_at - record.start_at == pytest.approx(10.0)
    # acknowledged = committed: count the rows, then kill at once, mid-stream
    before = wait_windows(proc, path, len(stored) + 2)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(timeout=scaled(30))
    store = SqliteHistory(path)  # quick_check passes; the WAL is replayed
    try:
        after = {i.window_id for i in store.page(Span(), cursor=None, limit=100000).items
                 if hasattr(i, "window_id")}
        assert before <= after
        # something far too old, for the restarted daemon's retention to delete
        store.write([window(0, source="loop", at=OLD_AT)])
    finally:
        store.close()
    again = start(tmp, http_port, "second.log")
    try:
        wait_metric(again, "streamcap_history_retention_deleted_total", "", lambda v: v >= 1)
        now = wait_windows(again, path, len(after) + 1)
        assert before <= now and "kitchen-0" not in now
        assert not [e for e in again.log_events() if e.get("level") == "error"]
        opened = events(again, "history store open")
        assert opened and opened[0]["path"] == str(path)
        # the vector index: attached once the model is loaded; the first daemon was killed
        # before it ever saved one, so it starts empty (said once) and is rebuilt
        vectors = path.with_suffix(".vectors")
        indexed = events(again, "history vector index open")
        assert indexed and indexed[0]["path"] == str(vectors) and indexed[0]["dim"] > 0
        empty = events(again, "history vector index starts empty; it is rebuilt from the store")
        assert len(empty) == 1 and str(vectors) in empty[0]["reason"]
        wait_metric(again, "streamcap_history_bytes", "", lambda v: 0 < v <= MAX_BYTES)
        assert again.stop() == 0
        saved = VectorIndex.open(vectors, indexed[0]["dim"], indexed[0]["model"])
        assert saved.reset_reason is None and len(saved) >= len(before)  # saved at stop
    finally:
        again.kill()


def corrupt_store(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)


def test_a_corrupt_store_is_logged_and_captioning_goes_on(tmp_path: Path) -> None:
    http_port = free_port()
    write_config(tmp_path, http_port=http_port, history="required = false")
    path = tmp_path / "state" / "history" / "history.sqlite3"
    corrupt_store(path)
    proc = start(tmp_path, http_port, "daemon.log")
    try:
        wait_metric(proc, "streamcap_captions_total", '{source="loop"}', lambda v: v >= 2)
        text = wait_metric(proc, "streamcap_history_open_failures_total", "", lambda v: v == 1)
        assert "streamcap_history_writes_total" not in text
        errors = events(proc, "history store unusable; captioning goes on without history")
        assert len(errors) == 1 and str(path) in errors[0]["error"]
        assert proc.stop() == 0
    finally:
        proc.kill()
    assert path.read_bytes().startswith(b"SQLite format 3\x00")  # left for the user to look at


def test_a_corrupt_required_store_exits_2_naming_the_path(tmp_path: Path) -> None:
    write_config(tmp_path, http_port=free_port(), history="required = true")
    path = tmp_path / "state" / "history" / "history.sqlite3"
    corrupt_store(path)
    done = subprocess.run([*streamcap_command(), "run", "--config", str(tmp_path / "streamcap.toml")],
                          check=False, capture_output=True, text=True, timeout=WAIT_S,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("streamcap: error:")]
    assert lines and str(path) in lines[0] and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- in process


def no_captioner() -> Any:
    raise AssertionError("no model is loaded here")


def in_process(tmp: Path, runtime: InferenceRuntime, history: dict[str, object]) -> Daemon:
    config = parse_config({
        "daemon": {"node_id": "n1", "state_dir": str(tmp / "state")},
        "sources": {"s": {"uri": "file:/dev/null", "window_s": 10, "hop_s": 5}},
        "http": {"enabled": False},
        "history": history,
    })
    return Daemon(config, no_captioner, runtime=runtime)


async def test_trigger_announcements_stay_out_of_the_history_firings_go_in(
        tmp_path: Path, runtime: InferenceRuntime) -> None:
    from dataclasses import replace
    from math import nan

    daemon = in_process(tmp_path, runtime, {})
    daemon.history = daemon._open_history()
    assert daemon.history is not None
    announcement = replace(event(0, at=1e9, source="s"), event_id="a", score=nan,
                           threshold=nan, fired_id="", state=TriggerState.OFF)
    fired = replace(event(0, at=1e9 + 1, source="s"), event_id="on", fired_id="",
                    state=TriggerState.ON)
    ended = replace(event(1, at=1e9 + 2, source="s"), event_id="off", fired_id="on",
                    state=TriggerState.OFF)
    for msg in (announcement, fired, ended):
        daemon._publish(msg)
    assert daemon.history.close(scaled(30))
    store = SqliteHistory(daemon.history_path(), read_only=True)
    try:
        items = store.page(Span(), cursor=None, limit=10).items
    finally:
        store.close()
    assert [i.event_id for i in items if isinstance(i, TriggerEvent)] == ["on", "off"]


async def test_without_history_the_clips_folder_has_its_own_retention(
        tmp_path: Path, runtime: InferenceRuntime) -> None:
    import asyncio
    import os
    import time

    daemon = in_process(tmp_path, runtime, {"enabled": False, "keep_days": 1,
                                            "retention_interval_s": 0.05})
    assert daemon._open_history() is None
    clips = daemon.clips.clips_dir
    clips.mkdir(parents=True)
    old, new = clips / "r:dog:s:1.flac", clips / "r:dog:s:2.flac"
    for path in (old, new):
        path.write_bytes(b"flac")
    gone = time.time() - 2 * 86400
    os.utime(old, (gone, gone))
    prune = asyncio.create_task(daemon._prune_clips(), name="streamcap[clips].prune")
    try:
        deadline = time.monotonic() + scaled(30)
        while old.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        prune.cancel()
    assert not old.exists() and new.exists()
    assert daemon.metrics.counter("streamcap_clips_pruned_total", "").value() == 1


@pytest.mark.parametrize("required", [False, True])
async def test_a_path_that_cannot_be_resolved_is_a_history_error_naming_it(
        tmp_path: Path, runtime: InferenceRuntime, required: bool) -> None:
    from streamcap.errors import ConfigError

    path = "~streamcap-no-such-user/history.sqlite3"  # expanduser raises RuntimeError
    daemon = in_process(tmp_path, runtime, {"path": path, "required": required})
    if required:
        with pytest.raises(ConfigError, match="streamcap-no-such-user"):
            daemon._open_history()
        return
    assert daemon._open_history() is None  # captioning goes on without history
    assert daemon.metrics.counter("streamcap_history_open_failures_total", "").value() == 1


class Replays:
    """A sink that replays history: notes where ``recall`` ran and what it got."""

    accepts = frozenset({"caption"})

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.got: list[object] = []

    def recall(self, recent: Any) -> None:
        import threading

        self.threads.append(threading.current_thread().name)
        self.got = list(recent(5, True))

    async def run(self, inbox: Any, ctx: Any) -> None:
        async for _ in inbox:
            pass


async def test_the_backfill_is_read_off_the_event_loop_before_the_sinks_run(
        tmp_path: Path, runtime: InferenceRuntime) -> None:
    import threading

    path = tmp_path / "state" / "history" / "history.sqlite3"
    store = SqliteHistory(path)
    import time

    store.write([window(i, source="s", at=time.time() - 100 + i) for i in range(8)])
    store.close()
    config = parse_config({
        "daemon": {"node_id": "n1", "state_dir": str(tmp_path / "state")},
        "sources": {"s": {"uri": "file:/dev/null", "window_s": 10, "hop_s": 5}},
        "http": {"enabled": False},
    })
    one, two = Replays(), Replays()
    daemon = Daemon(config, no_captioner, runtime=runtime,
                    extra_sinks={"one": one, "two": two})  # type: ignore[dict-item]
    with pytest.raises(Exception):  # noqa: B017 - no model here: the start fails after the recall
        await daemon.run()
    loop_thread = threading.current_thread().name
    for sink in (one, two):
        assert sink.threads and sink.threads[0] != loop_thread
        assert [m.window_id for m in sink.got] == [f"s-{i}" for i in range(3, 8)]
