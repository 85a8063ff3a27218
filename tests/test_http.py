"""The HTTP endpoint, with real HTTP requests against a server on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import pytest
from aiohttp import web
from timing import scaled

from streamcap.errors import ConfigError
from streamcap.http import (
    METRICS_CONTENT_TYPE,
    HealthReport,
    HttpServer,
    jsonable,
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
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 20_000 + b"\r\n\r\n"
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
    (b"GET healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.0\r\n\r\n", 200),  # HTTP/1.0 needs no Host
    (b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200),
])
async def test_malformed_requests(server: HttpServer, data: bytes, status: int) -> None:
    assert status_of(await raw(server.bound_port, data)) == status


async def test_a_malformed_request_logs_no_traceback(server: HttpServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = await raw(server.bound_port, b"GET /x HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n")
    assert status_of(answer) == 400
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_slow_client_is_disconnected(daemon: Daemon, metrics: Metrics) -> None:
    async with make_server(daemon, metrics, request_timeout_s=0.2) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.bound_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
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


# --------------------------------------------------------------------------- pure parts


def test_jsonable() -> None:
    value: Callable[[], None] = lambda: None
    out = jsonable({"a": (1, float("inf")), "b": frozenset({"y", "x"}), 3: value})
    assert isinstance(out, dict)
    assert out["a"] == [1, None] and out["b"] == ["x", "y"] and isinstance(out["3"], str)
