"""Managing triggers over MQTT: a real daemon subprocess, a real mosquitto, a real aiomqtt client.

A trigger added on ``<prefix>/triggers/set`` is answered on ``<prefix>/triggers/result``,
shows in ``GET /api/triggers`` and in the retained ``<prefix>/triggers/config``, and survives
a restart of the daemon; a bad definition changes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import soundfile as sf
from conftest import free_port
from daemon_process import DaemonProcess, http_get, tiny_model_toml
from mosquitto import Mosquitto, mosquitto_path
from timing import scaled

from streamcap.sinks.mqtt_options import parse_options
from streamcap.stats import Metrics
from streamcap.triggers.mqtt_commands import (
    MAX_COMMAND_BYTES,
    RETAINED,
    Command,
    TriggerCommands,
    apply_command,
    parse_command,
)
from streamcap.triggers.registry import TriggerRegistry
from streamcap.triggers.spec import read_trigger

pytestmark = pytest.mark.skipif(mosquitto_path() is None,
                                reason="mosquitto is not installed")

NODE = "cmd-node"
PREFIX = f"streamcap/{NODE}"
RATE = 16000
IDS = itertools.count(1)


@dataclass
class Setup:
    tmp: Path
    broker: Mosquitto
    config: Path
    http_port: int
    daemon: DaemonProcess | None = None

    def start(self, log_name: str) -> DaemonProcess:
        self.daemon = DaemonProcess.start(self.config, env={"PYTHONUNBUFFERED": "1"},
                                          log=self.tmp / log_name, jsonl=self.tmp / "none.jsonl",
                                          http_port=self.http_port)
        daemon = self.daemon
        # the command topic is subscribed to once this is logged
        daemon.poll(lambda: (None, any(e.get("event") == "trigger commands: listening"
                                       for e in daemon.log_events())),
                    lambda _: f"the command topic was never subscribed:\n{daemon.log_tail()}")
        return daemon

    def triggers(self) -> dict[str, Any]:
        assert self.daemon is not None
        status, _, body = http_get(self.daemon.http("/api/triggers"))
        assert status == 200, body
        found: dict[str, Any] = json.loads(body)["triggers"]
        return found


def write_config(tmp: Path, broker: Mosquitto, http_port: int) -> Path:
    wav = tmp / "noise.wav"
    sf.write(wav, np.random.default_rng(3).normal(0, 0.05, 4 * RATE).astype(np.float32), RATE)
    config = tmp / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "{NODE}"
state_dir = "{tmp / 'state'}"
log_format = "json"
stop_timeout_s = 20

{tiny_model_toml()}
[sources.porch]
uri = "file:{wav}?loop=true"
window_s = 10
hop_s = 10

[sinks.broker]
plugin = "mqtt"
host = "127.0.0.1"
port = {broker.port}
reconnect_initial_s = 0.2
reconnect_max_s = 1.0
outbox_fsync = false
discovery = false

[triggers.dog]
text = ["a dog barks"]

[http]
port = {http_port}
""", encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("cmd")
    broker = Mosquitto(workdir=tmp / "mosquitto")
    broker.start()
    http_port = free_port()
    found = Setup(tmp, broker, write_config(tmp, broker, http_port), http_port)
    try:
        found.start("daemon-1.log")
        yield found
    finally:
        if found.daemon is not None:
            found.daemon.kill()
        broker.stop(kill=True)
        shutil.rmtree(tmp / "mosquitto", ignore_errors=True)


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(setup.broker.host, setup.broker.port,
                              identifier="test-commander") as c:
        await c.subscribe(f"{PREFIX}/triggers/#", qos=1)
        yield c


async def next_on(client: aiomqtt.Client, topic: str, *, where: str = "") -> dict[str, Any]:
    """The next message on ``topic`` whose payload holds ``where`` (JSON)."""
    async with asyncio.timeout(scaled(60)):
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            if message.topic.matches(topic) and where in payload.decode():
                found: dict[str, Any] = json.loads(payload)
                return found
    raise AssertionError("the client's messages ended")


async def command(client: aiomqtt.Client, body: dict[str, object]) -> dict[str, Any]:
    """Publish ``body`` with a fresh id; its result."""
    request_id = f"req-{next(IDS)}"
    await client.publish(f"{PREFIX}/triggers/set",
                         json.dumps({**body, "id": request_id}).encode(), qos=1)
    return await next_on(client, f"{PREFIX}/triggers/result", where=request_id)


async def raw_command(client: aiomqtt.Client, payload: bytes) -> dict[str, Any]:
    """Publish ``payload`` as it is; the next result."""
    await client.publish(f"{PREFIX}/triggers/set", payload, qos=1)
    return await next_on(client, f"{PREFIX}/triggers/result")


async def test_a_trigger_added_over_mqtt_is_live_retained_and_survives_a_restart(
        setup: Setup, client: aiomqtt.Client) -> None:
    config = await next_on(client, f"{PREFIX}/triggers/config")  # retained: here at once
    assert set(config["triggers"]) == {"dog"}
    assert config["triggers"]["dog"]["origin"] == "config"
    glass = {"text": ["glass breaks"], "sources": ["porch"], "threshold": 0.3}
    result = await command(client, {"name": "glass", "trigger": glass})
    assert result["ok"] is True and result["action"] == "added" and result["name"] == "glass"
    config = await next_on(client, f"{PREFIX}/triggers/config", where='"glass"')
    assert config["triggers"]["glass"]["definition"]["threshold"] == 0.3
    assert config["triggers"]["glass"]["origin"] == "runtime"
    live = setup.triggers()
    assert set(live) == {"dog", "glass"} and live["glass"]["sources"] == ["porch"]

    assert setup.daemon is not None and setup.daemon.stop() == 0
    setup.start("daemon-2.log")
    assert setup.triggers()["glass"]["definition"]["text"] == ["glass breaks"]
    async with aiomqtt.Client(setup.broker.host, setup.broker.port,
                              identifier="test-after-restart") as fresh:
        await fresh.subscribe(f"{PREFIX}/triggers/config", qos=1)
        config = await next_on(fresh, f"{PREFIX}/triggers/config")
    assert set(config["triggers"]) == {"dog", "glass"}


async def test_bad_commands_change_nothing_and_say_why(setup: Setup,
                                                       client: aiomqtt.Client) -> None:
    before = setup.triggers()
    result = await command(client, {"name": "dog", "trigger": {
        "text": ["a dog barks"], "min_hits": 5, "of_windows": 3, "sources": ["garage"]}})
    assert result["ok"] is False and result["name"] == "dog"
    assert result["errors"] == ["triggers.dog.min_hits: must be <= of_windows (got 5 > 3)",
                                "triggers.dog.sources: no such source 'garage' (sources: porch)"]
    result = await command(client, {"name": "nothing", "remove": True})
    assert result["errors"] == ["triggers.nothing: no such trigger"]
    result = await command(client, {"name": "dog", "trigger": {"text": ["x"]}, "remove": True})
    assert result["ok"] is False
    assert setup.triggers() == before
    # removing works, and the removal is announced on the retained config
    result = await command(client, {"name": "dog", "remove": True})
    assert result == {"name": "dog", "id": result["id"], "ok": True, "action": "removed"}
    assert "dog" not in setup.triggers()


@pytest.mark.parametrize(("payload", "error"), [
    (b"not json", "the command is not valid JSON"),
    (b"[1]", "the command must be a JSON object"),
    (b"\xff", "the command is not UTF-8"),
    (b'{"name": "dog", "trigger": {"text": ["a"], "threshold": NaN}}',
     "the command holds NaN is not a JSON number"),
    (b'{"name":"dog","trigger":{"text":' + b"[" * 31 + b'"a"' + b"]" * 31 + b"}}",
     "the command nests deeper than 32 levels"),
    (b'{"name": "dog"}', 'expected "trigger": {...} to add or change it, or "remove": true'),
    (b'{"trigger": {}}', "name: expected the trigger's name"),
    (b'{"name": "dog", "remove": false}', "remove: expected true"),
    (b'{"name": "dog", "trigger": [1]}', "triggers.dog: expected a table"),
    (b'{"name": "dog", "remove": true, "extra": 1}',
     "'extra': unknown key (known keys: id, name, remove, trigger)"),
    (b'{"name": "dog", "remove": true, "id": 5}',
     "id: expected a string of at most 64 characters"),
    (b"x" * (MAX_COMMAND_BYTES + 1), f"the command is larger than {MAX_COMMAND_BYTES} bytes"),
])
def test_parse_command_refusals(payload: bytes, error: str) -> None:
    command_, result = parse_command(payload)
    assert command_ is None and result["ok"] is False and result["errors"] == [error]


def test_parse_command_accepts_set_and_remove() -> None:
    assert parse_command(b'{"name": "dog", "trigger": {"text": ["a"]}, "id": "7"}') == (
        Command("dog", {"text": ["a"]}, "7"), {})
    assert parse_command(b'{"name": "dog", "remove": true}') == (Command("dog", None), {})


HUGE = 10 ** 400  # a valid JSON integer; float(HUGE) overflows


async def test_commands_that_used_to_end_the_listener_are_refused_and_it_goes_on(
        setup: Setup, client: aiomqtt.Client) -> None:
    before = setup.triggers()
    result = await command(client, {"name": "cat", "trigger": {"text": ["a cat"],
                                                               "threshold": HUGE}})
    assert result["ok"] is False
    assert result["errors"][0].startswith("triggers.cat.threshold: must be between -1 and 1")
    # nested past what the JSON reader takes and past what json.loads takes
    for depth in (950, 20_000):
        deep = b'{"name":"cat","trigger":{"text":' + b"[" * depth + b'"a"' + b"]" * depth + b"}}"
        result = await raw_command(client, deep)
        assert result == {"name": None, "id": None, "ok": False,
                          "errors": ["the command nests deeper than 32 levels"]}
    assert setup.triggers() == before
    # the listener is still there
    result = await command(client, {"name": "cow", "trigger": {"text": ["a cow moos"]}})
    assert result["ok"] is True and "cow" in setup.triggers()
    assert (await command(client, {"name": "cow", "remove": True}))["ok"] is True


def test_a_deeply_nested_definition_is_refused_at_every_depth(tmp_path: Path) -> None:
    registry = TriggerRegistry.open({}, ("porch",), tmp_path)
    for depth in range(30, 1000, 7):
        payload = (b'{"name":"dog","trigger":{"text":' + b"[" * depth + b'"a"' + b"]" * depth
                   + b"}}")
        cmd, result = parse_command(payload)
        if cmd is not None:
            result = apply_command(registry, cmd)
        assert result["ok"] is False, depth
    assert registry.specs() == {}


async def test_a_retained_command_is_not_applied_again_on_connect(setup: Setup,
                                                                  tmp_path: Path) -> None:
    """A retained command would undo later changes at every reconnect: it is refused."""
    node = "retain-node"
    topic = f"streamcap/{node}/triggers"
    dog = read_trigger("dog", {"text": ["a dog barks"]}, "triggers.dog").result()
    registry = TriggerRegistry.open({"dog": dog}, ("porch",), tmp_path)
    options = parse_options("mqtt", {"host": setup.broker.host, "port": setup.broker.port,
                                     "reconnect_initial_s": 0.05, "reconnect_max_s": 0.5})
    commands = TriggerCommands(registry, options, instance="mqtt", node_id=node,
                               metrics=Metrics())
    async with aiomqtt.Client(setup.broker.host, setup.broker.port,
                              identifier="test-retainer") as c:
        await c.publish(f"{topic}/set", b'{"name": "dog", "remove": true}', qos=1, retain=True)
        await c.subscribe(f"{topic}/result", qos=1)
        task = asyncio.create_task(commands.run(), name="test-commands")
        try:
            result = await next_on(c, f"{topic}/result")
            assert result == {"name": None, "id": None, "ok": False, "errors": [RETAINED]}
            assert "dog" in registry.specs()
            # an ordinary command is still applied
            await c.publish(f"{topic}/set", b'{"name": "cat", "trigger": {"text": ["a"]}}',
                            qos=1)
            assert (await next_on(c, f"{topic}/result"))["ok"] is True
            assert set(registry.specs()) == {"dog", "cat"}
        finally:
            await cancel(task)
            await c.publish(f"{topic}/set", b"", qos=1, retain=True)  # clear it


async def cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it ends: on Python 3.11, a cancellation that arrives as one of
    the client library's publishes is acknowledged can be lost (asyncio.wait_for)."""
    async with asyncio.timeout(scaled(60)):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1)
