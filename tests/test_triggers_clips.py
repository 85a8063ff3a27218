"""Trigger event clips: ``clip_s`` is read and checked everywhere a trigger is defined, the
recorder keeps and writes the right audio, ``/api/clips`` serves it; and end to end, a
real ``streamcap run`` whose siren trigger has ``clip_s`` saves the clip and serves it.

Unit tests feed synthetic blocks (a ramp, so that every sample says where it came
from); the daemon test reuses the trigger daemon test's sounds, demo bundle and
fixed threshold. Waits are generous upper bounds; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from conftest import free_port
from daemon_process import WAIT_S, DaemonProcess, http_get, metric_samples
from timing import scaled
from websockets.asyncio.client import connect

from streamcap.config import parse_config
from streamcap.errors import ConfigError
from streamcap.http import HealthReport, HttpServer
from streamcap.messages import AudioBlock, TriggerEvent, TriggerState, make_block
from streamcap.stats import Metrics
from streamcap.training.data.corpus_sounds import siren
from streamcap.triggers.clips import ClipRecorder, clip_name, clip_path, clip_plan
from streamcap.triggers.clips_api import ClipsApi
from streamcap.triggers.registry import TriggerRegistry, spec_table
from streamcap.triggers.spec import TriggerSpec, read_trigger

RATE = 8000
RUN = "3f2a9c51d07e4b88"
SOURCES = ("porch", "kitchen")

# ----------------------------------------------------------------------------- clip_s


def read(table: dict[str, object]) -> tuple[TriggerSpec, tuple[str, ...]]:
    got = read_trigger("dog", {"text": ["a dog barks"], **table}, "triggers.dog")
    return got.value, got.problems


@pytest.mark.parametrize(("clip_s", "expected"), [
    ([2, 5], (2.0, 5.0)), ([0, 60], (0.0, 60.0)), ([30, 0], (30.0, 0.0)),
    ([1.5, 2.25], (1.5, 2.25)), (None, None)])
def test_clip_s_in_range_is_read_as_two_floats(clip_s: object,
                                               expected: tuple[float, float] | None) -> None:
    spec, problems = read({"clip_s": clip_s})
    assert problems == () and spec.clip_s == expected


def test_no_clip_s_means_no_clip() -> None:
    spec, problems = read({})
    assert problems == () and spec.clip_s is None


@pytest.mark.parametrize(("clip_s", "says"), [
    ([31, 5], "pre must be between 0 and 30 seconds"),
    ([5, 61], "post must be between 0 and 60 seconds"),
    ([-1, 5], "pre must be between 0 and 30 seconds"),
    ([5, float("nan")], "post must be between 0 and 60 seconds"),
    ([10 ** 400, 1], "pre must be between 0 and 30 seconds"),
    ([0, 0], "pre + post must be > 0"),
    ([5], "expected [pre, post]"),
    ([1, 2, 3], "expected [pre, post]"),
    (5, "expected [pre, post]"),
    ("5,5", "expected [pre, post]"),
    ([True, 5], "pre: expected [pre, post]"),
    (["5", 5], "pre: expected [pre, post]"),
])
def test_a_bad_clip_s_is_one_dotted_problem(clip_s: object, says: str) -> None:
    _spec, problems = read({"clip_s": clip_s})
    assert len(problems) == 1, problems
    assert problems[0].startswith("triggers.dog.clip_s: ") and says in problems[0]
    assert len(problems[0]) < 300  # a huge integer is not spelled out


def test_a_bad_clip_s_in_the_config_file_is_a_config_error() -> None:
    text = ('[sources.porch]\nuri = "file:/x.wav"\n'
            '[triggers.dog]\ntext = ["a dog barks"]\nclip_s = [45, 5]\n')
    with pytest.raises(ConfigError, match=r"triggers\.dog\.clip_s: pre must be between 0 and 30"):
        parse_config(tomllib.loads(text))


def test_runtime_changes_check_clip_s_and_keep_it_across_a_restart(tmp_path: Path) -> None:
    """The HTTP API and the MQTT commands both change triggers through the registry."""
    config = parse_config({"sources": {s: {"uri": "file:/x.wav"} for s in SOURCES}})
    registry = TriggerRegistry.open(config.triggers, SOURCES, tmp_path)
    with pytest.raises(ConfigError) as refused:
        registry.put("dog", {"text": ["a dog barks"], "clip_s": [2, 99]})
    assert refused.value.problems == [
        "triggers.dog.clip_s: post must be between 0 and 60 seconds (got [2, 99])"]
    registry.put("dog", {"text": ["a dog barks"], "clip_s": [2, 5]})
    assert spec_table(registry.specs()["dog"])["clip_s"] == [2.0, 5.0]
    again = TriggerRegistry.open(config.triggers, SOURCES, tmp_path)
    assert again.specs()["dog"].clip_s == (2.0, 5.0)
    registry.put("cat", {"text": ["a cat"]})
    assert "clip_s" not in spec_table(registry.specs()["cat"])  # unset: the table as before


def test_clip_plan_keeps_the_longest_pre_per_watched_source() -> None:
    specs = {"a": read_trigger("a", {"text": ["x"], "clip_s": [3, 1], "sources": ["porch"]},
                               "t").result(),
             "b": read_trigger("b", {"text": ["y"], "clip_s": [5, 1]}, "t").result(),
             "c": read_trigger("c", {"text": ["z"], "sources": ["kitchen"]}, "t").result()}
    assert clip_plan(specs, SOURCES) == {"porch": 5.0, "kitchen": 5.0}
    assert clip_plan({"a": specs["a"], "c": specs["c"]}, SOURCES) == {"porch": 3.0}
    assert clip_plan({"c": specs["c"]}, SOURCES) == {}


@pytest.mark.parametrize("name", [
    "../x.flac", f"{RUN}:dog:porch:1/../../x.flac", f"{RUN}:dog:porch:1.wav", ".flac",
    f"{RUN}:dog:porch.flac", f"{RUN}:dog:porch:x.flac", f"{RUN}:d g:porch:1.flac",
    f"{RUN}:dog:porch:1.flac\x00", "", f"{RUN}:dog:porch:1"])
def test_only_an_event_id_and_flac_name_a_clip(name: str) -> None:
    assert clip_path(Path("/state/clips"), name) is None


def test_an_event_id_names_its_clip() -> None:
    event_id = f"{RUN}:dog:porch:12"
    assert clip_name(event_id) == f"{event_id}.flac"
    assert clip_path(Path("/s/clips"), f"{event_id}.flac") == Path(f"/s/clips/{event_id}.flac")
    assert clip_name("a/b") is None


# ----------------------------------------------------------------------------- recorder


def ramp_block(source: str, k: int, *, seconds: float = 1.0, epoch: int = 0) -> AudioBlock:
    """Block ``k`` of a source: samples k*n .. (k+1)*n-1 of a slow ramp, scaled into
    [-1, 1), so that a clip's samples tell which blocks they came from."""
    n = int(seconds * RATE)
    index = np.arange(k * n, (k + 1) * n)
    return make_block(source_id=source, start_sample=k * n, sample_rate_hz=RATE,
                      samples=ramp(index), captured_at=1_700_000_000.0 + k * seconds,
                      epoch=epoch)


def ramp(index: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    return ((index % 40000) / 40000.0 - 0.5).astype(np.float32)


def on_event(source: str = "porch", n: int = 1, trigger: str = "dog") -> TriggerEvent:
    return TriggerEvent(event_id=f"{RUN}:{trigger}:{source}:{n}", trigger=trigger,
                        source_id=source, state=TriggerState.ON, score=0.7, threshold=0.5,
                        start_s=0.0, end_s=5.0, captured_at=1_700_000_005.0, run_id=RUN)


def recorder(tmp_path: Path, *, clip_s: list[float] | None = (2, 3),  # type: ignore[assignment]
             sources: list[str] | None = None, max_active: int = 4,
             max_bytes: int = 32 * 1024 * 1024, guard: Any = None,
             metrics: Metrics | None = None) -> ClipRecorder:
    rec = ClipRecorder(tmp_path / "clips", sources=SOURCES, metrics=metrics or Metrics(),
                       max_active=max_active, max_bytes=max_bytes, speech_guard=guard)
    table: dict[str, object] = {"text": ["a dog barks"], "sources": sources or ["porch"]}
    if clip_s is not None:
        table["clip_s"] = list(clip_s)
    rec.set_triggers({"dog": read_trigger("dog", table, "triggers.dog").result()})
    return rec


def read_clip(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    data, rate = sf.read(path, dtype="float32")
    return data, int(rate)


async def test_a_clip_holds_pre_then_post_seconds_as_0600_flac(tmp_path: Path) -> None:
    metrics = Metrics()
    rec = recorder(tmp_path, clip_s=[2, 3], metrics=metrics)
    assert rec.watched() == {"porch": 2.0}
    for k in range(5):  # 5 s of audio; 2 s are kept
        rec.feed(ramp_block("porch", k))
        rec.feed(ramp_block("kitchen", k))  # not watched: nothing kept
    event = rec.start(on_event())
    assert event.clip == f"{RUN}:dog:porch:1.flac"
    for k in range(5, 10):  # 3 s more are wanted, 5 come
        rec.feed(ramp_block("porch", k))
    assert await rec.close(scaled(30)) == 0
    path = tmp_path / "clips" / event.clip
    data, rate = read_clip(path)
    assert rate == RATE and data.size == 5 * RATE
    # seconds 3-4 (pre, the last 2 s before the event) then 5-7 (post)
    expected = ramp(np.arange(3 * RATE, 8 * RATE))
    assert np.max(np.abs(data - expected)) < 1e-3  # 16-bit FLAC
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert metric_samples(metrics.render(), "streamcap_clips_total")['{result="written"}'] == 1


async def test_no_clip_without_clip_s_for_an_off_event_or_for_another_source(
        tmp_path: Path) -> None:
    rec = recorder(tmp_path, clip_s=None)
    assert rec.watched() == {}  # no audio is kept at all
    rec.feed(ramp_block("porch", 0))
    assert rec.start(on_event()).clip is None
    rec = recorder(tmp_path, clip_s=[1, 1])
    rec.feed(ramp_block("porch", 0))
    off = TriggerEvent(event_id=f"{RUN}:dog:porch:2", trigger="dog", source_id="porch",
                       state=TriggerState.OFF, score=0.1, threshold=0.5, start_s=0, end_s=5,
                       captured_at=1.0, fired_id=f"{RUN}:dog:porch:1")
    assert rec.start(off).clip is None
    assert rec.start(on_event(source="kitchen")).clip is None  # the trigger watches porch only
    assert rec.start(on_event(trigger="cat")).clip is None
    assert await rec.close(scaled(30)) == 0
    assert not (tmp_path / "clips").exists()


async def test_a_trigger_removed_at_run_time_forgets_the_audio(tmp_path: Path) -> None:
    rec = recorder(tmp_path, clip_s=[2, 1])
    rec.feed(ramp_block("porch", 0))
    rec.set_triggers({})
    assert rec.watched() == {}
    assert rec.start(on_event()).clip is None


async def test_beyond_max_active_a_firing_gets_no_clip_and_is_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    rec = recorder(tmp_path, clip_s=[1, 5], max_active=1, metrics=metrics)
    rec.feed(ramp_block("porch", 0))
    assert rec.start(on_event(n=1)).clip is not None
    assert rec.start(on_event(n=2)).clip is None
    assert metric_samples(metrics.render(), "streamcap_clips_total")['{result="busy"}'] == 1
    await rec.close(scaled(30))


async def test_a_source_that_stops_mid_clip_writes_what_it_has(tmp_path: Path) -> None:
    rec = recorder(tmp_path, clip_s=[2, 10])
    for k in range(3):
        rec.feed(ramp_block("porch", k))
    event = rec.start(on_event())
    rec.feed(ramp_block("porch", 3))
    rec.source_ended("porch")
    assert await rec.close(scaled(30)) == 0
    assert event.clip is not None
    data, _ = read_clip(tmp_path / "clips" / event.clip)
    assert np.max(np.abs(data - ramp(np.arange(1 * RATE, 4 * RATE)))) < 1e-3


async def test_a_new_epoch_ends_the_clip(tmp_path: Path) -> None:
    rec = recorder(tmp_path, clip_s=[1, 10])
    rec.feed(ramp_block("porch", 0))
    event = rec.start(on_event())
    rec.feed(ramp_block("porch", 1))
    rec.feed(ramp_block("porch", 0, epoch=1))  # the source restarted
    await rec.close(scaled(30))
    assert event.clip is not None
    data, _ = read_clip(tmp_path / "clips" / event.clip)
    assert data.size == 2 * RATE


async def test_the_byte_cap_cuts_a_clip_short(tmp_path: Path) -> None:
    rec = recorder(tmp_path, clip_s=[1, 60], max_bytes=4 * 3 * RATE)  # 3 s of float32
    for k in range(4):
        rec.feed(ramp_block("porch", k))
    event = rec.start(on_event())
    for k in range(4, 10):
        rec.feed(ramp_block("porch", k))
    await rec.close(scaled(30))
    assert event.clip is not None
    data, _ = read_clip(tmp_path / "clips" / event.clip)
    assert data.size == 3 * RATE


class FakeGuard:
    def __init__(self, speech: bool) -> None:
        self.speech = speech
        self.heard: list[int] = []

    def holds_speech(self, samples: npt.ArrayLike, rate_hz: int) -> bool:
        self.heard.append(np.asarray(samples).size)
        return self.speech


async def test_a_clip_with_speech_is_not_written_when_the_guard_says_so(tmp_path: Path) -> None:
    metrics = Metrics()
    guard = FakeGuard(speech=True)
    rec = recorder(tmp_path, clip_s=[1, 1], guard=guard, metrics=metrics)
    rec.feed(ramp_block("porch", 0))
    event = rec.start(on_event())
    rec.feed(ramp_block("porch", 1))
    await rec.close(scaled(30))
    assert guard.heard == [2 * RATE]  # the whole clip was judged
    assert event.clip is not None and not (tmp_path / "clips" / event.clip).exists()
    assert metric_samples(metrics.render(), "streamcap_clips_total")['{result="speech"}'] == 1


async def test_a_write_failure_is_counted_and_the_recorder_goes_on(tmp_path: Path) -> None:
    metrics = Metrics()
    (tmp_path / "clips").write_text("a file where the folder should be", encoding="utf-8")
    rec = recorder(tmp_path, clip_s=[1, 0], metrics=metrics)
    rec.feed(ramp_block("porch", 0))
    assert rec.start(on_event()).clip is not None
    await rec.close(scaled(30))
    assert metric_samples(metrics.render(), "streamcap_clips_total")['{result="failed"}'] == 1


# ----------------------------------------------------------------------------- the route


@pytest.fixture
async def clips_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    server = HttpServer("127.0.0.1", 0, metrics=Metrics(),
                        health=lambda: HealthReport(live=True, ready=True), page_config=dict)
    clips = tmp_path / "clips"
    ClipsApi(clips).install(server)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.bound_port}", clips
    finally:
        await server.close()


async def test_the_route_serves_a_clip_as_flac_and_404s_otherwise(
        clips_server: tuple[str, Path], tmp_path: Path) -> None:
    base, clips = clips_server
    name = f"{RUN}:dog:porch:1.flac"
    clips.mkdir()
    sf.write(clips / name, ramp(np.arange(RATE)), RATE, format="FLAC")
    (tmp_path / "secret.flac").write_bytes(b"not for you")
    (clips / f"{RUN}:dog:porch:2.flac").symlink_to(tmp_path / "secret.flac")
    timeout = aiohttp.ClientTimeout(total=scaled(30))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{base}/api/clips/{name}") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "audio/flac"
            body = await response.read()
        data, rate = sf.read(io.BytesIO(body), dtype="float32")
        assert rate == RATE and data.size == RATE
        for bad in (f"{RUN}:dog:porch:9.flac", f"{RUN}:dog:porch:2.flac", "x.flac",
                    "..%2Fsecret.flac", "%2E%2E%2F%2E%2E%2Fsecret.flac"):
            async with session.get(f"{base}/api/clips/{bad}") as response:
                assert response.status == 404, bad
                payload = json.loads(await response.text())
                assert payload["error"] == "not_found"


# ----------------------------------------------------------------------------- the daemon

MODEL = ('[model]\nbundle = "demo"\ndevice = "cpu"\nprecision = "fp32"\nthreads = 1\n\n'
         '[model.decoding]\nn_candidates = 2\nseed = 0\n')


def daemon_config(tmp: Path, *, http_port: int, ws_port: int) -> str:
    # The fixed threshold of tests/test_triggers_daemon.py (measured there on these sounds).
    return f"""
[daemon]
node_id = "clips"
state_dir = "{tmp / 'state'}"
log_format = "json"
max_pending_windows = 1
stop_timeout_s = 20

{MODEL}
[privacy]
speech = "mark"

[sources.siren]
uri = "file:{tmp / 'siren.wav'}?loop=true"
window_s = 10
hop_s = 10

[triggers.siren]
text = ["a siren wails"]
threshold = 0.5
clip_s = [2, 2]

[sinks.archive]
plugin = "jsonl"
path = "{tmp / 'archive.jsonl'}"
accepts = ["caption"]

[sinks.ws]
plugin = "websocket"
port = {ws_port}

[http]
port = {http_port}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, int]]:
    tmp = tmp_path_factory.mktemp("clips")
    sf.write(tmp / "siren.wav", 0.3 * siren(np.random.default_rng(3), 12 * 32000, 32000), 32000)
    http_port, ws_port = free_port(), free_port()
    config = tmp / "streamcap.toml"
    config.write_text(daemon_config(tmp, http_port=http_port, ws_port=ws_port),
                      encoding="utf-8")
    proc = DaemonProcess.start(config, env={}, log=tmp / "daemon.log",
                               jsonl=tmp / "archive.jsonl", http_port=http_port)
    try:
        yield proc, ws_port
    finally:
        proc.kill()


async def first_on_with_clip(url: str, timeout_s: float) -> dict[str, Any] | None:
    """The first "on" trigger frame a WebSocket client subscribed to triggers receives."""
    async with connect(url, open_timeout=scaled(30)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "kinds": ["trigger"]}))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=left))
            except TimeoutError:
                return None
            if frame.get("type") == "trigger" and frame.get("state") == "on":
                return dict(frame)
    return None


def wait_http(proc: DaemonProcess) -> None:
    """Until /metrics answers (the model loads first)."""
    def probe() -> tuple[None, bool]:
        try:
            return None, http_get(proc.http("/metrics"))[0] == 200
        except OSError:
            return None, False

    proc.poll(probe, lambda _: f"HTTP never answered:\n{proc.log_tail()}", interval_s=0.5)


@pytest.mark.slow
def test_a_firing_saves_its_clip_and_the_api_serves_it(
        daemon: tuple[DaemonProcess, int]) -> None:
    proc, ws_port = daemon
    wait_http(proc)
    on = asyncio.run(first_on_with_clip(f"ws://127.0.0.1:{ws_port}/", WAIT_S))
    assert on is not None, f"no firing within {WAIT_S} s\n{proc.log_tail()}"
    assert on["trigger"] == "siren" and on["clip"] == f"{on['event_id']}.flac"
    url = proc.http(f"/api/clips/{on['clip']}")

    def served() -> tuple[tuple[int, str, bytes], bool]:
        try:
            with urllib.request.urlopen(url, timeout=scaled(30)) as response:
                got = response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as exc:  # 404 until the clip is written
            return (exc.code, "", b""), False
        return got, got[0] == 200

    _, content_type, body = proc.poll(
        served, lambda got: f"{url} answered {got[:2]}\n{proc.log_tail()}", interval_s=0.5)
    assert content_type == "audio/flac"
    path = proc.config.parent / "state" / "clips" / on["clip"]
    assert body == path.read_bytes()
    data, rate = sf.read(io.BytesIO(body), dtype="float32")
    assert rate == 32000 and 0 < data.size <= 4 * 32000
    assert float(np.abs(data).max()) > 0.05  # the siren, not silence
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the speech guard ran ("mark"): a siren is no speech
    captions = proc.wait_captions(1)
    assert captions and all(c["speech"] is False for c in captions), captions
    status, _, _ = http_get(proc.http("/api/clips/nothing.flac"))
    assert status == 404
    _, _, text = http_get(proc.http("/metrics"))
    assert metric_samples(text, "streamcap_clips_total")['{result="written"}'] >= 1
    assert proc.stop() == 0


def test_prune_clips_bounds_the_folder_by_age_then_size(tmp_path: Path) -> None:
    from streamcap.triggers.clips import prune_clips

    now = 1_700_000_000.0
    files = {  # name: (bytes, age in s)
        "r:dog:porch:1.flac": (100, 3 * 86400),  # older than keep_s
        "r:dog:porch:2.flac": (400, 7200),  # the oldest kept: goes for size
        "r:dog:porch:3.flac": (400, 3600),
        "r:dog:porch:4.flac": (400, 60),
        ".r:dog:porch:5.flac.x1.tmp": (50, 7200),  # left by a kill -9
        ".r:dog:porch:6.flac.x2.tmp": (50, 10),  # being written now
        "notes.txt": (5000, 5 * 86400),  # not a clip: never touched
    }
    for name, (size, age) in files.items():
        (tmp_path / name).write_bytes(b"x" * size)
        os.utime(tmp_path / name, (now - age, now - age))
    assert prune_clips(tmp_path, keep_s=86400, max_bytes=900, now=now) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".r:dog:porch:6.flac.x2.tmp", "notes.txt", "r:dog:porch:3.flac", "r:dog:porch:4.flac"]
    assert prune_clips(tmp_path / "missing", keep_s=1, max_bytes=1, now=now) == 0
