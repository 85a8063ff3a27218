"""Every discovery config the MQTT sink publishes, validated against Home Assistant's MQTT
discovery schema (transcribed in tests/ha_mqtt_discovery.schema.json, which names its source),
and its templates rendered the way Home Assistant renders them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from streamcap.bus.wire import to_wire
from streamcap.messages import TriggerEvent, TriggerState
from streamcap.sinks import homeassistant as ha

sandbox = pytest.importorskip("jinja2.sandbox")

SCHEMA = json.loads((Path(__file__).parent / "ha_mqtt_discovery.schema.json").read_text())
# Home Assistant's discovery topic: <prefix>/<component>/[<node_id>/]<object_id>/config
TOPIC_RE = re.compile(r"^homeassistant/(?P<component>\w+)/(?:[a-zA-Z0-9_-]+/)?[a-zA-Z0-9_-]+/config$")
OPTS = ha.DiscoveryOptions(node_id="node.1", sw_version="0.1.0",
                           availability_topic="streamcap/node.1/availability")


def validator(component: str) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator({**SCHEMA, "$ref": f"#/$defs/{component}"})


def everything() -> list[ha.DiscoveryMessage]:
    """What a daemon with two sources and a few triggers announces."""
    out: list[ha.DiscoveryMessage] = []
    for source in ("kitchen", "living room/2"):
        out += ha.source_discovery(OPTS, source_id=source, ha_state_topic=f"p/{source}/ha_state",
                                   status_topic=f"p/{source}/status")
        for trigger, phrases in (("dog", ("a dog barks",)), ("smoke_alarm", ()),
                                 ("window", ("glass shatters",)), ("leak", ())):
            out += ha.trigger_discovery(OPTS, source_id=source, trigger=trigger,
                                        state_topic=f"p/{source}/trigger/{trigger}",
                                        event_topic=f"p/{source}/trigger/{trigger}/event",
                                        phrases=phrases)
    return out


def test_every_config_validates_against_home_assistants_schema() -> None:
    messages = everything()
    components = set()
    for m in messages:
        match = TOPIC_RE.match(m.topic)
        assert match, m.topic
        component = match["component"]
        components.add(component)
        validator(component).validate(json.loads(m.encode()))
    assert components == {"sensor", "binary_sensor", "event"}
    unique_ids = [m.payload["unique_id"] for m in messages]
    assert len(set(unique_ids)) == len(unique_ids)
    assert len({m.topic for m in messages}) == len(messages)


@pytest.mark.parametrize(("component", "mutate"), [
    ("binary_sensor", lambda p: p.update(device_class="glass_break")),  # not a device class
    ("binary_sensor", lambda p: p.pop("state_topic")),
    ("binary_sensor", lambda p: p.update(payload_onn="ON")),  # misspelt: HA would drop it
    ("binary_sensor", lambda p: p.update(state_topic="p/+/trigger/dog")),
    ("event", lambda p: p.pop("event_types")),
    ("event", lambda p: p.update(event_types=[])),
    ("event", lambda p: p.update(device_class="sound")),
    ("event", lambda p: p["device"].pop("identifiers")),
    ("event", lambda p: p.update(availability=[{"topic": "a"}])),  # with availability_topic
])
def test_the_schema_refuses_what_home_assistant_refuses(component: str, mutate: Any) -> None:
    msgs = {m.topic.split("/")[1]: json.loads(m.encode())
            for m in ha.trigger_discovery(OPTS, source_id="kitchen", trigger="dog",
                                          state_topic="p/s", event_topic="p/s/event")}
    payload = msgs[component]
    validator(component).validate(payload)
    mutate(payload)
    assert not validator(component).is_valid(payload)


def _frame(state: TriggerState, fired_id: str = "", caption: str | None = "a dog barks",
           score: float = 0.31) -> dict[str, object]:
    return to_wire(TriggerEvent(event_id="r1-dog-kitchen-3", trigger="dog", source_id="kitchen",
                                state=state, score=score, threshold=0.25, start_s=4.0,
                                end_s=9.0, captured_at=1.7e9, model="m", run_id="r1",
                                fired_id=fired_id, caption=caption), node_id="n")


def _render(template: str, frame: dict[str, object]) -> str:
    env = sandbox.ImmutableSandboxedEnvironment()
    return str(env.from_string(template).render(value_json=frame))


def test_every_template_parses() -> None:
    env = sandbox.ImmutableSandboxedEnvironment()
    templates = [str(v) for m in everything() for k, v in m.payload.items()
                 if k.endswith("template")]
    assert len(templates) > 10
    for t in templates:
        env.parse(t)


def test_an_on_frame_becomes_a_fired_event_and_an_off_frame_nothing() -> None:
    """Home Assistant's event entity takes a JSON object whose event_type is one of
    event_types (the rest become the event's attributes) and ignores an empty result."""
    event = json.loads(_render(ha.EVENT_VALUE_TEMPLATE, _frame(TriggerState.ON)))
    assert event["event_type"] == ha.EVENT_TYPE == "fired"
    assert event["event_id"] == "r1-dog-kitchen-3" and event["score"] == 0.31
    assert event["caption"] == "a dog barks" and event["trigger"] == "dog"
    assert _render(ha.EVENT_VALUE_TEMPLATE, _frame(TriggerState.OFF, "r1-dog-kitchen-3")) == ""
    assert _render(ha.EVENT_VALUE_TEMPLATE, _frame(TriggerState.OFF, score=math.nan)) == ""
    long = json.loads(_render(ha.EVENT_VALUE_TEMPLATE,
                              _frame(TriggerState.ON, caption="<a> & 'b' " * 500)))
    assert long["caption"] == ("<a> & 'b' " * 500)[:ha.EVENT_CAPTION_MAX_CHARS]
    assert json.loads(_render(ha.EVENT_VALUE_TEMPLATE,
                              _frame(TriggerState.ON, caption=None)))["caption"] == ""


def test_the_binary_sensor_attributes_are_a_json_object_of_the_frame() -> None:
    off = _frame(TriggerState.OFF, "r1-dog-kitchen-3")
    attributes = json.loads(_render(ha.ATTRIBUTES_TEMPLATE, off))
    assert attributes["state"] == "off" and attributes["fired_id"] == "r1-dog-kitchen-3"
    assert attributes["threshold"] == 0.25 and "run_id" not in attributes
