"""End to end: ``streamcap run`` as a subprocess, with real parts around it.

One daemon serves the whole module (it is started once; the last test stops
it): a looping 12 s WAV file read faster than real time, the ``tiny`` preset
on one thread, a token-protected WebSocket sink, an MQTT sink publishing to a
real mosquitto started here, the separately installed ``jsonl`` example
plugin, HTTP, and ``$NOTIFY_SOCKET`` pointing at a datagram socket of the
test. The jsonl file is the record of what the daemon published: the other
transports are compared with it.

Waits are generous upper bounds (the machine is small and shared); nothing
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import numpy as np
import pytest
import soundfile as sf
from chromium import chromium_path, dump_dom
from conftest import free_port, make_tone_file
from daemon_process import (
    WAIT_S,
    DaemonProcess,
    NotifyListener,
    http_get,
    metric_samples,
    mqtt_lines,
    streamcap_command,
    tiny_model_toml,
)
from mosquitto import Mosquitto, mosquitto_path, mosquitto_sub, start_mosquitto_sub
from test_jsonl_plugin import jsonl_installed
from timing import scaled
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

__all__ = ["jsonl_installed"]  # the session fixture that pip-installs plugins/streamcap-jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_path() is None or shutil.which("mosquitto_sub") is None
                       or shutil.which("mosquitto_pub") is None,
                       reason="mosquitto and mosquitto-clients are not installed"),
]

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "streamcap.v1.schema.json").read_text(encoding="utf-8"))
NODE = "e2e-node"
SOURCE = "tone"
PREFIX = f"streamcap/{NODE}"
TOKEN_ENV = "STREAMCAP_E2E_WS_TOKEN"
TOKEN = "e2e-token-5f2c9a"
PERSISTENT_ID = "e2e-persistent-subscriber"
RATE = 16000


def validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


VALIDATOR = validator()


def check_frame(frame: dict[str, Any]) -> None:
    """Validate a frame against the streamcap.v1 schema (every frame a sink sends)."""
    errors = sorted(VALIDATOR.iter_errors(frame), key=lambda e: list(e.path))
    assert not errors, f"{frame.get('type')} frame does not match the schema: " \
                       f"{[e.message for e in errors][:3]}\n{json.dumps(frame)[:500]}"


@dataclass(kw_only=True)
class RunningDaemon(DaemonProcess):
    """The module's daemon, its broker and its witnesses."""

    ws_port: int
    broker: Mosquitto
    notify: NotifyListener
    persistent_out: Path  # a persistent QoS-1 mosquitto_sub's output, started before the daemon

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/"


def write_wav(path: Path) -> Path:
    """12 s of a 440 Hz tone with a little noise, 16 kHz mono."""
    t = np.arange(12 * RATE) / RATE
    noise = np.random.default_rng(1).normal(0.0, 0.05, t.size)
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32), RATE)
    return path


def write_config(tmp: Path, *, wav: Path, ws_port: int, http_port: int, broker: Mosquitto,
                 jsonl: Path) -> Path:
    config = tmp / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "{NODE}"
state_dir = "{tmp / 'state'}"
log_format = "json"
max_pending_windows = 2
stop_timeout_s = 20

{tiny_model_toml()}
[sources.{SOURCE}]
uri = "file:{wav}?loop=true"
window_s = 10
hop_s = 5
realtime = false

[sinks.ws]
plugin = "websocket"
port = {ws_port}
backfill = 5
token_env = "{TOKEN_ENV}"

[sinks.broker]
plugin = "mqtt"
host = "127.0.0.1"
port = {broker.port}
accepts = ["caption", "embedding", "status"]
reconnect_initial_s = 0.2
reconnect_max_s = 1.0
keepalive_s = 5
outbox_fsync = false
flush_timeout_s = 10

[sinks.archive]
plugin = "jsonl"
path = "{jsonl}"

[http]
port = {http_port}
""", encoding="utf-8")
    return config


def wait_for_subscriber(broker: Mosquitto, out: Path) -> None:
    """Publish probes on a topic the persistent subscriber matches until one arrives."""
    probe_topic = f"{PREFIX}/probe/caption"
    deadline = time.monotonic() + scaled(30)
    while probe_topic not in out.read_text(encoding="utf-8", errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError("the persistent mosquitto_sub never received a probe")
        subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                        "-t", probe_topic, "-m", "probe"], check=True, timeout=scaled(10),
                       capture_output=True)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def daemon(jsonl_installed: None, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[RunningDaemon]:
    tmp = tmp_path_factory.mktemp("e2e")
    # AF_UNIX paths are limited to 108 bytes: the notify socket lives in a short directory.
    short = Path(tempfile.mkdtemp(prefix="sc-e2e-"))
    broker = Mosquitto(workdir=tmp / "mosquitto")
    broker.start()
    persistent_out = tmp / "persistent.txt"
    persistent = start_mosquitto_sub(
        broker, f"{PREFIX}/+/caption", out=persistent_out,
        extra=("-c", "-i", PERSISTENT_ID, "-q", "1"))
    notify = NotifyListener(short)
    running: RunningDaemon | None = None
    try:
        wait_for_subscriber(broker, persistent_out)
        jsonl = tmp / "archive.jsonl"
        ws_port, http_port = free_port(), free_port()
        config = write_config(tmp, wav=write_wav(tmp / "tone.wav"), ws_port=ws_port,
                              http_port=http_port, broker=broker, jsonl=jsonl)
        env = {TOKEN_ENV: TOKEN, "NOTIFY_SOCKET": str(notify.path),
               "WATCHDOG_USEC": "4000000", "PYTHONUNBUFFERED": "1"}
        base = DaemonProcess.start(config, env=env, log=tmp / "daemon.log", jsonl=jsonl,
                                   http_port=http_port)
        running = RunningDaemon(proc=base.proc, config=config, log=base.log, jsonl=jsonl,
                                http_port=http_port, env=base.env, ws_port=ws_port,
                                broker=broker, notify=notify, persistent_out=persistent_out)
        deadline = time.monotonic() + WAIT_S
        while notify.index("READY", "1") is None:
            running.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"no READY=1 within {WAIT_S} s:\n{running.log_tail()}")
            time.sleep(0.1)
        yield running
    finally:
        if running is not None:
            running.kill()
        persistent.terminate()
        persistent.wait(timeout=scaled(10))
        notify.close()
        broker.stop(kill=True)
        shutil.rmtree(short, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def receive(ws: ClientConnection, timeout_s: float = WAIT_S) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
    return frame


async def collect(ws: ClientConnection, done: Callable[[list[dict[str, Any]]], bool],
                  timeout_s: float = WAIT_S) -> list[dict[str, Any]]:
    """Frames until ``done(frames)`` holds."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        while not done(frames):
            frames.append(await receive(ws))
    return frames


def of_type(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") == kind]


def assert_in_order(captions: list[dict[str, Any]]) -> None:
    seqs = [c["seq"] for c in captions if c["source_id"] == SOURCE]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"seq not increasing: {seqs}"
    for c in captions:
        assert c["window_id"].startswith(f"{c['source_id']}:"), c["window_id"]


# --------------------------------------------------------------------------- tests


def test_ready_is_notified_and_the_watchdog_is_fed(daemon: RunningDaemon) -> None:
    ready = daemon.notify.index("READY", "1")
    assert ready is not None
    deadline = time.monotonic() + WAIT_S
    while daemon.notify.index("WATCHDOG", "1") is None:  # WATCHDOG_USEC=4 s: a ping every 2 s
        assert time.monotonic() < deadline, daemon.notify.snapshot()
        time.sleep(0.1)
    assert daemon.notify.index("STOPPING", "1") is None


def test_healthz_is_ready_once_the_source_runs(daemon: RunningDaemon) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, ctype, body = http_get(daemon.http("/healthz"))
        assert ctype.startswith("application/json"), ctype
        health = json.loads(body)
        if status == 200:
            break
        assert status == 503 and health["ready"] is False and health["reasons"], health
        daemon.check_alive()
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health["status"] == "ok" and health["live"] is True and health["ready"] is True
    assert health["reasons"] == []
    assert health["sources"][SOURCE]["state"] == "running"
    assert health["inference"]["loaded"] is True


def test_metrics_have_the_streamcap_series(daemon: RunningDaemon) -> None:
    daemon.wait_captions(2)
    text = daemon.wait_metric("streamcap_mqtt_connected", '{sink="broker"}', lambda v: v == 1)
    status, ctype, _ = http_get(daemon.http("/metrics"))
    assert status == 200 and ctype.startswith("text/plain"), ctype
    for name, kind in [("streamcap_windows_total", "counter"),
                       ("streamcap_windows_dropped_total", "counter"),
                       ("streamcap_inference_seconds", "histogram"),
                       ("streamcap_lag_seconds", "gauge"),
                       ("streamcap_sink_queue_depth", "gauge"),
                       ("streamcap_sink_dropped_total", "counter"),
                       ("streamcap_mqtt_connected", "gauge"),
                       ("streamcap_websocket_clients", "gauge")]:
        assert f"# TYPE {name} {kind}" in text, name
    source = f'{{source="{SOURCE}"}}'
    windows = metric_samples(text, "streamcap_windows_total")[source]
    dropped = metric_samples(text, "streamcap_windows_dropped_total")[
        f'{{reason="queue_full",source="{SOURCE}"}}']
    captioned = metric_samples(text, "streamcap_captions_total")[source]
    failed = metric_samples(text, "streamcap_inference_failures_total").get(source, 0.0)
    queued = metric_samples(text, "streamcap_window_queue_depth")[""]
    assert captioned >= 2 and 0 <= queued <= 2  # max_pending_windows = 2
    # no window vanishes: each is captioned, failed, dropped (and counted), queued or in flight
    assert 0 <= windows - captioned - failed - dropped - queued <= 1
    assert metric_samples(text, "streamcap_source_running")[source] == 1
    assert metric_samples(text, "streamcap_inference_seconds_count")['{stage="total"}'] >= 2
    assert source in metric_samples(text, "streamcap_lag_seconds")
    depth = metric_samples(text, "streamcap_sink_queue_depth")
    assert {'{sink="ws"}', '{sink="broker"}', '{sink="archive"}'} <= set(depth)
    drops = metric_samples(text, "streamcap_sink_dropped_total")
    assert any('sink="broker"' in key and 'kind="caption"' in key for key in drops)
    assert '{sink="ws"}' in metric_samples(text, "streamcap_websocket_clients")


async def test_websocket_client_gets_hello_captions_embeddings_and_status_in_order(
        daemon: RunningDaemon) -> None:
    daemon.wait_captions(1)
    async with connect(daemon.ws_url, additional_headers=auth()) as ws:
        hello = await receive(ws)
        check_frame(hello)
        assert hello["type"] == "hello" and hello["protocol"] == "streamcap.v1"
        assert hello["node_id"] == NODE
        caps = hello["capabilities"]
        assert set(caps["kinds"]) == {"caption", "embedding", "status", "trigger"}
        assert caps["auth_required"] is True
        first = await receive(ws)
        assert first["type"] == "subscribed" and first["kinds"] == ["caption", "status", "trigger"]
        await ws.send(json.dumps({"type": "subscribe", "sources": "*", "kinds": "*",
                                  "backfill": 0, "id": "all"}))

        def enough(frames: list[dict[str, Any]]) -> bool:
            subscribed = [i for i, f in enumerate(frames) if f.get("type") == "subscribed"]
            if not subscribed:
                return False
            after = frames[subscribed[0]:]
            return len(of_type(after, "caption")) >= 3 and len(of_type(after, "embedding")) >= 3

        frames = await collect(ws, enough)
    replies = of_type(frames, "subscribed")
    assert replies[0]["id"] == "all"
    assert set(replies[0]["kinds"]) == {"caption", "embedding", "status", "trigger"}
    for frame in frames:
        check_frame(frame)  # subscribed frames too: the schema has them
        if frame["type"] != "subscribed":
            assert frame["node_id"] == NODE
    statuses = of_type(frames, "status")
    assert statuses and statuses[0]["source_id"] == SOURCE and statuses[-1]["state"] == "running"
    captions = of_type(frames, "caption")
    assert_in_order(captions)
    # A window's embedding follows its caption and shares its window_id.
    seen: set[str] = set()
    for frame in frames:
        if frame["type"] == "caption":
            seen.add(frame["window_id"])
        elif frame["type"] == "embedding":
            assert frame["window_id"] in seen, frame["window_id"]
            assert frame["dim"] == len(frame["vector"]) > 0
            norm = float(np.linalg.norm(np.asarray(frame["vector"])))
            assert abs(norm - 1.0) < 1e-3
    # What the client got is what the daemon published (the jsonl record).
    recorded = {c["window_id"]: c for c in daemon.wait_captions(1)}
    for c in captions:
        deadline = time.monotonic() + WAIT_S
        while c["window_id"] not in recorded and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            recorded = {r["window_id"]: r for r in daemon.captions()}
        assert recorded[c["window_id"]] == c


async def test_mqtt_client_gets_captions_embeddings_and_status(daemon: RunningDaemon) -> None:
    await asyncio.to_thread(daemon.wait_metric, "streamcap_mqtt_connected", '{sink="broker"}', lambda v: v == 1)
    got: list[tuple[str, dict[str, Any] | str, bool]] = []
    async with aiomqtt.Client(daemon.broker.host, daemon.broker.port,
                              identifier="e2e-live-subscriber") as client:
        await client.subscribe(f"{PREFIX}/#", qos=1)
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:
                topic = str(message.topic)
                raw = bytes(message.payload).decode() \
                    if isinstance(message.payload, bytes | bytearray) else str(message.payload)
                payload: dict[str, Any] | str = json.loads(raw) if raw.startswith("{") else raw
                got.append((topic, payload, message.retain))
                kinds = [t.rsplit("/", 1)[1] for t, _, _ in got]
                if kinds.count("caption") >= 3 and kinds.count("embedding") >= 3:
                    break
    by_topic: dict[str, list[Any]] = {}
    for topic, payload, _ in got:
        by_topic.setdefault(topic, []).append(payload)
    assert by_topic[f"{PREFIX}/availability"][0] == "online"
    statuses = by_topic[f"{PREFIX}/{SOURCE}/status"]
    assert statuses[0]["state"] == "running"
    assert any(retained for t, _, retained in got if t.endswith("/status"))
    captions = by_topic[f"{PREFIX}/{SOURCE}/caption"]
    embeddings = by_topic[f"{PREFIX}/{SOURCE}/embedding"]
    for frame in [*statuses, *captions, *embeddings]:
        check_frame(frame)
        assert frame["node_id"] == NODE and frame["source_id"] == SOURCE
    assert_in_order(captions)
    assert all(e["type"] == "embedding" and e["dim"] == len(e["vector"]) for e in embeddings)
    # Embeddings (QoS 0) may overtake their caption (QoS 1 through the outbox), so they are
    # matched with the jsonl record instead of the order on the wire.
    deadline = time.monotonic() + WAIT_S
    while True:
        recorded = {c["window_id"]: c for c in daemon.captions()}
        missing = [e["window_id"] for e in embeddings if e["window_id"] not in recorded]
        if not missing:
            break
        assert time.monotonic() < deadline, missing
        await asyncio.sleep(0.1)
    for c in captions:
        assert recorded[c["window_id"]] == c
    # Home Assistant's state topic never carries an embedding.
    for topic, payload, _ in got:
        if topic.endswith("/ha_state"):
            assert isinstance(payload, dict) and "vector" not in payload
            assert len(payload["state"]) <= 255


async def test_malformed_frames_get_errors_and_the_connection_stays_up(
        daemon: RunningDaemon) -> None:
    async with connect(daemon.ws_url, additional_headers=auth()) as ws:
        assert (await receive(ws))["type"] == "hello"
        await ws.send("{this is not json")
        await ws.send(b"\x00\x01binary")
        await ws.send(json.dumps([1, 2, 3]))
        await ws.send(json.dumps({"type": "dance", "id": 3}))
        await ws.send(json.dumps({"type": "subscribe", "kinds": ["smell"], "id": "s9"}))
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        frames = await collect(ws, lambda fs: bool(of_type(fs, "pong")))
        errors = of_type(frames, "error")
        for err in errors:
            check_frame(err)
        assert [e["code"] for e in errors] == ["bad_json", "bad_frame", "bad_frame",
                                               "unknown_type", "bad_field"]
        assert errors[3]["details"].get("id") == 3
        assert errors[4]["details"] == {"field": "kinds", "id": "s9"}
        assert of_type(frames, "pong")[0]["id"] == 7
        check_frame(of_type(frames, "pong")[0])
        # still subscribed and served: a live caption arrives after all that
        before = {c["window_id"] for c in of_type(frames, "caption")}
        later = await collect(ws, lambda fs: any(f["type"] == "caption"
                                                 and f["window_id"] not in before for f in fs))
        check_frame(of_type(later, "caption")[-1])


@pytest.mark.parametrize("headers, query", [
    ({"Authorization": "Bearer wrong-token"}, ""),
    ({}, ""),
    ({}, "?token=wrong-token"),
])
async def test_a_bad_or_missing_token_is_refused(daemon: RunningDaemon, headers: dict[str, str],
                                                 query: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(daemon.ws_url + query, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401
    # the right token in the query works (what the live page does)
    async with connect(f"{daemon.ws_url}?token={TOKEN}") as ws:
        assert (await receive(ws))["type"] == "hello"


async def test_a_client_that_stops_reading_does_not_delay_another(
        daemon: RunningDaemon) -> None:
    daemon.wait_captions(1)
    # A tiny receive buffer, and max_queue=1: the library stops reading from the socket as
    # soon as one frame waits, and the kernel soon stops accepting data for it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.ws_port))
    sock.setblocking(False)
    async with connect(daemon.ws_url, additional_headers=auth(), max_queue=1, sock=sock,
                       close_timeout=1) as stuck:  # it cannot read the server's close either
        await stuck.send(json.dumps({"type": "subscribe", "kinds": "*", "backfill": 5}))
        async with connect(daemon.ws_url, additional_headers=auth()) as reader:
            await asyncio.to_thread(daemon.wait_metric, "streamcap_websocket_clients",
                                    '{sink="ws"}', lambda v: v >= 2)
            start = max(c["seq"] for c in daemon.captions())
            frames = await collect(reader, lambda fs: len(
                [c for c in of_type(fs, "caption") if c["seq"] > start]) >= 4)
        live = [c for c in of_type(frames, "caption") if c["seq"] > start]
        assert_in_order(live)
        # the reading client missed nothing the daemon published in that stretch
        lo, hi = live[0]["seq"], live[-1]["seq"]
        deadline = time.monotonic() + WAIT_S
        while not any(c["seq"] >= hi for c in daemon.captions()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        published = [c["window_id"] for c in daemon.captions() if lo <= c["seq"] <= hi]
        assert [c["window_id"] for c in live] == published


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")
async def test_live_page_in_chromium_shows_a_caption(daemon: RunningDaemon) -> None:
    daemon.wait_captions(1)
    selector = f'[data-source="{SOURCE}"] li.caption'
    dom = await asyncio.to_thread(dump_dom, daemon.http(f"/?token={TOKEN}"), WAIT_S,
                                  wait_for=f"document.querySelector('{selector}')")
    match = re.search(rf'<section[^>]*data-source="{SOURCE}"[^>]*>(.*?)</section>', dom,
                      re.DOTALL)
    assert match, f"no card for {SOURCE}:\n{dom[-3000:]}"
    card = match[1]
    assert 'class="caption' in card
    shown = html.unescape(card)
    texts = [c["text"] for c in daemon.captions()]
    assert any(text and text in shown for text in texts), card[:2000]
    assert f'<dd id="node">{NODE}</dd>' in dom


def test_plugins_command_lists_the_jsonl_plugin_as_enabled(daemon: RunningDaemon) -> None:
    done = subprocess.run([*streamcap_command(), "plugins", "--config", str(daemon.config),
                           "--json"], capture_output=True, text=True, timeout=scaled(120),
                          env={k: v for k, v in daemon.env.items()
                               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}, check=False)
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert listing["config"] == str(daemon.config)
    rows = {(r["group"], r["name"]): r for r in listing["plugins"]}
    jsonl = rows[("streamcap.sinks", "jsonl")]
    assert (jsonl["distribution"], jsonl["enabled_by"]) == ("streamcap-jsonl", ["sinks.archive"])
    assert rows[("streamcap.sinks", "websocket")]["enabled_by"] == ["sinks.ws"]
    assert rows[("streamcap.sinks", "mqtt")]["enabled_by"] == ["sinks.broker"]
    assert rows[("streamcap.sources", "file")]["enabled_by"] == [f"sources.{SOURCE}"]
    assert rows[("streamcap.sources", "mic")]["enabled_by"] == []
    # and it runs through the daemon: its file holds valid frames of every kind
    frames = daemon.frames()
    assert {f["type"] for f in frames} == {"caption", "embedding", "status"}
    for frame in frames[:20]:
        check_frame(frame)


def test_broker_restart_loses_no_caption_for_a_persistent_subscriber(
        daemon: RunningDaemon) -> None:
    before = len(daemon.wait_captions(1))
    daemon.broker.stop()
    daemon.wait_metric("streamcap_mqtt_connected", '{sink="broker"}', lambda v: v == 0)
    during = len(daemon.wait_captions(before + 3))  # captions keep coming while it is down
    daemon.broker.start()
    daemon.wait_metric("streamcap_mqtt_connected", '{sink="broker"}', lambda v: v == 1)
    reference = daemon.wait_captions(during + 3)
    want = {c["window_id"]: c for c in reference}

    deadline = time.monotonic() + WAIT_S
    while True:
        received = [(t, p) for t, p in mqtt_lines(daemon.persistent_out)
                    if t == f"{PREFIX}/{SOURCE}/caption"]
        ids = [json.loads(p)["window_id"] for _, p in received]
        missing = sorted(set(want) - set(ids), key=lambda w: want[w]["seq"])
        if not missing:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} of {len(want)} captions never reached the "
                                 f"persistent subscriber: {missing[:10]}\n{daemon.log_tail()}")
        time.sleep(0.2)
    frames = [json.loads(p) for _, p in received]
    # duplicates are identifiable by window_id and are the same frame
    first: dict[str, dict[str, Any]] = {}
    for frame in frames:
        check_frame(frame)
        if frame["window_id"] in first:
            assert frame == first[frame["window_id"]]
        else:
            first[frame["window_id"]] = frame
    # in order, once duplicates are dropped, and exactly what the daemon published
    assert_in_order(list(first.values()))
    recorded = {c["window_id"]: c for c in daemon.captions()}
    for window_id, frame in first.items():
        assert recorded.get(window_id) == frame
    print(f"persistent subscriber: {len(frames)} caption messages, "
          f"{len(frames) - len(first)} duplicates, {during - before} captions while the broker "
          f"was down")


def test_sigterm_exits_0_offline_is_retained_and_jsonl_has_the_captions(
        daemon: RunningDaemon) -> None:
    daemon.wait_captions(1)
    assert daemon.stop() == 0, daemon.log_tail()
    messages = daemon.notify.snapshot()
    ready, stopping = daemon.notify.index("READY", "1"), daemon.notify.index("STOPPING", "1")
    assert ready is not None and stopping is not None and ready < stopping, messages
    retained = mosquitto_sub(daemon.broker, f"{PREFIX}/availability", count=1, wait_s=scaled(20))
    assert retained == [(f"{PREFIX}/availability", "offline")]
    # the jsonl sink was flushed: every caption the daemon published is in the file
    stopped = [e for e in daemon.log_events() if e.get("event") == "stopped" and "captions" in e]
    assert stopped, daemon.log_tail()
    captions = daemon.captions()
    assert len(captions) == stopped[-1]["captions"] > 0
    assert_in_order(captions)
    statuses = [f for f in daemon.frames() if f["type"] == "status"]
    assert statuses[-1]["state"] == "stopped"


# --------------------------------------------------------------------------- three sources


def test_three_looped_sources_one_through_ffmpeg_all_captioned_and_sigterm_stops_in_time(
        jsonl_installed: None, tmp_path: Path) -> None:
    """Two WAV files and an MP3 (decoded by a real ffmpeg child; longer than a minute so
    that it is streamed, not cached) looped in real time, windows every 0.5 s each: more
    than the tiny model captions, so windows are dropped. Every source gets captions; after
    one SIGTERM the daemon exits 0 within a bound derived from stop_timeout_s."""
    stop_timeout_s = 5.0
    files = {"low": write_wav(tmp_path / "low.wav"),
             "high": make_tone_file(tmp_path / "high.wav", frequency_hz=1200, duration_s=12,
                               sample_rate_hz=RATE),
             "mp3": make_tone_file(tmp_path / "tone.mp3", frequency_hz=660, duration_s=75,
                              sample_rate_hz=44100)}
    jsonl = tmp_path / "archive.jsonl"
    http_port = free_port()
    sources = "".join(f"""
[sources.{name}]
uri = "file:{path}?loop=true"
window_s = 10
hop_s = 0.5
""" for name, path in files.items())
    config = tmp_path / "three.toml"
    config.write_text(f"""
[daemon]
node_id = "three"
state_dir = "{tmp_path / 'state'}"
log_format = "json"
max_pending_windows = 2
stop_timeout_s = {stop_timeout_s}

{tiny_model_toml()}{sources}
[sinks.archive]
plugin = "jsonl"
path = "{jsonl}"

[http]
port = {http_port}
""", encoding="utf-8")
    daemon = DaemonProcess.start(config, env={"PYTHONUNBUFFERED": "1"}, log=tmp_path / "log",
                                 jsonl=jsonl, http_port=http_port)
    try:
        deadline = time.monotonic() + 2 * WAIT_S
        while True:
            counts = {name: 0 for name in files}
            for c in daemon.captions():
                counts[c["source_id"]] += 1
            if sum(counts.values()) >= 12:
                # served in turn: of twelve captions each source has about four
                assert min(counts.values()) >= 3, f"captions per source: {counts}"
                break
            daemon.check_alive()
            assert time.monotonic() < deadline, f"captions per source: {counts}\n" \
                                                f"{daemon.log_tail()}"
            time.sleep(0.2)
        text = daemon.wait_metric("streamcap_windows_dropped_total",
                                  '{source="mp3",reason="queue_full"}', lambda v: v > 0)
        assert metric_samples(text, "streamcap_source_running")['{source="mp3"}'] == 1
        daemon.proc.send_signal(signal.SIGTERM)
        # the bound on this wait: the stop budget, the teardown's spare second and a
        # generous allowance for the interpreter's exit on a small shared machine
        try:
            code = daemon.proc.wait(timeout=stop_timeout_s + 60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit within stop_timeout_s + 60 s of SIGTERM:\n"
                                 f"{daemon.log_tail()}") from None
        assert code == 0, daemon.log_tail()
        events = daemon.log_events()
        assert [e for e in events if e.get("event") == "stopped" and "captions" in e]
        assert not [e for e in events if "abandoned" in str(e.get("event"))], daemon.log_tail()
        statuses = {f["source_id"]: f["state"] for f in daemon.frames() if f["type"] == "status"}
        assert statuses == {name: "stopped" for name in files}
    finally:
        daemon.kill()
