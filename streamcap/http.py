"""The daemon's small HTTP/1.1 endpoint: health, Prometheus metrics and the live page.

Routes (GET and HEAD only; every response closes the connection):

- ``/healthz``: JSON from :class:`HealthReport`; 200 when live and ready, 503 otherwise;
- ``/metrics``: :meth:`streamcap.stats.Metrics.render` in the Prometheus text format 0.0.4;
- ``/config.json``: what the live page needs to open the WebSocket feed;
- ``/`` and the files of the package data ``streamcap/web/``: the live page.

Errors are JSON: ``{"error": code, "status": n, "message": text}``. A request head
larger than ``max_request_bytes`` gets 431, one that does not arrive within
``request_timeout_s`` gets 408, other methods 405 (with ``Allow``), unknown paths 404.

Parsing and routing are plain functions (:func:`parse_request_head`,
:func:`encode_response`); :class:`HttpServer` only moves bytes on
``asyncio.start_server``. Request bodies are never read.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from importlib import resources
from typing import Final, Self
from urllib.parse import urlsplit

from streamcap.errors import ConfigError
from streamcap.logs import get_logger
from streamcap.stats import Metrics

_log = get_logger(__name__)

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
ALLOWED_METHODS: Final = ("GET", "HEAD")
MAX_HEADERS: Final = 100

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
_TOKEN_RE: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_VERSION_RE: Final = re.compile(r"^HTTP/(\d)\.(\d)$")
_ASSET_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# The live page opens a WebSocket on another port, so connect-src allows ws:/wss:.
_PAGE_HEADERS: Final = (
    ("Content-Security-Policy",
     ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
      "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; "
      "form-action 'none'")),
    ("Referrer-Policy", "no-referrer"),  # the page URL may carry ?token=
    ("X-Frame-Options", "DENY"),
)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHead:
    """A parsed request line and headers (names lower-cased; the last value wins)."""

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """One HTTP response; ``Content-Length``, ``Date`` and ``Connection: close`` are added on encoding."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file of the live page, held in memory."""

    content_type: str
    body: bytes


class RequestError(Exception):
    """A request that gets an error response instead of a route (internal to this module)."""

    def __init__(self, status: HTTPStatus, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


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


def json_response(status: int, payload: object,
                  headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A JSON response (strict JSON: no NaN), never cached."""
    body = json.dumps(jsonable(payload), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(status=status, body=body, content_type=JSON_CONTENT_TYPE,
                    headers=(("Cache-Control", "no-store"), *headers))


def error_response(status: HTTPStatus, message: str,
                   headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """``{"error": "not_found", "status": 404, "message": ...}``."""
    code = status.phrase.lower().replace(" ", "_").replace("-", "_")
    return json_response(int(status), {"error": code, "status": int(status), "message": message},
                         headers)


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request line and headers, up to and including the blank line.

    Args:
        data: The raw head, ``b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"``.

    Raises:
        RequestError: 400 for malformed input, 431 for too many headers, 505 for
            an HTTP version other than 1.x.
    """
    text = data.decode("latin-1")
    text = text.removesuffix("\r\n\r\n")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.match(method):
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed method")
    version_match = _VERSION_RE.match(version)
    if version_match is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed HTTP version")
    if version_match.group(1) != "1":
        raise RequestError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                           f"{version} is not supported (HTTP/1.0 and HTTP/1.1 are)")
    if len(lines) - 1 > MAX_HEADERS:
        raise RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                           f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    hosts = 0
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.match(name):
            raise RequestError(HTTPStatus.BAD_REQUEST, "malformed header field")
        key = name.lower()
        hosts += key == "host"
        headers[key] = value.strip(" \t")
    if version == "HTTP/1.1" and hosts != 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, "HTTP/1.1 requests need exactly one Host header")

    if target.startswith("/"):
        split = urlsplit(target)
        path, query = split.path, split.query
    elif target.startswith(("http://", "https://")):
        split = urlsplit(target)
        path, query = split.path or "/", split.query
    else:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the request target must be a path")
    return RequestHead(method=method, target=target, path=path, query=query, version=version,
                       headers=headers)


def encode_response(response: Response, *, head_only: bool = False,
                    date: str | None = None) -> bytes:
    """The response as bytes: status line, headers (with ``Content-Length`` and
    ``Connection: close``) and the body unless ``head_only``."""
    phrase = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {phrase}",
             f"Date: {date or formatdate(usegmt=True)}",
             "Server: streamcap",
             "Connection: close",
             f"Content-Length: {len(response.body)}",
             "X-Content-Type-Options: nosniff"]
    if response.content_type is not None:
        lines.append(f"Content-Type: {response.content_type}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


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
        if not entry.is_file() or suffix not in _CONTENT_TYPES or not _ASSET_NAME_RE.match(name):
            continue
        assets["/" + name] = Asset(_CONTENT_TYPES[suffix], entry.read_bytes())
    if "/index.html" in assets:
        assets["/"] = assets["/index.html"]
    return assets


# --------------------------------------------------------------------------- server


class HttpServer:
    """Serves ``/healthz``, ``/metrics``, ``/config.json`` and the live page.

    Args:
        host: Address to bind (``"127.0.0.1"`` by default in the config).
        port: TCP port; 0 picks a free one (see :attr:`bound_port`).
        metrics: The registry rendered at ``/metrics``.
        health: Called per ``/healthz`` request, on the event loop; must be quick.
        page_config: Called per ``/config.json`` request, e.g.
            ``{"ws_url": "ws://127.0.0.1:8765/", "node_id": "...", "token_required": False}``.
        max_request_bytes: Largest accepted request head (request line + headers).
        request_timeout_s: Time a client has to send its request head.
        write_timeout_s: Time a client has to take the response.
        max_connections: Connections served at once; more get 503 at once.
        assets: Static files by path (default: :func:`load_assets`).
    """

    def __init__(self, host: str, port: int, *, metrics: Metrics,
                 health: Callable[[], HealthReport],
                 page_config: Callable[[], Mapping[str, object]],
                 max_request_bytes: int = 8192, request_timeout_s: float = 10.0,
                 write_timeout_s: float = 10.0, max_connections: int = 64,
                 assets: Mapping[str, Asset] | None = None) -> None:
        if max_request_bytes < 256:
            raise ValueError(f"max_request_bytes must be >= 256 (got {max_request_bytes})")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1 (got {max_connections})")
        self.host = host
        self.port = port
        self.metrics = metrics
        self.health = health
        self.page_config = page_config
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_connections = max_connections
        self.assets: Mapping[str, Asset] = load_assets() if assets is None else dict(assets)
        self._server: asyncio.Server | None = None
        self._bound_port: int | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._requests = metrics.counter(
            "streamcap_http_requests_total", "HTTP requests answered, by route and status code",
            ("route", "code"))

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
        """Connections being served right now."""
        return len(self._handlers)

    async def start(self) -> int:
        """Bind and start serving; returns the bound port.

        Raises:
            ConfigError: The address cannot be bound (in use, not local, no permission).
        """
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, limit=self.max_request_bytes)
        except OSError as exc:
            raise ConfigError(f"http.host/http.port: cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}") from exc
        self._bound_port = int(self._server.sockets[0].getsockname()[1])
        _log.info("http listening", host=self.host, port=self._bound_port)
        return self._bound_port

    async def close(self) -> None:
        """Stop listening and end the connections still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- routing

    def route(self, request: RequestHead) -> tuple[str, Response]:
        """The route name (for metrics) and the response to ``request``."""
        path = request.path
        handlers: dict[str, Callable[[], Response]] = {
            "/healthz": self._healthz,
            "/metrics": self._metrics,
            "/config.json": self._page_config,
        }
        if path in handlers:
            name = path.lstrip("/")
            make = handlers[path]
        elif path in self.assets:
            name = "page"
            make = self._asset_handler(self.assets[path])
        else:
            return "other", error_response(HTTPStatus.NOT_FOUND, f"no resource at {path}")
        if request.method not in ALLOWED_METHODS:
            return name, error_response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{request.method} is not allowed on {path} (allowed: GET, HEAD)",
                (("Allow", ", ".join(ALLOWED_METHODS)),))
        return name, make()

    @staticmethod
    def _asset_handler(asset: Asset) -> Callable[[], Response]:
        def make() -> Response:
            return Response(status=200, body=asset.body, content_type=asset.content_type,
                            headers=(("Cache-Control", "no-cache"), *_PAGE_HEADERS))
        return make

    def _healthz(self) -> Response:
        try:
            report = self.health()
        except Exception as exc:  # noqa: BLE001 - a failing check means unhealthy, not a crash
            _log.exception("health check raised")
            report = HealthReport(live=False, ready=False,
                                  reasons=(f"health check raised {type(exc).__name__}: {exc}",))
        ok = report.live and report.ready
        body: dict[str, object] = dict(report.details)
        body.update({
            "status": "ok" if ok else ("not_ready" if report.live else "down"),
            "live": report.live,
            "ready": report.ready,
            "reasons": list(report.reasons),
        })
        return json_response(200 if ok else 503, body)

    def _metrics(self) -> Response:
        return Response(status=200, body=self.metrics.render().encode("utf-8"),
                        content_type=METRICS_CONTENT_TYPE, headers=(("Cache-Control", "no-store"),))

    def _page_config(self) -> Response:
        return json_response(200, dict(self.page_config()))

    # ----------------------------------------------------------------- I/O

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - start_server always runs callbacks in a task
            writer.close()
            return
        self._handlers.add(task)
        try:
            if len(self._handlers) > self.max_connections:
                await self._send(writer, "other", error_response(
                    HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry later",
                    (("Retry-After", "1"),)), head_only=False)
                return
            await self._serve_one(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stopped reading; nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            async with asyncio.timeout(self.request_timeout_s):
                raw = await reader.readuntil(b"\r\n\r\n")
            request = parse_request_head(raw)
            head_only = request.method == "HEAD"
            route, response = self.route(request)
        except asyncio.IncompleteReadError:
            return  # closed before a complete request head
        except TimeoutError:
            route, response = "other", error_response(
                HTTPStatus.REQUEST_TIMEOUT,
                f"request head not received within {self.request_timeout_s:g} s")
        except asyncio.LimitOverrunError:
            route, response = "other", error_response(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request head larger than {self.max_request_bytes} bytes")
        except RequestError as exc:
            route, response = "other", error_response(exc.status, exc.message, exc.headers)
        else:
            _log.debug("http request", method=request.method, path=request.path,
                       status=response.status)
        await self._send(writer, route, response, head_only=head_only)
        await self._linger(reader, writer)

    async def _send(self, writer: asyncio.StreamWriter, route: str, response: Response, *,
                    head_only: bool) -> None:
        self._requests.inc(1.0, route, str(response.status))
        writer.write(encode_response(response, head_only=head_only))
        async with asyncio.timeout(self.write_timeout_s):
            await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends for a moment.

        Closing with unread input makes the kernel reset the connection, which
        can destroy the response before the client reads it (e.g. an oversized
        request still being sent when the 431 goes out).
        """
        if writer.can_write_eof():
            writer.write_eof()
        budget = 4 * self.max_request_bytes
        try:
            async with asyncio.timeout(1.0):
                while budget > 0:
                    chunk = await reader.read(min(budget, 65536))
                    if not chunk:
                        break
                    budget -= len(chunk)
        except (TimeoutError, ConnectionError):
            pass
