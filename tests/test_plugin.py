"""streamcap.bus.plugin: entry-point discovery and loading, with real dist-info directories.

The fake plugins are real installed distributions as far as importlib.metadata
is concerned: a ``<name>-<version>.dist-info`` directory (METADATA and
entry_points.txt) next to the plugin modules, on ``sys.path``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streamcap.bus.change import ChangeRule
from streamcap.bus.inbox import DEFAULT_MAX_PENDING, Inbox
from streamcap.bus.plugin import (
    SINKS_GROUP,
    SOURCES_GROUP,
    LoadedSink,
    PluginInfo,
    SinkContext,
    SinkEndpoint,
    list_plugins,
    load_sink,
    load_sinks,
    load_source_factory,
    recall_history,
    sink_listens_on,
    tell_triggers,
)
from streamcap.errors import ConfigError, PluginError
from streamcap.messages import Caption

SINK_MODULE = '''
from streamcap.errors import ConfigError

class FakeSink:
    def __init__(self, instance, options):
        self.instance = instance
        self.options = dict(options)
        self.accepts = frozenset({"caption", "status"})

    async def run(self, inbox, ctx):
        async for _ in inbox:
            pass

class SyncSink:
    accepts = frozenset({"caption"})
    def run(self, inbox, ctx):
        return None

class BadKinds:
    accepts = frozenset({"captions"})
    async def run(self, inbox, ctx):
        return None

def create_sink(instance, options):
    unknown = sorted(set(options) - {"path", "token_env", "accepts"})
    if unknown:
        raise ConfigError(f"sinks.{instance}.{unknown[0]}: unknown option")
    return FakeSink(instance, options)

def create_sync_sink(instance, options):
    return SyncSink()

def create_not_sink(instance, options):
    return object()

def create_bad_kinds(instance, options):
    return BadKinds()

def create_exploding(instance, options):
    raise RuntimeError("socket table full")

not_callable = 42

def create_source(source_id, uri, options):
    return (source_id, uri, dict(options))
'''


@dataclass(frozen=True)
class FakeDist:
    name: str
    version: str
    module: str  # the plugin module that imports cleanly
    broken: str  # a module that fails at import time
    untouched: str  # a module only an unused entry point refers to


def _write_dist(root: Path, name: str, version: str, entry_points: str) -> None:
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDist]:
    tag = uuid.uuid4().hex[:8]
    dist = FakeDist(name=f"fakesinks-{tag}", version="1.2.3", module=f"scfake_{tag}",
                    broken=f"scfake_broken_{tag}", untouched=f"scfake_unused_{tag}")
    (tmp_path / f"{dist.module}.py").write_text(SINK_MODULE, encoding="utf-8")
    (tmp_path / f"{dist.broken}.py").write_text(
        "import streamcap_no_such_dependency\n", encoding="utf-8")
    (tmp_path / f"{dist.untouched}.py").write_text(
        "raise RuntimeError('this plugin must not be imported')\n", encoding="utf-8")
    m = dist.module
    _write_dist(tmp_path, dist.name, dist.version, f"""
[{SINKS_GROUP}]
fake-{tag} = {m}:create_sink
broken-{tag} = {dist.broken}:create_sink
unused-{tag} = {dist.untouched}:create_sink
sync-{tag} = {m}:create_sync_sink
notsink-{tag} = {m}:create_not_sink
badkinds-{tag} = {m}:create_bad_kinds
explodes-{tag} = {m}:create_exploding
notcallable-{tag} = {m}:not_callable

[{SOURCES_GROUP}]
fakesrc-{tag} = {m}:create_source
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield dist
    for mod in (dist.module, dist.broken, dist.untouched):
        sys.modules.pop(mod, None)


def tag_of(dist: FakeDist) -> str:
    return dist.module.rsplit("_", 1)[1]


def test_list_plugins_reports_group_value_distribution_and_version(fake_dist: FakeDist) -> None:
    tag = tag_of(fake_dist)
    infos = list_plugins()
    fake = [i for i in infos if i.name == f"fake-{tag}"]
    assert fake == [PluginInfo(group=SINKS_GROUP, name=f"fake-{tag}",
                               value=f"{fake_dist.module}:create_sink",
                               distribution=fake_dist.name, version="1.2.3")]
    assert any(i.group == SOURCES_GROUP and i.name == f"fakesrc-{tag}" for i in infos)
    assert infos == sorted(infos, key=lambda i: (i.group, i.name, i.distribution))


def test_builtin_sinks_are_registered_like_third_party_ones() -> None:
    builtins = {(i.name, i.value, i.distribution) for i in list_plugins()
                if i.group == SINKS_GROUP}
    assert ("websocket", "streamcap.sinks.websocket:create_sink", "streamcap") in builtins
    assert ("mqtt", "streamcap.sinks.mqtt:create_sink", "streamcap") in builtins


def test_load_sink_passes_plugin_options_and_applies_bus_options(fake_dist: FakeDist) -> None:
    tag = tag_of(fake_dist)
    sink = load_sink("out", f"fake-{tag}", {"path": "/x", "accepts": ["caption"],
                                            "queue_size": 8})
    assert isinstance(sink, LoadedSink)
    assert sink.accepts == frozenset({"caption"})
    assert sink.queue_size == 8
    inner: Any = sink.sink
    # The factory sees accepts (to advertise its kinds), never queue_size.
    assert inner.options == {"path": "/x", "accepts": ["caption"]}
    assert inner.instance == "out"
    assert sink.plugin.distribution == fake_dist.name
    # Only the named plugin's module was imported.
    assert fake_dist.module in sys.modules
    assert fake_dist.untouched not in sys.modules
    assert fake_dist.broken not in sys.modules


def test_publish_options_belong_to_the_bus(fake_dist: FakeDist) -> None:
    tag = tag_of(fake_dist)
    sink = load_sink("out", f"fake-{tag}", {"path": "/x", "publish": "change",
                                            "heartbeat_s": 60, "change_distance": 0.5})
    assert sink.change == ChangeRule(heartbeat_s=60.0, change_distance=0.5)
    inner: Any = sink.sink
    assert inner.options == {"path": "/x"}  # the factory never sees them
    defaults = load_sink("out", f"fake-{tag}", {"publish": "change"})
    assert defaults.change == ChangeRule()
    assert load_sink("out", f"fake-{tag}", {"publish": "every"}).change is None


def test_load_sink_defaults_to_everything_the_sink_supports(fake_dist: FakeDist) -> None:
    sink = load_sink("out", f"fake-{tag_of(fake_dist)}", {})
    assert sink.accepts == frozenset({"caption", "status"})
    assert sink.queue_size == DEFAULT_MAX_PENDING
    assert sink.change is None  # publish = "every"


def test_missing_plugin_names_config_entry_and_installed_plugins(fake_dist: FakeDist) -> None:
    # A config naming a plugin that is not there is a configuration problem (exit 2).
    tag = tag_of(fake_dist)
    with pytest.raises(ConfigError) as err:
        load_sink("ha", "mqqt", {})
    msg = str(err.value)
    assert msg.startswith("sinks.ha.plugin: no sink plugin named 'mqqt' is installed")
    assert f"fake-{tag}" in msg and "websocket" in msg and "mqtt" in msg


def test_import_error_names_entry_point_and_distribution(fake_dist: FakeDist) -> None:
    tag = tag_of(fake_dist)
    with pytest.raises(PluginError) as err:
        load_sink("x", f"broken-{tag}", {})
    msg = str(err.value)
    assert "sinks.x.plugin" in msg
    assert f"{fake_dist.broken}:create_sink from {fake_dist.name} 1.2.3" in msg
    assert "streamcap_no_such_dependency" in msg
    assert isinstance(err.value.__cause__, ImportError)


def test_config_error_from_factory_propagates(fake_dist: FakeDist) -> None:
    with pytest.raises(ConfigError, match=r"^sinks\.x\.colour: unknown option$"):
        load_sink("x", f"fake-{tag_of(fake_dist)}", {"colour": "red"})


def test_factory_crash_is_a_plugin_error_naming_the_plugin(fake_dist: FakeDist) -> None:
    tag = tag_of(fake_dist)
    with pytest.raises(PluginError, match=rf"sinks\.x: sink plugin 'explodes-{tag}' .*"
                                          r"RuntimeError: socket table full"):
        load_sink("x", f"explodes-{tag}", {})


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        ("sync", "run\\(\\) must be an async def"),
        ("notsink", "create_sink returned object"),
        ("badkinds", "accepts must be a non-empty set of kinds"),
        ("notcallable", "is not callable"),
    ],
)
def test_protocol_violations_are_plugin_errors(fake_dist: FakeDist, plugin: str,
                                               expected: str) -> None:
    with pytest.raises(PluginError, match=expected) as err:
        load_sink("x", f"{plugin}-{tag_of(fake_dist)}", {})
    assert fake_dist.name in str(err.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"accepts": "caption"}, r"sinks\.x\.accepts: expected an array \(got a string"),
        ({"accepts": ["caption", "source_status"]},
         r"sinks\.x\.accepts: must be some of caption, embedding, status, trigger \(got \['caption', "),
        ({"accepts": ["embedding"]}, r"cannot take embedding \(it supports caption, status\)"),
        ({"accepts": []}, r"sinks\.x\.accepts: must not be empty \(got \[\]\)"),
        ({"queue_size": 0}, r"sinks\.x\.queue_size: must be between 1 and 100000 \(got 0\)"),
        ({"queue_size": True}, r"sinks\.x\.queue_size"),
        ({"queue_size": "8"}, r"sinks\.x\.queue_size"),
        ({"publish": "sometimes"},
         r"sinks\.x\.publish: must be one of every, change \(got 'sometimes'\)"),
        ({"publish": True}, r"sinks\.x\.publish: expected a string"),
        ({"publish": "change", "heartbeat_s": 0},
         r"sinks\.x\.heartbeat_s: must be > 0 and <= 604800 \(got 0"),
        ({"publish": "change", "heartbeat_s": "5m"}, r"sinks\.x\.heartbeat_s: expected a number"),
        ({"publish": "change", "change_distance": 3},
         r"sinks\.x\.change_distance: must be between 0 and 2 \(got 3"),
        ({"heartbeat_s": 60}, r'sinks\.x\.heartbeat_s: only used with publish = "change"'),
        ({"change_distance": 0.1}, r'sinks\.x\.change_distance: only used with publish = "change"'),
    ],
)
def test_bus_options_are_validated(fake_dist: FakeDist, options: dict[str, object],
                                   expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_sink("x", f"fake-{tag_of(fake_dist)}", options)


def test_bus_and_plugin_option_problems_come_together_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_sink("w", "websocket", {"accepts": "caption", "queue_size": 0, "port": -1})
    keys = [line.split(":", 1)[0] for line in err.value.problems]
    assert keys == ["sinks.w.accepts", "sinks.w.queue_size", "sinks.w.port"]


def test_a_missing_plugin_and_bad_bus_options_come_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_sink("w", "nonexistent", {"queue_size": 0})
    keys = [line.split(":", 1)[0] for line in err.value.problems]
    assert keys == ["sinks.w.plugin", "sinks.w.queue_size"]


def test_load_sinks_reports_every_failure(fake_dist: FakeDist) -> None:
    tag = tag_of(fake_dist)
    with pytest.raises(PluginError) as err:
        load_sinks([("a", f"fake-{tag}", {"queue_size": 0}), ("b", f"broken-{tag}", {}),
                    ("c", f"fake-{tag}", {}), ("d", "nope", {})])
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("sinks.b.plugin: cannot load")
    assert lines[1].startswith("sinks.a.queue_size:")
    assert lines[2].startswith("sinks.d.plugin: no sink plugin named 'nope'")
    with pytest.raises(ConfigError) as cerr:
        load_sinks([("a", f"fake-{tag}", {"queue_size": 0}),
                    ("b", f"fake-{tag}", {"accepts": ["x"]})])
    assert len(cerr.value.problems) == 2
    ok = load_sinks([("a", f"fake-{tag}", {}), ("b", f"fake-{tag}", {"accepts": ["status"]})])
    assert sorted(ok) == ["a", "b"] and ok["b"].accepts == frozenset({"status"})


def test_same_plugin_name_in_two_distributions_is_refused(
    fake_dist: FakeDist, tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag = tag_of(fake_dist)
    other = tmp_path_factory.mktemp("other")
    _write_dist(other, f"othersinks-{tag}", "0.9", f"[{SINKS_GROUP}]\nfake-{tag} = x:y\n")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(PluginError, match="installed more than once") as err:
        load_sink("x", f"fake-{tag}", {})
    assert f"othersinks-{tag} 0.9" in str(err.value) and f"{fake_dist.name} 1.2.3" in str(err.value)


def test_load_source_factory(fake_dist: FakeDist) -> None:
    tag = tag_of(fake_dist)
    factory = load_source_factory(f"fakesrc-{tag}")
    made: object = factory("kitchen", "x:1", {"a": 1})
    assert made == ("kitchen", "x:1", {"a": 1})
    with pytest.raises(ConfigError, match=r"^sources\.k\.uri: no source plugin named 'nope'"):
        load_source_factory("nope", config_key="sources.k.uri")


def test_builtin_file_source_factory_loads() -> None:
    factory = load_source_factory("file")
    assert callable(factory)


async def test_loaded_sink_runs_the_plugin_sink(fake_dist: FakeDist, tmp_path: Path) -> None:
    from streamcap.logs import get_logger
    from streamcap.stats import Metrics

    sink = load_sink("out", f"fake-{tag_of(fake_dist)}", {})
    inbox = Inbox("out")
    inbox.close()
    ctx = SinkContext(instance="out", node_id="n", metrics=Metrics(), ready=lambda: None,
                      logger=get_logger("t").bind(sink="out"), state_dir=tmp_path)
    await sink.run(inbox, ctx)  # returns once the closed inbox is drained
    assert "fake-" in repr(sink)


def test_a_sink_says_where_it_will_listen_before_it_starts() -> None:
    loaded = load_sink("live", "websocket", {"port": 0, "host": "::1"})
    expected = SinkEndpoint(kind="websocket", host="::1", port=0, scheme="ws",
                            token_required=False)
    assert loaded.configured_endpoint == expected
    assert sink_listens_on(loaded) == expected
    assert sink_listens_on(loaded.sink) == expected
    assert loaded.endpoint is None  # not listening


def test_a_sink_that_listens_for_nobody_has_no_configured_endpoint() -> None:
    class Quiet:
        accepts = frozenset({"caption"})

        async def run(self, inbox: Inbox, ctx: object) -> None:
            return None

    class Lying(Quiet):
        configured_endpoint = ("0.0.0.0", 80)

    assert sink_listens_on(Quiet()) is None
    assert sink_listens_on(Lying()) is None
    assert sink_listens_on(load_sink("broker", "mqtt", {"host": "127.0.0.1"})) is None


def test_the_live_set_of_triggers_reaches_only_sinks_that_follow_triggers() -> None:
    from streamcap.triggers.spec import read_trigger

    class Follows:
        accepts = frozenset({"trigger"})

        def __init__(self) -> None:
            self.told: list[list[str]] = []

        async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
            return None

        def triggers_changed(self, specs: Any) -> None:
            self.told.append(sorted(specs))

    class Ignores:
        accepts = frozenset({"caption"})

        async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
            return None

    info = PluginInfo(group=SINKS_GROUP, name="x", value="m:f", distribution="", version="")
    inner = Follows()
    loaded = LoadedSink(instance="a", sink=inner, accepts=inner.accepts, queue_size=8,
                        plugin=info)
    specs = {"dog": read_trigger("dog", {"text": ["a dog barks"]}, "triggers.dog").value}
    tell_triggers(loaded, specs)
    tell_triggers(loaded, {})
    assert inner.told == [["dog"], []]
    other = LoadedSink(instance="b", sink=Ignores(), accepts=frozenset({"caption"}),
                       queue_size=8, plugin=info)
    tell_triggers(other, specs)  # nothing to tell, nothing raised
    tell_triggers(object(), specs)


def test_a_change_only_sink_recalls_the_changes_and_an_every_sink_everything() -> None:
    class Replays:
        accepts = frozenset({"caption"})

        def __init__(self) -> None:
            self.recalled: list[Any] = []

        async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
            return None

        def recall(self, recent: Any) -> None:
            self.recalled = list(recent(10, True))

    def caption(seq: int, text: str) -> Caption:
        return Caption(window_id=f"w{seq}", source_id="a", seq=seq, start_s=5.0 * seq,
                       end_s=5.0 * seq + 10, captured_at=1000.0 + 5 * seq, text=text, score=0.5)

    stored = [caption(0, "hum"), caption(1, "hum"), caption(2, "a dog barks"), caption(3, "hum")]
    asked: list[tuple[int, bool]] = []

    def recent(limit: int, per_source: bool) -> list[Caption]:
        asked.append((limit, per_source))
        return stored

    info = PluginInfo(group=SINKS_GROUP, name="x", value="m:f", distribution="", version="")
    every, change = Replays(), Replays()
    recall_history(LoadedSink(instance="every", sink=every, accepts=every.accepts,
                              queue_size=8, plugin=info), recent)
    recall_history(LoadedSink(instance="change", sink=change, accepts=change.accepts,
                              queue_size=8, plugin=info, change=ChangeRule()), recent)
    assert every.recalled == stored
    assert [c.window_id for c in change.recalled] == ["w0", "w2", "w3"]
    assert asked == [(10, True), (10, True)]
