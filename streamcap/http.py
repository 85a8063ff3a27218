"""The daemon's HTTP endpoint on aiohttp: health, Prometheus metrics, the live page, and a
router for JSON API routes.

Routes (GET and HEAD):

- ``/healthz``: JSON from :class:`HealthReport`; 200 when live and ready, 503 otherwise;
- ``/metrics``: :meth:`streamcap.stats.Metrics.render` in the Prometheus text format 0.0.4;
- ``/config.json``: what the live page needs to open the WebSocket feed;
- ``/`` and the files of the package data ``streamcap/web/``: the live page.

More routes: :meth:`HttpServer.add_json_route` (before :meth:`HttpServer.start`).

Errors the application answers are JSON: ``{"error": code, "status": n, "message":
text}``: unknown paths 404, other methods 405 (with ``Allow``), a handler that raises
500. aiohttp parses the requests and enforces the limits: request line and header
field sizes (``max_request_bytes``; larger gets 400), header count, body size
(``max_body_bytes``; larger gets 413) and the time a connection may stay idle or
take to send its request (``request_timeout_s``; then it is closed). Malformed
requests get aiohttp's own plain-text 400. Every answer the application gives is
counted in ``streamcap_http_requests_total{route,code}``.

The pure parts (:func:`jsonable`, :func:`health_payload`, :func:`error_payload`,
:func:`load_assets`) are plain functions; :class:`HttpServer` wires them to aiohttp.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any, Final, Self

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from streamcap.errors import ConfigError
from streamcap.logs import get_logger
from streamcap.stats import CONTENT_TYPE as METRICS_CONTENT_TYPE
from streamcap.stats import Metrics

__all__ = ["METRICS_CONTENT_TYPE", "Asset", "HealthReport", "HttpServer", "JsonHandler",
           "error_payload", "health_payload", "json_response", "jsonable", "load_assets"]

_log = get_logger(__name__)

JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
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
    """aiohttp logs every malformed request as an error with a traceback; it is the
    client's mistake (aiohttp has answered it with a 400), so it becomes one debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            _log.debug("bad http request", status=exc.code, error=exc.message.strip())
            return False
        return True


_SERVER_LOG: Final = logging.getLogger("streamcap.http.server")
_SERVER_LOG.addFilter(_ClientErrorFilter())

JsonHandler = Callable[[web.Request], Awaitable[object]]
"""A JSON API route: the request in, a JSON-ready value out (see :meth:`HttpServer.add_json_route`)."""


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


def health_payload(report: HealthReport) -> tuple[int, dict[str, object]]:
    """The status code and body of ``/healthz``; ``details`` cannot override the verdict."""
    ok = report.live and report.ready
    body: dict[str, object] = dict(report.details)
    body.update({
        "status": "ok" if ok else ("not_ready" if report.live else "down"),
        "live": report.live,
        "ready": report.ready,
        "reasons": list(report.reasons),
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
        max_request_bytes: Longest request line and longest header field (aiohttp's
            ``max_line_size`` and ``max_field_size``).
        max_body_bytes: Largest request body (aiohttp's ``client_max_size``).
        request_timeout_s: How long a connection may stay idle, or take to send
            its request, before it is closed (aiohttp's ``keepalive_timeout``).
        shutdown_timeout_s: How long :meth:`close` lets requests in progress finish.
        assets: Static files by path (default: :func:`load_assets`).
    """

    def __init__(self, host: str, port: int, *, metrics: Metrics,
                 health: Callable[[], HealthReport],
                 page_config: Callable[[], Mapping[str, object]],
                 max_request_bytes: int = 8190, max_body_bytes: int = 64 * 1024,
                 request_timeout_s: float = 10.0, shutdown_timeout_s: float = 5.0,
                 assets: Mapping[str, Asset] | None = None) -> None:
        if max_request_bytes < 256:
            raise ValueError(f"max_request_bytes must be >= 256 (got {max_request_bytes})")
        self.host = host
        self.port = port
        self.metrics = metrics
        self.health = health
        self.page_config = page_config
        # aiohttp enforces the limits (see the module docstring).
        self._runner_options: dict[str, Any] = {
            "shutdown_timeout": shutdown_timeout_s, "keepalive_timeout": request_timeout_s,
            "max_line_size": max_request_bytes, "max_field_size": max_request_bytes,
            "max_headers": MAX_HEADERS}
        self.assets: Mapping[str, Asset] = load_assets() if assets is None else dict(assets)
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None
        self._labels: dict[str, str] = {}  # path -> route label of the request counter
        self._requests = metrics.counter(
            "streamcap_http_requests_total", "HTTP requests answered, by route and status code",
            ("route", "code"))
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
        """JSON errors, the common headers, the request counter."""
        path = request.raw_path.partition("?")[0]
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = self._error(exc, path)
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
        server = self._runner.server if self._runner is not None else None
        return 0 if server is None else len(server.connections)

    async def start(self) -> int:
        """Bind and start serving; returns the bound port.

        Raises:
            ConfigError: The address cannot be bound (in use, not local, no permission).
        """
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               logger=_SERVER_LOG, **self._runner_options)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"http.host/http.port: cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}") from exc
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])
        _log.info("http listening", host=self.host, port=self._bound_port)
        return self._bound_port

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
