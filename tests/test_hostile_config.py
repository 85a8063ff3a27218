"""Hostile config files through the real ``streamcap check-config`` and ``streamcap run``.

A seeded, bounded spread of malformed configs, generated from the option
declarations of every table (daemon, model, model.decoding, http, each kind of
source, the built-in sinks and the bus's own sink keys): wrong types, NaN and
infinities, huge and negative numbers, empty and huge strings, control
characters, unknown keys, secrets written in, tables that are not tables, bad
table and plugin names, hostile URI options; then files that are not TOML at
all (binary junk, non-UTF-8, a BOM, duplicate keys, deep nesting, a number too
long to read, 2 MB), paths that are not files (a FIFO, /dev/zero, a
directory), and listeners that share a port.

Every one must end with exit status 2 and ``streamcap: error:`` lines only,
each naming the file, one of them the key at fault, and never a traceback. The
spread runs in-process through :func:`streamcap.cli.main` (both commands); a
sample runs through the real console script.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import subprocess
import threading
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from daemon_process import streamcap_command
from timing import scaled

from streamcap.bus import plugin
from streamcap.bus.plugin import BusOptions
from streamcap.cli import main
from streamcap.config import DaemonConfig, HttpConfig, ModelConfig, SourceConfig
from streamcap.models.decoding.options import DecodingOptions
from streamcap.options import METADATA_KEY, Option
from streamcap.sinks.mqtt_options import MqttOptions
from streamcap.sinks.websocket import WebSocketOptions
from streamcap.sources.base import FileOptions, MicOptions, StreamOptions

SEED = 11
UNSET_VAR = "STREAMCAP_HOSTILE_UNSET"
ERROR = "streamcap: error: "

# A valid config touching every table; each case changes one thing in it.
BASE: dict[str, Any] = {
    "daemon": {"node_id": "fuzz"},
    "model": {"bundle": "tiny", "decoding": {"n_candidates": 8}},
    "http": {"port": 0},
    "sources": {
        "mic": {"uri": "mic:default"},
        "clip": {"uri": "file:/nonexistent/clip.wav"},
        "cam": {"uri": "rtsp://camera.invalid/stream"},
    },
    "sinks": {
        "live": {"plugin": "websocket", "port": 0},
        "broker": {"plugin": "mqtt", "host": "127.0.0.1"},
    },
}

# (dotted table, options dataclass) for every table a case may break.
TABLES: list[tuple[str, type]] = [
    ("daemon", DaemonConfig), ("model", ModelConfig), ("model.decoding", DecodingOptions),
    ("http", HttpConfig),
    ("sources.mic", SourceConfig), ("sources.mic", MicOptions),
    ("sources.clip", SourceConfig), ("sources.clip", FileOptions),
    ("sources.cam", SourceConfig), ("sources.cam", StreamOptions),
    ("sinks.live", WebSocketOptions), ("sinks.live", BusOptions),
    ("sinks.broker", MqttOptions), ("sinks.broker", BusOptions),
]
SINK_BUS_KEYS = {"accepts"}  # declared by the sink and by the bus: read by both


# --------------------------------------------------------------------------- TOML


def toml_value(value: object) -> str:
    """``value`` written as TOML (strings escaped, so that any text can be a value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_document(doc: dict[str, Any]) -> str:
    """``doc`` as TOML: every table a ``[header]`` (the same document as inline tables)."""
    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any]) -> None:
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        if prefix and (len(subs) < len(body) or not subs):
            lines.append(f"[{prefix}]")
        lines.extend(f"{toml_string(k)} = {toml_value(v)}" for k, v in body.items()
                     if k not in subs)
        for k, v in subs.items():
            table(f"{prefix}.{toml_string(k)}" if prefix else toml_string(k), v)

    table("", doc)
    return "\n".join(lines) + "\n"


def with_value(dotted: str, key: str, value: object) -> dict[str, Any]:
    """BASE with ``<dotted>.<key> = value``."""
    doc = _copy(BASE)
    node = doc
    for part in dotted.split("."):
        node = node[part]
    node[key] = value
    return doc


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in doc.items()}


# --------------------------------------------------------------------------- cases

URIS: dict[str, str] = {
    "empty": "", "blank": "   ", "unknown-scheme": "nope:x", "no-device": "mic:",
    "no-file": "file:", "remote-file": "file://evil.example/x.wav", "no-url": "rtsp:",
    "half-url": "http:/x", "huge": "x" * 100_000, "nul": "\u0000",
    "escape": "\u001b[2J\u001b]0;title\u0007", "loop-maybe": "file:/x.wav?loop=maybe",
    "block-nan": "file:/x.wav?block_s=nan", "block-inf": "file:/x.wav?block_s=inf",
    "block-overflow": "file:/x.wav?block_s=1e400", "block-negative": "file:/x.wav?block_s=-1",
    "rate-5000-digits": f"file:/x.wav?sample_rate_hz={'9' * 5000}",
    "unknown-option": "file:/x.wav?nope=1", "realtime-2": "file:/x.wav?realtime=2",
    "empty-ffmpeg": "file:/x.wav?ffmpeg=", "huge-option": f"file:/x.wav?loop={'y' * 100_000}",
}


@dataclass(frozen=True)
class Case:
    """One hostile config: its text (or bytes) and the key its error must name."""

    name: str
    data: bytes
    key: str | None  # None: a file-level problem (the line names the file only)


def _kind(hint: object) -> tuple[object, bool]:
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def bad_values(kind: object, spec: Option, rnd: random.Random) -> list[object]:
    """Values a field of ``kind`` under ``spec`` refuses, by construction."""
    origin = typing.get_origin(kind)
    huge = "x" * 100_000
    if dataclasses.is_dataclass(kind) or origin is Mapping:
        return [1, "table", [1, 2], True]
    if origin in (tuple, frozenset):
        values: list[object] = ["one", 1, {"a": 1}, [1, 2], [[["deep"]]]]
        if spec.choices is not None:
            values.append(["nope\u0000", huge])
        return values
    if kind is bool:
        return ["true", 1, 0, 1.0, [], {}, "yes\u001b[31m"]
    if kind is int:
        values = ["4", 1.5, True, math.nan, math.inf, -math.inf, [1], {"a": 1}, "9" * 5000]
        if spec.max is not None:
            values += [int(spec.max) + 1, 2**63, 2**64 + rnd.randrange(1000), int("9" * 4000)]
        if spec.min is not None:
            values += [int(spec.min) - 1, -(2**63) - 1]
        if spec.check is not None:  # decoding options: bounded on both sides
            values += [2**64, -(2**63) - 1]
        return values
    if kind is float:
        values = ["0.5", "inf", True, math.nan, math.inf, -math.inf, [0.5], {"a": 1.0}]
        if spec.max is not None:
            values += [spec.max * 2 + 1, 1e308, 2**1100]
        if spec.min is not None:
            values += [spec.min - 1.0, -1e308]
        if spec.above is not None:
            values += [spec.above, -1e308]
        if spec.check is not None:
            values += [1e308, -1e308]
        return values
    if kind is str or kind is Path or origin is Literal:
        values = [1, 2.5, True, ["a"], {"a": "b"}, math.nan]
        if spec.choices is not None or origin is Literal:
            values += ["", "nope", huge, "\u0000\u001b[2J", "\udcff".encode(
                "utf-8", "surrogateescape").decode("latin-1")]
        if spec.non_empty:
            values += ["", "   "]
        if spec.secret is not None:
            values += ["", UNSET_VAR]
        return values
    raise AssertionError(f"no bad values for {kind!r}")


def field_cases(rnd: random.Random) -> list[Case]:
    """Every field of every table, with one or two of its bad values (seeded)."""
    cases: list[Case] = []
    for dotted, cls in TABLES:
        hints = typing.get_type_hints(cls)
        for fld in dataclasses.fields(cls):
            spec = fld.metadata.get(METADATA_KEY) or Option()
            if not fld.init or not spec.read:
                continue
            if cls is BusOptions and fld.name in SINK_BUS_KEYS:
                continue
            kind, _ = _kind(hints[fld.name])
            values = bad_values(kind, spec, rnd)
            for value in rnd.sample(values, min(2, len(values))):
                text = toml_document(with_value(dotted, fld.name, value))
                cases.append(Case(f"{dotted}.{fld.name}={_short(value)}", text.encode(),
                                  f"{dotted}.{fld.name}"))
    return cases


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<huge int>"
    return text if len(text) <= 24 else text[:21] + "..."


def structure_cases(rnd: random.Random) -> list[Case]:
    """Unknown keys, secrets written in, tables that are not tables, bad names, URIs."""
    cases: list[Case] = []

    def add(name: str, doc: dict[str, Any], key: str) -> None:
        cases.append(Case(name, toml_document(doc).encode(), key))

    for dotted in ("daemon", "model", "model.decoding", "http", "sources.mic", "sources.clip",
                   "sources.cam", "sinks.live", "sinks.broker"):
        add(f"{dotted}-unknown", with_value(dotted, "bogus_key", 1), f"{dotted}.bogus_key")
        junk = "".join(chr(rnd.randrange(1, 0x3000)) for _ in range(12))
        add(f"{dotted}-junk-key", with_value(dotted, junk, "x"), f"{dotted}.\"")
        add(f"{dotted}-long-key", with_value(dotted, "k" * 20_000, 1), f"{dotted}.kkk")
        add(f"{dotted}-escape-key", with_value(dotted, "\u001b[2J\r\n", 1), f'{dotted}."\\u001b')
    add("ws-token-in-file", with_value("sinks.live", "token", "hunter2"), "sinks.live.token")
    add("mqtt-password-in-file", with_value("sinks.broker", "password", "hunter2"),
        "sinks.broker.password")
    for section in ("daemon", "model", "http", "sources", "sinks"):
        doc = _copy(BASE)
        doc[section] = rnd.choice([1, "x", [1], 2.5, True])
        add(f"{section}-not-a-table", doc, section)
    for dotted in ("sources.mic", "sinks.live", "model.decoding"):
        section, _, name = dotted.partition(".")
        doc = _copy(BASE)
        doc[section][name] = rnd.choice([1, "x", [1]])
        add(f"{dotted}-not-a-table", doc, dotted)
    for section, table in (("sources", {"uri": "mic:default"}),
                           ("sinks", {"plugin": "websocket", "port": 0})):
        for bad in ("", "a b", "x" * 65, "\u001b[31m", "../etc"):
            doc = _copy(BASE)
            doc[section] = {bad: table}
            add(f"{section}-name-{_short(bad)}", doc, f"{section}.")
    for name in ("nope", "", 1, "../evil", "x" * 65, ["websocket"]):
        add(f"plugin-{_short(name)}", with_value("sinks.live", "plugin", name),
            "sinks.live.plugin")
    doc = _copy(BASE)
    doc["sinks"]["nope"] = {}
    add("plugin-by-table-name", doc, "sinks.nope.plugin")
    doc = _copy(BASE)
    doc["sources"] = {}
    add("no-sources", doc, "sources")
    for label, uri in URIS.items():
        add(f"uri-{label}", with_value("sources.clip", "uri", uri), "sources.clip.uri")
    doc = _copy(BASE)
    doc["sinks"]["second"] = {"plugin": "websocket", "port": 18765}
    doc["http"]["port"] = 18765
    add("port-clash-http", doc, "sinks.second.port")
    doc = _copy(BASE)
    doc["sinks"]["a"] = {"plugin": "websocket", "port": 18766, "host": "::1"}
    doc["sinks"]["b"] = {"plugin": "websocket", "port": 18766, "host": "::1"}
    add("port-clash-sinks", doc, "sinks.b.port")
    return cases


def file_cases(rnd: random.Random) -> list[Case]:
    """Files that are not TOML, or not text: the line names the file."""
    valid = toml_document(BASE).encode()
    junk = bytes(rnd.randrange(256) for _ in range(4096))
    return [
        Case("binary-junk", junk, None),
        Case("nul-bytes", b"\x00" * 100, None),
        Case("not-utf8", valid.replace(b'"fuzz"', b'"f\xfczz"'), None),
        Case("bom", b"\xef\xbb\xbf" + valid, None),
        Case("utf16", valid.decode().encode("utf-16"), None),
        Case("duplicate-key", valid + b'[daemon]\nnode_id = "again"\n', None),
        Case("duplicate-value", b'[daemon]\nnode_id = "a"\nnode_id = "b"\n', None),
        Case("truncated", valid[: len(valid) // 2] + b'"\n', None),
        Case("deep-arrays", b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", None),
        Case("deep-tables", b"x = " + b"{a = " * 3000 + b"1" + b"}" * 3000 + b"\n", None),
        Case("long-integer", b"[daemon]\nmax_pending_windows = " + b"9" * 5000 + b"\n", None),
        Case("two-megabytes", b"# " + b"x" * (2 * 1024 * 1024) + b"\n", None),
    ]


def all_cases() -> list[Case]:
    rnd = random.Random(SEED)
    return field_cases(rnd) + structure_cases(rnd) + file_cases(rnd)


CASES = all_cases()


# --------------------------------------------------------------------------- checks


def check_lines(stderr: str, path: Path, case: Case) -> None:
    """Only error lines, each naming the file; one naming the key; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert lines, f"{case.name}: no message"
    assert all(line.startswith(f"{ERROR}{path}: ") for line in lines), (case.name, lines)
    if case.key is not None:
        keys = [line[len(f"{ERROR}{path}: "):] for line in lines]
        assert any(k.startswith(case.key) for k in keys), (case.name, case.key, lines)
    assert all(len(line) < 6000 for line in lines), (case.name, max(map(len, lines)))


@pytest.fixture(autouse=True)
def _no_secret_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)


def test_the_spread_is_wide_and_bounded() -> None:
    assert 250 <= len(CASES) <= 400
    assert len({c.name for c in CASES}) == len(CASES)


def test_the_base_config_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each case breaks exactly one thing of a file that passes."""
    path = tmp_path / "base.toml"
    path.write_text(toml_document(BASE), encoding="utf-8")
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


def test_every_hostile_config_exits_2_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The real entry points, discovered once for the whole spread instead of once per
    # table and case (a scan of every installed distribution, and its metadata, each time).
    monkeypatch.setattr(plugin, "_entry_points", functools.cache(plugin._entry_points))
    monkeypatch.setattr(plugin, "_info", functools.cache(plugin._info))
    failures: list[str] = []
    for number, case in enumerate(CASES):
        path = tmp_path / f"case{number}.toml"
        path.write_bytes(case.data)
        for argv in (["check-config", str(path)], ["run", "--config", str(path)]):
            try:
                code = main(argv)
            except BaseException as exc:  # noqa: BLE001 - a case must never escape main
                failures.append(f"{case.name}: {argv[0]} raised {type(exc).__name__}: {exc}")
                break
            err = capsys.readouterr().err
            if code != 2:
                failures.append(f"{case.name}: {argv[0]} exited {code}: {err[:300]}")
                break  # never `run` a config check-config let through
            try:
                check_lines(err, path, case)
            except AssertionError as exc:
                failures.append(f"{case.name}: {argv[0]}: {str(exc)[:400]}")
        path.unlink()
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- not files


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "config.fifo"
    os.mkfifo(path)
    yield path


class FifoUnblocker:
    """Opens a FIFO for writing after a while, so that a reader stuck in open() gets EOF:
    a test of a command that must not open the FIFO fails instead of hanging."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = threading.Event()
        self.had_to_unblock = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.done.wait(scaled(10)):
            return
        self.had_to_unblock = True
        while not self.done.wait(0.1):  # every reader that comes, until the command returns
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader right now
                pass

    def stop(self) -> bool:
        """Whether a reader had to be unblocked."""
        self.done.set()
        self.thread.join()
        return self.had_to_unblock


@pytest.mark.parametrize("which", ["fifo", "dev-zero", "directory", "symlink-to-dev-zero"])
def test_paths_that_are_not_regular_files_are_refused_unread(
        which: str, fifo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = {"fifo": fifo, "dev-zero": Path("/dev/zero"), "directory": tmp_path,
            "symlink-to-dev-zero": tmp_path / "link.toml"}[which]
    if which == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    kind = {"fifo": "a FIFO", "directory": "a directory"}.get(which, "a character device")
    for argv in (["check-config", str(path)], ["run", "--config", str(path)],
                 ["plugins", "--config", str(path)]):
        unblocker = FifoUnblocker(fifo)
        code = main(argv)
        assert not unblocker.stop(), f"{argv[0]} opened the FIFO and blocked"
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.splitlines() == [
            f"{ERROR}{path}: cannot read config file (it is {kind}, not a regular file)"], err


@pytest.mark.parametrize(("table", "keys"), [
    ("sinks.live", ("tls_cert", "tls_key")),
    ("sinks.broker", ("ca_file", "cert_file", "key_file")),
])
@pytest.mark.parametrize("which", ["fifo", "dev-zero"])
def test_files_the_config_names_are_refused_unless_regular(
        table: str, keys: tuple[str, ...], which: str, fifo: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Certificates and keys are read whole: a FIFO would block check-config, a device
    never end. Each is refused, naming its key, before anything opens it."""
    target = str(fifo) if which == "fifo" else "/dev/zero"
    doc = _copy(BASE)
    section, _, name = table.partition(".")
    doc[section][name].update({key: target for key in keys})
    if table == "sinks.broker":
        doc[section][name]["tls"] = True
    path = tmp_path / "files.toml"
    path.write_text(toml_document(doc), encoding="utf-8")
    unblocker = FifoUnblocker(fifo)
    code = main(["check-config", str(path)])
    assert not unblocker.stop(), "check-config opened the FIFO and blocked"
    err = capsys.readouterr().err
    assert code == 2, err
    named = {line.split(": ")[3] for line in err.splitlines()}
    assert named == {f"{table}.{key}" for key in keys}, err
    assert "Traceback" not in err


def test_a_config_file_over_the_size_cap_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamcap.config import MAX_CONFIG_BYTES

    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        (f"{ERROR}{path}: cannot read config file ({MAX_CONFIG_BYTES + 1} bytes, more than the "
         f"{MAX_CONFIG_BYTES} a config file may have)")]
    # At the cap, a valid file is read.
    body = toml_document(BASE).encode()
    path.write_bytes(body + b"#" * (MAX_CONFIG_BYTES - len(body) - 1) + b"\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- real processes


# Through the real console script: `run` imports the whole pipeline, so fewer of those.
SAMPLE = [("port-clash-http", True), ("uri-rate-5000-digits", False), ("binary-junk", True),
          ("plugin-'nope'", False), ("long-integer", False), ("sinks.live-escape-key", False)]


@pytest.mark.parametrize(("name", "also_run"), SAMPLE, ids=[n for n, _ in SAMPLE])
def test_the_console_script_says_the_same(name: str, also_run: bool, tmp_path: Path) -> None:
    [case] = [c for c in CASES if c.name == name]
    path = tmp_path / "hostile.toml"
    path.write_bytes(case.data)
    env = {k: v for k, v in os.environ.items() if k != UNSET_VAR}
    commands = [["check-config", str(path)]] + ([["run", "--config", str(path)]] if also_run
                                                 else [])
    for command in commands:
        done = subprocess.run([*streamcap_command(), *command], capture_output=True, text=True,
                              timeout=scaled(120), check=False, env=env)
        assert done.returncode == 2, done.stderr
        check_lines(done.stderr, path, case)


def test_the_console_script_refuses_a_fifo_without_hanging(fifo: Path) -> None:
    done = subprocess.run([*streamcap_command(), "check-config", str(fifo)],
                          capture_output=True, text=True, timeout=scaled(60), check=False)
    assert done.returncode == 2
    assert done.stderr == f"{ERROR}{fifo}: cannot read config file (it is a FIFO, not a " \
                          f"regular file)\n"
