"""The daemon's HTTP endpoint on aiohttp: health, Prometheus metrics, the live page, and a
router for JSON API routes.

Routes (GET and HEAD):

- ``/healthz``: JSON from :class:`HealthReport`; 200 when live and ready, 503 otherwise;
- ``/metrics``: :meth:`streamcap.stats.Metrics.render` in the Prometheus text format 0.0.4;
- ``/config.json``: what the live page needs to open the WebSocket feed;
- ``/`` and the files of the package data ``streamcap/web/``: the live page.

More routes: :meth:`HttpServer.add_json_route` (before :meth:`HttpServer.start`).

Every error is JSON, ``{"error": code, "status": n, "message": text}``, and no
message repeats what the client sent besides the path:

- unknown paths 404, other methods 405 (with ``Allow``), a handler that raises 500;
- a ``Host`` header (or an absolute-form target) naming a host this server does not
  answer for: 421 (DNS rebinding; see :class:`streamcap.netpolicy.HostPolicy`: IP
  literals, ``localhost``, the bound name and ``allowed_hosts`` pass);
- a request aiohttp cannot parse (bad request line, method, header, target or body
  framing, a request line or header field over ``max_request_bytes``, more than
  :data:`MAX_HEADERS` headers): 400, and the connection is closed; an HTTP version
  other than 1.0 and 1.1: 400;
- over ``max_connections`` open connections, a new one is answered 503 at once and
  closed, before anything is read from it (a client that already sent its request may
  see the connection reset instead).

Time limits, all ``request_timeout_s``: a connection is closed when it has not sent a
whole request head that long after it opened or after its last answer (even while it
keeps sending a byte at a time), and aborted when what the server wrote to it has not
all been taken for that long (a client that does not read, or reads too slowly; any
byte the kernel would not take counts, the last bytes of an idle connection's final
answer included). After answering a request whose body no route read, the connection
is closed rather than the body waited for. A client that half-closes its side still
gets the answer to the request it sent (requests pipelined behind that one are
dropped), then the connection is closed. A request body over ``max_body_bytes`` gets
413.

Counted: every answer in ``streamcap_http_requests_total{route,code}`` (route
``malformed`` for requests that could not be parsed), every refusal in
``streamcap_http_refused_total{reason}`` (``host``, ``max_connections``), open
connections in ``streamcap_http_connections``. Refusals are logged as warnings at most
once a minute per reason and client address, with the number held back
(``suppressed``); malformed requests are logged at debug level, without traceback.

The pure parts (:func:`jsonable`, :func:`health_payload`, :func:`error_payload`,
:func:`load_assets`, :func:`bad_request_message`, :func:`target_authority`) are plain
functions; :class:`HttpServer` wires them to aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any, Final, Self

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_request import BaseRequest

from streamcap.errors import ConfigError
from streamcap.logs import Throttle, get_logger
from streamcap.netpolicy import HostPolicy
from streamcap.redact import redact
from streamcap.stats import CONTENT_TYPE as METRICS_CONTENT_TYPE
from streamcap.stats import Metrics

__all__ = ["MAX_HEADERS", "METRICS_CONTENT_TYPE", "Asset", "HealthReport", "HttpServer",
           "JsonHandler", "bad_request_message", "error_payload", "health_payload",
           "json_response", "jsonable", "load_assets", "target_authority"]

_log = get_logger(__name__)

JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
MAX_HEADERS: Final = 100
"""Most header fields in one request (more: 400)."""
LOG_INTERVAL_S: Final = 60.0
"""At most one warning per refusal reason and client address in this time."""
_SERVED_VERSIONS: Final = frozenset({HttpVersion10, HttpVersion11})
# The parser's own reason for a request it refused is a fixed phrase of words; what it
# quotes of the request after it is dropped.
_PARSER_REASON: Final = re.compile(r"[A-Za-z][A-Za-z /,.()'`-]{0,79}")
_CLASS_MESSAGES: Final[tuple[tuple[type[HttpProcessingError], str], ...]] = (
    (BadHttpMethod, "not an HTTP/1.x request (bad method)"),
    (BadStatusLine, "bad request line"),
    (InvalidURLError, "bad request target"),
    (InvalidHeader, "bad header field"),
    (TransferEncodingError, "bad chunked body or Transfer-Encoding"),
    (ContentLengthError, "body shorter than its Content-Length"),
    (ContentEncodingError, "body not in its Content-Encoding"),
)

_CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": JSON_CONTENT_TYPE,
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

# The live page opens a WebSocket on another port, so connect-src allows ws:/wss:.
_PAGE_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy":
        ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
         "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; "
         "form-action 'none'"),
    "Referrer-Policy": "no-referrer",  # the page URL may carry ?token=
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class _ClientErrorFilter(logging.Filter):
    """aiohttp logs a malformed request or body it meets outside a handler as an error
    with a traceback; it is the client's mistake, so it becomes one debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            _log.debug("bad http request", error=type(exc).__name__)
            return False
        return True


_SERVER_LOG: Final = logging.getLogger("streamcap.http.server")
_SERVER_LOG.addFilter(_ClientErrorFilter())

JsonHandler = Callable[[web.Request], Awaitable[object]]
"""A JSON API route: the request in, a JSON-ready value out
(see :meth:`HttpServer.add_json_route`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    """What ``/healthz`` reports.

    Attributes:
        live: The process works (event loop turning, inference thread alive).
        ready: It does its job: sources running and inference keeping up with the hop.
        reasons: One line per problem when not live or not ready.
        details: JSON-ready extras merged into the response, e.g.
            ``{"sources": {...}, "inference": {...}}``.
    """

    live: bool
    ready: bool
    reasons: tuple[str, ...] = ()
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file of the live page, held in memory."""

    content_type: str
    body: bytes


# --------------------------------------------------------------------------- pure logic


def jsonable(value: object) -> object:
    """``value`` made JSON-ready: mappings and sequences copied, NaN/inf as None, others as str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    return str(value)


def error_payload(status: int, message: str) -> dict[str, object]:
    """``{"error": "not_found", "status": 404, "message": ...}``."""
    code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    return {"error": code, "status": status, "message": message}


def bad_request_message(exc: BaseException | None, max_request_bytes: int) -> str:
    """The message of the 400 for a request the parser refused, without any of its bytes.

    Args:
        exc: What the parser raised.
        max_request_bytes: The limit a too long line or field went over.
    """
    if isinstance(exc, LineTooLong):
        return f"request line or header field longer than {max_request_bytes} bytes"
    if isinstance(exc, HttpProcessingError):
        # The C parser's messages are "<reason>:\n\n  <the bytes>\n  ^".
        # Plain BadHttpMessages are fixed phrases ("Duplicate 'Host' header found.").
        reason, quoted, _ = exc.message.partition(":\n")
        if quoted or type(exc) is BadHttpMessage:
            reason = reason.strip().rstrip(".")
            if _PARSER_REASON.fullmatch(reason):
                return f"malformed request: {reason[0].lower()}{reason[1:]}"
        for kind, message in _CLASS_MESSAGES:
            if isinstance(exc, kind):
                return f"malformed request: {message}"
    return "malformed request"


def target_authority(raw_target: str) -> str | None:
    """The authority of an absolute-form request target (``http://name:port/path``);
    None for the usual origin form (``/path``), ``*`` and anything else."""
    scheme, sep, rest = raw_target.partition("://")
    if not sep or not scheme or raw_target.startswith("/"):
        return None
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return rest[:end]


def health_payload(report: HealthReport) -> tuple[int, dict[str, object]]:
    """The status code and body of ``/healthz``; ``details`` cannot override the verdict.
    Reasons are redacted here, whoever wrote them."""
    ok = report.live and report.ready
    body: dict[str, object] = dict(report.details)
    body.update({
        "status": "ok" if ok else ("not_ready" if report.live else "down"),
        "live": report.live,
        "ready": report.ready,
        "reasons": [redact(reason) for reason in report.reasons],
    })
    return (200 if ok else 503), body


def json_response(status: int, payload: object,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response (strict JSON: no NaN), never cached."""
    body = json.dumps(jsonable(payload), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return web.Response(status=status, body=body,
                        headers={"Content-Type": JSON_CONTENT_TYPE, "Cache-Control": "no-store",
                                 **(headers or {})})


def load_assets(package: str = "streamcap", folder: str = "web") -> dict[str, Asset]:
    """The live page's files, read once from the package data ``<package>/<folder>/``.

    Returns:
        ``{"/index.html": Asset, "/app.js": Asset, ...}`` for every file with a
        known extension; ``"/"`` maps to ``index.html`` when present.
    """
    assets: dict[str, Asset] = {}
    root = resources.files(package).joinpath(folder)
    if not root.is_dir():
        return assets
    for entry in root.iterdir():
        name = entry.name
        suffix = name[name.rfind("."):] if "." in name else ""
        if not entry.is_file() or suffix not in _CONTENT_TYPES or name.startswith("."):
            continue
        assets["/" + name] = Asset(_CONTENT_TYPES[suffix], entry.read_bytes())
    if "/index.html" in assets:
        assets["/"] = assets["/index.html"]
    return assets


# --------------------------------------------------------------------------- connections


class _Handler(web.RequestHandler):
    """aiohttp's handler of one connection, answering what it cannot parse in the server's
    JSON error shape (see :func:`bad_request_message`), never echoing the request."""

    __slots__ = ("_answer_error",)

    def __init__(self, manager: web.Server,
                 answer_error: Callable[[BaseRequest, int, BaseException | None],
                                        web.StreamResponse],
                 **options: Any) -> None:
        super().__init__(manager, **options)
        self._answer_error = answer_error

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("the answer has begun; cannot send an error instead")
        response = self._answer_error(request, status, exc)
        response.force_close()
        return response


class _Connection(asyncio.Protocol):
    """One accepted connection: refused over the cap, else handed to a :class:`_Handler`.

    Sits between the transport and aiohttp's handler to keep the exact count of open
    connections, to answer the request in progress when the client half-closes (aiohttp
    would drop it), and to abort a connection whose output has stayed unsent for
    ``request_timeout_s``: the transport's high-water mark is 0, so any byte the kernel
    does not take pauses writing and starts that timer, and only a buffer emptied whole
    stops it. (With the default 64 KiB mark a smaller leftover started no timer, and
    aiohttp's ``transport.close()`` of the idle connection waited for it forever.)
    """

    __slots__ = ("_gate", "_handler", "_stalled", "_transport")

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate
        self._handler: _Handler | None = None
        self._transport: asyncio.Transport | None = None
        self._stalled: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=0)  # before any write, the 503's included
        self._handler = self._gate.admit(transport)
        if self._handler is not None:
            self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool:
        """The client half-closed: close now when idle, else after the answer in progress
        (requests pipelined behind it are dropped). True keeps the sending side open."""
        handler = self._handler
        if handler is None:
            return False
        # aiohttp's handler waits on this private future exactly while idle between
        # requests; should aiohttp rename it, an idle half-closed connection would stay
        # open and test_a_half_closed_client_gets_its_answer_then_the_connection_closes
        # fails (its empty and partial-head cases).
        waiter = getattr(handler, "_waiter", None)
        if isinstance(waiter, asyncio.Future) and not waiter.done():
            return False
        handler.close()
        return True

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()
        if self._stalled is None and self._transport is not None:
            self._stalled = asyncio.get_running_loop().call_later(
                self._gate.request_timeout_s, self._transport.abort)

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        handler, self._handler = self._handler, None
        self._transport = None
        if handler is not None:
            self._gate.release()
            handler.connection_lost(exc)


class _Gate:
    """The listener's protocol factory: at most ``max_connections`` open at once."""

    def __init__(self, make_handler: Callable[[], _Handler], *, max_connections: int,
                 request_timeout_s: float, refused: Callable[[], None],
                 opened: Callable[[int], None]) -> None:
        self.make_handler = make_handler
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.open = 0
        self._refused = refused
        self._opened = opened

    def __call__(self) -> _Connection:
        return _Connection(self)

    def admit(self, transport: asyncio.Transport) -> _Handler | None:
        """A handler for a new connection; None after answering 503 and closing it."""
        if self.open >= self.max_connections:
            self._refused()
            transport.write(_REFUSED)
            transport.close()
            return None
        self.open += 1
        self._opened(self.open)
        return self.make_handler()

    def release(self) -> None:
        self.open -= 1
        self._opened(self.open)


def _refusal_bytes() -> bytes:
    body = json.dumps(error_payload(503, "too many connections; try again later")).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\n"
            f"Content-Type: {JSON_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nRetry-After: 1\r\nServer: streamcap\r\n"
            "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


_REFUSED: Final = _refusal_bytes()


class _Site(web.BaseSite):
    """A TCP listener whose connections go through a :class:`_Gate`."""

    __slots__ = ("_factory", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, factory: _Gate) -> None:
        super().__init__(runner)
        self._host, self._port, self._factory = host, port, factory

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._factory, self._host, self._port, backlog=self._backlog,
            reuse_address=True)


# --------------------------------------------------------------------------- server


class HttpServer:
    """Serves ``/healthz``, ``/metrics``, ``/config.json``, the live page and added JSON routes.

    Args:
        host: Address to bind (``"127.0.0.1"`` by default in the config).
        port: TCP port; 0 picks a free one (see :attr:`bound_port`).
        metrics: The registry rendered at ``/metrics``.
        health: Called per ``/healthz`` request, on the event loop; must be quick.
        page_config: Called per ``/config.json`` request, e.g.
            ``{"ws_url": "ws://127.0.0.1:8765/", "node_id": "...", "token_required": False}``.
        allowed_hosts: Host names answered besides IP literals, ``localhost`` and
            ``host`` (:meth:`HostPolicy.for_listener`); other ``Host`` headers get 421.
        max_connections: Open connections at most; more are answered 503 and closed.
        max_request_bytes: Longest request line and longest header field (aiohttp's
            ``max_line_size`` and ``max_field_size``).
        max_body_bytes: Largest request body (aiohttp's ``client_max_size``).
        request_timeout_s: How long a connection may stay idle or take to send its
            request head before it is closed, and how long what the server wrote to it
            may stay untaken before it is aborted.
        shutdown_timeout_s: How long :meth:`close` lets requests in progress finish.
        assets: Static files by path (default: :func:`load_assets`).
    """

    def __init__(self, host: str, port: int, *, metrics: Metrics,
                 health: Callable[[], HealthReport],
                 page_config: Callable[[], Mapping[str, object]],
                 allowed_hosts: Iterable[str] = (), max_connections: int = 256,
                 max_request_bytes: int = 8190, max_body_bytes: int = 64 * 1024,
                 request_timeout_s: float = 10.0, shutdown_timeout_s: float = 5.0,
                 assets: Mapping[str, Asset] | None = None) -> None:
        if max_request_bytes < 256:
            raise ValueError(f"max_request_bytes must be >= 256 (got {max_request_bytes})")
        if max_connections < 1 or not request_timeout_s > 0:
            raise ValueError(f"max_connections must be >= 1 and request_timeout_s > 0 "
                             f"(got {max_connections}, {request_timeout_s})")
        self.host = host
        self.port = port
        self.metrics = metrics
        self.health = health
        self.page_config = page_config
        self.host_policy = HostPolicy.for_listener(host, allowed_hosts)
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        # What each connection's aiohttp handler enforces (see the module docstring).
        self._handler_options: dict[str, Any] = {
            "keepalive_timeout": request_timeout_s, "lingering_time": 0,
            "max_line_size": max_request_bytes, "max_field_size": max_request_bytes,
            "max_headers": MAX_HEADERS, "logger": _SERVER_LOG, "access_log": None}
        self.assets: Mapping[str, Asset] = load_assets() if assets is None else dict(assets)
        self._runner: web.AppRunner | None = None
        self._gate: _Gate | None = None
        self._bound_port: int | None = None
        self._labels: dict[str, str] = {}  # path -> route label of the request counter
        self._throttle = Throttle(LOG_INTERVAL_S)
        self._requests = metrics.counter(
            "streamcap_http_requests_total", "HTTP requests answered, by route and status code",
            ("route", "code"))
        self._refused = metrics.counter(
            "streamcap_http_refused_total",
            "HTTP requests and connections refused: Host not allowed (host), too many "
            "connections open (max_connections)", ("reason",))
        self._connections = metrics.gauge("streamcap_http_connections",
                                          "HTTP connections open")
        self.app = web.Application(middlewares=[self._middleware], client_max_size=max_body_bytes)
        self.add_route("GET", "/healthz", self._healthz, label="healthz")
        self.add_route("GET", "/metrics", self._metrics, label="metrics")
        self.add_json_route("GET", "/config.json", self._page_config, label="config.json")
        for path, asset in self.assets.items():
            self.add_route("GET", path, self._asset_handler(asset), label="page")

    # ----------------------------------------------------------------- routes

    def add_route(self, method: str, path: str,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]], *,
                  label: str) -> None:
        """Serve ``method path`` (GET routes answer HEAD too); ``label`` is the
        ``route`` of its requests in ``streamcap_http_requests_total``.

        Raises:
            RuntimeError: The server has started (aiohttp's router is frozen then).
        """
        self.app.router.add_route(method, path, handler)
        if method == "GET":
            self.app.router.add_route("HEAD", path, handler)
        self._labels[path] = label

    def add_json_route(self, method: str, path: str, handler: JsonHandler, *,
                       label: str) -> None:
        """:meth:`add_route` for a handler that returns a JSON-ready value (200).

        A handler may raise ``aiohttp.web.HTTPException`` (e.g. ``HTTPBadRequest(text=...)``)
        for another status: it becomes a JSON error with that text as its message.
        """
        async def respond(request: web.Request) -> web.StreamResponse:
            return json_response(200, await handler(request))

        self.add_route(method, path, respond, label=label)

    @staticmethod
    def _asset_handler(asset: Asset) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(_request: web.Request) -> web.StreamResponse:
            return web.Response(body=asset.body,
                                headers={"Content-Type": asset.content_type, **_PAGE_HEADERS})
        return serve

    async def _healthz(self, _request: web.Request) -> web.StreamResponse:
        try:
            report = self.health()
        except Exception as exc:  # noqa: BLE001 - a failing check means unhealthy, not a crash
            _log.exception("health check raised")
            report = HealthReport(live=False, ready=False,
                                  reasons=(f"health check raised {type(exc).__name__}: {exc}",))
        status, body = health_payload(report)
        return json_response(status, body)

    async def _metrics(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render().encode("utf-8"),
                            headers={"Content-Type": METRICS_CONTENT_TYPE,
                                     "Cache-Control": "no-store"})

    async def _page_config(self, _request: web.Request) -> object:
        return dict(self.page_config())

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                          ) -> web.StreamResponse:
        """The Host and version checks, JSON errors, the common headers, the request counter."""
        path = request.raw_path.partition("?")[0]
        try:
            response = self._refusal(request) or await handler(request)
        except web.HTTPException as exc:
            response = self._error(exc, path)
        except (web.RequestPayloadError, HttpProcessingError) as exc:  # a body a route read
            cause = exc if isinstance(exc, HttpProcessingError) else exc.__cause__
            response = json_response(400, error_payload(
                400, bad_request_message(cause, self.max_request_bytes)), {"Connection": "close"})
        except Exception:  # noqa: BLE001 - one failing route must not take the server down
            _log.exception("http handler raised", path=path)
            response = json_response(500, error_payload(500, "internal error; see the log"))
        response.headers["Server"] = "streamcap"
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        resource = request.match_info.route.resource  # None when no route matched
        label = self._labels.get(request.path if resource is None else resource.canonical,
                                 "other")
        self._requests.inc(1.0, label, str(response.status))
        _log.debug("http request", method=request.method, path=path, status=response.status)
        return response

    def _refusal(self, request: web.Request) -> web.StreamResponse | None:
        """The answer to a request this server does not serve: another HTTP version, or a
        ``Host`` (or absolute-form target) naming another host."""
        if request.version not in _SERVED_VERSIONS:
            return json_response(400, error_payload(
                400, "only HTTP/1.0 and HTTP/1.1 are served"), {"Connection": "close"})
        host = request.headers.get("Host")
        authority = target_authority(request.raw_path)
        if self.host_policy.allows(host) and (authority is None
                                              or self.host_policy.allows(authority)):
            return None
        self._refused.inc(1.0, "host")
        if (held := self._throttle.allow(("host", request.remote))) is not None:
            _log.warning("http request refused: Host not allowed (see http.allowed_hosts)",
                         host=(host or "")[:100], target_host=(authority or "")[:100],
                         remote=request.remote, suppressed=held)
        return json_response(421, error_payload(
            421, "this server does not answer for that host name; an operator can list it "
                 "in http.allowed_hosts"))

    def _answer_error(self, request: BaseRequest, status: int,
                      exc: BaseException | None) -> web.StreamResponse:
        """aiohttp's answer to what never reached the application (see :class:`_Handler`)."""
        if status >= 500:
            _log.error("http request failed outside its handler", status=status,
                       error=repr(exc) if exc is not None else None)
            message = "internal error; see the log"
        else:
            message = bad_request_message(exc, self.max_request_bytes)
            _log.debug("bad http request", status=status, error=message,
                       remote=request.remote)
        self._requests.inc(1.0, "malformed", str(status))
        return json_response(status, error_payload(status, message),
                             {"Server": "streamcap", "X-Content-Type-Options": "nosniff"})

    @staticmethod
    def _error(exc: web.HTTPException, path: str) -> web.StreamResponse:
        headers: dict[str, str] = {}
        if isinstance(exc, web.HTTPNotFound):
            message = f"no resource at {path}"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{exc.method} is not allowed on {path} (allowed: {allowed})"
            headers["Allow"] = allowed
        else:
            message = exc.text or exc.reason
        if exc.status < 400:  # a redirect, say: not an error
            return exc
        return json_response(exc.status, error_payload(exc.status, message), headers)

    # ----------------------------------------------------------------- lifecycle

    @property
    def bound_port(self) -> int:
        """The TCP port actually bound (useful with ``port=0``).

        Raises:
            RuntimeError: The server has not been started.
        """
        if self._bound_port is None:
            raise RuntimeError("HttpServer.bound_port read before start()")
        return self._bound_port

    @property
    def active_connections(self) -> int:
        """Connections open right now."""
        return 0 if self._gate is None else self._gate.open

    async def start(self) -> int:
        """Bind and start serving; returns the bound port.

        Raises:
            ConfigError: The address cannot be bound (in use, not local, no permission).
        """
        runner = web.AppRunner(self.app, handle_signals=False,
                               shutdown_timeout=self._shutdown_timeout_s)
        await runner.setup()
        manager = runner.server
        assert manager is not None  # set up just above
        loop = asyncio.get_running_loop()
        gate = _Gate(lambda: _Handler(manager, self._answer_error, loop=loop,
                                      **self._handler_options),
                     max_connections=self.max_connections,
                     request_timeout_s=self.request_timeout_s,
                     refused=self._refuse_connection,
                     opened=lambda n: self._connections.set(n))
        try:
            await _Site(runner, self.host, self.port, gate).start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"http.host/http.port: cannot listen on {self.host}:{self.port}: "
                              f"{reason}") from exc
        self._runner, self._gate = runner, gate
        self._bound_port = int(runner.addresses[0][1])
        _log.info("http listening", host=self.host, port=self._bound_port,
                  max_connections=self.max_connections)
        return self._bound_port

    def _refuse_connection(self) -> None:
        self._refused.inc(1.0, "max_connections")
        if (held := self._throttle.allow(("max_connections",))) is not None:
            _log.warning("http connection refused: max_connections open (see "
                         "http.max_connections)", max_connections=self.max_connections,
                         suppressed=held)

    async def close(self) -> None:
        """Stop listening and end the connections still open."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
