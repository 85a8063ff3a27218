"""Everything ``streamcap run`` checks before it starts anything, shared with ``check-config``.

A config is valid when :mod:`streamcap.config` accepts every key and value
(source URIs and the options in them included) and, in addition, every plugin
it names is installed and accepts its options: each source's
``create_source`` and each sink's ``create_sink`` is called, which validates
without starting anything (no device is opened, no socket bound). Both
commands call :func:`check_config_file`, and the daemon builds its sources and
sinks with :func:`prepare`, so the two cannot drift: ``check-config`` passes
exactly what ``run`` starts with, and both report the same lines.

Problems come all at once, one line each, naming the dotted key
(``sources.kitchen.uri: ...``, ``sinks.live.port: ...``). A missing plugin or
a bad option is a :class:`~streamcap.errors.ConfigError` (exit 2); a plugin
that is installed but broken (fails to import, crashes, breaks the protocol)
is a :class:`~streamcap.errors.PluginError` (exit 1) carrying every line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from streamcap.bus.plugin import LoadedSink, load_sink, load_source_factory
from streamcap.config import Config, SourceConfig, located, read_config, read_toml
from streamcap.errors import ConfigError, PluginError
from streamcap.sources.base import AudioSource, SourceFactory, parse_source_uri


@dataclass(frozen=True, slots=True)
class Prepared:
    """A config's plugins, loaded and configured but not started.

    Attributes:
        sources: For each source, a callable that builds a fresh source (the
            supervisor calls it again on every restart).
        sinks: The configured sinks, by instance name.
    """

    sources: Mapping[str, Callable[[], AudioSource]]
    sinks: Mapping[str, LoadedSink]


def source_options(source: SourceConfig) -> dict[str, object]:
    """The capture options the source table sets, for its factory.

    The table was read with the options type of the URI's kind
    (``source.capture``), so these are exactly that kind's keys. Keys left
    out of the table, and 0 (automatic), are not passed, so options in the
    URI (``file:clip.wav?loop=true``) apply unless the table overrides them.
    """
    return {f.name: value for f in dataclasses.fields(source.capture)
            if f.name in source.explicit and (value := getattr(source.capture, f.name)) is not None}


def prepare(config: Config) -> Prepared:
    """Load and configure every source and sink plugin ``config`` names, starting none.

    Raises:
        ConfigError: every problem, one line each naming its dotted key (and
            the config file, when there is one).
        PluginError: some plugin is installed but broken; every line, the
            configuration problems included.
    """
    prepared, config_problems, plugin_problems = _prepare(config, skip=frozenset())
    _raise(config_problems, plugin_problems, config.path)
    return prepared


def check_config_file(path: str | os.PathLike[str]) -> Config:
    """Read a config file and run every check ``run`` runs before it starts.

    Values, then the plugins of every source and sink table whose values are
    fine, so that one pass reports every problem in the file.

    Raises:
        ConfigError: the file cannot be read or parsed (one line), or every
            problem in it, one line each, prefixed with the path.
        PluginError: as for :func:`prepare`.
    """
    p = Path(path)
    config, problems = read_config(read_toml(p), p)
    _, config_problems, plugin_problems = _prepare(config, skip=_tables_with_problems(problems))
    _raise(problems + config_problems, plugin_problems, p)
    return config


# --------------------------------------------------------------------------- internals


def _prepare(config: Config,
             skip: Collection[str]) -> tuple[Prepared, list[str], list[str]]:
    config_problems: list[str] = []
    plugin_problems: list[str] = []
    sources: dict[str, Callable[[], AudioSource]] = {}
    for name, src in config.sources.items():
        where = f"sources.{name}"
        if where in skip:
            continue
        try:
            sources[name] = _source(name, src)
        except ConfigError as exc:
            config_problems.extend(_keyed(line, where) for line in exc.problems)
        except PluginError as exc:
            plugin_problems.extend(str(exc).splitlines())
    sinks: dict[str, LoadedSink] = {}
    for name, sink in config.sinks.items():
        where = f"sinks.{name}"
        if where in skip:
            continue
        try:
            sinks[name] = load_sink(name, sink.plugin, sink.options)
        except ConfigError as exc:
            config_problems.extend(_keyed(line, where) for line in exc.problems)
        except PluginError as exc:
            plugin_problems.extend(str(exc).splitlines())
    return Prepared(sources=sources, sinks=sinks), config_problems, plugin_problems


def _source(name: str, src: SourceConfig) -> Callable[[], AudioSource]:
    """Load a source's plugin and build it once, which validates its URI and options."""
    key = f"sources.{name}.uri"
    try:
        kind = parse_source_uri(src.uri)[0]
    except ConfigError as exc:
        raise ConfigError([f"{key}: {line}" for line in exc.problems]) from None
    factory = load_source_factory(kind, config_key=key)
    options = source_options(src)
    try:
        factory(name, src.uri, options)
    except (ConfigError, PluginError):
        raise
    except Exception as exc:  # a plugin's own failure, not the config's
        raise PluginError(f"sources.{name}: source plugin {kind!r} failed to create the "
                          f"source: {type(exc).__name__}: {exc}") from exc
    return _bind(factory, name, src.uri, options)


def _bind(factory: SourceFactory, name: str, uri: str,
          options: Mapping[str, object]) -> Callable[[], AudioSource]:
    return lambda: factory(name, uri, options)


def _keyed(line: str, where: str) -> str:
    """``line`` naming ``where`` (a plugin's message may leave its table out)."""
    if line.startswith((f"{where}.", f"{where}:")):
        return line
    return f"{where}: {line}"


def _tables_with_problems(problems: list[str]) -> frozenset[str]:
    """``sources.<name>`` and ``sinks.<name>`` of every table some problem names."""
    tables: set[str] = set()
    for line in problems:
        key = line.split(": ", 1)[0]
        section, _, rest = key.partition(".")
        if section in ("sources", "sinks") and rest:
            tables.add(f"{section}.{rest.split('.', 1)[0]}")
    return frozenset(tables)


def _raise(config_problems: list[str], plugin_problems: list[str], path: Path | None) -> None:
    if plugin_problems:
        raise PluginError("\n".join(located(plugin_problems + config_problems, path)))
    if config_problems:
        raise ConfigError(located(config_problems, path))
