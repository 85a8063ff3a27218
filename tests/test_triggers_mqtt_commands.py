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

from streamcap.triggers.mqtt_commands import MAX_COMMAND_BYTES, Command, parse_command

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
    (b"not json", "the command is not a JSON object in UTF-8"),
    (b"[1]", "the command is not a JSON object in UTF-8"),
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
