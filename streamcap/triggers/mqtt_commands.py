"""Managing triggers over MQTT: a command topic, a result topic, the retained definitions.

For every ``mqtt`` sink that accepts the ``trigger`` kind (the default; a sink
with ``accepts`` without ``"trigger"`` opts out), under the sink's prefix::

    <prefix>/triggers/set      commands in (QoS 1), JSON:
                               {"name": "dog", "trigger": {"text": ["a dog barks"], ...}}
                               {"name": "dog", "remove": true}
                               an optional "id" (a string of at most 64 characters) is
                               echoed in the result
    <prefix>/triggers/result   one result per command (QoS 1, not retained):
                               {"name": "dog", "id": ..., "ok": true, "action": "added"}
                               {"name": "dog", "id": ..., "ok": false,
                                "errors": ["triggers.dog.min_hits: must be <= of_windows ..."]}
    <prefix>/triggers/config   the current definitions, retained (QoS 1), republished
                               on every connect and after every change from any surface:
                               {"triggers": {"dog": {"origin": "runtime",
                                                     "definition": {...}}}}

Commands must not be retained: the broker would hand a retained one over again
at every reconnect, undoing later changes. A message the broker hands over as
retained (on connecting) is refused with ``ok: false``; one published retained
while the listener is connected reaches it as an ordinary message (MQTT 3.1.1
clears the flag on delivery to a standing subscription) and applies once. The body is
read by :func:`~streamcap.triggers.jsonbody.parse_json_object`, as an HTTP body
is; a command that fails in an unexpected way is answered ``ok: false`` and
logged (at most once a minute per kind of error), and the listener goes on.

A command goes through the same :class:`~streamcap.triggers.registry.TriggerRegistry`
as the HTTP API: the same validation and messages, saved before it applies, and a
bad command changes nothing. Who may publish on ``<prefix>/triggers/set`` is the
broker's business (its ACLs), as for every other topic.

The commands have their own connection to the sink's broker (same host, port, TLS
and user; client id ``<sink client id>-triggers``), so the sink's delivery of
captions and events is never held up by a command, and neither the sink nor its
Last Will are touched. It reconnects with jittered, capped backoff like the sink.
Incoming commands wait in a queue of :data:`MAX_QUEUED` (more are dropped by the
client library and counted in ``streamcap_trigger_commands_total{result="dropped"}``).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt

from streamcap.backoff import Backoff
from streamcap.errors import ConfigError
from streamcap.logs import Throttle, get_logger
from streamcap.options import shown, toml_key
from streamcap.sinks.mqtt import broker_client
from streamcap.sinks.mqtt_options import MqttOptions
from streamcap.stats import Metrics
from streamcap.triggers.jsonbody import parse_json_object
from streamcap.triggers.registry import TriggerRegistry, TriggerStoreError, spec_table
from streamcap.triggers.spec import TriggerSpec

__all__ = ["MAX_COMMAND_BYTES", "MAX_QUEUED", "Command", "CommandTopics", "TriggerCommands",
           "config_payload", "parse_command"]

_log = get_logger(__name__)

MAX_COMMAND_BYTES: Final = 64 * 1024
MAX_QUEUED: Final = 64
MAX_ID_CHARS: Final = 64
HEALTHY_AFTER_S: Final = 30.0
ERROR_LOG_INTERVAL_S: Final = 60.0
RETAINED: Final = ("a retained command is refused: publish commands without the retain flag, "
                   "and clear the retained one (an empty retained message on the topic)")
_KEYS: Final = frozenset({"name", "trigger", "remove", "id"})


@dataclass(frozen=True, slots=True)
class CommandTopics:
    """The three topics under a sink's prefix."""

    prefix: str

    @property
    def set(self) -> str:
        return f"{self.prefix}/triggers/set"

    @property
    def result(self) -> str:
        return f"{self.prefix}/triggers/result"

    @property
    def config(self) -> str:
        return f"{self.prefix}/triggers/config"


@dataclass(frozen=True, slots=True)
class Command:
    """A command read from ``<prefix>/triggers/set``; ``table`` None means remove."""

    name: str
    table: Mapping[str, object] | None
    request_id: str | None = None


# --------------------------------------------------------------------------- pure logic


def parse_command(payload: bytes) -> tuple[Command | None, dict[str, object]]:
    """``(command, {})`` or ``(None, the error result)``, never quoting the payload."""
    def error(message: str, name: object = None, request_id: object = None) -> dict[str, object]:
        return {"name": name if isinstance(name, str) else None,
                "id": request_id if isinstance(request_id, str) else None,
                "ok": False, "errors": [message]}

    if len(payload) > MAX_COMMAND_BYTES:
        return None, error(f"the command is larger than {MAX_COMMAND_BYTES} bytes")
    data, problem = parse_json_object(payload, what="the command")
    if data is None:
        return None, error(problem or "the command is not a JSON object")
    name, request_id = data.get("name"), data.get("id")
    if request_id is not None and (not isinstance(request_id, str)
                                   or len(request_id) > MAX_ID_CHARS):
        return None, error(f"id: expected a string of at most {MAX_ID_CHARS} characters", name)
    unknown = sorted(k for k in data if k not in _KEYS)
    if unknown:
        return None, error(f"{shown(unknown[0])}: unknown key (known keys: "
                           f"{', '.join(sorted(_KEYS))})", name, request_id)
    if not isinstance(name, str) or not name:
        return None, error("name: expected the trigger's name", None, request_id)
    trigger, remove = data.get("trigger"), data.get("remove")
    if remove is not None and remove is not True:
        return None, error("remove: expected true", name, request_id)
    if (trigger is None) == (remove is None):
        return None, error('expected "trigger": {...} to add or change it, or "remove": true',
                           name, request_id)
    if trigger is not None and not isinstance(trigger, dict):
        return None, error(f"triggers.{toml_key(name)}: expected a table", name, request_id)
    return Command(name, trigger, request_id), {}


def config_payload(specs: Mapping[str, TriggerSpec],
                   origin: Callable[[str], str]) -> dict[str, object]:
    """The retained ``<prefix>/triggers/config`` message."""
    return {"triggers": {name: {"origin": origin(name), "definition": spec_table(specs[name])}
                         for name in sorted(specs)}}


def apply_command(registry: TriggerRegistry, command: Command) -> dict[str, object]:
    """Run ``command`` on ``registry``; the result message."""
    base: dict[str, object] = {"name": command.name, "id": command.request_id}
    try:
        if command.table is None:
            change = registry.remove(command.name)
            if change is None:
                return {**base, "ok": False,
                        "errors": [f"triggers.{toml_key(command.name)}: no such trigger"]}
        else:
            change = registry.put(command.name, command.table)
    except ConfigError as exc:
        return {**base, "ok": False, "errors": list(exc.problems)}
    except TriggerStoreError:
        return {**base, "ok": False,
                "errors": ["the change could not be saved; nothing changed (see the log)"]}
    return {**base, "ok": True, "action": change.action}


# --------------------------------------------------------------------------- connection


def _encode(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


class TriggerCommands:
    """Serves the command topic of one ``mqtt`` sink (see the module docstring).

    Args:
        registry: The live set of triggers.
        options: The sink's options (broker, TLS, user, prefix).
        instance: The sink's name (metrics, client id).
        node_id: The daemon's node id (the default prefix and client id).
        password: The sink's password (from its ``password_env``), or None.
    """

    def __init__(self, registry: TriggerRegistry, options: MqttOptions, *, instance: str,
                 node_id: str, metrics: Metrics, password: str | None = None) -> None:
        self.registry = registry
        self.options = options
        self.instance = instance
        self.node_id = node_id
        self.password = password
        self.topics = CommandTopics(options.resolved_prefix(node_id))
        self.changed = asyncio.Event()
        self.rng = random.Random()
        self.m_commands = metrics.counter(
            "streamcap_trigger_commands_total",
            "Trigger commands taken from MQTT, by sink and result (ok, error, dropped: the "
            "incoming queue was full)", ("sink", "result"))
        for result in ("ok", "error", "dropped"):
            self.m_commands.inc(0, instance, result)
        self._errors = Throttle(ERROR_LOG_INTERVAL_S)
        self._unsubscribe = registry.subscribe(lambda _specs: self.changed.set())

    def _queue_type(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        count, instance = self.m_commands, self.instance

        class CountingQueue(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                try:
                    super().put_nowait(item)
                except asyncio.QueueFull:
                    count.inc(1, instance, "dropped")
                    raise

        return CountingQueue

    def _client(self) -> aiomqtt.Client:
        o = self.options
        return broker_client(
            o, self.password,
            identifier=o.resolved_client_id(self.node_id, self.instance) + "-triggers",
            queue_type=self._queue_type(), max_queued_incoming_messages=MAX_QUEUED)

    async def run(self) -> None:
        """Connect, serve and reconnect until cancelled."""
        backoff = Backoff(self.options.reconnect_initial_s, self.options.reconnect_max_s,
                          jitter=0.5, reset_after_s=HEALTHY_AFTER_S, rng=self.rng)
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                connected: list[bool] = []
                error: BaseException = aiomqtt.MqttError("disconnected")
                try:
                    await self._serve(connected)
                except* aiomqtt.MqttError as group:
                    error = group.exceptions[0]
                except* OSError as os_group:
                    error = os_group.exceptions[0]
                if connected:
                    backoff.healthy(loop.time() - started)
                attempt, delay = backoff.attempt, backoff.next_delay()
                if attempt == 0 or attempt & (attempt - 1) == 0:
                    _log.warning("trigger commands: broker unreachable or connection lost; "
                                 "retrying", sink=self.instance, host=self.options.host,
                                 port=self.options.port, error=f"{type(error).__name__}: {error}",
                                 retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
        finally:
            self._unsubscribe()

    async def _serve(self, connected: list[bool]) -> None:
        async with self._client() as client:
            connected.append(True)
            self.changed.clear()
            await self._publish_config(client)
            await client.subscribe(self.topics.set, qos=1)
            _log.info("trigger commands: listening", sink=self.instance, topic=self.topics.set)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._config_writer(client),
                               name=f"streamcap[triggers:{self.instance}].config")
                await self._reader(client)

    async def _publish_config(self, client: aiomqtt.Client) -> None:
        payload = config_payload(self.registry.specs(), self.registry.origin)
        await client.publish(self.topics.config, _encode(payload), qos=1, retain=True)

    async def _config_writer(self, client: aiomqtt.Client) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            await self._publish_config(client)

    def _handle(self, message: aiomqtt.Message) -> dict[str, object]:
        """The result of one message on the command topic; never raises."""
        if message.retain:
            return {"name": None, "id": None, "ok": False, "errors": [RETAINED]}
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        try:
            command, result = parse_command(data)
            if command is not None:
                result = apply_command(self.registry, command)
        except Exception as exc:  # noqa: BLE001 - one bad command must not end the listener
            if (held := self._errors.allow(type(exc).__name__)) is not None:
                _log.exception("trigger command failed unexpectedly; nothing changed",
                               sink=self.instance, suppressed=held,
                               every_s=self._errors.interval_s)
            return {"name": None, "id": None, "ok": False,
                    "errors": ["the command could not be handled; nothing changed (see the log)"]}
        return result

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not message.topic.matches(self.topics.set):
                continue
            result = self._handle(message)
            ok = result.get("ok") is True
            self.m_commands.inc(1, self.instance, "ok" if ok else "error")
            _log.info("trigger command", sink=self.instance, trigger=result.get("name"),
                      ok=ok, action=result.get("action"),
                      errors=None if ok else result.get("errors"))
            await client.publish(self.topics.result, _encode(result), qos=1)


def command_listeners(registry: TriggerRegistry, sinks: Mapping[str, Any], *, node_id: str,
                      metrics: Metrics) -> list[TriggerCommands]:
    """One :class:`TriggerCommands` per ``mqtt`` sink in ``sinks`` that accepts ``trigger``.

    Raises:
        ConfigError: A sink's ``password_env`` variable is not set.
    """
    from streamcap.bus.plugin import LoadedSink
    from streamcap.options import secret
    from streamcap.sinks.mqtt import MqttSink

    out: list[TriggerCommands] = []
    for name, loaded in sinks.items():
        # the configured accepts (LoadedSink's) decide; the plugin's sink holds the options
        sink = loaded.sink if isinstance(loaded, LoadedSink) else loaded
        if not isinstance(sink, MqttSink) or "trigger" not in getattr(loaded, "accepts", ()):
            continue
        password = secret(sink.options.password_env)
        if sink.options.password_env and password is None:
            raise ConfigError(f"sinks.{name}.password_env: environment variable "
                              f"{sink.options.password_env} is not set")
        out.append(TriggerCommands(registry, sink.options, instance=name, node_id=node_id,
                                   metrics=metrics, password=password))
    return out
