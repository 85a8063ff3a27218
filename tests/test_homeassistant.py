"""Home Assistant discovery builders: ids, topics, the 255-character state, no embeddings."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from streamcap.bus.wire import encode, to_wire
from streamcap.messages import Caption, CaptionCandidate, Embedding
from streamcap.sinks import homeassistant as ha

OPTS = ha.DiscoveryOptions(node_id="node.1", sw_version="0.1.0",
                           availability_topic="streamcap/node.1/availability")


def _caption(text: str) -> Caption:
    return Caption(window_id="kitchen:0:5000", source_id="kitchen", seq=3, start_s=5.0,
                   end_s=15.0, captured_at=1.7e9, text=text, score=0.42, model="tiny",
                   candidates=(CaptionCandidate(text=text, decoder_score=-1.0, score=0.4),))


def test_object_id_and_truncation() -> None:
    assert ha.object_id("living room/2") == "living_room_2"
    assert ha.object_id("///") == "_"
    assert ha.truncate_state("short") == "short"
    cut = ha.truncate_state("word " * 100)
    assert len(cut) <= ha.STATE_MAX_CHARS and cut.endswith(ha.ELLIPSIS)
    assert len(ha.truncate_state("x" * 255)) == 255


def test_device_is_one_per_daemon() -> None:
    a = ha.source_discovery(OPTS, source_id="kitchen", ha_state_topic="p/kitchen/ha_state",
                            status_topic="p/kitchen/status")
    b = ha.source_discovery(OPTS, source_id="garden", ha_state_topic="p/garden/ha_state",
                            status_topic="p/garden/status")
    devices = {json.dumps(m.payload["device"], sort_keys=True) for m in a + b}
    assert len(devices) == 1
    device = a[0].payload["device"]
    assert isinstance(device, dict)
    assert device["identifiers"] == ["streamcap_node_1"]
    assert device["sw_version"] == "0.1.0" and device["model"] and device["name"]


def test_entities_per_source() -> None:
    msgs = ha.source_discovery(OPTS, source_id="kitchen", ha_state_topic="p/kitchen/ha_state",
                               status_topic="p/kitchen/status")
    by_name = {m.payload["name"]: m for m in msgs}
    assert set(by_name) == {"kitchen caption", "kitchen caption score", "kitchen status"}
    caption = by_name["kitchen caption"]
    assert caption.topic == "homeassistant/sensor/streamcap_node_1/kitchen_caption/config"
    assert caption.payload["unique_id"] == "streamcap_node_1_kitchen_caption"
    assert caption.payload["state_topic"] == "p/kitchen/ha_state"
    assert caption.payload["value_template"] == "{{ value_json.state }}"
    assert caption.retain
    assert by_name["kitchen status"].payload["state_topic"] == "p/kitchen/status"
    for m in msgs:
        assert m.payload["availability_topic"] == "streamcap/node.1/availability"
        assert "embedding" not in m.encode().decode()
    unique_ids = [m.payload["unique_id"] for m in msgs]
    assert len(set(unique_ids)) == len(unique_ids)
    again = ha.source_discovery(OPTS, source_id="kitchen", ha_state_topic="p/kitchen/ha_state",
                                status_topic="p/kitchen/status")
    assert [m.encode() for m in again] == [m.encode() for m in msgs]  # stable


def test_score_sensor_is_optional_and_prefix_configurable() -> None:
    opts = ha.DiscoveryOptions(node_id="n", sw_version="1", availability_topic="a",
                               discovery_prefix="ha", score_sensor=False)
    msgs = ha.source_discovery(opts, source_id="s", ha_state_topic="x", status_topic="y")
    assert len(msgs) == 2
    assert all(m.topic.startswith("ha/sensor/streamcap_n/") for m in msgs)


def test_caption_state_is_compact_and_capped() -> None:
    frame = to_wire(_caption("a dog barks " * 100), node_id="node.1")  # 1200 characters
    state = ha.caption_state(frame)
    assert len(str(state["state"])) <= ha.STATE_MAX_CHARS
    assert str(state["text"]).startswith("a dog barks a dog")
    assert state["window_id"] == "kitchen:0:5000" and state["score"] == 0.42
    assert "candidates" not in state and "vector" not in state


def test_caption_state_says_whether_the_model_abstained() -> None:
    """An automation can tell "an unfamiliar sound" from a recognised one."""
    caption = replace(_caption("an unfamiliar sound"), confidence=0.31, abstained=True)
    state = ha.caption_state(to_wire(caption, node_id="n"))
    assert state["abstained"] is True and state["confidence"] == 0.31
    assert ha.caption_state(to_wire(_caption("a dog barks"), node_id="n"))["abstained"] is False


def test_caption_state_never_carries_an_embedding() -> None:
    emb = Embedding(window_id="kitchen:0:5000", source_id="kitchen", seq=3, start_s=5.0,
                    end_s=15.0, model="m", vector=np.ones(8, dtype=np.float32))
    frame = dict(to_wire(_caption("hi"), node_id="n"))
    frame["vector"] = to_wire(emb, node_id="n")["vector"]  # even if a frame carried one
    assert "vector" not in ha.caption_state(frame)


def _state_bytes(state: dict[str, object]) -> bytes:
    """The payload as the MQTT sink publishes it."""
    return encode(state).encode("utf-8")


def test_multibyte_caption_stays_within_16_kib_of_attributes() -> None:
    text = "\U0001F415\U0001F327" * 3000  # 4-byte characters: 4096 of them are 16 KiB alone
    state = ha.caption_state(to_wire(_caption(text), node_id="n"))
    payload = _state_bytes(state)
    assert len(payload) <= ha.ATTRIBUTES_MAX_BYTES
    assert json.loads(payload) == state  # whole, valid JSON
    assert len(str(state["state"])) <= ha.STATE_MAX_CHARS
    assert str(state["text"]).startswith(text[:100]) and str(state["text"]).endswith("…")
    # only the long text was cut: every other field is still there
    assert {k for k in state if k not in ("state", "text")} >= {"window_id", "score", "model"}
    assert len(payload) > ha.ATTRIBUTES_MAX_BYTES - 8  # cut as little as needed


def test_least_important_fields_go_first_when_the_text_alone_cannot_make_room() -> None:
    frame = dict(to_wire(_caption("a dog barks"), node_id="n"))
    frame["model"] = "m" * 20000
    frame["window_id"] = "w" * 9000
    state = ha.caption_state(frame)
    assert len(_state_bytes(state)) <= ha.ATTRIBUTES_MAX_BYTES
    assert "model" not in state and "lag_s" not in state and "latency_ms" not in state
    assert state["window_id"] == "w" * 9000
    assert state["text"] == state["state"] == "a dog barks"
    assert state["score"] == 0.42


def test_small_captions_are_untouched() -> None:
    frame = to_wire(_caption("a dog barks"), node_id="n")
    state = ha.caption_state(frame)
    assert state["text"] == "a dog barks"
    assert set(state) >= {"state", "text", "window_id", "score", "model", "seq"}


# --------------------------------------------------------------------------- triggers


def _trigger_configs(source: str = "kitchen", trigger: str = "dog",
                     phrases: tuple[str, ...] = ()) -> dict[str, ha.DiscoveryMessage]:
    msgs = ha.trigger_discovery(OPTS, source_id=source, trigger=trigger,
                                state_topic=f"p/{source}/trigger/{trigger}",
                                event_topic=f"p/{source}/trigger/{trigger}/event",
                                phrases=phrases)
    return {m.topic.split("/")[1]: m for m in msgs}


def test_a_trigger_is_a_binary_sensor_and_an_event_on_the_daemons_device() -> None:
    by = _trigger_configs()
    assert set(by) == {"binary_sensor", "event"}
    sensor, event = by["binary_sensor"], by["event"]
    assert sensor.topic == "homeassistant/binary_sensor/streamcap_node_1/kitchen_trigger_dog/config"
    assert event.topic == "homeassistant/event/streamcap_node_1/kitchen_trigger_dog_event/config"
    assert sensor.payload["state_topic"] == "p/kitchen/trigger/dog"
    assert (sensor.payload["payload_on"], sensor.payload["payload_off"]) == ("ON", "OFF")
    assert sensor.payload["device_class"] == "sound"
    assert event.payload["state_topic"] == "p/kitchen/trigger/dog/event"
    assert event.payload["event_types"] == ["fired"]
    source_device = ha.source_discovery(OPTS, source_id="kitchen", ha_state_topic="x",
                                        status_topic="y")[0].payload["device"]
    for m in (sensor, event):
        assert m.retain
        assert m.payload["device"] == source_device
        assert m.payload["availability_topic"] == "streamcap/node.1/availability"


def test_trigger_ids_are_stable_and_distinct() -> None:
    a = _trigger_configs()
    assert {k: m.encode() for k, m in a.items()} == {
        k: m.encode() for k, m in _trigger_configs().items()}  # same after a restart
    ids = {m.payload["unique_id"] for m in a.values()}
    ids |= {m.payload["unique_id"] for m in _trigger_configs(trigger="glass").values()}
    ids |= {m.payload["unique_id"] for m in _trigger_configs(source="garden").values()}
    ids |= {m.payload["unique_id"] for m in ha.source_discovery(
        OPTS, source_id="kitchen", ha_state_topic="x", status_topic="y")}
    assert len(ids) == 9
    assert a["binary_sensor"].payload["unique_id"] == "streamcap_node_1_kitchen_trigger_dog"


def test_trigger_names_that_differ_only_by_underscores_are_distinct_entities() -> None:
    names = ("dog", "_dog", "dog_", "__dog", "d_og")
    for component in ("binary_sensor", "event"):
        ids = {_trigger_configs(trigger=n)[component].payload["unique_id"] for n in names}
        topics = {_trigger_configs(trigger=n)[component].topic for n in names}
        assert len(ids) == len(topics) == len(names), component
    # removal goes to the same topics as discovery
    for n in names:
        assert ({m.topic for m in ha.trigger_removal(OPTS, source_id="kitchen", trigger=n)}
                == {m.topic for m in _trigger_configs(trigger=n).values()})
    assert _trigger_configs(trigger="_dog")["binary_sensor"].payload["unique_id"] == (
        "streamcap_node_1_kitchen_trigger__dog")


@pytest.mark.parametrize(("name", "phrases", "expected"), [
    ("dog", ("a dog barks",), "sound"),
    ("smoke_alarm", (), "smoke"),
    ("kitchen-alert", ("a smoke alarm beeps",), "smoke"),
    ("co", ("a carbon monoxide alarm",), "carbon_monoxide"),
    ("window", ("glass shatters",), "safety"),
    ("alarm", ("smoke detector",), "safety"),  # the name decides before the phrasings
    ("tap", ("water dripping from a tap",), "moisture"),
    ("doorbell", ("a doorbell rings",), "sound"),
    ("Siren", (), "safety"),
])
def test_device_class_from_the_triggers_words(name: str, phrases: tuple[str, ...],
                                              expected: str) -> None:
    assert ha.trigger_device_class(name, phrases) == expected
    assert _trigger_configs(trigger=name, phrases=phrases)[
        "binary_sensor"].payload["device_class"] == expected


def test_removal_is_empty_retained_configs_on_the_same_topics() -> None:
    configs = _trigger_configs(source="living room")
    removal = ha.trigger_removal(OPTS, source_id="living room", trigger="dog")
    assert sorted(m.topic for m in removal) == sorted(m.topic for m in configs.values())
    assert all(m.retain and m.encode() == b"" for m in removal)
