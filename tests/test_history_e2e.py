"""The memory end to end, in real ``streamcap run`` subprocesses (the tiny preset on one
thread, beam search: the same audio always gets the same caption).

The source is a steady tone (a looped file whose every window holds the same audio). A
first run reads it faster than real time until a few captions are stored, and is stopped
with SIGTERM. A second run on the same state directory reads it in real time (a window
every 5 s); as soon as its WebSocket sinks listen, a real websockets client connects to
each: ``every`` (``publish = "every"``) and ``change`` (``publish = "change"``). One
daemon of the second run serves every test:

(a) the ``every`` client gets the first run's stored captions (their run_id) before any
    new one; the ``change`` client only those of them the change rule admits;
(b) over the same period the ``change`` client gets fewer captions than the ``every``
    client, ``streamcap_sink_suppressed_total`` counts the difference, and the history
    holds every window;
(c) ``/api/search`` answers from the daemon's own history, and ``/api/history`` pages
    through it.

Waits are generous upper bounds; nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
import soundfile as sf
from conftest import free_port
from daemon_process import WAIT_S, DaemonProcess, http_get, metric_samples
from timing import scaled
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from streamcap.bus.change import ChangeRule, recalled_changes
from streamcap.errors import HistoryError
from streamcap.history.records import Span, WindowRecord
from streamcap.history.search import query_terms
from streamcap.history.sqlite import SqliteHistory
from streamcap.messages import Caption

pytestmark = pytest.mark.slow

RATE = 16000
NODE = "mem"
SOURCE = "loop"
FIRST_RUN_WINDOWS = 3
SUPPRESSED = "streamcap_sink_suppressed_total"
HEARTBEAT_S = 3600.0
Frame = dict[str, Any]


def write_tone(path: Path) -> Path:
    """12 s of a pure 440 Hz tone: a whole number of cycles per hop (5 s) and per loop
    (12 s), so that every window holds the same audio."""
    t = np.arange(12 * RATE) / RATE
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), RATE)
    return path


@dataclass(frozen=True)
class Ports:
    http: int = field(default_factory=free_port)
    every: int = field(default_factory=free_port)
    change: int = field(default_factory=free_port)


def write_config(tmp: Path, ports: Ports, *, realtime: bool) -> Path:
    config = tmp / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "{NODE}"
state_dir = "{tmp / 'state'}"
log_format = "json"
max_pending_windows = 2
stop_timeout_s = 20

[model]
bundle = "tiny"
device = "cpu"
precision = "fp32"
threads = 1

[model.decoding]
mode = "beam"
num_beams = 2
beam_max_length = 8

[sources.{SOURCE}]
uri = "file:{write_tone(tmp / 'tone.wav')}?loop=true"
window_s = 10
hop_s = 5
realtime = {str(realtime).lower()}

[sinks.every]
plugin = "websocket"
port = {ports.every}
backfill = 1000

[sinks.change]
plugin = "websocket"
port = {ports.change}
backfill = 1000
publish = "change"
heartbeat_s = {HEARTBEAT_S}

[http]
port = {ports.http}
""", encoding="utf-8")
    return config


def stored(path: Path) -> list[WindowRecord]:
    """The windows committed so far, in time order (a read-only handle of its own)."""
    try:
        reader = SqliteHistory(path, read_only=True, check=False)
    except HistoryError:
        return []
    try:
        items = reader.page(Span(), cursor=None, limit=100_000).items
    finally:
        reader.close()
    return [i for i in items if isinstance(i, WindowRecord)]


class Client:
    """A real websockets client that keeps every frame it receives, read by a thread."""

    def __init__(self, ws: ClientConnection, stack: contextlib.ExitStack) -> None:
        self.ws = ws
        self._stack = stack
        self._frames: list[Frame] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="test-ws-reader", daemon=True)
        self._thread.start()

    @classmethod
    def connect_at_once(cls, url: str, daemon: DaemonProcess) -> Client:
        """Connect as soon as the sink listens (retrying while the port refuses)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            stack = contextlib.ExitStack()
            try:
                return cls(stack.enter_context(connect(url, open_timeout=scaled(10),
                                                       max_size=None)), stack)
            except OSError:
                daemon.check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _read(self) -> None:
        try:
            for message in self.ws:
                with self._lock:
                    self._frames.append(json.loads(message))
        except ConnectionClosed:
            pass

    def frames(self) -> list[Frame]:
        with self._lock:
            return list(self._frames)

    def captions(self) -> list[Frame]:
        return [f for f in self.frames() if f["type"] == "caption"]

    def close(self) -> None:
        self._stack.close()
        self._thread.join(scaled(10))


@dataclass
class Memory:
    daemon: DaemonProcess
    path: Path
    first_run: list[WindowRecord]  # what the first run stored, in time order
    every: Client
    change: Client

    @property
    def first_run_id(self) -> str:
        return self.first_run[0].run_id

    def new(self, frames: list[Frame]) -> list[Frame]:
        """The frames of the second run (not recalled from the first)."""
        return [f for f in frames if f.get("run_id") != self.first_run_id]

    def wait(self, what: str, probe: Callable[[], tuple[Any, bool]]) -> Any:
        return self.daemon.poll(probe, lambda got: f"{what} never held (last: {got!r}):\n"
                                                    f"{self.daemon.log_tail()}",
                                interval_s=0.1)


@pytest.fixture(scope="module")
def memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Memory]:
    tmp = tmp_path_factory.mktemp("memory")
    ports = Ports()
    path = tmp / "state" / "history" / "history.sqlite3"
    config = write_config(tmp, ports, realtime=False)
    first = DaemonProcess.start(config, env={}, log=tmp / "first.log",
                                jsonl=tmp / "none.jsonl", http_port=ports.http)
    try:
        first.poll(lambda: (n := len(stored(path)), n >= FIRST_RUN_WINDOWS),
                   lambda n: f"only {n} windows stored:\n{first.log_tail()}", interval_s=0.2)
        assert first.stop() == 0, first.log_tail()
    finally:
        first.kill()
    first_run = stored(path)
    assert len({w.run_id for w in first_run}) == 1

    config = write_config(tmp, ports, realtime=True)
    daemon = DaemonProcess.start(config, env={}, log=tmp / "second.log",
                                 jsonl=tmp / "none.jsonl", http_port=ports.http)
    clients: list[Client] = []
    try:
        clients.append(Client.connect_at_once(f"ws://127.0.0.1:{ports.every}/", daemon))
        clients.append(Client.connect_at_once(f"ws://127.0.0.1:{ports.change}/", daemon))
        yield Memory(daemon, path, first_run, *clients)
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        for client in clients:
            client.close()
        daemon.kill()


def test_a_restarted_daemon_replays_the_stored_captions_before_any_new_one(
        memory: Memory) -> None:
    def probe() -> tuple[list[Frame], bool]:
        frames = memory.every.frames()
        return frames, bool(memory.new([f for f in frames if f["type"] == "caption"]))

    frames = memory.wait("a caption of the second run", probe)
    hello = frames[0]
    assert hello["type"] == "hello" and hello["run_id"] != memory.first_run_id
    assert hello["capabilities"]["recalled"] == {
        "captions": {SOURCE: len(memory.first_run)}, "triggers": 0}
    captions = [f for f in frames if f["type"] == "caption"]
    recalled = len(memory.first_run)
    # every stored caption of the first run, in time order, as it published them ...
    assert [c["window_id"] for c in captions[:recalled]] == \
        [w.window_id for w in memory.first_run]
    for frame, record in zip(captions, memory.first_run, strict=False):
        assert frame["run_id"] == record.run_id and frame["node_id"] == NODE
        assert frame["text"] == record.text and frame["source_id"] == SOURCE
        assert frame["captured_at"] == pytest.approx(record.start_at)
    # ... and only then the new run's
    assert captions[recalled:] and all(c["run_id"] == hello["run_id"]
                                       for c in captions[recalled:])


def test_a_restarted_change_sink_replays_only_the_stored_changes(memory: Memory) -> None:
    # what the change rule admits of the first run's captions, from a fresh start
    changes = [m.window_id for m in recalled_changes(
        ChangeRule(heartbeat_s=HEARTBEAT_S), [w.to_caption() for w in memory.first_run])
        if isinstance(m, Caption)]
    assert 0 < len(changes) < len(memory.first_run)  # a steady tone: the same caption

    def probe() -> tuple[list[Frame], bool]:
        frames = memory.change.frames()
        return frames, bool(memory.new([f for f in frames if f["type"] == "caption"]))

    frames = memory.wait("a caption of the second run on the change sink", probe)
    assert frames[0]["capabilities"]["recalled"] == {
        "captions": {SOURCE: len(changes)}, "triggers": 0}
    captions = [f["window_id"] for f in frames if f["type"] == "caption"]
    assert captions[:len(changes)] == changes


def test_b_a_change_sink_gets_fewer_captions_and_the_history_every_window(
        memory: Memory) -> None:
    def snapshot() -> tuple[list[str], list[str], float | None, list[str]]:
        _, _, text = http_get(memory.daemon.http("/metrics"))
        return ([c["window_id"] for c in memory.new(memory.every.captions())],
                [c["window_id"] for c in memory.new(memory.change.captions())],
                metric_samples(text, SUPPRESSED).get('{sink="change",reason="unchanged"}'),
                [w.window_id for w in stored(memory.path) if w.run_id != memory.first_run_id])

    def probe() -> tuple[tuple[list[str], list[str], float | None, list[str]], bool]:
        # a moment between two windows (they come 5 s apart): nothing changes meanwhile
        before = snapshot()
        time.sleep(0.5)
        after = snapshot()
        return after, before == after and len(after[0]) >= 3

    every, change, suppressed, history = memory.wait(
        "a steady moment after three windows of the second run", probe)
    assert set(change) < set(every) and len(change) < len(every)
    assert suppressed == len(every) - len(change)
    assert history == every  # every window recorded, whatever the sinks publish
    # the first window of the run, then only windows whose caption changed
    texts = {c["window_id"]: c["text"] for c in memory.new(memory.every.captions())}
    assert change[0] == every[0]
    for earlier, later in itertools.pairwise(change):
        assert texts[later] != texts[earlier]
    _, _, text = http_get(memory.daemon.http("/metrics"))
    assert metric_samples(text, SUPPRESSED).get('{sink="every",reason="unchanged"}') is None


def test_c_search_and_history_pages_on_the_running_daemon(memory: Memory) -> None:
    words = query_terms(memory.first_run[-1].text)
    assert words, memory.first_run[-1].text
    query = {"q": words[0], "source": SOURCE, "since": "1d", "limit": "5"}
    status, kind, body = http_get(memory.daemon.http("/api/search?" + urlencode(query)))
    assert status == 200 and kind.startswith("application/json"), body
    answer = json.loads(body)
    known = {w.window_id: w for w in stored(memory.path)}
    assert answer["query"] == words[0] and answer["sources"] == [SOURCE]
    assert answer["model"] == memory.first_run[0].model  # the windows' model: comparable
    hits = answer["hits"]
    assert hits and len(hits) <= 5
    for hit in hits:
        assert hit["source_id"] == SOURCE and set(hit["window_ids"]) <= known.keys()
        assert hit["similarity"] is not None and hit["best_window_id"] in hit["window_ids"]
        windows = [known[w] for w in hit["window_ids"]]
        assert hit["start_at"] == pytest.approx(min(w.start_at for w in windows))
        assert hit["end_at"] == pytest.approx(max(w.end_at for w in windows))
    assert hits[0]["text_match"] > 0
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    status, _, body = http_get(memory.daemon.http("/api/search?q=x&limit=0"))
    assert status == 400 and json.loads(body)["message"].startswith("limit: "), body

    def walk(order: str) -> list[Frame]:
        items: list[Frame] = []
        cursor: str | None = None
        while True:
            params = {"source": SOURCE, "limit": "3", "order": order}
            if cursor is not None:
                params["cursor"] = cursor
            status, _, body = http_get(memory.daemon.http("/api/history?" + urlencode(params)))
            assert status == 200, body
            page = json.loads(body)
            assert len(page["items"]) <= 3
            items += page["items"]
            cursor = page["next"]
            if cursor is None:
                return items

    def probe() -> tuple[tuple[list[Frame], list[Frame], list[WindowRecord]], bool]:
        # the daemon goes on recording: walk both ways and read the store until they agree
        oldest_first, newest_first = walk("asc"), walk("desc")
        records = sorted(stored(memory.path), key=lambda w: w.start_at)
        ids = [w.window_id for w in records]
        same = ([f.get("window_id") for f in oldest_first] == ids
                and [f.get("window_id") for f in newest_first] == ids[::-1])
        return (oldest_first, newest_first, records), same

    oldest_first, _, records = memory.wait("/api/history agreeing with the store", probe)
    assert len(records) > len(memory.first_run)  # both runs' windows
    for frame, record in zip(oldest_first, records, strict=True):
        assert frame["type"] == "caption" and frame["v"] == 1 and frame["node_id"] == NODE
        assert frame["run_id"] == record.run_id and frame["text"] == record.text
        assert frame["captured_at"] == pytest.approx(record.start_at)
