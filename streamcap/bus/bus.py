"""The plugin bus: fan-out of published messages to sinks, and sink supervision.

``publish`` is synchronous and never waits: it offers the message to the
:class:`~streamcap.bus.inbox.Inbox` of every sink that accepts its kind, and a
sink that falls behind loses messages by its inbox's drop policy (counted)
instead of slowing capture, inference or another sink.

Each sink runs as the task ``streamcap[sink:<instance>].run`` inside one
TaskGroup. A sink whose ``run`` raises (or returns while its inbox is still
open) is logged once and restarted on the same inbox, so that messages
offered meanwhile reach the restarted sink, after a delay from its
:class:`~streamcap.backoff.Backoff` with full jitter (``uniform(0, min(max,
initial * 2**attempt))`` seconds); the schedule starts again once a run has
lasted ``restart_reset_s``. A :class:`~streamcap.errors.ConfigError` from a sink's
first run, before it called ``ready`` (its port is taken, say), ends :meth:`PluginBus.run`
with that error instead: the daemon stops with exit 2. Shutdown (:meth:`PluginBus.close`) closes every inbox,
lets the sinks drain and flush, and cancels those that outlast the timeout;
what they leave behind is counted as dropped.

A sink configured with ``publish = "change"`` gets a captioned window (its
caption and embedding, offered together by :meth:`PluginBus.publish_result`)
only when its :class:`~streamcap.bus.change.ChangeFilter` says it changed;
every other window is counted in ``streamcap_sink_suppressed_total{sink,reason}``
(``reason="unchanged"``), never silently lost. The decision is made on the
event loop as the window arrives, with state per sink per source.

Metrics: ``streamcap_sink_queue_depth{sink}``,
``streamcap_sink_dropped_total{sink,kind}``, ``streamcap_sink_restarts_total{sink}``,
``streamcap_sink_suppressed_total{sink,reason}`` (sinks with ``publish = "change"``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Self

from streamcap.backoff import Backoff
from streamcap.bus.change import ChangeFilter, ChangeRule, Reason
from streamcap.bus.inbox import DEFAULT_MAX_PENDING, Inbox
from streamcap.bus.plugin import LoadedSink, Sink, SinkContext
from streamcap.bus.wire import kind_of
from streamcap.errors import ConfigError, StreamcapError
from streamcap.logs import get_logger
from streamcap.messages import Caption, Embedding, Published, check_run_id, new_run_id
from streamcap.queues import DropPolicy
from streamcap.stats import Metrics

_log = get_logger(__name__)


def task_name(instance: str) -> str:
    """The asyncio task name of a sink's run: ``streamcap[sink:<instance>].run``."""
    return f"streamcap[sink:{instance}].run"


class _SinkState:
    __slots__ = ("backoff", "change", "inbox", "ready", "restarts", "sink", "task")

    def __init__(self, sink: Sink, inbox: Inbox, backoff: Backoff,
                 change: ChangeFilter | None) -> None:
        self.sink = sink
        self.inbox = inbox
        self.ready = asyncio.Event()
        self.restarts = 0
        self.backoff = backoff
        self.change = change
        self.task: asyncio.Task[None] | None = None


class PluginBus:
    """Delivers published messages to sinks and keeps the sinks running.

    Args:
        sinks: Sink instances by config table name (e.g. from
            :func:`~streamcap.bus.plugin.load_sinks`).
        node_id: The daemon's node id, passed to each sink's context.
        run_id: The daemon run's id, passed to each sink's context; None
            draws a fresh one.
        metrics: The registry for the bus's and the sinks' metrics.
        state_root: Each sink gets ``state_root / <instance>`` as its state_dir.
        queue_sizes: Inbox ``max_pending`` per sink; a sink not named uses its
            configured ``queue_size`` (a :class:`LoadedSink`) or 256.
        policies: Drop-policy overrides per sink, then per kind.
        changes: Change-only rules per sink (``publish = "change"``); a sink not
            named uses its configured rule (a :class:`LoadedSink`'s ``change``) or
            gets every window.
        restart_initial_s: First restart delay cap, seconds.
        restart_max_s: Cap on every restart delay, seconds.
        restart_reset_s: A run lasting this long resets the backoff, seconds.
        rng: Random source for the restart jitter.

    Raises:
        ValueError: A queue size or policy is invalid, or names an unknown sink.
    """

    def __init__(
        self,
        sinks: Mapping[str, Sink],
        *,
        node_id: str,
        run_id: str | None = None,
        metrics: Metrics,
        state_root: Path,
        queue_sizes: Mapping[str, int] | None = None,
        policies: Mapping[str, Mapping[str, DropPolicy]] | None = None,
        changes: Mapping[str, ChangeRule] | None = None,
        restart_initial_s: float = 0.5,
        restart_max_s: float = 30.0,
        restart_reset_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        unknown = sorted((set(queue_sizes or {}) | set(policies or {}) | set(changes or {}))
                         - set(sinks))
        if unknown:
            raise ValueError(f"queue_sizes/policies/changes name unknown sinks: "
                             f"{', '.join(unknown)}")
        if not 0 < restart_initial_s <= restart_max_s or restart_reset_s <= 0:
            raise ValueError("expected 0 < restart_initial_s <= restart_max_s and "
                             "restart_reset_s > 0")
        self.node_id = node_id
        self.run_id = new_run_id() if run_id is None else check_run_id(run_id)
        self.metrics = metrics
        self.state_root = Path(state_root)
        rng = rng or random.Random()
        self._depth = metrics.gauge("streamcap_sink_queue_depth",
                                    "Messages waiting in a sink's inbox.", ["sink"])
        self._dropped = metrics.counter("streamcap_sink_dropped_total",
                                        "Messages a sink's inbox dropped, by kind.",
                                        ["sink", "kind"])
        self._restarts = metrics.counter("streamcap_sink_restarts_total",
                                         "Times a failed sink was restarted.", ["sink"])
        self._suppressed = metrics.counter(
            "streamcap_sink_suppressed_total",
            'Captioned windows not offered to a sink with publish = "change", by reason.',
            ["sink", "reason"])
        self._states: dict[str, _SinkState] = {}
        for name, sink in sinks.items():
            size = (queue_sizes or {}).get(name)
            if size is None:
                size = sink.queue_size if isinstance(sink, LoadedSink) else DEFAULT_MAX_PENDING
            inbox = Inbox(
                name,
                max_pending=size,
                policies=(policies or {}).get(name),
                on_drop=self._drop_counter(name),
                on_depth=self._depth_gauge(name),
            )
            backoff = Backoff(restart_initial_s, restart_max_s, jitter=1.0,
                              reset_after_s=restart_reset_s, rng=rng)
            rule = (changes or {}).get(name)
            if rule is None and isinstance(sink, LoadedSink):
                rule = sink.change
            self._states[name] = _SinkState(sink, inbox, backoff,
                                            None if rule is None else ChangeFilter(rule))
            if rule is not None:
                self._suppressed.inc(0.0, name, Reason.UNCHANGED.value)
            self._depth.set(0, name)
            for kind in sorted(sink.accepts):
                self._dropped.inc(0.0, name, kind)
            self._restarts.inc(0.0, name)
        self._closing = asyncio.Event()
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ metrics hooks

    def _drop_counter(self, name: str) -> Callable[[str, Published], None]:
        def count(kind: str, msg: Published) -> None:
            self._dropped.inc(1.0, name, kind)
            state = self._states.get(name)
            if state is not None and state.change is not None and isinstance(msg, Caption):
                state.change.forget(msg)  # a change-only reference the sink never got

        return count

    def _depth_gauge(self, name: str) -> Callable[[int], None]:
        def set_depth(depth: int) -> None:
            self._depth.set(float(depth), name)

        return set_depth

    # ------------------------------------------------------------------ state

    @property
    def inboxes(self) -> Mapping[str, Inbox]:
        """Each sink's inbox, by instance name."""
        return MappingProxyType({n: s.inbox for n, s in self._states.items()})

    @property
    def restarts(self) -> Mapping[str, int]:
        """Restarts so far, by instance name."""
        return MappingProxyType({n: s.restarts for n, s in self._states.items()})

    @property
    def ready(self) -> bool:
        """True once every sink has called ``ctx.ready()``."""
        return all(s.ready.is_set() for s in self._states.values())

    def not_ready(self) -> list[str]:
        """Instances that have not called ``ctx.ready()`` yet."""
        return sorted(n for n, s in self._states.items() if not s.ready.is_set())

    async def wait_ready(self) -> None:
        """Return once every sink has called ``ctx.ready()`` (at once if there are none).

        A sink that never gets ready (its broker is down) keeps this waiting:
        wrap it in ``asyncio.timeout`` and report :meth:`not_ready`.
        """
        for state in self._states.values():
            await state.ready.wait()

    # ------------------------------------------------------------------ publishing

    def publish(self, msg: Published) -> None:
        """Offer ``msg`` to every sink that accepts its kind; never waits.

        Safe from any thread: called off the event loop's thread once
        :meth:`run` has started, the offer is moved onto the loop.

        Raises:
            TypeError: ``msg`` is not a Caption, Embedding or SourceStatus.
        """
        kind = kind_of(msg)
        if not self._off_loop(self._offer, kind, msg):
            self._offer(kind, msg)

    def _off_loop(self, call: Callable[..., None], *args: object) -> bool:
        """Move ``call(*args)`` onto the running bus's loop if called from another thread;
        False when the caller should call it itself (on the loop, or before :meth:`run`)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return False
        loop.call_soon_threadsafe(call, *args)
        return True

    def _offer(self, kind: str, msg: Published) -> None:
        for state in self._states.values():
            if kind in state.sink.accepts:
                state.inbox.offer(msg)

    def publish_result(self, caption: Caption, embedding: Embedding | None) -> None:
        """Offer one window's caption, then its embedding (if any); never waits.

        The unit in which a sink's ``publish`` option decides whether a window is
        published at all: a sink with ``publish = "change"`` gets both or neither
        (a suppressed window is counted); :meth:`publish` of either alone always
        offers it. Safe from any thread, like :meth:`publish`.

        Raises:
            TypeError: ``caption`` is not a Caption or ``embedding`` not an Embedding.
        """
        if not isinstance(caption, Caption) or not isinstance(embedding, Embedding | None):
            raise TypeError(f"publish_result takes a Caption and an Embedding or None, got "
                            f"{type(caption).__name__} and {type(embedding).__name__}")
        if not self._off_loop(self._offer_result, caption, embedding):
            self._offer_result(caption, embedding)

    def _offer_result(self, caption: Caption, embedding: Embedding | None) -> None:
        for name, state in self._states.items():
            accepts = state.sink.accepts
            wants_caption = "caption" in accepts
            wants_embedding = embedding is not None and "embedding" in accepts
            if not (wants_caption or wants_embedding):
                continue
            if state.change is not None:
                reason = state.change.admit(caption, embedding)
                if not reason.published:
                    self._suppressed.inc(1.0, name, reason.value)
                    continue
            if wants_caption:
                state.inbox.offer(caption)
            if wants_embedding and embedding is not None:
                state.inbox.offer(embedding)

    # ------------------------------------------------------------------ running

    def _prepare(self) -> None:
        if self._started:
            raise RuntimeError("PluginBus.run() was already started")
        for name in self._states:
            path = self.state_root / name
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"state directory {path} for sink {name!r} cannot be "
                                  f"created: {exc.strerror or exc}") from exc
        self._started = True
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Run every sink, supervised, until :meth:`close` has let them finish.

        Raises:
            ConfigError: A sink's state directory cannot be created, or a sink's first run
                failed with a ConfigError before it was ready (its port is taken).
            RuntimeError: The bus was already started.
        """
        self._prepare()
        await self._run_sinks()

    async def _run_sinks(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for name, state in self._states.items():
                    state.task = tg.create_task(self._supervise(name, state),
                                                name=task_name(name))
        except* ConfigError as group:  # a sink could not start at all
            raise ConfigError([p for e in group.exceptions if isinstance(e, ConfigError)
                               for p in e.problems]) from None

    async def close(self, timeout_s: float = 10.0) -> None:
        """Close every inbox, wait up to ``timeout_s`` for the sinks to flush, cancel the rest.

        Messages still pending in a cancelled sink's inbox are counted as dropped.
        """
        self._closing.set()
        for state in self._states.values():
            state.inbox.close()
        tasks = [s.task for s in self._states.values() if s.task is not None and not s.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                _log.warning("sink did not finish within the shutdown timeout; cancelling",
                             task=task.get_name(), timeout_s=timeout_s)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=timeout_s)
        if not self._started:
            for state in self._states.values():
                state.inbox.discard("the bus closed before the sink ran")
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            await asyncio.wait([runner], timeout=timeout_s)

    async def __aenter__(self) -> Self:
        """Start the sinks in a background task (``async with bus:`` then ``publish``)."""
        self._prepare()
        self._runner = asyncio.create_task(self._run_sinks(), name="streamcap[bus].run")
        await asyncio.sleep(0)  # let run() start the sinks
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
        runner = self._runner
        if runner is not None and runner.done() and not runner.cancelled():
            error = runner.exception()
            if error is not None and exc is None:
                raise error

    # ------------------------------------------------------------------ supervision

    def _context(self, name: str, state: _SinkState) -> SinkContext:
        logger = get_logger("streamcap.sink").bind(sink=name)

        def ready() -> None:
            if not state.ready.is_set():
                logger.info("sink ready")
                state.ready.set()

        return SinkContext(instance=name, node_id=self.node_id, metrics=self.metrics,
                           ready=ready, logger=logger, state_dir=self.state_root / name,
                           run_id=self.run_id)

    async def _supervise(self, name: str, state: _SinkState) -> None:
        loop = asyncio.get_running_loop()
        ctx = self._context(name, state)
        try:
            while True:
                started = loop.time()
                failure: BaseException | None = None
                try:
                    await state.sink.run(state.inbox, ctx)
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    failure = exc  # the sink cancelled itself: a failure, not shutdown
                except Exception as exc:  # noqa: BLE001 - any failure of a plugin is contained
                    failure = exc
                if failure is None and state.inbox.closed:
                    return
                if (isinstance(failure, ConfigError) and state.restarts == 0
                        and not state.ready.is_set()):
                    raise failure  # the first start failed on its configuration: fatal
                state.backoff.healthy(loop.time() - started)
                if state.inbox.closed and self._closing.is_set() and failure is not None:
                    _log.error("sink failed during shutdown", sink=name,
                               exc_info=failure, pending=state.inbox.depth)
                    return
                delay = state.backoff.next_delay()
                attempt = state.backoff.attempt
                if failure is None:
                    _log.error("sink returned while its inbox was open; restarting",
                               sink=name, attempt=attempt, retry_in_s=round(delay, 3))
                elif isinstance(failure, StreamcapError):  # a known failure: its message says it
                    _log.error("sink failed; restarting", sink=name, attempt=attempt,
                               retry_in_s=round(delay, 3), error=str(failure))
                else:
                    _log.error("sink failed; restarting", sink=name, attempt=attempt,
                               retry_in_s=round(delay, 3), exc_info=failure)
                try:
                    await asyncio.wait_for(self._closing.wait(), timeout=delay)
                except TimeoutError:
                    pass
                state.restarts += 1
                self._restarts.inc(1.0, name)
        finally:
            state.inbox.discard("the sink stopped before reading it")

