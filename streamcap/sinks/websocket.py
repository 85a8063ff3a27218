"""The WebSocket sink: captions, embeddings, source status and triggers for any number of clients.

``websockets.asyncio.server.serve`` does the protocol work; this module adds
the streamcap parts around it:

- a cap on connections (``max_clients``), counted from the moment a
  connection is accepted, handshake included (:class:`~streamcap.sinks.ws_protocol.ConnectionGate`):
  over it a client gets HTTP 503 with ``Retry-After``, or is closed at once
  when even the refusal slots are taken;
- handshake checks, in this order, each refusal counted in
  ``streamcap_websocket_refused_total{sink,reason}`` and logged at most once a
  minute per reason, whatever the remote address (:class:`~streamcap.logs.Throttle`;
  an attacker holding many addresses gets no more lines):
  capacity (503), a malformed request such as a repeated ``Host``, ``Origin``
  or ``Authorization`` header (400), a ``Host`` this listener does not answer
  to (403, against DNS rebinding), a browser page from another origin (403),
  and the bearer token (``Authorization: Bearer <token>`` or ``?token=`` for
  browsers, compared in constant time; 401);
- a ``hello`` frame on connect, then the default subscription (captions,
  status and trigger events of every source) with its backfill (the latest
  status and trigger state, then the last captions);
- after a restart, a backfill recalled from the history store
  (:meth:`WebSocketSink.recall`, called by the daemon before the first ``run``
  when a store is open): the last ``backfill`` captions (per source or overall)
  and the trigger events of the same period, as the previous runs published them
  (their own ``run_id``), counted in the hello's ``capabilities.recalled``;
- per-client subscriptions, parsed and answered by :mod:`streamcap.sinks.ws_protocol`;
  a frame whose handling fails unexpectedly is answered by an ``internal`` error frame
  and logged at most once a minute (the error's type, never a traceback or the frame),
  and the connection stays open;
- connects and disconnects are logged at debug; at info, at most one line a minute
  each (with ``clients=`` connected now and ``suppressed=``), since any local process
  can open and close connections at will;
- one :class:`~streamcap.sinks.ws_protocol.ClientQueue` (bounded in frames
  and bytes) and one writer task per client, so that a client that stops
  reading only loses its own oldest frames (counted, and announced to it by a
  ``dropped`` error frame when it reads again) and never delays the sink or
  another client;
- a client's frames are read only while fewer than :data:`MAX_PENDING_REPLIES`
  answers to it (``subscribed``, ``pong``, ``error``) wait in its queue, so a
  client that floods requests without reading the answers is simply not read
  further (TCP pushes back) and cannot make the sink queue more.

Where a slow client's backlog sits. Left alone, the frames a client has not
read pile up *below* its queue, where nothing can drop or count them: in the
connection's write buffer, in both kernels' socket buffers (megabytes on
loopback), and in the client library's receive queue (16 frames by default in
the ``websockets`` library, which then stops reading the socket until its
application has taken 12 of them). The keepalive ping is written behind all of
that, so a slow but live reader could not answer it in time and was cut off
(1011/1006) while its queue here stayed empty and no drop was counted. So the
writer keeps at most :data:`IN_FLIGHT_FRAMES` frames or :data:`IN_FLIGHT_BYTES`
bytes on the wire unacknowledged: past either, it sends a ping and waits for
the pong (the client library answers a ping as soon as it has read everything
before it) before it sends more. The backlog then stays in the client's queue
here, where the oldest frames are dropped, counted and announced, and a
keepalive ping waits behind at most that window. A peer that never answers is
still closed by the keepalive (``ping_timeout_s``).

Options are validated by :func:`create_sink` (the ``websocket`` entry point);
``docs/websocket.md`` documents them and the client protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Literal
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamcap.bus import wire
from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import RecentHistory, SinkContext, SinkEndpoint, read_sink_options
from streamcap.errors import ConfigError, HistoryError
from streamcap.logs import Throttle, get_logger
from streamcap.messages import Caption, Published, TriggerEvent
from streamcap.netpolicy import (
    HostPolicy,
    OriginPolicy,
    host_names_problem,
    is_loopback,
    normalise_origin,
)
from streamcap.options import option, regular_file, secret
from streamcap.sinks.trigger_pairs import pair_of, watches
from streamcap.sinks.ws_protocol import (
    CONTROL,
    KINDS,
    Admission,
    BackfillScope,
    ClientQueue,
    ConnectionGate,
    FrameError,
    History,
    PingRequest,
    Subscription,
    default_subscription,
    frame_size,
    parse_client_frame,
)
from streamcap.stats import Counter, Gauge

if TYPE_CHECKING:
    from streamcap.triggers.spec import TriggerSpec

_log = get_logger(__name__)

FLUSH_TIMEOUT_S: Final = 2.0
"""On shutdown, how long the sink waits for clients to read what is queued for them."""

CLOSE_TIMEOUT_S: Final = 2.0
"""How long a closing handshake may take before the connection is dropped."""

MAX_CLIENT_FRAME_BYTES: Final = 64 * 1024
"""Client frames are small requests; a larger one closes the connection (1009)."""

CLIENT_FRAMES_BUFFERED: Final = 4
"""Client frames read ahead of the sink per connection (websockets' ``max_queue``):
with :data:`MAX_CLIENT_FRAME_BYTES`, at most 256 KiB of a client's input waits here."""

MAX_PENDING_REPLIES: Final = 8
"""A client's next frame is read only while fewer answers than this wait for it."""

HANDSHAKE_TIMEOUT_S: Final = 10.0
"""A connection that has not completed its opening handshake by then is closed."""

REFUSAL_SLOTS: Final = 32
"""Connections over ``max_clients`` held at a time to answer 503; more are closed at once."""

RETRY_AFTER_S: Final = 5
"""The ``Retry-After`` of a 503 at capacity, seconds."""

REFUSAL_LOG_INTERVAL_S: Final = 60.0
"""At most one log line per refusal reason per this many seconds (any remote address)."""

CONNECTION_LOG_INTERVAL_S: Final = 60.0
"""At most one info line per this many seconds for connects, and one for disconnects
(each is also logged at debug)."""

FAILURE_LOG_INTERVAL_S: Final = 60.0
"""At most one log line per this many seconds for client frames whose handling failed."""

RefusalReason = Literal["capacity", "bad_request", "host", "origin", "token"]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = (
    "capacity", "bad_request", "host", "origin", "token")

IN_FLIGHT_FRAMES: Final = 8
"""Frames a client may have on the wire, not yet acknowledged by a pong.

Well under the 16 frames after which the ``websockets`` client library stops
reading, so that a pause of the client's own reading is short."""

IN_FLIGHT_BYTES: Final = 256 * 1024
"""Bytes a client may have on the wire, not yet acknowledged by a pong."""

PING_EVERY_FRAMES: Final = IN_FLIGHT_FRAMES // 4
PING_EVERY_BYTES: Final = IN_FLIGHT_BYTES // 4
"""The writer pings after this many frames or bytes, so that pongs come back
while it sends on and a client that keeps up never waits for one."""


# --------------------------------------------------------------------------- options


MAX_BACKFILL: Final = 10_000

MAX_CLIENTS: Final = 65_535
"""The largest ``max_clients`` (the HTTP server's ``max_connections`` has the same bound)."""


def _origins(values: tuple[str, ...]) -> str | None:
    if not all(v.strip() for v in values):
        return "expected an array of non-empty strings"
    if not all(normalise_origin(v) is not None for v in values):
        return "expected origins such as 'https://home.example' or 'http://192.0.2.7:8080'"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketOptions:
    """The ``[sinks.<instance>]`` table of a ``websocket`` sink, validated.

    ``token_env`` names the environment variable holding the bearer token; the
    token itself never appears in the config file or in this object.
    """

    host: str = option("127.0.0.1", non_empty=True, help="the address to bind")
    port: int = option(8765, min=0, max=65535,
                       help="0: an ephemeral port, logged and exposed as WebSocketSink.bound_port")
    backfill: int = option(20, min=0, max=MAX_BACKFILL,
                           help="captions replayed to a new subscriber")
    backfill_scope: BackfillScope = option("source",
                                           help="last `backfill` per source, or overall")
    max_queue: int = option(256, min=1, max=1_000_000,
                            help="frames pending per client before its oldest are dropped")
    max_queue_bytes: int = option(4 * 1024 * 1024, min=64 * 1024, max=2**30,
                                  help="bytes pending per client, likewise")
    max_clients: int = option(256, min=1, max=MAX_CLIENTS,
                              help="connections at a time, handshakes included; more get 503")
    token_env: str | None = option(None, secret="the bearer token clients present")
    tls_cert: Path | None = option(None, non_empty=True, check=regular_file)
    tls_key: Path | None = option(None, non_empty=True, check=regular_file)
    accepts: frozenset[str] = option(frozenset(KINDS), choices=KINDS, non_empty=True)
    allowed_origins: tuple[str, ...] | None = option(
        None, check=_origins,
        help="browser Origins allowed; None: pages from the host the client connects to")
    allowed_hosts: tuple[str, ...] | None = option(
        None, check=host_names_problem,
        help="Host header names answered besides IP literals, localhost and `host`")
    ping_interval_s: float = option(20.0, above=0, max=3600)
    ping_timeout_s: float = option(20.0, above=0, max=3600)

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """A public bind needs a token; a certificate needs its key and the key its certificate."""
        if (self.token_env is None and not {"host", "token_env"} & set(refused)
                and not is_loopback(self.host)):
            yield "host", (f"{self.host!r} is not a loopback address, so anyone who can reach "
                           f"this machine could read every caption; set token_env to the name "
                           f"of an environment variable holding a bearer token (clients then "
                           f"send 'Authorization: Bearer <token>' or '?token=<token>'), or bind "
                           f"127.0.0.1")
        if (self.tls_cert is None) != (self.tls_key is None):
            missing, given = ("tls_key", "tls_cert") if self.tls_key is None else (
                "tls_cert", "tls_key")
            yield missing, f"{given} is set, so {missing} is needed too"


def _tls_context(cert: Path, key: Path) -> tuple[ssl.SSLContext | None, list[tuple[str, str]]]:
    """The server-side TLS context of ``cert`` and ``key``, or what stops it loading."""
    problems = []
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append((name, f"cannot read {path}: {exc.strerror or exc}"))
    if problems:
        return None, problems
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        message = f"cannot load the certificate {cert} with the key {key} (tls_key): {exc}"
        return None, [("tls_cert", message)]
    return context, []


def parse_options(
    instance: str, options: Mapping[str, object]
) -> tuple[WebSocketOptions, str | None, ssl.SSLContext | None]:
    """Validate a sink's options, read its token and load its TLS certificate.

    Args:
        instance: the config table name, used in messages as ``sinks.<instance>.<key>``.
        options: the table's keys. The plugin loader removes ``plugin`` and
            ``queue_size`` first; ``accepts`` is passed on (the bus filters by
            it too) so that the hello frame advertises only the configured kinds.

    Returns:
        The options, the bearer token (None without ``token_env``) and the
        server-side TLS context (None without ``tls_cert``/``tls_key``).

    Raises:
        ConfigError: listing every problem, each naming its dotted key.
    """
    got = read_sink_options(WebSocketOptions, instance, options)
    problems = list(got.problems)
    opts = got.value
    context: ssl.SSLContext | None = None
    if opts.tls_cert is not None and opts.tls_key is not None:
        context, tls_problems = _tls_context(opts.tls_cert, opts.tls_key)
        problems += [f"sinks.{instance}.{name}: {message}" for name, message in tls_problems]
    if problems:
        raise ConfigError(problems)
    return opts, secret(opts.token_env), context


# --------------------------------------------------------------------------- the sink


class _Client:
    """One connection's state: its subscription, its queue, its writer's wake-up and window."""

    def __init__(self, number: int, ws: ServerConnection, options: WebSocketOptions,
                 subscription: Subscription) -> None:
        self.number = number
        self.ws = ws
        self.queue = ClientQueue(options.max_queue, options.max_queue_bytes)
        self.subscription = subscription
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        # The window on the wire (IN_FLIGHT_FRAMES): frames and bytes sent and not yet
        # acknowledged by a pong, the pings awaiting their pong with the frames and
        # bytes each acknowledges, and what was sent since the last ping.
        self.unacked_frames = 0
        self.unacked_bytes = 0
        self.pings: deque[tuple[Awaitable[float], int, int]] = deque()
        self.unpinged_frames = 0
        self.unpinged_bytes = 0
        # Set while fewer than MAX_PENDING_REPLIES answers wait in the queue: only then
        # is the client's next frame read.
        self.room = asyncio.Event()
        self.room.set()

    def update_room(self) -> None:
        """Open or close the client's read side by the answers waiting for it."""
        if self.queue.pending(CONTROL) < MAX_PENDING_REPLIES:
            self.room.set()
        else:
            self.room.clear()

    async def ping(self) -> None:
        """Ping now; its pong will acknowledge everything sent so far."""
        pong = await self.ws.ping()
        self.pings.append((pong, self.unpinged_frames, self.unpinged_bytes))
        self.unpinged_frames = self.unpinged_bytes = 0

    async def acknowledge(self, *, wait: bool) -> None:
        """Take the pongs received (with ``wait``: wait for the oldest one first)."""
        while self.pings:
            pong, frames, nbytes = self.pings[0]
            if not wait and not (isinstance(pong, asyncio.Future) and pong.done()):
                return
            await pong  # ConnectionClosed when the connection ends first
            self.pings.popleft()
            self.unacked_frames -= frames
            self.unacked_bytes -= nbytes
            wait = False


@dataclass(frozen=True, slots=True)
class ClientBacklog:
    """What waits for one connected client (for tests and diagnostics)."""

    client: int
    frames: int
    bytes: int
    replies: int
    """Answers to the client's own frames among ``frames`` (hello, subscribed, pong, error)."""
    reading: bool
    """Whether the sink reads the client's next frame (fewer than MAX_PENDING_REPLIES replies)."""


class WebSocketSink:
    """Serves the bus's messages to WebSocket clients (see the module docstring).

    Attributes:
        accepts: the kinds the bus delivers to this sink (option ``accepts``).
        bound_port: the TCP port actually listened on (useful with ``port = 0``),
            set once listening; None before.
        endpoint: the same as a :class:`~streamcap.bus.plugin.SinkEndpoint`, for the daemon.
    """

    def __init__(self, instance: str, options: WebSocketOptions, *,
                 token: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.instance = instance
        self.options = options
        self.accepts: frozenset[str] = options.accepts
        self.bound_port: int | None = None
        self._token = token
        self._ssl = ssl_context
        self._clients: dict[int, _Client] = {}
        self._numbers = itertools.count(1)
        self._history = History(options.backfill, options.backfill_scope)
        self._recalled: list[Caption | TriggerEvent] | None = None  # None: not recalled
        self._recalled_counts: dict[str, object] | None = None  # set once seeded
        self._ready_called = False
        self._ctx: SinkContext | None = None
        self._clients_gauge: Gauge | None = None
        self._dropped: Counter | None = None
        self._refused: Counter | None = None
        self._refusal_log = Throttle(REFUSAL_LOG_INTERVAL_S)
        self._connection_log = Throttle(CONNECTION_LOG_INTERVAL_S)
        self._failure_log = Throttle(FAILURE_LOG_INTERVAL_S)
        self._hosts = HostPolicy.for_listener(options.host, options.allowed_hosts or ())
        self._origins = OriginPolicy.from_config(options.allowed_origins)
        self.gate = ConnectionGate(options.max_clients, REFUSAL_SLOTS)
        """Connections held now, by admission (handshakes included)."""

    @property
    def endpoint(self) -> SinkEndpoint | None:
        """Where clients connect; None until the sink listens."""
        if self.bound_port is None:
            return None
        return replace(self.configured_endpoint, port=self.bound_port)

    def backlogs(self) -> list[ClientBacklog]:
        """What waits for each connected client now, in connection order."""
        return [ClientBacklog(client=c.number, frames=len(c.queue), bytes=c.queue.bytes,
                              replies=c.queue.pending(CONTROL), reading=c.room.is_set())
                for c in self._clients.values()]

    def triggers_changed(self, specs: Mapping[str, TriggerSpec]) -> None:
        """The live set of triggers is now ``specs`` (call on the event loop, any time): the
        latest frames of pairs no longer watched are not replayed to new subscribers."""
        self._history.forget_triggers(lambda pair: watches(specs, pair))

    def recall(self, recent: RecentHistory) -> None:
        """Seed the backfill from the history store (:class:`~streamcap.bus.plugin.RecallsHistory`).

        Reads ``recent(backfill, backfill_scope == "source")`` at once: the newest
        captions and the trigger events of the same period, oldest first. They
        are added to the backfill at the start of the first ``run`` (encoded with
        the node id), before anything live, so a client connecting after a
        restart gets them as the previous runs published them (their own
        ``run_id``). Kinds this sink does not offer are left out; nothing is read
        with ``backfill = 0``. A store that cannot be read costs the recall only:
        it is logged and the backfill starts empty. Later calls do nothing.
        """
        if self._recalled is not None:
            return
        items: list[Caption | TriggerEvent] = []
        if self.options.backfill > 0:
            try:
                got = recent(self.options.backfill, self.options.backfill_scope == "source")
            except HistoryError as exc:
                _log.warning("websocket backfill not recalled from the history store",
                             sink=self.instance, error=str(exc))
                got = ()
            items = [m for m in got if isinstance(m, Caption | TriggerEvent)
                     and wire.kind_of(m) in self.accepts]
        self._recalled = items
        if self._ctx is not None:  # called late, while running: seed at once
            self._seed(self._ctx)

    def _seed(self, ctx: SinkContext) -> None:
        """Add the recalled messages to the backfill, once."""
        if self._recalled is None or self._recalled_counts is not None:
            return
        captions: dict[str, int] = {}
        triggers = 0
        for msg in self._recalled:
            frame = wire.encode(wire.to_wire(msg, node_id=ctx.node_id))
            if isinstance(msg, TriggerEvent):
                self._history.add("trigger", msg.source_id, frame, trigger=msg.trigger)
                triggers += 1
            else:
                self._history.add("caption", msg.source_id, frame)
                captions[msg.source_id] = captions.get(msg.source_id, 0) + 1
        self._recalled_counts = {"captions": captions, "triggers": triggers}
        self._recalled = []
        ctx.logger.info("websocket backfill recalled from the history store",
                        captions=sum(captions.values()), triggers=triggers)

    @property
    def configured_endpoint(self) -> SinkEndpoint:
        """Where it will listen, as configured (port 0: any free one); known before ``run``."""
        return SinkEndpoint(kind="websocket", host=self.options.host, port=self.options.port,
                            scheme="wss" if self._ssl is not None else "ws",
                            token_required=self._token is not None)

    # ------------------------------------------------------------------ run

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        """Listen, fan the inbox's messages out to clients until it closes, then flush and stop."""
        self._ctx = ctx
        self._seed(ctx)
        self._clients_gauge = ctx.metrics.gauge(
            "streamcap_websocket_clients", "Connected WebSocket clients", ("sink",))
        self._dropped = ctx.metrics.counter(
            "streamcap_websocket_dropped_total",
            "Frames dropped from WebSocket clients' queues because the client was not reading",
            ("sink", "kind"))
        self._refused = ctx.metrics.counter(
            "streamcap_websocket_refused_total",
            "WebSocket connections refused at the handshake, by reason "
            "(capacity, bad_request, host, origin, token)", ("sink", "reason"))
        for reason in REFUSAL_REASONS:
            self._refused.inc(0.0, self.instance, reason)
        self._clients_gauge.set(len(self._clients), self.instance)
        opts = self.options
        server = serve(
            self._serve_client, opts.host, opts.port,
            process_request=self._check_handshake,
            create_connection=_gated_connection(self.gate, self._on_abort),
            ssl=self._ssl,
            open_timeout=HANDSHAKE_TIMEOUT_S,
            ping_interval=opts.ping_interval_s,
            ping_timeout=opts.ping_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=MAX_CLIENT_FRAME_BYTES,
            max_queue=CLIENT_FRAMES_BUFFERED,
        )
        try:
            await server  # binds
        except OSError as exc:
            # The daemon stops with exit 2 when this happens at the sink's first start;
            # the bus retries a later restart with backoff.
            raise ConfigError(f"sinks.{self.instance}.host/port: cannot listen on "
                              f"{opts.host}:{opts.port}: {exc.strerror or exc}") from exc
        async with server:
            self._announce(server, ctx)
            async for msg in inbox:
                self._dispatch(msg)
                # Let the writers run between the messages of a burst, so that a
                # backlog in the inbox does not overflow every client's queue at once.
                await asyncio.sleep(0)
            await self._flush()
        ctx.logger.info("websocket sink stopped")

    def _announce(self, server: Server, ctx: SinkContext) -> None:
        addresses = [s.getsockname() for s in server.sockets]
        self.bound_port = int(addresses[0][1])
        scheme = "wss" if self._ssl is not None else "ws"
        ctx.logger.info("websocket sink listening",
                        urls=[f"{scheme}://{_host_for_url(a[0])}:{a[1]}/" for a in addresses],
                        port=self.bound_port, token_required=self._token is not None,
                        tls=self._ssl is not None)
        if not self._ready_called:
            self._ready_called = True
            ctx.ready()

    async def _flush(self) -> None:
        waits = [c.idle.wait() for c in self._clients.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), FLUSH_TIMEOUT_S)

    # ------------------------------------------------------------------ fan-out

    def _dispatch(self, msg: Published) -> None:
        """Encode ``msg`` once and queue it for every client that wants it; never awaits."""
        kind = wire.kind_of(msg)
        source_id = msg.source_id
        if isinstance(msg, TriggerEvent) and not self._history.watching(pair_of(msg)):
            return  # its trigger was removed after it was decided: not live, not replayed
        wanting = [c for c in self._clients.values() if c.subscription.wants(kind, source_id)]
        frame = ""  # an embedding nobody wants is never encoded; History ignores it
        if wanting or kind != "embedding":
            frame = wire.encode(wire.to_wire(msg, node_id=self._node_id))
        self._history.add(kind, source_id, frame,
                          trigger=msg.trigger if isinstance(msg, TriggerEvent) else None)
        size = frame_size(frame)
        for client in wanting:
            self._push(client, kind, frame, size)

    def _push(self, client: _Client, kind: str, frame: str, size: int | None = None) -> None:
        for dropped in client.queue.push(kind, frame, size):
            if self._dropped is not None:
                self._dropped.inc(1.0, self.instance, dropped)
        client.idle.clear()
        client.wakeup.set()

    def _count_clients(self) -> None:
        if self._clients_gauge is not None:
            self._clients_gauge.set(len(self._clients), self.instance)

    def _push_control(self, client: _Client, frame: Mapping[str, object]) -> None:
        self._push(client, CONTROL, wire.encode(frame))
        client.update_room()

    @property
    def _node_id(self) -> str:
        return self._ctx.node_id if self._ctx is not None else ""

    # ------------------------------------------------------------------ connections

    def _check_handshake(self, connection: ServerConnection,
                         request: Request) -> Response | None:
        """``process_request`` hook: None lets the handshake go on, else the refusal.

        Capacity (503), a malformed request (400), the ``Host`` (403), the
        ``Origin`` (403), then the token (401); nothing of the request is echoed.
        """
        admission = (connection.admission if isinstance(connection, _GatedConnection)
                     else Admission.SERVE)
        if admission is not Admission.SERVE:
            response = self._refuse(connection, "capacity", HTTPStatus.SERVICE_UNAVAILABLE,
                                    f"this server serves at most {self.options.max_clients} "
                                    f"connections at a time; retry later\n")
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        fields = read_handshake(request)
        if isinstance(fields, str):
            return self._refuse(connection, "bad_request", HTTPStatus.BAD_REQUEST, fields + "\n")
        if not self._hosts.allows(fields.host):
            return self._refuse(connection, "host", HTTPStatus.FORBIDDEN,
                                "this server does not answer to that Host name (see the "
                                "sink's allowed_hosts)\n")
        if not self._origins.allows(fields.origin, fields.host):
            return self._refuse(connection, "origin", HTTPStatus.FORBIDDEN,
                                "pages from this Origin may not connect (see the sink's "
                                "allowed_origins)\n")
        if self._token is None:
            return None
        presented = fields.token
        if presented is not None and hmac.compare_digest(presented.encode(),
                                                         self._token.encode()):
            return None
        response = self._refuse(connection, "token", HTTPStatus.UNAUTHORIZED,
                                "missing or invalid bearer token\n",
                                token_given=presented is not None)
        response.headers["WWW-Authenticate"] = 'Bearer realm="streamcap"'
        return response

    def _refuse(self, connection: ServerConnection, reason: RefusalReason, status: HTTPStatus,
                text: str, **fields: object) -> Response:
        """Count and (throttled) log a refusal; the plain-text response to send."""
        self._count_refusal(connection, reason, status, **fields)
        return connection.respond(status, text)

    def _count_refusal(self, connection: ServerConnection, reason: RefusalReason,
                       status: HTTPStatus | None, **fields: object) -> None:
        if self._refused is not None:
            self._refused.inc(1.0, self.instance, reason)
        if self._ctx is None:
            return
        # one line per reason for everyone: a flood may come from many addresses
        held = self._refusal_log.allow(reason)
        if held is not None:
            self._ctx.logger.warning(
                "websocket client refused", reason=reason,
                status=None if status is None else int(status), remote=_remote(connection),
                connections=len(self.gate), max_clients=self.options.max_clients,
                suppressed=held, **fields)

    def _on_abort(self, connection: ServerConnection) -> None:
        """A connection over the cap and every refusal slot: closed at once, counted."""
        self._count_refusal(connection, "capacity", None)

    async def _serve_client(self, ws: ServerConnection) -> None:
        """websockets' connection handler: hello, default subscription, then read client frames."""
        number = next(self._numbers)
        name = f"streamcap[sink:{self.instance}].client-{number}"
        task = asyncio.current_task()
        if task is not None:
            task.set_name(name)
        ctx = self._ctx
        if ctx is None:  # run() sets it before serving; a connection cannot come earlier
            return
        client = _Client(number, ws, self.options, default_subscription(self.accepts))
        self._clients[number] = client
        self._count_clients()
        self._log_connection(ctx, "websocket client connected", client=number,
                             remote=_remote(ws))
        # hello and the default subscription's backfill are queued before any other
        # message can be dispatched to this client: nothing awaits in between.
        self._push_control(client, wire.hello(ctx.node_id, self._capabilities(),
                                              run_id=ctx.run_id))
        self._subscribe(client, client.subscription, None, self.options.backfill, None)
        writer = asyncio.create_task(self._write(client), name=f"{name}.writer")
        try:
            while True:
                await _room_or_close(client)  # a client that does not read its answers is not read
                data = await ws.recv()
                try:
                    self._on_frame(client, data)
                except Exception as exc:  # noqa: BLE001 - a bug must not cost the connection or flood the log
                    self._on_frame_failed(ctx, client, exc)
        except ConnectionClosed:
            pass
        finally:
            del self._clients[number]
            self._count_clients()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._log_connection(ctx, "websocket client disconnected", client=number,
                                 code=ws.close_code, dropped=client.queue.dropped_total)

    def _log_connection(self, ctx: SinkContext, event: str, **fields: object) -> None:
        """A connect or disconnect: at debug, and at info at most once an interval per event."""
        held = self._connection_log.allow(event)
        if held is None:
            ctx.logger.debug(event, **fields)
        else:
            ctx.logger.info(event, clients=len(self._clients), suppressed=held, **fields)

    def _on_frame_failed(self, ctx: SinkContext, client: _Client, exc: Exception) -> None:
        """Handling one client frame raised: answer ``internal``, log once an interval.

        The line names the exception's type only: its text may quote the client's input.
        """
        self._push_control(client, wire.error_frame(
            "internal", "the server failed to handle this frame; the connection stays open"))
        held = self._failure_log.allow()
        if held is not None:
            ctx.logger.error("websocket client frame failed", client=client.number,
                             error=type(exc).__name__, suppressed=held)

    async def _write(self, client: _Client) -> None:
        """Send the client's queue in order; only this task ever waits on this client."""
        try:
            while True:
                await client.wakeup.wait()
                client.wakeup.clear()
                while (item := client.queue.pop()) is not None:
                    client.update_room()
                    drops, frame = item
                    if drops:
                        await self._send(client, wire.encode(_dropped_notice(drops)))
                    await self._send(client, frame)
                client.idle.set()
        except ConnectionClosed:
            client.idle.set()
            client.room.set()  # the reader then sees the close too

    @staticmethod
    async def _send(client: _Client, frame: str) -> None:
        """Send one frame, first waiting for pongs while the window on the wire is full.

        Waiting here, rather than in the write buffer or the kernel, leaves the
        backlog in the client's queue, where it is bounded, dropped oldest first
        and counted. A peer that never answers is closed by the keepalive, which
        ends the wait with ConnectionClosed.
        """
        await client.acknowledge(wait=False)
        while client.unacked_frames >= IN_FLIGHT_FRAMES or client.unacked_bytes >= IN_FLIGHT_BYTES:
            if not client.pings:
                await client.ping()
            await client.acknowledge(wait=True)
        size = frame_size(frame)
        await client.ws.send(frame)
        client.unacked_frames += 1
        client.unacked_bytes += size
        client.unpinged_frames += 1
        client.unpinged_bytes += size
        if client.unpinged_frames >= PING_EVERY_FRAMES or client.unpinged_bytes >= PING_EVERY_BYTES:
            await client.ping()

    def _on_frame(self, client: _Client, data: str | bytes) -> None:
        request = parse_client_frame(data, offered=self.accepts,
                                     max_backfill=self.options.backfill)
        if isinstance(request, FrameError):
            self._push_control(client, wire.error_frame(request.code, request.message,
                                                        **request.details))
        elif isinstance(request, PingRequest):
            pong: dict[str, object] = {"type": "pong", "v": wire.PROTOCOL_VERSION}
            if request.request_id is not None:
                pong["id"] = request.request_id
            self._push_control(client, pong)
        else:
            limit = self.options.backfill if request.backfill is None else request.backfill
            old, client.subscription = client.subscription, request.subscription
            self._subscribe(client, request.subscription, old, limit, request.request_id)

    def _subscribe(self, client: _Client, new: Subscription, old: Subscription | None,
                   limit: int, request_id: str | int | None) -> None:
        replay = self._history.replay(new, old, limit)
        ack: dict[str, object] = {"type": "subscribed", "v": wire.PROTOCOL_VERSION,
                                  **new.describe(),
                                  "backfill": sum(1 for k, _ in replay if k == "caption")}
        if request_id is not None:
            ack["id"] = request_id
        self._push_control(client, ack)
        for kind, frame in replay:
            self._push(client, kind, frame)

    def _capabilities(self) -> dict[str, object]:
        recalled = ({} if self._recalled_counts is None
                    else {"recalled": self._recalled_counts})
        return {
            "kinds": sorted(self.accepts),
            "sources": self._history.sources,
            "backfill": self.options.backfill,
            "backfill_scope": self.options.backfill_scope,
            "auth_required": self._token is not None,
            "tls": self._ssl is not None,
            "max_queue": self.options.max_queue,
            "max_queue_bytes": self.options.max_queue_bytes,
            "client_frames": ["subscribe", "ping"],
            "default_subscription": default_subscription(self.accepts).describe(),
            "history": {
                # The backfill lives in memory: after a restart it holds only what was
                # recalled from the history store ("recalled", when the daemon has one).
                "store": "memory",
                "covers": "run",
                "max_captions": self.options.backfill,
                "scope": self.options.backfill_scope,
                "captions": self._history.held(),
            },
            # What the daemon recalled from its history store at start (only when it has one).
            **recalled,
        }


async def _room_or_close(client: _Client) -> None:
    """Until the client may send its next frame, or its connection closes."""
    if client.room.is_set():
        return
    waits = {asyncio.ensure_future(client.room.wait()),
             asyncio.ensure_future(client.ws.wait_closed())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _dropped_notice(drops: Mapping[str, int]) -> dict[str, object]:
    total = sum(drops.values())
    return wire.error_frame(
        "dropped",
        f"{total} frame(s) were dropped because this client was not reading fast enough",
        dropped=total, by_kind=dict(sorted(drops.items())))


@dataclass(frozen=True, slots=True)
class HandshakeFields:
    """What the handshake checks read from a request, each header present at most once."""

    host: str | None
    origin: str | None
    token: str | None
    """From ``Authorization: Bearer <token>``, else from ``?token=``; None if neither."""


_SINGLE_HEADERS: Final = ("Host", "Origin", "Authorization")
MAX_QUERY_FIELDS: Final = 32


def read_handshake(request: Request) -> HandshakeFields | str:
    """The fields of an opening handshake, or why the request is malformed (HTTP 400).

    Malformed: ``Host``, ``Origin`` or ``Authorization`` given more than once, a
    target that is not a path with an optional query, more than one ``token``
    parameter or more than :data:`MAX_QUERY_FIELDS` query fields. The reason
    never quotes the request. An ``Authorization`` header of another scheme
    than ``Bearer`` presents no token (HTTP 401 where one is required).
    """
    headers: Headers = request.headers
    for name in _SINGLE_HEADERS:
        if len(headers.get_all(name)) > 1:
            return f"the {name} header was given more than once"
    try:
        target = urlsplit(request.path)
        query = parse_qs(target.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        return (f"the request target must be a path with at most {MAX_QUERY_FIELDS} "
                f"query fields")
    if target.scheme or target.netloc or not request.path.startswith("/"):
        return "the request target must be a path such as /?token=..."
    tokens = query.get("token", [])
    if len(tokens) > 1:
        return "the token query parameter was given more than once"
    token: str | None = tokens[0] if tokens and tokens[0] else None
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        token = value.strip() if scheme.lower() == "bearer" and value.strip() else None
    return HandshakeFields(host=headers.get("Host"), origin=headers.get("Origin"), token=token)


class _GatedConnection(ServerConnection):
    """A connection counted by a :class:`ConnectionGate` from accept to close."""

    gate: ClassVar[ConnectionGate]
    on_abort: ClassVar[Callable[[ServerConnection], None]]
    admission: Admission = Admission.SERVE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.admission = self.gate.open()
        if self.admission is Admission.ABORT:
            type(self).on_abort(self)
            self.transport.abort()  # connection_lost follows: the handshake ends without a word

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self.gate.close(self.admission)


def _gated_connection(gate: ConnectionGate,
                      on_abort: Callable[[ServerConnection], None]) -> type[_GatedConnection]:
    """The connection class of one listener, counted by ``gate``."""

    class GatedConnection(_GatedConnection):
        pass

    GatedConnection.gate = gate
    GatedConnection.on_abort = on_abort
    return GatedConnection


def _remote(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{_host_for_url(str(address[0]))}:{address[1]}"
    return str(address)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def create_sink(instance: str, options: Mapping[str, object]) -> WebSocketSink:
    """Plugin entry point ``websocket``: validate ``[sinks.<instance>]`` and build the sink.

    Reads the token from the environment variable named by ``token_env`` and
    loads the TLS certificate and key, so that every configuration problem is
    reported before the daemon starts.

    Raises:
        ConfigError: naming ``sinks.<instance>.<key>`` for each bad, unknown or
            unreadable option, or a non-loopback ``host`` without ``token_env``.
    """
    opts, token, ssl_context = parse_options(instance, options)
    return WebSocketSink(instance, opts, token=token, ssl_context=ssl_context)
