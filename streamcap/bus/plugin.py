"""The plugin interface: the Sink protocol, its context, and entry-point loading.

Sinks and sources are found through entry points, built-ins exactly like
third-party plugins::

    [project.entry-points."streamcap.sinks"]
    websocket = "streamcap.sinks.websocket:create_sink"

A sink entry point is a factory ``create_sink(instance, options) -> Sink``
that validates its own options (raising :class:`~streamcap.errors.ConfigError`
naming ``sinks.<instance>.<key>``): it declares them as an options dataclass
(:mod:`streamcap.options`) and reads them with :func:`read_sink_options`, so
that every sink reports problems in the same words. It must not start anything (no sockets,
threads or tasks: that is ``run``'s business), because ``streamcap
check-config`` calls it too, to validate a config, and then drops the sink.
The same holds for a source's ``create_source``. Only the plugins named in
the config are loaded: nothing is imported for an entry point that no
``[sinks.*]`` table names.

A sink that clients connect to (the WebSocket sink) also has an ``endpoint``
property (:class:`ServesClients`) saying where, as a :class:`SinkEndpoint`;
the daemon learns about sinks through that seam only (the live page's
``/config.json``). Such a sink also says where it *will* listen, before it
starts, with ``configured_endpoint`` (:class:`Listens`): the preflight checks
refuse two listeners on one port and warn about those open to the network.

Two options every sink table may carry are handled by the bus:

* ``accepts``: the message kinds this instance receives, a subset of what the
  sink supports. The bus validates it and delivers only those kinds. The
  factory sees it too, so that a sink can narrow its own ``accepts`` and
  advertise the right kinds (a WebSocket hello, say); a factory must not
  reject it, and may ignore it.
* ``queue_size``: its inbox's ``max_pending``. Taken out of the table before
  the factory sees it.
* ``publish``: ``"every"`` (the default) captioned window, or only the
  ``"change"``s (:mod:`streamcap.bus.change`), with ``heartbeat_s`` and
  ``change_distance`` (both only with ``"change"``). Taken out of the table before
  the factory sees them; status and trigger messages are always delivered.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, cast, runtime_checkable

import structlog

from streamcap.bus.change import (
    DEFAULT_CHANGE_DISTANCE,
    DEFAULT_HEARTBEAT_S,
    MAX_HEARTBEAT_S,
    ChangeRule,
    PublishMode,
    recalled_changes,
)
from streamcap.bus.inbox import DEFAULT_MAX_PENDING, Inbox
from streamcap.bus.wire import KINDS
from streamcap.errors import ConfigError, PluginError
from streamcap.messages import Published, new_run_id
from streamcap.options import Read, given_keys, option, read
from streamcap.stats import Metrics

if TYPE_CHECKING:
    from streamcap.sources.base import SourceFactory
    from streamcap.triggers.spec import TriggerSpec

SINKS_GROUP: Final = "streamcap.sinks"
SOURCES_GROUP: Final = "streamcap.sources"
BUS_OPTIONS: Final = frozenset({"accepts", "queue_size", "publish", "heartbeat_s",
                                "change_distance"})
"""Sink options handled by the bus (every sink table may carry them)."""
BUS_ONLY_OPTIONS: Final = frozenset({"queue_size", "publish", "heartbeat_s", "change_distance"})
"""Sink options the plugin's factory never sees."""
MAX_QUEUE_SIZE: Final = 100_000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What the bus gives a sink for one run.

    Attributes:
        instance: The ``[sinks.<instance>]`` table name.
        node_id: The daemon's node id (topics, hello frames).
        metrics: The daemon's metrics registry, for the sink's own series.
        ready: Call once listening or connected the first time; the daemon's
            systemd READY=1 waits for every sink. Calling it again is harmless.
        logger: A logger bound with ``sink=<instance>``.
        state_dir: A writable directory of this sink's own (an outbox, say);
            it exists when ``run`` starts and survives restarts.
        run_id: The daemon run's id, fresh and random at each start (hello
            frames); it is also part of every window id.
    """

    instance: str
    node_id: str
    metrics: Metrics
    ready: Callable[[], None]
    logger: structlog.stdlib.BoundLogger
    state_dir: Path
    run_id: str = field(default_factory=new_run_id)


@runtime_checkable
class Sink(Protocol):
    """A bus subscriber that owns its connections for the whole of ``run``."""

    accepts: frozenset[str]
    """The kinds it can take: a subset of ``{"caption", "embedding", "status"}``."""

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        """Consume messages until the inbox closes, then flush and return.

        ``InboxClosed`` from ``inbox.get()`` (or the end of ``async for msg in
        inbox``) means shutdown. Reconnecting is the sink's business. Raising
        ends this run: the bus logs it once and restarts the sink with
        jittered, capped backoff, on the same inbox. Cancellation means the
        shutdown timeout passed.
        """
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkEndpoint:
    """Where clients reach a sink that serves them, e.g. a WebSocket server.

    Attributes:
        kind: What is served there (``"websocket"``).
        host: The address it listens on, as configured (``"0.0.0.0"`` for every one).
        port: The TCP port actually bound (also with ``port = 0``).
        scheme: The URL scheme clients use (``"ws"`` or ``"wss"``).
        token_required: Clients must present a bearer token.
    """

    kind: str
    host: str
    port: int
    scheme: str
    token_required: bool


@runtime_checkable
class ServesClients(Protocol):
    """A sink that clients connect to; optional on top of :class:`Sink`."""

    @property
    def endpoint(self) -> SinkEndpoint | None:
        """Where it listens; None until it does (before ``run``, or between restarts)."""
        ...


def sink_endpoint(sink: object) -> SinkEndpoint | None:
    """``sink``'s :class:`SinkEndpoint`, None for a sink that serves no clients or is not
    listening (yet)."""
    return sink.endpoint if isinstance(sink, ServesClients) else None


@runtime_checkable
class Listens(Protocol):
    """A sink that will listen for clients, saying where before it starts; optional.

    ``streamcap check-config`` and ``run`` read it before anything starts, to
    refuse two listeners on one port and to warn about listeners reachable
    from the network (:mod:`streamcap.preflight`).
    """

    @property
    def configured_endpoint(self) -> SinkEndpoint | None:
        """Where it will listen, as configured: ``port`` 0 means a free port chosen at start."""
        ...


def sink_listens_on(sink: object) -> SinkEndpoint | None:
    """``sink``'s configured :class:`SinkEndpoint`, None for a sink that listens for nobody."""
    found = sink.configured_endpoint if isinstance(sink, Listens) else None
    return found if isinstance(found, SinkEndpoint) else None


@runtime_checkable
class FollowsTriggers(Protocol):
    """A sink that keeps state per (source, trigger) pair; optional on top of :class:`Sink`.

    The daemon calls ``triggers_changed`` on the event loop with the full live
    set of triggers, once at start and after every change at run time, so
    that the sink can drop what it holds for a trigger that is gone (retained
    topics, Home Assistant entities, replayed frames).
    """

    def triggers_changed(self, specs: Mapping[str, TriggerSpec]) -> None:
        """The live set of triggers is now ``specs``."""
        ...


def tell_triggers(sink: object, specs: Mapping[str, TriggerSpec]) -> None:
    """Pass the live set of triggers to ``sink`` if it follows them; else nothing."""
    if isinstance(sink, FollowsTriggers):
        sink.triggers_changed(specs)


RecentHistory = Callable[[int, bool], Sequence[Published]]
"""``recent(limit, per_source)``: the newest ``limit`` captions from the history store
(each source's newest ``limit`` when ``per_source``) with the trigger events of the
same period, oldest first."""


@runtime_checkable
class RecallsHistory(Protocol):
    """A sink that replays recent messages to new clients; optional on top of :class:`Sink`.

    The daemon calls ``recall`` once, before the sink's first ``run``, when a history
    store is open, so that what clients get after a restart does not start empty. It
    calls it on a worker thread (``recent`` reads the store) while the event loop
    waits for it and before any sink runs: ``recall`` only stores what it is given.
    """

    def recall(self, recent: RecentHistory) -> None:
        """Seed what the sink replays from ``recent`` (cheap: a few rows, read at once)."""
        ...


def recall_history(sink: object, recent: RecentHistory) -> None:
    """Let ``sink`` seed its replay from the history if it replays; else nothing."""
    if isinstance(sink, RecallsHistory):
        sink.recall(recent)


class SinkFactory(Protocol):
    """The signature of every ``streamcap.sinks`` entry point."""

    def __call__(self, instance: str, options: Mapping[str, object]) -> Sink: ...


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One installed entry point, for ``streamcap plugins`` and error messages."""

    group: str
    name: str
    value: str  # "module:attribute"
    distribution: str  # "" when unknown
    version: str  # "" when unknown

    def describe(self) -> str:
        """``"<value> from <distribution> <version>"``."""
        origin = f"{self.distribution} {self.version}".strip() or "an unknown distribution"
        return f"{self.value} from {origin}"


class LoadedSink:
    """A sink plugin as configured: the plugin's sink plus what the bus handles.

    Satisfies :class:`Sink`; ``accepts`` is the configured subset.

    Attributes:
        instance: The config table name.
        sink: The object the plugin's factory returned.
        accepts: The kinds this instance receives.
        queue_size: Its inbox's ``max_pending``.
        plugin: The entry point it came from.
        change: Its change-only rule (``publish = "change"``); None publishes every window.
    """

    def __init__(self, *, instance: str, sink: Sink, accepts: frozenset[str],
                 queue_size: int, plugin: PluginInfo, change: ChangeRule | None = None) -> None:
        self.instance = instance
        self.sink = sink
        self.accepts = accepts
        self.queue_size = queue_size
        self.plugin = plugin
        self.change = change

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        """Run the plugin's sink."""
        await self.sink.run(inbox, ctx)

    @property
    def endpoint(self) -> SinkEndpoint | None:
        """The plugin's sink's endpoint (see :class:`ServesClients`)."""
        return sink_endpoint(self.sink)

    @property
    def configured_endpoint(self) -> SinkEndpoint | None:
        """Where the plugin's sink will listen (see :class:`Listens`), None if nowhere."""
        return sink_listens_on(self.sink)

    def triggers_changed(self, specs: Mapping[str, TriggerSpec]) -> None:
        """Passed on to the plugin's sink if it follows triggers (:class:`FollowsTriggers`)."""
        tell_triggers(self.sink, specs)

    def recall(self, recent: RecentHistory) -> None:
        """Passed on to the plugin's sink if it replays history (:class:`RecallsHistory`);
        with ``publish = "change"``, only the recalled captions the change rule admits."""
        rule = self.change
        if rule is None:
            recall_history(self.sink, recent)
            return

        def changes(limit: int, per_source: bool) -> Sequence[Published]:
            return recalled_changes(rule, recent(limit, per_source))

        recall_history(self.sink, changes)

    def __repr__(self) -> str:
        return (f"LoadedSink({self.instance!r}, plugin={self.plugin.name!r}, "
                f"accepts={sorted(self.accepts)}, queue_size={self.queue_size})")


# --------------------------------------------------------------------------- discovery


def _info(ep: metadata.EntryPoint) -> PluginInfo:
    dist = ep.dist
    name = version = ""
    if dist is not None:
        name = str(dist.metadata["Name"] or "")
        version = str(dist.version or "")
    return PluginInfo(group=ep.group, name=ep.name, value=ep.value, distribution=name,
                      version=version)


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=group))


def list_plugins() -> list[PluginInfo]:
    """Every installed sink and source entry point, sorted by group then name."""
    infos = [_info(ep) for group in (SINKS_GROUP, SOURCES_GROUP) for ep in _entry_points(group)]
    return sorted(infos, key=lambda i: (i.group, i.name, i.distribution))


def _find(group: str, plugin: str, key: str, what: str) -> metadata.EntryPoint:
    eps = _entry_points(group)
    matches = [ep for ep in eps if ep.name == plugin]
    if not matches:
        # The config names something that is not there: a configuration problem.
        installed = ", ".join(sorted({ep.name for ep in eps})) or "none"
        raise ConfigError(
            f"{key}: no {what} plugin named {plugin!r} is installed (entry point group "
            f"{group}); installed: {installed}"
        )
    if len(matches) > 1:
        where = "; ".join(_info(ep).describe() for ep in matches)
        raise PluginError(
            f"{key}: {what} plugin {plugin!r} is installed more than once ({where}); "
            f"uninstall all but one"
        )
    return matches[0]


def _load(ep: metadata.EntryPoint, key: str, what: str) -> object:
    try:
        return ep.load()
    except Exception as exc:  # any import-time failure belongs to the plugin
        raise PluginError(
            f"{key}: cannot load {what} plugin {ep.name!r} ({_info(ep).describe()}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# --------------------------------------------------------------------------- bus options


@dataclass(frozen=True, slots=True, kw_only=True)
class BusOptions:
    """The options every sink table may carry, handled by the bus."""

    accepts: frozenset[str] | None = option(
        None, choices=sorted(KINDS), non_empty=True,
        help="the message kinds this instance receives (default: all the sink supports)")
    queue_size: int = option(DEFAULT_MAX_PENDING, min=1, max=MAX_QUEUE_SIZE,
                             help="its inbox's max_pending, in messages")
    publish: PublishMode = option(
        "every", help='"every" captioned window, or only the "change"s (per source)')
    heartbeat_s: float = option(
        DEFAULT_HEARTBEAT_S, above=0, max=MAX_HEARTBEAT_S,
        help='with publish = "change": an unchanged caption is published again after this long')
    change_distance: float = option(
        DEFAULT_CHANGE_DISTANCE, min=0, max=2,
        help='with publish = "change": a cosine distance between embeddings above this is a '
             'change')
    given: frozenset[str] = given_keys()

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """``heartbeat_s`` and ``change_distance`` mean something only with ``"change"``."""
        if self.publish == "every" and "publish" not in refused:
            for name in ("heartbeat_s", "change_distance"):
                if name in self.given and name not in refused:
                    yield name, ('only used with publish = "change" (this sink publishes '
                                 'every window); set publish = "change" or remove it')

    @property
    def change(self) -> ChangeRule | None:
        """The change-only rule, None for ``publish = "every"``."""
        if self.publish == "every":
            return None
        return ChangeRule(heartbeat_s=self.heartbeat_s, change_distance=self.change_distance)


def read_sink_options(cls: type[T], instance: str, options: Mapping[str, object]) -> Read[T]:
    """Read a sink's options into its options dataclass ``cls``: for every sink factory.

    Messages name ``sinks.<instance>.<key>``; the bus's own keys (``accepts``, ``publish``,
    ``queue_size``) are known without ``cls`` declaring them. ``.result()``
    gives the options or raises ConfigError with every problem; the README's
    "Writing a plugin" shows a whole factory.
    """
    return read(cls, options, f"sinks.{instance}", also=BUS_OPTIONS)


def _check_supported(instance: str, accepts: frozenset[str], supported: frozenset[str],
                     plugin: str) -> None:
    unsupported = sorted(accepts - supported)
    if unsupported:
        raise ConfigError(f"sinks.{instance}.accepts: plugin {plugin!r} cannot take "
                          f"{', '.join(unsupported)} (it supports {', '.join(sorted(supported))})")


def _check_sink(obj: object, instance: str, info: PluginInfo) -> Sink:
    where = f"sinks.{instance}: sink plugin {info.name!r} ({info.describe()})"
    if not isinstance(obj, Sink):
        raise PluginError(f"{where}: create_sink returned {type(obj).__name__}, which has no "
                          f"'accepts' attribute or no run() method")
    if not inspect.iscoroutinefunction(obj.run):
        raise PluginError(f"{where}: run() must be an async def")
    accepts = obj.accepts
    if (not isinstance(accepts, frozenset | set) or not accepts
            or not all(isinstance(k, str) for k in accepts) or not accepts <= KINDS):
        raise PluginError(f"{where}: accepts must be a non-empty set of kinds from "
                          f"{', '.join(sorted(KINDS))}, got {accepts!r}")
    return obj


# --------------------------------------------------------------------------- loading


def load_sink(instance: str, plugin_name: str, options: Mapping[str, object]) -> LoadedSink:
    """Find, import, configure and check the sink plugin of one ``[sinks.<instance>]`` table.

    Args:
        instance: The config table name.
        plugin_name: The entry point name (``plugin = "..."``; the table name by default).
        options: The table without ``plugin``. The bus's options (``accepts``,
            ``queue_size``, ``publish``, ``heartbeat_s``, ``change_distance``) are
            read here; of those only ``accepts`` goes on to the plugin's factory,
            with the plugin's own.

    Returns:
        The configured sink.

    Raises:
        PluginError: The plugin fails to import (the message names the entry
            point and its distribution), is installed twice, or does not
            satisfy :class:`Sink`.
        ConfigError: The plugin is not installed (the message lists what is),
            or the options are invalid (from the factory, or the bus's options).
    """
    key = f"sinks.{instance}.plugin"
    # Every problem at once: the bus's own options, then the plugin's.
    bus = read(BusOptions, {k: v for k, v in options.items() if k in BUS_OPTIONS},
               f"sinks.{instance}")
    problems = list(bus.problems)
    configured, queue_size = bus.value.accepts, bus.value.queue_size
    change = bus.value.change
    plugin_options = {k: v for k, v in options.items()
                      if k not in BUS_ONLY_OPTIONS and k not in bus.refused}
    try:
        ep = _find(SINKS_GROUP, plugin_name, key, "sink")
    except ConfigError as exc:
        raise ConfigError(exc.problems + problems) from None
    info = _info(ep)
    factory = _load(ep, key, "sink")
    if not callable(factory):
        raise PluginError(f"{key}: sink plugin {plugin_name!r} ({info.describe()}) is not "
                          f"callable; expected create_sink(instance, options)")
    try:
        made = factory(instance, plugin_options)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"sinks.{instance}: sink plugin {plugin_name!r} ({info.describe()}) failed to "
            f"create the sink: {type(exc).__name__}: {exc}"
        ) from exc
    if problems:
        raise ConfigError(problems)
    sink = _check_sink(made, instance, info)
    supported = frozenset(sink.accepts)
    accepts = supported if configured is None else configured
    _check_supported(instance, accepts, supported, plugin_name)
    return LoadedSink(instance=instance, sink=sink, accepts=accepts, queue_size=queue_size,
                      plugin=info, change=change)


def load_sinks(tables: Iterable[tuple[str, str, Mapping[str, object]]]) -> dict[str, LoadedSink]:
    """:func:`load_sink` for each ``(instance, plugin_name, options)``, reporting every failure.

    Raises:
        ConfigError: Some tables have invalid options (all of them listed),
            and no plugin failed to load.
        PluginError: Some plugins failed to load (every failure, one per line).
    """
    sinks: dict[str, LoadedSink] = {}
    config_problems: list[str] = []
    plugin_problems: list[str] = []
    for instance, plugin_name, options in tables:
        try:
            sinks[instance] = load_sink(instance, plugin_name, options)
        except ConfigError as exc:
            config_problems.extend(exc.problems)
        except PluginError as exc:
            plugin_problems.append(str(exc))
    if plugin_problems:
        raise PluginError("\n".join(plugin_problems + config_problems))
    if config_problems:
        raise ConfigError(config_problems)
    return sinks


def load_source_factory(plugin_name: str, *, config_key: str | None = None) -> SourceFactory:
    """The ``create_source`` factory of a ``streamcap.sources`` plugin.

    Args:
        plugin_name: The entry point name (``mic``, ``file``, ``stream`` or a plugin's).
        config_key: The config entry that asked for it, for error messages
            (e.g. ``sources.kitchen.uri``).

    Raises:
        ConfigError: Not installed (the message lists what is).
        PluginError: Installed twice, failed to import, or not callable.
    """
    key = config_key or f"source plugin {plugin_name!r}"
    ep = _find(SOURCES_GROUP, plugin_name, key, "source")
    factory = _load(ep, key, "source")
    if not callable(factory):
        raise PluginError(f"{key}: source plugin {plugin_name!r} ({_info(ep).describe()}) is "
                          f"not callable; expected create_source(source_id, uri, options)")
    return cast("SourceFactory", factory)
