"""Configuration: TOML in, frozen dataclasses out.

Every problem is reported with its dotted key and what was expected, all of
them at once (``ConfigError.problems``). Secrets never live in the file: a
sink names the environment variable that holds its password or token
(``password_env``, ``token_env``) and the value is read when the sink starts.
Nothing after this module sees a raw dict, except a sink plugin's own options,
which the plugin validates. Every table is read by :mod:`streamcap.options`,
from the option declarations on the dataclasses below; a source table's
capture options are those its URI's kind declares (``streamcap.sources.base``).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from streamcap.errors import ConfigError
from streamcap.history.options import HistoryOptions
from streamcap.models.decoding.abstain import AbstentionOptions
from streamcap.models.decoding.options import DecodingOptions
from streamcap.netpolicy import host_names_problem
from streamcap.options import (
    fixed,
    given_keys,
    known_keys,
    open_regular,
    option,
    read,
    secret_in_file,
    toml_key,
    type_name,
)
from streamcap.privacy.options import PrivacyConfig
from streamcap.redact import is_secret_key
from streamcap.sources.base import (
    SOURCE_OPTIONS,
    SourceOptions,
    parse_source_options,
    parse_source_uri,
)
from streamcap.triggers.spec import TriggerPathConfig, TriggerSpec, read_triggers

MIN_WINDOW_S: Final = 10.0
MAX_WINDOW_S: Final = 30.0
LOG_FORMATS: Final = ("auto", "json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEVICES: Final = ("auto", "cpu", "cuda")
PRECISIONS: Final = ("auto", "fp32", "bf16", "fp16", "int8")
CODEC_PRECISIONS: Final = ("fp32", "model")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Bounds of the other durations, in seconds.
MAX_TIMEOUT_S: Final = 3600.0  # stop_timeout_s, stall_s, backoff_initial_s
MAX_BACKOFF_S: Final = 86400.0  # backoff_max_s, backoff_reset_s
MAX_RETRIES: Final = 1_000_000
MAX_URI_CHARS: Final = 4096
"""A source URI longer than this is refused (and never quoted whole in a message)."""
MAX_CONFIG_BYTES: Final = 1024 * 1024
"""A config file larger than this (1 MiB) is refused unread."""
URI_MISSING: Final = ("every source needs a uri such as 'mic:default', "
                      "'file:/path/clip.wav?loop=true' or 'rtsp://camera/stream'")

T = TypeVar("T")


_TOPIC_NAME: Final = "must be 1-64 letters, digits, '-' or '_' (it is used in MQTT topics)"


def _name(v: str) -> str | None:
    return None if _NAME_RE.match(v) else _TOPIC_NAME


def _whole_ms(v: float) -> str | None:
    return None if abs(v * 1000 - round(v * 1000)) < 1e-6 else "must be a whole number of milliseconds"


def _uri_length(v: str) -> str | None:
    return None if len(v) <= MAX_URI_CHARS else f"must be at most {MAX_URI_CHARS} characters"


def _bundle(v: str) -> str | None:
    return None if v.strip() else "must name a bundle directory or a preset"


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    node_id: str = option(default_factory=socket.gethostname, check=_name,
                          help="names this daemon in MQTT topics and hello frames")
    log_format: str = option("auto", choices=LOG_FORMATS,
                             help="auto: console on a TTY, JSON lines otherwise")
    log_level: str = option("info", choices=LOG_LEVELS)
    max_pending_windows: int = option(4, min=1, max=1000,
                                      help="windows waiting per source; that source's "
                                           "oldest is dropped beyond")
    drain_on_stop: bool = option(True, help="on shutdown, caption the windows already queued")
    stop_timeout_s: float = option(10.0, above=0, max=MAX_TIMEOUT_S,
                                   help="bound on the whole shutdown (see "
                                         "daemon.StopBudget)")
    state_dir: str = option("", help='sink state (MQTT outbox); "" = $STATE_DIRECTORY or '
                                     "~/.local/state/streamcap")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    bundle: str = option("demo", check=_bundle,
                         help='a bundle directory, "demo" (built in), a fetched bundle\'s '
                              'name (docs/models-fetch.md) or a preset name')
    device: str = option("auto", choices=DEVICES)
    precision: str = option("auto", choices=PRECISIONS,
                            help="auto: per component by what the CPU/GPU supports; int8: "
                                 "dynamic int8 decoder and text encoders (CPU)")
    threads: int = option(0, min=0, max=1024, help="torch intra-op threads; 0 = all cores")
    codec_precision: str = option("fp32", choices=CODEC_PRECISIONS,
                                  help='DAC encoder: fp32 (exact codes) or "model" '
                                       "(follow precision)")
    batch_max: int = option(8, min=1, max=256,
                            help="windows of distinct sources captioned together; 1 = one at a time")
    batch_wait_ms: int = option(20, min=0, max=1000,
                                help="after a window is taken, how long to wait for windows of "
                                     "other sources to join its batch")
    decoding: DecodingOptions = option(default_factory=DecodingOptions)
    abstention: AbstentionOptions = option(default_factory=AbstentionOptions)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    """A ``[sources.<name>]`` table: how the daemon runs the source, and its capture options.

    The capture options are those of the source kind the URI names
    (:data:`streamcap.sources.base.SOURCE_OPTIONS`): the same declaration
    reads them from this table, from a ``file:`` URI's query, and in the
    source itself.
    """

    name: str = fixed()
    uri: str = option("", required=True, non_empty=True, check=_uri_length, help=URI_MISSING)
    window_s: float = option(10.0, min=MIN_WINDOW_S, max=MAX_WINDOW_S, check=_whole_ms)
    hop_s: float = option(5.0, above=0, check=_whole_ms)
    stall_s: float = option(5.0, above=0, max=MAX_TIMEOUT_S)
    backoff_initial_s: float = option(1.0, above=0, max=MAX_TIMEOUT_S)
    backoff_max_s: float = option(30.0, above=0, max=MAX_BACKOFF_S)
    backoff_reset_s: float = option(60.0, above=0, max=MAX_BACKOFF_S)
    max_retries: int = option(0, min=0, max=MAX_RETRIES, help="0 = retry forever")
    capture: SourceOptions = fixed(default_factory=SourceOptions)
    # Keys the file set; the source's own defaults (and URI options) fill the rest.
    explicit: frozenset[str] = given_keys()

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """hop_s within window_s, backoff_max_s above backoff_initial_s."""
        if not {"hop_s", "window_s"} & set(refused) and self.hop_s > self.window_s:
            yield "hop_s", f"must be > 0 and <= window_s (got {self.hop_s:g} > {self.window_s:g})"
        if (not {"backoff_initial_s", "backoff_max_s"} & set(refused)
                and self.backoff_max_s < self.backoff_initial_s):
            yield "backoff_max_s", (f"must be >= backoff_initial_s "
                                    f"(got {self.backoff_max_s:g} < {self.backoff_initial_s:g})")


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkConfig:
    name: str
    plugin: str
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class _SinkTable:
    plugin: str = option("", check=lambda v: None if _NAME_RE.match(v) else "must be a plugin name")


MAX_HTTP_CONNECTIONS: Final = 65535


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    enabled: bool = True
    host: str = option("127.0.0.1", non_empty=True)
    port: int = option(8080, min=0, max=65535)
    allowed_hosts: tuple[str, ...] = option(
        (), check=host_names_problem,
        help="Host header names answered besides IP literals, localhost and host; "
             "others get 421")
    max_connections: int = option(256, min=1, max=MAX_HTTP_CONNECTIONS,
                                  help="open connections at most; more get 503")
    request_timeout_s: float = option(10.0, above=0, max=MAX_TIMEOUT_S,
                                      help="idle, request head and stalled-write limit")
    token_env: str | None = option(None, secret="the bearer token that changing triggers "
                                                "over HTTP needs (docs/triggers-api.md)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    daemon: DaemonConfig
    model: ModelConfig
    sources: Mapping[str, SourceConfig]
    sinks: Mapping[str, SinkConfig]
    http: HttpConfig
    triggers: Mapping[str, TriggerSpec] = field(default_factory=dict)
    trigger_path: TriggerPathConfig = field(default_factory=TriggerPathConfig)
    history: HistoryOptions = field(default_factory=HistoryOptions)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    path: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Document:
    """The top level of a config file: its sections."""

    daemon: DaemonConfig = option(default_factory=DaemonConfig)
    model: ModelConfig = option(default_factory=ModelConfig)
    http: HttpConfig = option(default_factory=HttpConfig)
    sources: Mapping[str, object] = option(default_factory=dict)
    sinks: Mapping[str, object] = option(default_factory=dict)
    triggers: Mapping[str, object] = option(default_factory=dict)
    trigger_path: TriggerPathConfig = option(default_factory=TriggerPathConfig)
    history: HistoryOptions = option(default_factory=HistoryOptions)
    privacy: PrivacyConfig = option(default_factory=PrivacyConfig)


def _read_source(name: str, table: Mapping[str, Any], where: str,
                 problems: list[str]) -> SourceConfig:
    """A source table: the daemon's keys, then the capture options of its URI's kind."""
    uri = table.get("uri")
    kind = _uri_kind(uri) if isinstance(uri, str) else None
    capture_cls = SOURCE_OPTIONS.get(kind or "", None)
    capture_keys = (known_keys(capture_cls) if capture_cls is not None
                    else frozenset().union(*map(known_keys, SOURCE_OPTIONS.values())))
    got = read(SourceConfig, table, where, also=capture_keys, fixed_values={"name": name})
    problems.extend(got.problems)
    config = got.value
    if isinstance(uri, str) and "uri" not in got.refused:
        problems.extend(f"{where}.uri: {p}" for p in _uri_problems(uri))
    if capture_cls is None:
        return config
    capture = read(capture_cls, {k: v for k, v in table.items() if k in capture_keys}, where)
    problems.extend(capture.problems)
    return replace(config, capture=capture.value)


def _uri_kind(uri: str) -> str | None:
    try:
        return parse_source_uri(uri)[0]
    except ConfigError:
        return None


def _uri_problems(uri: str) -> list[str]:
    """What is wrong with a source URI: its form, and the options in its query.

    The options obey the ranges of the same keys in the table.
    """
    try:
        kind, _target, params = parse_source_uri(uri)
        parse_source_options(kind, {}, params)
    except ConfigError as exc:
        return exc.problems
    return []


def _read_sink(name: str, table: Mapping[str, Any], where: str,
               problems: list[str]) -> SinkConfig:
    """A sink table: ``plugin`` here, the rest for the plugin, minus any secret written in."""
    got = read(_SinkTable, table, where, also=set(table) - {"plugin"})
    problems.extend(got.problems)
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key == "plugin":
            continue
        if is_secret_key(key):
            problems.append(f"{where}.{toml_key(key)}: {secret_in_file(key)}")
            continue
        if key.endswith("_env") and not (isinstance(value, str) and value):
            problems.append(f"{where}.{toml_key(key)}: expected the name of an environment "
                            f"variable")
            continue
        options[key] = value
    plugin = got.value.plugin if "plugin" in table else name
    return SinkConfig(name=name, plugin=plugin, options=options)


def _named_tables(tables: Mapping[str, object], section: str, problems: list[str],
                  read_one: Callable[[str, Mapping[str, Any], str, list[str]], T]) -> dict[str, T]:
    out: dict[str, T] = {}
    for name, table in tables.items():
        key = f"{section}.{toml_key(name)}"
        if not _NAME_RE.match(name):
            problems.append(f"{key}: a {section[:-1]} name must be 1-64 letters, digits, "
                            f"'-' or '_'")
            continue
        if not isinstance(table, Mapping):
            problems.append(f"{key}: expected a table (got {type_name(type(table))})")
            continue
        out[name] = read_one(name, table, key, problems)
    return out


def read_config(data: Mapping[str, Any],
                path: Path | None = None) -> tuple[Config, list[str]]:
    """Validate a parsed TOML document, reading on past every problem.

    Returns:
        The config, with each bad value replaced by its default and each bad
        source or sink table left out, and every problem found, one line each
        naming its dotted key (without the path). Only a config with no
        problems is fit to use; :func:`parse_config` raises instead.
    """
    document = read(_Document, data)
    problems = list(document.problems)
    top = document.value
    sources = _named_tables(top.sources, "sources", problems, _read_source)
    sinks = _named_tables(top.sinks, "sinks", problems, _read_sink)
    if isinstance(data.get("sources"), Mapping) and not data["sources"]:
        problems.append("sources: at least one [sources.<name>] table is needed")
    triggers = read_triggers(top.triggers, set(sources), problems)
    config = Config(daemon=top.daemon, model=top.model, sources=sources, sinks=sinks,
                    http=top.http, triggers=triggers, trigger_path=top.trigger_path,
                    history=top.history, privacy=top.privacy, path=path)
    return config, problems


def located(problems: list[str], path: Path | None) -> list[str]:
    """``problems`` each prefixed with ``"<path>: "`` (unchanged without a path)."""
    return [f"{path}: {p}" for p in problems] if path else list(problems)


def parse_config(data: Mapping[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document.

    Raises:
        ConfigError: with one line per problem, each naming its dotted key.
    """
    config, problems = read_config(data, path)
    if problems:
        raise ConfigError(located(problems, path))
    return config


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML document in a file.

    Only a regular file of at most :data:`MAX_CONFIG_BYTES` is read: a FIFO,
    a device (``/dev/zero``), a socket or a directory is refused before it is
    opened (:func:`streamcap.options.open_regular`), and the size is checked
    once it is open.

    Raises:
        ConfigError: one line naming the file: missing, not a regular file,
            too large, unreadable, not UTF-8, starting with a byte order mark,
            invalid TOML (with line and column) or nested too deeply to parse.
    """
    p = Path(path)
    try:
        fd = open_regular(p, lambda what: ConfigError(
            f"{p}: cannot read config file (it is {what}, not a regular file)"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror})") from None
    try:
        _check_config_size(p, os.fstat(fd).st_size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:  # it grew since the check
        raise ConfigError(f"{p}: cannot read config file (more than the {MAX_CONFIG_BYTES} "
                          f"bytes a config file may have)")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ConfigError(f"{p}: starts with a byte order mark (BOM); save it as UTF-8 "
                          f"without BOM")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(f"{p}: invalid TOML: arrays or inline tables nested too deeply "
                          f"to parse") from None
    except ValueError as exc:
        # An integer of more digits than int() converts (sys.get_int_max_str_digits()).
        what = (f"an integer of more than {sys.get_int_max_str_digits()} digits"
                if "digits" in str(exc) else str(exc))
        raise ConfigError(f"{p}: invalid TOML: {what}") from None


def _check_config_size(p: Path, size: int) -> None:
    """Refuse a file of more than MAX_CONFIG_BYTES."""
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: cannot read config file ({size} bytes, more than the "
                          f"{MAX_CONFIG_BYTES} a config file may have)")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file.

    Raises:
        ConfigError: unreadable file, invalid TOML (with line and column) or bad values.
    """
    return parse_config(read_toml(path), Path(path))


def default_config(source_uri: str | None = None) -> Config:
    """The embedded defaults, used by ``streamcap run`` when no config file is given.

    One source and a WebSocket sink on 127.0.0.1:8765, which feeds the live
    page at http://127.0.0.1:8080/.

    Args:
        source_uri: the capture source; the caller decides (a microphone when
            one exists, else the bundled example clip, looped).
    """
    uri = source_uri or "mic:default"
    return parse_config({"sources": {"default": {"uri": uri}},
                         "sinks": {"live": {"plugin": "websocket"}}})
