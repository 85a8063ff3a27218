"""The engine's logic with a stand-in model: announcements, run-time changes, priority.

The model is a fake (a unit test of the engine's bookkeeping); the real model and
daemon are in test_triggers_daemon.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamcap.messages import Published, TriggerEvent, TriggerState, Window, make_block
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
           metrics: Metrics | None = None) -> tuple[TriggerEngine, FakeModel]:
    model = FakeModel()
    return TriggerEngine(specs=specs, path=TriggerPathConfig(window_s=1.0, hop_s=1.0),
                         sources=["a", "b"], model=model, run_blocking=inline,
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
                               ["source"]).value("a") == 12
        await eng.close()

    asyncio.run(main())
