"""The MQTT sink against a real mosquitto, real aiomqtt clients and the real mosquitto_sub."""
# ruff: noqa: F811  (pytest fixtures imported from tests/mosquitto.py are test parameters)

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import aiomqtt
import jsonschema
import numpy as np
import pytest
import structlog
from mosquitto import (  # noqa: F401  (fixtures)
    Mosquitto,
    broker,
    broker_factory,
    mosquitto_sub,
    start_mosquitto_sub,
)
from timing import scaled

from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import SinkContext
from streamcap.errors import ConfigError
from streamcap.logs import get_logger
from streamcap.messages import (
    Caption,
    CaptionCandidate,
    Embedding,
    SourceState,
    SourceStatus,
    TriggerEvent,
    TriggerState,
)
from streamcap.sinks.homeassistant import STATE_MAX_CHARS
from streamcap.sinks.mqtt import MqttSink, Topics, create_sink
from streamcap.stats import Metrics
from streamcap.triggers.spec import TriggerSpec, read_trigger

NODE = "node1"
PREFIX = f"streamcap/{NODE}"
REPO = Path(__file__).resolve().parents[1]
WAIT_S = scaled(30.0)  # generous: the machine is shared; nothing below asserts a duration


# --------------------------------------------------------------------------- helpers


def caption(i: int, source: str = "kitchen", text: str | None = None) -> Caption:
    return Caption(window_id=f"{source}:0:{i * 5000}", source_id=source, seq=i,
                   start_s=i * 5.0, end_s=i * 5.0 + 10.0, captured_at=1.7e9 + i,
                   text=text if text is not None else f"a dog barks {i}", score=0.5,
                   model="tiny", latency_ms=12.0, lag_s=0.1,
                   candidates=(CaptionCandidate(text="a dog barks", decoder_score=-1.2,
                                                encoder_score=0.3, score=0.5),))


def embedding(i: int, source: str = "kitchen") -> Embedding:
    vec = np.linspace(-1, 1, 16, dtype=np.float32)
    vec.flags.writeable = False
    return Embedding(window_id=f"{source}:0:{i * 5000}", source_id=source, seq=i,
                     start_s=i * 5.0, end_s=i * 5.0 + 10.0, model="clap-tiny", vector=vec)


def status(state: SourceState, source: str = "kitchen") -> SourceStatus:
    return SourceStatus(source_id=source, state=state, reason="test", at=1.7e9)


@dataclass
class Harness:
    sink: MqttSink
    ctx: SinkContext
    metrics: Metrics
    ready: asyncio.Event

    def gauge(self, name: str) -> float:
        return self.metrics.gauge(name, "", ["sink"]).value(self.ctx.instance)

    def counter(self, name: str) -> float:
        return self.metrics.counter(name, "", ["sink"]).value(self.ctx.instance)


def harness(broker: Mosquitto, state_dir: Path, instance: str = "mqtt",
            **options: object) -> Harness:
    opts: dict[str, object] = {
        "host": broker.host, "port": broker.port, "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.5, "birth_delay_s": 0.0, "outbox_fsync": False,
        "flush_timeout_s": WAIT_S,
    }
    opts.update(options)
    sink = create_sink(instance, opts)
    metrics = Metrics()
    ready = asyncio.Event()
    ctx = SinkContext(instance=instance, node_id=NODE, metrics=metrics, ready=ready.set,
                      logger=get_logger("test").bind(sink=instance), state_dir=state_dir)
    return Harness(sink=sink, ctx=ctx, metrics=metrics, ready=ready)


@contextlib.asynccontextmanager
async def running(h: Harness) -> AsyncIterator[Inbox]:
    """Run the sink on a fresh inbox; on exit close the inbox and wait for the sink to return."""
    inbox = Inbox(h.ctx.instance, max_pending=1000)
    task = asyncio.create_task(h.sink.run(inbox, h.ctx), name="test-sink")
    try:
        async with asyncio.timeout(WAIT_S):
            await h.ready.wait()
        yield inbox
    finally:
        inbox.close()
        async with asyncio.timeout(WAIT_S * 2):
            await task


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until true (fails after WAIT_S with ``what``)."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> dict[str, object]:
        obj = json.loads(self.payload)
        assert isinstance(obj, dict)
        return obj


@dataclass
class Collector:
    """A real aiomqtt subscriber that reconnects on its own (optionally a persistent session)."""

    broker: Mosquitto
    topics: tuple[str, ...]
    client_id: str | None = None
    persistent: bool = False
    auth: tuple[str, str] | None = None
    messages: list[Received] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port, identifier=self.client_id,
                    clean_session=not self.persistent,
                    username=self.auth[0] if self.auth else None,
                    password=self.auth[1] if self.auth else None,
                ) as client:
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    self.subscribed.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else str(
                            m.payload).encode()
                        self.messages.append(Received(str(m.topic), payload, bool(m.retain)))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._loop(), name="test-collector")
        async with asyncio.timeout(WAIT_S):
            await self.subscribed.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def on(self, suffix: str) -> list[Received]:
        return [m for m in self.messages if m.topic.endswith(suffix)]


async def retained(broker: Mosquitto, topic: str) -> str | None:
    """The retained payload on ``topic`` as a new mosquitto_sub sees it."""
    got = await asyncio.to_thread(mosquitto_sub, broker, topic, count=1, wait_s=3)
    return got[0][1] if got else None


def first_occurrences(window_ids: list[str]) -> list[str]:
    return list(dict.fromkeys(window_ids))


# --------------------------------------------------------------------------- pure parts


def test_options_validation_names_every_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_MQTT_PW", raising=False)
    with pytest.raises(ConfigError) as err:
        create_sink("ha", {"porte": 1883, "password": "x", "qos_caption": 3,
                           "prefix": "a/#", "password_env": "NO_SUCH_MQTT_PW",
                           "username": "u", "ca_file": "/nonexistent"})
    text = str(err.value)
    for needle in ("sinks.ha.porte: unknown key (known keys: accepts, birth_delay_s, ",
                   "sinks.ha.password: secrets are not read from the config file",
                   "sinks.ha.qos_caption", "sinks.ha.prefix", "NO_SUCH_MQTT_PW is not set",
                   "sinks.ha.ca_file: only used with tls = true"):
        assert needle in text
    assert "'x'" not in text  # the secret is not echoed back


def test_option_defaults_and_topics() -> None:
    sink = create_sink("m", {})
    o = sink.options
    assert (o.host, o.port, o.qos_caption, o.discovery) == ("localhost", 1883, 1, True)
    assert o.resolved_prefix("box") == "streamcap/box"
    assert o.resolved_client_id("box", "m") == "streamcap-box-m"
    assert o.resolved_birth_topic == "homeassistant/status"
    assert create_sink("m", {"tls": True}).options.port == 8883
    t = Topics("streamcap/box")
    assert t.caption("a/b#") == "streamcap/box/a_b_/caption"
    assert t.availability == "streamcap/box/availability"


# --------------------------------------------------------------------------- with a broker


async def test_topics_payloads_order_and_availability(broker: Mosquitto, tmp_path: Path) -> None:
    h = harness(broker, tmp_path / "state")
    sub_out = tmp_path / "mosquitto_sub.txt"
    proc = start_mosquitto_sub(broker, f"{PREFIX}/+/caption", out=sub_out, extra=("-q", "1"))
    try:
        async with Collector(broker, (f"{PREFIX}/#",)) as col:
            await asyncio.sleep(0.2)  # let mosquitto_sub subscribe too
            async with running(h) as inbox:
                assert await retained(broker, f"{PREFIX}/availability") == "online"
                await until(lambda: h.gauge("streamcap_mqtt_connected") == 1, "connected gauge")
                inbox.offer(status(SourceState.RUNNING))
                for i in range(6):
                    inbox.offer(caption(i))
                    inbox.offer(embedding(i))  # latest-per-source: let the sink take each one
                    await until(lambda: inbox.depth == 0, "the sink to take the embedding")
            # closing the inbox flushed every caption before "offline"
            assert await retained(broker, f"{PREFIX}/availability") == "offline"
            await until(lambda: len(col.on("/embedding")) == 6, "six embeddings")
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    captions = col.on("/kitchen/caption")
    frames = [m.json() for m in captions]
    assert [f["seq"] for f in frames] == list(range(6))
    for m, f in zip(captions, frames, strict=True):
        assert m.topic == f"{PREFIX}/kitchen/caption" and not m.retain
        assert f["type"] == "caption" and f["v"] == 1 and f["node_id"] == NODE
        for key in ("window_id", "source_id", "start_s", "end_s", "captured_at", "text", "score",
                    "model", "latency_ms", "lag_s", "candidates"):
            assert key in f
    emb = [m.json() for m in col.on("/kitchen/embedding")]
    assert [e["seq"] for e in emb] == list(range(6))
    assert all(e["type"] == "embedding" and e["dim"] == 16 and len(e["vector"]) == 16  # type: ignore[arg-type]
               for e in emb)
    st = [m.json() for m in col.on("/kitchen/status")]
    assert st and st[0]["state"] == "running"
    assert json.loads(await retained(broker, f"{PREFIX}/kitchen/status") or "{}")["state"] == \
        "running"
    ha_state = json.loads(await retained(broker, f"{PREFIX}/kitchen/ha_state") or "{}")
    assert ha_state["state"] == "a dog barks 5" and "vector" not in ha_state
    # the real mosquitto_sub saw the same captions, in order
    lines = [ln.split(" ", 1) for ln in sub_out.read_text().splitlines()]
    assert [json.loads(p)["seq"] for t, p in lines] == list(range(6))
    assert h.gauge("streamcap_mqtt_connected") == 0
    assert h.gauge("streamcap_mqtt_outbox_depth") == 0


async def test_last_will_when_the_connection_dies(broker: Mosquitto, tmp_path: Path) -> None:
    script = (
        "import asyncio, pathlib, sys\n"
        "from streamcap.bus.inbox import Inbox\n"
        "from streamcap.bus.plugin import SinkContext\n"
        "from streamcap.logs import get_logger\n"
        "from streamcap.sinks.mqtt import create_sink\n"
        "from streamcap.stats import Metrics\n"
        "async def main():\n"
        "    sink = create_sink('mqtt', {'host': '127.0.0.1', 'port': int(sys.argv[1]),\n"
        "                               'discovery': False, 'keepalive_s': 5})\n"
        "    ctx = SinkContext(instance='mqtt', node_id='doomed', metrics=Metrics(),\n"
        "                      ready=lambda: None, logger=get_logger('child'),\n"
        "                      state_dir=pathlib.Path(sys.argv[2]))\n"
        "    await sink.run(Inbox('mqtt'), ctx)\n"
        "asyncio.run(main())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    topic = "streamcap/doomed/availability"
    async with Collector(broker, (topic,)) as col:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(broker.port), str(tmp_path / "child"), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await until(lambda: [m.payload for m in col.on("/availability")] == [b"online"],
                        "the child's online")
            child.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker fires the Last Will
            async with asyncio.timeout(WAIT_S):
                await child.wait()
            await until(lambda: len(col.on("/availability")) == 2, "the Last Will")
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
    will = col.on("/availability")[1]
    assert will.payload == b"offline"
    assert await retained(broker, topic) == "offline"


async def _make_persistent_session(broker: Mosquitto, client_id: str,
                                   topics: tuple[str, ...]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id,
                              clean_session=False) as client:
        for t in topics:
            await client.subscribe(t, qos=1)


async def test_broker_down_at_start_delivers_everything_later(
        broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    b = broker_factory(workdir=tmp_path / "broker")
    topics = (f"{PREFIX}/+/caption",)
    b.start()
    await _make_persistent_session(b, "observer", topics)
    b.stop()
    assert (b.workdir / "persist" / "mosquitto.db").exists()

    h = harness(b, tmp_path / "state")
    async with running(h) as inbox:  # starts (and is ready) with no broker at all
        for i in range(20):
            inbox.offer(caption(i))
        await until(lambda: h.gauge("streamcap_mqtt_outbox_depth") == 20, "20 in the outbox")
        await until(lambda: h.counter("streamcap_mqtt_connect_errors_total") >= 2,
                    "connect retries")
        assert list((tmp_path / "state" / "outbox").glob("*.seg"))
        assert h.gauge("streamcap_mqtt_connected") == 0
        b.start()
        # every caption acknowledged by the broker before the observer even reconnects:
        # its persistent session queued them
        await until(lambda: h.gauge("streamcap_mqtt_outbox_depth") == 0, "empty outbox")
        async with Collector(b, topics, client_id="observer", persistent=True) as col:
            await until(lambda: len(first_occurrences(
                [str(m.json()["window_id"]) for m in col.on("/caption")])) == 20, "20 captions")
    ids = first_occurrences([str(m.json()["window_id"]) for m in col.on("/caption")])
    assert ids == [caption(i).window_id for i in range(20)]


async def test_broker_restart_loses_nothing(broker_factory: Callable[..., Mosquitto],
                                            tmp_path: Path) -> None:
    b = broker_factory(workdir=tmp_path / "broker")
    b.start()
    topics = (f"{PREFIX}/+/caption", "homeassistant/#")
    h = harness(b, tmp_path / "state")
    sent: list[str] = []
    async with (Collector(b, topics, client_id="persistent-observer", persistent=True) as col,
                running(h) as inbox):

        async def produce(n: int) -> None:
            for _ in range(n):
                c = caption(len(sent))
                sent.append(c.window_id)
                inbox.offer(c)
                await asyncio.sleep(0.02)

        await produce(15)
        await until(lambda: len(col.on("/caption")) >= 5, "first captions")
        discovery_before = len([m for m in col.messages if m.topic.endswith("/config")
                                and not m.retain])
        assert discovery_before == 3
        await asyncio.to_thread(b.stop)  # while captions keep coming
        await produce(15)
        assert h.gauge("streamcap_mqtt_outbox_depth") >= 15  # nobody can acknowledge them now
        await asyncio.to_thread(b.start)
        await produce(15)
        await until(lambda: len(first_occurrences(
            [str(m.json()["window_id"]) for m in col.on("/caption")])) == len(sent),
            "every caption")
        # discovery was published again on the reconnect
        await until(lambda: len([m for m in col.messages if m.topic.endswith("/config")
                                 and not m.retain]) >= 6, "discovery after reconnect")
    received = [str(m.json()["window_id"]) for m in col.on("/caption")]
    assert first_occurrences(received) == sent  # none lost, order of first occurrences kept
    assert set(received) == set(sent)  # duplicates (if any) are identifiable by window_id
    assert h.counter("streamcap_mqtt_connects_total") >= 2


async def test_home_assistant_discovery_and_birth(broker: Mosquitto, tmp_path: Path) -> None:
    h = harness(broker, tmp_path / "state")
    long_text = ("a dog barks while a car passes " * 40)[:1000]
    async with (Collector(broker, ("homeassistant/#", f"{PREFIX}/+/ha_state",
                                   f"{PREFIX}/+/embedding")) as col,
                running(h) as inbox):
        # embeddings are best-effort: offered before the first connect they are discarded
        await until(lambda: h.gauge("streamcap_mqtt_connected") == 1, "connected")
        inbox.offer(status(SourceState.RUNNING))
        inbox.offer(caption(1, text=long_text))
        inbox.offer(embedding(1))
        await until(lambda: len(col.on("/config")) == 3 and len(col.on("/ha_state")) == 1
                    and len(col.on("/embedding")) == 1, "discovery, state, embedding")
        first = list(col.on("/config"))
        await asyncio.to_thread(subprocess.run, [
            "mosquitto_pub", "-h", broker.host, "-p", str(broker.port),
            "-t", "homeassistant/status", "-m", "online"], check=True, timeout=30)
        await until(lambda: len(col.on("/config")) == 6, "discovery after the birth message")
    configs = [m.json() for m in col.on("/config")]
    names = {str(c["name"]) for c in configs}
    assert names == {"kitchen caption", "kitchen caption score", "kitchen status"}
    assert [m.payload for m in col.on("/config")[3:]] == [m.payload for m in first]
    for c in configs:
        assert c["availability_topic"] == f"{PREFIX}/availability"
        device = c["device"]
        assert isinstance(device, dict) and device["identifiers"] == [f"streamcap_{NODE}"]
    state = col.on("/ha_state")[0].json()
    assert len(str(state["state"])) <= STATE_MAX_CHARS
    assert state["text"] == long_text
    for m in col.messages:
        if "/embedding" in m.topic:
            continue
        assert b"vector" not in m.payload and b"embedding" not in m.payload, m.topic


async def test_username_and_password_from_the_environment(
        broker_factory: Callable[..., Mosquitto], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = broker_factory(workdir=tmp_path / "broker", users={"cap": "s3cret"})
    b.start()
    monkeypatch.setenv("STREAMCAP_TEST_MQTT_PW", "s3cret")
    monkeypatch.setenv("STREAMCAP_TEST_MQTT_BAD", "wrong")
    good = harness(b, tmp_path / "good", instance="good", username="cap",
                   password_env="STREAMCAP_TEST_MQTT_PW", discovery=False)
    async with Collector(b, ("streamcap/#",), auth=("cap", "s3cret")) as col:
        async with running(good) as inbox:
            inbox.offer(caption(1))
        await until(lambda: len(col.on("/caption")) == 1, "the authenticated caption")

    with structlog.testing.capture_logs() as logs:
        bad = harness(b, tmp_path / "bad", instance="bad", username="cap",
                      password_env="STREAMCAP_TEST_MQTT_BAD", flush_timeout_s=0.2)
        async with running(bad) as inbox:
            inbox.offer(caption(2))
            await until(lambda: bad.counter("streamcap_mqtt_connect_errors_total") >= 3,
                        "retries with the wrong password")
            assert bad.gauge("streamcap_mqtt_connected") == 0
    warnings = [e for e in logs if e.get("log_level") == "warning" and "retrying" in e["event"]]
    assert warnings and "rror" in str(warnings[0]["error"])
    assert "wrong" not in json.dumps(logs, default=str)  # the password never reaches a log
    # the caption was kept for a later run, not lost: the next start (right password) sends it
    assert bad.gauge("streamcap_mqtt_outbox_depth") == 1
    fixed = harness(b, tmp_path / "bad", instance="bad", username="cap",
                    password_env="STREAMCAP_TEST_MQTT_PW", discovery=False)
    async with Collector(b, ("streamcap/#",), auth=("cap", "s3cret")) as col2, running(fixed):
        await until(lambda: len(col2.on("/caption")) == 1, "the caption of the earlier run")
    assert col2.on("/caption")[0].json()["window_id"] == caption(2).window_id


# --------------------------------------------------------------------------- triggers

SCHEMA_PATH = REPO / "docs" / "streamcap.v1.schema.json"
RUN = "0123456789abcdef"


def trigger_event(n: int, state: TriggerState, *, source: str = "kitchen", trigger: str = "dog",
                  fired_id: str = "") -> TriggerEvent:
    """Event number ``n`` of a run, named as the engine names it."""
    return TriggerEvent(event_id=f"{RUN}-{trigger}-{source}-{n}", trigger=trigger,
                        source_id=source, state=state, score=0.4, threshold=0.3,
                        start_s=float(n), end_s=n + 5.0, captured_at=1.7e9 + n, model="clap",
                        run_id=RUN, fired_id=fired_id, caption="a dog barks")


def announcement(n: int, *, source: str = "kitchen", trigger: str = "dog") -> TriggerEvent:
    """The engine's state announcement: off, no firing, numbers NaN."""
    return TriggerEvent(event_id=f"{RUN}-{trigger}-{source}-{n}", trigger=trigger,
                        source_id=source, state=TriggerState.OFF, score=math.nan,
                        threshold=math.nan, start_s=math.nan, end_s=math.nan,
                        captured_at=1.7e9, model="clap", run_id=RUN)


def spec(name: str, *text: str, sources: tuple[str, ...] = ()) -> TriggerSpec:
    got = read_trigger(name, {"text": list(text), "sources": list(sources)}, f"triggers.{name}")
    assert not got.problems
    return got.value


async def test_trigger_state_event_discovery_and_removal(broker: Mosquitto,
                                                         tmp_path: Path) -> None:
    h = harness(broker, tmp_path / "state")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    state_topic = f"{PREFIX}/kitchen/trigger/dog"
    async with (Collector(broker, ("homeassistant/#", f"{PREFIX}/+/trigger/#")) as col,
                running(h) as inbox):
        await until(lambda: h.gauge("streamcap_mqtt_connected") == 1, "connected")
        h.sink.triggers_changed({"dog": spec("dog", "a smoke alarm beeps")})
        inbox.offer(announcement(1))
        await until(lambda: len(col.on("/trigger/dog")) == 1, "the announced OFF")
        assert await retained(broker, state_topic) == "OFF"
        # the announcement publishes no event, but the entities
        await until(lambda: len(col.on("/config")) == 5, "discovery of the source and the pair")
        assert col.on("/event") == []
        inbox.offer(trigger_event(2, TriggerState.ON))
        await until(lambda: len(col.on("/trigger/dog")) == 2, "ON")
        assert await retained(broker, state_topic) == "ON"
        inbox.offer(trigger_event(3, TriggerState.OFF, fired_id=f"{RUN}-dog-kitchen-2"))
        await until(lambda: len(col.on("/trigger/dog")) == 3 and len(col.on("/event")) == 2,
                    "OFF and two events")
        # a real mosquitto_sub, arriving late, gets the retained state
        assert await retained(broker, state_topic) == "OFF"
        configs = {m.topic: m for m in col.on("/config")}
        sensor_topic = "homeassistant/binary_sensor/streamcap_node1/kitchen_trigger_dog/config"
        assert json.loads(await retained(broker, sensor_topic) or "{}")["state_topic"] == \
            state_topic  # retained: Home Assistant finds it when it starts later
        await asyncio.to_thread(subprocess.run, [
            "mosquitto_pub", "-h", broker.host, "-p", str(broker.port),
            "-t", "homeassistant/status", "-m", "online"], check=True, timeout=30)
        await until(lambda: len(col.on("/config")) == 10, "discovery after the birth message")
        # the trigger is removed at run time: its entities and its retained state go
        h.sink.triggers_changed({})
        await until(lambda: len([m for m in col.on("/config") if m.payload == b""]) == 2,
                    "empty discovery configs")
        assert await retained(broker, state_topic) is None
    states = [(m.payload, m.retain) for m in col.on("/trigger/dog")]
    assert states[:3] == [(b"OFF", False), (b"ON", False), (b"OFF", False)]
    assert states[3:] == [(b"", False)]  # the removal clears the retained state
    events = [m.json() for m in col.on("/event")]
    for m, frame in zip(col.on("/event"), events, strict=True):
        assert m.topic == f"{state_topic}/event" and not m.retain
        validator.validate(frame)
    assert [(e["state"], e["event_id"], e["fired_id"]) for e in events] == [
        ("on", f"{RUN}-dog-kitchen-2", None), ("off", f"{RUN}-dog-kitchen-3",
                                               f"{RUN}-dog-kitchen-2")]
    sensor = configs[sensor_topic]
    event = configs["homeassistant/event/streamcap_node1/kitchen_trigger_dog_event/config"]
    assert sensor.json()["state_topic"] == state_topic
    assert sensor.json()["device_class"] == "smoke"  # from the phrasing the daemon told
    assert event.json()["state_topic"] == f"{state_topic}/event"
    removed = {m.topic for m in col.on("/config") if m.payload == b""}
    assert removed == {sensor.topic, event.topic}
    assert h.metrics.counter("streamcap_mqtt_published_total", "", ["sink", "kind"]).value(
        "mqtt", "trigger") == 2


async def test_an_event_of_a_removed_trigger_does_not_bring_it_back(broker: Mosquitto,
                                                                   tmp_path: Path) -> None:
    """The removal is told directly, events come through the inbox: the off of a firing
    decided before the removal and handled after it is not published, and brings back
    neither the retained state nor the Home Assistant entities."""
    h = harness(broker, tmp_path / "state")
    dog_state = f"{PREFIX}/kitchen/trigger/dog"
    async with (Collector(broker, ("homeassistant/#", f"{PREFIX}/+/trigger/#")) as col,
                running(h) as inbox):
        await until(lambda: h.gauge("streamcap_mqtt_connected") == 1, "connected")
        h.sink.triggers_changed({"dog": spec("dog", "a dog barks")})
        inbox.offer(announcement(1))
        inbox.offer(trigger_event(2, TriggerState.ON))
        await until(lambda: len(col.on("/trigger/dog")) == 2, "the pair's OFF and ON")
        h.sink.triggers_changed({"cat": spec("cat", "a cat meows")})
        await until(lambda: len([m for m in col.on("/config") if m.payload == b""]) == 2,
                    "the removal of the pair's entities")
        inbox.offer(trigger_event(3, TriggerState.OFF, fired_id=f"{RUN}-dog-kitchen-2"))
        inbox.offer(announcement(1, trigger="cat"))  # after the late event, in order
        await until(lambda: len(col.on("/trigger/cat")) == 1, "cat's announced OFF")
        assert await retained(broker, dog_state) is None
        sensor = "homeassistant/binary_sensor/streamcap_node1/kitchen_trigger_dog/config"
        assert await retained(broker, sensor) is None
    assert [m.payload for m in col.on("/trigger/dog")] == [b"OFF", b"ON", b""]
    assert [m.json()["state"] for m in col.on("/trigger/dog/event")] == ["on"]


async def test_trigger_events_wait_in_the_outbox_while_the_broker_is_away(
        broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    b = broker_factory(workdir=tmp_path / "broker")
    topics = (f"{PREFIX}/+/trigger/#",)
    b.start()
    await _make_persistent_session(b, "observer", topics)
    b.stop()
    h = harness(b, tmp_path / "state", discovery=False)
    async with running(h) as inbox:  # no broker at all
        inbox.offer(announcement(1))
        inbox.offer(announcement(1, source="garden"))
        for n in range(2, 8, 2):
            inbox.offer(trigger_event(n, TriggerState.ON))
            inbox.offer(trigger_event(n + 1, TriggerState.OFF, fired_id=f"{RUN}-dog-kitchen-{n}"))
        inbox.offer(trigger_event(8, TriggerState.ON, source="garden"))
        await until(lambda: h.gauge("streamcap_mqtt_outbox_depth") == 9, "9 in the outbox")
        assert h.gauge("streamcap_mqtt_connected") == 0
        b.start()
        await until(lambda: h.gauge("streamcap_mqtt_outbox_depth") == 0, "empty outbox")
        async with Collector(b, topics, client_id="observer", persistent=True) as col:
            await until(lambda: len(first_occurrences(
                [str(m.json()["event_id"]) for m in col.on("/event")])) == 7, "7 events")
    ids = first_occurrences([str(m.json()["event_id"]) for m in col.on("/event")])
    assert ids == [f"{RUN}-dog-kitchen-{n}" for n in range(2, 8)] + [f"{RUN}-dog-garden-8"]
    assert await retained(b, f"{PREFIX}/kitchen/trigger/dog") == "OFF"
    assert await retained(b, f"{PREFIX}/garden/trigger/dog") == "ON"


async def test_a_trigger_removed_while_the_broker_is_away_stays_removed_after_a_restart(
        broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    """A firing waits in the outbox, its trigger is removed, the sink restarts: the event
    may still go out, but no retained state comes back for a pair no longer watched."""
    b = broker_factory(workdir=tmp_path / "broker")
    h = harness(b, tmp_path / "state", discovery=False)
    h.sink.triggers_changed({"dog": spec("dog", "a dog barks")})
    async with running(h) as inbox:  # no broker yet
        inbox.offer(trigger_event(2, TriggerState.ON))
        await until(lambda: h.gauge("streamcap_mqtt_outbox_depth") == 1, "1 in the outbox")
        h.sink.triggers_changed({"cat": spec("cat", "a cat meows")})
    b.start()
    async with running(h):  # the sink again, the record still in its outbox
        await until(lambda: h.gauge("streamcap_mqtt_outbox_depth") == 0, "empty outbox")
        assert await retained(b, f"{PREFIX}/kitchen/trigger/dog") is None
