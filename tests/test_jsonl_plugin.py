"""The separately installable example plugin plugins/streamcap-jsonl, installed and run for real.

The session fixture ``jsonl_installed`` (tests/conftest.py) pip-installs the plugin
into the running interpreter's environment, so that it is found through its entry
point exactly as a third-party plugin is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import jsonl_installed

from streamcap.bus.bus import PluginBus
from streamcap.bus.plugin import SINKS_GROUP, list_plugins, load_sink, load_sinks
from streamcap.bus.wire import encode, to_wire
from streamcap.errors import ConfigError
from streamcap.messages import (
    Caption,
    CaptionCandidate,
    Embedding,
    Published,
    SourceState,
    SourceStatus,
)
from streamcap.stats import Metrics

__all__ = ["jsonl_installed"]  # importable from here too, as other test modules do


def messages() -> list[Published]:
    vector = np.array([0.6, 0.8], dtype=np.float32)
    return [
        SourceStatus(source_id="kitchen", state=SourceState.RUNNING, reason="opened", at=5.0),
        Caption(window_id="kitchen:0:0", source_id="kitchen", seq=0, start_s=0.0, end_s=10.0,
                captured_at=100.0, text="water runs into a sink", score=0.7, model="tiny",
                candidates=(CaptionCandidate(text="water runs into a sink", decoder_score=-1.0,
                                             score=0.7),)),
        Embedding(window_id="kitchen:0:0", source_id="kitchen", seq=0, start_s=0.0,
                  end_s=10.0, model="clap", vector=vector),
        Caption(window_id="kitchen:0:5000", source_id="kitchen", seq=1, start_s=5.0,
                end_s=15.0, captured_at=105.0, text="a door closes ünd opens", score=0.6),
    ]


def test_entry_point_is_discovered_with_its_distribution(jsonl_installed: None) -> None:
    infos = [i for i in list_plugins() if i.group == SINKS_GROUP and i.name == "jsonl"]
    assert len(infos) == 1
    info = infos[0]
    assert info.value == "streamcap_jsonl:create_sink"
    assert (info.distribution, info.version) == ("streamcap-jsonl", "0.1.0")


def test_load_sink_finds_and_checks_the_plugin(jsonl_installed: None, tmp_path: Path) -> None:
    sink = load_sink("archive", "jsonl", {"path": str(tmp_path / "x.jsonl"),
                                          "accepts": ["caption"], "queue_size": 4})
    assert sink.accepts == frozenset({"caption"})
    assert sink.queue_size == 4
    assert type(sink.sink).__module__ == "streamcap_jsonl"
    assert sink.sink.accepts == frozenset({"caption", "embedding", "status"})


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [("sinks.archive.path: missing: the file to append to; a relative path lives in "
               "the sink's state directory")]),
        ({"path": ""}, ["sinks.archive.path: must not be empty (got '')"]),
        ({"path": " "}, ["sinks.archive.path: must not be empty (got ' ')"]),
        ({"path": 3}, ["sinks.archive.path: expected a string (got an integer 3)"]),
        ({"path": "a", "fsync": True, "colour": "red"},
         [f"sinks.archive.{key}: unknown key (known keys: accepts, change_distance, "
          f"heartbeat_s, path, publish, queue_size)"
          for key in ("fsync", "colour")]),
    ],
)
def test_bad_options_name_the_config_key(jsonl_installed: None, options: dict[str, object],
                                         expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_sink("archive", "jsonl", options)
    assert err.value.problems == expected


async def run_bus(tables: list[tuple[str, str, dict[str, object]]], state_root: Path,
                  msgs: list[Published]) -> PluginBus:
    sinks = load_sinks(tables)
    bus = PluginBus(sinks, node_id="node-a", metrics=Metrics(), state_root=state_root)
    async with bus:
        await bus.wait_ready()
        for m in msgs:
            bus.publish(m)
    return bus


async def test_messages_flow_through_the_bus_into_the_file(jsonl_installed: None,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "out" / "all.jsonl"
    msgs = messages()
    bus = await run_bus(
        [("all", "jsonl", {"path": str(out)}),
         ("captions", "jsonl", {"path": "captions.jsonl", "accepts": ["caption"]})],
        tmp_path / "state", msgs)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == [encode(to_wire(m, node_id="node-a")) for m in msgs]
    assert [json.loads(line)["type"] for line in lines] == ["status", "caption", "embedding",
                                                           "caption"]
    # A relative path lives in the sink's state directory; accepts narrowed it to captions.
    caption_lines = (tmp_path / "state" / "captions" / "captions.jsonl").read_text(
        encoding="utf-8").splitlines()
    assert [json.loads(line)["window_id"] for line in caption_lines] == ["kitchen:0:0",
                                                                         "kitchen:0:5000"]
    assert bus.restarts == {"all": 0, "captions": 0}
    assert all(n == 0 for inbox in bus.inboxes.values() for n in inbox.dropped.values())


async def test_a_second_run_appends(jsonl_installed: None, tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    first, second = messages()[:2], messages()[3:]
    await run_bus([("f", "jsonl", {"path": str(out)})], tmp_path, first)
    await run_bus([("f", "jsonl", {"path": str(out)})], tmp_path, second)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == [encode(to_wire(m, node_id="node-a")) for m in first + second]
