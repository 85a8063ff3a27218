"""The engine's logic with a stand-in model: announcements, run-time changes, priority.

The model is a fake (a unit test of the engine's bookkeeping); the real model and
daemon are in test_triggers_daemon.py.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamcap.triggers.engine as engine_module
from streamcap.errors import ConfigError
from streamcap.messages import (
    Published,
    SourceState,
    SourceStatus,
    TriggerEvent,
    TriggerState,
    Window,
    make_block,
)
from streamcap.stats import Metrics
from streamcap.triggers.engine import TriggerEngine
from streamcap.triggers.spec import TriggerPathConfig, TriggerSpec

RATE = 8000
DIM = 4


class FakeModel:
    """Phrases with "siren" embed on axis 0, others on axis 1; windows by their level."""

    model_id = "fake"
    sample_rate_hz = RATE

    def __init__(self) -> None:
        self.calls: list[str] = []

    def phrase_problem(self, text: str) -> str | None:
        return "every word of it is unknown" if text == "zzz" else None

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append("texts")
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, 0 if "siren" in text else 1] = 1.0
        return out

    def embed_windows(self, windows: Sequence[Window]) -> np.ndarray:
        self.calls.append(f"windows:{len(windows)}")
        out = np.zeros((len(windows), DIM), dtype=np.float32)
        for i, w in enumerate(windows):
            loud = float(np.abs(w.samples(RATE)).mean()) > 0.1
            out[i, 0 if loud else 2] = 1.0
        return out

    def embed_example(self, path: Path, where: str, chunk_s: float) -> np.ndarray:
        raise AssertionError("no examples here")

    def forget(self, source_id: str) -> None:
        self.calls.append(f"forget:{source_id}")


def spec(name: str, *text: str, **kw: Any) -> TriggerSpec:
    return TriggerSpec(name=name, text=text, min_hits=1, of_windows=1, **kw)


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    await asyncio.sleep(0)
    return fn(*args)


def engine(tmp: Path, specs: dict[str, TriggerSpec], published: list[Published],
           metrics: Metrics | None = None, *, run: Callable[..., Any] = inline,
           model: FakeModel | None = None) -> tuple[TriggerEngine, FakeModel]:
    model = model or FakeModel()
    return TriggerEngine(specs=specs, path=TriggerPathConfig(window_s=1.0, hop_s=1.0),
                         sources=["a", "b"], model=model, run_blocking=run,
                         publish=published.append, metrics=metrics or Metrics(), run_id="run",
                         state_dir=tmp / "triggers", config_dir=tmp), model


def announcements(published: list[Published]) -> set[tuple[str, str]]:
    return {(m.trigger, m.source_id) for m in published if isinstance(m, TriggerEvent)
            and m.fired_id == "" and m.state is TriggerState.OFF and math.isnan(m.score)}


def block(source: str, k: int, level: float) -> Any:
    return make_block(source_id=source, start_sample=k * RATE, sample_rate_hz=RATE,
                      samples=np.full(RATE, level, dtype=np.float32), captured_at=100.0 + k)


async def settle(eng: TriggerEngine) -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    if eng._updates is not None:  # the changes so far are in force
        await asyncio.wait_for(asyncio.shield(eng._updates), 30)
    await eng.wait_idle()


def test_start_announces_every_pair_and_changes_announce_only_theirs(tmp_path: Path) -> None:
    async def main() -> None:
        published: list[Published] = []
        eng, model = engine(tmp_path, {"siren": spec("siren", "a siren", sources=("a",))},
                            published)
        await eng.start()
        assert announcements(published) == {("siren", "a")}
        published.clear()
        eng.set_triggers({"siren": spec("siren", "a siren"),  # now watches both
                          "rain": spec("rain", "rain falls", sources=("b",))})
        await settle(eng)
        assert announcements(published) == {("siren", "a"), ("siren", "b"), ("rain", "b")}
        ids = [m.event_id for m in published if isinstance(m, TriggerEvent)]
        assert len(set(ids)) == len(ids) and "run:siren:a:2" in ids  # ids never repeat
        published.clear()
        eng.set_triggers({"siren": spec("siren", "a siren"),
                          "rain": spec("rain", "rain falls", sources=("b",))})
        eng.set_triggers({"siren": spec("siren", "a siren")})  # rain removed: nothing said
        await settle(eng)
        assert published == [] and set(eng.specs) == {"siren"}
        eng.set_triggers({"siren": spec("siren", "zzz"), "new": spec("new", "a siren")})
        await settle(eng)
        assert eng.specs["siren"].text == ("a siren",)  # refused: the old one stays
        assert announcements(published) == {("new", "a"), ("new", "b")}
        await eng.close()
        assert "texts" in model.calls

    asyncio.run(main())


def test_windows_are_scored_first_and_fire_only_where_the_sound_is(tmp_path: Path) -> None:
    async def main() -> None:
        published: list[Published] = []
        eng, model = engine(tmp_path, {"siren": spec("siren", "a siren wails",
                                                     threshold=0.5)}, published)
        await eng.start()
        for k in range(4):
            eng.feed(block("a", k, 0.5))
            eng.feed(block("b", k, 0.01))
        gate = asyncio.create_task(eng.wait_idle())
        await asyncio.sleep(0)
        assert not gate.done()  # a caption would wait: trigger windows are waiting
        await asyncio.wait_for(gate, 10)
        ons = [m for m in published if isinstance(m, TriggerEvent)
               and m.state is TriggerState.ON]
        assert [(m.source_id, m.trigger) for m in ons] == [("a", "siren")]
        assert ons[0].score == 1.0 and ons[0].threshold == 0.5
        assert eng.windows_scored >= 6
        assert any(c.startswith("windows:") for c in model.calls)
        await eng.close()
        saved = (tmp_path / "triggers" / "auto.json").read_text()
        assert '"b"' in saved

    asyncio.run(main())


def test_a_full_queue_drops_the_oldest_and_counts_it(tmp_path: Path) -> None:
    async def main() -> None:
        published: list[Published] = []
        metrics = Metrics()
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren")}, published, metrics)
        await eng.start()
        for k in range(20):  # no await in between: the worker cannot run
            eng.feed(block("a", k, 0.5))
        await settle(eng)
        assert eng.windows_scored == 8  # max_pending: the newest 8 were kept
        assert eng.dropped == 20 - 8
        assert metrics.counter("streamcap_trigger_windows_dropped_total", "",
                               ["source", "reason"]).value("a", "behind") == 12
        await eng.close()

    asyncio.run(main())


async def spin(n: int = 100) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def dropped(metrics: Metrics, source: str, reason: str) -> float:
    return metrics.counter("streamcap_trigger_windows_dropped_total", "",
                           ["source", "reason"]).value(source, reason)


def errors(metrics: Metrics, stage: str) -> float:
    return metrics.counter("streamcap_trigger_errors_total", "", ["stage"]).value(stage)


def events(published: list[Published], state: TriggerState) -> list[TriggerEvent]:
    return [m for m in published if isinstance(m, TriggerEvent) and m.state is state
            and not math.isnan(m.score)]


def test_remove_and_readd_while_a_batch_is_embedded_keeps_the_path_alive(tmp_path: Path) -> None:
    """The windows of the replaced windower are dropped, not fed to the new detector."""
    async def main() -> None:
        gate = asyncio.Event()

        async def run(fn: Callable[..., Any], *args: Any) -> Any:
            await asyncio.sleep(0)
            if getattr(fn, "__name__", "") == "embed_windows":
                await gate.wait()
            return fn(*args)

        published: list[Published] = []
        metrics = Metrics()
        s = spec("siren", "a siren")
        eng, _ = engine(tmp_path, {"siren": s}, published, metrics, run=run)
        await eng.start()
        for k in range(3):
            eng.feed(block("a", k, 0.5))
        await spin(20)  # the worker took the batch and waits in embed_windows
        eng.set_triggers({})
        eng.set_triggers({"siren": s})
        assert eng._updates is not None
        await asyncio.wait_for(asyncio.shield(eng._updates), 30)
        gate.set()
        await spin(50)
        assert dropped(metrics, "a", "unwatched") >= 1
        for k in range(3, 7):  # the source goes on
            eng.feed(block("a", k, 0.5))
        await spin(50)
        assert eng._task is not None and not eng._task.done()
        await asyncio.wait_for(eng.wait_idle(), 10)  # a caption can start
        assert eng.windows_scored >= 1 and errors(metrics, "score") == 0
        await eng.close()

    asyncio.run(main())


def test_an_error_while_scoring_is_counted_and_the_path_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        metrics = Metrics()
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren")}, [], metrics)
        await eng.start()
        real = eng._decide
        calls = []

        def flaky(window: Window, vector: np.ndarray) -> None:
            calls.append(window.window_id)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            real(window, vector)

        eng._decide = flaky  # type: ignore[method-assign]
        eng.feed(block("a", 0, 0.5))
        await spin()
        eng.feed(block("a", 1, 0.5))
        eng.feed(block("a", 2, 0.5))
        await asyncio.wait_for(settle(eng), 10)
        assert errors(metrics, "score") == 1 and eng.windows_scored >= 1
        assert eng._task is not None and not eng._task.done()
        await eng.close()

    asyncio.run(main())


def test_the_caption_gate_opens_for_good_once_the_worker_ends(tmp_path: Path) -> None:
    async def main() -> None:
        metrics = Metrics()
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren")}, [], metrics)
        await eng.start()

        def broken() -> list[tuple[int, Window]]:
            raise RuntimeError("a bug")

        eng._take = broken  # type: ignore[method-assign]
        eng.feed(block("a", 0, 0.5))
        eng.feed(block("a", 1, 0.5))
        await spin()
        assert eng._task is not None and eng._task.done()
        await asyncio.wait_for(eng.wait_idle(), 10)
        for k in range(2, 4):
            eng.feed(block("a", k, 0.5))
        await asyncio.wait_for(eng.wait_idle(), 10)
        assert errors(metrics, "worker") == 1 and dropped(metrics, "a", "dead") >= 1
        await eng.close()

    asyncio.run(main())


def test_trigger_seconds_are_compute_time_not_the_wait_for_the_thread(tmp_path: Path) -> None:
    async def main() -> None:
        async def run(fn: Callable[..., Any], *args: Any) -> Any:
            await asyncio.sleep(0.5)  # a caption already running on the inference thread
            return fn(*args)

        metrics = Metrics()
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren")}, [], metrics, run=run)
        await eng.start()
        eng.feed(block("a", 0, 0.5))
        eng.feed(block("a", 1, 0.5))
        await asyncio.sleep(0.01)
        await asyncio.wait_for(eng.wait_idle(), 10)
        line = next(x for x in metrics.render().splitlines()
                if x.startswith('streamcap_inference_seconds_sum{stage="trigger"}'))
        assert eng.windows_scored >= 1
        assert float(line.split()[-1]) < 0.5, line  # the fake's compute, not the 0.5 s wait
        await eng.close()

    asyncio.run(main())


def test_a_bad_example_refuses_only_its_own_trigger(tmp_path: Path) -> None:
    class Model(FakeModel):
        def embed_example(self, path: Path, where: str, chunk_s: float) -> np.ndarray:
            raise ConfigError(f"{where}: {path} is not an audio file")

    async def main() -> None:
        (tmp_path / "bad.wav").write_text("not audio")
        published: list[Published] = []
        eng, _ = engine(tmp_path, {}, published, model=Model())
        await eng.start()
        bad = TriggerSpec(name="dog", text=("a dog",), examples=("bad.wav",))
        eng.set_triggers({"dog": bad, "rain": spec("rain", "rain falls")})
        eng.set_triggers({"dog": bad, "rain": spec("rain", "rain falls"),
                          "siren": spec("siren", "a siren")})
        await settle(eng)
        assert set(eng.specs) == {"rain", "siren"}
        assert announcements(published) == {(n, s) for n in ("rain", "siren") for s in "ab"}
        await eng.close()
        eng, _ = engine(tmp_path, {"dog": bad}, published, model=Model())
        with pytest.raises(ConfigError, match=r"triggers.dog.examples\[0\]"):
            await eng.start()  # at start, the config's error stops the daemon (exit 2)

    asyncio.run(main())


async def fire(eng: TriggerEngine, published: list[Published], k: int = 0) -> str:
    eng.feed(block("a", k, 0.5))
    eng.feed(block("a", k + 1, 0.5))
    await settle(eng)
    ons = events(published, TriggerState.ON)
    assert ons, published
    return ons[-1].event_id


def test_an_on_is_closed_by_an_off_with_its_id_when_its_trigger_changes(tmp_path: Path) -> None:
    async def main() -> None:
        published: list[Published] = []
        s = spec("siren", "a siren", threshold=0.5)
        eng, _ = engine(tmp_path, {"siren": s}, published)
        await eng.start()
        on = await fire(eng, published)
        published.clear()
        eng.set_triggers({"siren": spec("siren", "a police siren", threshold=0.5)})  # new words
        await settle(eng)
        assert [m.fired_id for m in events(published, TriggerState.OFF)] == [on]
        assert announcements(published) == {("siren", "a"), ("siren", "b")}
        assert published.index(events(published, TriggerState.OFF)[0]) == 0  # off, then news
        on = await fire(eng, published, k=2)
        published.clear()
        eng.set_triggers({})  # removed while on
        await settle(eng)
        assert [m.fired_id for m in events(published, TriggerState.OFF)] == [on]
        await eng.close()

    asyncio.run(main())


def test_new_hysteresis_settings_keep_the_state_of_each_pair(tmp_path: Path) -> None:
    async def main() -> None:
        published: list[Published] = []
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren", threshold=0.5)},
                        published)
        await eng.start()
        on = await fire(eng, published)
        published.clear()
        eng.set_triggers({"siren": spec("siren", "a siren", threshold=0.5, cooldown_s=30.0,
                                        off_after_s=2.0)})
        await settle(eng)
        assert events(published, TriggerState.OFF) == []  # still on: nothing to close
        assert announcements(published) == {("siren", "b")}  # the pair that is off
        for k in range(2, 8):  # quiet: the firing ends, with the on's id
            eng.feed(block("a", k, 0.01))
        await settle(eng)
        assert [m.fired_id for m in events(published, TriggerState.OFF)] == [on]
        await eng.close()

    asyncio.run(main())


def test_a_source_that_stops_turns_its_triggers_off(tmp_path: Path) -> None:
    async def main() -> None:
        published: list[Published] = []
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren", threshold=0.5)},
                        published)
        await eng.start()
        on = await fire(eng, published)
        published.clear()
        eng.note(SourceStatus(source_id="b", state=SourceState.STOPPED))
        assert events(published, TriggerState.OFF) == []  # b was off
        eng.note(SourceStatus(source_id="a", state=SourceState.STOPPED))
        offs = events(published, TriggerState.OFF)
        assert [(m.source_id, m.fired_id) for m in offs] == [("a", on)]
        await eng.close()

    asyncio.run(main())


def test_windows_waiting_at_close_are_counted_as_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        metrics = Metrics()
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren")}, [], metrics)
        await eng.start()
        for k in range(4):  # no await: the worker cannot take them
            eng.feed(block("a", k, 0.5))
        waiting = eng._pending()
        assert waiting >= 1
        await eng.close()
        assert dropped(metrics, "a", "closed") == waiting
        assert eng.dropped == waiting

    asyncio.run(main())


def test_close_never_writes_the_history_twice_at_once(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """close() cancels the worker in the middle of a write; its own write waits for that one."""
    real = engine_module.write_histories
    active = {"now": 0, "max": 0, "calls": 0}
    lock = threading.Lock()
    inside = threading.Event()

    def slow(directory: Path, histories: Any) -> None:
        with lock:
            active["now"] += 1
            active["calls"] += 1
            active["max"] = max(active["max"], active["now"])
        inside.set()
        time.sleep(0.3)
        real(directory, histories)
        with lock:
            active["now"] -= 1

    monkeypatch.setattr(engine_module, "write_histories", slow)

    async def main() -> None:
        eng, _ = engine(tmp_path, {"siren": spec("siren", "a siren")}, [])
        await eng.start()
        eng._last_persist = -1e9  # a minute has passed
        eng.feed(block("a", 0, 0.5))
        eng.feed(block("a", 1, 0.5))
        await asyncio.wait_for(asyncio.to_thread(inside.wait, 10), 20)  # inside persist()
        await eng.close()

    asyncio.run(main())
    assert active["calls"] == 2 and active["max"] == 1, active
