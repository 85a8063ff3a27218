"""Home Assistant MQTT discovery for streamcap: pure payload builders, no I/O.

One Home Assistant device per daemon (``identifiers = ["streamcap_<node_id>"]``)
and, for every source, three entities:

* ``sensor`` "<source> caption": the newest caption's text, cut to
  Home Assistant's 255-character state limit; the full text, score, window id
  and times are its attributes. The whole payload (which Home Assistant also
  takes as the attributes) is kept within 16 KiB of UTF-8 JSON, the most
  Home Assistant records: the long text is cut first, then the least
  important fields are left out.
* ``sensor`` "<source> caption score": the newest caption's score (optional).
* ``sensor`` "<source> status": the source's state (running, stalled, ...),
  with the reason and retry information as attributes.

The caption entities read a compact per-source topic (``<prefix>/<source>/ha_state``,
built by :func:`caption_state`) rather than the full caption topic, so that
Home Assistant never receives candidates lists and never anything from an
embedding: only the whitelisted fields below reach it. Every entity shares
the daemon's availability topic. Discovery topics follow
``<discovery_prefix>/<component>/streamcap_<node_id>/<object_id>/config``.

For every (source, trigger) pair (:func:`trigger_discovery`), two more entities:

* ``binary_sensor`` "<source> <trigger>": ``ON`` while the trigger is on for
  that source (the retained ``<prefix>/<source>/trigger/<name>`` topic), with
  a device class chosen from the trigger's name and phrasings
  (:func:`trigger_device_class`, ``sound`` when nothing more specific fits);
* ``event`` "<source> <trigger> fired": one ``fired`` event per firing, read
  from the JSON event topic (``.../trigger/<name>/event``) through a value
  template that turns an ``on`` frame into ``{"event_type": "fired", ...}``
  and an ``off`` frame into nothing (Home Assistant ignores an empty result).

Their ids hold only the node id, the source and the trigger name, so they are
the same after a restart. :func:`trigger_removal` gives the empty retained
configs that remove both.
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from streamcap.messages import SourceState

STATE_MAX_CHARS: Final = 255
"""Home Assistant rejects entity states longer than this."""
ATTRIBUTE_TEXT_MAX_CHARS: Final = 4096
"""The full caption text kept as an attribute is cut here (attributes over 16 KiB are
not recorded by Home Assistant)."""
ATTRIBUTES_MAX_BYTES: Final = 16 * 1024
"""Home Assistant does not record attributes whose JSON exceeds this many bytes (UTF-8)."""
ELLIPSIS: Final = "…"
MANUFACTURER: Final = "streamcap"
MODEL: Final = "Audio captioner"

_ID_RE: Final = re.compile(r"[^a-zA-Z0-9_-]+")
_ALLOWED_ID_RE: Final = re.compile(r"[a-zA-Z0-9_-]+")
_CAPTION_ATTRIBUTES: Final = (
    "window_id", "source_id", "seq", "score", "flagged", "confidence", "abstained", "start_s",
    "end_s", "captured_at", "model", "latency_ms", "lag_s",
)  # fmt: skip
_LEAST_IMPORTANT_FIRST: Final = (
    "lag_s", "latency_ms", "model", "captured_at", "end_s", "start_s", "seq", "window_id",
    "source_id", "flagged", "score", "confidence", "abstained",
)  # fmt: skip


def object_id(text: str) -> str:
    """``text`` reduced to the characters Home Assistant allows in ids (``[a-zA-Z0-9_-]``)."""
    cleaned = _ID_RE.sub("_", text).strip("_")
    return cleaned or "_"


def truncate_state(text: str, limit: int = STATE_MAX_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, ending in an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(ELLIPSIS))].rstrip() + ELLIPSIS


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryOptions:
    """What every discovery payload of one daemon shares.

    Attributes:
        node_id: The daemon's node id.
        sw_version: streamcap's version, shown on the device page.
        availability_topic: ``<prefix>/availability`` (``online`` / ``offline``).
        discovery_prefix: Home Assistant's discovery prefix.
        score_sensor: Also announce a "<source> caption score" sensor.
    """

    node_id: str
    sw_version: str
    availability_topic: str
    discovery_prefix: str = "homeassistant"
    score_sensor: bool = True

    @property
    def device_id(self) -> str:
        """``streamcap_<node_id>``, sanitised."""
        return f"streamcap_{object_id(self.node_id)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryMessage:
    """One discovery config to publish (retained)."""

    topic: str
    payload: Mapping[str, object] = field(default_factory=dict)
    retain: bool = True

    def encode(self) -> bytes:
        """The payload as compact JSON bytes; an empty payload is empty bytes (it removes the
        entity)."""
        if not self.payload:
            return b""
        return json.dumps(self.payload, ensure_ascii=False, separators=(",", ":")).encode()


def device_info(options: DiscoveryOptions) -> dict[str, object]:
    """The ``device`` block shared by every entity of this daemon."""
    return {
        "identifiers": [options.device_id],
        "name": f"streamcap {options.node_id}",
        "manufacturer": MANUFACTURER,
        "model": MODEL,
        "sw_version": options.sw_version,
    }


def _entity(options: DiscoveryOptions, *, source_id: str, suffix: str, name: str,
            extra: Mapping[str, object], component: str = "sensor") -> DiscoveryMessage:
    oid = f"{object_id(source_id)}_{suffix}"
    unique_id = f"{options.device_id}_{oid}"
    payload: dict[str, object] = {
        "name": name,
        "unique_id": unique_id,
        "availability_topic": options.availability_topic,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device_info(options),
        "origin": {"name": "streamcap", "sw_version": options.sw_version},
    }
    payload.update(extra)
    return DiscoveryMessage(topic=_config_topic(options, component, oid), payload=payload)


def _config_topic(options: DiscoveryOptions, component: str, oid: str) -> str:
    return f"{options.discovery_prefix}/{component}/{options.device_id}/{oid}/config"


def source_discovery(options: DiscoveryOptions, *, source_id: str, ha_state_topic: str,
                     status_topic: str) -> list[DiscoveryMessage]:
    """The discovery configs of one source's entities.

    Args:
        options: The daemon-wide settings.
        source_id: The source's name.
        ha_state_topic: Where :func:`caption_state` payloads are published.
        status_topic: Where the source's status frames are published.
    """
    messages = [
        _entity(options, source_id=source_id, suffix="caption", name=f"{source_id} caption",
                extra={
                    "state_topic": ha_state_topic,
                    "value_template": "{{ value_json.state }}",
                    "json_attributes_topic": ha_state_topic,
                    "icon": "mdi:ear-hearing",
                }),
    ]
    if options.score_sensor:
        messages.append(_entity(
            options, source_id=source_id, suffix="caption_score",
            name=f"{source_id} caption score",
            extra={
                "state_topic": ha_state_topic,
                "value_template": "{{ value_json.score }}",
                "state_class": "measurement",
                "icon": "mdi:counter",
            }))
    messages.append(_entity(
        options, source_id=source_id, suffix="status", name=f"{source_id} status",
        extra={
            "state_topic": status_topic,
            "value_template": "{{ value_json.state }}",
            "json_attributes_topic": status_topic,
            "json_attributes_template": (
                "{{ {'reason': value_json.reason, 'at': value_json.at, "
                "'retry_in_s': value_json.retry_in_s, 'attempt': value_json.attempt} | tojson }}"
            ),
            "device_class": "enum",
            "options": [s.value for s in SourceState],
            "entity_category": "diagnostic",
        }))
    return messages


def caption_state(frame: Mapping[str, object]) -> dict[str, object]:
    """The compact Home Assistant payload of one caption.

    Args:
        frame: The caption's wire frame (``streamcap.bus.wire.to_wire``).

    Returns:
        ``{"state": <text cut to 255 characters>, "text": <text cut to 4096>,
        ...}`` plus the whitelisted caption fields that are present
        (window_id, source_id, seq, score, flagged, confidence, abstained,
        start_s, end_s, captured_at, model, latency_ms, lag_s). Nothing else of the frame
        (candidates, any vector) is copied.
    """
    text = frame.get("text")
    text = text if isinstance(text, str) else ""
    out: dict[str, object] = {
        "state": truncate_state(text),
        "text": truncate_state(text, ATTRIBUTE_TEXT_MAX_CHARS),
    }
    for key in _CAPTION_ATTRIBUTES:
        if key in frame:
            out[key] = frame[key]
    return fit_attributes(out, text)


def encoded_size(payload: Mapping[str, object]) -> int:
    """Bytes of ``payload`` as the MQTT sink sends it: compact JSON, UTF-8."""
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def fit_attributes(payload: dict[str, object], text: str,
                   max_bytes: int = ATTRIBUTES_MAX_BYTES) -> dict[str, object]:
    """``payload`` made to fit ``max_bytes``, least important content first.

    The ``text`` attribute (the caption's full ``text``) is cut, at a
    character and ending in an ellipsis, as little as needed; when even a
    short cut does not fit, the other fields are left out in the order of
    ``_LEAST_IMPORTANT_FIRST`` and the text is fitted again. ``state`` (at
    most 255 characters) is always kept. Fields are cut or left out, never
    the JSON, so the payload is always valid JSON.
    """
    if encoded_size(payload) <= max_bytes:
        return payload
    for dropped in range(len(_LEAST_IMPORTANT_FIRST) + 1):
        gone = _LEAST_IMPORTANT_FIRST[:dropped]
        kept = {k: v for k, v in payload.items() if k not in gone}
        fitted = _fit_text(kept, text, max_bytes)
        if fitted is not None:
            return fitted
    return {"state": payload.get("state", "")}


def _fit_text(payload: dict[str, object], text: str, max_bytes: int) -> dict[str, object] | None:
    """``payload`` with its ``text`` cut to fit, or None when no cut of it fits."""
    if encoded_size(payload) <= max_bytes:
        return payload
    if "text" not in payload:
        return None
    limit = len(str(payload["text"]))

    def too_big(n: int) -> bool:
        return encoded_size({**payload, "text": truncate_state(text, n)}) > max_bytes

    # too_big is False up to the longest cut that fits, True beyond it
    fitting = bisect_right(range(limit + 1), False, key=too_big) - 1
    if fitting <= len(ELLIPSIS):
        return None
    return {**payload, "text": truncate_state(text, fitting)}


# --------------------------------------------------------------------------- triggers

STATE_ON: Final = "ON"
"""The retained state payload of a trigger that is on (the binary sensor's ``payload_on``)."""
STATE_OFF: Final = "OFF"
"""... and of one that is off (``payload_off``)."""
EVENT_TYPE: Final = "fired"
"""The one event type of a trigger's ``event`` entity."""
DEFAULT_DEVICE_CLASS: Final = "sound"
"""A trigger's binary sensor is a sound detector unless its words say more."""
EVENT_CAPTION_MAX_CHARS: Final = 1024
"""The caption carried into Home Assistant's event and attributes is cut here."""

# Home Assistant binary_sensor device classes chosen from a trigger's words, first match
# wins: the more specific hazards before the general "safety" (a smoke alarm is smoke).
_DEVICE_CLASS_WORDS: Final[tuple[tuple[str, frozenset[str]], ...]] = (
    ("carbon_monoxide", frozenset({"monoxide"})),
    ("smoke", frozenset({"smoke", "fire"})),
    ("gas", frozenset({"gas"})),
    ("moisture", frozenset({"leak", "leaking", "drip", "dripping", "flood", "flooding"})),
    ("safety", frozenset({"glass", "shatter", "shattering", "smash", "smashing", "alarm",
                          "siren", "scream", "screaming", "gunshot", "gunshots", "burglar",
                          "intruder", "explosion"})),
)
_WORD_RE: Final = re.compile(r"[a-z0-9]+")

# A trigger frame's fields that reach Home Assistant (as event data and attributes).
_EVENT_FIELDS: Final = ("event_id", "trigger", "source_id", "score", "threshold", "start_s",
                        "end_s", "captured_at", "model")


def trigger_device_class(name: str, phrases: Iterable[str] = ()) -> str:
    """The binary_sensor device class for a trigger, from its name, then its phrasings.

    ``smoke``, ``carbon_monoxide``, ``gas``, ``moisture`` (leaks) or ``safety``
    (glass breaking, alarms, sirens, screams) when a word says so; else
    :data:`DEFAULT_DEVICE_CLASS` (``sound``). The name decides before the
    phrasings: ``smoke_alarm`` is ``smoke`` whatever its text.
    """
    for text in (name.replace("_", " ").replace("-", " "), *phrases):
        words = set(_WORD_RE.findall(text.lower()))
        for device_class, keys in _DEVICE_CLASS_WORDS:
            if words & keys:
                return device_class
    return DEFAULT_DEVICE_CLASS


def _fields_template(extra: str = "") -> str:
    """Jinja building a dict of the whitelisted frame fields (plus ``extra`` entries)."""
    items = [f"'{k}': value_json.{k}" for k in _EVENT_FIELDS]
    items.append(f"'caption': (value_json.caption or '')[:{EVENT_CAPTION_MAX_CHARS}]")
    return "{" + extra + ", ".join(items) + "}"


EVENT_VALUE_TEMPLATE: Final = (
    "{% if value_json.state == 'on' %}"
    "{{ " + _fields_template(f"'event_type': '{EVENT_TYPE}', ") + " | tojson }}"
    "{% endif %}"
)
"""An ``on`` frame becomes ``{"event_type": "fired", "event_id": ..., "score": ...}``; an
``off`` frame renders empty, which Home Assistant ignores."""

ATTRIBUTES_TEMPLATE: Final = (
    "{{ " + _fields_template("'state': value_json.state, 'fired_id': value_json.fired_id, ")
    + " | tojson }}"
)
"""The binary sensor's attributes: the whitelisted fields of the latest on or off frame."""


def _trigger_suffix(trigger: str) -> str:
    """``trigger_<name>``, one per trigger name: a trigger's name is already made of the
    characters ids allow, so it is kept as it is (:func:`object_id` would strip the
    ``_`` of ``_dog`` and ``dog_``, and give three triggers one entity); any other name
    is reduced and told apart by a hash of it."""
    if _ALLOWED_ID_RE.fullmatch(trigger):
        return f"trigger_{trigger}"
    digest = hashlib.sha256(trigger.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"trigger_{object_id(trigger)}_{digest}"


def trigger_discovery(options: DiscoveryOptions, *, source_id: str, trigger: str,
                      state_topic: str, event_topic: str,
                      phrases: Iterable[str] = ()) -> list[DiscoveryMessage]:
    """The discovery configs of one (source, trigger) pair: a binary sensor and an event.

    Args:
        options: The daemon-wide settings.
        source_id: The source's name.
        trigger: The trigger's name (``[triggers.<name>]``).
        state_topic: The retained ``ON``/``OFF`` topic.
        event_topic: Where the trigger's JSON frames are published (not retained).
        phrases: The trigger's phrasings when known, for the device class.
    """
    suffix = _trigger_suffix(trigger)
    sensor = _entity(
        options, source_id=source_id, suffix=suffix, name=f"{source_id} {trigger}",
        component="binary_sensor",
        extra={
            "state_topic": state_topic,
            "payload_on": STATE_ON,
            "payload_off": STATE_OFF,
            "device_class": trigger_device_class(trigger, phrases),
            "qos": 1,
            "json_attributes_topic": event_topic,
            "json_attributes_template": ATTRIBUTES_TEMPLATE,
        })
    event = _entity(
        options, source_id=source_id, suffix=f"{suffix}_event",
        name=f"{source_id} {trigger} fired", component="event",
        extra={
            "state_topic": event_topic,
            "event_types": [EVENT_TYPE],
            "value_template": EVENT_VALUE_TEMPLATE,
            "qos": 1,
            "icon": "mdi:bell-ring",
        })
    return [sensor, event]


def trigger_removal(options: DiscoveryOptions, *, source_id: str,
                    trigger: str) -> list[DiscoveryMessage]:
    """Empty retained configs on the topics of :func:`trigger_discovery`: Home Assistant
    removes both entities."""
    oid = f"{object_id(source_id)}_{_trigger_suffix(trigger)}"
    return [DiscoveryMessage(topic=_config_topic(options, "binary_sensor", oid)),
            DiscoveryMessage(topic=_config_topic(options, "event", f"{oid}_event"))]
