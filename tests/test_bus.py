"""streamcap.bus.bus: fan-out, isolation of slow sinks, restarts, shutdown, readiness."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from test_inbox import cap, emb
from timing import scaled

from streamcap.bus.bus import PluginBus, task_name
from streamcap.bus.change import ChangeRule
from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import LoadedSink, PluginInfo, SinkContext
from streamcap.errors import ConfigError
from streamcap.messages import Caption, Embedding, Published, SourceState, SourceStatus
from streamcap.queues import DropPolicy
from streamcap.stats import Metrics

WAIT_S = scaled(10.0)  # generous upper bound for awaiting something that must happen


class Recorder:
    """A well-behaved sink: records everything, calls ready, flushes on close."""

    def __init__(self, accepts: frozenset[str] = frozenset({"caption", "embedding", "status"}),
                 expect: int = 0) -> None:
        self.accepts = accepts
        self.got: list[Published] = []
        self.flushed = False
        self.task_names: list[str] = []
        self.ctx: SinkContext | None = None
        self.expect = expect
        self.all_in = asyncio.Event()

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        self.ctx = ctx
        task = asyncio.current_task()
        assert task is not None
        self.task_names.append(task.get_name())
        ctx.ready()
        async for msg in inbox:
            self.got.append(msg)
            if self.expect and len(self.got) >= self.expect:
                self.all_in.set()
        self.flushed = True


class Stuck:
    """A sink that never reads its inbox (a dead client, a hung broker)."""

    accepts = frozenset({"caption"})

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        ctx.ready()
        await asyncio.Event().wait()


class Flaky:
    """Raises on its first ``failures`` runs (after reading one message), then records."""

    accepts = frozenset({"caption"})

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0
        self.got: list[Published] = []
        self.working = asyncio.Event()

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            self.got.append(await inbox.get())
            raise ConnectionError(f"broker went away (run {self.runs})")
        self.working.set()
        async for msg in inbox:
            self.got.append(msg)


def make_bus(tmp_path: Path, sinks: dict[str, object], **kwargs: object) -> PluginBus:
    return PluginBus(sinks, node_id="node", metrics=Metrics(), state_root=tmp_path,  # type: ignore[arg-type]
                     restart_initial_s=0.01, restart_max_s=0.05, rng=random.Random(1), **kwargs)  # type: ignore[arg-type]


async def test_publish_fans_out_by_accepts_and_close_flushes(tmp_path: Path) -> None:
    everything = Recorder()
    captions = Recorder(frozenset({"caption"}))
    bus = make_bus(tmp_path, {"all": everything, "cap": captions})
    async with bus:
        await asyncio.wait_for(bus.wait_ready(), WAIT_S)
        assert bus.ready and bus.not_ready() == []
        status = SourceStatus(source_id="a", state=SourceState.RUNNING)
        e0 = emb(0)
        for m in (status, cap(0), e0, cap(1)):
            bus.publish(m)
    assert everything.flushed and captions.flushed
    assert [id(m) for m in everything.got] == [id(status), id(everything.got[1]), id(e0),
                                               id(everything.got[3])]
    assert captions.got == [cap(0), cap(1)]
    assert everything.task_names == [task_name("all")] == ["streamcap[sink:all].run"]
    assert everything.ctx is not None and everything.ctx.state_dir == tmp_path / "all"
    assert (tmp_path / "all").is_dir() and everything.ctx.node_id == "node"


async def test_a_sink_that_never_reads_does_not_delay_another(tmp_path: Path) -> None:
    n, size = 1000, 16
    fast = Recorder(frozenset({"caption"}), expect=n)
    bus = make_bus(tmp_path, {"stuck": Stuck(), "fast": fast},
                   queue_sizes={"stuck": size, "fast": n})
    metrics = bus.metrics
    async with bus:
        await asyncio.wait_for(bus.wait_ready(), WAIT_S)
        for i in range(n):
            bus.publish(cap(i))  # synchronous: nothing here can wait on a sink
        await asyncio.wait_for(fast.all_in.wait(), WAIT_S)
        assert [m.seq for m in fast.got] == list(range(n))  # type: ignore[union-attr]
        stuck_inbox = bus.inboxes["stuck"]
        assert stuck_inbox.depth == size
        assert stuck_inbox.dropped["caption"] == n - size
        dropped = metrics.counter("streamcap_sink_dropped_total", "", ["sink", "kind"])
        assert dropped.value("stuck", "caption") == n - size
        assert dropped.value("fast", "caption") == 0
        depth = metrics.gauge("streamcap_sink_queue_depth", "", ["sink"])
        assert depth.value("stuck") == size and depth.value("fast") == 0
        await bus.close(timeout_s=0.2)  # "stuck" cannot flush: it is cancelled
    # What the cancelled sink left behind is counted, not lost silently.
    assert bus.inboxes["stuck"].dropped["caption"] == n
    text = metrics.render()
    assert f'streamcap_sink_dropped_total{{kind="caption",sink="stuck"}} {n}.0' in text
    assert 'streamcap_sink_dropped_total{kind="caption",sink="fast"} 0.0' in text


async def test_failing_sink_is_restarted_and_gets_later_messages(tmp_path: Path) -> None:
    flaky = Flaky(failures=2)
    bus = make_bus(tmp_path, {"flaky": flaky})
    async with bus:
        bus.publish(cap(0))  # read by failing run 1
        bus.publish(cap(1))  # read by failing run 2
        await asyncio.wait_for(flaky.working.wait(), WAIT_S)
        for i in range(2, 6):
            bus.publish(cap(i))
    assert flaky.runs == 3
    assert [m.seq for m in flaky.got] == [0, 1, 2, 3, 4, 5]  # type: ignore[union-attr]
    assert bus.restarts["flaky"] == 2
    restarts = bus.metrics.counter("streamcap_sink_restarts_total", "", ["sink"])
    assert restarts.value("flaky") == 2


async def test_messages_published_during_backoff_reach_the_restarted_sink(tmp_path: Path) -> None:
    flaky = Flaky(failures=1)
    bus = PluginBus({"f": flaky}, node_id="n", metrics=Metrics(), state_root=tmp_path,
                    restart_initial_s=0.5, restart_max_s=0.5, rng=random.Random(3))
    async with bus:
        bus.publish(cap(0))
        while flaky.runs < 1 or bus.inboxes["f"].depth:  # run 1 took cap(0) and failed
            await asyncio.sleep(0.001)
        bus.publish(cap(1))  # offered while the sink is down
        await asyncio.wait_for(flaky.working.wait(), WAIT_S)
    assert [m.seq for m in flaky.got] == [0, 1]  # type: ignore[union-attr]


async def test_sink_returning_early_is_restarted(tmp_path: Path) -> None:
    class Quitter:
        accepts = frozenset({"caption"})
        runs = 0

        async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
            self.runs += 1
            if self.runs > 1:
                async for _ in inbox:
                    pass

    quitter = Quitter()
    bus = make_bus(tmp_path, {"q": quitter})
    async with bus:
        while quitter.runs < 2:
            await asyncio.sleep(0.001)
    assert bus.restarts["q"] == 1


async def test_close_interrupts_backoff_and_lets_the_sink_drain(tmp_path: Path) -> None:
    flaky = Flaky(failures=1)
    bus = PluginBus({"f": flaky}, node_id="n", metrics=Metrics(), state_root=tmp_path,
                    restart_initial_s=3600.0, restart_max_s=3600.0,
                    rng=random.Random(0))
    runner = asyncio.create_task(bus.run())
    bus.publish(cap(0))
    bus.publish(cap(1))
    while flaky.runs < 1:
        await asyncio.sleep(0.001)
    await asyncio.wait_for(bus.close(timeout_s=WAIT_S), WAIT_S)  # not an hour
    await asyncio.wait_for(runner, WAIT_S)
    assert [m.seq for m in flaky.got] == [0, 1]  # type: ignore[union-attr]
    assert flaky.runs == 2


async def test_publish_from_another_thread_is_delivered(tmp_path: Path) -> None:
    rec = Recorder(frozenset({"caption"}), expect=50)
    bus = make_bus(tmp_path, {"r": rec})
    async with bus:
        await asyncio.wait_for(bus.wait_ready(), WAIT_S)

        def produce() -> None:
            for i in range(50):
                bus.publish(cap(i))

        thread = threading.Thread(target=produce)
        thread.start()
        await asyncio.to_thread(thread.join)
        await asyncio.wait_for(rec.all_in.wait(), WAIT_S)
    assert [m.seq for m in rec.got] == list(range(50))  # type: ignore[union-attr]


async def test_wait_ready_waits_for_every_sink(tmp_path: Path) -> None:
    gate = asyncio.Event()

    class Late:
        accepts = frozenset({"caption"})

        async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
            await gate.wait()
            ctx.ready()
            ctx.ready()  # idempotent
            async for _ in inbox:
                pass

    bus = make_bus(tmp_path, {"late": Late(), "rec": Recorder()})
    async with bus:
        waiter = asyncio.create_task(bus.wait_ready())
        while bus.not_ready() != ["late"]:
            await asyncio.sleep(0.001)
        assert not waiter.done() and not bus.ready
        gate.set()
        await asyncio.wait_for(waiter, WAIT_S)
        assert bus.ready


async def test_loaded_sink_queue_size_and_accepts_are_used(tmp_path: Path) -> None:
    rec = Recorder()
    info = PluginInfo(group="streamcap.sinks", name="rec", value="x:y", distribution="d",
                      version="1")
    loaded = LoadedSink(instance="r", sink=rec, accepts=frozenset({"status"}), queue_size=3,
                        plugin=info)
    bus = make_bus(tmp_path, {"r": loaded})
    assert bus.inboxes["r"].max_pending == 3
    async with bus:
        bus.publish(cap(0))
        bus.publish(SourceStatus(source_id="a", state=SourceState.STOPPED))
    assert [type(m).__name__ for m in rec.got] == ["SourceStatus"]


def test_constructor_rejects_unknown_sink_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown sinks: nope"):
        make_bus(tmp_path, {"r": Recorder()}, queue_sizes={"nope": 3})


def test_publish_rejects_non_messages(tmp_path: Path) -> None:
    bus = make_bus(tmp_path, {"r": Recorder()})
    with pytest.raises(TypeError):
        bus.publish("caption")  # type: ignore[arg-type]


async def test_unwritable_state_root_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bus = make_bus(blocker, {"r": Recorder()})
    with pytest.raises(ConfigError, match=r"state directory .*file/r for sink 'r' cannot be created"):
        async with bus:
            pass


# --------------------------------------------------------------------------- publish = "change"


def window(seq: int, text: str, angle_deg: float, source: str = "a",
           at: float = 1_700_000_000.0) -> tuple[Caption, Embedding]:
    """A captioned window: its caption ``text`` and a unit embedding at ``angle_deg``."""
    wid = f"{source}:run:0:{seq * 5000}"
    a = np.deg2rad(angle_deg)
    vector = np.array([np.cos(a), np.sin(a), 0.0], dtype=np.float32)
    vector.flags.writeable = False
    return (Caption(window_id=wid, source_id=source, seq=seq, start_s=seq * 5.0,
                    end_s=seq * 5.0 + 10, captured_at=at + seq * 5.0, text=text, score=0.5),
            Embedding(window_id=wid, source_id=source, seq=seq, start_s=seq * 5.0,
                      end_s=seq * 5.0 + 10, model="m", vector=vector))


async def test_a_change_sink_gets_the_changes_and_an_every_sink_gets_every_window(
        tmp_path: Path) -> None:
    every, change = Recorder(), Recorder()
    rule = ChangeRule(heartbeat_s=60.0, change_distance=0.3)
    keep = {"embedding": DropPolicy.DROP_OLDEST}  # no embedding superseded while pending
    bus = make_bus(tmp_path, {"every": every, "change": change}, changes={"change": rule},
                   policies={"every": keep, "change": keep})
    run = [window(0, "a dog barks", 0), window(1, "a dog barks", 5),  # unchanged
           window(2, "a dog barks", 10), window(3, "rain falls", 10),  # text
           window(4, "rain falls", 15), window(5, "rain falls", 80),  # distance
           window(0, "a dog barks", 0, source="b"),  # another source: its first
           # 5 s after the last published window of a, then 60 s after it: heartbeat
           window(6, "rain falls", 80), window(17, "rain falls", 80),
           window(18, "rain falls", 85)]
    status = SourceStatus(source_id="a", state=SourceState.STALLED)
    async with bus:
        await asyncio.wait_for(bus.wait_ready(), WAIT_S)
        for i, (caption, embedding) in enumerate(run):
            bus.publish_result(caption, embedding)
            if i == 2:
                bus.publish(status)  # status is never subject to the rule
    assert every.got == [m for pair in run for m in pair][:6] + [status] + [
        m for pair in run[3:] for m in pair]
    published = [0, 3, 5, 6, 8]  # first, text, distance, first of b, heartbeat
    want: list[Published] = []
    for i in published:
        want += list(run[i])
        if i == 0:
            want.append(status)  # published after window 2, which was suppressed
    assert change.got == want
    # the embedding follows its caption: never one without the other
    assert [m.window_id for m in change.got if isinstance(m, Caption)] == [
        m.window_id for m in change.got if isinstance(m, Embedding)]
    suppressed = bus.metrics.counter("streamcap_sink_suppressed_total", "", ["sink", "reason"])
    assert suppressed.value("change", "unchanged") == len(run) - len(published)
    text = bus.metrics.render()
    assert 'streamcap_sink_suppressed_total{reason="unchanged",sink="change"} 5.0' in text
    assert 'sink="every"' not in "".join(line for line in text.splitlines()
                                         if line.startswith("streamcap_sink_suppressed_total"))


async def test_change_rule_of_a_loaded_sink_and_publish_result_from_another_thread(
        tmp_path: Path) -> None:
    """A LoadedSink's configured rule is applied; the inference thread publishes results
    from its own thread, and the decisions are made in order on the loop."""
    rec = Recorder(frozenset({"caption"}))
    info = PluginInfo(group="streamcap.sinks", name="rec", value="x:y", distribution="d",
                      version="1")
    loaded = LoadedSink(instance="r", sink=rec, accepts=frozenset({"caption"}), queue_size=256,
                        plugin=info, change=ChangeRule())
    bus = make_bus(tmp_path, {"r": loaded})
    texts = ["a dog barks"] * 20 + ["a siren wails"] * 20 + ["a dog barks"] * 10

    def produce() -> None:
        for i, text in enumerate(texts):
            bus.publish_result(*window(i, text, 0))

    async with bus:
        await asyncio.wait_for(bus.wait_ready(), WAIT_S)
        thread = threading.Thread(target=produce, name="inference")
        thread.start()
        await asyncio.to_thread(thread.join)
        await asyncio.sleep(0)
    # embeddings are not among its kinds: captions only, at each change
    assert [(m.seq, m.text) for m in rec.got] == [  # type: ignore[union-attr]
        (0, "a dog barks"), (20, "a siren wails"), (40, "a dog barks")]
    suppressed = bus.metrics.counter("streamcap_sink_suppressed_total", "", ["sink", "reason"])
    assert suppressed.value("r", "unchanged") == len(texts) - 3


def test_a_change_reference_the_inbox_drops_is_forgotten(tmp_path: Path) -> None:
    sink = Recorder(frozenset({"caption", "status"}))
    bus = make_bus(tmp_path, {"change": sink}, changes={"change": ChangeRule()},
                   queue_sizes={"change": 1})
    inbox = bus.inboxes["change"]
    first, _ = window(0, "a dog barks", 0)
    bus.publish_result(first, None)  # the reference of source a
    status = SourceStatus(source_id="a", state=SourceState.STALLED)
    bus.publish(status)  # the inbox is full: the reference is dropped undelivered
    assert inbox.dropped["caption"] == 1
    again, _ = window(1, "a dog barks", 0)  # unchanged from a caption the sink never got
    bus.publish_result(again, None)
    assert inbox.get_nowait() == again  # published (first), not suppressed
    suppressed = bus.metrics.counter("streamcap_sink_suppressed_total", "", ["sink", "reason"])
    assert suppressed.value("change", "unchanged") == 0
    third, _ = window(2, "a dog barks", 0)
    bus.publish_result(third, None)  # delivered reference: unchanged is suppressed again
    assert suppressed.value("change", "unchanged") == 1


def test_publish_result_rejects_non_messages(tmp_path: Path) -> None:
    bus = make_bus(tmp_path, {"r": Recorder()})
    with pytest.raises(TypeError, match="publish_result takes a Caption"):
        bus.publish_result(cap(0), cap(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown sinks: nope"):
        make_bus(tmp_path, {"r": Recorder()}, changes={"nope": ChangeRule()})
