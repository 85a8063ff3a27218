"""``streamcap run``: build every stage from the config, run them, stop them in order.

Stages and who owns them::

    SourceSupervisor (one per source, task streamcap[source:<id>].supervisor)
        -> Windower.feed (pure, on the event loop)
        -> WindowQueue (bounded, drop oldest)
        -> InferenceWorker (task streamcap[inference].worker; the model runs on the
           single inference thread of InferenceRuntime)
        -> PluginBus.publish -> one bounded inbox per sink -> Sink.run tasks
    HttpServer (/healthz, /metrics, the live page)

Shutdown (SIGTERM/SIGINT): STOPPING=1 to systemd, sources stopped (each
publishes "stopped"), queued windows captioned or dropped (``drain_on_stop``),
sinks flushed and closed (the MQTT sink publishes "offline"), then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from streamcap import systemd
from streamcap.audio.watchdog import WatchdogOptions
from streamcap.audio.windowing import Windower
from streamcap.bus import PluginBus
from streamcap.config import Config, SourceConfig, default_config, parse_config
from streamcap.http import HealthReport, HttpServer
from streamcap.logs import configure_logging, get_logger
from streamcap.messages import (
    AudioBlock,
    Published,
    SourceState,
    SourceStatus,
    Window,
    new_run_id,
)
from streamcap.models.runtime import InferenceRuntime, RuntimeOptions
from streamcap.pipeline import InferenceWorker, WindowCaptioner, WindowQueue
from streamcap.preflight import check_config_file, prepare
from streamcap.sources.base import AudioSource
from streamcap.stats import Metrics

_log = get_logger(__name__)


def example_clip_uri() -> str:
    """The bundled example clip, looped in real time."""
    path = Path(str(resources.files("streamcap") / "data" / "example.ogg"))
    return f"file:{path}?loop=true"


def embedded_source_uri() -> str:
    """A microphone when one exists, else the bundled example clip."""
    from streamcap.sources.devices import list_input_devices

    devices, _reason = list_input_devices()
    return "mic:default" if devices else example_clip_uri()


def resolve_config(config_path: Path | None, source_uri: str | None) -> Config:
    """The config file, or the embedded defaults; ``source_uri`` replaces every source.

    A config file gets every check ``check-config`` runs, with the same messages.
    """
    if config_path is not None:
        config = check_config_file(config_path)
    else:
        config = default_config(source_uri or embedded_source_uri())
    if source_uri is not None or not config.sources:
        uri = source_uri or embedded_source_uri()
        template = next(iter(config.sources.values()), None)
        table: dict[str, object] = {"uri": uri}
        if template is not None:
            table.update(window_s=template.window_s, hop_s=template.hop_s)
        replacement = parse_config({"sources": {"cli" if source_uri else "default": table}})
        config = Config(daemon=config.daemon, model=config.model,
                        sources=replacement.sources, sinks=config.sinks, http=config.http,
                        path=config.path)
    return config


def state_root(config: Config) -> Path:
    if config.daemon.state_dir:
        return Path(config.daemon.state_dir).expanduser()
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path.home() / ".local" / "state" / "streamcap"


MAX_GAP_S = 10.0
"""Lost input up to this long inside one epoch is filled with silence; longer starts afresh."""


class SourceWindows:
    """A source's windower that survives a gap too long to fill with silence.

    The windower refuses a gap longer than its ``max_gap_s`` (hours of silent
    windows would follow). Then the audio after the gap starts a new window
    epoch of its own, as after a source restart, so nothing spans the gap and
    nothing is lost after it.
    """

    def __init__(self, windower: Windower) -> None:
        self.windower = windower
        self._mapping: dict[int, tuple[int, int]] = {}  # source epoch -> (window epoch, offset)
        self._next_epoch = 0
        self.gaps = 0

    def feed(self, block: AudioBlock) -> list[Window]:
        mapped = self._mapping.get(block.epoch)
        if mapped is None:
            mapped = self._restart(block, 0)
        try:
            return self.windower.feed(self._rebase(block, mapped))
        except ValueError as exc:
            self.gaps += 1
            _log.warning("audio gap: restarting windows", source=block.source_id, detail=str(exc))
            return self.windower.feed(self._rebase(block, self._restart(block, block.start_sample)))

    def _restart(self, block: AudioBlock, offset: int) -> tuple[int, int]:
        mapped = (self._next_epoch, offset)
        self._next_epoch += 1
        self._mapping = {block.epoch: mapped}
        return mapped

    @staticmethod
    def _rebase(block: AudioBlock, mapped: tuple[int, int]) -> AudioBlock:
        epoch, offset = mapped
        if epoch == block.epoch and offset == 0:
            return block
        return dataclasses.replace(block, epoch=epoch, start_sample=block.start_sample - offset)


class Daemon:
    """One running streamcap: sources, windows, inference, bus and HTTP."""

    def __init__(self, config: Config, captioner_factory: Callable[[], WindowCaptioner],
                 *, runtime: InferenceRuntime) -> None:
        self.config = config
        self.run_id = new_run_id()  # in hello frames and every window id: never repeats
        self.metrics = Metrics()
        self.runtime = runtime
        self._captioner_factory = captioner_factory
        self._stop = asyncio.Event()
        self._statuses: dict[str, SourceStatus] = {}
        self._started_at = time.monotonic()
        # The same checks as check-config: every URI, option and plugin, before anything starts.
        prepared = prepare(config)
        self._factories: dict[str, Callable[[], AudioSource]] = dict(prepared.sources)
        self._sinks = dict(prepared.sinks)
        m = self.metrics
        self._windows = m.counter("streamcap_windows_total", "Windows cut, by source", ["source"])
        self._dropped = m.counter("streamcap_windows_dropped_total",
                                  "Windows dropped before captioning, by source and reason",
                                  ["source", "reason"])
        self._queue_depth = m.gauge("streamcap_window_queue_depth",
                                    "Windows waiting for the captioner")
        self._source_up = m.gauge("streamcap_source_running",
                                  "1 while a source delivers audio", ["source"])
        self._restarts = m.counter("streamcap_source_restarts_total",
                                   "Source restarts after a stall or error", ["source"])
        self._nonfinite = m.counter("streamcap_nonfinite_samples_total",
                                    "NaN or infinite input samples replaced by silence, by source",
                                    ["source"])
        for name in config.sources:
            self._windows.inc(0, name)
            self._nonfinite.inc(0, name)
            self._dropped.inc(0, name, "queue_full")
            self._source_up.set(0, name)
        self.queue = WindowQueue(config.daemon.max_pending_windows, on_drop=self._on_window_drop,
                                 on_depth=self._queue_depth.set)
        self.bus = PluginBus(self._sinks, node_id=config.daemon.node_id, run_id=self.run_id,
                             metrics=self.metrics, state_root=state_root(config))
        self.worker: InferenceWorker | None = None
        self.http: HttpServer | None = None
        self.captioner: WindowCaptioner | None = None

    # -- callbacks -----------------------------------------------------------------

    def _on_window_drop(self, window: Window) -> None:
        self._dropped.inc(1, window.source_id, "queue_full")
        _log.warning("inference is behind: dropped window", window_id=window.window_id,
                     dropped_total=self.queue.dropped)

    def _publish(self, msg: Published) -> None:
        self.bus.publish(msg)

    def _on_status(self, status: SourceStatus) -> None:
        previous = self._statuses.get(status.source_id)
        self._statuses[status.source_id] = status
        self._source_up.set(1 if status.state is SourceState.RUNNING else 0, status.source_id)
        if status.state is SourceState.RETRYING:
            self._restarts.inc(1, status.source_id)
        if previous is None or previous.state != status.state or previous.reason != status.reason:
            self._publish(status)

    def _block_handler(self, windows: SourceWindows) -> Callable[[AudioBlock], None]:
        def on_block(block: AudioBlock) -> None:
            if block.nonfinite:
                self._nonfinite.inc(block.nonfinite, block.source_id)
            for window in windows.feed(block):
                self._windows.inc(1, window.source_id)
                if self.queue.closed:
                    continue
                self.queue.offer(window)
        return on_block

    # -- health ----------------------------------------------------------------------

    def health(self) -> HealthReport:
        reasons: list[str] = []
        sources = {}
        for name in self.config.sources:
            st = self._statuses.get(name)
            state = st.state.value if st else "starting"
            sources[name] = {"state": state, "reason": st.reason if st else ""}
            if state != SourceState.RUNNING.value:
                reasons.append(f"source {name} is {state}" + (f": {st.reason}" if st and st.reason else ""))
        min_hop = min((s.hop_s for s in self.config.sources.values()), default=0.0)
        inference: dict[str, object] = {"loaded": self.captioner is not None,
                                        "queue": len(self.queue),
                                        "dropped": self.queue.dropped}
        if self.captioner is None:
            reasons.append("model is loading")
        if self.worker is not None:
            inference.update(processed=self.worker.processed,
                             last_latency_s=round(self.worker.last_latency_s, 3),
                             last_lag_s=round(self.worker.last_lag_s, 3))
            if self.worker.processed and self.worker.last_latency_s > min_hop > 0:
                reasons.append(f"inference is not keeping up: {self.worker.last_latency_s:.2f} s "
                               f"per window > hop {min_hop:g} s")
        if not self.bus.ready:
            reasons.append("sinks not ready: " + ", ".join(self.bus.not_ready()))
        return HealthReport(live=True, ready=not reasons, reasons=tuple(reasons),
                            details={"sources": sources, "inference": inference,
                                     "uptime_s": round(time.monotonic() - self._started_at, 1)})

    def page_config(self) -> Mapping[str, object]:
        """Tell the live page where the WebSocket feed is (the first websocket sink)."""
        for name, sink in self._sinks.items():
            inner = getattr(sink, "sink", sink)
            port = getattr(inner, "bound_port", None)
            options = getattr(inner, "options", None)
            if port is None or options is None:
                continue
            host = getattr(options, "host", "127.0.0.1")
            if host in ("0.0.0.0", "::", ""):
                host = ""  # the page then uses the host it was loaded from
            scheme = "wss" if getattr(options, "tls_cert", None) else "ws"
            return {"node_id": self.config.daemon.node_id, "sink": name,
                    "ws_url": f"{scheme}://{host}:{port}/" if host else None,
                    "ws_port": port, "ws_scheme": scheme,
                    "token_required": bool(getattr(options, "token_env", None))}
        return {"node_id": self.config.daemon.node_id, "ws_url": None}

    # -- lifecycle ---------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        systemd.status("loading model")
        self.captioner = await self.runtime.run(self._captioner_factory)
        # transformers installs its own log handler on import: route it through ours again.
        configure_logging(self.config.daemon.log_format, self.config.daemon.log_level)
        rates = self.captioner.sample_rates_hz
        _log.info("model ready", model=self.captioner.model_id, rates_hz=list(rates),
                  device=str(self.runtime.device), dtype=str(self.runtime.dtype))
        self.worker = InferenceWorker(self.captioner, self.queue, self._publish,
                                      self.runtime.run, self.metrics)
        if self.config.http.enabled:
            self.http = HttpServer(self.config.http.host, self.config.http.port,
                                   metrics=self.metrics, health=self.health,
                                   page_config=self.page_config)
        async with self.bus:
            if self.http is not None:
                port = await self.http.start()
                _log.info("http listening", url=f"http://{self.config.http.host}:{port}/")
            supervisors: list[asyncio.Task[SourceStatus]] = []
            worker = asyncio.create_task(self.worker.run(), name="streamcap[inference].worker")
            for name, src in self.config.sources.items():
                from streamcap.sources.supervisor import SourceSupervisor

                windower = SourceWindows(Windower(name, src.window_s, src.hop_s, rates,
                                                  max_gap_s=MAX_GAP_S, run_id=self.run_id))
                sup = SourceSupervisor(self._factories[name], name, _watchdog_options(src))
                supervisors.append(sup.start(self._block_handler(windower), self._on_status))
            pinger = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self.bus.wait_ready()
            systemd.ready("captioning")
            interval = systemd.watchdog_interval_s()
            if interval:
                pinger = asyncio.create_task(systemd.watchdog_pinger(interval),
                                             name="streamcap[systemd].watchdog")
            _log.info("streamcap running", sources=list(self.config.sources),
                      sinks=list(self._sinks), run_id=self.run_id)
            ended = asyncio.create_task(_all_done(supervisors), name="streamcap[sources].ended")
            stop = asyncio.create_task(self._stop.wait(), name="streamcap[daemon].stop")
            await asyncio.wait({ended, stop}, return_when=asyncio.FIRST_COMPLETED)
            systemd.stopping("stopping")
            _log.info("stopping", reason="signal" if self._stop.is_set() else "all sources ended")
            for task in (*supervisors, ended, stop):
                task.cancel()
            results = await asyncio.gather(*supervisors, ended, stop, return_exceptions=True)
            for task, result in zip(supervisors, results, strict=False):
                if isinstance(result, Exception):
                    _log.error("source task failed", task=task.get_name(),
                               error=f"{type(result).__name__}: {result}")
            discarded = self.queue.close(drop_pending=not self.config.daemon.drain_on_stop)
            for window in discarded:
                self._dropped.inc(1, window.source_id, "shutdown")
            await worker
            if pinger is not None:
                pinger.cancel()
            await self.bus.close(timeout_s=self.config.daemon.stop_timeout_s)
        if self.http is not None:
            await self.http.close()
        _log.info("stopped", captions=self.worker.processed, windows_dropped=self.queue.dropped)
        return 0


async def _all_done(tasks: list[asyncio.Task[SourceStatus]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


def _watchdog_options(src: SourceConfig) -> WatchdogOptions:
    return WatchdogOptions(
        stall_s=src.stall_s,
        start_timeout_s=max(src.stall_s, 15.0),
        max_retries=src.max_retries or None,
        backoff_initial_s=src.backoff_initial_s,
        backoff_max_s=src.backoff_max_s,
        backoff_reset_after_s=src.backoff_reset_s,
    )


def run_daemon(*, config_path: Path | None, model: str | None, source_uri: str | None) -> int:
    """Entry point of ``streamcap run``; returns the exit code."""
    config = resolve_config(config_path, source_uri)
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    model_spec = model or config.model.bundle

    from streamcap.models.captioner import build_captioner

    runtime = InferenceRuntime(RuntimeOptions(device=config.model.device,
                                              precision=config.model.precision,
                                              num_threads=config.model.threads or None))

    def factory() -> WindowCaptioner:
        return build_captioner(model_spec, config.model.decoding, device=runtime.device,
                               dtype=runtime.dtype,
                               codec_follows_dtype=config.model.codec_precision == "model")

    try:
        daemon = Daemon(config, factory, runtime=runtime)
        return asyncio.run(daemon.run())
    finally:
        runtime.close()
