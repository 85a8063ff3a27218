"""Hostile clients against the HTTP endpoint of a running daemon (tiny model, loopback).

One daemon subprocess serves the module (``max_connections = 32``,
``request_timeout_s = 2``). What every case must get: a 4xx JSON error or a 2xx, or, for
what cannot be answered (an HTTP/0.9 line, a head cut short), the documented close
within ``request_timeout_s``; never a 5xx, never a hang, never a traceback or an error
line in the daemon's log. The cases are drawn from a fixed seed; the loops are bounded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import subprocess
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from conftest import ffmpeg_path, free_port, make_tone_file
from daemon_process import (
    DaemonProcess,
    http_get,
    metric_samples,
    streamcap_command,
    tiny_model_toml,
)
from timing import scaled

from streamcap.http import HealthReport, HttpServer
from streamcap.stats import Metrics

pytestmark = pytest.mark.skipif(ffmpeg_path() is None, reason="ffmpeg is not installed")

MAX_CONNECTIONS = 32
REQUEST_TIMEOUT_S = 2.0
READ_S = scaled(REQUEST_TIMEOUT_S * 10)  # a bound on every wait for an answer or a close
SEED = 11
# What a file the server must never serve would show.
FILE_MARKERS = (b"root:", b"[project]", b"[http]", b"import ", b"#!/")


# --------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("hostile-http")
    wav = make_tone_file(tmp / "tone.wav", duration_s=2.0, sample_rate_hz=16000)
    port = free_port()
    config = tmp / "streamcap.toml"
    config.write_text(f"""
[daemon]
state_dir = "{tmp / 'state'}"
log_format = "json"
log_level = "debug"
stop_timeout_s = 10

{tiny_model_toml()}
[sources.tone]
uri = "file:{wav}?loop=true"

[http]
port = {port}
max_connections = {MAX_CONNECTIONS}
request_timeout_s = {REQUEST_TIMEOUT_S}
""", encoding="utf-8")
    proc = DaemonProcess.start(config, env={"PYTHONUNBUFFERED": "1"}, log=tmp / "log",
                               jsonl=tmp / "none.jsonl", http_port=port)
    try:
        def up() -> tuple[str, bool]:
            try:
                status, _, _ = http_get(proc.http("/healthz"))
            except OSError as exc:
                return repr(exc), False
            return str(status), status in (200, 503)

        proc.poll(up, lambda got: f"/healthz never answered ({got}):\n{proc.log_tail()}")
        yield proc
    finally:
        proc.kill()


def assert_clean_log(daemon: DaemonProcess) -> None:
    """The daemon is up, and its log has no traceback and no error line."""
    daemon.check_alive()
    text = daemon.log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in text, daemon.log_tail()
    bad = [e for e in daemon.log_events()
           if e.get("level") in ("error", "critical") or "exception" in e or "exc_info" in e]
    assert not bad, bad[:5]


# --------------------------------------------------------------------------- raw clients


@dataclass(frozen=True)
class Case:
    """Bytes to send; what may come back (status codes, or 0 for the documented close
    without an answer); whether to half-close after sending."""

    name: str
    data: bytes
    expect: frozenset[int]
    half_close: bool = False


@dataclass(frozen=True)
class Answer:
    statuses: tuple[int, ...]
    raw: bytes


_STATUS = re.compile(rb"HTTP/\d\.\d (\d{3}) ")


async def exchange(port: int, case: Case) -> Answer:
    """Send the case, read until the server closes (bounded by READ_S)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks: list[bytes] = []
    try:
        writer.write(case.data)
        await writer.drain()
        if case.half_close:
            writer.write_eof()
        async with asyncio.timeout(READ_S):  # a hang fails here
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except ConnectionError:
        pass  # reset after an answer that closed with bytes unread: what came is kept
    finally:
        writer.close()
    raw = b"".join(chunks)
    return Answer(tuple(int(m) for m in _STATUS.findall(raw)), raw)


def request(method: str = "GET", target: str = "/healthz", *, host: str | None = "127.0.0.1",
            headers: tuple[tuple[str, str], ...] = (), body: bytes = b"",
            version: str = "HTTP/1.1", close: bool = True) -> bytes:
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


OK = frozenset({200, 503})  # /healthz: 503 while the source is not ready yet
REFUSED = frozenset({400})
MISDIRECTED = frozenset({421})
CLOSED = frozenset({0})

TRAVERSALS = ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
              "/..%2f..%2f..%2fpyproject.toml", "/static/../../config.toml",
              "/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd", "/.%2e/.%2e/streamcap/http.py",
              "/..\\..\\..\\etc\\passwd", "/web/../../../../etc/passwd",
              "//etc/passwd", "/%252e%252e/etc/passwd", "/app.js/../../pyproject.toml",
              "/....//....//etc/passwd", "/%00/../etc/passwd", "/index.html%00.txt")
BAD_PATHS = ("//[", "//[?token=abc", "/%00", "/%", "/%zz", "/healthz/..",
             "//[::1]/healthz", "/;param=1", "/healthz/", "/HEALTHZ", "/a\x7fb", "/\u00e9",
             "/" + "a" * 2000, "//", "/./healthz")
BAD_METHODS = ("FOO", "G T", "GET\x00", "get", "BREW", "X" * 100, "\x16\x03\x01", "-", "PRI")
BAD_HOSTS = ("evil.example", "evil.example:8080", "", "[::1", "a b", "127.0.0.1:999999",
             "x" * 300, "user@127.0.0.1", "127.0.0.1/x", "localhost.evil.example",
             "127.0.0.1.nip.io", "\u00e9vil", "*")


def cases() -> list[Case]:
    """The seeded spread of hostile requests, plus some well-formed ones among them."""
    rnd = random.Random(SEED)
    out: list[Case] = []

    def add(name: str, data: bytes, expect: frozenset[int], half_close: bool = False) -> None:
        out.append(Case(name, data, expect, half_close))

    # request lines
    for _ in range(20):
        junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 80)))
        add("garbage line", junk + b"\r\n\r\n", REFUSED | CLOSED)
    for line in (b"GET\r\n\r\n", b"GET /healthz\r\nHost: 127.0.0.1\r\n\r\n",
                 b"GET  /healthz  HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 b"GET /healthz HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",
                 b"GET /healthz HTTP/x.y\r\nHost: 127.0.0.1\r\n\r\n",
                 b"\r\n\r\n\r\n\r\n", b" GET /healthz HTTP/1.1\r\n\r\n",
                 b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n",
                 b"GET /healthz\tHTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 b"GET " + b"/a" * 5000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
                 b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 b"GET http://evil.example/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):
        add("request line", line, frozenset({400, 404, 405, 421}) | OK | CLOSED)
    # methods
    for method in BAD_METHODS:
        add(f"method {method!r}", request(method), frozenset({400, 405}))
    for method in ("PUT", "DELETE", "TRACE", "PATCH", "OPTIONS"):
        add(f"method {method}", request(method), frozenset({405}))
    # headers
    for _ in range(12):
        size = rnd.choice((8191, 9000, 20_000, 70_000))
        name = rnd.choice(("X-Big", "Cookie", "User-Agent", "Authorization"))
        add("huge header", request(headers=((name, "v" * size),)), REFUSED)
    add("huge name", request(headers=(("X" * 9000, "1"),)), REFUSED)
    add("many headers", request(headers=tuple((f"X-{i}", "1") for i in range(150))), REFUSED)
    add("many headers 2", request(headers=tuple(("X-Same", str(i)) for i in range(101))),
        REFUSED)
    add("two Authorization", request(headers=(("Authorization", "Bearer a"),
                                              ("Authorization", "Bearer b"))), OK)
    add("two Authorization on //[?token=", request(
        target="//[?token=abc", headers=(("Authorization", "a"), ("Authorization", "b"))),
        frozenset({404}))
    add("two Host", request(headers=(("Host", "127.0.0.1"),)), REFUSED)
    add("two Content-Length", request(headers=(("Content-Length", "1"),
                                               ("Content-Length", "2"))), REFUSED)
    add("negative Content-Length", request(headers=(("Content-Length", "-1"),)), REFUSED)
    add("huge Content-Length", request(headers=(("Content-Length", "9" * 30),)), REFUSED)
    for raw_header in (b"No colon", b"Bad Name: 1", b"X-Nul: a\x00b", b": empty name",
                       b" folded: 1", b"X-A: 1\r\n continued", b"X-\x7f: 1",
                       b"X-Ctl: \x01\x02"):
        add(f"header {raw_header!r}", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      + raw_header + b"\r\nConnection: close\r\n\r\n",
            REFUSED)
    # Host
    for host in BAD_HOSTS:
        add(f"Host {host[:20]!r}", request(host=host), MISDIRECTED | REFUSED)
    add("no Host in HTTP/1.1", request(host=None), REFUSED)
    add("no Host in HTTP/1.0", request(host=None, version="HTTP/1.0"), OK)
    for host in ("localhost", "127.0.0.1:1", "[::1]", "LOCALHOST."):
        add(f"Host {host}", request(host=host), OK)
    # paths
    for path in BAD_PATHS:
        add(f"path {path[:20]!r}", request(target=path), frozenset({400, 404}))
    for target in ("/?token=secret&x=%", "/healthz?%zz", "/healthz?" + "q" * 4000):
        add(f"query {target[:20]!r}", request(target=target), OK)
    for path in TRAVERSALS:
        add(f"traversal {path!r}", request(target=path), frozenset({400, 404}))
    # HTTP/0.9 and HTTP/2 preludes: no whole HTTP/1 request to answer, or a 400
    add("HTTP/0.9", b"GET /\r\n", CLOSED | REFUSED)
    add("HTTP/0.9 half-closed", b"GET /healthz\r\n", CLOSED | REFUSED, half_close=True)
    add("HTTP/2 prelude", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", REFUSED)
    add("HTTP/2 frames", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        REFUSED)
    add("HTTP/2.0 line", request(version="HTTP/2.0"), REFUSED)
    add("HTTP/3.0 line", request(version="HTTP/3.0"), REFUSED)
    add("h2c upgrade", request(headers=(("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQ"),
                                        ("Connection", "Upgrade, HTTP2-Settings"))),
        OK | REFUSED)
    add("websocket upgrade", request(headers=(("Upgrade", "websocket"),
                                              ("Sec-WebSocket-Key", "x"),
                                              ("Sec-WebSocket-Version", "13"))), OK | REFUSED)
    add("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
        REFUSED | CLOSED)
    # chunked bodies
    chunked = (("Transfer-Encoding", "chunked"),)
    add("chunked GET", request(headers=chunked, body=b"5\r\nhello\r\n0\r\n\r\n"), OK)
    add("chunked POST", request("POST", headers=chunked, body=b"5\r\nhello\r\n0\r\n\r\n"),
        frozenset({405}))
    add("bad chunk size", request(headers=chunked, body=b"zz\r\nhello\r\n0\r\n\r\n"), REFUSED)
    add("huge chunk size", request(headers=chunked, body=b"f" * 40 + b"\r\nx\r\n"), REFUSED)
    add("chunk without CRLF", request(headers=chunked, body=b"5\r\nhelloXX0\r\n\r\n"), REFUSED)
    add("chunked and Content-Length", request(
        headers=(*chunked, ("Content-Length", "3")), body=b"0\r\n\r\n"), REFUSED)
    add("Transfer-Encoding gzip, chunked", request(
        headers=(("Transfer-Encoding", "gzip, chunked"),), body=b"0\r\n\r\n"), REFUSED | OK)
    add("Transfer-Encoding identity", request(headers=(("Transfer-Encoding", "identity"),)),
        REFUSED | OK)
    add("body too large for POST", request(
        "POST", headers=(("Content-Length", "200000"),), body=b"x" * 200_000),
        frozenset({405, 413}))
    add("bad Content-Encoding", request(
        "POST", headers=(("Content-Encoding", "gzip"), ("Content-Length", "4")),
        body=b"nope"), frozenset({405, 400}))
    # pipelining: answered in order, until a request that cannot be parsed
    good = request(close=False)
    add("pipelined", good * 3 + request(), frozenset({200, 503}))
    add("pipelined, bad Host in between",
        good + request(host="evil.example", close=False) + request(),
        frozenset({200, 503, 421}))
    add("pipelined, garbage after", good + b"\x00\x01garbage\r\n\r\n", OK | REFUSED)
    add("pipelined flood", good * 200 + request(), OK)
    # half-closed connections
    add("half-closed request", request(close=False), OK, half_close=True)
    add("half-closed head cut short", b"GET /healthz HTTP/1.1\r\nHost: 12", CLOSED,
        half_close=True)
    add("half-closed nothing", b"", CLOSED, half_close=True)
    # the documented close: a head never finished
    add("head cut short", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ", CLOSED)
    add("silence", b"", CLOSED)
    # random mutations of a good request
    base = request()
    for _ in range(60):
        data = bytearray(base)
        for _ in range(rnd.randrange(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        # anything can come of a flipped byte but a 5xx or a hang
        add("mutated", bytes(data), frozenset({0, 200, 400, 404, 405, 421, 503}))
    return out


CASES = cases()


def check_answer(case: Case, answer: Answer) -> None:
    statuses = answer.statuses or (0,)
    assert all(s < 500 or (s == 503 and case.expect & OK) for s in statuses), (case, answer)
    assert set(statuses) <= case.expect, (case.name, case.data[:200], answer.raw[:400])
    for marker in FILE_MARKERS:
        assert marker not in answer.raw, (case.name, marker)
    if answer.statuses and answer.statuses[-1] >= 400 and answer.statuses[-1] != 503:
        body = answer.raw.rpartition(b"\r\n\r\n")[2]
        payload = json.loads(body)
        assert payload["status"] == answer.statuses[-1] and payload["error"], payload
        assert b"aiohttp" not in answer.raw, answer.raw[:400]


async def test_a_seeded_spread_of_malformed_and_hostile_requests(daemon: DaemonProcess) -> None:
    assert len(CASES) > 200
    limit = asyncio.Semaphore(8)  # well under max_connections

    async def one(case: Case) -> tuple[Case, Answer]:
        async with limit:
            return case, await exchange(daemon.http_port, case)

    results = await asyncio.gather(*(one(case) for case in CASES))
    failed = []
    for case, answer in results:
        try:
            check_answer(case, answer)
        except AssertionError as exc:
            failed.append(f"{case.name}: {case.data[:120]!r} -> {answer.raw[:300]!r}: {exc}")
    assert not failed, "\n".join(failed)
    # still serving, and nothing went to the log but debug lines
    status, _, body = http_get(daemon.http("/healthz"))
    assert status in (200, 503) and json.loads(body)["live"] is True
    assert_clean_log(daemon)
    _, _, text = http_get(daemon.http("/metrics"))
    requests = metric_samples(text, "streamcap_http_requests_total")
    assert requests['{route="malformed",code="400"}'] > 50
    assert not [labels for labels in requests if 'code="5' in labels and "healthz" not in labels]


async def test_well_formed_requests_with_real_clients(daemon: DaemonProcess) -> None:
    port = daemon.http_port
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status in (200, 503)
            assert (await resp.json())["live"] is True
        async with session.get(f"http://localhost:{port}/metrics") as resp:
            assert resp.status == 200 and "streamcap_http_requests_total" in await resp.text()
        async with session.get(f"http://127.0.0.1:{port}/config.json") as resp:
            assert resp.status == 200 and "node_id" in await resp.json()
        async with session.head(f"http://127.0.0.1:{port}/") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
        async with session.get(f"http://127.0.0.1:{port}/healthz",
                               headers={"Host": "rebound.example"}) as resp:
            assert resp.status == 421 and (await resp.json())["error"] == "misdirected_request"
        async with session.post(f"http://127.0.0.1:{port}/metrics", data=b"x" * 100) as resp:
            assert resp.status == 405
    req = urllib.request.Request(daemon.http("/metrics"), headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, req, timeout=READ_S)
    assert refused.value.code == 421
    status, kind, _ = http_get(daemon.http("/app.js"))
    assert status == 200 and kind.startswith("text/javascript")
    assert_clean_log(daemon)


async def test_slowloris_does_not_starve_healthz_and_the_cap_holds(
        daemon: DaemonProcess) -> None:
    port = daemon.http_port
    slow_n = MAX_CONNECTIONS - 8
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 2000

    async def trickle() -> bool:
        """One byte every 0.1 s; whether the server cut it off before the head was done."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(len(head)):
                writer.write(head[i:i + 1])
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                        return True
                except TimeoutError:
                    continue
            return False
        except ConnectionError:
            return True
        finally:
            writer.close()

    slow = [asyncio.create_task(trickle()) for _ in range(slow_n)]
    await asyncio.sleep(0.3)  # let them connect (no assertion rests on this)
    for _ in range(3):  # /healthz answers while they trickle
        status, _, _ = await asyncio.to_thread(http_get, daemon.http("/healthz"))
        assert status in (200, 503)
    assert all(await asyncio.wait_for(asyncio.gather(*slow), READ_S * 2)), \
        "a client trickling its head was never cut off"
    # over the cap: the excess is refused with 503 while the server stays up
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS + 12)]
    answers = []
    for reader, writer in idle:
        try:
            answers.append(await asyncio.wait_for(reader.read(), READ_S))
        except ConnectionError:
            answers.append(b"")
        writer.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    assert len(refused) >= 12, answers
    assert json.loads(refused[0].partition(b"\r\n\r\n")[2])["error"] == "service_unavailable"
    assert all(a == b"" for a in answers if a not in refused)  # closed idle after the timeout
    status, _, text = http_get(daemon.http("/metrics"))
    assert status == 200
    assert metric_samples(text, "streamcap_http_refused_total")['{reason="max_connections"}'] \
        >= 12
    assert_clean_log(daemon)


async def test_path_traversal_serves_no_file(daemon: DaemonProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for path in TRAVERSALS:
            async with session.get(f"http://127.0.0.1:{daemon.http_port}{path}") as resp:
                body = await resp.read()
                assert resp.status in (400, 404), path
                assert not any(marker in body for marker in FILE_MARKERS), path


async def test_memory_stays_flat_under_rapid_requests() -> None:
    """Hundreds of requests, each with a new path, Host and client: what the server keeps
    (counter series, throttle keys, connections) does not grow with them."""
    metrics = Metrics()
    srv = HttpServer("127.0.0.1", 0, metrics=metrics,
                     health=lambda: HealthReport(live=True, ready=True), page_config=dict)
    rnd = random.Random(SEED)

    async def burst(n: int) -> None:
        for i in range(n):
            kind = i % 4
            target = f"/{rnd.randrange(10**9)}" if kind else "/healthz"
            host = f"h{rnd.randrange(10**9)}.example" if kind == 1 else "127.0.0.1"
            data = request(target=target, host=host)
            if kind == 3:
                data = b"BAD" + data
            answer = await exchange(srv.bound_port, Case("burst", data, frozenset()))
            assert answer.statuses and answer.statuses[0] in (200, 400, 404, 421)

    async with srv:
        await burst(100)  # warm up: first-use caches, counter series
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await burst(400)
            while srv.active_connections:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)  # let the last connection's callbacks run
            gc.collect()  # what is kept, not garbage the collector has yet to reach
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    kept = [d for d in after.compare_to(before, "filename")
            if "/aiohttp/" in d.traceback[0].filename
            or "/streamcap/" in d.traceback[0].filename]
    growth = sum(d.size_diff for d in kept)
    assert growth < 100_000, [str(d) for d in kept[:10]]  # < 250 bytes a request
    series = metric_samples(metrics.render(), "streamcap_http_requests_total")
    assert len(series) <= 6, series  # by route and code, never by path or Host


def test_a_taken_port_is_refused_with_exit_2_and_the_key(daemon: DaemonProcess,
                                                          tmp_path: Path) -> None:
    """Another daemon on the same HTTP port: exit 2, the key named, no traceback."""
    config = daemon.config.read_text(encoding="utf-8").replace(
        str(daemon.config.parent / "state"), str(tmp_path / "state"))
    clash = tmp_path / "clash.toml"
    clash.write_text(config, encoding="utf-8")
    done = subprocess.run([*streamcap_command(), "run", "--config", str(clash)],
                          capture_output=True, text=True, timeout=scaled(120),
                          stdin=subprocess.DEVNULL, check=False, env=daemon.env)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert re.search(rf"http\.host/http\.port: cannot listen on 127\.0\.0\.1:"
                     rf"{daemon.http_port}: address already in use", output, re.IGNORECASE), output[-3000:]
    assert "Traceback" not in output
    daemon.check_alive()


def test_no_request_left_a_traceback(daemon: DaemonProcess) -> None:
    assert_clean_log(daemon)
    assert metric_samples(http_get(daemon.http("/metrics"))[2], "streamcap_http_connections")

