"""Configuration: TOML in, frozen dataclasses out.

Every problem is reported with its dotted key and what was expected, all of
them at once (``ConfigError.problems``). Secrets never live in the file: a
sink names the environment variable that holds its password or token
(``password_env``, ``token_env``) and the value is read when the sink starts.
Nothing after this module sees a raw dict, except a sink plugin's own options,
which the plugin validates.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from streamcap.errors import ConfigError
from streamcap.redact import is_secret_key
from streamcap.sources.base import (
    MAX_BLOCK_S,
    MAX_CHANNELS,
    MAX_SAMPLE_RATE_HZ,
    MIN_BLOCK_S,
    MIN_SAMPLE_RATE_HZ,
    parse_source_options,
    parse_source_uri,
)

MIN_WINDOW_S: Final = 10.0
MAX_WINDOW_S: Final = 30.0
LOG_FORMATS: Final = ("auto", "json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEVICES: Final = ("auto", "cpu", "cuda")
PRECISIONS: Final = ("auto", "fp32", "bf16", "fp16")
DECODING_MODES: Final = ("sample", "beam")
CODEC_PRECISIONS: Final = ("fp32", "model")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Decoding limits: what the decoders can do, and sane bounds for the rest.
MAX_DECODE_TOKENS: Final = 512  # longest caption either decoder may produce
MIN_SAMPLE_TOKENS: Final = 2  # sampling: the forced BOS and EOS
MIN_BEAM_LENGTH: Final = 3  # beam search: decoder start, BOS and EOS
MIN_TEMPERATURE: Final = 0.01  # below, logits / temperature overflows to inf and NaN
MAX_TEMPERATURE: Final = 10.0  # above, sampling is uniform noise
MAX_CANDIDATES: Final = 256
MAX_BEAMS: Final = 64
MAX_SEED: Final = 2**63 - 1
# Bounds of the other durations, in seconds.
MAX_TIMEOUT_S: Final = 3600.0  # stop_timeout_s, stall_s, backoff_initial_s
MAX_BACKOFF_S: Final = 86400.0  # backoff_max_s, backoff_reset_s
MAX_RETRIES: Final = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    node_id: str = field(default_factory=socket.gethostname)
    log_format: str = "auto"  # auto: console on a TTY, JSON lines otherwise
    log_level: str = "info"
    max_pending_windows: int = 4  # windows waiting per source; its oldest is dropped beyond
    drain_on_stop: bool = True  # on shutdown, caption the windows already queued
    stop_timeout_s: float = 10.0  # bound on the whole shutdown (see daemon.StopBudget)
    state_dir: str = ""  # sink state (MQTT outbox); "" = $STATE_DIRECTORY or ~/.local/state/streamcap


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodingConfig:
    mode: str = "sample"  # sample: nucleus sampling + reranking; beam: beam search
    n_candidates: int = 30
    top_p: float = 0.95
    temperature: float = 0.5
    max_new_tokens: int = 30
    no_repeat_ngram_size: int = 0
    encoder_weight: float = 0.7
    decoder_weight: float = 0.3
    fluency_threshold: float = 0.9
    num_beams: int = 4
    beam_max_length: int = 50
    seed: int | None = None
    # Keys the file set; a bundle's own decoding defaults fill the rest.
    explicit: frozenset[str] = field(default=frozenset(), compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    bundle: str = "demo"  # a bundle directory, "demo" (built in) or a preset name
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = all cores
    codec_precision: str = "fp32"  # DAC encoder: fp32 (exact codes) or "model" (follow precision)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    name: str
    uri: str
    window_s: float = 10.0
    hop_s: float = 5.0
    sample_rate_hz: int = 0  # capture rate; 0 = the device's or file's own rate
    channels: int = 0  # capture channels before downmix; 0 = automatic
    block_s: float = 0.1
    realtime: bool = True  # file sources: pace at wall-clock speed
    loop: bool = False  # file sources: start again at the end
    stall_s: float = 5.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    backoff_reset_s: float = 60.0
    max_retries: int = 0  # 0 = retry forever
    # Keys the file set; the source's own defaults (and URI options) fill the rest.
    explicit: frozenset[str] = field(default=frozenset(), compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkConfig:
    name: str
    plugin: str
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    daemon: DaemonConfig
    model: ModelConfig
    sources: Mapping[str, SourceConfig]
    sinks: Mapping[str, SinkConfig]
    http: HttpConfig
    path: Path | None = None


T = TypeVar("T")


class _Reader:
    """Reads typed values out of one TOML table, collecting problems by dotted key."""

    def __init__(self, table: Mapping[str, Any], prefix: str, problems: list[str]) -> None:
        self.table = table
        self.prefix = prefix
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def get(
        self,
        name: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML boolean is never a number here.
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            expected = " or ".join(_type_name(k) for k in kinds)
            self.fail(name, f"expected {expected} (got {_describe(value)})")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(name, f"must be a finite number (got {value!r})")
            return default
        if check is not None and (message := check(value)) is not None:
            self.fail(name, f"{message} (got {_shown(value)})")
            return default
        return value  # type: ignore[no-any-return]

    def subtable(self, name: str) -> Mapping[str, Any]:
        self.seen.add(name)
        value = self.table.get(name, {})
        if not isinstance(value, Mapping):
            self.fail(name, f"expected a table (got {_type_name(type(value))})")
            return {}
        return value

    def reject_unknown(self, allowed_hint: str = "") -> None:
        for name in self.table:
            if name not in self.seen:
                known = ", ".join(sorted(self.seen))
                self.fail(name, f"unknown key (known keys: {known}){allowed_hint}")


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "an array", dict: "a table"}.get(kind, kind.__name__)


MAX_SHOWN: Final = 80


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 3]}..."


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    return f"{_type_name(type(value))} {_shown(value)}"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _positive_up_to(hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if 0 < v <= hi else f"must be > 0 and <= {hi:g}"


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: (None if lo <= v <= hi
                      else f"must be between {_number(lo)} and {_number(hi)}")


def _whole_ms(v: float) -> str | None:
    return None if abs(v * 1000 - round(v * 1000)) < 1e-6 else "must be a whole number of milliseconds"


def _read_daemon(r: _Reader) -> DaemonConfig:
    default = DaemonConfig()
    node_id = r.get("node_id", str, default.node_id,
                    lambda v: None if _NAME_RE.match(v) else
                    "must be 1-64 letters, digits, '-' or '_' (it is used in MQTT topics)")
    return DaemonConfig(
        node_id=node_id,
        log_format=r.get("log_format", str, default.log_format, _one_of(LOG_FORMATS)),
        log_level=r.get("log_level", str, default.log_level, _one_of(LOG_LEVELS)),
        max_pending_windows=r.get("max_pending_windows", int, default.max_pending_windows,
                                  _in_range(1, 1000)),
        drain_on_stop=r.get("drain_on_stop", bool, default.drain_on_stop),
        stop_timeout_s=r.get("stop_timeout_s", float, default.stop_timeout_s,
                             _positive_up_to(MAX_TIMEOUT_S)),
        state_dir=r.get("state_dir", str, default.state_dir),
    )


def _read_decoding(r: _Reader) -> DecodingConfig:
    d = DecodingConfig()
    weight = _in_range(0.0, 1.0)
    seed = r.get("seed", int, -1,
                 lambda v: None if -1 <= v <= MAX_SEED else
                 f"must be >= 0 and <= {MAX_SEED}, or -1 for a fresh random stream")
    before = len(r.problems)
    max_new_tokens = r.get("max_new_tokens", int, d.max_new_tokens,
                           lambda v: None if MIN_SAMPLE_TOKENS <= v <= MAX_DECODE_TOKENS else
                           f"must be between {MIN_SAMPLE_TOKENS} (the forced BOS and EOS) and "
                           f"{MAX_DECODE_TOKENS}")
    tokens_ok = len(r.problems) == before
    no_repeat = r.get("no_repeat_ngram_size", int, d.no_repeat_ngram_size,
                      _in_range(0, MAX_DECODE_TOKENS))
    if tokens_ok and no_repeat > max_new_tokens:
        # An n-gram longer than the longest caption can never repeat.
        r.fail("no_repeat_ngram_size", f"must be 0 (off) or <= max_new_tokens "
                                       f"(got {no_repeat} > {max_new_tokens})")
        no_repeat = d.no_repeat_ngram_size
    return DecodingConfig(
        mode=r.get("mode", str, d.mode, _one_of(DECODING_MODES)),
        n_candidates=r.get("n_candidates", int, d.n_candidates, _in_range(1, MAX_CANDIDATES)),
        top_p=r.get("top_p", float, d.top_p,
                    lambda v: None if 0 < v <= 1 else "must be > 0 and <= 1"),
        temperature=r.get("temperature", float, d.temperature,
                          _in_range(MIN_TEMPERATURE, MAX_TEMPERATURE)),
        max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=no_repeat,
        encoder_weight=r.get("encoder_weight", float, d.encoder_weight, weight),
        decoder_weight=r.get("decoder_weight", float, d.decoder_weight, weight),
        fluency_threshold=r.get("fluency_threshold", float, d.fluency_threshold, weight),
        num_beams=r.get("num_beams", int, d.num_beams, _in_range(1, MAX_BEAMS)),
        beam_max_length=r.get("beam_max_length", int, d.beam_max_length,
                              lambda v: None if MIN_BEAM_LENGTH <= v <= MAX_DECODE_TOKENS else
                              f"must be between {MIN_BEAM_LENGTH} (decoder start, BOS and EOS) "
                              f"and {MAX_DECODE_TOKENS}"),
        seed=None if seed < 0 else seed,
        explicit=frozenset(r.table),
    )


def _read_model(r: _Reader) -> ModelConfig:
    d = ModelConfig()
    dec = _Reader(r.subtable("decoding"), r.key("decoding"), r.problems)
    decoding = _read_decoding(dec)
    dec.reject_unknown()
    return ModelConfig(
        bundle=r.get("bundle", str, d.bundle,
                     lambda v: None if v.strip() else "must name a bundle directory or a preset"),
        device=r.get("device", str, d.device, _one_of(DEVICES)),
        precision=r.get("precision", str, d.precision, _one_of(PRECISIONS)),
        threads=r.get("threads", int, d.threads, _in_range(0, 1024)),
        codec_precision=r.get("codec_precision", str, d.codec_precision,
                              _one_of(CODEC_PRECISIONS)),
        decoding=decoding,
    )


def _read_source(name: str, r: _Reader) -> SourceConfig:
    d = SourceConfig(name=name, uri="")
    uri = r.get("uri", str, "", lambda v: None if v.strip() else "must not be empty")
    if "uri" not in r.table:
        r.fail("uri", "missing: every source needs a uri such as 'mic:default', "
                      "'file:/path/clip.wav?loop=true' or 'rtsp://camera/stream'")
    elif uri:
        for problem in _uri_problems(uri):
            r.fail("uri", problem)
    window_in_range = _in_range(MIN_WINDOW_S, MAX_WINDOW_S)
    before = len(r.problems)
    window_s = r.get("window_s", float, d.window_s,
                     lambda v: window_in_range(v) or _whole_ms(v))
    window_ok = len(r.problems) == before
    hop_s = r.get("hop_s", float, d.hop_s, lambda v: _positive(v) or _whole_ms(v))
    # Compare only with a window_s that was accepted, not with the fallback default.
    if "hop_s" in r.table and window_ok and hop_s > window_s:
        r.fail("hop_s", f"must be > 0 and <= window_s (got {hop_s:g} > {window_s:g})")
    elif "hop_s" not in r.table and hop_s > window_s:
        hop_s = window_s
    before = len(r.problems)
    backoff_initial_s = r.get("backoff_initial_s", float, d.backoff_initial_s,
                              _positive_up_to(MAX_TIMEOUT_S))
    initial_ok = len(r.problems) == before
    backoff_max_s = r.get("backoff_max_s", float, d.backoff_max_s,
                          _positive_up_to(MAX_BACKOFF_S))
    if initial_ok and backoff_max_s < backoff_initial_s:
        r.fail("backoff_max_s", f"must be >= backoff_initial_s "
                                f"(got {backoff_max_s:g} < {backoff_initial_s:g})")
    return SourceConfig(
        name=name,
        uri=uri,
        window_s=window_s,
        hop_s=hop_s,
        sample_rate_hz=r.get("sample_rate_hz", int, d.sample_rate_hz,
                             lambda v: None if v == 0
                             or MIN_SAMPLE_RATE_HZ <= v <= MAX_SAMPLE_RATE_HZ
                             else f"must be 0 (automatic) or between {MIN_SAMPLE_RATE_HZ} "
                                  f"and {MAX_SAMPLE_RATE_HZ}"),
        channels=r.get("channels", int, d.channels, _in_range(0, MAX_CHANNELS)),
        block_s=r.get("block_s", float, d.block_s, _in_range(MIN_BLOCK_S, MAX_BLOCK_S)),
        realtime=r.get("realtime", bool, d.realtime),
        loop=r.get("loop", bool, d.loop),
        stall_s=r.get("stall_s", float, d.stall_s, _positive_up_to(MAX_TIMEOUT_S)),
        backoff_initial_s=backoff_initial_s,
        backoff_max_s=backoff_max_s,
        backoff_reset_s=r.get("backoff_reset_s", float, d.backoff_reset_s,
                              _positive_up_to(MAX_BACKOFF_S)),
        max_retries=r.get("max_retries", int, d.max_retries, _in_range(0, MAX_RETRIES)),
        explicit=frozenset(r.table),
    )


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


def _read_sink(name: str, r: _Reader) -> SinkConfig:
    plugin = r.get("plugin", str, name,
                   lambda v: None if _NAME_RE.match(v) else "must be a plugin name")
    options: dict[str, Any] = {}
    for key, value in r.table.items():
        if key == "plugin":
            continue
        if is_secret_key(key):
            r.fail(key, f"secrets are not read from the config file: put the value in an "
                        f"environment variable and name it with '{key}_env'")
            continue
        if key.endswith("_env") and not (isinstance(value, str) and value):
            r.fail(key, "expected the name of an environment variable")
            continue
        options[key] = value
    return SinkConfig(name=name, plugin=plugin, options=options)


def _read_http(r: _Reader) -> HttpConfig:
    d = HttpConfig()
    return HttpConfig(
        enabled=r.get("enabled", bool, d.enabled),
        host=r.get("host", str, d.host, lambda v: None if v else "must not be empty"),
        port=r.get("port", int, d.port, _in_range(0, 65535)),
    )


def _named_tables(r: _Reader, section: str,
                  read: Callable[[str, _Reader], T]) -> dict[str, T]:
    out: dict[str, T] = {}
    for name, table in r.subtable(section).items():
        key = f"{section}.{name}"
        if not _NAME_RE.match(name):
            r.problems.append(f"{key}: a {section[:-1]} name must be 1-64 letters, digits, "
                              f"'-' or '_'")
            continue
        if not isinstance(table, Mapping):
            r.problems.append(f"{key}: expected a table (got {_type_name(type(table))})")
            continue
        sub = _Reader(table, key, r.problems)
        out[name] = read(name, sub)
        if section == "sources":
            sub.reject_unknown()
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
    problems: list[str] = []
    top = _Reader(data, "", problems)
    sections: dict[str, Any] = {}
    for name, reader_fn in (("daemon", _read_daemon), ("model", _read_model),
                            ("http", _read_http)):
        sub = _Reader(top.subtable(name), name, problems)
        sections[name] = reader_fn(sub)
        sub.reject_unknown()
    sources = _named_tables(top, "sources", _read_source)
    sinks = _named_tables(top, "sinks", _read_sink)
    top.reject_unknown()
    if isinstance(data.get("sources"), Mapping) and not data["sources"]:
        problems.append("sources: at least one [sources.<name>] table is needed")
    config = Config(daemon=sections["daemon"], model=sections["model"], sources=sources,
                    sinks=sinks, http=sections["http"], path=path)
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

    Raises:
        ConfigError: one line naming the file: unreadable, not UTF-8, invalid
            TOML (with line and column) or nested too deeply to parse.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror})") from None
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


def secret_from_env(options: Mapping[str, Any], key: str, where: str) -> str | None:
    """Read the secret named by ``options[f"{key}_env"]`` from the environment.

    Returns None when the option is not set. Raises ConfigError naming the
    option and the variable when the variable is unset or empty.
    """
    env_key = f"{key}_env"
    var = options.get(env_key)
    if var is None:
        return None
    value = os.environ.get(str(var), "")
    if not value:
        raise ConfigError(f"{where}.{env_key}: environment variable {var} is not set or empty")
    return value
