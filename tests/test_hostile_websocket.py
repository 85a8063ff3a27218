"""Hostile input against the WebSocket sink: fuzzed frames, handshake abuse, floods.

Everything is on loopback with real clients: the ``websockets`` client for frames,
``asyncio`` streams for raw HTTP bytes, plain sockets for floods, and ``streamcap run``
as a subprocess (tiny model) for what only a whole daemon shows: the file-descriptor
limit, its log, ``/healthz`` and the exit code of a port clash. Loops are bounded and
seeded (``random.Random(11)``); every wait is a generous upper bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import resource
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import free_port
from daemon_process import (
    WAIT_S,
    DaemonProcess,
    http_get,
    metric_samples,
    streamcap_command,
    tiny_model_toml,
)
from structlog.testing import capture_logs
from timing import scaled
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin

from streamcap.bus.inbox import DropPolicy, Inbox
from streamcap.bus.plugin import SinkContext
from streamcap.errors import ConfigError
from streamcap.messages import Caption, CaptionCandidate, Embedding
from streamcap.sinks.websocket import (
    MAX_PENDING_REPLIES,
    REFUSAL_SLOTS,
    WebSocketSink,
    create_sink,
)
from streamcap.sinks.ws_protocol import Admission
from streamcap.stats import Metrics

TIMEOUT = scaled(20.0)
RUN = "0123456789abcdef"
MARK = "QzQz"
"""Planted in hostile input: an answer must never contain it (nothing is echoed)."""
MAX_ERROR_FRAME = 400
"""An error frame is never larger than this, whatever the client sent."""
Json = dict[str, Any]


def caption(seq: int, source: str = "kitchen") -> Caption:
    return Caption(window_id=f"{source}:{RUN}:0:{seq * 5000}", run_id=RUN, source_id=source,
                   seq=seq, start_s=seq * 5.0, end_s=seq * 5.0 + 10.0,
                   captured_at=1_700_000_000.0 + seq, text=f"a dog barks {seq}", score=0.5,
                   model="tiny", candidates=(CaptionCandidate(text="a dog barks", decoder_score=-1.0, score=0.5),),
                   latency_ms=1.0, lag_s=0.1)


def embedding(seq: int, dim: int) -> Embedding:
    import numpy as np

    vec = np.full(dim, 1.0 / dim ** 0.5, dtype=np.float32)
    vec.flags.writeable = False
    return Embedding(window_id=f"kitchen:{RUN}:0:{seq * 5000}", run_id=RUN, source_id="kitchen",
                     seq=seq, start_s=seq * 5.0, end_s=seq * 5.0 + 10.0, model="tiny",
                     vector=vec)


# --------------------------------------------------------------------------- in-process sink


@dataclass
class Running:
    sink: WebSocketSink
    inbox: Inbox
    metrics: Metrics
    logs: list[MutableMapping[str, Any]]

    @property
    def port(self) -> int:
        assert self.sink.bound_port is not None
        return self.sink.bound_port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def refused(self, reason: str) -> float:
        return self.metrics.counter("streamcap_websocket_refused_total", "",
                                    ("sink", "reason")).value("ws", reason)

    def log_lines(self, event: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.logs if e.get("event") == event]


async def until(cond: Callable[[], bool], what: str = "condition") -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def start_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                     ) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    monkeypatch.setenv("HOSTILE_WS_TOKEN", "s3cret-token")
    started: list[tuple[Running, asyncio.Task[None]]] = []
    with capture_logs() as logs:
        async def start(options: Mapping[str, object] | None = None) -> Running:
            sink = create_sink("ws", {"port": 0, **(options or {})})
            inbox = Inbox("ws", max_pending=10_000,
                          policies={"embedding": DropPolicy.DROP_OLDEST})
            metrics = Metrics()
            ready = asyncio.Event()
            ctx = SinkContext(instance="ws", node_id="node1", metrics=metrics, ready=ready.set,
                              logger=structlog.get_logger().bind(sink="ws"), state_dir=tmp_path,
                              run_id=RUN)
            task = asyncio.create_task(sink.run(inbox, ctx), name="streamcap[sink:ws].run")
            await asyncio.wait_for(ready.wait(), TIMEOUT)
            r = Running(sink=sink, inbox=inbox, metrics=metrics, logs=logs)
            started.append((r, task))
            return r

        yield start
        for r, task in started:
            r.inbox.close()
            await asyncio.wait_for(task, TIMEOUT)


async def recv(ws: ClientConnection) -> str:
    data = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(data, str)
    return data


async def greet(ws: ClientConnection) -> None:
    assert json.loads(await recv(ws))["type"] == "hello"
    assert json.loads(await recv(ws))["type"] == "subscribed"


async def still_receives(r: Running, good: ClientConnection, seq: int) -> None:
    """The well-behaved client gets the next caption."""
    r.inbox.offer(caption(seq))
    while not ((frame := json.loads(await recv(good)))["type"] == "caption"
               and frame["seq"] == seq):
        pass


def assert_no_library_errors(caplog: pytest.LogCaptureFixture) -> None:
    """No traceback from the websockets library ("connection handler failed", ...)."""
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


# -- the frames


def _bad_values(rng: random.Random) -> list[object]:
    return [None, True, False, 1.5, -1, 2**60, 1e308, "", MARK * rng.randint(20, 3000), [],
            [1], [MARK * 20], [[[]]], {}, {MARK: MARK}, [None], [""], [True]]


def wrong_field_frames(rng: random.Random) -> list[tuple[str, set[str]]]:
    """Wrong types in every field of every client frame kind; the codes that may answer."""
    out: list[tuple[str, set[str]]] = []
    for value in _bad_values(rng):
        if not (isinstance(value, str) and value.startswith(MARK)):
            out.append((json.dumps({"type": value}), {"bad_field", "unknown_type"}))
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 2**53:
            for kind in ("subscribe", "ping"):
                out.append((json.dumps({"type": kind, "id": value}), {"bad_field"}))
        if value != []:  # [] is a valid subscription to nothing
            out.append((json.dumps({"type": "subscribe", "sources": value}), {"bad_field"}))
        if value is not None and value != []:
            out.append((json.dumps({"type": "subscribe", "kinds": value}), {"bad_field"}))
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            out.append((json.dumps({"type": "subscribe", "backfill": value}), {"bad_field"}))
    for kind in ("subscribe", "ping"):
        out.append((json.dumps({"type": kind, MARK * 500: 1}), {"bad_field"}))
    out.append((json.dumps({"type": "subscribe",
                            "sources": [f"s{i}" for i in range(300)]}), {"bad_field"}))
    out.append((json.dumps({"type": "subscribe", "kinds": ["caption", MARK]}), {"bad_field"}))
    return out


def junk_frames(rng: random.Random) -> list[tuple[str | bytes, set[str]]]:
    """Junk text, binary frames, deep nesting, unknown kinds, huge numbers."""
    out: list[tuple[str | bytes, set[str]]] = []
    alphabet = MARK + '{}[]":,0123456789 \\\u00e9\u2028\U0001f600tfn-.eE'
    for _ in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
        out.append((MARK + text, {"bad_json"}))
    for _ in range(15):
        out.append((rng.randbytes(rng.randint(0, 2000)), {"bad_frame"}))
    for depth in (50, 1_000, 5_000, 10_000):
        out.append(("[" * depth + "]" * depth, {"bad_json", "bad_frame"}))
        out.append(('{"a":' * depth + "1" + "}" * depth, {"bad_json", "bad_field"}))
        out.append(("[" * depth + MARK, {"bad_json"}))
    for _ in range(15):
        name = MARK + "".join(rng.choice("abcxyz_") for _ in range(rng.randint(0, 5000)))
        out.append((json.dumps({"type": name, "id": rng.randint(0, 99)}), {"unknown_type"}))
    digits = "9" * 5_000
    out += [
        ('{"type": "ping", "id": ' + digits + "}", {"bad_json"}),
        ('{"type": "subscribe", "backfill": ' + digits + "}", {"bad_json"}),
        ('{"type": "ping", "id": 1e999}', {"bad_field"}),
        ('{"type": "ping", "id": -1e999}', {"bad_field"}),
        ('{"type": "ping", "id": NaN}', {"bad_field"}),
        ('{"type": "subscribe", "backfill": Infinity}', {"bad_field"}),
        ("null", {"bad_frame"}), ("1e999", {"bad_frame"}), ('"' + MARK + '"', {"bad_frame"}),
    ]
    return out


def check_error(raw: str, codes: set[str]) -> Json:
    """An error frame of one of ``codes``: small, and not echoing the input."""
    frame: Json = json.loads(raw)
    assert frame["type"] == "error" and frame["code"] in codes, (frame, codes)
    assert len(raw.encode()) <= MAX_ERROR_FRAME, raw[:200]
    assert MARK not in raw
    return frame


async def test_fuzzed_frames_are_answered_with_small_errors_and_others_still_receive(
        start_sink: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(11)
    r = await start_sink()
    frames: list[tuple[str | bytes, set[str]]] = [*wrong_field_frames(rng), *junk_frames(rng)]
    rng.shuffle(frames)
    async with connect(r.url) as good, connect(r.url, max_size=None) as fuzz:
        await greet(good)
        await greet(fuzz)
        await fuzz.send(json.dumps({"type": "subscribe", "sources": ["nowhere"]}))
        assert json.loads(await recv(fuzz))["type"] == "subscribed"  # only answers from now
        for i, (payload, codes) in enumerate(frames):
            await fuzz.send(payload)
            check_error(await recv(fuzz), codes)
            if i % 40 == 39:
                await still_receives(r, good, i)
        # fragmented messages are reassembled: a ping in pieces is a ping, junk is junk
        await fuzz.send(iter(['{"type": ', '"ping", ', '"id": 5}']))
        assert json.loads(await recv(fuzz)) == {"type": "pong", "v": 1, "id": 5}
        await fuzz.send(iter(["[" * 3000, MARK, "]"]))
        check_error(await recv(fuzz), {"bad_json"})
        # and the fuzzing client itself is still served
        await fuzz.send(json.dumps({"type": "subscribe", "sources": ["hall"], "id": "ok"}))
        assert json.loads(await recv(fuzz))["id"] == "ok"
        await still_receives(r, good, 10_000)
    assert len(frames) >= 150
    assert_no_library_errors(caplog)


@pytest.mark.parametrize(
    ("send", "code"),
    [
        pytest.param(lambda ws: ws.send("x" * 70_000), 1009, id="huge-text"),
        pytest.param(lambda ws: ws.send(b"\0" * 70_000), 1009, id="huge-binary"),
        pytest.param(lambda ws: ws.send(iter(["[" * 40_000, "]" * 40_000])), 1009,
                     id="huge-in-fragments"),
        pytest.param(lambda ws: ws.send(b'{"type": "ping", "id": "\xff\xfe"}', text=True), 1007,
                     id="invalid-utf8"),
        pytest.param(lambda ws: ws.send(iter([b"\xe2\x82", b"\xac"]), text=True), None,
                     id="utf8-split-across-fragments"),
    ],
)
async def test_frames_the_protocol_refuses_close_with_the_documented_code(
        start_sink: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture,
        send: Callable[[ClientConnection], Awaitable[None]], code: int | None) -> None:
    r = await start_sink()
    async with connect(r.url) as good:
        await greet(good)
        async with connect(r.url, max_size=None) as hostile:
            await greet(hostile)
            await send(hostile)
            if code is None:  # a valid character split across fragments is fine: bad_json
                check_error(await recv(hostile), {"bad_json"})
            else:
                with pytest.raises(ConnectionClosed):
                    while True:
                        await recv(hostile)
                assert hostile.close_code == code
        await still_receives(r, good, 1)
    assert_no_library_errors(caplog)


async def test_a_flood_of_bad_frames_without_reading_cannot_grow_the_queue(
        start_sink: Callable[..., Awaitable[Running]]) -> None:
    """The sink stops reading a client that does not read its answers (TCP pushes back)."""
    r = await start_sink()
    async with connect(r.url) as good:
        await greet(good)
        _, writer = await raw_websocket(r.port)
        try:
            frame = masked_text_frame("this is not json " + MARK * 15_000)  # 60 kB

            async def flood() -> None:
                for _ in range(500):  # 30 MB, never reading a byte of the answers
                    writer.write(frame)
                    await writer.drain()
            flooding = asyncio.create_task(flood())
            await until(lambda: any(not b.reading for b in r.sink.backlogs()), "reading paused")
            await asyncio.sleep(0.5)
            hostile = next(b for b in r.sink.backlogs() if b.client != 1)
            assert hostile.replies <= MAX_PENDING_REPLIES
            assert not flooding.done()  # the sender is blocked: nothing more is read
            await still_receives(r, good, 1)
            flooding.cancel()
        finally:
            writer.transport.abort()


async def test_thirty_clients_that_never_read_stay_within_their_queue_bounds(
        start_sink: Callable[..., Awaitable[Running]]) -> None:
    r = await start_sink({"max_queue_bytes": 256 * 1024})
    streams = [await raw_websocket(r.port, rcvbuf=4096) for _ in range(30)]
    try:
        for reader, writer in streams:
            writer.write(masked_text_frame('{"type": "subscribe", "kinds": "*"}'))
            await read_until(reader, b'"subscribed","v":1,"sources":"*",'
                                     b'"kinds":["caption","embedding","status","trigger"]')
        assert len(r.sink.backlogs()) == 30
        for seq in range(150):  # about 45 kB each: 6.7 MB per client, 200 MB in all
            r.inbox.offer(embedding(seq, 4096))
            r.inbox.offer(caption(seq))
        await until(lambda: r.inbox.depth == 0, "the sink to take every message")
        backlogs = r.sink.backlogs()
        assert len(backlogs) == 30
        assert all(b.bytes <= 256 * 1024 for b in backlogs), backlogs
        dropped = r.metrics.counter("streamcap_websocket_dropped_total", "",
                                    ("sink", "kind")).value("ws", "embedding")
        assert dropped > 0
        async with connect(r.url) as good:
            await greet(good)
            await still_receives(r, good, 1000)
    finally:
        for _, writer in streams:
            writer.transport.abort()


# -- raw HTTP and WebSocket bytes


HANDSHAKE = ["GET / HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]


async def raw_request(port: int, lines: list[str] | bytes) -> tuple[int | None, bytes]:
    """Send an HTTP request as raw bytes; the status (None: closed without one) and head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(lines if isinstance(lines, bytes)
                     else ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            head = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
        parts = head.split(b" ", 2)
        status = int(parts[1]) if head.startswith(b"HTTP/1.1 ") and len(parts) > 2 else None
        return status, head
    finally:
        writer.transport.abort()


async def raw_websocket(port: int, rcvbuf: int | None = None
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A completed handshake on a raw socket (optionally with a tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(("\r\n".join([*HANDSHAKE, f"Host: 127.0.0.1:{port}"]) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def target(path: str) -> str:
    """The request line of a handshake for ``path``."""
    return f"GET {path} HTTP/1.1"


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> None:
    """Read a raw WebSocket stream until ``marker`` has arrived (then stop reading)."""
    data = b""
    while marker not in data:
        chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT)
        assert chunk, "the connection closed"
        data += chunk


def nonblocking_connect(port: int) -> socket.socket:
    """A connection that completes in the background (the kernel's backlog may be full)."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def masked_text_frame(text: str) -> bytes:
    """A client's text frame as raw bytes (masked, as clients must)."""
    payload = text.encode()
    assert len(payload) < 65536
    length = (bytes([0x80 | len(payload)]) if len(payload) < 126
              else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big"))
    mask = b"\x01\x02\x03\x04"
    return b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_handshake_abuse_is_answered_4xx_counted_and_logged_once(
        start_sink: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture) -> None:
    r = await start_sink({"token_env": "HOSTILE_WS_TOKEN"})
    host = f"Host: 127.0.0.1:{r.port}"
    auth = "Authorization: Bearer s3cret-token"
    cases: list[tuple[list[str], int, str]] = [
        ([*HANDSHAKE, host, auth, auth], 400, "bad_request"),
        ([*HANDSHAKE, host, auth, "Authorization: Bearer wrong"], 400, "bad_request"),
        ([*HANDSHAKE, host, host, auth], 400, "bad_request"),
        ([*HANDSHAKE, host, auth, "Origin: http://127.0.0.1", "Origin: http://127.0.0.1"], 400,
         "bad_request"),
        ([target("/?token=s3cret-token&token=s3cret-token"), *HANDSHAKE[1:], host], 400,
         "bad_request"),
        ([target("http://evil.example/"), *HANDSHAKE[1:], host, auth], 400, "bad_request"),
        ([target("//[/"), *HANDSHAKE[1:], host, auth], 400, "bad_request"),
        ([*HANDSHAKE, "Host: evil.example", auth], 403, "host"),
        ([*HANDSHAKE, host, auth, "Origin: https://evil.example"], 403, "origin"),
        ([*HANDSHAKE, host, auth, "Origin: null"], 403, "origin"),
        ([*HANDSHAKE, host, "Authorization: Basic s3cret-token"], 401, "token"),
        ([*HANDSHAKE, host, "Authorization: Bearer"], 401, "token"),
        ([target("/?token="), *HANDSHAKE[1:], host], 401, "token"),
    ]
    for lines, status, reason in cases:
        before = r.refused(reason)
        got, head = await raw_request(r.port, lines)
        assert got == status, (lines, head)
        assert r.refused(reason) == before + 1
    # a page of this host (the live page) and a script with the token still get in
    ok, _ = await raw_request(r.port, [*HANDSHAKE, host, auth, "Origin: http://localhost:8080"])
    assert ok == 101
    # hundreds of wrong tokens: each refused and counted, one log line per interval
    rng = random.Random(11)
    before_token = r.refused("token")
    for _ in range(300):
        wrong = "".join(rng.choice("abcdef0123") for _ in range(rng.randint(1, 40)))
        with pytest.raises(InvalidStatus) as info:
            async with connect(r.url, additional_headers={"Authorization": f"Bearer {wrong}"}):
                pass
        assert info.value.response.status_code == 401
    assert r.refused("token") == before_token + 300
    token_lines = [e for e in r.log_lines("websocket client refused") if e["reason"] == "token"]
    assert len(token_lines) == 1, token_lines
    # junk requests: never a 500, never a traceback
    for _ in range(60):
        junk = rng.randbytes(rng.randint(1, 600)) + b"\r\n\r\n"
        answer, head = await raw_request(r.port, junk)
        assert answer is None or 400 <= answer < 500, head
    async with connect(r.url, additional_headers={"Authorization": "Bearer s3cret-token"}) as ws:
        await greet(ws)
        await still_receives(r, ws, 1)
    assert_no_library_errors(caplog)


async def test_any_web_page_cannot_read_the_feed_by_default(
        start_sink: Callable[..., Awaitable[Running]]) -> None:
    r = await start_sink()
    with pytest.raises(InvalidStatus) as info:
        async with connect(r.url, origin=Origin("https://evil.example")):
            pass
    assert info.value.response.status_code == 403 and r.refused("origin") == 1
    # DNS rebinding: the page's name resolves to 127.0.0.1, the Host says its name
    status, _ = await raw_request(r.port, [*HANDSHAKE, f"Host: evil.example:{r.port}",
                                           f"Origin: http://evil.example:{r.port}"])
    assert status == 403 and r.refused("host") == 1
    for page in ("http://127.0.0.1:8080", "http://localhost:8080"):  # the live page
        async with connect(r.url, origin=Origin(page)) as ws:
            await greet(ws)
    async with connect(r.url) as ws:  # not a browser
        await greet(ws)
    named = await start_sink({"allowed_hosts": ["streamcap.home.example"],
                              "allowed_origins": ["https://dash.home.example"]})
    status, _ = await raw_request(named.port, [*HANDSHAKE, "Host: streamcap.home.example",
                                               "Origin: https://dash.home.example"])
    assert status == 101
    with pytest.raises(InvalidStatus) as info:
        async with connect(named.url, origin=Origin("http://127.0.0.1:8080")):
            pass
    assert info.value.response.status_code == 403


async def test_connections_over_max_clients_get_503_and_the_next_gets_in(
        start_sink: Callable[..., Awaitable[Running]]) -> None:
    r = await start_sink({"max_clients": 3})
    clients = [await connect(r.url) for _ in range(2)]
    # a connection still in its handshake (it never sends its request) counts too
    idle = nonblocking_connect(r.port)
    try:
        for ws in clients:
            await greet(ws)
        await until(lambda: len(r.sink.gate) == 3, "three connections held")
        with pytest.raises(InvalidStatus) as info:
            async with connect(r.url):
                pass
        assert info.value.response.status_code == 503
        assert info.value.response.headers["Retry-After"].isdigit()
        # a flood: never more than max_clients + REFUSAL_SLOTS held, the rest closed at once
        flood = [nonblocking_connect(r.port) for _ in range(150)]
        try:
            await until(lambda: r.refused("capacity") >= 150 - REFUSAL_SLOTS, "the flood")
            await until(lambda: r.sink.gate.held(Admission.ABORT) == 0, "aborts to finish")
            assert len(r.sink.gate) <= 3 + REFUSAL_SLOTS
        finally:
            for sock in flood:
                sock.close()
        assert len(r.log_lines("websocket client refused")) == 1  # one line per interval
        await clients.pop().close()
        async with connect(r.url) as ws:  # a place came free
            await greet(ws)
            await still_receives(r, ws, 1)
    finally:
        idle.close()
        for ws in clients:
            await ws.close()
    await until(lambda: len(r.sink.gate) == 0, "every connection released")


async def test_lone_surrogates_in_an_id_or_source_id_are_refused_without_a_traceback(
        start_sink: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture) -> None:
    """Valid JSON can spell a lone surrogate (no UTF-8 frame can carry it back): answered
    bad_field without echoing it, the connection stays up, nothing is logged."""
    r = await start_sink()
    frames = ['{"type": "ping", "id": "\\ud800"}',
              '{"type": "subscribe", "id": "x\\udfff"}',
              '{"type": "subscribe", "sources": ["\\ud800"], "id": 3}',
              '{"type": "subscribe", "sources": ["kitchen", "\\udc00\\ud800"]}']
    async with connect(r.url) as ws:
        await greet(ws)
        for _ in range(20):
            for frame in frames:
                await ws.send(frame)
                error = check_error(await recv(ws), {"bad_field"})
                assert error["details"]["field"] in ("id", "sources")
        await ws.send(json.dumps({"type": "ping", "id": "still here"}))
        assert json.loads(await recv(ws)) == {"type": "pong", "v": 1, "id": "still here"}
        await still_receives(r, ws, 1)
    assert_no_library_errors(caplog)
    assert not [e for e in r.logs if e.get("log_level") in ("warning", "error")]


async def test_a_frame_whose_handling_fails_gets_internal_and_one_log_line(
        start_sink: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net: a bug while handling one frame costs neither the connection nor a
    traceback per frame (websockets' 'connection handler failed')."""
    import streamcap.sinks.websocket as websocket_module

    def broken(data: str | bytes, **_: object) -> object:
        raise UnicodeEncodeError("utf-8", MARK, 0, 1, "a bug")

    r = await start_sink()
    async with connect(r.url) as good, connect(r.url) as ws:
        await greet(good)
        await greet(ws)
        monkeypatch.setattr(websocket_module, "parse_client_frame", broken)
        for i in range(50):
            await ws.send(json.dumps({"type": "ping", "id": i}))
            frame = check_error(await recv(ws), {"internal"})
            assert frame["details"] == {}
        await still_receives(r, ws, 1)
        await still_receives(r, good, 2)
        assert ws.close_code is None
    failed = r.log_lines("websocket client frame failed")
    assert len(failed) == 1, failed
    assert failed[0]["error"] == "UnicodeEncodeError" and MARK not in str(failed[0])
    assert_no_library_errors(caplog)


async def test_refusals_from_many_addresses_are_logged_once_per_reason(
        start_sink: Callable[..., Awaitable[Running]]) -> None:
    """An attacker holding many addresses (an IPv6 /64; here 127.0.0.0/8) gets one line
    per reason and interval, not one per address."""
    r = await start_sink({"token_env": "HOSTILE_WS_TOKEN"})
    addresses = [f"127.0.{i // 200}.{i % 200 + 2}" for i in range(40)]
    for address in addresses:
        with pytest.raises(InvalidStatus) as info:
            async with connect(r.url, additional_headers={"Authorization": "Bearer wrong"},
                               local_addr=(address, 0)):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            async with connect(r.url, origin=Origin("https://evil.example"),
                               local_addr=(address, 0)):
                pass
    assert r.refused("token") == len(addresses) and r.refused("origin") == len(addresses)
    lines = r.log_lines("websocket client refused")
    assert sorted(e["reason"] for e in lines) == ["origin", "token"], lines


async def test_connection_churn_logs_at_info_once_per_interval(
        start_sink: Callable[..., Awaitable[Running]]) -> None:
    """Any local process can open and close connections at will: each is logged at debug,
    and at info once per interval with the count connected."""
    r = await start_sink()
    async with connect(r.url) as kept:
        await greet(kept)
        for _ in range(30):
            async with connect(r.url) as ws:
                await greet(ws)
        await until(lambda: len(r.sink.backlogs()) == 1, "the churn to end")

        def lines(event: str, level: str) -> list[MutableMapping[str, Any]]:
            return [e for e in r.log_lines(event) if e["log_level"] == level]

        for event in ("websocket client connected", "websocket client disconnected"):
            assert len(lines(event, "info")) == 1, lines(event, "info")
        assert len(lines("websocket client connected", "debug")) == 30
        assert len(lines("websocket client disconnected", "debug")) == 29
        first = lines("websocket client connected", "info")[0]
        assert first["clients"] == 1 and first["suppressed"] == 0
        gauge = r.metrics.gauge("streamcap_websocket_clients", "", ("sink",))
        assert gauge.value("ws") == 1


def test_ping_settings_outside_their_range_are_refused() -> None:
    for key in ("ping_interval_s", "ping_timeout_s"):
        for value in (float("inf"), float("nan"), 1e9, 3601, 0, -1):
            with pytest.raises(ConfigError) as info:
                create_sink("ws", {key: value})
            assert any(p.startswith(f"sinks.ws.{key}:") for p in info.value.problems)
        assert getattr(create_sink("ws", {key: 3600}).options, key) == 3600


# --------------------------------------------------------------------------- the daemon


@dataclass
class Daemon:
    process: DaemonProcess
    ws_port: int
    config: Path
    tmp: Path


def write_config(tmp: Path, *, ws_port: int, http_port: int, max_clients: int = 4) -> Path:
    from streamcap.daemon import example_clip_uri

    config = tmp / "streamcap.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        node_id = "hostile"
        state_dir = "{tmp / 'state'}"
        log_format = "json"
        stop_timeout_s = 20

        {{model}}
        [sources.clip]
        uri = "{example_clip_uri()}"

        [sinks.ws]
        plugin = "websocket"
        port = {ws_port}
        max_clients = {max_clients}

        [http]
        port = {http_port}
        """).replace("{model}", tiny_model_toml()), encoding="utf-8")
    return config


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("hostile-ws")
    ws_port, http_port = free_port(), free_port()
    config = write_config(tmp, ws_port=ws_port, http_port=http_port)
    process = DaemonProcess.start(config, env={"PYTHONUNBUFFERED": "1"}, log=tmp / "daemon.log",
                                  jsonl=tmp / "none.jsonl", http_port=http_port)
    try:
        process.poll(lambda: (None, "websocket sink listening" in process.log_tail(100_000)),
                     lambda _: f"the sink never listened:\n{process.log_tail()}")
        yield Daemon(process=process, ws_port=ws_port, config=config, tmp=tmp)
    finally:
        process.kill()


async def test_daemon_with_few_file_descriptors_survives_a_connection_flood(
        daemon: Daemon) -> None:
    """With RLIMIT_NOFILE lowered, 300 idle connections neither starve /healthz nor fill
    the log; a client over max_clients gets 503, and gets in once another leaves."""
    pid = daemon.process.proc.pid
    baseline = open_fds(pid)
    # room for max_clients and the refusal slots, not for the flood
    limit = baseline + 4 + REFUSAL_SLOTS + 24
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    url = f"ws://127.0.0.1:{daemon.ws_port}/"
    log_bytes_before = daemon.process.log.stat().st_size
    clients = [await connect(url) for _ in range(4)]
    try:
        for ws in clients:
            await greet(ws)
        with pytest.raises(InvalidStatus) as info:
            async with connect(url):
                pass
        assert info.value.response.status_code == 503
        assert "Retry-After" in info.value.response.headers
        flood: list[socket.socket] = []
        try:
            flood += [nonblocking_connect(daemon.ws_port) for _ in range(300)]
            # /healthz still answers while the flood holds its sockets open
            _, _, body = await asyncio.to_thread(
                daemon.process.poll,
                lambda: (got := _healthz(daemon), got[0] in (200, 503)),
                lambda got: f"/healthz never answered: {got}")
            assert json.loads(body)["live"] is True
            assert open_fds(pid) <= limit
        finally:
            for sock in flood:
                sock.close()
        await clients.pop().close()

        async def get_in() -> None:
            while True:
                try:
                    async with connect(url) as ws:
                        await greet(ws)
                        return
                except (InvalidHandshake, OSError):  # 503, or closed at once: retry
                    await asyncio.sleep(0.2)
        await asyncio.wait_for(get_in(), WAIT_S)
    finally:
        for ws in clients:
            await ws.close()
    _, _, text = await asyncio.to_thread(http_get, daemon.process.http("/metrics"))
    refused = metric_samples(text, "streamcap_websocket_refused_total")
    assert refused['{sink="ws",reason="capacity"}'] >= 1
    log = daemon.process.log.read_bytes()[log_bytes_before:].decode("utf-8", "replace")
    assert len(log) < 20_000, log[-3000:]
    assert "Traceback" not in log and "out of system resource" not in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refusals = [e for e in events if e.get("event") == "websocket client refused"]
    accept_errors = [e for e in events if e.get("event") == "cannot accept connections"]
    assert len(refusals) <= 1 and len(accept_errors) <= 2, refusals + accept_errors
    daemon.process.check_alive()


def _healthz(daemon: Daemon) -> tuple[int, str, str]:
    try:
        return http_get(daemon.process.http("/healthz"))
    except OSError as exc:
        return 0, "", str(exc)


def test_a_port_in_use_at_start_stops_the_daemon_with_exit_2(daemon: Daemon) -> None:
    """The running daemon holds the WebSocket port: a second one on it exits 2 at once."""
    tmp = daemon.tmp / "clash"
    tmp.mkdir()
    config = write_config(tmp, ws_port=daemon.ws_port, http_port=free_port())
    proc = subprocess.run([*streamcap_command(), "run", "--config", str(config)],
                          check=False, capture_output=True, text=True, timeout=WAIT_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"streamcap: error: sinks.ws.host/port: cannot listen on 127.0.0.1:{daemon.ws_port}"
            in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "restarting" not in proc.stderr


ACCEPT_SCRIPT = """
import asyncio, resource, socket, sys
from streamcap.daemon import LoopErrorHandler
from streamcap.logs import configure_logging

configure_logging("json", "info")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

async def main() -> None:
    held = []
    server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(float(sys.argv[1]))

loop = asyncio.new_event_loop()
loop.set_exception_handler(LoopErrorHandler())
loop.run_until_complete(main())
"""


def test_accept_errors_are_logged_once_per_interval_without_a_traceback(tmp_path: Path) -> None:
    """Out of file descriptors, asyncio reports a failed accept() every second: one line."""
    seconds = scaled(4.0)
    proc = subprocess.Popen([sys.executable, "-c", ACCEPT_SCRIPT, str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    socks: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        # more than the 64 descriptors the process may hold
        socks += [nonblocking_connect(port) for _ in range(120)]
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        for sock in socks:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    lines = [e for e in events if e.get("event") == "cannot accept connections"]
    assert len(lines) == 1, err[-3000:]
    assert lines[0]["errno"] == 24 and lines[0]["suppressed"] == 0
    assert "Traceback" not in err and "out of system resource" not in err
