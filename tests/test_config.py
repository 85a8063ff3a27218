"""Tests for streamcap.config: every bad value is a ConfigError naming its dotted key."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from streamcap.config import (
    MAX_CONFIG_BYTES,
    MAX_URI_CHARS,
    Config,
    DaemonConfig,
    HttpConfig,
    ModelConfig,
    SourceConfig,
    default_config,
    load_config,
    parse_config,
    read_config,
    read_toml,
)
from streamcap.errors import ConfigError
from streamcap.history.options import HistoryOptions
from streamcap.models.decoding.abstain import AbstentionOptions
from streamcap.models.decoding.options import DecodingOptions
from streamcap.options import known_keys
from streamcap.privacy.options import PrivacyConfig
from streamcap.sources.base import (
    SOURCE_OPTIONS,
    FileOptions,
    MicOptions,
    SourceOptions,
    StreamOptions,
    parse_source_uri,
)

SHIPPED = Path(__file__).resolve().parent.parent / "config.toml"


def problems_of(data: Mapping[str, Any]) -> list[str]:
    """The problems parse_config reports for ``data`` (fails the test if it accepts it)."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def source(**values: Any) -> dict[str, Any]:
    """A document with one source ``kitchen`` capturing the default microphone."""
    return {"sources": {"kitchen": {"uri": "mic:default", **values}}}


# --------------------------------------------------------------------------- valid input


def test_empty_document_gives_the_dataclass_defaults() -> None:
    config = parse_config({})
    assert config.daemon == DaemonConfig()
    assert config.model == ModelConfig()
    assert config.http == HttpConfig()
    assert dict(config.sources) == {}
    assert dict(config.sinks) == {}
    assert config.path is None


def test_a_full_source_is_read_with_its_values() -> None:
    config = parse_config(source(window_s=30, hop_s=0.5, sample_rate_hz=44100, channels=2,
                                 block_s=0.2, max_retries=3))
    src = config.sources["kitchen"]
    assert src.name == "kitchen"
    assert src.uri == "mic:default"
    assert (src.window_s, src.hop_s) == (30.0, 0.5)
    assert isinstance(src.window_s, float)  # a TOML integer is accepted for a number
    assert src.max_retries == 3
    assert src.capture == MicOptions(sample_rate_hz=44100, channels=2, block_s=0.2)
    assert src.explicit == frozenset({"uri", "window_s", "hop_s", "sample_rate_hz", "channels",
                                      "block_s", "max_retries"})


@pytest.mark.parametrize(("uri", "table", "capture"), [
    ("mic:default", {"channels": 0, "sample_rate_hz": 0}, MicOptions()),
    ("file:/x.wav", {"realtime": False, "loop": True, "ffmpeg": "/opt/ffmpeg"},
     FileOptions(realtime=False, loop=True, ffmpeg="/opt/ffmpeg")),
    ("rtsp://cam/live", {"probe_s": 5, "ffmpeg": "/opt/ffmpeg", "block_s": 0.5},
     StreamOptions(probe_s=5.0, ffmpeg="/opt/ffmpeg", block_s=0.5)),
])
def test_a_source_table_takes_the_options_its_kind_declares(
        uri: str, table: dict[str, Any], capture: SourceOptions) -> None:
    assert parse_config(source(uri=uri, **table)).sources["kitchen"].capture == capture


@pytest.mark.parametrize(("uri", "key"), [
    ("mic:default", "loop"), ("mic:default", "ffmpeg"), ("file:/x.wav", "channels"),
    ("file:/x.wav", "probe_s"), ("rtsp://cam/live", "realtime"), ("rtsp://cam/live", "channels"),
])
def test_a_source_table_refuses_the_options_of_other_kinds(uri: str, key: str) -> None:
    [problem] = problems_of(source(uri=uri, **{key: 1}))
    known = sorted(known_keys(SourceConfig) | known_keys(SOURCE_OPTIONS[parse_source_uri(uri)[0]]))
    assert problem == f"sources.kitchen.{key}: unknown key (known keys: {', '.join(known)})"


def test_window_limits_and_hop_equal_to_window_are_valid() -> None:
    for window, hop in ((10, 10), (30, 30), (10.001, 0.001), (29.999, 12.345)):
        src = parse_config(source(window_s=window, hop_s=hop)).sources["kitchen"]
        assert (src.window_s, src.hop_s) == (window, hop)


def test_sink_options_pass_through_without_the_plugin_key() -> None:
    config = parse_config({"sinks": {"ws": {"plugin": "websocket", "port": 8765,
                                            "token_env": "WS_TOKEN"},
                                     "mqtt": {"password_env": "MQTT_PASSWORD"}}})
    assert config.sinks["ws"].plugin == "websocket"
    assert dict(config.sinks["ws"].options) == {"port": 8765, "token_env": "WS_TOKEN"}
    assert config.sinks["mqtt"].plugin == "mqtt"  # the plugin defaults to the table name


def test_seed_unset_or_minus_one_means_fresh_randomness() -> None:
    assert parse_config({}).model.decoding.seed is None
    assert parse_config({"model": {"decoding": {"seed": -1}}}).model.decoding.seed is None
    assert parse_config({"model": {"decoding": {"seed": 1234}}}).model.decoding.seed == 1234
    assert problems_of({"model": {"decoding": {"seed": -2}}}) == [
        ("model.decoding.seed: must be >= 0 and <= 9223372036854775807, or -1 for a fresh random "
        "stream (got -2)")]


# --------------------------------------------------------------------------- bad values


def test_hop_longer_than_window_names_both_values() -> None:
    assert problems_of(source(window_s=10, hop_s=12)) == [
        "sources.kitchen.hop_s: must be > 0 and <= window_s (got 12 > 10)"]


@pytest.mark.parametrize("window", [9.999, 5, 30.001, 60, 0, -10])
def test_window_outside_10_to_30_seconds(window: float) -> None:
    assert problems_of(source(window_s=window)) == [
        f"sources.kitchen.window_s: must be between 10 and 30 (got {float(window)!r})"]


def test_a_bad_window_does_not_also_blame_the_hop() -> None:
    # hop_s = 12 is fine for the 40 s the user meant; only window_s is wrong.
    assert problems_of(source(window_s=40, hop_s=12)) == [
        "sources.kitchen.window_s: must be between 10 and 30 (got 40.0)"]


@pytest.mark.parametrize("hop", [0, -1, -0.5])
def test_hop_must_be_positive(hop: float) -> None:
    assert problems_of(source(hop_s=hop)) == [
        f"sources.kitchen.hop_s: must be > 0 (got {float(hop)!r})"]


@pytest.mark.parametrize(("key", "value"), [("window_s", 10.0005), ("hop_s", 2.5004),
                                            ("window_s", 12.3456), ("hop_s", 1e-4)])
def test_window_and_hop_must_be_whole_milliseconds(key: str, value: float) -> None:
    assert problems_of(source(**{key: value})) == [
        f"sources.kitchen.{key}: must be a whole number of milliseconds (got {value!r})"]


@pytest.mark.parametrize(("doc", "expected"), [
    (source(window_s="10"), "sources.kitchen.window_s: expected a number (got a string '10')"),
    (source(sample_rate_hz=True),
     "sources.kitchen.sample_rate_hz: expected an integer (got a boolean true)"),
    (source(sample_rate_hz=44100.0),
     "sources.kitchen.sample_rate_hz: expected an integer (got a number 44100.0)"),
    (source(uri="file:/x.wav", loop=1),
     "sources.kitchen.loop: expected true or false (got an integer 1)"),
    (source(hop_s={"a": 1}), "sources.kitchen.hop_s: expected a number (got a table {'a': 1})"),
    (source(uri=["mic:default"]),
     "sources.kitchen.uri: expected a string (got an array ['mic:default'])"),
    ({"daemon": {"max_pending_windows": False}},
     "daemon.max_pending_windows: expected an integer (got a boolean false)"),
    ({"daemon": {"stop_timeout_s": True}},
     "daemon.stop_timeout_s: expected a number (got a boolean true)"),
    ({"daemon": {"node_id": 7}}, "daemon.node_id: expected a string (got an integer 7)"),
    ({"model": {"threads": "4"}}, "model.threads: expected an integer (got a string '4')"),
    ({"model": {"decoding": {"n_candidates": {}}}},
     "model.decoding.n_candidates: expected an integer (got a table {})"),
    ({"http": {"enabled": "yes"}}, "http.enabled: expected true or false (got a string 'yes')"),
    ({"http": {"port": 80.5}}, "http.port: expected an integer (got a number 80.5)"),
])
def test_wrong_types_name_the_key_the_expected_and_the_given_type(
        doc: dict[str, Any], expected: str) -> None:
    assert problems_of(doc) == [expected]


@pytest.mark.parametrize(("doc", "expected"), [
    ({"daemon": {"node_id": "kitchen pi"}},
     ("daemon.node_id: must be 1-64 letters, digits, '-' or '_' (it is used in MQTT topics) "
     "(got 'kitchen pi')")),
    ({"daemon": {"log_format": "xml"}},
     "daemon.log_format: must be one of auto, json, console (got 'xml')"),
    ({"daemon": {"log_level": "trace"}},
     "daemon.log_level: must be one of debug, info, warning, error (got 'trace')"),
    ({"daemon": {"max_pending_windows": 0}},
     "daemon.max_pending_windows: must be between 1 and 1000 (got 0)"),
    ({"daemon": {"stop_timeout_s": 0}}, "daemon.stop_timeout_s: must be > 0 and <= 3600 (got 0.0)"),
    ({"daemon": {"stop_timeout_s": float("inf")}},
     "daemon.stop_timeout_s: must be a finite number (got inf)"),
    ({"daemon": {"stop_timeout_s": float("nan")}},
     "daemon.stop_timeout_s: must be a finite number (got nan)"),
    ({"model": {"bundle": "  "}},
     "model.bundle: must name a bundle directory or a preset (got '  ')"),
    ({"model": {"device": "tpu"}}, "model.device: must be one of auto, cpu, cuda (got 'tpu')"),
    ({"model": {"precision": "int4"}},
     "model.precision: must be one of auto, fp32, bf16, fp16, int8 (got 'int4')"),
    ({"model": {"threads": -1}}, "model.threads: must be between 0 and 1024 (got -1)"),
    ({"model": {"decoding": {"mode": "greedy"}}},
     "model.decoding.mode: must be one of sample, beam (got 'greedy')"),
    ({"model": {"decoding": {"top_p": 0}}},
     "model.decoding.top_p: must be > 0 and <= 1 (got 0.0)"),
    ({"model": {"decoding": {"top_p": 1.5}}},
     "model.decoding.top_p: must be > 0 and <= 1 (got 1.5)"),
    ({"model": {"decoding": {"temperature": -0.5}}},
     "model.decoding.temperature: must be between 0.01 and 10 (got -0.5)"),
    ({"model": {"decoding": {"n_candidates": 0}}},
     "model.decoding.n_candidates: must be between 1 and 256 (got 0)"),
    ({"model": {"decoding": {"encoder_weight": 1.2}}},
     "model.decoding.encoder_weight: must be between 0 and 1 (got 1.2)"),
    ({"model": {"decoding": {"num_beams": 65}}},
     "model.decoding.num_beams: must be between 1 and 64 (got 65)"),
    ({"http": {"port": 70000}}, "http.port: must be between 0 and 65535 (got 70000)"),
    ({"http": {"host": ""}}, "http.host: must not be empty (got '')"),
    (source(uri=" "), "sources.kitchen.uri: must not be empty (got ' ')"),
    (source(sample_rate_hz=4000),
     ("sources.kitchen.sample_rate_hz: must be 0 (automatic) or between 8000 and 192000 "
     "(got 4000)")),
    (source(channels=65),
     "sources.kitchen.channels: must be 0 (automatic) or between 1 and 64 (got 65)"),
    (source(block_s=3), "sources.kitchen.block_s: must be between 0.005 and 2 (got 3.0)"),
    (source(stall_s=0), "sources.kitchen.stall_s: must be > 0 and <= 3600 (got 0.0)"),
    (source(max_retries=-1), "sources.kitchen.max_retries: must be between 0 and 1000000 (got -1)"),
    (source(backoff_initial_s=10, backoff_max_s=5),
     "sources.kitchen.backoff_max_s: must be >= backoff_initial_s (got 5 < 10)"),
    (source(backoff_initial_s=-1, backoff_max_s=0.5),
     "sources.kitchen.backoff_initial_s: must be > 0 and <= 3600 (got -1.0)"),
])
def test_bad_values_name_the_key_and_the_rule(doc: dict[str, Any], expected: str) -> None:
    assert problems_of(doc) == [expected]


@pytest.mark.parametrize(("decoding", "expected"), [
    ({"temperature": 1e308}, "temperature: must be between 0.01 and 10 (got 1e+308)"),
    ({"temperature": 1e-320}, "temperature: must be between 0.01 and 10 (got 1e-320)"),
    ({"temperature": 0.009}, "temperature: must be between 0.01 and 10 (got 0.009)"),
    ({"no_repeat_ngram_size": 2**63},
     f"no_repeat_ngram_size: must be between 0 and 512 (got {2**63})"),
    ({"no_repeat_ngram_size": 31},
     "no_repeat_ngram_size: must be 0 (off) or <= max_new_tokens (got 31 > 30)"),
    ({"no_repeat_ngram_size": 5, "max_new_tokens": 4},
     "no_repeat_ngram_size: must be 0 (off) or <= max_new_tokens (got 5 > 4)"),
    ({"max_new_tokens": 1},
     "max_new_tokens: must be between 2 (the forced BOS and EOS) and 512 (got 1)"),
    ({"beam_max_length": 2},
     "beam_max_length: must be between 3 (decoder start, BOS and EOS) and 512 (got 2)"),
    ({"num_beams": 2**63}, f"num_beams: must be between 1 and 64 (got {2**63})"),
    ({"seed": 2**64},
     f"seed: must be >= 0 and <= {2**63 - 1}, or -1 for a fresh random stream (got {2**64})"),
])
def test_decoding_numbers_are_bounded_by_what_the_decoders_can_do(
        decoding: dict[str, Any], expected: str) -> None:
    assert problems_of({"model": {"decoding": decoding}}) == [f"model.decoding.{expected}"]


def test_decoding_limits_are_accepted() -> None:
    decoding = parse_config({"model": {"decoding": {
        "temperature": 10, "top_p": 1e-9, "max_new_tokens": 2, "no_repeat_ngram_size": 2,
        "beam_max_length": 3, "num_beams": 64, "seed": 2**63 - 1}}}).model.decoding
    assert (decoding.temperature, decoding.max_new_tokens, decoding.no_repeat_ngram_size,
            decoding.beam_max_length, decoding.seed) == (10.0, 2, 2, 3, 2**63 - 1)


@pytest.mark.parametrize(("doc", "expected"), [
    ({"daemon": {"stop_timeout_s": 1e308}},
     "daemon.stop_timeout_s: must be > 0 and <= 3600 (got 1e+308)"),
    (source(stall_s=1e308), "sources.kitchen.stall_s: must be > 0 and <= 3600 (got 1e+308)"),
    (source(backoff_max_s=1e308),
     "sources.kitchen.backoff_max_s: must be > 0 and <= 86400 (got 1e+308)"),
    (source(backoff_reset_s=1e308),
     "sources.kitchen.backoff_reset_s: must be > 0 and <= 86400 (got 1e+308)"),
    (source(max_retries=2**63),
     f"sources.kitchen.max_retries: must be between 0 and 1000000 (got {2**63})"),
])
def test_durations_and_counts_have_upper_bounds(doc: dict[str, Any], expected: str) -> None:
    assert problems_of(doc) == [expected]


@pytest.mark.parametrize(("uri", "fragment"), [
    ("nope", "source uri 'nope' has no scheme"),
    ("file:", "source uri 'file:' names no file"),
    ("mic:", "source uri 'mic:' names no device"),
    ("rtsp://", "source uri 'rtsp://' is not a URL"),
    ("ftp://h/x", "source uri 'ftp://h/x' has unknown scheme 'ftp'"),
    ("file:/x.wav?loop=maybe",
     "source option 'loop': expected true or false (got a string 'maybe')"),
    ("file:/x.wav?unknown=1", ("source option 'unknown': unknown key (known keys: block_s, "
                               "ffmpeg, loop, realtime, sample_rate_hz)")),
    ("file:/x.wav?block_s=nan", "source option 'block_s': must be a finite number (got 'nan')"),
    ("file:/x.wav?block_s=0.004",
     "source option 'block_s': must be between 0.005 and 2 (got '0.004')"),
    ("file:/x.wav?sample_rate_hz=-5", ("source option 'sample_rate_hz': must be 0 (automatic) "
                                       "or between 8000 and 192000 (got '-5')")),
    ("file:/x.wav?sample_rate_hz=4000", ("source option 'sample_rate_hz': must be 0 "
                                         "(automatic) or between 8000 and 192000 (got '4000')")),
    ("file:/x.wav?sample_rate_hz=1e9",
     "source option 'sample_rate_hz': expected an integer (got a string '1e9')"),
])
def test_source_uris_and_their_options_are_checked(uri: str, fragment: str) -> None:
    [problem] = problems_of(source(uri=uri))
    assert problem.startswith(f"sources.kitchen.uri: {fragment}"), problem


def test_uri_options_obey_the_ranges_of_the_table_keys() -> None:
    # The same value is refused in the table and in the URI, and the limits are accepted in both.
    for key, bad, good in (("block_s", 3, 2), ("sample_rate_hz", 4000, 8000),
                           ("sample_rate_hz", 192001, 0), ("block_s", "nan", 0.005)):
        assert problems_of(source(uri="file:/x.wav", **{key: bad}))
        assert problems_of(source(uri=f"file:/x.wav?{key}={bad}"))
        parse_config(source(uri="file:/x.wav", **{key: good}))
        parse_config(source(uri=f"file:/x.wav?{key}={good}"))


def test_a_huge_value_is_shown_cut_short() -> None:
    [problem] = problems_of({"model": {"bundle": [[[["x" * 500]]]]}})
    assert problem.startswith("model.bundle: expected a string (got an array [[[['xxx")
    assert problem.endswith("...)") and len(problem) < 160


def test_a_source_without_uri_says_what_a_uri_looks_like() -> None:
    [problem] = problems_of({"sources": {"kitchen": {"window_s": 10}}})
    assert problem.startswith("sources.kitchen.uri: missing: every source needs a uri")
    assert "mic:default" in problem and "rtsp://" in problem


@pytest.mark.parametrize(("name", "key"), [
    ("bad name", '"bad name"'), ("a.b", '"a.b"'), ("x" * 65, "x" * 65), ("", '""'),
    ("kü", '"kü"'), ("\x1b[2J\n", '"\\u001b[2J\\u000a"'), ("x" * 100, "x" * 77 + "..."),
])
def test_bad_source_and_sink_names(name: str, key: str) -> None:
    """A name is quoted as TOML would write it: no raw control character reaches a terminal."""
    assert problems_of({"sources": {name: {"uri": "mic:default"}}}) == [
        f"sources.{key}: a source name must be 1-64 letters, digits, '-' or '_'"]
    assert problems_of({"sinks": {name: {"plugin": "websocket"}}}) == [
        f"sinks.{key}: a sink name must be 1-64 letters, digits, '-' or '_'"]


def test_sections_that_are_not_tables() -> None:
    assert problems_of({"daemon": "x"}) == ["daemon: expected a table (got a string)"]
    assert problems_of({"model": {"decoding": 3}}) == [
        "model.decoding: expected a table (got an integer)"]
    assert problems_of({"sources": {"kitchen": 3}}) == [
        "sources.kitchen: expected a table (got an integer)"]
    assert problems_of({"http": [1]}) == ["http: expected a table (got an array)"]


def test_an_empty_sources_table_is_an_error() -> None:
    assert problems_of({"sources": {}}) == [
        "sources: at least one [sources.<name>] table is needed"]


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("doc", "key"), [
    ({"bogus": 1}, "bogus"),
    ({"sink": {"x": {}}}, "sink"),
    ({"daemon": {"nodeid": "x"}}, "daemon.nodeid"),
    ({"model": {"bundel": "tiny"}}, "model.bundel"),
    ({"model": {"decoding": {"top_k": 5}}}, "model.decoding.top_k"),
    (source(window=10), "sources.kitchen.window"),
    ({"http": {"address": "0.0.0.0"}}, "http.address"),
])
def test_unknown_keys_at_every_level(doc: dict[str, Any], key: str) -> None:
    [problem] = problems_of(doc)
    assert problem.startswith(f"{key}: unknown key (known keys: ")


def test_unknown_key_lists_the_known_keys() -> None:
    [problem] = problems_of({"http": {"address": "0.0.0.0"}})
    assert problem == ("http.address: unknown key (known keys: allowed_hosts, enabled, host, "
                       "max_connections, port, request_timeout_s, token_env)")


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("key", ["password", "token", "secret", "api_key", "passwd", "Password"])
def test_secrets_in_sink_tables_are_refused_with_a_pointer_to_env(key: str) -> None:
    assert problems_of({"sinks": {"broker": {"plugin": "mqtt", key: "x"}}}) == [
        (f"sinks.broker.{key}: secrets are not read from the config file: put the value in an "
        f"environment variable and name it with '{key}_env'")]


@pytest.mark.parametrize("value", [3, "", True, ["MQTT_PASSWORD"]])
def test_env_keys_must_name_a_variable(value: object) -> None:
    assert problems_of({"sinks": {"broker": {"plugin": "mqtt", "password_env": value}}}) == [
        "sinks.broker.password_env: expected the name of an environment variable"]


# --------------------------------------------------------------------------- all at once


def test_every_problem_is_reported_at_once_in_document_order() -> None:
    doc = {
        "bogus": True,
        "daemon": {"log_format": "xml", "extra": 1},
        "model": {"device": "tpu", "decoding": {"top_p": 2, "top_k": 1}},
        "sources": {"kitchen": {"uri": "mic:default", "window_s": 10, "hop_s": 12},
                    "hall": {"uri": "mic:1", "window_s": 5}},
        "sinks": {"broker": {"plugin": "mqtt", "password": "x"}},
        "http": {"port": -1},
    }
    problems = problems_of(doc)
    keys = [p.split(":", 1)[0] for p in problems]
    assert sorted(keys) == sorted([
        "bogus", "daemon.log_format", "daemon.extra", "model.device", "model.decoding.top_p",
        "model.decoding.top_k", "sources.kitchen.hop_s", "sources.hall.window_s",
        "sinks.broker.password", "http.port"])
    assert "sources.kitchen.hop_s: must be > 0 and <= window_s (got 12 > 10)" in problems
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert str(info.value) == "\n".join(problems)


# --------------------------------------------------------------------------- files


def test_load_config_prefixes_every_problem_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nlog_level = "loud"\n[http]\nport = "80"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: daemon.log_level: must be one of debug, info, warning, error (got 'loud')",
        f"{path}: http.port: expected an integer (got a string '80')"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: no such config file"]


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read config file")):
        load_config(tmp_path)


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    # Opening a FIFO for reading blocks until a writer comes: read_toml must not open it.
    # Should it, the writer thread ends the wait (and the message is not this one).
    path = tmp_path / "config.fifo"
    os.mkfifo(path)
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(10.0):
            os.close(os.open(path, os.O_WRONLY))

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConfigError) as info:
            read_toml(path)
    finally:
        done.set()
        thread.join()
    assert info.value.problems == [
        f"{path}: cannot read config file (it is a FIFO, not a regular file)"]


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"),
                                            ("/dev/null", "a character device")])
def test_a_device_is_refused_unread(path: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert info.value.problems == [
        f"{path}: cannot read config file (it is {kind}, not a regular file)"]


def test_a_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "config.toml"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=re.escape(f"{link}: cannot read config file (it is "
                                                    f"a character device")):
        read_toml(link)


def test_a_file_over_the_size_cap_is_refused_and_one_at_the_cap_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * MAX_CONFIG_BYTES + b"\n")
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert info.value.problems == [
        (f"{path}: cannot read config file ({MAX_CONFIG_BYTES + 1} bytes, more than the "
         f"{MAX_CONFIG_BYTES} a config file may have)")]
    path.write_bytes(b"x = 1\n" + b"#" * (MAX_CONFIG_BYTES - 7) + b"\n")
    assert read_toml(path) == {"x": 1}


def test_a_byte_order_mark_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[daemon]\n")
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert info.value.problems == [
        f"{path}: starts with a byte order mark (BOM); save it as UTF-8 without BOM"]


def test_an_integer_too_long_to_read_is_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "long.toml"
    path.write_text("[daemon]\nmax_pending_windows = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert info.value.problems == [
        f"{path}: invalid TOML: an integer of more than {sys.get_int_max_str_digits()} digits"]


def test_a_source_uri_has_a_length_cap() -> None:
    uri = "file:/x.wav?loop=" + "y" * MAX_URI_CHARS
    [problem] = problems_of({"sources": {"a": {"uri": uri}}})
    assert problem.startswith(f"sources.a.uri: must be at most {MAX_URI_CHARS} characters "
                              f"(got 'file:/x.wav?loop=yyy")
    assert len(problem) < 200
    at_cap = parse_config({"sources": {"a": {"uri": "file:/" + "x" * (MAX_URI_CHARS - 6)}}})
    assert len(at_cap.sources["a"].uri) == MAX_URI_CHARS


def test_invalid_toml_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[daemon]\nlog_level = "info"\nlog_format = json\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: invalid TOML: ")
    assert "line 3, column 14" in problem


@pytest.mark.parametrize("text", [
    "x = " + "[" * 5000 + "]" * 5000,
    "x = " + "{a = " * 3000 + "1" + "}" * 3000,
    "[model]\nbundle = " + "[" * 2000 + "]" * 2000,
])
def test_toml_nested_too_deeply_is_one_problem_naming_the_file(tmp_path: Path,
                                                               text: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: invalid TOML: arrays or inline tables nested too deeply to parse"]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[daemon]\nnode_id = "küche"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: not UTF-8 text (byte 21)"]


def test_load_config_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[sources.kitchen]\nuri = "file:/tmp/x.wav?loop=true"\nwindow_s = 20\n'
                    'hop_s = 2.5\n[sinks.ws]\nplugin = "websocket"\ntoken_env = "WS_TOKEN"\n')
    config = load_config(str(path))
    assert config.path == path
    assert config.sources["kitchen"].window_s == 20.0
    assert config.sources["kitchen"].hop_s == 2.5
    assert config.sinks["ws"].options == {"token_env": "WS_TOKEN"}


# --------------------------------------------------------------------------- defaults


def test_default_config() -> None:
    config = default_config()
    assert isinstance(config, Config)
    assert list(config.sources) == ["default"]
    assert config.sources["default"].uri == "mic:default"
    assert config.sources["default"].window_s == 10.0
    assert config.sources["default"].hop_s == 5.0
    assert {n: s.plugin for n, s in config.sinks.items()} == {"live": "websocket"}
    assert config.http == HttpConfig()
    assert config.model == ModelConfig()
    clip = default_config("file:/usr/share/streamcap/example.wav?loop=true")
    assert clip.sources["default"].uri == "file:/usr/share/streamcap/example.wav?loop=true"


def test_shipped_config_is_valid_and_equals_the_defaults() -> None:
    config = load_config(SHIPPED)
    assert dataclasses.replace(config.daemon, node_id="x") == DaemonConfig(node_id="x")
    assert config.model == ModelConfig()
    assert config.http == HttpConfig()
    assert config.history == HistoryOptions()
    src = config.sources["default"]
    assert dataclasses.replace(src, explicit=frozenset()) == SourceConfig(
        name="default", uri="mic:default", capture=MicOptions())


def _documented_keys(text: str) -> dict[str, set[str]]:
    """Keys per table in config.toml, set or commented out (``# key = value``).

    A commented line counts as a key only if it is itself valid TOML
    ``key = value``, so prose such as ``# score = a * b`` is ignored.
    """
    keys: dict[str, set[str]] = {}
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        header = re.fullmatch(r"#?\s*\[([A-Za-z0-9_.-]+)\]", line)
        if header:
            table = header.group(1)
            keys.setdefault(table, set())
            continue
        candidate = line.lstrip("#").strip()
        if "=" not in candidate:
            continue
        try:
            parsed = tomllib.loads(candidate)
        except tomllib.TOMLDecodeError:
            continue
        if len(parsed) == 1 and not isinstance(next(iter(parsed.values())), dict):
            keys.setdefault(table, set()).update(parsed)
    return keys


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_shipped_config_documents_every_dataclass_field() -> None:
    documented = _documented_keys(SHIPPED.read_text(encoding="utf-8"))
    assert documented["daemon"] == _fields(DaemonConfig)
    assert documented["model"] == _fields(ModelConfig) - {"decoding", "abstention"}
    assert documented["model.abstention"] == _fields(AbstentionOptions)
    assert documented["model.decoding"] == _fields(DecodingOptions) - {"explicit"}
    capture = set().union(*(_fields(cls) for cls in SOURCE_OPTIONS.values()))
    assert documented["sources.default"] == (
        _fields(SourceConfig) - {"name", "explicit", "capture"} | capture)
    assert documented["http"] == _fields(HttpConfig)
    assert documented["history"] == _fields(HistoryOptions)
    assert documented["privacy"] == _fields(PrivacyConfig)
    assert "plugin" in documented["sinks.ws"]
    # Only the keys without a fixed default are left commented out.
    active = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    assert _fields(DaemonConfig) - set(active["daemon"]) == {"node_id"}
    # mode, the beam settings and the n-gram block default to the bundle's own choice, so
    # they stay commented.
    assert _fields(DecodingOptions) - set(active["model"]["decoding"]) == {
        "seed", "mode", "num_beams", "beam_max_length", "no_repeat_ngram_size", "explicit"}


def test_documented_keys_parser_ignores_prose() -> None:
    text = '[a]\n# score = w * cosine(x)\nx = 1\n# y = "z"\n#   "mic:3" (device)\n[b.c]\nq = 2\n'
    assert _documented_keys(text) == {"a": {"x", "y"}, "b.c": {"q"}}


def test_check_config_rejects_what_the_decoding_options_reject() -> None:
    assert problems_of({"model": {"decoding": {"encoder_weight": 0, "decoder_weight": 0}}}) == [
        "model.decoding.decoder_weight: encoder_weight and decoder_weight cannot both be 0"]
    assert problems_of({"model": {"decoding": {"min_new_tokens": -1}}}) == [
        "model.decoding.min_new_tokens: must be between 0 and 512 (got -1)"]
    decoding = parse_config({"model": {"decoding": {"no_repeat_ngram_size": 3}}}).model.decoding
    assert decoding.no_repeat_ngram_size == 3 and decoding.explicit == {"no_repeat_ngram_size"}


def test_history_options_are_checked_naming_each_key() -> None:
    config, problems = read_config({"sources": {"a": {"uri": "mic:default"}}, "history": {
        "keep_days": 0, "max_bytes": 1000, "queue_size": 0, "required": "yes",
        "retention_interval_s": -1, "paht": "x"}})
    text = "\n".join(problems)
    for key in ("keep_days", "max_bytes", "queue_size", "required", "retention_interval_s",
                "paht"):
        assert f"history.{key}:" in text
    assert config.history == HistoryOptions()
    ok = parse_config({"sources": {"a": {"uri": "mic:default"}},
                       "history": {"max_bytes": 1048576, "keep_days": 7, "path": "/x/h.db"}})
    assert (ok.history.max_bytes, ok.history.keep_days, ok.history.path) == (1048576, 7.0,
                                                                            "/x/h.db")
