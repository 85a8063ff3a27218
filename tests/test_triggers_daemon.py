"""The trigger path end to end: ``streamcap run`` with the demo bundle and two looping sounds.

One daemon serves the module: a synthesized siren and synthesized rain, each
a looping file played in real time, the demo bundle (whose retriever was
trained on such sounds) on one CPU thread, a trigger ``siren`` = "a siren
wails" with a measured fixed threshold watching both, a WebSocket sink and HTTP.
A real WebSocket client subscribed to kind ``trigger`` sees the siren
firing on the siren source, never on the rain (the state announcements go
out at start, before a client can connect: the detector tests check them).
An unusable example file is refused at start with exit status 2.

Waits are generous upper bounds; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import free_port
from daemon_process import WAIT_S, DaemonProcess, http_get, metric_samples, streamcap_command
from timing import scaled
from websockets.asyncio.client import connect

from streamcap.training.data.corpus_sounds import rain, siren

pytestmark = pytest.mark.slow

RATE = 32000
MODEL = ('[model]\nbundle = "demo"\ndevice = "cpu"\nprecision = "fp32"\nthreads = 1\n\n'
         '[model.decoding]\nn_candidates = 2\nseed = 0\n')


def write_sound(path: Path, kind: str) -> Path:
    make = {"siren": siren, "rain": rain}[kind]
    sf.write(path, 0.3 * make(np.random.default_rng(3), 12 * RATE, RATE), RATE)
    return path


def config_text(tmp: Path, *, ws_port: int, http_port: int, triggers: str) -> str:
    return f"""
[daemon]
node_id = "trig"
state_dir = "{tmp / 'state'}"
log_format = "json"
max_pending_windows = 1
stop_timeout_s = 20

{MODEL}
[sources.siren]
uri = "file:{tmp / 'siren.wav'}?loop=true"
window_s = 10
hop_s = 10

[sources.rain]
uri = "file:{tmp / 'rain.wav'}?loop=true"
window_s = 10
hop_s = 10

{triggers}

[sinks.ws]
plugin = "websocket"
port = {ws_port}

[http]
port = {http_port}
"""


# A fixed threshold: the test is about the path, not the "auto" rule (tested on its own).
# Measured on the demo bundle (streamcap-demo-v2) with these sounds, 5 s windows: "a siren
# wails" scores 0.63-0.68 on the siren and 0.11-0.43 on the rain; "auto" starts cold (no
# history yet) and its background margin alone let the rain's first windows fire.
SIREN = """
[triggers.siren]
text = ["a siren wails"]
threshold = 0.5
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, int]]:
    tmp = tmp_path_factory.mktemp("triggers")
    write_sound(tmp / "siren.wav", "siren")
    write_sound(tmp / "rain.wav", "rain")
    ws_port, http_port = free_port(), free_port()
    config = tmp / "streamcap.toml"
    config.write_text(config_text(tmp, ws_port=ws_port, http_port=http_port, triggers=SIREN),
                      encoding="utf-8")
    proc = DaemonProcess.start(config, env={}, log=tmp / "daemon.log",
                               jsonl=tmp / "archive.jsonl", http_port=http_port)
    try:
        yield proc, ws_port
    finally:
        proc.kill()


async def collect_triggers(url: str, until: Any, timeout_s: float) -> list[dict[str, Any]]:
    """Trigger frames of a WebSocket client subscribed to kind "trigger", until ``until(frames)``."""
    frames: list[dict[str, Any]] = []
    async with connect(url, open_timeout=scaled(30)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "kinds": ["trigger"]}))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not until(frames):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=left)
            except TimeoutError:
                break
            frame = json.loads(raw)
            if frame.get("type") == "trigger":
                frames.append(frame)
    return frames


def wait_http(proc: DaemonProcess) -> None:
    """Until /metrics answers (the model loads first)."""
    def probe() -> tuple[None, bool]:
        try:
            return None, http_get(proc.http("/metrics"))[0] == 200
        except OSError:
            return None, False

    proc.poll(probe, lambda _: f"HTTP never answered:\n{proc.log_tail()}", interval_s=0.5)


def test_a_siren_fires_on_the_siren_source_and_not_on_the_rain(
        daemon: tuple[DaemonProcess, int]) -> None:
    proc, ws_port = daemon
    wait_http(proc)
    proc.wait_metric("streamcap_trigger_windows_total", '{source="rain"}', lambda v: v >= 1)

    def fired(frames: list[dict[str, Any]]) -> bool:
        return any(f["state"] == "on" and f["source_id"] == "siren" for f in frames)

    frames = asyncio.run(collect_triggers(f"ws://127.0.0.1:{ws_port}/", fired, WAIT_S))
    assert fired(frames), f"no siren firing within {WAIT_S} s: {frames}\n{proc.log_tail()}"
    on = next(f for f in frames if f["state"] == "on")
    assert on["trigger"] == "siren" and on["fired_id"] is None
    run_id = on["run_id"]
    assert on["event_id"].startswith(f"{run_id}:siren:siren:")
    assert on["score"] >= on["threshold"] and on["end_s"] > on["start_s"]
    # and after at least 20 more windows of the rain, it never fired there
    _, _, text = http_get(proc.http("/metrics"))
    seen = metric_samples(text, "streamcap_trigger_windows_total")['{source="rain"}']
    text = proc.wait_metric("streamcap_trigger_windows_total", '{source="rain"}',
                            lambda v: v >= seen + 20)
    assert metric_samples(text, "streamcap_trigger_fired_total")[
        '{source="rain",trigger="siren"}'] == 0
    assert metric_samples(text, "streamcap_trigger_fired_total")[
        '{source="siren",trigger="siren"}'] >= 1
    assert metric_samples(text, "streamcap_trigger_score_count")['{trigger="siren"}'] >= 20
    assert '{reason="behind",source="rain"}' in metric_samples(
        text, "streamcap_trigger_windows_dropped_total")
    assert '{source="rain",trigger="siren"}' in metric_samples(text, "streamcap_trigger_state")
    rain_frames = [f for f in asyncio.run(collect_triggers(
        f"ws://127.0.0.1:{ws_port}/", lambda _: False, scaled(3))) if f["source_id"] == "rain"]
    assert not [f for f in rain_frames if f["state"] == "on"]


def test_stop_keeps_the_learned_history(daemon: tuple[DaemonProcess, int]) -> None:
    proc, _ = daemon
    assert proc.stop() == 0
    saved = json.loads((proc.config.parent / "state" / "triggers" / "auto.json").read_text())
    rain_history = saved["histories"]["rain"]["siren"]["history"]
    assert rain_history and all(math.isfinite(v) for v in rain_history)


def run_refused(tmp: Path, triggers: str) -> subprocess.CompletedProcess[str]:
    write_sound(tmp / "siren.wav", "siren")
    write_sound(tmp / "rain.wav", "rain")
    config = tmp / "streamcap.toml"
    config.write_text(config_text(tmp, ws_port=free_port(), http_port=free_port(),
                                  triggers=triggers), encoding="utf-8")
    return subprocess.run([*streamcap_command(), "run", "--config", str(config)],
                          check=False, capture_output=True, text=True, timeout=WAIT_S, cwd=tmp,
                          env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})


def test_an_example_that_is_not_a_regular_file_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    done = run_refused(tmp_path, '[triggers.odd]\ntext = ["a siren"]\nexamples = ["clips"]\n')
    assert done.returncode == 2, done.stderr[-2000:]
    assert "triggers.odd.examples[0]" in done.stderr and "directory" in done.stderr
