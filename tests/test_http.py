"""The HTTP endpoint, with real HTTP requests against a server on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    LineTooLong,
)
from structlog.testing import capture_logs
from timing import scaled

from streamcap.config import HttpConfig, parse_config, read_config
from streamcap.errors import ConfigError
from streamcap.http import (
    METRICS_CONTENT_TYPE,
    Asset,
    HealthReport,
    HttpServer,
    bad_request_message,
    health_payload,
    jsonable,
    target_authority,
)
from streamcap.stats import Metrics


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


async def request(port: int, method: str, path: str, body: bytes | None = None,
                  headers: Mapping[str, str] | None = None) -> Reply:
    """One request with the standard library's client (in a thread: it blocks)."""
    return await asyncio.to_thread(_request, port, method, path, body, headers)


async def raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, read the whole answer (until the server closes: valid requests
    should say ``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()


WAIT_S = scaled(10.0)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


class Daemon:
    """What the server calls back into, adjustable by tests."""

    def __init__(self) -> None:
        self.report = HealthReport(
            live=True, ready=True,
            details={"sources": {"mic": {"state": "running"}},
                     "inference": {"lag_s": 0.4, "rtf": float("nan")}})
        self.config: dict[str, object] = {"ws_url": "ws://127.0.0.1:8765/", "node_id": "n1",
                                          "token_required": False}

    def health(self) -> HealthReport:
        return self.report

    def page_config(self) -> Mapping[str, object]:
        return self.config


@pytest.fixture
def daemon() -> Daemon:
    return Daemon()


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.counter("streamcap_windows_captured_total", "Windows cut", ("source",)).inc(3, "mic")
    m.counter("streamcap_windows_dropped_total", "Windows dropped", ("source",)).inc(1, 'odd "src"\n')
    m.gauge("streamcap_lag_seconds", "Lag", ("source",)).set(0.25, "mic")
    m.gauge("streamcap_websocket_clients", "Clients")
    hist = m.histogram("streamcap_inference_seconds", "Inference time")
    hist.observe(0.3)
    hist.observe(4.0)
    return m


def make_server(daemon: Daemon, metrics: Metrics, **kwargs: float) -> HttpServer:
    return HttpServer("127.0.0.1", 0, metrics=metrics, health=daemon.health,
                      page_config=daemon.page_config, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def server(daemon: Daemon, metrics: Metrics) -> AsyncIterator[HttpServer]:
    srv = make_server(daemon, metrics)
    await srv.start()
    yield srv
    await srv.close()


# --------------------------------------------------------------------------- /healthz


async def test_healthz_ready_is_200_json(server: HttpServer) -> None:
    reply = await request(server.bound_port, "GET", "/healthz")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json; charset=utf-8"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["server"] == "streamcap"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert reply.json() == {
        "status": "ok", "live": True, "ready": True, "reasons": [],
        "sources": {"mic": {"state": "running"}},
        "inference": {"lag_s": 0.4, "rtf": None},  # NaN is not JSON: null
    }


async def test_healthz_not_ready_is_503_with_reasons(server: HttpServer, daemon: Daemon) -> None:
    daemon.report = HealthReport(live=True, ready=False,
                                 reasons=("source mic: stalled", "inference lag 12 s > hop 5 s"),
                                 details={"sources": {"mic": {"state": "stalled"}}})
    reply = await request(server.bound_port, "GET", "/healthz")
    assert reply.status == 503
    body = reply.json()
    assert body == {"status": "not_ready", "live": True, "ready": False,
                    "reasons": ["source mic: stalled", "inference lag 12 s > hop 5 s"],
                    "sources": {"mic": {"state": "stalled"}}}


async def test_healthz_when_the_check_raises_is_503_down(server: HttpServer,
                                                         daemon: Daemon) -> None:
    def broken() -> HealthReport:
        raise KeyError("inference")

    server.health = broken
    reply = await request(server.bound_port, "GET", "/healthz")
    assert reply.status == 503
    body = reply.json()
    assert isinstance(body, dict)
    assert body["status"] == "down" and body["live"] is False
    assert "KeyError" in body["reasons"][0]


async def test_details_cannot_override_the_verdict(server: HttpServer, daemon: Daemon) -> None:
    daemon.report = HealthReport(live=True, ready=False, details={"status": "ok", "ready": True})
    reply = await request(server.bound_port, "GET", "/healthz")
    assert reply.status == 503
    assert reply.json() == {"status": "not_ready", "live": True, "ready": False, "reasons": []}


# --------------------------------------------------------------------------- /metrics

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = rf'{_NAME}="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE_RE = re.compile(
    rf"^(?P<name>{_NAME})(?:\{{(?:{_LABEL})(?:,{_LABEL})*\}})? "
    r"(?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$")
_COMMENT_RE = re.compile(rf"^# (?:HELP {_NAME} .*|TYPE {_NAME} (?:counter|gauge|histogram|summary|untyped))$")


async def test_metrics_is_prometheus_text(server: HttpServer) -> None:
    await request(server.bound_port, "GET", "/healthz")
    reply = await request(server.bound_port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == METRICS_CONTENT_TYPE
    text = reply.body.decode("utf-8")
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert _COMMENT_RE.match(line), line
            continue
        match = _SAMPLE_RE.match(line)
        assert match, f"not a sample line: {line!r}"
        samples[line.rsplit(" ", 1)[0]] = float(match["value"])
    assert samples['streamcap_windows_captured_total{source="mic"}'] == 3
    assert samples['streamcap_windows_dropped_total{source="odd \\"src\\"\\n"}'] == 1
    assert samples["streamcap_websocket_clients"] == 0
    assert samples['streamcap_inference_seconds_bucket{le="0.5"}'] == 1
    assert samples['streamcap_inference_seconds_bucket{le="+Inf"}'] == 2
    assert samples["streamcap_inference_seconds_count"] == 2
    assert samples['streamcap_http_requests_total{code="200",route="healthz"}'] == 1
    assert any(name.startswith("process_") for name in samples)


async def test_head_has_the_headers_and_no_body(server: HttpServer) -> None:
    get = await request(server.bound_port, "GET", "/metrics")
    answer = await raw(server.bound_port,
                       b"HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 200
    assert body == b""
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    assert length is not None
    # the HEAD request itself was counted in between, so the body grew by a few bytes at most
    assert abs(int(length[1]) - len(get.body)) < 200


# --------------------------------------------------------------------------- page and config


async def test_page_and_assets(server: HttpServer) -> None:
    page = await request(server.bound_port, "GET", "/?token=secret")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    html = page.body.decode()
    assert 'src="app.js"' in html and 'href="app.css"' in html
    js = await request(server.bound_port, "GET", "/app.js")
    assert js.status == 200 and js.headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"innerHTML" not in js.body  # caption text only ever goes through textContent
    css = await request(server.bound_port, "GET", "/app.css")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")


async def test_config_json(server: HttpServer, daemon: Daemon) -> None:
    reply = await request(server.bound_port, "GET", "/config.json")
    assert reply.status == 200
    assert reply.headers["cache-control"] == "no-store"
    assert reply.json() == daemon.config


# --------------------------------------------------------------------------- errors


async def test_unknown_path_is_404_json(server: HttpServer) -> None:
    for path in ("/nope", "/../pyproject.toml", "/web/app.js", "/%2e%2e/errors.py"):
        reply = await request(server.bound_port, "GET", path)
        assert reply.status == 404, path
        assert reply.headers["content-type"] == "application/json; charset=utf-8"
        assert reply.json() == {"error": "not_found", "status": 404,
                                "message": f"no resource at {path}"}


async def test_post_is_405_with_allow(server: HttpServer) -> None:
    reply = await request(server.bound_port, "POST", "/healthz", body=b'{"x": 1}',
                          headers={"Content-Type": "application/json"})
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    body = reply.json()
    assert isinstance(body, dict) and body["error"] == "method_not_allowed"
    for method in ("PUT", "DELETE", "OPTIONS"):
        assert (await request(server.bound_port, method, "/metrics")).status == 405


async def test_oversized_request_is_rejected(server: HttpServer) -> None:
    huge = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: " + b"a" * 20_000
            + b"\r\n\r\n")
    answer = await raw(server.bound_port, huge)
    assert status_of(answer) == 400  # aiohttp's limit (max_field_size)
    assert b"8190 bytes" in answer
    # the server still serves afterwards
    assert (await request(server.bound_port, "GET", "/healthz")).status == 200


async def test_oversized_request_with_http_client(server: HttpServer) -> None:
    reply = await request(server.bound_port, "GET", "/healthz", headers={"X-Big": "b" * 9000})
    assert reply.status == 400


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nbad header\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.0\r\n\r\n", 200),  # HTTP/1.0 needs no Host
    (b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
     200),
])
async def test_malformed_requests(server: HttpServer, data: bytes, status: int) -> None:
    assert status_of(await raw(server.bound_port, data)) == status


async def test_a_malformed_request_logs_no_traceback(server: HttpServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = await raw(server.bound_port,
                           b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nbad header\r\n\r\n")
    assert status_of(answer) == 400
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_slow_client_is_disconnected(daemon: Daemon, metrics: Metrics) -> None:
    async with make_server(daemon, metrics, request_timeout_s=0.2) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.bound_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()


async def test_json_routes_can_be_added(daemon: Daemon, metrics: Metrics) -> None:
    srv = make_server(daemon, metrics)

    async def echo(req: web.Request) -> object:
        if "q" not in req.query:
            raise web.HTTPBadRequest(text="query parameter q is missing")
        return {"q": req.query["q"], "nan": float("nan")}

    async def broken(_req: web.Request) -> object:
        raise RuntimeError("boom")

    srv.add_json_route("GET", "/api/echo", echo, label="echo")
    srv.add_json_route("POST", "/api/broken", broken, label="broken")
    async with srv:
        ok = await request(srv.bound_port, "GET", "/api/echo?q=dog")
        assert ok.status == 200 and ok.json() == {"q": "dog", "nan": None}
        assert ok.headers["content-type"] == "application/json; charset=utf-8"
        bad = await request(srv.bound_port, "GET", "/api/echo")
        assert bad.status == 400
        assert bad.json() == {"error": "bad_request", "status": 400,
                              "message": "query parameter q is missing"}
        failed = await request(srv.bound_port, "POST", "/api/broken", body=b"{}")
        assert failed.status == 500 and "boom" not in failed.body.decode()
        assert (await request(srv.bound_port, "GET", "/api/broken")).status == 405
    assert metrics.counter("streamcap_http_requests_total", "", ("route", "code")).value(
        "echo", "400") == 1
    assert metrics.counter("streamcap_http_requests_total", "", ("route", "code")).value(
        "broken", "500") == 1
    with pytest.raises(RuntimeError):  # the router is frozen once the server has started
        srv.add_json_route("GET", "/api/late", echo, label="late")


async def test_close_ends_open_connections(daemon: Daemon, metrics: Metrics) -> None:
    srv = make_server(daemon, metrics)
    port = await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while srv.active_connections < 1:
        await asyncio.sleep(0.01)
    await srv.close()
    assert srv.active_connections == 0
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_bound_port_and_bind_errors(daemon: Daemon, metrics: Metrics) -> None:
    srv = make_server(daemon, metrics)
    with pytest.raises(RuntimeError, match="before start"):
        _ = srv.bound_port
    async with srv:
        assert srv.bound_port > 0
        clash = HttpServer("127.0.0.1", srv.bound_port, metrics=metrics, health=daemon.health,
                           page_config=daemon.page_config)
        with pytest.raises(ConfigError, match="http.host/http.port"):
            await clash.start()


# --------------------------------------------------------------------------- hostile clients


def counter(metrics: Metrics, name: str, *labels: str) -> float:
    names = {"streamcap_http_requests_total": ("route", "code"),
             "streamcap_http_refused_total": ("reason",)}
    return metrics.counter(name, "", names[name]).value(*labels)


def refusal_warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning" and "refused" in e["event"]]


def troubles(logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> list[object]:
    """Log lines at warning or above, or with a traceback (streamcap's and the libraries')."""
    ours = [e for e in logs if e["log_level"] in ("warning", "error", "critical")
            or "exc_info" in e]
    theirs = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    return [*ours, *theirs]


async def test_a_host_header_naming_another_host_is_refused(server: HttpServer,
                                                            metrics: Metrics) -> None:
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    port = server.bound_port
    with capture_logs() as logs:
        for path in ("/healthz", "/metrics", "/config.json", "/"):
            reply = await request(port, "GET", path, headers={"Host": f"evil.example:{port}"})
            assert reply.status == 421, path
            assert reply.json() == {
                "error": "misdirected_request", "status": 421,
                "message": "this server does not answer for that host name; an operator can "
                           "list it in http.allowed_hosts"}
        # the absolute form of the target names a host too
        answer = await raw(port, b"GET http://evil.example/healthz HTTP/1.1\r\n"
                                 b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 421
        for bad in ("", "[::1", "127.0.0.1:80/x", "user@127.0.0.1"):
            assert (await request(port, "GET", "/healthz", headers={"Host": bad})).status == 421
    assert counter(metrics, "streamcap_http_refused_total", "host") == 9
    assert counter(metrics, "streamcap_http_requests_total", "healthz", "421") == 6
    # one warning line for the lot, the rest held back until the next interval
    assert len(refusal_warnings(logs)) == 1
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]:1",
                 "app.localhost", "10.0.0.7"):
        assert (await request(port, "GET", "/healthz", headers={"Host": host})).status == 200


async def test_allowed_hosts_and_the_bound_name_are_answered(daemon: Daemon,
                                                             metrics: Metrics) -> None:
    srv = HttpServer("localhost", 0, metrics=metrics, health=daemon.health,
                     page_config=daemon.page_config, allowed_hosts=["Streamcap.LAN"])
    async with srv:
        for host in ("streamcap.lan", "streamcap.lan.:8080", "localhost"):
            reply = await request(srv.bound_port, "GET", "/healthz", headers={"Host": host})
            assert reply.status == 200, host
        reply = await request(srv.bound_port, "GET", "/healthz",
                              headers={"Host": "evil.streamcap.lan"})
        assert reply.status == 421


@pytest.mark.parametrize(("data", "message"), [
    (b"FOO /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "invalid method"),
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n", "duplicate"),
    ((b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
      b"Content-Length: 2\r\n\r\n"), "content-length"),
    ((b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
      b"zz\r\n"), "chunk"),
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-" + b"y" * 9000 + b": 1\r\n\r\n",
     "longer than 8190 bytes"),
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: 1\r\n" * 150 + b"\r\n",
     "malformed request"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "malformed request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\xaa" * 40 + b"\r\n\r\n",
     "malformed request"),
])
async def test_unparsable_requests_get_a_json_400_that_echoes_nothing(
        server: HttpServer, metrics: Metrics, caplog: pytest.LogCaptureFixture,
        data: bytes, message: str) -> None:
    marker = b"yyyyyyyy" if b"yyyy" in data else b"healthz"
    with caplog.at_level(logging.DEBUG), capture_logs() as logs:
        answer = await raw(server.bound_port, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 400
    assert b"Content-Type: application/json; charset=utf-8" in head
    assert b"Server: streamcap" in head and b"aiohttp" not in head
    payload = json.loads(body)
    assert payload["error"] == "bad_request" and payload["status"] == 400
    assert message in payload["message"].lower()
    assert marker not in body and b"\\x" not in body and b"b'" not in body
    assert counter(metrics, "streamcap_http_requests_total", "malformed", "400") == 1
    assert not troubles(logs, caplog)
    assert [e["error"] for e in logs if e["event"] == "bad http request"] == [
        payload["message"]]


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"])
async def test_other_http_versions_are_refused(server: HttpServer, version: bytes) -> None:
    answer = await raw(server.bound_port, b"GET /healthz " + version + b"\r\nHost: 127.0.0.1\r\n"
                                          b"Connection: close\r\n\r\n")
    assert status_of(answer) == 400
    message = json.loads(answer.partition(b"\r\n\r\n")[2])["message"]
    assert message in ("only HTTP/1.0 and HTTP/1.1 are served",  # aiohttp parses 2.0 and 0.9
                       "malformed request: bad status line")


async def test_a_half_closed_client_gets_its_answer_then_the_connection_closes(
        daemon: Daemon, metrics: Metrics) -> None:
    async with make_server(daemon, metrics, request_timeout_s=WAIT_S * 10) as srv:
        for data in (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                     b"GET /metrics HTTP/1.0\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHo", b""):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.bound_port)
            writer.write(data)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), WAIT_S)  # closed well before
            writer.close()                                          # request_timeout_s
            if data.endswith(b"\r\n\r\n"):
                assert status_of(answer) == 200
            else:  # nothing whole to answer
                assert answer == b""
        while srv.active_connections:
            await asyncio.sleep(0.01)


async def trickle(port: int, data: bytes, every_s: float) -> tuple[int, bool]:
    """Send ``data`` a byte at a time; how many bytes went before the server closed, and
    whether it did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        for byte in data:
            if reader.at_eof():
                return sent, True
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            try:
                if await asyncio.wait_for(reader.read(1), every_s) == b"":
                    return sent, True
            except TimeoutError:
                pass
        return sent, False
    except ConnectionError:
        return sent, True
    finally:
        writer.close()


async def test_a_request_head_sent_byte_by_byte_is_cut_off(daemon: Daemon,
                                                           metrics: Metrics) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"s" * 4000
    async with make_server(daemon, metrics, request_timeout_s=0.5) as srv:
        sent, closed = await trickle(srv.bound_port, head, every_s=0.02)
        assert closed, "the server kept a trickling client for the whole head"
        assert sent < len(head)
        assert (await request(srv.bound_port, "GET", "/healthz")).status == 200


async def test_healthz_answers_while_slow_clients_hold_connections(daemon: Daemon,
                                                                   metrics: Metrics) -> None:
    cap = 12
    async with make_server(daemon, metrics, max_connections=cap,
                           request_timeout_s=WAIT_S) as srv:
        port = srv.bound_port
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap - 2)]
        for _, writer in slow:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0")  # and no more
        while srv.active_connections < cap - 2:
            await asyncio.sleep(0.01)
        assert (await request(port, "GET", "/healthz")).status == 200
        while srv.active_connections > cap - 2:  # that request's connection is gone
            await asyncio.sleep(0.01)
        # over the cap: answered 503 at once and closed, the server stays up
        admitted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        refused: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        with capture_logs() as logs:
            for _ in range(6):
                before = (srv.active_connections, refused_count(metrics))
                client = await asyncio.open_connection("127.0.0.1", port)
                while (srv.active_connections, refused_count(metrics)) == before:
                    await asyncio.sleep(0.01)
                (admitted if srv.active_connections > before[0] else refused).append(client)
            answers = [await asyncio.wait_for(r.read(), WAIT_S) for r, _ in refused]
        assert len(admitted) == 2 and len(refused) == 4
        for answer in answers:
            assert status_of(answer) == 503
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == (
                "service_unavailable")
        assert srv.active_connections == cap
        assert refused_count(metrics) == 4
        assert len(refusal_warnings(logs)) == 1
        for _, writer in slow + admitted + refused:
            writer.close()
        while srv.active_connections > 0:
            await asyncio.sleep(0.01)
        assert (await request(port, "GET", "/healthz")).status == 200
        text = (await request(port, "GET", "/metrics")).body.decode()
        assert "streamcap_http_connections 1.0" in text  # this request's own


def refused_count(metrics: Metrics) -> float:
    return counter(metrics, "streamcap_http_refused_total", "max_connections")


async def test_a_client_that_does_not_read_is_cut_off(daemon: Daemon,
                                                      metrics: Metrics) -> None:
    big = Asset("text/plain; charset=utf-8", b"z" * 1_000_000)
    srv = HttpServer("127.0.0.1", 0, metrics=metrics, health=daemon.health,
                     page_config=daemon.page_config, request_timeout_s=0.5,
                     assets={"/big.txt": big})
    async with srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.bound_port))
        sock.sendall(b"GET /big.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 20)
        try:
            while srv.active_connections == 0:
                await asyncio.sleep(0.01)
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while srv.active_connections > 0:  # the client never reads
                assert asyncio.get_running_loop().time() < deadline, "never cut off"
                await asyncio.sleep(0.05)
        finally:
            sock.close()
        assert (await request(srv.bound_port, "GET", "/healthz")).status == 200


def accepted_side(client: socket.socket) -> socket.socket:
    """A duplicate of the server's end of ``client``'s connection (the server runs in this
    process), found among this process's open sockets by its addresses."""
    want = (client.getpeername(), client.getsockname())
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:  # closed meanwhile, or not an INET socket
            continue
        try:
            if (sock.getsockname(), sock.getpeername()) == want:
                return sock
        except OSError:
            pass
        sock.close()
    raise AssertionError("the server's end of the connection is not in this process")


async def test_a_client_that_stops_reading_with_a_little_left_unsent_is_cut_off(
        daemon: Daemon, metrics: Metrics) -> None:
    # Less than aiohttp's 64 KiB high-water mark left in the server's buffer when the
    # connection goes idle: the server's kernel send buffer made small so that the
    # leftover does not depend on how far this host's TCP autotuning grows it.
    async with make_server(daemon, metrics, request_timeout_s=0.5, max_connections=2) as srv:
        port = srv.bound_port
        one = len(await raw(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  b"Connection: close\r\n\r\n"))  # an answer's size
        clients = []
        for _ in range(2):  # every slot
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            clients.append(sock)
        try:
            while srv.active_connections < 2:
                await asyncio.sleep(0.01)
            for sock in clients:
                with accepted_side(sock) as server_end:
                    server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                    assert server_end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 16384
                # ~40 KB of answers: more than the kernel buffers on both ends hold, less
                # than 64 KiB; and the client never reads
                count = 40_000 // one + 1
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * count)
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while srv.active_connections > 0:
                assert asyncio.get_running_loop().time() < deadline, "never cut off"
                await asyncio.sleep(0.05)
        finally:
            for sock in clients:
                sock.close()
        assert (await request(port, "GET", "/healthz")).status == 200


# --------------------------------------------------------------------------- the http table


@pytest.mark.parametrize(("table", "problem"), [
    ({"allowed_hosts": "lan"}, "http.allowed_hosts: expected an array (got a string 'lan')"),
    ({"allowed_hosts": ["http://x.lan"]},
     "http.allowed_hosts: each must be a host name without scheme, port or path"),
    ({"allowed_hosts": ["x.lan:80"]}, "http.allowed_hosts: each must be a host name"),
    ({"allowed_hosts": ["*"]}, "http.allowed_hosts: each must be a host name"),
    ({"max_connections": 0}, "http.max_connections: must be between 1 and 65535 (got 0)"),
    ({"max_connections": 70000}, "http.max_connections: must be between 1 and 65535"),
    ({"request_timeout_s": 0}, "http.request_timeout_s: must be > 0 and <= 3600"),
    ({"request_timeout_s": float("inf")}, "http.request_timeout_s: must be a finite number"),
])
def test_the_http_table_refuses_values_out_of_range(table: dict[str, object],
                                                    problem: str) -> None:
    _, problems = read_config({"sources": {"a": {"uri": "mic:default"}}, "http": table})
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_the_http_table_defaults_and_values() -> None:
    assert HttpConfig() == HttpConfig(allowed_hosts=(), max_connections=256,
                                      request_timeout_s=10.0)
    config = parse_config({"sources": {"a": {"uri": "mic:default"}}, "http": {
        "allowed_hosts": ["streamcap.lan", "cam-1.example."], "max_connections": 8,
        "request_timeout_s": 2.5}})
    assert config.http.allowed_hosts == ("streamcap.lan", "cam-1.example.")
    assert config.http.max_connections == 8 and config.http.request_timeout_s == 2.5


# --------------------------------------------------------------------------- pure parts


def test_jsonable() -> None:
    value: Callable[[], None] = lambda: None
    out = jsonable({"a": (1, float("inf")), "b": frozenset({"y", "x"}), 3: value})
    assert isinstance(out, dict)
    assert out["a"] == [1, None] and out["b"] == ["x", "y"] and isinstance(out["3"], str)


@pytest.mark.parametrize(("exc", "message"), [
    (LineTooLong(b"GET /aaaa", 8190), "request line or header field longer than 300 bytes"),
    (BadHttpMethod("FOO /secret"), "malformed request: not an HTTP/1.x request (bad method)"),
    (BadStatusLine("GET /secret HTTP/9"), "malformed request: bad request line"),
    (InvalidHeader(b"X-Secret"), "malformed request: bad header field"),
    (BadHttpMessage("Invalid header value char:\n\n  b'secret'\n  ^"),
     "malformed request: invalid header value char"),
    (BadHttpMessage("Duplicate 'Host' header found."),
     "malformed request: duplicate 'Host' header found"),
    (BadHttpMessage("x" * 200), "malformed request"),
    (BadHttpMessage("secret: \x00\x01:\n\n  b'...'"), "malformed request"),
    (None, "malformed request"),
])
def test_bad_request_message_never_quotes_the_request(exc: BaseException | None,
                                                      message: str) -> None:
    assert bad_request_message(exc, 300) == message


@pytest.mark.parametrize(("target", "authority"), [
    ("/healthz", None), ("/a://b", None), ("*", None), ("healthz", None),
    ("http://evil.example/healthz", "evil.example"), ("http://127.0.0.1:8080", "127.0.0.1:8080"),
    ("http://u@h?q", "u@h"), ("HTTP://[::1]:1#f", "[::1]:1"),
])
def test_target_authority(target: str, authority: str | None) -> None:
    assert target_authority(target) == authority


async def test_a_body_that_cannot_be_decoded_is_a_400_not_a_500(
        daemon: Daemon, metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    srv = make_server(daemon, metrics)

    async def echo(req: web.Request) -> object:
        return {"size": len(await req.read())}

    srv.add_json_route("POST", "/api/echo", echo, label="echo")
    bad_gzip = (b"Host: 127.0.0.1\r\nContent-Encoding: gzip\r\nContent-Length: 8\r\n"
                b"Connection: close\r\n\r\nnot gzip")
    async with srv:
        with caplog.at_level(logging.DEBUG), capture_logs() as logs:
            read = await raw(srv.bound_port, b"POST /api/echo HTTP/1.1\r\n" + bad_gzip)
            unread = await raw(srv.bound_port, b"POST /metrics HTTP/1.1\r\n" + bad_gzip)
    assert status_of(read) == 400
    assert json.loads(read.partition(b"\r\n\r\n")[2])["message"].startswith("malformed request")
    assert status_of(unread) == 405
    assert not troubles(logs, caplog)


def test_health_reasons_are_redacted_whoever_wrote_them() -> None:
    report = HealthReport(live=True, ready=False, reasons=(
        "source cam: rtsp://admin:hunter2@cam/live;password=pw?access_token=tok failed",))
    status, body = health_payload(report)
    assert status == 503
    text = json.dumps(body)
    assert "hunter2" not in text and "pw" not in text.replace("password", "")
    assert "tok" not in text.replace("access_token", "") and "***" in text
