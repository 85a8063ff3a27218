"""The trigger engine: a fast path of short windows per watched source, scored and decided.

Per source watched by at least one trigger (``sources`` empty: every
source), the source's audio blocks also feed a second
:class:`~streamcap.audio.windowing.Windower` at ``[trigger_path]``
``window_s``/``hop_s`` (the retriever's rate only). Its windows wait in a
bounded FIFO of their own per source (``max_pending``; the oldest is dropped).
Every trigger window that is not scored is counted in
``streamcap_trigger_windows_dropped_total{source,reason}``: ``behind`` (the
oldest, past ``max_pending``), ``failed`` (its embedding failed),
``unwatched`` (its source stopped being watched, or was watched anew, while
it waited), ``closed`` (the daemon stopped), ``dead`` (the trigger worker
failed). With no trigger watching a source, that source gets no trigger
windows at all.

**Never behind a caption.** One task (``streamcap[triggers].worker``) takes
every waiting trigger window (of every source, up to :data:`MAX_BATCH` a call)
and has the retriever embed them in one call on the runtime's *side* thread
(:meth:`streamcap.models.runtime.InferenceRuntime.run_side`, one torch
thread), which runs beside the caption thread: a trigger window waits for
other trigger windows only, never for a caption (measured in
``bench/results/trigger_latency.md``: with one shared thread and the caption
worker held back while trigger windows waited, a trigger window still waited
for the caption in progress, 2.5-5 s of CPU per demo caption on the loaded
2-core machine). ``streamcap_inference_seconds{stage="trigger"}`` is the
embedding's compute time, measured on that thread. An error while scoring a
window is logged (at most once a minute per stage) and counted in
``streamcap_trigger_errors_total``, and the path goes on; should the worker
itself end, it is logged and the windows are dropped and counted (``dead``).
:meth:`TriggerEngine.wait_idle` returns once nothing waits (for tests and
shutdown).

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
trigger) they watch; a removed trigger stops at once. A firing never stays
open: a pair that is *on* when its trigger is removed or changed gets the
*off* carrying the *on*'s id first; when only the hysteresis settings
(``min_hits``, ``of_windows``, ``cooldown_s``, ``off_after_s``) or the
sources change, the pairs still watched keep their state (and those on are
not announced). Each trigger is armed on its own: one whose phrasings or
examples cannot be used is refused with its own error log, its previous
definition (if any) stays, and the others of the same change take effect.

**Sources that stop.** When a source reports ``stopped`` or ``failed``
(:class:`~streamcap.messages.SourceStatus`, seen through :meth:`TriggerEngine.note`),
its waiting windows are scored, then every trigger on for it gets its *off*.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from streamcap.audio.windowing import Windower
from streamcap.clock import Clock, SystemClock
from streamcap.errors import ConfigError, StreamcapError
from streamcap.logs import get_logger
from streamcap.messages import (
    AudioBlock,
    Caption,
    Published,
    SourceState,
    SourceStatus,
    TriggerEvent,
    TriggerState,
    Window,
)
from streamcap.queues import BoundedQueue, DropPolicy
from streamcap.stats import Metrics
from streamcap.triggers.detector import Detector, EventIds, Verdict, announcement
from streamcap.triggers.scoring import BACKGROUND_PHRASES, AutoThreshold, decide, score_window
from streamcap.triggers.spec import TriggerPathConfig, TriggerSpec, example_paths, watches
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

ERROR_LOG_EVERY_S: Final = 60.0
"""An error of the same stage is logged at most this often (each one is counted)."""

HYSTERESIS: Final = ("min_hits", "of_windows", "cooldown_s", "off_after_s", "sources")
"""What may change in a trigger while its pairs keep their on/off state."""

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
"""``InferenceRuntime.run_side``: calls a function on the side inference thread, awaits it."""


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
        self._persisting: asyncio.Task[None] | None = None
        self._last_persist = time.monotonic()
        self._generation: dict[str, int] = {}  # source -> which windower cut its windows
        self._generations = 0
        self._inflight: set[str] = set()  # sources of the batch being embedded and scored
        self._stopped: set[str] = set()  # sources that stopped: their on pairs end when drained
        self._error_logged: dict[str, float] = {}
        self._dead = False
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
                                    "Trigger windows not scored, by source and reason (behind, "
                                    "failed, unwatched, closed, dead)", ["source", "reason"])
        self._m_errors = m.counter("streamcap_trigger_errors_total",
                                   "Errors on the trigger path, by stage (embed, score, "
                                   "worker)", ["stage"])
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
        return tuple(s for s in self.sources if watches({spec.name: spec}, spec.name, s))

    def problems(self, spec: TriggerSpec, where: str | None = None) -> list[str]:
        """What keeps ``spec`` from being used with this model (no torch: any thread).

        Phrasings the text tokenizer cannot represent, example files that are no
        files; each names ``<where>.<key>[i]`` (sources are checked where the definition
        is read, :func:`streamcap.triggers.spec.read_triggers`).
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
        return out

    def _fingerprints(self, specs: Iterable[TriggerSpec]) -> dict[str, str]:
        return {spec.name: fingerprint(spec, self.model.model_id) for spec in specs}

    def _arm(self, specs: Sequence[TriggerSpec], calibrated: Mapping[str, float],
             background: bool) -> tuple[np.ndarray | None, list[Armed], dict[str, list[str]]]:
        """Embed the phrasings and examples of ``specs``, each on its own; on the inference thread.

        Returns:
            The background phrases' embeddings (if asked), the triggers armed, and the
            problems of each trigger that could not be (an example file that cannot be
            used, a model error), by name.
        """
        model = self.model
        bg = model.embed_texts(BACKGROUND_PHRASES) if background else None
        out: list[Armed] = []
        refused: dict[str, list[str]] = {}
        for spec in specs:
            where = f"triggers.{spec.name}"
            try:
                positives, negatives = trigger_vectors(model, spec, self.config_dir,
                                                       self.path.window_s)
            except ConfigError as exc:
                refused[spec.name] = list(exc.problems)
                continue
            except StreamcapError as exc:
                refused[spec.name] = [f"{where}: {exc}"]
                continue
            threshold = spec.threshold
            from_file = threshold is None and spec.name in calibrated
            if from_file:
                threshold = calibrated[spec.name]
            out.append(Armed(spec=spec, positives=positives,
                             negatives=negatives, threshold=threshold,
                             calibrated=from_file,
                             fingerprint=fingerprint(spec, model.model_id)))
        return bg, out, refused

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
                                                 self.model.model_id, self._fingerprints(specs))
            background, armed, refused = await self._run(self._arm, specs, calibrated, True)
            if refused:
                raise ConfigError([p for found in refused.values() for p in found])
            assert background is not None
            self._background = background
            self._install(armed, removed=())
        self._task = asyncio.create_task(self._work(), name="streamcap[triggers].worker")
        self._task.add_done_callback(self._worker_done)
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
                                                     self.model.model_id,
                                                     self._fingerprints(todo))
                background, armed, refused = await self._run(
                    self._arm, todo, calibrated, self._background.size == 0)
                if background is not None:
                    self._background = background
            except Exception as exc:  # noqa: BLE001 - logged; the previous definitions stay
                _log.error("triggers refused; their previous definitions (if any) stay",
                           triggers=[s.name for s in todo], error=str(exc),
                           exc_info=None if isinstance(exc, StreamcapError) else exc)
                armed, refused = [], {}
            for name, problems in refused.items():
                _log.error("trigger refused; its previous definition (if any) stays",
                           trigger=name, problems=problems)
        if self._closed:
            return
        self._install(armed, removed=removed)
        _log.info("triggers changed", added_or_changed=[a.spec.name for a in armed],
                  removed=removed, triggers=sorted(self._armed))

    def _install(self, armed: Sequence[Armed], removed: Collection[str]) -> None:
        """Put embedded triggers in force, drop removed ones, announce the new pairs.

        A pair on when its trigger goes or changes gets its *off* first; pairs of a
        trigger whose hysteresis settings alone changed keep their state.
        """
        now = self._clock.wall()
        for name in removed:
            self._armed.pop(name, None)
            for key in [k for k in self._detectors if k[0] == name]:
                self._end(key, now)
                del self._detectors[key]
        for a in armed:
            name = a.spec.name
            old = self._armed.get(name)
            self._armed[name] = a
            keep = old is not None and _hysteresis_only(old.spec, a.spec)
            watched = self.watched(a.spec)
            for key in [k for k in self._detectors if k[0] == name]:
                if keep and key[1] in watched:
                    self._detectors[key].respec(a.spec)
                    continue
                self._end(key, now)
                del self._detectors[key]
            for source in watched:
                key = (name, source)
                if old is None or old.fingerprint != a.fingerprint or key not in self._autos:
                    fp, history = self._histories.get(source, {}).get(name, ("", ()))
                    self._autos[key] = AutoThreshold(history if fp == a.fingerprint else ())
                kept = self._detectors.get(key)
                if kept is not None and kept.on:
                    continue  # its state on the bus is "on", and it stays so
                if kept is None:
                    self._detectors[key] = Detector(a.spec, source, self._ids,
                                                    model=self.model.model_id)
                self._m_state.set(0, name, source)
                self._m_fired.inc(0, name, source)
                self._publish(announcement(name, source, self._ids,
                                           model=self.model.model_id, at=now))
        for key in [k for k in self._autos if k[0] not in self._armed]:
            del self._autos[key]
        self._rewatch()

    def _end(self, key: tuple[str, str], at: float) -> None:
        """If the pair is on, publish the *off* that ends its firing now."""
        detector = self._detectors.get(key)
        if detector is None:
            return
        event = detector.end(at, caption=self._captions.get(key[1]))
        if event is not None:
            self._emit(event)
        self._m_state.set(0, *key)

    def _rewatch(self) -> None:
        """A windower and a queue for every watched source, none for the others."""
        watched = {s for a in self._armed.values() for s in self.watched(a.spec)}
        for source in watched - set(self._windowers):
            self._windowers[source] = Windower(
                source, self.path.window_s, self.path.hop_s, (self.model.sample_rate_hz,),
                max_gap_s=self.max_gap_s, run_id=self.run_id)
            self._queues[source] = BoundedQueue(self.path.max_pending,
                                                name=f"trigger_windows[{source}]")
            self._generations += 1
            self._generation[source] = self._generations
            for reason in ("behind", "failed", "unwatched", "closed", "dead"):
                self._m_dropped.inc(0, source, reason)
            self._m_windows.inc(0, source)
        for source in set(self._windowers) - watched:
            del self._windowers[source]
            self._drop(self._queues.pop(source).clear(), "unwatched")
            self._generation.pop(source, None)
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
        self._stopped.discard(block.source_id)
        cut = windower.feed(block).windows
        if self._dead:
            self._drop(cut, "dead")
            return
        queue = self._queues[block.source_id]
        for window in cut:
            for dropped in queue.offer(window, policy=DropPolicy.DROP_OLDEST):
                self._drop([dropped.item], "behind")
                _log.debug("trigger path is behind: dropped the oldest trigger window",
                           source=block.source_id, window_id=dropped.item.window_id)
            self._idle.clear()
            self._ready.set()

    def note(self, msg: Published) -> None:
        """See what is published: the latest caption of each source goes into events, and a
        source that stopped or failed has its triggers turned off (once its windows are scored)."""
        if isinstance(msg, Caption):
            self._captions[msg.source_id] = msg.text
        elif isinstance(msg, SourceStatus):
            if msg.state in (SourceState.STOPPED, SourceState.FAILED):
                self._stopped.add(msg.source_id)
                self._end_stopped()
            else:
                self._stopped.discard(msg.source_id)

    def _end_stopped(self) -> None:
        """End the firings of stopped sources whose windows are all scored."""
        now = self._clock.wall()
        for source in list(self._stopped):
            queue = self._queues.get(source)
            if source in self._inflight or (queue is not None and len(queue)):
                continue
            self._stopped.discard(source)
            for key in [k for k in self._detectors if k[1] == source]:
                self._end(key, now)

    def _drop(self, windows: Collection[Window], reason: str) -> None:
        for window in windows:
            self.dropped += 1
            self._m_dropped.inc(1, window.source_id, reason)

    # -- scheduling ------------------------------------------------------------------------

    def _pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def wait_idle(self) -> None:
        """Return once no trigger window waits or is being embedded.

        Returns at once after :meth:`close` or once the worker has ended: captions never
        wait on a trigger path that no longer runs.
        """
        while not self._closed and not self._dead and (self._busy or self._pending()):
            self._idle.clear()
            await self._idle.wait()

    def _take(self) -> list[tuple[int, Window]]:
        """Up to MAX_BATCH waiting windows, oldest first per source, sources in turn.

        Each with the generation of the windower that cut it.
        """
        batch: list[tuple[int, Window]] = []
        while len(batch) < MAX_BATCH:
            took = False
            for source, queue in self._queues.items():
                if len(batch) >= MAX_BATCH:
                    break
                window = queue.pop()
                if window is not None:
                    batch.append((self._generation[source], window))
                    took = True
            if not took:
                break
        batch.sort(key=lambda gw: (gw[1].source_id, gw[1].epoch, gw[1].start_ms))
        return batch

    def _embedder(self) -> Callable[[Sequence[Window]], tuple[np.ndarray, float]]:
        """``model.embed_windows`` that also returns its compute time (on the inference thread)."""
        embed = self.model.embed_windows

        @functools.wraps(embed)
        def timed(windows: Sequence[Window]) -> tuple[np.ndarray, float]:
            started = time.perf_counter()
            vectors = embed(windows)
            return vectors, time.perf_counter() - started

        return timed

    def _error(self, stage: str, exc: BaseException, **fields: Any) -> None:
        """Count an error; log it unless one of the same stage was logged lately."""
        self._m_errors.inc(1, stage)
        now = time.monotonic()
        if now - self._error_logged.get(stage, -math.inf) < ERROR_LOG_EVERY_S:
            return
        self._error_logged[stage] = now
        _log.error("trigger path error; the path goes on (logged at most once a minute per "
                   "stage, each counted in streamcap_trigger_errors_total)", stage=stage,
                   error=repr(exc), exc_info=exc, **fields)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        """The worker ended: unless closed, the path is dead; the caption gate opens for good."""
        if self._closed:
            return
        self._dead = True
        self._busy = False
        for queue in self._queues.values():
            self._drop(queue.clear(), "dead")
        self._idle.set()
        if task.cancelled():
            _log.warning("the trigger worker was cancelled: no trigger events until a restart")
            return
        exc = task.exception()
        self._m_errors.inc(1, "worker")
        _log.error("the trigger worker ended: no trigger events until a restart; captions go "
                   "on", error=repr(exc), exc_info=exc)

    async def _work(self) -> None:
        embed = self._embedder()
        while not self._closed:
            batch = self._take()
            if not batch:
                self._busy = False
                self._end_stopped()
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            self._busy = True
            windows = [w for _, w in batch]
            self._inflight = {w.source_id for w in windows}
            try:
                vectors, seconds = await self._run(embed, windows)
            except asyncio.CancelledError:
                self._drop(windows, "closed")
                raise
            except Exception as exc:  # noqa: BLE001 - logged and counted; the path goes on
                self._drop(windows, "failed")
                self._error("embed", exc, windows=len(windows))
                continue
            finally:
                self._busy = False
                self._inflight = set()
            for _ in windows:
                self._m_seconds.observe(seconds / len(windows), "trigger")
            for (generation, window), vector in zip(batch, vectors, strict=True):
                if self._generation.get(window.source_id) != generation:
                    self._drop([window], "unwatched")  # cut by a windower since replaced
                    continue
                try:
                    self._decide(window, vector)
                except Exception as exc:  # noqa: BLE001 - logged and counted; the path goes on
                    self._error("score", exc, source=window.source_id,
                                window_id=window.window_id)
            self._end_stopped()
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
            try:
                event = self._verdict(window, vector, armed, detector)
            except Exception as exc:  # noqa: BLE001 - logged and counted; other triggers go on
                self._error("score", exc, trigger=name, source=source,
                            window_id=window.window_id)
                continue
            if event is not None:
                self._emit(event)

    def _verdict(self, window: Window, vector: np.ndarray, armed: Armed,
                 detector: Detector) -> TriggerEvent | None:
        name, source = armed.spec.name, window.source_id
        score = score_window(vector, armed.positives, armed.negatives, self._background)
        auto = self._autos[(name, source)]
        threshold, hit = decide(score, armed.threshold, auto)
        self._m_score.observe(score.score, name)
        return detector.observe(
            Verdict(epoch=window.epoch, start_s=window.start_s, end_s=window.end_s,
                    end_at=window.captured_at + window.duration_s, score=score.score,
                    threshold=threshold, hit=hit),
            caption=self._captions.get(source))

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
        """Write the learned "auto" history to the state directory (off the event loop).

        One write at a time: a write still going on (its caller may have been cancelled,
        the thread goes on) is waited for first.
        """
        pending = self._persisting
        if pending is not None and not pending.done():
            await asyncio.shield(pending)
        self._last_persist = time.monotonic()
        snapshot = self._snapshot()
        self._histories = snapshot
        task = self._persisting = asyncio.create_task(self._write(snapshot),
                                                      name="streamcap[triggers].persist")
        await asyncio.shield(task)

    async def _write(self, snapshot: Mapping[str, Mapping[str, tuple[str, Sequence[float]]]]
                     ) -> None:
        try:
            await asyncio.to_thread(write_histories, self.state_dir, snapshot)
        except OSError as exc:
            _log.warning("cannot write the trigger history", path=str(self.state_dir),
                         error=str(exc))

    async def close(self) -> None:
        """Stop scoring; write the learned history. Waiting windows are dropped (counted)."""
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
        for queue in self._queues.values():
            self._drop(queue.clear(), "closed")
        if self._armed:
            await self.persist()
        elif self._persisting is not None:
            await self._persisting


def _hysteresis_only(old: TriggerSpec, new: TriggerSpec) -> bool:
    """Whether ``new`` differs from ``old`` in :data:`HYSTERESIS` settings (or not at all)."""
    return dataclasses.replace(old, **{f: getattr(new, f) for f in HYSTERESIS}) == new


def _round(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None
