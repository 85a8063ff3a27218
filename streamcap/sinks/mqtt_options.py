"""Options of the MQTT sink: one frozen dataclass and its validation.

``parse_options`` reads a ``[sinks.<instance>]`` table into :class:`MqttOptions`
with the one options reader (:mod:`streamcap.options`), reporting every problem at once as a :class:`~streamcap.errors.ConfigError`
whose lines name ``sinks.<instance>.<key>`` and what was expected. Secrets
never come from the file: ``password_env`` names the environment variable that
holds the password.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from streamcap.bus.plugin import read_sink_options
from streamcap.bus.wire import KINDS
from streamcap.options import given_keys, option


def topic_segment(name: str) -> str:
    """``name`` made safe as one topic level: ``/``, ``+``, ``#`` and NUL become ``_``."""
    cleaned = "".join("_" if ch in "/+#\0" else ch for ch in name)
    return cleaned or "_"


def _topic(value: str) -> str | None:
    if any(ch in value for ch in "+#\0") or value.startswith("/") or value.endswith("/"):
        return ("expected an MQTT topic without wildcards (+, #) and without a leading or "
                "trailing '/'")
    return None


def _file(value: str) -> str | None:
    return None if os.path.isfile(value) else f"no such file {value!r}"


def _text(default: str | None, *, topic: bool = False, file: bool = False, help: str = "") -> Any:
    return option(default, non_empty=True, check=_topic if topic else _file if file else None,
                  help=help)


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttOptions:
    """The ``[sinks.<instance>]`` options of an ``mqtt`` sink (docs/mqtt.md has the table).

    ``None`` for ``prefix``, ``client_id`` and ``birth_topic`` means the
    default that depends on the node id or on ``discovery_prefix``.
    """

    host: str = _text("localhost")
    port: int = option(1883, min=1, max=65535, help="8883 when tls = true and port is not given")
    client_id: str | None = _text(None, help="streamcap-<node_id>-<instance>")
    prefix: str | None = _text(None, topic=True, help="streamcap/<node_id>")
    keepalive_s: int = option(30, min=5, max=3600)
    qos_caption: int = option(1, min=0, max=2)
    retain_status: bool = True
    outbox_max_messages: int = option(10_000, min=1, max=10_000_000)
    outbox_max_bytes: int = option(16 * 1024 * 1024, min=1024, max=1 << 34)
    outbox_fsync: bool = True
    discovery: bool = True
    discovery_prefix: str = _text("homeassistant", topic=True)
    birth_topic: str | None = _text(None, topic=True, help="<discovery_prefix>/status")
    birth_payload: str = _text("online")
    birth_delay_s: float = option(1.0, min=0.0, max=60.0)
    score_sensor: bool = True
    username: str | None = _text(None)
    password_env: str | None = option(None, secret="the password of username")
    tls: bool = False
    ca_file: str | None = _text(None, file=True)
    cert_file: str | None = _text(None, file=True)
    key_file: str | None = _text(None, file=True)
    tls_insecure: bool = False
    reconnect_initial_s: float = option(0.5, min=0.01, max=60.0)
    reconnect_max_s: float = option(30.0, min=0.01, max=3600.0)
    publish_timeout_s: float = option(10.0, min=0.1, max=600.0)
    flush_timeout_s: float = option(5.0, min=0.0, max=600.0)
    max_inflight: int = option(16, min=1, max=1000)
    accepts: frozenset[str] = option(KINDS, choices=sorted(KINDS), non_empty=True)
    # Keys the table set.
    explicit: frozenset[str] = given_keys()

    def resolved_prefix(self, node_id: str) -> str:
        return self.prefix if self.prefix is not None else f"streamcap/{topic_segment(node_id)}"

    def resolved_client_id(self, node_id: str, instance: str) -> str:
        return self.client_id if self.client_id is not None else f"streamcap-{node_id}-{instance}"

    @property
    def resolved_birth_topic(self) -> str:
        return self.birth_topic if self.birth_topic is not None else f"{self.discovery_prefix}/status"

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """TLS files only with TLS, a key with its certificate, a password with its user."""
        if not self.tls:
            for name in ("ca_file", "cert_file", "key_file", "tls_insecure"):
                if name in self.explicit:
                    yield name, "only used with tls = true"
        if self.key_file and not self.cert_file:
            yield "key_file", "needs cert_file (the client certificate)"
        if self.password_env is not None and self.username is None:
            yield "password_env", "needs username"
        if (not {"reconnect_initial_s", "reconnect_max_s"} & set(refused)
                and self.reconnect_max_s < self.reconnect_initial_s):
            yield "reconnect_max_s", (f"must be >= reconnect_initial_s "
                                      f"({self.reconnect_initial_s}), got {self.reconnect_max_s}")


def parse_options(instance: str, options: Mapping[str, object]) -> MqttOptions:
    """Validate an ``mqtt`` sink's options.

    Raises:
        ConfigError: Every problem found, each naming ``sinks.<instance>.<key>``
            and what was expected (unknown keys included).
    """
    parsed = read_sink_options(MqttOptions, instance, options).result()
    if parsed.tls and "port" not in options:
        parsed = replace(parsed, port=8883)
    return parsed
