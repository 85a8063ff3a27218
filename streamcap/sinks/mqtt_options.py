"""Options of the MQTT sink: one frozen dataclass and its validation.

``parse_options`` turns a ``[sinks.<instance>]`` table into :class:`MqttOptions`,
reporting every problem at once as a :class:`~streamcap.errors.ConfigError`
whose lines name ``sinks.<instance>.<key>`` and what was expected. Secrets
never come from the file: ``password_env`` names the environment variable that
holds the password.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from streamcap.bus.wire import KINDS
from streamcap.errors import ConfigError


def topic_segment(name: str) -> str:
    """``name`` made safe as one topic level: ``/``, ``+``, ``#`` and NUL become ``_``."""
    cleaned = "".join("_" if ch in "/+#\0" else ch for ch in name)
    return cleaned or "_"


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttOptions:
    """The ``[sinks.<instance>]`` options of an ``mqtt`` sink (docs/mqtt.md has the table).

    ``None`` for ``prefix``, ``client_id`` and ``birth_topic`` means the
    default that depends on the node id or on ``discovery_prefix``.
    """

    host: str = "localhost"
    port: int = 1883  # 8883 when tls = true and port is not given
    client_id: str | None = None  # streamcap-<node_id>-<instance>
    prefix: str | None = None  # streamcap/<node_id>
    keepalive_s: int = 30
    qos_caption: int = 1
    retain_status: bool = True
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 16 * 1024 * 1024
    outbox_fsync: bool = True
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    birth_topic: str | None = None  # <discovery_prefix>/status
    birth_payload: str = "online"
    birth_delay_s: float = 1.0
    score_sensor: bool = True
    username: str | None = None
    password_env: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    publish_timeout_s: float = 10.0
    flush_timeout_s: float = 5.0
    max_inflight: int = 16
    accepts: frozenset[str] = field(default_factory=lambda: KINDS)

    def resolved_prefix(self, node_id: str) -> str:
        return self.prefix if self.prefix is not None else f"streamcap/{topic_segment(node_id)}"

    def resolved_client_id(self, node_id: str, instance: str) -> str:
        return self.client_id if self.client_id is not None else f"streamcap-{node_id}-{instance}"

    @property
    def resolved_birth_topic(self) -> str:
        return self.birth_topic if self.birth_topic is not None else f"{self.discovery_prefix}/status"


class _Reader:
    """Reads typed values out of an options mapping, collecting every problem."""

    def __init__(self, instance: str, options: Mapping[str, object]) -> None:
        self.instance = instance
        self.options = options
        self.problems: list[str] = []
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"sinks.{self.instance}.{name}"

    def _get(self, name: str) -> object:
        self.seen.add(name)
        return self.options.get(name)

    def string(self, name: str, default: str | None, *, topic: bool = False) -> str | None:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            self.problems.append(f"{self.key(name)}: expected a non-empty string, got {value!r}")
            return default
        if topic and (any(ch in value for ch in "+#\0") or value.startswith("/")
                      or value.endswith("/")):
            self.problems.append(f"{self.key(name)}: expected an MQTT topic without wildcards "
                                 f"(+, #) and without a leading or trailing '/', got {value!r}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.append(f"{self.key(name)}: expected true or false, got {value!r}")
            return default
        return value

    def integer(self, name: str, default: int, lo: int, hi: int, unit: str = "") -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.problems.append(f"{self.key(name)}: expected an integer from {lo} to {hi}"
                                 f"{' ' + unit if unit else ''}, got {value!r}")
            return default
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self._get(name)
        if value is None:
            return default
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or not lo <= value <= hi):
            self.problems.append(f"{self.key(name)}: expected a number of seconds from {lo} to "
                                 f"{hi}, got {value!r}")
            return default
        return float(value)

    def file(self, name: str) -> str | None:
        path = self.string(name, None)
        if path is not None and not os.path.isfile(path):
            self.problems.append(f"{self.key(name)}: no such file {path!r}")
        return path


def parse_options(instance: str, options: Mapping[str, object]) -> MqttOptions:
    """Validate an ``mqtt`` sink's options.

    Raises:
        ConfigError: Every problem found, each naming ``sinks.<instance>.<key>``
            and what was expected (unknown keys included).
    """
    r = _Reader(instance, options)
    if "password" in options:
        r.problems.append(f"{r.key('password')}: secrets do not belong in the config file; put "
                          f"the password in an environment variable and name it in password_env")
        r.seen.add("password")
    tls = r.boolean("tls", False)
    port_default = 8883 if tls else 1883
    accepts: frozenset[str] = KINDS
    raw_accepts = r._get("accepts")
    if raw_accepts is not None:
        if (not isinstance(raw_accepts, list | tuple) or not raw_accepts
                or not all(isinstance(k, str) and k in KINDS for k in raw_accepts)):
            r.problems.append(f"{r.key('accepts')}: expected a non-empty list of kinds from "
                              f"{', '.join(sorted(KINDS))}, got {raw_accepts!r}")
        else:
            accepts = frozenset(raw_accepts)
    r.integer("queue_size", 1, 1, 1_000_000)  # the bus's option; only checked here
    parsed = MqttOptions(
        host=r.string("host", "localhost") or "localhost",
        port=r.integer("port", port_default, 1, 65535),
        client_id=r.string("client_id", None),
        prefix=r.string("prefix", None, topic=True),
        keepalive_s=r.integer("keepalive_s", 30, 5, 3600, "seconds"),
        qos_caption=r.integer("qos_caption", 1, 0, 2),
        retain_status=r.boolean("retain_status", True),
        outbox_max_messages=r.integer("outbox_max_messages", 10_000, 1, 10_000_000, "messages"),
        outbox_max_bytes=r.integer("outbox_max_bytes", 16 * 1024 * 1024, 1024, 1 << 34, "bytes"),
        outbox_fsync=r.boolean("outbox_fsync", True),
        discovery=r.boolean("discovery", True),
        discovery_prefix=r.string("discovery_prefix", "homeassistant", topic=True)
        or "homeassistant",
        birth_topic=r.string("birth_topic", None, topic=True),
        birth_payload=r.string("birth_payload", "online") or "online",
        birth_delay_s=r.number("birth_delay_s", 1.0, 0.0, 60.0),
        score_sensor=r.boolean("score_sensor", True),
        username=r.string("username", None),
        password_env=r.string("password_env", None),
        tls=tls,
        ca_file=r.file("ca_file"),
        cert_file=r.file("cert_file"),
        key_file=r.file("key_file"),
        tls_insecure=r.boolean("tls_insecure", False),
        reconnect_initial_s=r.number("reconnect_initial_s", 0.5, 0.01, 60.0),
        reconnect_max_s=r.number("reconnect_max_s", 30.0, 0.01, 3600.0),
        publish_timeout_s=r.number("publish_timeout_s", 10.0, 0.1, 600.0),
        flush_timeout_s=r.number("flush_timeout_s", 5.0, 0.0, 600.0),
        max_inflight=r.integer("max_inflight", 16, 1, 1000, "messages"),
        accepts=accepts,
    )
    for name in sorted(set(options) - r.seen):
        r.problems.append(f"{r.key(name)}: unknown option; expected one of "
                          f"{', '.join(sorted(r.seen - {'password'}))}")
    if not tls:
        for name in ("ca_file", "cert_file", "key_file", "tls_insecure"):
            if name in options:
                r.problems.append(f"{r.key(name)}: only used with tls = true")
    if parsed.key_file and not parsed.cert_file:
        r.problems.append(f"{r.key('key_file')}: needs cert_file (the client certificate)")
    if parsed.password_env is not None:
        if parsed.username is None:
            r.problems.append(f"{r.key('password_env')}: needs username")
        elif parsed.password_env not in os.environ:
            r.problems.append(f"{r.key('password_env')}: environment variable "
                              f"{parsed.password_env} is not set")
    if parsed.reconnect_max_s < parsed.reconnect_initial_s:
        r.problems.append(f"{r.key('reconnect_max_s')}: must be >= reconnect_initial_s "
                          f"({parsed.reconnect_initial_s}), got {parsed.reconnect_max_s}")
    if r.problems:
        raise ConfigError(r.problems)
    return parsed
