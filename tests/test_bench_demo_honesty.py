"""bench/scenes and bench/demo_honesty.py: the independent scenes and how captions are judged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.demo_honesty import (
    REAL_CLIPS,
    judge_clip,
    judge_scene,
    score_scenes,
    verdict_column,
)
from bench.scenes.beds import BEDS
from bench.scenes.generate import (
    SAMPLE_RATE_HZ,
    EvalScene,
    active_level,
    render,
    scene_list,
)
from bench.scenes.sounds import MAKERS


def test_the_scene_list_covers_every_type_and_snr_and_is_deterministic() -> None:
    scenes = scene_list(per_cell=8)
    events = [s for s in scenes if s.kind == "event"]
    assert len(events) == 14 * 3 * 8
    for kind in MAKERS:
        for snr in (20.0, 10.0, 5.0):
            assert sum(s.target == kind and s.snr_db == snr for s in events) == 8
    assert {s.bed for s in events} == set(BEDS)
    assert sum(s.kind == "silence" for s in scenes) >= 8
    assert sum(s.kind == "background" for s in scenes) >= 16
    assert scene_list(per_cell=8) == scenes
    assert len({s.scene_id for s in scenes}) == len(scenes)


@pytest.mark.parametrize("target", ["dog", "rain", "horn"])
def test_an_event_scene_is_mixed_at_its_snr(target: str) -> None:
    scene = next(s for s in scene_list(per_cell=1) if s.target == target and s.snr_db == 5.0)
    mix = render(scene)
    assert mix.shape == (10 * SAMPLE_RATE_HZ,) and np.isfinite(mix).all()
    assert np.array_equal(mix, render(scene))
    assert scene.bed is not None and scene.bed_db is not None
    bed = BEDS[scene.bed](np.random.default_rng(scene.seed), len(mix), SAMPLE_RATE_HZ)
    bed *= 10 ** (scene.bed_db / 20)
    event = mix - bed  # the bed is drawn first from the scene's seed, so it can be removed
    if float(np.max(np.abs(mix))) < 0.99:  # not peak-limited
        snr = 20 * np.log10(active_level(event, SAMPLE_RATE_HZ) / np.sqrt(np.mean(bed**2)))
        assert snr == pytest.approx(5.0, abs=0.1)


def test_silences_are_silent_but_for_at_most_one_click() -> None:
    for scene in (s for s in scene_list(per_cell=1) if s.kind == "silence"):
        audio = render(scene)
        loud = np.flatnonzero(np.abs(audio) > 1e-3)
        if scene.variant == "click":
            assert 0 < len(loud) and loud[-1] - loud[0] < 0.002 * SAMPLE_RATE_HZ
        else:
            assert len(loud) == 0


def event(target: str) -> EvalScene:
    return EvalScene(scene_id="x", kind="event", target=target, snr_db=10.0, bed="pink",
                     bed_db=-40.0, variant="", seed=1)


QUIET = EvalScene(scene_id="q", kind="silence", target=None, snr_db=None, bed=None,
                  bed_db=None, variant="digital", seed=1)


def test_an_event_caption_is_right_when_it_names_the_played_type() -> None:
    assert judge_scene(event("dog"), "a dog barks while rain falls", False) == \
        {"right": True, "exact": False}
    assert judge_scene(event("dog"), "a large dog barks", False) == {"right": True, "exact": True}
    assert not judge_scene(event("dog"), "a phone rings", False)["right"]
    assert not judge_scene(event("dog"), "an unfamiliar sound", True)["right"]


def test_a_quiet_scene_is_right_when_the_caption_abstains_or_speaks_of_quiet() -> None:
    assert judge_scene(QUIET, "quiet", True)["right"]
    assert judge_scene(QUIET, "an unfamiliar sound", True)["right"]
    assert judge_scene(QUIET, "silence in a quiet room", False)["right"]
    assert not judge_scene(QUIET, "a bird tweets", False)["right"]
    assert not judge_scene(QUIET, "a dog barks in a quiet room", False)["right"]


def test_real_clips_of_unknown_types_are_right_only_when_they_abstain() -> None:
    owl = next(c for c in REAL_CLIPS if c.name == "owl")
    assert judge_clip(owl, "an unfamiliar sound", True)["right"]
    bird = judge_clip(owl, "a bird chirps", False)
    assert not bird["right"] and bird["honest"]
    assert not judge_clip(owl, "a phone rings", False)["honest"]
    dog = next(c for c in REAL_CLIPS if c.name == "dog")
    assert judge_clip(dog, "a dog barks", False)["right"]
    assert not judge_clip(dog, "a phone rings twice", False)["right"]


def test_confusion_columns_and_rates() -> None:
    assert verdict_column("a dog barks and a phone rings", False) == ["dog", "phone"]
    assert verdict_column("quiet", True) == ["abstain:quiet"]
    assert verdict_column("an unfamiliar sound", True) == ["abstain:unfamiliar"]
    assert verdict_column("a car passes", False) == ["other"]
    rows = [{"kind": "event", "target": "dog", "snr_db": 5.0, "text": t, "abstained": a,
             **judge_scene(event("dog"), t, a)}
            for t, a in (("a dog barks", False), ("a phone rings", False),
                         ("an unfamiliar sound", True), ("a dog barks", False))]
    rows.append({"kind": "silence", "target": None, "snr_db": None, "text": "quiet",
                 "abstained": True, **judge_scene(QUIET, "quiet", True)})
    scores = score_scenes(rows)
    assert scores["right"] == 0.5 and scores["per_type"]["dog"]["abstained"] == 0.25
    assert scores["confusion"]["dog"] == {"dog": 2, "phone": 1, "abstain:unfamiliar": 1}
    assert scores["quiet_right"] == 1.0 and scores["worst_type_right"] == 0.5
