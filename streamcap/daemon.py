"""``streamcap run``: build every stage from the config, run them, stop them in order.

Stages and who owns them::

    SourceSupervisor (one per source, task streamcap[source:<id>].supervisor)
        -> Windower.feed (pure, on the event loop)
        -> WindowQueue (a bounded FIFO per source, drop oldest; served round-robin)
        -> InferenceWorker (task streamcap[inference].worker; batches of windows of
           distinct sources, [model] batch_max / batch_wait_ms; the model runs on the
           single inference thread of InferenceRuntime)
        -> PluginBus.publish -> one bounded inbox per sink -> Sink.run tasks
        -> HistoryRecorder.record (captions with embeddings, trigger events) -> the
           writer thread streamcap-history -> the history store (docs/history.md)
    HttpServer (/healthz, /metrics, the live page)

Shutdown (SIGTERM/SIGINT), bounded by ``[daemon] stop_timeout_s`` as a whole
(:class:`StopBudget`): STOPPING=1 to systemd; the window queue closes, the
sources are cancelled (each publishes "stopped") while the queued windows are
captioned (``drain_on_stop``) until half the budget, what is left being dropped
and counted (``reason="shutdown"``); the history writes what it holds and closes;
sinks flush and close (the MQTT sink
publishes "offline") until 90 % of it; then HTTP. A task that is still running
at the end (it ignored its cancellation) is abandoned with an error log naming
it, and so is an inference thread still busy with a model call.

Exit status of ``streamcap run`` after a stop: 0 when everything stopped in
time, 1 (:data:`EXIT_ABANDONED`) when something had to be abandoned; the
process exits then too, without waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from streamcap import systemd
from streamcap.audio.watchdog import WatchdogOptions
from streamcap.audio.windowing import RestartReason, Windower
from streamcap.bus import PluginBus
from streamcap.bus.plugin import Sink, recall_history, sink_endpoint, tell_triggers
from streamcap.config import Config, SourceConfig, default_config, parse_config
from streamcap.errors import ConfigError, HistoryError
from streamcap.history.records import WindowRecord
from streamcap.history.store import HistoryStore
from streamcap.history.writer import HistoryRecorder
from streamcap.http import HealthReport, HttpServer
from streamcap.logs import Throttle, configure_logging, get_logger
from streamcap.messages import (
    AudioBlock,
    Caption,
    Embedding,
    Float32Array,
    Published,
    SourceState,
    SourceStatus,
    TriggerEvent,
    TriggerState,
    Window,
    new_run_id,
)
from streamcap.models.runtime import THREAD_NAME_PREFIX, InferenceRuntime, RuntimeOptions
from streamcap.pipeline import InferenceWorker, WindowCaptioner, WindowQueue
from streamcap.preflight import check_config_file, prepare
from streamcap.sources.base import AudioSource
from streamcap.stats import Metrics
from streamcap.triggers.clips import CLIPS_DIR, ClipRecorder, prune_clips
from streamcap.triggers.engine import TriggerEngine
from streamcap.triggers.registry import TriggerRegistry, TriggerStates
from streamcap.triggers.spec import TriggerSpec

if TYPE_CHECKING:
    from streamcap.history.api import HistoryApi

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
        # The one source replaces every source, so each trigger watches it.
        triggers = {name: dataclasses.replace(spec, sources=())
                    for name, spec in config.triggers.items()}
        config = dataclasses.replace(config, sources=replacement.sources, triggers=triggers)
    return config


def state_root(config: Config) -> Path:
    if config.daemon.state_dir:
        return Path(config.daemon.state_dir).expanduser()
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path.home() / ".local" / "state" / "streamcap"


EXIT_ABANDONED = 1
"""Exit status of ``streamcap run`` when the shutdown had to abandon a task or the inference thread."""

CAPTURE_SHARE = 0.5
"""Part of ``stop_timeout_s`` in which the sources stop and the queued windows are captioned."""

SINKS_SHARE = 0.9
"""Part of ``stop_timeout_s`` by which the sinks must have flushed and closed."""

MAX_GAP_S = 10.0
"""Lost input up to this long inside one epoch is filled with silence; longer starts afresh."""


class Daemon:
    """One running streamcap: sources, windows, inference, bus and HTTP."""

    def __init__(self, config: Config, captioner_factory: Callable[[], WindowCaptioner],
                 *, runtime: InferenceRuntime, extra_sinks: Mapping[str, Sink] | None = None,
                 ) -> None:
        """Build every stage from ``config``; start nothing.

        Args:
            extra_sinks: Sinks to run besides the configured ones, by instance name
                (a test's recorder, say); a name of a ``[sinks.*]`` table is refused.

        Raises:
            ValueError: An extra sink has the name of a configured one.
        """
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
        self._sinks: dict[str, Sink] = dict(prepared.sinks)
        for name, sink in (extra_sinks or {}).items():
            if name in self._sinks:
                raise ValueError(f"extra sink {name!r}: [sinks.{name}] is configured already")
            self._sinks[name] = sink
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
        self._clipped = m.counter("streamcap_clipped_samples_total",
                                  "Input samples beyond full scale clipped to [-1, 1], by source",
                                  ["source"])
        for name in config.sources:
            self._windows.inc(0, name)
            self._nonfinite.inc(0, name)
            self._clipped.inc(0, name)
            self._dropped.inc(0, name, "queue_full")
            self._source_up.set(0, name)
        self.queue = WindowQueue(config.daemon.max_pending_windows, on_drop=self._on_window_drop,
                                 on_depth=self._queue_depth.set)
        self.bus = PluginBus(self._sinks, node_id=config.daemon.node_id, run_id=self.run_id,
                             metrics=self.metrics, state_root=state_root(config))
        # The live set of triggers (the file's, changed at run time over HTTP or MQTT and
        # saved in <state_dir>/triggers/) and their newest state per source, from the
        # TriggerEvents published through _publish.
        self.triggers = TriggerRegistry.open(config.triggers, config.sources,
                                             state_root(config) / "triggers")
        self.trigger_states = TriggerStates()
        self.trigger_states.retain(self.triggers.specs())
        self.triggers.subscribe(self.trigger_states.retain)
        self._tell_sinks(self.triggers.specs())
        self.triggers.subscribe(self._tell_sinks)
        # Trigger event clips ([triggers.<name>] clip_s): audio is kept only for the
        # sources such triggers watch; [privacy] speech = "skip" keeps speech out of them.
        self.clips = self._clip_recorder()
        self.clips.set_triggers(self.triggers.specs())
        self.triggers.subscribe(self.clips.set_triggers)
        self.worker: InferenceWorker | None = None
        self.http: HttpServer | None = None
        self.captioner: WindowCaptioner | None = None
        self.trigger_engine: TriggerEngine | None = None
        """The trigger path, once the model is loaded (None: the model has no retriever
        and no trigger is configured)."""
        self.history: HistoryRecorder | None = None
        """The history writer, once the store is open (None: ``[history] enabled = false``
        or the store is unusable and not ``required``); ``history.reader()`` gives
        read handles for searches."""
        self._history_failures = self.metrics.counter(
            "streamcap_history_open_failures_total",
            "Times the history store could not be opened (the daemon ran without it)")
        self._history_failures.inc(0)
        self.abandoned: list[str] = []
        """Names of the tasks the shutdown abandoned (they ignored their cancellation)."""
        self.stop_deadline: float | None = None
        """When the shutdown must be over (``time.monotonic``), once it began."""

    # -- callbacks -----------------------------------------------------------------

    def batch_max(self) -> int:
        """Windows per captioner call at most: ``[model] batch_max``, and no more than there
        are sources (a batch holds one window per source: with one source the worker never
        waits ``batch_wait_ms`` for a window that cannot join)."""
        return max(1, min(self.config.model.batch_max, len(self.config.sources)))

    def _on_window_drop(self, window: Window) -> None:
        self._dropped.inc(1, window.source_id, "queue_full")
        _log.warning("inference is behind: dropped this source's oldest waiting window",
                     source=window.source_id, window_id=window.window_id,
                     dropped=self.queue.dropped_by_source.get(window.source_id, 0))

    def _tell_sinks(self, specs: Mapping[str, TriggerSpec]) -> None:
        """Sinks that follow triggers (Home Assistant entities, retained states) learn the set."""
        for sink in self._sinks.values():
            tell_triggers(sink, specs)

    def _clip_recorder(self) -> ClipRecorder:
        privacy = self.config.privacy
        guard = None
        if privacy.speech == "skip":
            from streamcap.privacy.speech import SpeechGuard

            guard = SpeechGuard(privacy)  # its own model, loaded on the clip writer's thread
        return ClipRecorder(state_root(self.config) / CLIPS_DIR, sources=self.config.sources,
                            metrics=self.metrics, max_active=privacy.clip_max_active,
                            max_bytes=privacy.clip_max_bytes, speech_guard=guard)

    def _publish(self, msg: Published) -> None:
        if isinstance(msg, TriggerEvent):
            msg = self.clips.start(msg)  # names its clip when one is being saved
            self.trigger_states.observe(msg)
            # A state announcement (off, no fired_id, NaN score: sent at start and when a
            # trigger changes) is not a firing: the history keeps firings and their ends.
            if self.history is not None and (msg.fired_id or msg.state is TriggerState.ON):
                self.history.record(msg)
        if self.trigger_engine is not None:
            self.trigger_engine.note(msg)
        self.bus.publish(msg)

    def _publish_result(self, caption: Caption, embedding: Embedding | None) -> None:
        """One captioned window: into the history, to the trigger path, then to the sinks."""
        if self.history is not None:
            self.history.record(WindowRecord.from_caption(caption, embedding))
        if self.trigger_engine is not None:
            self.trigger_engine.note(caption)
            if embedding is not None:
                self.trigger_engine.note(embedding)
        self.bus.publish_result(caption, embedding)

    # -- history -------------------------------------------------------------------

    def history_path(self) -> Path:
        """The history database file: ``[history] path`` or the state directory's."""
        from streamcap.history.options import history_path

        return history_path(self.config)

    def _open_history(self) -> HistoryRecorder | None:
        """Open the store and start its writer (blocking: it checks the file).

        Raises:
            ConfigError: the store is unusable and ``[history] required = true``
                (exit status 2; the message names the path).
        """
        options = self.config.history
        if not options.enabled:
            return None
        from streamcap.history.sqlite import SqliteHistory

        try:
            try:
                store = SqliteHistory(self.history_path(), keep_days=options.keep_days,
                                      max_bytes=options.max_bytes,
                                      clips_dir=state_root(self.config) / "clips")
            except (OSError, RuntimeError, ValueError) as exc:  # the path itself is unusable
                where = options.path or str(state_root(self.config) / "history")
                raise HistoryError(f"history store {where}: cannot open ({exc})") from exc
        except HistoryError as exc:
            if options.required:
                raise ConfigError(f"{exc} ([history] required = true)") from exc
            self._history_failures.inc()
            _log.error("history store unusable; captioning goes on without history",
                       error=str(exc))
            return None
        recorder = HistoryRecorder(store, metrics=self.metrics, queue_size=options.queue_size,
                                   retention_interval_s=options.retention_interval_s)
        recorder.start()
        _log.info("history store open", path=store.location)
        return recorder

    def _attach_vector_index(self) -> None:
        """Open the history's vector index for the loaded model and hand it to the store
        (searches) and its writer (upkeep); blocking: it reads the index file.

        The index (``<history file>.vectors``) is a cache of the store: when it is
        missing, corrupt or of another model it starts empty (the reason is logged once)
        and the writer thread rebuilds it in bounded steps; searches scan exactly meanwhile.
        """
        from streamcap.history.sqlite import SqliteHistory
        from streamcap.history.vectors import HistoryVectorIndex
        from streamcap.models.captioner import Captioner

        recorder, captioner = self.history, self.captioner
        if recorder is None or not isinstance(recorder.store, SqliteHistory):
            return
        if not isinstance(captioner, Captioner) or captioner.components.retriever is None:
            return
        dim = int(captioner.components.retriever.config.joint_dim)
        path = self.history_path().with_suffix(".vectors")
        index = HistoryVectorIndex(path, dim, captioner.model_id)
        if index.reset_reason is not None:
            _log.info("history vector index starts empty; it is rebuilt from the store",
                      reason=index.reset_reason)
        recorder.store.vector_index = index
        recorder.attach_index(index)
        _log.info("history vector index open", path=str(path), rows=len(index.index),
                  dim=dim, model=captioner.model_id)

    def _recent_history(self, limit: int, per_source: bool) -> list[Published]:
        return [] if self.history is None else self.history.recent(limit, per_source)

    def _recall_history(self) -> None:
        """Let every sink that replays seed its backfill (blocking: on a worker thread
        while the loop waits, before the bus runs any sink). Sinks asking for the same
        rows share one read."""
        read: dict[tuple[int, bool], list[Published]] = {}

        def recent(limit: int, per_source: bool) -> list[Published]:
            if (limit, per_source) not in read:
                read[(limit, per_source)] = self._recent_history(limit, per_source)
            return read[(limit, per_source)]

        for sink in self._sinks.values():
            recall_history(sink, recent)

    async def _prune_clips(self) -> None:
        """Without a history store (off, or unusable), bound the clips folder by
        ``[history] keep_days`` and ``max_bytes`` alone, every ``retention_interval_s``."""
        options = self.config.history
        pruned = self.metrics.counter(
            "streamcap_clips_pruned_total",
            "Event clip files deleted by the clips' own retention (no history store)")
        pruned.inc(0)
        while True:
            try:
                deleted = await asyncio.to_thread(
                    prune_clips, self.clips.clips_dir, keep_s=options.keep_days * 86400.0,
                    max_bytes=options.max_bytes, now=time.time())
            except OSError as exc:
                _log.error("cannot delete old event clips", error=str(exc),
                           path=str(self.clips.clips_dir))
            else:
                if deleted:
                    pruned.inc(deleted)
                    _log.info("old event clips deleted", deleted=deleted)
            await asyncio.sleep(options.retention_interval_s)

    async def _close_history(self, timeout_s: float) -> None:
        """Write what is queued and close the store, within ``timeout_s``."""
        if self.history is not None:  # it stays readable (searches open read handles)
            await asyncio.to_thread(self.history.close, timeout_s)

    async def _guarded(self, captioner: WindowCaptioner) -> WindowCaptioner:
        """``captioner`` behind the speech guard when ``[privacy] speech`` asks for one
        (the VAD model is loaded on the inference thread, where it runs)."""
        privacy = self.config.privacy
        if not privacy.guarded:
            return captioner
        from streamcap.privacy.speech import GuardedCaptioner, SpeechGuard

        guard = await self.runtime.run(SpeechGuard.load, privacy)
        return GuardedCaptioner(captioner, guard)

    def _trigger_engine(self) -> TriggerEngine | None:
        """The trigger path for the loaded model; None when it cannot score and none is set.

        Raises:
            ConfigError: triggers are configured but the model has no retriever.
        """
        from streamcap.models.captioner import Captioner
        from streamcap.triggers.fastpath import RetrieverTriggerModel

        captioner = self.captioner
        if not isinstance(captioner, Captioner) or captioner.components.retriever is None:
            if self.triggers.specs():
                raise ConfigError("triggers: the model has no retriever (audio-text "
                                  "embeddings) to score them with; use a bundle with one")
            return None
        config_dir = self.config.path.parent if self.config.path is not None else None
        return TriggerEngine(
            specs=self.triggers.specs(), path=self.config.trigger_path,
            sources=list(self.config.sources), model=RetrieverTriggerModel(captioner),
            run_blocking=self.runtime.run_side, publish=self._publish, metrics=self.metrics,
            run_id=self.run_id, state_dir=state_root(self.config) / "triggers",
            config_dir=config_dir, max_gap_s=MAX_GAP_S)

    def _history_reader(self) -> HistoryStore:
        """A reader handle on the history store, for one search or page (a worker thread).

        Raises:
            HistoryError: there is no history (off, or the store could not be opened).
        """
        from streamcap.history.api import HISTORY_OFF

        history = self.history
        if history is None:
            raise HistoryError(HISTORY_OFF)
        reader: HistoryStore = history.reader()
        return reader

    def _history_api(self) -> HistoryApi:
        """``/api/search`` and ``/api/history``; the query is embedded by the loaded model's
        retriever on the inference runtime's side thread."""
        from streamcap.history.api import HistoryApi
        from streamcap.models.captioner import Captioner
        from streamcap.triggers.fastpath import RetrieverTriggerModel

        captioner = self.captioner
        embed: Callable[[str], Awaitable[Float32Array]] | None = None
        if isinstance(captioner, Captioner) and captioner.components.retriever is not None:
            retriever = RetrieverTriggerModel(captioner)

            async def embed(text: str) -> Float32Array:
                vectors = await self.runtime.run_side(retriever.embed_texts, [text])
                vector: Float32Array = vectors[0]
                return vector

        model = captioner.model_id if captioner is not None else ""
        return HistoryApi(self._history_reader, embed, model, sources=list(self.config.sources),
                          node_id=self.config.daemon.node_id)

    def _on_status(self, status: SourceStatus) -> None:
        previous = self._statuses.get(status.source_id)
        self._statuses[status.source_id] = status
        self._source_up.set(1 if status.state is SourceState.RUNNING else 0, status.source_id)
        if status.state is SourceState.RETRYING:
            self._restarts.inc(1, status.source_id)
        if status.state not in (SourceState.STARTING, SourceState.RUNNING):
            self.clips.source_ended(status.source_id)
        if previous is None or previous.state != status.state or previous.reason != status.reason:
            self._publish(status)

    def _block_handler(self, windower: Windower) -> Callable[[AudioBlock], None]:
        def on_block(block: AudioBlock) -> None:
            if block.nonfinite:
                self._nonfinite.inc(block.nonfinite, block.source_id)
            if block.clipped:
                self._clipped.inc(block.clipped, block.source_id)
            if self.trigger_engine is not None:
                self.trigger_engine.feed(block)
            self.clips.feed(block)
            cut = windower.feed(block)  # a ValueError is a bug: it propagates
            if cut.restart is not None and cut.restart.reason is RestartReason.GAP:
                _log.warning("audio gap: restarting windows", source=block.source_id,
                             epoch=cut.restart.epoch, detail=cut.restart.detail)
            for window in cut.windows:
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
                             batch_max=self.worker.batch_max,
                             last_latency_s=round(self.worker.last_latency_s, 3),
                             last_lag_s=round(self.worker.last_lag_s, 3))
            if self.worker.processed and self.worker.last_latency_s > min_hop > 0:
                reasons.append(f"inference is not keeping up: {self.worker.last_latency_s:.2f} s "
                               f"per batch > hop {min_hop:g} s")
        if not self.bus.ready:
            reasons.append("sinks not ready: " + ", ".join(self.bus.not_ready()))
        return HealthReport(live=True, ready=not reasons, reasons=tuple(reasons),
                            details={"sources": sources, "inference": inference,
                                     "uptime_s": round(time.monotonic() - self._started_at, 1)})

    def page_config(self) -> Mapping[str, object]:
        """Tell the live page where the WebSocket feed is (the first websocket sink)."""
        for name, sink in self._sinks.items():
            endpoint = sink_endpoint(sink)
            if endpoint is None or endpoint.kind != "websocket":
                continue
            # A wildcard address: the page then uses the host it was loaded from.
            host = "" if endpoint.host in ("0.0.0.0", "::", "") else endpoint.host
            return {"node_id": self.config.daemon.node_id, "sink": name,
                    "ws_url": f"{endpoint.scheme}://{host}:{endpoint.port}/" if host else None,
                    "ws_port": endpoint.port, "ws_scheme": endpoint.scheme,
                    "token_required": endpoint.token_required}
        return {"node_id": self.config.daemon.node_id, "ws_url": None}

    # -- lifecycle ---------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or until every source has ended; returns the exit code.

        The shutdown is bounded by ``[daemon] stop_timeout_s`` (see :class:`StopBudget`):
        0 after a clean stop, :data:`EXIT_ABANDONED` when a task had to be abandoned
        (each is logged by name in :attr:`abandoned`).
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        stop = asyncio.create_task(self._stop.wait(), name="streamcap[daemon].stop")
        try:
            # The history opens first: a store that must be there and is not stops the
            # start before the model loads; sinks that replay recall it before they run.
            self.history = await asyncio.to_thread(self._open_history)
            if self.history is not None:  # the store is read off the loop
                await asyncio.to_thread(self._recall_history)
            systemd.status("loading model")
            load = asyncio.create_task(self.runtime.run(self._captioner_factory),
                                       name="streamcap[inference].load")
            await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not load.done():
                # A model call cannot be interrupted: the load goes on in the inference
                # thread, which run_daemon does not wait for beyond the stop budget.
                load.cancel()
                systemd.stopping("stopping")
                _log.info("stopping before the model was loaded", reason="signal")
                self.stop_deadline = time.monotonic() + self.config.daemon.stop_timeout_s
                return 0
            self.captioner = load.result()
            return await self._run_loaded(stop)
        finally:
            stop.cancel()
            if self.history is not None:  # the start failed or stopped before the model
                await self._close_history(self.config.daemon.stop_timeout_s / 2)

    async def _run_loaded(self, stop: asyncio.Task[Literal[True]]) -> int:
        assert self.captioner is not None  # run() loaded it
        # transformers installs its own log handler on import: route it through ours again.
        configure_logging(self.config.daemon.log_format, self.config.daemon.log_level)
        captioner = await self._guarded(self.captioner)
        if self.history is not None:
            await asyncio.to_thread(self._attach_vector_index)
        rates = captioner.sample_rates_hz
        _log.info("model ready", model=self.captioner.model_id, rates_hz=list(rates),
                  device=str(self.runtime.device), dtype=str(self.runtime.dtype),
                  speech_guard=self.config.privacy.speech)
        engine = self.trigger_engine = self._trigger_engine()
        if engine is not None:
            # run-time changes (HTTP, MQTT) reach the engine, checked against the model first
            self.triggers.check = engine.problems
            self.triggers.subscribe(engine.set_triggers)
        self.worker = InferenceWorker(captioner, self.queue, self._publish,
                                      self.runtime.run, self.metrics,
                                      publish_result=self._publish_result,
                                      batch_max=self.batch_max(),
                                      batch_wait_s=self.config.model.batch_wait_ms / 1000)
        if self.config.http.enabled:
            http = self.config.http
            self.http = HttpServer(http.host, http.port, metrics=self.metrics,
                                   health=self.health, page_config=self.page_config,
                                   allowed_hosts=http.allowed_hosts,
                                   max_connections=http.max_connections,
                                   request_timeout_s=http.request_timeout_s)
            from streamcap.options import secret
            from streamcap.triggers.api import TriggerApi
            from streamcap.triggers.clips_api import ClipsApi

            TriggerApi(self.triggers, self.trigger_states,
                       token=secret(http.token_env)).install(self.http)
            self._history_api().install(self.http)
            ClipsApi(self.clips.clips_dir).install(self.http)
        bus = asyncio.create_task(self.bus.run(), name="streamcap[bus].run")
        await asyncio.sleep(0)  # let the bus start the sinks
        if bus.done():
            bus.result()  # a sink's state directory cannot be created (ConfigError)
        supervisors: list[asyncio.Task[SourceStatus]] = []
        helpers: list[asyncio.Task[Any]] = []
        worker = asyncio.create_task(self.worker.run(), name="streamcap[inference].worker")
        reason = "error"
        try:
            if self.trigger_engine is not None:
                # the state announcements go out once the sinks run; a phrasing the model
                # cannot represent is a ConfigError here (exit 2)
                await self.trigger_engine.start()
            if self.http is not None:
                port = await self.http.start()
                _log.info("http listening", url=f"http://{self.config.http.host}:{port}/")
            for name, src in self.config.sources.items():
                from streamcap.sources.supervisor import SourceSupervisor

                windower = Windower(name, src.window_s, src.hop_s, rates,
                                    max_gap_s=MAX_GAP_S, run_id=self.run_id)
                sup = SourceSupervisor(self._factories[name], name, _watchdog_options(src))
                supervisors.append(sup.start(self._block_handler(windower), self._on_status))
            if any(sink.plugin == "mqtt" for sink in self.config.sinks.values()):
                from streamcap.triggers.mqtt_commands import command_listeners

                for commands in command_listeners(self.triggers, self._sinks,
                                                  metrics=self.metrics,
                                                  node_id=self.config.daemon.node_id):
                    task = asyncio.create_task(
                        commands.run(), name=f"streamcap[triggers:{commands.instance}].commands")
                    task.add_done_callback(_log_failed_helper)
                    helpers.append(task)
            if self.history is None:  # no store's retention deletes clips: their own does
                prune = asyncio.create_task(self._prune_clips(), name="streamcap[clips].prune")
                prune.add_done_callback(_log_failed_helper)
                helpers.append(prune)
            ready = asyncio.create_task(self.bus.wait_ready(), name="streamcap[bus].ready")
            helpers.append(ready)
            # A sink that never gets ready (broker down) delays READY=1, never a stop.
            await asyncio.wait({ready, stop, bus}, timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            if bus.done() and not ready.done():
                bus.result()  # a sink could not start (its port is taken): ConfigError, exit 2
            systemd.ready("captioning")
            interval = systemd.watchdog_interval_s()
            if interval:
                helpers.append(asyncio.create_task(systemd.watchdog_pinger(interval),
                                                   name="streamcap[systemd].watchdog"))
            _log.info("streamcap running", sources=list(self.config.sources),
                      sinks=list(self._sinks), run_id=self.run_id)
            ended = asyncio.create_task(_all_done(supervisors), name="streamcap[sources].ended")
            helpers.append(ended)
            watched = {ended, stop, bus}
            while not (ended.done() or stop.done()):
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if bus.done():
                    bus.result()  # a sink that was never ready failed to start: ConfigError
                    watched.discard(bus)  # it ended cleanly: there are no sinks
            reason = "signal" if self._stop.is_set() else "all sources ended"
        finally:
            systemd.stopping("stopping")
            _log.info("stopping", reason=reason)
            await self._shutdown(supervisors=supervisors, worker=worker, bus=bus,
                                 helpers=helpers)
        _log.info("stopped", captions=self.worker.processed, windows_dropped=self.queue.dropped,
                  abandoned=self.abandoned)
        return EXIT_ABANDONED if self.abandoned else 0

    async def _shutdown(self, *, supervisors: list[asyncio.Task[SourceStatus]],
                        worker: asyncio.Task[None], bus: asyncio.Task[None],
                        helpers: list[asyncio.Task[Any]]) -> None:
        """Stop every stage within ``stop_timeout_s``; a task that outlasts it is abandoned."""
        budget = StopBudget(started_at=time.monotonic(),
                            total_s=self.config.daemon.stop_timeout_s)
        self.stop_deadline = budget.end
        assert self.worker is not None
        # 1. Capture and inference, in parallel: no window enters the queue any more, the
        #    sources are cancelled (each publishes "stopped"), the worker drains the queue.
        #    The trigger path stops first (its waiting windows are dropped, its learned
        #    history written), so that it holds back no caption of the drain.
        if self.trigger_engine is not None:
            await _wait_until([asyncio.create_task(self.trigger_engine.close(),
                                                   name="streamcap[triggers].close")],
                              budget.capture_deadline)
        for window in self.queue.close(drop_pending=not self.config.daemon.drain_on_stop):
            self._dropped.inc(1, window.source_id, "shutdown")
        for task in (*supervisors, *helpers):
            task.cancel()
        self.worker.finish_by(budget.capture_deadline)
        await _wait_until([*supervisors, *helpers, worker], budget.capture_deadline)
        if not worker.done():
            in_flight = self.worker.in_flight  # the batch whose results are not published yet
            worker.cancel()  # the model call goes on in the inference thread; its result is lost
            await _wait_until([worker], budget.sinks_deadline)
            for window in in_flight:
                self._dropped.inc(1, window.source_id, "shutdown")
        left = self.queue.close(drop_pending=True)
        for window in left:
            self._dropped.inc(1, window.source_id, "shutdown")
        if left or worker.cancelled():
            _log.warning("stop_timeout_s cut the drain short: windows dropped", queued=len(left),
                         in_flight=worker.cancelled(),
                         stop_timeout_s=self.config.daemon.stop_timeout_s)
        for task in (*supervisors, worker):
            if task.done() and not task.cancelled() and task.exception() is not None:
                error = task.exception()
                _log.error("task failed", task=task.get_name(),
                           error=f"{type(error).__name__}: {error}")
        # 2. Clips being collected end with what they have; their writes get until the
        #    sinks' deadline (they run on a thread of their own). The history writes what
        #    the drain captioned, then closes (a share of the sinks' time: it writes
        #    hundreds of records a second).
        await self.clips.close(budget.remaining(budget.sinks_deadline) / 2)
        await self._close_history(max(0.01, budget.remaining(budget.sinks_deadline) / 3))
        # 3. Sinks deliver what they hold (the MQTT sink publishes "offline").
        closing = asyncio.create_task(
            self.bus.close(timeout_s=max(0.01, budget.remaining(budget.sinks_deadline) / 2)),
            name="streamcap[bus].close")
        await _wait_until([closing, bus], budget.sinks_deadline)
        if bus.done() and not bus.cancelled() and bus.exception() is not None:
            _log.error("sinks failed", error=repr(bus.exception()))
        # 4. HTTP, then whatever daemon task is left: cancelled, and abandoned if it ignores that.
        if self.http is not None:
            await _wait_until([asyncio.create_task(self.http.close(), name="streamcap[http].close")],
                              budget.end)
        current = asyncio.current_task()
        left_tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()
                      and t.get_name().startswith("streamcap[")]
        for task in left_tasks:
            task.cancel()
        for task in sorted(await _wait_until(left_tasks, budget.end), key=lambda t: t.get_name()):
            _log.error("task did not stop within stop_timeout_s; abandoned", task=task.get_name(),
                       stop_timeout_s=self.config.daemon.stop_timeout_s)
            self.abandoned.append(task.get_name())


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StopBudget:
    """How ``[daemon] stop_timeout_s`` is shared on shutdown (times are ``time.monotonic``).

    Sources and the drain of waiting windows run together until half the
    budget; the sinks flush until 90 %; HTTP and any task left get the rest.
    A task still running at the end is abandoned.
    """

    started_at: float
    total_s: float

    @property
    def capture_deadline(self) -> float:
        return self.started_at + CAPTURE_SHARE * self.total_s

    @property
    def sinks_deadline(self) -> float:
        return self.started_at + SINKS_SHARE * self.total_s

    @property
    def end(self) -> float:
        return self.started_at + self.total_s

    def remaining(self, deadline: float, now: float | None = None) -> float:
        return max(0.0, deadline - (time.monotonic() if now is None else now))


async def _wait_until(tasks: Iterable[asyncio.Task[Any]], deadline: float) -> set[asyncio.Task[Any]]:
    """Wait for ``tasks`` until ``deadline`` (``time.monotonic``); returns those not done."""
    todo = {t for t in tasks if not t.done()}
    if not todo:
        return set()
    _, pending = await asyncio.wait(todo, timeout=max(0.0, deadline - time.monotonic()))
    return pending


async def _all_done(tasks: list[asyncio.Task[SourceStatus]]) -> None:
    if tasks:  # asyncio.wait, not gather: cancelling this does not wait for the tasks
        await asyncio.wait(tasks)


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
                                              num_threads=config.model.threads or None,
                                              codec_precision=config.model.codec_precision))

    def factory() -> WindowCaptioner:
        return build_captioner(model_spec, config.model.decoding, device=runtime.device,
                               dtype=runtime.dtype,
                               codec_follows_dtype=config.model.codec_precision == "model",
                               abstention=config.model.abstention, int8=runtime.plan.int8)

    try:
        daemon = Daemon(config, factory, runtime=runtime)
    except BaseException:
        runtime.close()
        raise
    return serve(daemon)


def serve(daemon: Daemon) -> int:
    """Run ``daemon`` on a new event loop, then close its runtime; returns the exit code.

    Unlike ``asyncio.run``, nothing is waited for beyond the stop budget: when a task
    or the inference thread is still busy then, the error is logged with its name and
    the process exits at once with :data:`EXIT_ABANDONED` (this function does not return).
    """
    config = daemon.config
    runtime = daemon.runtime
    leftovers: list[str] = []
    try:
        code = _run_loop(daemon, leftovers)
    finally:
        deadline = daemon.stop_deadline or time.monotonic() + config.daemon.stop_timeout_s
        if not _close_runtime(runtime, max(TEARDOWN_MIN_S, deadline - time.monotonic())):
            _log.error("the inference thread is still busy with a model call; abandoned",
                       thread=THREAD_NAME_PREFIX, stop_timeout_s=config.daemon.stop_timeout_s)
            leftovers.append(THREAD_NAME_PREFIX)
    if leftovers or daemon.abandoned:
        # Threads and tasks that ignore their end would keep the interpreter from exiting
        # (it joins every thread): leave without waiting for them.
        _log.error("exiting without waiting for what was abandoned",
                   abandoned=[*daemon.abandoned, *leftovers], exit_code=EXIT_ABANDONED)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_ABANDONED)
    return code


ACCEPT_ERROR_LOG_INTERVAL_S = 60.0
"""At most one log line per listener and error per this many seconds for failed accepts."""


class LoopErrorHandler:
    """The event loop's exception handler: a listener's failed ``accept()`` is logged
    once per :data:`ACCEPT_ERROR_LOG_INTERVAL_S` (with how many were held back), without
    a traceback; anything else goes to asyncio's default handler.

    Out of file descriptors (EMFILE, ENFILE) asyncio stops accepting for a second and
    reports it each time: at once per second and listener, with a traceback each, that
    would fill the journal while the machine is already short of resources.
    """

    def __init__(self, interval_s: float = ACCEPT_ERROR_LOG_INTERVAL_S) -> None:
        self.throttle = Throttle(interval_s)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        error = context.get("exception")
        if not message.startswith("socket.accept()") or not isinstance(error, OSError):
            loop.default_exception_handler(context)
            return
        listener = context.get("socket")
        try:
            address = str(listener.getsockname()) if listener is not None else ""
        except OSError:
            address = ""
        held = self.throttle.allow((address, error.errno))
        if held is not None:
            _log.error("cannot accept connections", listener=address,
                       error=error.strerror or str(error), errno=error.errno, suppressed=held,
                       every_s=self.throttle.interval_s)


TEARDOWN_MIN_S = 1.0
"""Least time the event loop and the inference thread get to finish after the daemon stopped."""


def _run_loop(daemon: Daemon, leftovers: list[str]) -> int:
    """``asyncio.run(daemon.run())``, except that tasks and executor threads that do not end
    within the stop budget are not waited for: their names go to ``leftovers``."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(LoopErrorHandler())
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(daemon.run())
    finally:
        try:
            deadline = daemon.stop_deadline or time.monotonic() + daemon.config.daemon.stop_timeout_s
            leftovers += _finish_loop(loop, max(TEARDOWN_MIN_S, deadline - time.monotonic()))
        finally:
            asyncio.set_event_loop(None)
            if not leftovers:
                loop.close()


def _log_failed_helper(task: asyncio.Task[Any]) -> None:
    """Log a helper task (one the daemon runs beside the pipeline) that ended by an error:
    the daemon goes on without it, so the log must say it is gone."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    _log.error("helper task failed; the daemon goes on without it", task=task.get_name(),
               error=f"{type(error).__name__}: {error}", exc_info=error)


def _finish_loop(loop: asyncio.AbstractEventLoop, timeout_s: float) -> list[str]:
    """Cancel the tasks left, close async generators and the default executor, each
    waited for at most ``timeout_s``; returns the names of what did not finish."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    pending: set[asyncio.Task[Any]] = set()
    if tasks:
        _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=timeout_s))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            _log.error("task failed", task=task.get_name(), error=repr(task.exception()))
    for task in pending:
        _log.error("task did not stop; abandoned", task=task.get_name())
    left = sorted(t.get_name() for t in pending)
    if left:
        return left
    for name, closing in (("async generators", loop.shutdown_asyncgens()),
                          ("default executor", loop.shutdown_default_executor())):
        task = loop.create_task(closing, name=f"streamcap[daemon].close-{name.replace(' ', '-')}")
        done, _ = loop.run_until_complete(asyncio.wait([task], timeout=timeout_s))
        if not done:
            _log.error("did not finish; abandoned", what=name)
            return [name]
    return []


def _close_runtime(runtime: InferenceRuntime, timeout_s: float) -> bool:
    """Close the inference runtime; False if its thread is still busy after ``timeout_s``."""
    closer = threading.Thread(target=runtime.close, name="streamcap-runtime-close", daemon=True)
    closer.start()
    closer.join(timeout_s)
    return not closer.is_alive()
