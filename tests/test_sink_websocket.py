"""Tests for streamcap.sinks.websocket with real websockets clients on 127.0.0.1.

Every sink listens on port 0 and is driven through a real Inbox. The slow-client
test uses a raw socket with a tiny receive buffer, speaking WebSocket through
websockets' sans-I/O ClientProtocol, so that it can stop reading for real.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs
from timing import scaled
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Origin
from websockets.uri import parse_uri

from streamcap.bus import wire
from streamcap.bus.inbox import DropPolicy, Inbox
from streamcap.bus.plugin import RecentHistory, SinkContext, SinkEndpoint, recall_history
from streamcap.errors import ConfigError, HistoryError
from streamcap.history.records import WindowRecord
from streamcap.messages import (
    Caption,
    CaptionCandidate,
    Embedding,
    SourceState,
    SourceStatus,
    TriggerEvent,
    TriggerState,
)
from streamcap.sinks.websocket import WebSocketSink, create_sink
from streamcap.stats import Metrics

TIMEOUT = scaled(20.0)
"""Generous bound on every wait: a test fails by timing out only when something is broken."""

Json = dict[str, Any]
RUN = "0123456789abcdef"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "streamcap.v1.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- messages


def caption(source: str, seq: int, text: str = "a dog barks") -> Caption:
    return Caption(
        window_id=f"{source}:{RUN}:0:{seq * 5000}", run_id=RUN, source_id=source, seq=seq,
        start_s=seq * 5.0, end_s=seq * 5.0 + 10.0, captured_at=1_700_000_000.0 + seq * 5,
        text=f"{text} {seq}", score=0.5, model="tiny",
        candidates=(CaptionCandidate(text=f"{text} {seq}", decoder_score=-1.5, score=0.5),),
        latency_ms=12.0, lag_s=0.3,
    )


def embedding(source: str, seq: int, dim: int = 8) -> Embedding:
    vec = np.random.default_rng(seq).standard_normal(dim).astype(np.float32)
    vec /= np.linalg.norm(vec)
    vec.flags.writeable = False
    return Embedding(window_id=f"{source}:{RUN}:0:{seq * 5000}", run_id=RUN, source_id=source,
                     seq=seq,
                     start_s=seq * 5.0, end_s=seq * 5.0 + 10.0, model="tiny-retriever",
                     vector=vec)


def status(source: str, state: SourceState = SourceState.RUNNING) -> SourceStatus:
    return SourceStatus(source_id=source, state=state, reason="test", at=1_700_000_000.0)


def trigger(n: int, state: TriggerState, *, source: str = "kitchen", name: str = "dog",
            fired_id: str = "") -> TriggerEvent:
    """Event number ``n`` of this run, named as the engine names it."""
    return TriggerEvent(event_id=f"{RUN}-{name}-{source}-{n}", trigger=name, source_id=source,
                        state=state, score=0.4, threshold=0.3, start_s=float(n), end_s=n + 5.0,
                        captured_at=1_700_000_000.0 + n, model="tiny-retriever", run_id=RUN,
                        fired_id=fired_id, caption="a dog barks")


def announcement(n: int, *, source: str = "kitchen", name: str = "dog") -> TriggerEvent:
    """The engine's state announcement at start: off, no firing, NaN numbers."""
    nan = float("nan")
    return TriggerEvent(event_id=f"{RUN}-{name}-{source}-{n}", trigger=name, source_id=source,
                        state=TriggerState.OFF, score=nan, threshold=nan, start_s=nan,
                        end_s=nan, captured_at=1_700_000_000.0, model="tiny-retriever",
                        run_id=RUN)


def expected(msg: Caption | Embedding | SourceStatus | TriggerEvent) -> Json:
    """What a client must receive for ``msg``: the wire frame, through JSON."""
    out: Json = json.loads(wire.encode(wire.to_wire(msg, node_id="node1")))
    return out


# --------------------------------------------------------------------------- harness


@dataclass
class Running:
    sink: WebSocketSink
    inbox: Inbox
    task: asyncio.Task[None]
    metrics: Metrics

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.sink.bound_port}/"

    def offer(self, *msgs: Caption | Embedding | SourceStatus | TriggerEvent) -> None:
        for m in msgs:
            self.inbox.offer(m)

    async def settled(self) -> None:
        """Until the sink has taken (and so dispatched) everything offered so far."""
        await until(lambda: self.inbox.depth == 0)

    def dropped(self, kind: str) -> float:
        return self.metrics.counter("streamcap_websocket_dropped_total", "",
                                    ("sink", "kind")).value("ws", kind)

    def clients(self) -> float:
        return self.metrics.gauge("streamcap_websocket_clients", "", ("sink",)).value("ws")


async def until(cond: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), TIMEOUT)


SinkFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_sink(tmp_path: Path) -> AsyncIterator[SinkFactory]:
    """Start a sink with the given options; every sink is stopped (inbox closed) at teardown."""
    running: list[Running] = []

    async def start(options: Mapping[str, object] | None = None, *,
                    recall: RecentHistory | None = None) -> Running:
        sink = create_sink("ws", {"port": 0, **(options or {})})
        if recall is not None:  # as the daemon does, before the sink's first run
            sink.recall(recall)
        inbox = Inbox("ws", max_pending=10_000,
                      policies={"embedding": DropPolicy.DROP_OLDEST,
                                "status": DropPolicy.DROP_OLDEST})
        metrics = Metrics()
        ready = asyncio.Event()
        ctx = SinkContext(instance="ws", node_id="node1", metrics=metrics, ready=ready.set,
                          logger=structlog.get_logger().bind(sink="ws"), state_dir=tmp_path,
                          run_id=RUN)
        task = asyncio.create_task(sink.run(inbox, ctx), name="streamcap[sink:ws].run")
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        assert sink.bound_port is not None and sink.bound_port > 0
        r = Running(sink=sink, inbox=inbox, task=task, metrics=metrics)
        running.append(r)
        return r

    yield start
    for r in running:
        r.inbox.close()
        await asyncio.wait_for(r.task, TIMEOUT)


async def recv(ws: ClientConnection) -> Json:
    data = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(data, str)
    frame: Json = json.loads(data)
    return frame


async def recv_until(ws: ClientConnection, frame_type: str) -> Json:
    while (frame := await recv(ws))["type"] != frame_type:
        pass
    return frame


async def greet(ws: ClientConnection) -> tuple[Json, Json]:
    """The hello and the default subscription's ``subscribed`` frame."""
    hello, subscribed = await recv(ws), await recv(ws)
    assert hello["type"] == "hello" and subscribed["type"] == "subscribed"
    return hello, subscribed


async def subscribe(ws: ClientConnection, **fields: object) -> Json:
    await ws.send(json.dumps({"type": "subscribe", **fields}))
    return await recv_until(ws, "subscribed")


# --------------------------------------------------------------------------- hello, order, fields


async def test_hello_then_default_subscription(start_sink: SinkFactory,
                                              validator: jsonschema.Draft202012Validator) -> None:
    r = await start_sink()
    r.offer(status("kitchen"), caption("garden", 0))
    await r.settled()
    async with connect(r.url) as ws:
        hello, subscribed = await greet(ws)
        validator.validate(hello)
        validator.validate(subscribed)
        assert hello["v"] == wire.PROTOCOL_VERSION and hello["protocol"] == wire.PROTOCOL
        assert hello["node_id"] == "node1" and hello["run_id"] == RUN
        caps = hello["capabilities"]
        # what a client can expect from the backfill: this run's memory, and how much
        assert caps["history"] == {"store": "memory", "covers": "run", "max_captions": 20,
                                   "scope": "source", "captions": {"kitchen": 0, "garden": 1}}
        assert caps["max_queue"] == 256 and caps["max_queue_bytes"] == 4 * 1024 * 1024
        assert caps["kinds"] == ["caption", "embedding", "status", "trigger"]
        assert caps["sources"] == ["kitchen", "garden"]
        assert caps["backfill"] == 20 and caps["backfill_scope"] == "source"
        assert caps["auth_required"] is False and caps["tls"] is False
        assert caps["default_subscription"] == {"sources": "*",
                                                "kinds": ["caption", "status", "trigger"]}
        assert subscribed == {"type": "subscribed", "v": 1, "sources": "*",
                              "kinds": ["caption", "status", "trigger"], "backfill": 1}
        # the replay: current status of each source, then the backfilled captions
        assert await recv(ws) == expected(status("kitchen"))
        assert await recv(ws) == expected(caption("garden", 0))
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert "streamcap[sink:ws].client-1" in names
        assert "streamcap[sink:ws].client-1.writer" in names
        assert r.clients() == 1
    await until(lambda: r.clients() == 0)


async def test_every_kind_arrives_in_order_with_the_schema_fields(
        start_sink: SinkFactory) -> None:
    r = await start_sink()
    async with connect(r.url) as ws:
        await greet(ws)
        ack = await subscribe(ws, kinds="*", id="s1")
        assert ack["kinds"] == ["caption", "embedding", "status", "trigger"] and ack["id"] == "s1"
        msgs: list[Caption | Embedding | SourceStatus] = [status("kitchen")]
        for seq in range(5):
            msgs += [embedding("kitchen", seq, dim=16), caption("kitchen", seq),
                     caption("garden", seq)]
        msgs.append(status("kitchen", SourceState.STALLED))
        r.offer(*msgs)
        got = [await recv(ws) for _ in msgs]
    assert got == [expected(m) for m in msgs]
    kitchen_seqs = [f["seq"] for f in got if f["type"] == "caption" and
                    f["source_id"] == "kitchen"]
    assert kitchen_seqs == list(range(5))
    emb = next(f for f in got if f["type"] == "embedding")
    assert emb["dim"] == 16 and len(emb["vector"]) == 16


async def test_trigger_frames_by_default_and_the_latest_state_backfilled(
        start_sink: SinkFactory, validator: jsonschema.Draft202012Validator) -> None:
    """Trigger events reach a client that never subscribed; a client that connects later
    gets the latest state of every (source, trigger) pair before the captions; one that
    subscribes to captions only gets none; a trigger removed at run time is not replayed."""
    r = await start_sink()
    r.offer(announcement(1), announcement(1, name="glass"), announcement(1, source="garden"))
    await r.settled()
    async with connect(r.url) as early, connect(r.url) as captions_only:
        await greet(early)
        await greet(captions_only)
        await subscribe(captions_only, kinds=["caption"])
        [await recv(early) for _ in range(3)]  # the announcements' backfill
        live = [trigger(2, TriggerState.ON), caption("kitchen", 0),
                trigger(3, TriggerState.OFF, fired_id=f"{RUN}-dog-kitchen-2"),
                trigger(4, TriggerState.ON)]
        r.offer(*live)
        got = [await recv(early) for _ in live]
        assert got == [expected(m) for m in live]
        for frame in got:
            validator.validate(frame)
        assert await recv(captions_only) == expected(caption("kitchen", 0))
        await captions_only.send(json.dumps({"type": "ping", "id": 1}))
        assert await recv(captions_only) == {"type": "pong", "v": 1, "id": 1}
    async with connect(r.url) as late:
        _, subscribed = await greet(late)
        assert subscribed["backfill"] == 1  # captions replayed; trigger states come besides
        replay = [await recv(late) for _ in range(4)]
        assert replay == [expected(announcement(1, name="glass")),
                          expected(announcement(1, source="garden")),
                          expected(trigger(4, TriggerState.ON)),
                          expected(caption("kitchen", 0))]
        for frame in replay:
            validator.validate(frame)
    r.sink.triggers_changed({})  # every trigger removed
    async with connect(r.url) as after:
        _, subscribed = await greet(after)
        assert await recv(after) == expected(caption("kitchen", 0))


async def test_subscription_filters_by_source_and_kind(start_sink: SinkFactory) -> None:
    r = await start_sink()
    async with connect(r.url) as only_kitchen_captions, connect(r.url) as everything:
        await greet(only_kitchen_captions)
        await greet(everything)
        ack = await subscribe(only_kitchen_captions, sources=["kitchen"], kinds=["caption"])
        assert ack["sources"] == ["kitchen"] and ack["kinds"] == ["caption"]
        msgs: list[Caption | Embedding | SourceStatus] = [
            caption("garden", 1), status("kitchen"), embedding("kitchen", 1),
            caption("kitchen", 1), status("garden"), caption("kitchen", 2)]
        r.offer(*msgs)
        assert await recv(only_kitchen_captions) == expected(caption("kitchen", 1))
        assert await recv(only_kitchen_captions) == expected(caption("kitchen", 2))
        # the default subscription: captions and status of every source, no embeddings
        default = [m for m in msgs if not isinstance(m, Embedding)]
        assert [await recv(everything) for _ in default] == [expected(m) for m in default]
        # nothing else was queued for the filtered client: the next frame is the pong
        await only_kitchen_captions.send(json.dumps({"type": "ping", "id": 3}))
        assert await recv(only_kitchen_captions) == {"type": "pong", "v": 1, "id": 3}


async def test_backfill_on_connect_per_source(start_sink: SinkFactory) -> None:
    r = await start_sink({"backfill": 4})
    msgs: list[Caption | Embedding | SourceStatus] = [caption("kitchen", s) for s in range(6)]
    msgs.append(caption("garden", 0))
    msgs.insert(3, caption("garden", 99))
    r.offer(*msgs)
    await r.settled()
    async with connect(r.url) as ws:
        _, subscribed = await greet(ws)
        assert subscribed["backfill"] == 6
        got = [await recv(ws) for _ in range(6)]
        want = [caption("garden", 99), caption("kitchen", 3), caption("kitchen", 4),
                caption("kitchen", 5), caption("garden", 0)]
        # the last 4 of kitchen (2..5) and both of garden, in the order they were published
        assert [(f["source_id"], f["seq"]) for f in got] == [
            ("kitchen", 2), ("garden", 99), ("kitchen", 3), ("kitchen", 4), ("kitchen", 5),
            ("garden", 0)]
        assert got[1:] == [expected(m) for m in want]
        # narrowing the subscription replays nothing; widening replays only what it adds
        assert (await subscribe(ws, sources=["garden"]))["backfill"] == 0
        ack = await subscribe(ws, sources="*", backfill=1)
        assert ack["backfill"] == 1
        assert await recv(ws) == expected(caption("kitchen", 5))
        # a later live caption follows the backfill
        r.offer(caption("kitchen", 6))
        assert await recv(ws) == expected(caption("kitchen", 6))


async def test_backfill_global_keeps_the_last_n_overall(start_sink: SinkFactory) -> None:
    r = await start_sink({"backfill": 3, "backfill_scope": "global"})
    r.offer(caption("a", 0), caption("b", 0), caption("a", 1), caption("b", 1))
    await r.settled()
    async with connect(r.url) as ws:
        _, subscribed = await greet(ws)
        assert subscribed["backfill"] == 3
        assert [await recv(ws) for _ in range(3)] == [
            expected(caption("b", 0)), expected(caption("a", 1)), expected(caption("b", 1))]


# --------------------------------------------------------------------------- slow clients


class RawClient:
    """A WebSocket client on a plain socket with a tiny receive buffer, read only on demand."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self.frames: list[Json] = []

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"))
        protocol.send_request(protocol.connect())
        client = cls(sock, protocol)
        await client._flush()
        while protocol.state is State.CONNECTING:
            await client._read_some()
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
        return client

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.protocol.data_to_send():
            if data:
                await loop.sock_sendall(self.sock, data)

    async def _read_some(self) -> None:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), TIMEOUT)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.frames.append(json.loads(bytes(event.data)))
        await self._flush()  # pongs

    async def send_json(self, obj: object) -> None:
        self.protocol.send_text(json.dumps(obj).encode())
        await self._flush()

    async def read_until(self, cond: Callable[[Json], bool]) -> None:
        async def loop() -> None:
            while not any(cond(f) for f in self.frames):
                await self._read_some()
        await asyncio.wait_for(loop(), TIMEOUT)

    def close(self) -> None:
        self.sock.close()


async def test_a_client_that_stops_reading_does_not_delay_another(
        start_sink: SinkFactory) -> None:
    r = await start_sink()  # default max_queue (256 frames) and max_queue_bytes (4 MiB)
    assert r.sink.bound_port is not None
    slow = await RawClient.connect(r.sink.bound_port)
    try:
        await slow.send_json({"type": "subscribe", "kinds": "*"})
        await slow.read_until(lambda f: f["type"] == "subscribed" and
                              "embedding" in f["kinds"])
        async with connect(r.url) as fast:
            await greet(fast)
            n = 200
            # about 45 kB per embedding, 9 MB in all: more bytes than a client's queue holds,
            # while the fast client's 201 frames fit in it
            msgs: list[Caption | Embedding | SourceStatus] = []
            for seq in range(n):
                msgs += [embedding("kitchen", seq, dim=4096), caption("kitchen", seq)]
            msgs.append(status("kitchen", SourceState.STOPPED))
            r.offer(*msgs)
            got = [await recv(fast) for _ in range(n + 1)]
            # the fast client got every caption, in order, and never a drop notice
            assert [f["seq"] for f in got[:n]] == list(range(n))
            assert all(f["type"] == "caption" for f in got[:n])
            assert got[n] == expected(status("kitchen", SourceState.STOPPED))
            # ... while the slow one really was stuck: its queue overflowed (in bytes)
            assert r.dropped("embedding") > 0 and r.dropped("caption") == 0

            # once it reads again it learns how many frames it missed, then gets the rest
            before = len(slow.frames)
            await slow.read_until(lambda f: f["type"] == "status")
            later = slow.frames[before:]
            notices = [f for f in later if f["type"] == "error"]
            assert notices and all(f["code"] == "dropped" for f in notices)
            missed = sum(f["details"]["dropped"] for f in notices)
            dropped_total = sum(r.dropped(k) for k in ("caption", "embedding", "status"))
            assert missed == dropped_total
            data = [f for f in later if f["type"] != "error"]
            assert len(data) + missed == len(msgs)
            seqs = [f["seq"] for f in data if f["type"] == "caption"]
            assert seqs == sorted(seqs)
    finally:
        slow.close()


async def test_a_slow_reader_with_default_client_settings_stays_connected_and_is_told(
        start_sink: SinkFactory) -> None:
    """A live client that reads more slowly than frames come is not cut off.

    The client is the websockets library with its defaults: past 16 unread frames
    it stops reading the socket until its application has taken 12 of them, and
    only then answers pings. The server's keepalive is short here (and the
    messages many) so that a backlog kept on the wire, behind the ping, would time
    the keepalive out within the test; the backlog must instead stay in the
    client's queue in the sink, which drops the oldest frames, counts them and
    tells the client.
    """
    r = await start_sink({"ping_interval_s": 0.5, "ping_timeout_s": 3})
    n = 3000
    msgs: list[Caption | Embedding | SourceStatus] = [
        caption("kitchen", seq, text="a kettle whistles while a dog barks " * 4)
        for seq in range(n)]
    msgs.append(status("kitchen", SourceState.STOPPED))
    async with connect(r.url) as ws:  # every client setting at its default
        await greet(ws)
        r.offer(*msgs)
        frames: list[Json] = []
        while not frames or frames[-1]["type"] != "status":
            await asyncio.sleep(0.02)  # the slow reader: about 50 frames a second at most
            frames.append(await recv(ws))  # ConnectionClosed here: the reader was cut off
        assert r.clients() == 1
    notices = [f for f in frames if f["type"] == "error"]
    assert notices and all(f["code"] == "dropped" for f in notices)
    missed = sum(f["details"]["dropped"] for f in notices)
    assert missed == r.dropped("caption") > 0
    data = [f for f in frames if f["type"] != "error"]
    assert len(data) + missed == len(msgs)  # every frame either arrived or was announced
    assert data[-1] == expected(status("kitchen", SourceState.STOPPED))
    seqs = [f["seq"] for f in data if f["type"] == "caption"]
    assert seqs == sorted(seqs) and seqs[-1] == n - 1  # the oldest were dropped, not the newest


async def test_a_dead_peer_is_still_closed_by_the_keepalive(start_sink: SinkFactory) -> None:
    r = await start_sink({"ping_interval_s": 0.5, "ping_timeout_s": 1})
    assert r.sink.bound_port is not None
    dead = await RawClient.connect(r.sink.bound_port)  # never reads again, never answers a ping
    try:
        await until(lambda: r.clients() == 1)
        r.offer(*[caption("kitchen", seq) for seq in range(50)])
        await until(lambda: r.clients() == 0)
    finally:
        dead.close()


# --------------------------------------------------------------------------- client errors


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("this is not json", "bad_json"),
        (b"\x01\x02binary", "bad_frame"),
        ("[1, 2, 3]", "bad_frame"),
        ('{"type": "unsubscribe"}', "unknown_type"),
        ('{"type": "subscribe", "kinds": "caption"}', "bad_field"),
        ('{"type": "subscribe", "sources": [1, 2]}', "bad_field"),
        ('{"type": "subscribe", "backfill": "all"}', "bad_field"),
        ('{"type": "subscribe", "kinds": ["smell"]}', "bad_field"),
    ],
)
async def test_malformed_frames_get_an_error_and_the_connection_stays_up(
        start_sink: SinkFactory, payload: str | bytes, code: str) -> None:
    r = await start_sink()
    async with connect(r.url) as ws:
        await greet(ws)
        await ws.send(payload)
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == code and err["message"]
        assert err["v"] == wire.PROTOCOL_VERSION
        # still connected, and a later subscribe works
        ack = await subscribe(ws, sources=["hall"], kinds=["status"])
        assert ack["sources"] == ["hall"]
        r.offer(caption("hall", 1), status("hall"))
        assert await recv(ws) == expected(status("hall"))


async def test_application_and_protocol_pings(start_sink: SinkFactory) -> None:
    r = await start_sink({"ping_interval_s": 0.5, "ping_timeout_s": 5})
    async with connect(r.url) as ws:
        await greet(ws)
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv(ws) == {"type": "pong", "v": 1}
        latency = await asyncio.wait_for(await ws.ping(), TIMEOUT)
        assert latency >= 0


async def test_shutdown_flushes_queued_frames_then_closes_going_away(
        start_sink: SinkFactory) -> None:
    r = await start_sink()
    async with connect(r.url) as ws:
        await greet(ws)
        r.offer(caption("kitchen", 1), caption("kitchen", 2))
        r.inbox.close()
        assert await recv(ws) == expected(caption("kitchen", 1))
        assert await recv(ws) == expected(caption("kitchen", 2))
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 1001
    await asyncio.wait_for(r.task, TIMEOUT)


# --------------------------------------------------------------------------- auth


async def test_bearer_token_header_and_query(start_sink: SinkFactory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_WS_TOKEN", "s3cret-token")
    r = await start_sink({"token_env": "TEST_WS_TOKEN"})
    for headers, query in [({}, ""), ({"Authorization": "Bearer wrong"}, ""),
                           ({"Authorization": "Basic s3cret-token"}, ""), ({}, "?token=nope")]:
        with pytest.raises(InvalidStatus) as info:
            async with connect(r.url + query, additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.clients() == 0  # refused at the handshake: never a client
    async with connect(r.url, additional_headers={"Authorization": "Bearer s3cret-token"}) as ws:
        hello, _ = await greet(ws)
        assert hello["capabilities"]["auth_required"] is True
    async with connect(r.url + "?token=s3cret-token") as ws:
        await greet(ws)


async def test_allowed_origins(start_sink: SinkFactory) -> None:
    r = await start_sink({"allowed_origins": ["https://home.example"]})
    with pytest.raises(InvalidStatus) as info:
        async with connect(r.url, origin=Origin("https://evil.example")):
            pass
    assert info.value.response.status_code == 403
    async with connect(r.url, origin=Origin("https://home.example")) as ws:
        await greet(ws)
    async with connect(r.url) as ws:  # no Origin header: not a browser, allowed
        await greet(ws)


async def test_the_sink_leaves_the_clear_text_warning_to_preflight(
        start_sink: SinkFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-loopback sink without TLS is warned about once, by preflight (which
    check-config runs too), not again by the sink at every (re)start."""
    monkeypatch.setenv("TEST_WS_TOKEN", "s3cret-token")
    with capture_logs() as logs:
        r = await start_sink({"host": "0.0.0.0", "token_env": "TEST_WS_TOKEN"})
        async with connect(f"ws://127.0.0.1:{r.sink.bound_port}/?token=s3cret-token") as ws:
            await greet(ws)
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
    assert any(e["event"] == "websocket sink listening" for e in logs)


def test_non_loopback_bind_without_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        create_sink("ws", {"host": "0.0.0.0"})
    assert "sinks.ws.host" in str(info.value) and "token_env" in str(info.value)
    monkeypatch.setenv("TEST_WS_TOKEN", "x" * 32)
    sink = create_sink("ws", {"host": "0.0.0.0", "token_env": "TEST_WS_TOKEN"})
    assert sink.options.host == "0.0.0.0"
    assert create_sink("ws", {"host": "::1"}).options.host == "::1"


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        ({"port": 70000}, "sinks.ws.port", "must be between 0 and 65535 (got 70000)"),
        ({"port": "8765"}, "sinks.ws.port", "integer"),
        ({"backfill": -1}, "sinks.ws.backfill", "must be between 0 and 10000 (got -1)"),
        ({"backfill": 2.5}, "sinks.ws.backfill", "expected an integer (got a number 2.5)"),
        ({"max_queue": 0}, "sinks.ws.max_queue", "must be between 1 and 1000000"),
        ({"ping_timeout_s": float("nan")}, "sinks.ws.ping_timeout_s", "finite"),
        ({"host": ""}, "sinks.ws.host", "must not be empty"),
        ({"backfill_scope": "node"}, "sinks.ws.backfill_scope", "source, global"),
        ({"accepts": ["caption", "smell"]}, "sinks.ws.accepts",
         "must be some of caption, embedding, status"),
        ({"allowed_origins": ["https://a", ""]}, "sinks.ws.allowed_origins",
         "non-empty strings"),
        ({"allowed_origins": "https://a"}, "sinks.ws.allowed_origins", "array"),
        ({"ping_interval_s": 0}, "sinks.ws.ping_interval_s", "> 0"),
        ({"token_env": "STREAMCAP_TEST_UNSET_VAR"}, "sinks.ws.token_env",
         "STREAMCAP_TEST_UNSET_VAR is not set"),
        ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"},
         "sinks.ws.tls_cert", "/nonexistent/cert.pem"),
        ({"tls_cert": "/nonexistent/cert.pem"}, "sinks.ws.tls_key", "needed"),
        ({"prot": 1}, "sinks.ws.prot",
         "unknown key (known keys: accepts, allowed_hosts, allowed_origins, "),
        ({"ping_interval_s": 3601}, "sinks.ws.ping_interval_s", "> 0 and <= 3600"),
        ({"ping_timeout_s": 1e9}, "sinks.ws.ping_timeout_s", "> 0 and <= 3600"),
        ({"ping_interval_s": float("inf")}, "sinks.ws.ping_interval_s", "finite"),
        ({"max_clients": 0}, "sinks.ws.max_clients", "must be between 1 and 65535 (got 0)"),
        ({"max_clients": 65_536}, "sinks.ws.max_clients", "must be between 1 and 65535"),
        ({"allowed_origins": ["home.example"]}, "sinks.ws.allowed_origins",
         "expected origins such as 'https://home.example'"),
        ({"allowed_hosts": ["home.example:8765"]}, "sinks.ws.allowed_hosts",
         "host name without scheme, port or path"),
        ({"allowed_hosts": [""]}, "sinks.ws.allowed_hosts", "host name without"),
        # one rule with http.allowed_hosts: a Unicode name never matches a Host header
        ({"allowed_hosts": ["k\u00e4se.example"]}, "sinks.ws.allowed_hosts", "xn-- form"),
        ({"token": "s3cret"}, "sinks.ws.token", "name it with 'token_env'"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_sink("ws", options)
    line = next((p for p in info.value.problems if p.startswith(key + ":")), None)
    assert line is not None, info.value.problems
    assert fragment in line


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        create_sink("ws", {"port": -1, "backfill": "x", "bogus": True})
    keys = {p.split(":")[0] for p in info.value.problems}
    assert keys == {"sinks.ws.port", "sinks.ws.backfill", "sinks.ws.bogus"}


def test_accepts_limits_what_clients_may_subscribe_to() -> None:
    sink = create_sink("ws", {"accepts": ["caption"]})
    assert sink.accepts == {"caption"}


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def test_tls_with_a_trusted_self_signed_certificate(
        start_sink: SinkFactory, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    r = await start_sink({"tls_cert": str(cert), "tls_key": str(key)})
    client_ctx = ssl.create_default_context(cafile=str(cert))
    url = f"wss://127.0.0.1:{r.sink.bound_port}/"
    assert r.sink.endpoint is not None and r.sink.endpoint.scheme == "wss"
    async with connect(url, ssl=client_ctx) as ws:
        hello, _ = await greet(ws)
        assert hello["capabilities"]["tls"] is True
        r.offer(caption("kitchen", 7))
        assert await recv(ws) == expected(caption("kitchen", 7))
    # a client that does not trust the certificate is refused by its own TLS check
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(url, ssl=ssl.create_default_context()):
            pass


def test_tls_key_that_does_not_match_is_a_config_error(
        self_signed: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = self_signed
    bogus = tmp_path / "key.pem"
    bogus.write_text("not a key\n")
    with pytest.raises(ConfigError) as info:
        create_sink("ws", {"tls_cert": str(cert), "tls_key": str(bogus)})
    assert "sinks.ws.tls_cert" in str(info.value) and str(bogus) in str(info.value)


async def test_endpoint_says_where_clients_connect(start_sink: SinkFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The public seam the daemon reads (the live page's /config.json)."""
    assert create_sink("ws", {"port": 0}).endpoint is None  # not listening yet
    monkeypatch.setenv("TEST_WS_TOKEN", "s3cret-token")
    r = await start_sink({"token_env": "TEST_WS_TOKEN"})
    assert r.sink.endpoint == SinkEndpoint(kind="websocket", host="127.0.0.1",
                                           port=r.sink.bound_port, scheme="ws",
                                           token_required=True)
    async with connect(f"ws://127.0.0.1:{r.sink.endpoint.port}/?token=s3cret-token") as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "hello"
    plain = await start_sink()
    assert plain.sink.endpoint is not None and plain.sink.endpoint.token_required is False


# --------------------------------------------------------------------------- backfill from the history


EARLIER = "fedcba9876543210"
"""The run_id of the daemon run before the restart."""


def stored(source: str, seq: int) -> WindowRecord:
    """A window of the earlier run as the history store gives it back."""
    return WindowRecord(
        window_id=f"{source}:{EARLIER}:0:{seq * 5000}", source_id=source, run_id=EARLIER,
        seq=seq, start_s=seq * 5.0, end_s=seq * 5.0 + 10.0,
        start_at=1_699_990_000.0 + seq * 5, end_at=1_699_990_010.0 + seq * 5,
        model="tiny", text=f"stored caption {seq}", score=0.5, confidence=0.25,
        candidates=(f"stored caption {seq}", "another candidate"))


def stored_trigger(n: int, state: TriggerState) -> TriggerEvent:
    return TriggerEvent(event_id=f"{EARLIER}-dog-kitchen-{n}", trigger="dog",
                        source_id="kitchen", state=state, score=0.4, threshold=0.3,
                        start_s=float(n), end_s=n + 5.0, captured_at=1_699_990_000.0 + n,
                        model="tiny-retriever", run_id=EARLIER,
                        fired_id="" if state is TriggerState.ON else f"{EARLIER}-dog-kitchen-1")


class FakeStore:
    """``recent(limit, per_source)`` over a fixed history, oldest first, recording its calls."""

    def __init__(self, items: list[Caption | TriggerEvent]) -> None:
        self.items = items
        self.calls: list[tuple[int, bool]] = []

    def recent(self, limit: int, per_source: bool) -> list[Caption | TriggerEvent]:
        self.calls.append((limit, per_source))
        captions = [m for m in self.items if isinstance(m, Caption)]
        if per_source:
            keep = [m for m in captions
                    if len([c for c in captions[captions.index(m):]
                            if c.source_id == m.source_id]) <= limit]
        else:
            keep = captions[-limit:]
        return [m for m in self.items if not isinstance(m, Caption) or m in keep]


async def test_a_client_after_a_restart_gets_the_captions_recalled_from_the_history(
        start_sink: SinkFactory, validator: jsonschema.Draft202012Validator) -> None:
    kitchen = [stored("kitchen", seq).to_caption() for seq in range(5)]
    garden = [stored("garden", seq).to_caption() for seq in range(2)]
    on, off = stored_trigger(1, TriggerState.ON), stored_trigger(2, TriggerState.OFF)
    store = FakeStore([kitchen[0], garden[0], on, kitchen[1], kitchen[2], off, garden[1],
                       kitchen[3], kitchen[4]])
    r = await start_sink({"backfill": 3}, recall=store.recent)
    assert store.calls == [(3, True)]  # read once, at once, per source as backfill_scope says
    async with connect(r.url) as ws:
        hello, subscribed = await greet(ws)
        validator.validate(hello)
        assert hello["run_id"] == RUN  # this run; the recalled frames keep their own
        caps = hello["capabilities"]
        assert caps["recalled"] == {"captions": {"kitchen": 3, "garden": 2}, "triggers": 2}
        assert caps["history"]["captions"] == {"garden": 2, "kitchen": 3}
        assert caps["sources"] == ["garden", "kitchen"]
        assert subscribed["backfill"] == 5
        replay = [await recv(ws) for _ in range(6)]
        # the latest trigger state of the pair, then the captions oldest first
        assert replay == [expected(m) for m in (off, garden[0], kitchen[2], garden[1],
                                                kitchen[3], kitchen[4])]
        for frame in replay:
            validator.validate(frame)
            assert frame["run_id"] == EARLIER
        assert replay[1]["candidates"][1]["text"] == "another candidate"
        # live frames follow the recalled ones
        r.offer(caption("kitchen", 0))
        assert await recv(ws) == expected(caption("kitchen", 0))
    await r.settled()
    async with connect(r.url) as late:
        _, subscribed = await greet(late)
        got = [await recv(late) for _ in range(1 + subscribed["backfill"])]
        # the live caption pushed the oldest recalled kitchen caption out of the backfill
        assert [(f["source_id"], f["run_id"], f["seq"]) for f in got[1:]] == [
            ("garden", EARLIER, 0), ("garden", EARLIER, 1), ("kitchen", EARLIER, 3),
            ("kitchen", EARLIER, 4), ("kitchen", RUN, 0)]


async def test_recall_global_scope_kinds_offered_and_an_unreadable_store(
        start_sink: SinkFactory) -> None:
    store = FakeStore([stored("a", 0).to_caption(), stored_trigger(1, TriggerState.ON),
                       stored("b", 0).to_caption(), stored("a", 1).to_caption()])
    # global scope; a sink that does not offer triggers recalls none
    r = await start_sink({"backfill": 2, "backfill_scope": "global",
                          "accepts": ["caption", "status"]}, recall=store.recent)
    assert store.calls == [(2, False)]
    async with connect(r.url) as ws:
        hello, subscribed = await greet(ws)
        assert hello["capabilities"]["recalled"] == {"captions": {"b": 1, "a": 1},
                                                     "triggers": 0}
        assert subscribed["backfill"] == 2
        assert [await recv(ws) for _ in range(2)] == [expected(stored("b", 0).to_caption()),
                                                      expected(stored("a", 1).to_caption())]

    def broken(limit: int, per_source: bool) -> list[Caption | TriggerEvent]:
        raise HistoryError("history store /var/lib/streamcap/history.db: file is not a database")

    with capture_logs() as logs:
        r = await start_sink(recall=broken)
    assert any(e["event"] == "websocket backfill not recalled from the history store"
               and "history.db" in e["error"] for e in logs)
    async with connect(r.url) as ws:
        hello, subscribed = await greet(ws)  # the sink serves; the backfill starts empty
        assert hello["capabilities"]["recalled"] == {"captions": {}, "triggers": 0}
        assert subscribed["backfill"] == 0
    # with backfill = 0 nothing is read; without a store there is nothing recalled
    nothing = FakeStore([stored("a", 0).to_caption()])
    r = await start_sink({"backfill": 0}, recall=nothing.recent)
    assert nothing.calls == []
    plain = await start_sink()
    async with connect(plain.url) as ws:
        hello, _ = await greet(ws)
        assert "recalled" not in hello["capabilities"]


def test_recall_history_reaches_the_websocket_sink_through_the_plugin_loader() -> None:
    from streamcap.bus.plugin import load_sink

    loaded = load_sink("ws", "websocket", {"port": 0, "backfill": 4})
    store = FakeStore([stored("a", 0).to_caption()])
    recall_history(loaded, store.recent)
    assert store.calls == [(4, True)]
