"""The trigger engine: a fast path of short windows per watched source, scored and decided.

Per source watched by at least one trigger (``sources`` empty: every
source), the source's audio blocks also feed a second
:class:`~streamcap.audio.windowing.Windower` at ``[trigger_path]``
``window_s``/``hop_s`` (the retriever's rate only). Its windows wait in a
bounded FIFO of their own per source (``max_pending``; the oldest is dropped
and counted in ``streamcap_trigger_windows_dropped_total``). With no trigger
watching a source, that source gets no trigger windows at all.

**Served first.** One task (``streamcap[triggers].worker``) takes every
waiting trigger window (of every source, up to :data:`MAX_BATCH` a call) and
has the retriever embed them in one call on the inference thread; the
caption worker waits (:meth:`TriggerEngine.wait_idle`) before starting each
caption while trigger windows wait or are being embedded. So a trigger window
waits at most for the one caption already running, never for a queued one.
Captions may starve if the trigger path alone needs all of the inference
thread (then trigger windows are dropped too, and both are counted). A
second inference thread for triggers was not tried: torch is entered from
one thread only (:mod:`streamcap.models.runtime`), and on a CPU both paths
would share the same cores anyway.

**Scored and decided.** The embedding is scored against every trigger that
watches the source (:mod:`streamcap.triggers.scoring`, on the event loop:
a few dot products), each trigger's threshold being its number, its
calibrated threshold for this model (``<state_dir>/triggers/calibrated.json``)
or "auto"; a :class:`~streamcap.triggers.detector.Detector` per (source,
trigger) turns the hits into ``trigger`` on/off events, published on the bus.

**Changing triggers.** :meth:`TriggerEngine.set_triggers` may be called from
the event loop at any time: new and changed triggers are embedded on the
inference thread (never on the event loop) and take over when that is done,
with a state announcement (an *off* with ``fired_id == ""``) per (source,
trigger) they watch; a removed trigger stops at once and nothing is
published for it. A trigger whose phrasings or examples cannot be used is
refused with an error log, and its previous definition (if any) stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from streamcap.audio.windowing import Windower
from streamcap.clock import Clock, SystemClock
from streamcap.errors import ConfigError, StreamcapError
from streamcap.logs import get_logger
from streamcap.messages import AudioBlock, Caption, Published, TriggerEvent, TriggerState, Window
from streamcap.queues import BoundedQueue, DropPolicy
from streamcap.stats import Metrics
from streamcap.triggers.detector import Detector, EventIds, Verdict, announcement
from streamcap.triggers.scoring import BACKGROUND_PHRASES, AutoThreshold, decide, score_window
from streamcap.triggers.spec import TriggerPathConfig, TriggerSpec, example_paths
from streamcap.triggers.state import (
    fingerprint,
    read_calibrated,
    read_histories,
    write_histories,
)

_log = get_logger(__name__)

MAX_BATCH: Final = 8
"""Trigger windows embedded in one call on the inference thread."""

PERSIST_EVERY_S: Final = 60.0
"""How often the learned "auto" history is written to the state directory."""

SCORE_BUCKETS: Final = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))
"""Buckets of ``streamcap_trigger_score``: cosines, -1 to 1 by 0.1."""


class TriggerModel(Protocol):
    """What the engine needs of the model (:class:`~streamcap.triggers.fastpath.RetrieverTriggerModel`).

    All but :meth:`phrase_problem` and the properties run on the inference thread.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def sample_rate_hz(self) -> int: ...

    def phrase_problem(self, text: str) -> str | None: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_windows(self, windows: Sequence[Window]) -> np.ndarray: ...

    def embed_example(self, path: Path, where: str, chunk_s: float) -> np.ndarray: ...

    def forget(self, source_id: str) -> None: ...


def trigger_vectors(model: TriggerModel, spec: TriggerSpec, config_dir: Path | None,
                    chunk_s: float) -> tuple[np.ndarray, np.ndarray]:
    """A trigger's embeddings, as the daemon scores with them; on the inference thread.

    Returns:
        ``(positives, negatives)``: its ``text`` phrasings then one row per ``examples``
        file (:meth:`TriggerModel.embed_example` with ``chunk_s``, the trigger windows'
        length), and its ``negative`` phrasings (possibly no row).

    Raises:
        ConfigError: every example file that cannot be used, named
            ``triggers.<name>.examples[i]``.
    """
    where = f"triggers.{spec.name}"
    vectors = [model.embed_texts(spec.text)]
    problems: list[str] = []
    for i, p in enumerate(example_paths(spec, config_dir)):
        try:
            vectors.append(model.embed_example(p, f"{where}.examples[{i}]", chunk_s)[None])
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return np.concatenate(vectors), model.embed_texts(spec.negative)


RunBlocking = Callable[..., Awaitable[Any]]
"""``InferenceRuntime.run``: calls a function on the inference thread and awaits it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Armed:
    """A trigger ready to score: its spec, its embeddings, its fixed threshold if any."""

    spec: TriggerSpec
    positives: np.ndarray  # (n, d): phrasings, then examples
    negatives: np.ndarray  # (m, d)
    threshold: float | None  # the spec's number, else a calibrated one; None: "auto"
    calibrated: bool
    fingerprint: str


class TriggerEngine:
    """The trigger path of a daemon (see the module doc).

    Args:
        specs: the triggers at start (``config.triggers``).
        path: ``[trigger_path]``.
        sources: every configured source name.
        model: the retriever's use for triggers.
        run_blocking: runs a function on the inference thread.
        publish: the bus's non-blocking publish.
        metrics: where the trigger metrics go.
        run_id: the daemon run's id (event ids, window ids).
        state_dir: ``<state_dir>/triggers``: learned history, calibrated thresholds.
        config_dir: the folder relative example paths are resolved against.
        max_gap_s: the windower's longest zero-filled gap.
    """

    def __init__(self, *, specs: Mapping[str, TriggerSpec], path: TriggerPathConfig,
                 sources: Collection[str], model: TriggerModel, run_blocking: RunBlocking,
                 publish: Callable[[Published], None], metrics: Metrics, run_id: str,
                 state_dir: Path, config_dir: Path | None, max_gap_s: float = 10.0,
                 clock: Clock | None = None) -> None:
        self.path = path
        self.sources = tuple(sources)
        self.model = model
        self._run = run_blocking
        self._publish = publish
        self._clock = clock or SystemClock()
        self.run_id = run_id
        self.state_dir = state_dir
        self.config_dir = config_dir
        self.max_gap_s = max_gap_s
        self._initial = dict(specs)
        self._armed: dict[str, Armed] = {}
        self._background = np.zeros((0, 0), dtype=np.float32)
        self._ids = EventIds(run_id)
        self._detectors: dict[tuple[str, str], Detector] = {}
        self._autos: dict[tuple[str, str], AutoThreshold] = {}
        self._histories = read_histories(state_dir)
        self._windowers: dict[str, Windower] = {}
        self._queues: dict[str, BoundedQueue[Window]] = {}
        self._captions: dict[str, str] = {}
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._updates: asyncio.Task[None] | None = None
        self._last_persist = time.monotonic()
        self.windows_scored = 0
        self.dropped = 0
        m = metrics
        self._m_fired = m.counter("streamcap_trigger_fired_total",
                                  "Times a trigger turned on, by trigger and source",
                                  ["trigger", "source"])
        self._m_state = m.gauge("streamcap_trigger_state",
                                "1 while a trigger is on for a source, else 0",
                                ["trigger", "source"])
        self._m_score = m.histogram("streamcap_trigger_score",
                                    "Scores of trigger windows (best cosine), by trigger",
                                    ["trigger"], buckets=SCORE_BUCKETS)
        self._m_dropped = m.counter("streamcap_trigger_windows_dropped_total",
                                    "Trigger windows dropped (the oldest, when max_pending "
                                    "were waiting), by source", ["source"])
        self._m_windows = m.counter("streamcap_trigger_windows_total",
                                    "Trigger windows scored, by source", ["source"])
        self._m_seconds = m.histogram("streamcap_inference_seconds",
                                      "Compute time per window, by stage", ["stage"])

    # -- the set of triggers ----------------------------------------------------------

    @property
    def specs(self) -> Mapping[str, TriggerSpec]:
        """The triggers in force (embedded and scoring)."""
        return {name: armed.spec for name, armed in self._armed.items()}

    def watched(self, spec: TriggerSpec) -> tuple[str, ...]:
        """The configured sources ``spec`` watches."""
        return tuple(s for s in self.sources if not spec.sources or s in spec.sources)

    def problems(self, spec: TriggerSpec, where: str | None = None) -> list[str]:
        """What keeps ``spec`` from being used with this model (no torch: any thread).

        Phrasings the text tokenizer cannot represent, example files that are no
        files, sources that do not exist; each names ``<where>.<key>[i]``.
        """
        where = where or f"triggers.{spec.name}"
        out: list[str] = []
        for key in ("text", "negative"):
            for i, text in enumerate(getattr(spec, key)):
                problem = self.model.phrase_problem(text)
                if problem is not None:
                    out.append(f"{where}.{key}[{i}]: {text!r}: {problem}")
        for i, p in enumerate(example_paths(spec, self.config_dir)):
            if not p.exists():
                out.append(f"{where}.examples[{i}]: {p}: no such file")
        unknown = [s for s in spec.sources if s not in self.sources]
        if unknown:
            out.append(f"{where}.sources: no such source {unknown[0]!r}")
        return out

    def _arm(self, specs: Sequence[TriggerSpec], calibrated: Mapping[str, float],
             background: bool) -> tuple[np.ndarray | None, list[Armed]]:
        """Embed the phrasings and examples of ``specs``; on the inference thread.

        Raises:
            ConfigError: an example file cannot be used (every such problem).
        """
        model = self.model
        bg = model.embed_texts(BACKGROUND_PHRASES) if background else None
        out: list[Armed] = []
        problems: list[str] = []
        for spec in specs:
            try:
                positives, negatives = trigger_vectors(model, spec, self.config_dir,
                                                       self.path.window_s)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            threshold = spec.threshold
            from_file = threshold is None and spec.name in calibrated
            if from_file:
                threshold = calibrated[spec.name]
            out.append(Armed(spec=spec, positives=positives,
                             negatives=negatives, threshold=threshold,
                             calibrated=from_file,
                             fingerprint=fingerprint(spec, model.model_id)))
        if problems:
            raise ConfigError(problems)
        return bg, out

    async def start(self) -> None:
        """Check and embed the triggers of the config, announce them, start the worker.

        Raises:
            ConfigError: a phrasing the model cannot represent or an unusable example file,
                each named ``triggers.<name>.text[i]`` / ``.examples[i]`` (exit 2).
        """
        specs = list(self._initial.values())
        problems = [p for spec in specs for p in self.problems(spec)]
        if problems:
            raise ConfigError(problems)
        if specs:  # no trigger, no model call
            calibrated = await asyncio.to_thread(read_calibrated, self.state_dir,
                                                 self.model.model_id)
            background, armed = await self._run(self._arm, specs, calibrated, True)
            assert background is not None
            self._background = background
            self._install(armed, removed=())
        self._task = asyncio.create_task(self._work(), name="streamcap[triggers].worker")
        _log.info("triggers armed", triggers=sorted(self._armed),
                  sources=sorted(self._windowers), window_s=self.path.window_s,
                  hop_s=self.path.hop_s,
                  calibrated=sorted(n for n, a in self._armed.items() if a.calibrated))

    def set_triggers(self, specs: Mapping[str, TriggerSpec]) -> None:
        """Make ``specs`` the triggers in force; callable from the event loop at any time.

        Changed and new triggers are embedded on the inference thread first; changes
        take effect in call order.
        """
        if self._closed:
            return
        previous = self._updates
        self._updates = asyncio.create_task(self._update(dict(specs), previous),
                                            name="streamcap[triggers].update")

    async def _update(self, specs: dict[str, TriggerSpec],
                      previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        current = {name: armed.spec for name, armed in self._armed.items()}
        removed = [name for name in current if name not in specs]
        todo: list[TriggerSpec] = []
        for name, spec in specs.items():
            if current.get(name) == spec:
                continue
            problems = self.problems(spec)
            if problems:
                _log.error("trigger refused; its previous definition (if any) stays",
                           trigger=name, problems=problems)
                continue
            todo.append(spec)
        armed: list[Armed] = []
        if todo:
            try:
                calibrated = await asyncio.to_thread(read_calibrated, self.state_dir,
                                                     self.model.model_id)
                background, armed = await self._run(self._arm, todo, calibrated,
                                                    self._background.size == 0)
                if background is not None:
                    self._background = background
            except StreamcapError as exc:
                _log.error("triggers refused; their previous definitions (if any) stay",
                           triggers=[s.name for s in todo], error=str(exc))
                armed = []
        if self._closed:
            return
        self._install(armed, removed=removed)
        _log.info("triggers changed", added_or_changed=[a.spec.name for a in armed],
                  removed=removed, triggers=sorted(self._armed))

    def _install(self, armed: Sequence[Armed], removed: Collection[str]) -> None:
        """Put embedded triggers in force, drop removed ones, announce the new pairs."""
        for name in removed:
            self._armed.pop(name, None)
            for key in [k for k in self._detectors if k[0] == name]:
                del self._detectors[key]
                self._m_state.set(0, *key)
        now = self._clock.wall()
        for a in armed:
            name = a.spec.name
            old = self._armed.get(name)
            self._armed[name] = a
            for key in [k for k in self._detectors if k[0] == name]:
                del self._detectors[key]
                self._m_state.set(0, *key)
            for source in self.watched(a.spec):
                key = (name, source)
                self._detectors[key] = Detector(a.spec, source, self._ids,
                                                model=self.model.model_id)
                if old is None or old.fingerprint != a.fingerprint or key not in self._autos:
                    fp, history = self._histories.get(source, {}).get(name, ("", ()))
                    self._autos[key] = AutoThreshold(history if fp == a.fingerprint else ())
                self._m_state.set(0, name, source)
                self._m_fired.inc(0, name, source)
                self._publish(announcement(name, source, self._ids,
                                           model=self.model.model_id, at=now))
        for key in [k for k in self._autos if k[0] not in self._armed]:
            del self._autos[key]
        self._rewatch()

    def _rewatch(self) -> None:
        """A windower and a queue for every watched source, none for the others."""
        watched = {s for a in self._armed.values() for s in self.watched(a.spec)}
        for source in watched - set(self._windowers):
            self._windowers[source] = Windower(
                source, self.path.window_s, self.path.hop_s, (self.model.sample_rate_hz,),
                max_gap_s=self.max_gap_s, run_id=self.run_id)
            self._queues[source] = BoundedQueue(self.path.max_pending,
                                                name=f"trigger_windows[{source}]")
            self._m_dropped.inc(0, source)
            self._m_windows.inc(0, source)
        for source in set(self._windowers) - watched:
            del self._windowers[source]
            del self._queues[source]
            self._forget(source)

    def _forget(self, source: str) -> None:
        async def forget() -> None:
            await self._run(self.model.forget, source)

        task = asyncio.create_task(forget(), name="streamcap[triggers].forget")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- audio in ------------------------------------------------------------------------

    def feed(self, block: AudioBlock) -> None:
        """A source's block (on the event loop): cut trigger windows if the source is watched."""
        windower = self._windowers.get(block.source_id)
        if windower is None or self._closed:
            return
        queue = self._queues[block.source_id]
        for window in windower.feed(block).windows:
            for dropped in queue.offer(window, policy=DropPolicy.DROP_OLDEST):
                self.dropped += 1
                self._m_dropped.inc(1, block.source_id)
                _log.debug("trigger path is behind: dropped the oldest trigger window",
                           source=block.source_id, window_id=dropped.item.window_id)
            self._idle.clear()
            self._ready.set()

    def note(self, msg: Published) -> None:
        """See what is published: the latest caption of each source goes into events."""
        if isinstance(msg, Caption):
            self._captions[msg.source_id] = msg.text

    # -- scheduling ------------------------------------------------------------------------

    def _pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def wait_idle(self) -> None:
        """Return once no trigger window waits or is being embedded (the caption worker's gate)."""
        while not self._closed and (self._busy or self._pending()):
            self._idle.clear()
            await self._idle.wait()

    def _take(self) -> list[Window]:
        """Up to MAX_BATCH waiting windows, oldest first per source, sources in turn."""
        batch: list[Window] = []
        while len(batch) < MAX_BATCH:
            took = False
            for queue in self._queues.values():
                if len(batch) >= MAX_BATCH:
                    break
                window = queue.pop()
                if window is not None:
                    batch.append(window)
                    took = True
            if not took:
                break
        batch.sort(key=lambda w: (w.source_id, w.epoch, w.start_ms))
        return batch

    async def _work(self) -> None:
        while not self._closed:
            batch = self._take()
            if not batch:
                self._busy = False
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            self._busy = True
            started = time.monotonic()
            try:
                vectors = await self._run(self.model.embed_windows, batch)
            except Exception:  # noqa: BLE001 - logged and counted; the path goes on
                _log.exception("trigger windows failed", windows=len(batch))
                continue
            finally:
                self._busy = False
            seconds = time.monotonic() - started
            for _ in batch:
                self._m_seconds.observe(seconds / len(batch), "trigger")
            for window, vector in zip(batch, vectors, strict=True):
                self._decide(window, vector)
            if time.monotonic() - self._last_persist > PERSIST_EVERY_S:
                await self.persist()

    def _decide(self, window: Window, vector: np.ndarray) -> None:
        source = window.source_id
        self.windows_scored += 1
        self._m_windows.inc(1, source)
        for name, armed in list(self._armed.items()):
            detector = self._detectors.get((name, source))
            if detector is None:
                continue
            score = score_window(vector, armed.positives, armed.negatives, self._background)
            auto = self._autos[(name, source)]
            threshold, hit = decide(score, armed.threshold, auto)
            self._m_score.observe(score.score, name)
            event = detector.observe(
                Verdict(epoch=window.epoch, start_s=window.start_s, end_s=window.end_s,
                        end_at=window.captured_at + window.duration_s, score=score.score,
                        threshold=threshold, hit=hit),
                caption=self._captions.get(source))
            if event is not None:
                self._emit(event)

    def _emit(self, event: TriggerEvent) -> None:
        on = event.state is TriggerState.ON
        self._m_state.set(1 if on else 0, event.trigger, event.source_id)
        if on:
            self._m_fired.inc(1, event.trigger, event.source_id)
        _log.info("trigger", trigger=event.trigger, source=event.source_id,
                  state=event.state.value, score=_round(event.score),
                  threshold=_round(event.threshold), event_id=event.event_id)
        self._publish(event)

    # -- state and shutdown ---------------------------------------------------------------

    def _snapshot(self) -> dict[str, dict[str, tuple[str, tuple[float, ...]]]]:
        out = {s: dict(t) for s, t in self._histories.items()}
        for (name, source), auto in self._autos.items():
            out.setdefault(source, {})[name] = (self._armed[name].fingerprint, auto.history)
        return out

    async def persist(self) -> None:
        """Write the learned "auto" history to the state directory (off the event loop)."""
        self._last_persist = time.monotonic()
        snapshot = self._snapshot()
        self._histories = snapshot
        try:
            await asyncio.to_thread(write_histories, self.state_dir, snapshot)
        except OSError as exc:
            _log.warning("cannot write the trigger history", path=str(self.state_dir),
                         error=str(exc))

    async def close(self) -> None:
        """Stop scoring; write the learned history. Waiting windows are dropped."""
        self._closed = True
        self._idle.set()
        self._ready.set()
        for task in (self._task, self._updates):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._task, self._updates):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._armed:
            await self.persist()


def _round(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None
