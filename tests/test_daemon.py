"""streamcap.daemon: its seams (extra sinks, the live page's config read from the sinks'
endpoints) and a shutdown bounded by stop_timeout_s, whatever a stage does.

In-process tests run :class:`Daemon` with a real file source, the real inference thread
and fakes for what must misbehave (a source that ignores its cancellation, a model call
that does not return); one runs :func:`serve` in a real subprocess to see it exit, and
one runs ``streamcap run`` with the tiny preset and two file sources captioned in
batches. The whole daemon runs in test_pipeline.py (in-process) and test_daemon_e2e.py
(subprocess).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_process import WAIT_S as DAEMON_WAIT_S
from daemon_process import DaemonProcess, tiny_model_toml
from test_pipeline import (
    RATE,
    WAIT_S,
    Recorder,
    captions_of,
    result_for,
    runtime,
    sample_value,
    wait_until,
    write_tone,
)
from timing import scaled
from websockets.asyncio.client import connect

from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import SinkContext, SinkEndpoint
from streamcap.config import Config, parse_config
from streamcap.daemon import EXIT_ABANDONED, Daemon, StopBudget
from streamcap.messages import AudioBlock, CaptionResult, SourceStatus, Window, make_block
from streamcap.models.runtime import InferenceRuntime
from streamcap.pipeline import WindowCaptioner

__all__ = ["runtime"]  # the fixture: one inference thread on the CPU

STOP_TIMEOUT_S = 2.0
ROOT = Path(__file__).resolve().parents[1]


class DeafSource:
    """Delivers silence until cancelled, then ignores every cancellation until released."""

    def __init__(self, source_id: str, release: asyncio.Event) -> None:
        self.source_id = source_id
        self.release = release
        self.ignored = 0

    async def blocks(self) -> AsyncIterator[AudioBlock]:
        i = 0
        while True:
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                self.ignored += 1
                while not self.release.is_set():
                    try:
                        await self.release.wait()
                    except asyncio.CancelledError:
                        self.ignored += 1
                return
            yield make_block(source_id=self.source_id, start_sample=i * 1600, sample_rate_hz=RATE,
                             samples=np.zeros(1600, dtype=np.float32), captured_at=time.time())
            i += 1


class StuckCaptioner:
    """Captions at once until ``stuck`` is set; then a call does not return until released."""

    model_id = "stuck"
    sample_rates_hz = (RATE,)

    def __init__(self) -> None:
        self.stuck = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
        if self.stuck.is_set():
            self.entered.set()
            self.release.wait(timeout=4 * WAIT_S)
        return [result_for(win) for win in windows]

    def caption(self, win: Window) -> CaptionResult:
        return self.caption_batch([win])[0]




def make_daemon(tmp_path: Path, runtime: InferenceRuntime, captioner: object,
                sources: tuple[str, ...] = ("tone",)) -> tuple[Daemon, Recorder]:
    wav = write_tone(tmp_path / "tone.wav", 440)
    config = parse_config({
        "daemon": {"node_id": "stop", "stop_timeout_s": STOP_TIMEOUT_S,
                   "state_dir": str(tmp_path)},
        "sources": {name: {"uri": f"file:{wav}?loop=true", "window_s": 10, "hop_s": 1,
                           "realtime": False} for name in sources},
        "http": {"enabled": False},
    })
    recorder = Recorder()
    daemon = Daemon(config, lambda: captioner, runtime=runtime,  # type: ignore[arg-type, return-value]
                    extra_sinks={"rec": recorder})
    return daemon, recorder


def test_the_stop_budget_gives_capture_half_and_sinks_up_to_ninety_percent() -> None:
    budget = StopBudget(started_at=100.0, total_s=10.0)
    assert (budget.capture_deadline, budget.sinks_deadline, budget.end) == (105.0, 109.0, 110.0)
    assert budget.remaining(budget.sinks_deadline, now=108.0) == 1.0
    assert budget.remaining(budget.capture_deadline, now=108.0) == 0.0


async def test_a_source_that_ignores_cancellation_cannot_keep_the_daemon_alive(
        tmp_path: Path, runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    release = asyncio.Event()
    deaf: list[DeafSource] = []

    def make_deaf() -> DeafSource:
        deaf.append(DeafSource("deaf", release))
        return deaf[-1]

    daemon, recorder = make_daemon(tmp_path, runtime, StuckCaptioner(), ("tone", "deaf"))
    daemon._factories["deaf"] = make_deaf
    run = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: run.done() or len(captions_of(recorder.got)) >= 2, "captions")
        assert not run.done(), run
        daemon.request_stop()
        done, _ = await asyncio.wait([run], timeout=WAIT_S)
        assert done, "the daemon waited for a source that ignores its cancellation"
        assert run.result() == EXIT_ABANDONED
        assert daemon.abandoned == ["streamcap[source:deaf].supervisor"]
        assert deaf[0].ignored >= 1
        # everything else stopped: the other source reported "stopped", the sinks flushed
        states = [(m.source_id, m.state.value) for m in recorder.got
                  if isinstance(m, SourceStatus)]
        assert ("tone", "stopped") in states
    finally:
        release.set()
        await asyncio.wait([t for t in asyncio.all_tasks()
                            if t.get_name().startswith("streamcap[")], timeout=WAIT_S)


@pytest.mark.parametrize("sources", [("tone",), ("tone", "other")])
async def test_a_model_call_that_does_not_return_does_not_hold_up_the_stop(
        tmp_path: Path, runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch,
        sources: tuple[str, ...]) -> None:
    """The batch in flight when the stop cuts the drain short is counted as dropped
    (``reason="shutdown"``), window by window: every window of every source is a caption
    or a counted drop."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    captioner = StuckCaptioner()
    daemon, recorder = make_daemon(tmp_path, runtime, captioner, sources)
    run = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: run.done() or len(captions_of(recorder.got)) >= 2, "captions")
        captioner.stuck.set()
        assert await asyncio.to_thread(captioner.entered.wait, WAIT_S)
        daemon.request_stop()
        done, _ = await asyncio.wait([run], timeout=WAIT_S)
        assert done, "the drain waited for a model call that does not return"
        assert run.result() == 0  # the worker task stopped; run_daemon deals with the thread
        text = daemon.metrics.render()
        lost = 0.0
        for source in sources:
            windows = sample_value(text, "streamcap_windows_total", source=source)
            full = sample_value(text, "streamcap_windows_dropped_total", source=source,
                                reason="queue_full")
            shutdown = sample_value(text, "streamcap_windows_dropped_total", 0.0,
                                    source=source, reason="shutdown")
            captioned = sum(c.source_id == source for c in captions_of(recorder.got))
            assert windows == captioned + full + shutdown, source
            lost += shutdown
        assert lost >= 1  # the window in flight at least
        assert sample_value(text, "streamcap_window_queue_depth") == 0
        assert [m.state.value for m in recorder.got
                if isinstance(m, SourceStatus)][-1] == "stopped"
    finally:
        captioner.release.set()


SERVE_SCRIPT = """
import asyncio, os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
import numpy as np
from test_daemon import StuckCaptioner, make_daemon, DeafSource
from streamcap.daemon import serve
from streamcap.models.runtime import InferenceRuntime, RuntimeOptions
from pathlib import Path

runtime = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32", num_threads=1))
captioner = StuckCaptioner()
daemon, recorder = make_daemon(Path({tmp!r}), runtime, captioner, ("tone", "deaf"))
daemon._factories["deaf"] = lambda: DeafSource("deaf", asyncio.Event())  # never released

def stop_when_stuck():
    while sum(1 for m in recorder.got if getattr(m, "text", None)) < 2:
        time.sleep(0.05)
    captioner.stuck.set()
    captioner.entered.wait()
    print("STOPPING", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=stop_when_stuck, daemon=True).start()
print("EXIT", serve(daemon), flush=True)
"""


def test_serve_exits_the_process_when_a_task_and_the_inference_thread_are_stuck(
        tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT.format(tests=str(ROOT / "tests"), tmp=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # the bound is stop_timeout_s plus the teardown's least time; the wait is generous
        out, _ = proc.communicate(timeout=2 * WAIT_S + STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the process did not exit after SIGTERM:\n{out[-3000:]}") from None
    assert "STOPPING" in out, out[-3000:]
    assert proc.returncode == EXIT_ABANDONED, out[-3000:]
    assert "EXIT" not in out  # serve() does not return: the process leaves at once
    assert "streamcap[source:deaf].supervisor" in out
    assert "streamcap-infer" in out


class ScriptedSource:
    """Delivers 0.5 s blocks of a tone at the given ``start_sample``s, then ends."""

    def __init__(self, source_id: str, starts: list[int]) -> None:
        self.source_id = source_id
        self.starts = starts

    async def blocks(self) -> AsyncIterator[AudioBlock]:
        n = RATE // 2
        t = np.arange(n) / RATE
        for start in self.starts:
            await asyncio.sleep(0)
            yield make_block(source_id=self.source_id, start_sample=start, sample_rate_hz=RATE,
                             samples=(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
                             captured_at=1.7e9 + start / RATE)


async def _cut_windows(tmp_path: Path, runtime: InferenceRuntime, starts: list[int],
                       capfd: pytest.CaptureFixture[str],
                       ) -> tuple[list[Window], list[dict[str, Any]]]:
    """Run a daemon whose one source delivers blocks at ``starts`` until it ends: the
    windows it cut and the log events (the daemon logs JSON lines to stderr)."""
    daemon, _ = make_daemon(tmp_path, runtime, StuckCaptioner())
    daemon._factories["tone"] = lambda: ScriptedSource("tone", starts)
    cut: list[Window] = []
    offer = daemon.queue.offer

    def record(window: Window) -> None:
        cut.append(window)
        offer(window)

    daemon.queue.offer = record  # type: ignore[method-assign]
    run = asyncio.create_task(daemon.run())
    done, _ = await asyncio.wait([run], timeout=WAIT_S)
    assert done, "the daemon did not stop when its only source ended"
    lines = capfd.readouterr().err.splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return cut, events


async def test_a_long_gap_restarts_the_window_clock_after_it(
        tmp_path: Path, runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """12 s of audio, 20 s lost (above MAX_GAP_S), 12 s more: the audio after the gap is
    windowed from 0 in epoch 1, nothing spans the gap, and the gap is logged."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    half = RATE // 2
    starts = [i * half for i in range(24)] + [(24 + 40 + i) * half for i in range(24)]
    cut, events = await _cut_windows(tmp_path, runtime, starts, capfd)
    run_id = cut[0].run_id
    epochs = [(w.epoch, w.start_ms) for w in cut]
    assert epochs == [(0, 0), (0, 1000), (0, 2000), (1, 0), (1, 1000), (1, 2000)], epochs
    assert [w.seq for w in cut] == list(range(6))
    assert cut[3].window_id == f"tone:{run_id}:1:0"
    assert cut[3].captured_at == pytest.approx(1.7e9 + 32.0)
    gaps = [e for e in events if e["event"] == "audio gap: restarting windows"]
    assert len(gaps) == 1 and gaps[0]["epoch"] == 1 and "max_gap_s=10" in gaps[0]["detail"]


async def test_a_source_bug_is_not_turned_into_a_restart(
        tmp_path: Path, runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """A block that goes back in time within one source clock is a bug: it fails the
    source (state "failed", with the windower's error as the reason, as /healthz shows it)
    instead of starting new windows over and over."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    half = RATE // 2
    starts = [i * half for i in range(24)] + [i * half for i in range(24)]
    cut, events = await _cut_windows(tmp_path, runtime, starts, capfd)
    assert [(w.epoch, w.start_ms) for w in cut] == [(0, 0), (0, 1000), (0, 2000)]
    assert not [e for e in events if e["event"] == "audio gap: restarting windows"]
    failed = [e for e in events if e["event"] == "source state" and e["state"] == "failed"]
    assert len(failed) == 1, events
    assert failed[0]["source_id"] == "tone"
    assert "ValueError" in failed[0]["reason"] and "overlaps" in failed[0]["reason"]


# --------------------------------------------------------------------------- seams

SEAM_WAIT_S = scaled(30.0)


class Served:
    """A sink that says it serves clients, as a third-party plugin might."""

    accepts = frozenset({"caption"})

    def __init__(self, endpoint: SinkEndpoint | None) -> None:
        self.endpoint = endpoint

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        ctx.ready()
        async for _ in inbox:
            pass


def no_captioner() -> WindowCaptioner:
    raise AssertionError("these tests never load a model")


def config(tmp_path: Path, **sinks: dict[str, object]) -> Config:
    return parse_config({
        "daemon": {"node_id": "n1", "state_dir": str(tmp_path)},
        "sources": {"s": {"uri": "file:/dev/null", "window_s": 10, "hop_s": 5}},
        "sinks": sinks,
        "http": {"enabled": False},
    })


async def test_page_config_comes_from_the_sink_endpoint(tmp_path: Path,
                                                        runtime: InferenceRuntime) -> None:
    quiet = Served(None)  # not listening: skipped
    other = Served(SinkEndpoint(kind="sse", host="127.0.0.1", port=9000, scheme="http",
                                token_required=False))  # not a WebSocket feed: skipped
    ws = Served(SinkEndpoint(kind="websocket", host="127.0.0.1", port=8123, scheme="wss",
                             token_required=True))
    daemon = Daemon(config(tmp_path), no_captioner, runtime=runtime,
                    extra_sinks={"quiet": quiet, "other": other, "feed": ws})
    assert daemon.page_config() == {"node_id": "n1", "sink": "feed",
                                    "ws_url": "wss://127.0.0.1:8123/", "ws_port": 8123,
                                    "ws_scheme": "wss", "token_required": True}
    ws.endpoint = SinkEndpoint(kind="websocket", host="0.0.0.0", port=8123, scheme="ws",
                               token_required=False)
    wildcard = daemon.page_config()
    assert wildcard["ws_url"] is None and wildcard["ws_port"] == 8123  # the page's own host
    ws.endpoint = None
    assert daemon.page_config() == {"node_id": "n1", "ws_url": None}


async def test_page_config_points_at_the_running_websocket_sink(
        tmp_path: Path, runtime: InferenceRuntime) -> None:
    cfg = config(tmp_path, ws={"plugin": "websocket", "port": 0})
    daemon = Daemon(cfg, no_captioner, runtime=runtime)
    assert daemon.page_config()["ws_url"] is None  # not listening yet
    async with daemon.bus:
        await asyncio.wait_for(daemon.bus.wait_ready(), SEAM_WAIT_S)
        page = daemon.page_config()
        assert page["sink"] == "ws" and page["token_required"] is False
        url = page["ws_url"]
        assert isinstance(url, str) and url.startswith("ws://127.0.0.1:")
        async with connect(url) as client:
            hello = json.loads(await asyncio.wait_for(client.recv(), SEAM_WAIT_S))
            assert hello["type"] == "hello" and hello["node_id"] == "n1"


async def test_an_extra_sink_cannot_take_a_configured_name(tmp_path: Path,
                                                           runtime: InferenceRuntime) -> None:
    cfg = config(tmp_path, ws={"plugin": "websocket", "port": 0})
    with pytest.raises(ValueError, match=r"\[sinks.ws\] is configured already"):
        Daemon(cfg, no_captioner, runtime=runtime,
               extra_sinks={"ws": Served(None)})


def test_batch_max_is_capped_by_the_number_of_sources(tmp_path: Path,
                                                      runtime: InferenceRuntime) -> None:
    """A batch holds one window per source: more room is never used, and with one source
    a taken window would only wait batch_wait_ms for nothing."""
    def batch_max(n_sources: int, configured: int) -> int:
        cfg = parse_config({
            "daemon": {"node_id": "n1", "state_dir": str(tmp_path)},
            "sources": {f"s{i}": {"uri": "file:/dev/null", "window_s": 10, "hop_s": 5}
                        for i in range(n_sources)},
            "model": {"batch_max": configured},
            "http": {"enabled": False},
        })
        return Daemon(cfg, no_captioner, runtime=runtime).batch_max()

    assert batch_max(1, 8) == 1
    assert batch_max(3, 8) == 3
    assert batch_max(3, 2) == 2
    assert batch_max(12, 8) == 8


# --------------------------------------------------------------------------- batches, subprocess

BATCH_FILE_S = 32.0
"""Each file source's length: windows of 10 s every 5 s start at 0, 5, 10, 15 and 20 s."""


def test_the_daemon_captions_every_window_of_two_sources_in_batches(tmp_path: Path) -> None:
    """``streamcap run`` with the tiny preset, batch_max 4 and two file sources read
    faster than real time: every window of both sources gets its caption (none dropped,
    none failed), windows of the two sources are captioned together, and the daemon stops
    by itself once both files have ended and the queue is drained."""
    model = tiny_model_toml(n_candidates=2, max_new_tokens=4).replace(
        "threads = 1\n", "threads = 1\nbatch_max = 4\nbatch_wait_ms = 200\n")
    sources = "".join(f"""
[sources.{name}]
uri = "file:{write_tone(tmp_path / f'{name}.wav', hz, BATCH_FILE_S)}"
window_s = 10
hop_s = 5
realtime = false
""" for name, hz in (("left", 330.0), ("right", 880.0)))
    config = tmp_path / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "batches"
state_dir = "{tmp_path / 'state'}"
log_format = "json"
max_pending_windows = 16
stop_timeout_s = {round(4 * DAEMON_WAIT_S)}

{model}{sources}
[http]
enabled = false

[history]
enabled = false
""", encoding="utf-8")
    daemon = DaemonProcess.start(config, env={"PYTHONUNBUFFERED": "1"}, log=tmp_path / "log",
                                 jsonl=tmp_path / "none.jsonl", http_port=0)
    try:
        try:
            code = daemon.proc.wait(timeout=2 * DAEMON_WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not stop after its sources ended:\n"
                                 f"{daemon.log_tail()}") from None
        assert code == 0, daemon.log_tail()
        events = daemon.log_events()
        captions = [e for e in events if e.get("event") == "caption"]
        starts = {name: sorted(int(c["window_id"].rsplit(":", 1)[1]) for c in captions
                               if c["source_id"] == name) for name in ("left", "right")}
        every = [0, 5000, 10000, 15000, 20000]
        assert starts == {"left": every, "right": every}, daemon.log_tail()
        assert not [e for e in events if e.get("event") == "captioning failed"]
        stopped = [e for e in events if e.get("event") == "stopped" and "captions" in e]
        assert stopped and stopped[0]["captions"] == 10 and stopped[0]["windows_dropped"] == 0
        sizes = [c["batch_size"] for c in captions]
        assert all(1 <= size <= 2 for size in sizes), sizes
        # both files are read long before the first batch is captioned: the two sources'
        # windows wait together and go through the model together
        assert 2 in sizes, sizes
    finally:
        daemon.kill()
