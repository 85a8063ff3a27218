"""The MQTT sink: captions, embeddings, source status and triggers to an MQTT broker (aiomqtt).

Topics, with ``prefix`` defaulting to ``streamcap/<node_id>`` so that two
daemons on one broker never collide::

    <prefix>/availability          "online" / "offline", retained; Last Will "offline"
    <prefix>/<source>/caption      caption frames (streamcap.v1 JSON), QoS qos_caption (1)
    <prefix>/<source>/embedding    embedding frames, QoS 0, never retained
    <prefix>/<source>/status       status frames, QoS 1, retained (retain_status)
    <prefix>/<source>/ha_state     compact caption state for Home Assistant, retained
    <prefix>/<source>/trigger/<name>        "ON" / "OFF", QoS 1, retained
    <prefix>/<source>/trigger/<name>/event  trigger frames (streamcap.v1 JSON), QoS 1

Delivery of captions is at-least-once: every caption is appended to an
on-disk :class:`~streamcap.sinks.outbox.Outbox` first and leaves it only when
the broker acknowledged it (PUBACK), oldest first, so captions produced while
the broker is down (or while the daemon is restarting) arrive when it comes
back, in order; a caption re-sent after a lost acknowledgement is a duplicate
recognisable by its ``window_id``. Trigger events take the same outbox (a
duplicate is recognisable by its ``event_id``): each record is one trigger
frame, published on the event topic and followed by the retained ``ON``/``OFF``
state; a *state announcement* (an ``off`` frame without ``fired_id``, sent by
the engine at start and when a trigger changes) publishes only the retained
``OFF``. Embeddings are best-effort (dropped, and counted, while
disconnected); statuses, and the trigger states the broker acknowledged, are
republished, retained, on every reconnect.

Every (source, trigger) pair first seen gets Home Assistant discovery (a
binary sensor and an event entity, see :mod:`.homeassistant`). When the live
set of triggers changes, the daemon calls :meth:`MqttSink.triggers_changed`:
the pairs no longer watched get empty retained discovery configs (Home
Assistant removes their entities) and their retained state is cleared.

The sink calls ``ctx.ready()`` as soon as its outbox is open: the daemon runs
with the broker down, and the connection is retried forever with jittered,
capped backoff (the first connect included). On every (re)connect it
publishes ``online``, subscribes to Home Assistant's birth topic and
(re)publishes discovery; on every birth message it publishes discovery again.
On shutdown (inbox closed) it waits up to ``flush_timeout_s`` for pending
captions to be acknowledged (what remains stays in the outbox for the next
start), publishes a retained ``offline`` and disconnects cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiomqtt

from streamcap import __version__
from streamcap.backoff import Backoff
from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import SinkContext
from streamcap.bus.wire import encode, to_wire
from streamcap.errors import ConfigError
from streamcap.messages import Caption, Embedding, Published, TriggerEvent, TriggerState
from streamcap.sinks import homeassistant as ha
from streamcap.sinks.mqtt_options import MqttOptions, parse_options, topic_segment
from streamcap.sinks.outbox import Outbox, OutboxRecord
from streamcap.sinks.trigger_pairs import Pair, is_announcement, pair_of, watches

if TYPE_CHECKING:
    from streamcap.triggers.spec import TriggerSpec

__all__ = ["MqttOptions", "MqttSink", "Topics", "broker_client", "create_sink", "parse_options", "topic_segment"]

LIVE_QUEUE_MAX: Final = 1024
"""Embeddings and statuses waiting for the writer while connected."""
HEALTHY_AFTER_S: Final = 30.0
"""A connection that lasted this long resets the reconnect backoff."""
TRIGGER_QOS: Final = 1
"""Trigger events and states are always published with QoS 1."""
_TRIGGER_FRAME: Final = b'{"type":"trigger"'
"""How an outbox record holding a trigger frame starts (``encode`` puts ``type`` first)."""

def broker_client(options: MqttOptions, password: str | None, *, identifier: str,
                  will: aiomqtt.Will | None = None, max_inflight_messages: int | None = None,
                  queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
                  max_queued_incoming_messages: int | None = None) -> aiomqtt.Client:
    """A client of the sink's broker: host, port, user, TLS and timing from ``options``,
    a clean session; the sink and the trigger command topic both connect with it."""
    o = options
    tls_context: ssl.SSLContext | None = None
    if o.tls:
        tls_context = ssl.create_default_context(cafile=o.ca_file)
        if o.cert_file:
            tls_context.load_cert_chain(o.cert_file, o.key_file)
        if o.tls_insecure:
            tls_context.check_hostname = False  # the chain is still verified
    return aiomqtt.Client(
        o.host, o.port, username=o.username, password=password if o.username else None,
        identifier=identifier, will=will, clean_session=True, keepalive=o.keepalive_s,
        timeout=o.publish_timeout_s, tls_context=tls_context,
        max_inflight_messages=max_inflight_messages, queue_type=queue_type,
        max_queued_incoming_messages=max_queued_incoming_messages)


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic layout under one prefix."""

    prefix: str

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    def caption(self, source_id: str) -> str:
        return f"{self.prefix}/{topic_segment(source_id)}/caption"

    def embedding(self, source_id: str) -> str:
        return f"{self.prefix}/{topic_segment(source_id)}/embedding"

    def status(self, source_id: str) -> str:
        return f"{self.prefix}/{topic_segment(source_id)}/status"

    def ha_state(self, source_id: str) -> str:
        return f"{self.prefix}/{topic_segment(source_id)}/ha_state"

    def trigger_state(self, source_id: str, trigger: str) -> str:
        """The retained ``ON``/``OFF`` topic of a trigger for a source."""
        return f"{self.prefix}/{topic_segment(source_id)}/trigger/{topic_segment(trigger)}"

    def trigger_event(self, source_id: str, trigger: str) -> str:
        """Where a trigger's frames for a source are published (not retained)."""
        return f"{self.trigger_state(source_id, trigger)}/event"


@dataclass(frozen=True, slots=True)
class _Live:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str


class _Session:
    """One run of the sink: the outbox, the inbox consumer and the connection loop."""

    def __init__(self, options: MqttOptions, ctx: SinkContext, outbox: Outbox,
                 password: str | None, specs: Mapping[str, TriggerSpec] | None = None,
                 pairs: dict[Pair, None] | None = None) -> None:
        self.options = options
        self.ctx = ctx
        self.log = ctx.logger
        self.outbox = outbox
        self.password = password
        self.topics = Topics(options.resolved_prefix(ctx.node_id))
        self.discovery = ha.DiscoveryOptions(
            node_id=ctx.node_id, sw_version=__version__,
            availability_topic=self.topics.availability,
            discovery_prefix=options.discovery_prefix, score_sensor=options.score_sensor)
        self.sources: dict[str, None] = {}  # every source seen, in order of appearance
        self.statuses: dict[str, bytes] = {}  # newest status frame per source
        self.live: deque[_Live] = deque()
        self.need_discovery: dict[str, None] = {}
        # triggers: every (source, trigger) pair seen and still watched (kept by the sink
        # across its restarts), the trigger specs when the daemon told them, the states the
        # broker acknowledged, and the pairs whose discovery is due or whose entities are
        # to be removed
        self.pairs: dict[Pair, None] = {} if pairs is None else pairs
        self.specs: Mapping[str, TriggerSpec] | None = specs
        self.trigger_states: dict[Pair, bytes] = {}
        self.need_pair_discovery: dict[Pair, None] = {}
        self.need_removal: dict[Pair, None] = {}
        self.connected = False
        self.wake = asyncio.Event()  # new work for the writer, or stop
        self.progress = asyncio.Event()  # the writer did something (or the connection dropped)
        self.stop = asyncio.Event()
        self.rng = random.Random()
        labels = (ctx.instance,)
        m = ctx.metrics
        self.labels = labels
        self.m_connected = m.gauge("streamcap_mqtt_connected",
                                   "1 while the MQTT sink is connected to its broker", ["sink"])
        self.m_depth = m.gauge("streamcap_mqtt_outbox_depth",
                               "Captions in the MQTT outbox awaiting a broker acknowledgement",
                               ["sink"])
        self.m_dropped = m.counter("streamcap_mqtt_outbox_dropped_total",
                                   "Captions and trigger events dropped from a full MQTT "
                                   "outbox (oldest first)", ["sink"])
        self.m_published = m.counter("streamcap_mqtt_published_total",
                                     "Messages the broker accepted, by kind", ["sink", "kind"])
        self.m_discarded = m.counter("streamcap_mqtt_discarded_total",
                                     "Best-effort messages discarded while disconnected",
                                     ["sink", "kind"])
        self.m_connects = m.counter("streamcap_mqtt_connects_total",
                                    "Successful connections to the broker", ["sink"])
        self.m_connect_errors = m.counter("streamcap_mqtt_connect_errors_total",
                                          "Failed connects and lost connections", ["sink"])
        self.m_connected.set(0, *labels)
        self.m_depth.set(outbox.depth, *labels)

    # ------------------------------------------------------------------ inbox side

    def accept(self, msg: Published) -> None:
        """Take one message from the inbox (never waits)."""
        source = msg.source_id
        if source not in self.sources:
            self.sources[source] = None
            self.need_discovery[source] = None
        if isinstance(msg, Caption):
            payload = encode(to_wire(msg, node_id=self.ctx.node_id)).encode()
            dropped = self.outbox.append(key=msg.window_id, topic=self.topics.caption(source),
                                         payload=payload)
            self._count_drops(dropped)
            self.m_depth.set(self.outbox.depth, *self.labels)
        elif isinstance(msg, TriggerEvent):
            self._accept_trigger(msg)
        elif isinstance(msg, Embedding):
            if not self.connected:
                self.m_discarded.inc(1, *self.labels, "embedding")
                return
            payload = encode(to_wire(msg, node_id=self.ctx.node_id)).encode()
            self._push_live(_Live(self.topics.embedding(source), payload, 0, False, "embedding"))
        else:
            payload = encode(to_wire(msg, node_id=self.ctx.node_id)).encode()
            self.statuses[source] = payload
            if self.connected:  # otherwise republished on connect
                self._push_live(_Live(self.topics.status(source), payload, 1,
                                      self.options.retain_status, "status"))
        self.wake.set()

    def _accept_trigger(self, msg: TriggerEvent) -> None:
        pair = pair_of(msg)
        if self.specs is not None and not watches(self.specs, pair):
            # decided before its trigger was removed, handled after: publishing it would
            # bring back the retained state and the entities just removed
            self.log.debug("trigger event of a removed trigger ignored", source=pair[0],
                           trigger=pair[1], event_id=msg.event_id)
            return
        if pair not in self.pairs:
            self.pairs[pair] = None
            self.need_pair_discovery[pair] = None
        self.need_removal.pop(pair, None)
        payload = encode(to_wire(msg, node_id=self.ctx.node_id)).encode()
        dropped = self.outbox.append(key=msg.event_id,
                                     topic=self.topics.trigger_event(msg.source_id, msg.trigger),
                                     payload=payload)
        self._count_drops(dropped)
        self.m_depth.set(self.outbox.depth, *self.labels)

    def set_specs(self, specs: Mapping[str, TriggerSpec]) -> None:
        """The live set of triggers changed: remove the pairs no longer watched, and
        republish the discovery of those whose definition changed (the device class)."""
        old = self.specs
        self.specs = specs
        for pair in list(self.pairs):
            if not watches(specs, pair):
                del self.pairs[pair]
                self.need_pair_discovery.pop(pair, None)
                self.trigger_states.pop(pair, None)
                self.need_removal[pair] = None
            elif old is None or old.get(pair[1]) != specs.get(pair[1]):
                self.need_pair_discovery[pair] = None
        if self.need_removal:
            self.log.info("triggers removed: their retained state and Home Assistant entities "
                          "are being removed",
                          pairs=[f"{s}/{t}" for s, t in self.need_removal])
        self.wake.set()

    def _push_live(self, item: _Live) -> None:
        if len(self.live) >= LIVE_QUEUE_MAX:
            old = self.live.popleft()
            self.m_discarded.inc(1, *self.labels, old.kind)
        self.live.append(item)

    def _count_drops(self, dropped: list[OutboxRecord]) -> None:
        if not dropped:
            return
        self.m_dropped.inc(len(dropped), *self.labels)
        self.log.warning("mqtt outbox full: oldest messages dropped", dropped=len(dropped),
                         first_window_id=dropped[0].key, last_window_id=dropped[-1].key,
                         dropped_total=self.outbox.dropped_total,
                         max_messages=self.outbox.max_messages, max_bytes=self.outbox.max_bytes)

    async def consume(self, inbox: Inbox) -> None:
        async for msg in inbox:
            self.accept(msg)

    async def flush(self, timeout_s: float) -> None:
        """Wait until every caption is acknowledged, for at most ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.outbox.depth or (self.connected and self.live):
                    self.progress.clear()
                    await self.progress.wait()
        except TimeoutError:
            self.log.warning("mqtt sink stopping with captions not yet acknowledged; they stay "
                             "in the outbox and are sent after the next start",
                             pending=self.outbox.depth, outbox=str(self.outbox.directory),
                             connected=self.connected)

    # ------------------------------------------------------------------ connection side

    def _client(self) -> aiomqtt.Client:
        o = self.options
        return broker_client(
            o, self.password, identifier=o.resolved_client_id(self.ctx.node_id, self.ctx.instance),
            will=aiomqtt.Will(self.topics.availability, b"offline", qos=1, retain=True),
            max_inflight_messages=max(20, o.max_inflight + 4))

    async def connection_loop(self) -> None:
        """Connect, serve, and reconnect with backoff until :attr:`stop` is set."""
        # Half jitter: uniform in [c/2, c] with c = min(max, initial * 2**attempt), so that
        # daemons cut off together by a broker outage do not reconnect in lockstep.
        backoff = Backoff(self.options.reconnect_initial_s, self.options.reconnect_max_s,
                          jitter=0.5, reset_after_s=HEALTHY_AFTER_S, rng=self.rng)
        while not self.stop.is_set():
            started = time.monotonic()
            connected_at: list[float] = []
            try:
                await self._connect_and_serve(connected_at)
                return  # stop was requested and "offline" published
            except* aiomqtt.MqttError as group:
                reason = _describe(group.exceptions[0])
            except* OSError as os_group:  # TLS files unreadable, say: retried like the network
                reason = _describe(os_group.exceptions[0])
            self._set_connected(False)
            self.m_connect_errors.inc(1, *self.labels)
            if connected_at:
                backoff.healthy(time.monotonic() - connected_at[0])
            attempt = backoff.attempt
            delay = backoff.next_delay()
            fields: dict[str, object] = {
                "host": self.options.host, "port": self.options.port, "error": reason,
                "retry_in_s": round(delay, 2), "attempt": attempt + 1,
                "pending": self.outbox.depth,
                "was_connected_s": round(time.monotonic() - started, 1) if connected_at else None,
            }
            if attempt == 0 or attempt & (attempt - 1) == 0:  # first, 2nd, 3rd, 5th, 9th...
                self.log.warning("mqtt broker unreachable or connection lost; retrying", **fields)
            else:
                self.log.debug("mqtt reconnect failed", **fields)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stop.wait()

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.m_connected.set(1 if value else 0, *self.labels)
        if not value:
            for item in self.live:
                if item.kind == "embedding":
                    self.m_discarded.inc(1, *self.labels, "embedding")
            self.live.clear()  # statuses are republished from self.statuses on connect
        self.progress.set()

    async def _connect_and_serve(self, connected_at: list[float]) -> None:
        o = self.options
        async with self._client() as client:
            connected_at.append(time.monotonic())
            self._set_connected(True)
            self.m_connects.inc(1, *self.labels)
            self.log.info("mqtt connected", host=o.host, port=o.port, prefix=self.topics.prefix,
                          pending=self.outbox.depth)
            try:
                await client.publish(self.topics.availability, b"online", qos=1, retain=True)
                if o.discovery:
                    await client.subscribe(o.resolved_birth_topic, qos=1)
                    self.need_discovery.update(dict.fromkeys(self.sources))
                    self.need_pair_discovery.update(dict.fromkeys(self.pairs))
                for source, payload in list(self.statuses.items()):
                    await client.publish(self.topics.status(source), payload, qos=1,
                                         retain=o.retain_status)
                for (source, trigger), state in list(self.trigger_states.items()):
                    await client.publish(self.topics.trigger_state(source, trigger), state,
                                         qos=TRIGGER_QOS, retain=True)
                async with asyncio.TaskGroup() as tg:
                    reader = tg.create_task(self._reader(client),
                                            name=f"streamcap[sink:{self.ctx.instance}].reader")
                    await self._writer(client)
                    reader.cancel()
            except asyncio.CancelledError:
                # Shutdown timed out: still try to leave "offline" behind (the clean
                # disconnect below would otherwise suppress the Last Will).
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(self.topics.availability, b"offline", qos=1,
                                         retain=True, timeout=1.0)
                raise
        self._set_connected(False)
        self.log.info("mqtt disconnected cleanly", pending=self.outbox.depth)

    async def _reader(self, client: aiomqtt.Client) -> None:
        """Watch for Home Assistant's birth message; raises MqttError when the connection dies."""
        o = self.options
        async for message in client.messages:
            payload = message.payload
            text = payload.decode(errors="replace") if isinstance(payload, bytes) else str(payload)
            if (o.discovery and message.topic.matches(o.resolved_birth_topic)
                    and text.strip() == o.birth_payload):
                self.log.info("home assistant birth message: republishing discovery",
                              topic=str(message.topic), sources=len(self.sources))
                if o.birth_delay_s > 0:  # HA's advice: a random delay spreads the load
                    await asyncio.sleep(self.rng.uniform(0, o.birth_delay_s))
                self.need_discovery.update(dict.fromkeys(self.sources))
                self.need_pair_discovery.update(dict.fromkeys(self.pairs))
                self.wake.set()

    async def _writer(self, client: aiomqtt.Client) -> None:
        """Publish discovery, then outbox captions oldest first, then live messages; on
        stop, publish "offline" and return."""
        o = self.options
        while True:
            self.wake.clear()
            if self.need_discovery and o.discovery:
                sources = list(self.need_discovery)
                for source in sources:
                    await self._publish_discovery(client, source)
                    self.need_discovery.pop(source, None)
                self.progress.set()
                continue
            if self.need_removal:
                for pair in list(self.need_removal):
                    await self._publish_removal(client, pair)
                    self.need_removal.pop(pair, None)
                self.progress.set()
                continue
            if self.need_pair_discovery:
                if o.discovery:
                    for pair in list(self.need_pair_discovery):
                        await self._publish_pair_discovery(client, pair)
                        self.need_pair_discovery.pop(pair, None)
                self.need_pair_discovery.clear()
                self.progress.set()
                continue
            batch = self.outbox.peek(o.max_inflight)
            if batch:
                await self._publish_batch(client, batch)
                self.progress.set()
                continue
            if self.live:
                item = self.live[0]
                await client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
                if self.live and self.live[0] is item:
                    self.live.popleft()
                self.m_published.inc(1, *self.labels, item.kind)
                self.progress.set()
                continue
            if self.stop.is_set():
                await client.publish(self.topics.availability, b"offline", qos=1, retain=True)
                return
            await self.wake.wait()

    async def _publish_discovery(self, client: aiomqtt.Client, source: str) -> None:
        for msg in ha.source_discovery(self.discovery, source_id=source,
                                       ha_state_topic=self.topics.ha_state(source),
                                       status_topic=self.topics.status(source)):
            await client.publish(msg.topic, msg.encode(), qos=1, retain=msg.retain)

    async def _publish_pair_discovery(self, client: aiomqtt.Client, pair: Pair) -> None:
        source, trigger = pair
        spec = self.specs.get(trigger) if self.specs is not None else None
        for msg in ha.trigger_discovery(
                self.discovery, source_id=source, trigger=trigger,
                state_topic=self.topics.trigger_state(source, trigger),
                event_topic=self.topics.trigger_event(source, trigger),
                phrases=spec.text if spec is not None else ()):
            await client.publish(msg.topic, msg.encode(), qos=1, retain=msg.retain)

    async def _publish_removal(self, client: aiomqtt.Client, pair: Pair) -> None:
        """Empty retained payloads: the state is cleared and Home Assistant drops the entities."""
        source, trigger = pair
        await client.publish(self.topics.trigger_state(source, trigger), b"", qos=TRIGGER_QOS,
                             retain=True)
        if self.options.discovery:
            for msg in ha.trigger_removal(self.discovery, source_id=source, trigger=trigger):
                await client.publish(msg.topic, msg.encode(), qos=1, retain=True)

    def _publications(self, record: OutboxRecord) -> list[_Live]:
        """What one outbox record is published as, in order.

        A caption: itself. A trigger frame: the frame on its event topic (unless it is
        a state announcement), then the retained state, unless the live set of triggers
        no longer watches its pair (removed meanwhile, before a restart too).
        """
        if not record.payload.startswith(_TRIGGER_FRAME):
            return [_Live(record.topic, record.payload, self.options.qos_caption, False,
                          "caption")]
        frame = _frame_of(record)
        out: list[_Live] = []
        if not is_announcement(frame):
            out.append(_Live(record.topic, record.payload, TRIGGER_QOS, False, "trigger"))
        pair = (str(frame.get("source_id", "")), str(frame.get("trigger", "")))
        if self.specs is None or watches(self.specs, pair):  # else removed meanwhile
            state = ha.STATE_ON if frame.get("state") == TriggerState.ON.value else ha.STATE_OFF
            out.append(_Live(record.topic.removesuffix("/event"), state.encode(), TRIGGER_QOS,
                             True, "trigger_state"))
        return out

    async def _publish_batch(self, client: aiomqtt.Client, batch: list[OutboxRecord]) -> None:
        o = self.options
        publications = [(record, self._publications(record)) for record in batch]
        # Tasks start in creation order, so the broker receives the batch in order.
        async with asyncio.TaskGroup() as tg:
            for _, items in publications:
                for item in items:
                    tg.create_task(client.publish(item.topic, item.payload, qos=item.qos,
                                                  retain=item.retain))
        self.outbox.ack(batch[-1].seq)
        self.m_depth.set(self.outbox.depth, *self.labels)
        for record, items in publications:
            for item in items:
                self.m_published.inc(1, *self.labels, item.kind)
                if item.kind == "trigger_state":
                    frame = _frame_of(record)
                    pair = (str(frame.get("source_id", "")), str(frame.get("trigger", "")))
                    if pair in self.pairs:
                        self.trigger_states[pair] = item.payload
        if o.discovery:
            newest: dict[str, Mapping[str, object]] = {}
            for record in batch:
                if record.payload.startswith(_TRIGGER_FRAME):
                    continue
                frame = _frame_of(record)
                source = frame.get("source_id")
                if isinstance(source, str):
                    newest[source] = frame
            for source, frame in newest.items():
                state = ha.caption_state(frame)
                await client.publish(self.topics.ha_state(source),
                                     encode(state).encode(), qos=o.qos_caption, retain=True)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _frame_of(record: OutboxRecord) -> Mapping[str, object]:
    try:
        frame = json.loads(record.payload)
    except ValueError:
        return {}
    return frame if isinstance(frame, dict) else {}


class MqttSink:
    """The ``mqtt`` sink plugin (see the module docstring and docs/mqtt.md).

    Args:
        instance: The ``[sinks.<instance>]`` table name.
        options: Validated options (:func:`parse_options`).
    """

    def __init__(self, instance: str, options: MqttOptions) -> None:
        self.instance = instance
        self.options = options
        self.accepts: frozenset[str] = options.accepts
        self._specs: Mapping[str, TriggerSpec] | None = None
        self._pairs: dict[Pair, None] = {}
        self._session: _Session | None = None

    def triggers_changed(self, specs: Mapping[str, TriggerSpec]) -> None:
        """The live set of triggers is now ``specs`` (call on the event loop, any time).

        Pairs whose trigger is gone, or no longer watches their source, get their
        retained state cleared and empty retained discovery configs (Home Assistant
        removes their entities); the phrasings refine the binary sensor's device class.
        """
        self._specs = dict(specs)
        if self._session is not None:
            self._session.set_specs(self._specs)

    def _password(self) -> str | None:
        name = self.options.password_env
        if name is None:
            return None
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"sinks.{self.instance}.password_env: environment variable "
                              f"{name} is not set")
        return value

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        """Consume ``inbox`` until it closes; flush, publish "offline", disconnect, return."""
        o = self.options
        password = self._password()
        outbox = Outbox(ctx.state_dir / "outbox", max_messages=o.outbox_max_messages,
                        max_bytes=o.outbox_max_bytes, fsync=o.outbox_fsync)
        session = _Session(o, ctx, outbox, password, self._specs, self._pairs)
        self._session = session
        if outbox.depth:
            ctx.logger.info("mqtt outbox holds captions from an earlier run", pending=outbox.depth,
                            outbox=str(outbox.directory))
        try:
            async with asyncio.TaskGroup() as tg:
                conn = tg.create_task(session.connection_loop(),
                                      name=f"streamcap[sink:{ctx.instance}].connection")
                ctx.ready()
                await session.consume(inbox)
                await session.flush(o.flush_timeout_s)
                session.stop.set()
                session.wake.set()
                done, _ = await asyncio.wait({conn}, timeout=o.publish_timeout_s + 1.0)
                if not done:
                    conn.cancel()
        finally:
            self._session = None
            session.m_connected.set(0, *session.labels)
            outbox.close()


def create_sink(instance: str, options: Mapping[str, object]) -> MqttSink:
    """The ``streamcap.sinks`` entry point ``mqtt``.

    Raises:
        ConfigError: An option is unknown or invalid (every problem listed,
            each naming ``sinks.<instance>.<key>``).
    """
    return MqttSink(instance, parse_options(instance, options))

