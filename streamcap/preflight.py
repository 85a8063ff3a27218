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

The listeners (the HTTP server and every sink that says where it will listen,
:class:`~streamcap.bus.plugin.Listens`) are checked together: two on one port
whose hosts overlap (:func:`hosts_overlap`: the same address, or a wildcard of
the other's family) are refused, naming both keys; port 0 (a free port chosen
at start) never clashes. Each listener bound beyond loopback gets a warning
(:func:`open_bind_warnings`): ``check-config`` prints them and :func:`prepare`
logs them, once each (a WebSocket sink without TLS is warned about here only,
with the TLS advice).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from streamcap.bus.plugin import LoadedSink, load_sink, load_source_factory, sink_listens_on
from streamcap.config import Config, SourceConfig, located, read_config, read_toml
from streamcap.errors import ConfigError, PluginError
from streamcap.logs import get_logger
from streamcap.netpolicy import ip_address, is_loopback, is_wildcard
from streamcap.sources.base import AudioSource, SourceFactory, parse_source_uri

_log = get_logger(__name__)

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
    warnings: tuple[BindWarning, ...] = ()


@dataclass(frozen=True, slots=True)
class Listener:
    """A socket the config asks for: the HTTP server, or a sink clients connect to.

    Attributes:
        key: The table that configures it (``"http"``, ``"sinks.live"``); its
            options are ``<key>.host`` and ``<key>.port``.
        what: What it serves, for messages (``"the HTTP server"``, ``"the websocket sink"``).
        host: The address to bind, as configured.
        port: The port, as configured; 0 = a free port chosen at start.
        token_required: Clients must present a token (None: not applicable).
        tls: It serves TLS.
    """

    key: str
    what: str
    host: str
    port: int
    token_required: bool | None = None
    tls: bool = False


@dataclass(frozen=True, slots=True)
class BindWarning:
    """A listener reachable beyond this machine, and what to do about it."""

    key: str
    host: str
    port: int
    message: str

    def __str__(self) -> str:
        return f"{self.key}.host: {self.message}"


@dataclass(frozen=True, slots=True)
class Checked:
    """A config file that passed every check, with the warnings for it."""

    config: Config
    warnings: tuple[BindWarning, ...]


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

    Logs a warning for each listener bound beyond loopback (:func:`open_bind_warnings`),
    once: the daemon calls this once, before it starts anything.

    Raises:
        ConfigError: every problem, one line each naming its dotted key (and
            the config file, when there is one).
        PluginError: some plugin is installed but broken; every line, the
            configuration problems included.
    """
    prepared, config_problems, plugin_problems = _prepare(config, skip=frozenset())
    _raise(config_problems, plugin_problems, config.path)
    for warning in prepared.warnings:
        _log.warning(warning.message, option=f"{warning.key}.host", host=warning.host,
                     port=warning.port)
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
    return check_config(path).config


def check_config(path: str | os.PathLike[str]) -> Checked:
    """:func:`check_config_file`, with the warnings about listeners open to the network.

    Raises:
        ConfigError, PluginError: as for :func:`check_config_file`.
    """
    p = Path(path)
    config, problems = read_config(read_toml(p), p)
    prepared, config_problems, plugin_problems = _prepare(
        config, skip=_tables_with_problems(problems))
    _raise(problems + config_problems, plugin_problems, p)
    return Checked(config=config, warnings=prepared.warnings)


# --------------------------------------------------------------------------- listeners


_ANY: Final = "*"
"""In a :func:`_binds` pair: every address of that family."""

_LOCALHOST: Final = frozenset({("4", "127.0.0.1"), ("6", "::1")})


def _binds(host: str) -> frozenset[tuple[str, str]]:
    """What binding ``host`` takes, as (family, address) pairs: family ``4`` or ``6``
    (address :data:`_ANY` for the family's wildcard), or ``name`` for a name that is
    not resolved here."""
    address = ip_address(host)
    if address is not None:
        family = str(address.version)
        return frozenset({(family, _ANY if address.is_unspecified else str(address))})
    if is_wildcard(host):  # "" (or "*"): asyncio binds 0.0.0.0 and ::
        return frozenset({("4", _ANY), ("6", _ANY)})
    name = host.strip().rstrip(".").lower()
    return _LOCALHOST if name == "localhost" else frozenset({("name", name)})


def _bind_overlap(a: tuple[str, str], b: tuple[str, str]) -> bool:
    (fa, xa), (fb, xb) = a, b
    if fa == "name" or fb == "name":  # a name may resolve to any address: only a wildcard
        return (fa, xa) == (fb, xb) or xa == _ANY or xb == _ANY  # or itself surely overlaps
    return fa == fb and (xa == xb or _ANY in (xa, xb))


def hosts_overlap(a: str, b: str) -> bool:
    """Whether listeners on hosts ``a`` and ``b`` would take the same port.

    asyncio (and so aiohttp and websockets) binds IPv6 sockets with ``IPV6_V6ONLY``,
    so the address families do not mix: ``0.0.0.0`` takes every IPv4 address and
    ``::`` every IPv6 one, and ``0.0.0.0`` with ``::1`` (or ``::`` with ``127.0.0.1``)
    bind side by side. Overlapping are: the same address, an address and its family's
    wildcard, ``""`` (both wildcards) and anything, ``localhost`` (127.0.0.1 and
    ``::1``) and what overlaps either, and a name not resolved here with itself or
    with a wildcard.
    """
    return any(_bind_overlap(x, y) for x in _binds(a) for y in _binds(b))


def port_clashes(listeners: Iterable[Listener]) -> list[str]:
    """One problem for each listener whose port an earlier one takes already.

    Two listeners clash when their ports are equal and not 0, and their hosts
    overlap (:func:`hosts_overlap`). The line names the later listener's
    ``port`` key and the earlier one's.
    """
    problems: list[str] = []
    seen: list[Listener] = []
    for listener in listeners:
        if listener.port != 0:
            for other in seen:
                if other.port == listener.port and hosts_overlap(other.host, listener.host):
                    problems.append(
                        f"{listener.key}.port: port {listener.port} is taken by "
                        f"{other.key}.port already ({other.what} on {other.host!r}; "
                        f"{listener.what} on {listener.host!r}); give each listener a port "
                        f"of its own")
                    break
        seen.append(listener)
    return problems


def open_bind_warnings(listeners: Iterable[Listener]) -> list[BindWarning]:
    """A warning for each listener bound beyond loopback, saying who can reach what."""
    warnings: list[BindWarning] = []
    for listener in listeners:
        if is_loopback(listener.host):
            continue
        port = f"port {listener.port}" if listener.port else "a port chosen at start"
        where = f"{listener.host!r} is not a loopback address: {listener.what} on {port}"
        if listener.key == "http":
            message = (f"{where} is reachable from the network, so anyone who can reach this "
                       f"machine reads /metrics, /healthz and the live page; bind 127.0.0.1 "
                       f"(the default) behind a reverse proxy that authenticates, or firewall "
                       f"the port")
        elif listener.token_required is False:
            message = (f"{where} is reachable from the network and requires no token, so "
                       f"anyone who can reach this machine receives every caption; set "
                       f"token_env, or bind 127.0.0.1")
        else:
            message = f"{where} is reachable from the network"
            if not listener.tls:
                message += (" without TLS, so the token and every caption cross the network in "
                            "clear text; set tls_cert/tls_key or put a TLS reverse proxy in "
                            "front")
            message += "; firewall the port unless that is intended"
        warnings.append(BindWarning(key=listener.key, host=listener.host, port=listener.port,
                                    message=message))
    return warnings


def config_listeners(config: Config, sinks: Mapping[str, object],
                     skip: Collection[str] = ()) -> list[Listener]:
    """The HTTP server (when enabled) and every sink that says where it will listen."""
    listeners: list[Listener] = []
    if config.http.enabled and "http" not in skip:
        listeners.append(Listener(key="http", what="the HTTP server", host=config.http.host,
                                  port=config.http.port))
    for name, sink in sinks.items():
        endpoint = sink_listens_on(sink)
        if endpoint is not None:
            listeners.append(Listener(key=f"sinks.{name}", what=f"the {endpoint.kind} sink",
                                      host=endpoint.host, port=endpoint.port,
                                      token_required=endpoint.token_required,
                                      tls=endpoint.scheme in ("wss", "https")))
    return listeners


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
    listeners = config_listeners(config, sinks, skip)
    config_problems.extend(port_clashes(listeners))
    prepared = Prepared(sources=sources, sinks=sinks,
                        warnings=tuple(open_bind_warnings(listeners)))
    return prepared, config_problems, plugin_problems


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
    """``sources.<name>``, ``sinks.<name>`` and ``http`` when some problem names them."""
    tables: set[str] = set()
    for line in problems:
        key = line.split(": ", 1)[0]
        section, _, rest = key.partition(".")
        if section in ("sources", "sinks") and rest:
            tables.add(f"{section}.{rest.split('.', 1)[0]}")
        elif section == "http":
            tables.add("http")
    return frozenset(tables)


def _raise(config_problems: list[str], plugin_problems: list[str], path: Path | None) -> None:
    if plugin_problems:
        raise PluginError("\n".join(located(plugin_problems + config_problems, path)))
    if config_problems:
        raise ConfigError(located(config_problems, path))
