"""The demo corpus: reproducible, diverse, captions consistent with the scenes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamcap.errors import ConfigError
from streamcap.training.data.corpus import (
    BACKGROUND_PHRASES,
    EVENT_KEYWORDS,
    EVENT_TYPES,
    QUIET_CAPTIONS,
    WORDS,
    CorpusOptions,
    keyword_accuracy,
    make_clip,
    make_corpus,
    mentioned_events,
    read_scenes,
    sample_scene,
    scene_captions,
)
from streamcap.training.data.corpus_sounds import BACKGROUNDS
from streamcap.training.data.manifest import read_manifest


def _digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    options = CorpusOptions(clips=4, seed=7, clip_s=5.0)
    make_corpus(tmp_path / "a", options)
    make_corpus(tmp_path / "b", options)
    first, second = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert first == second
    assert len([k for k in first if k.endswith(".wav")]) == 4
    make_corpus(tmp_path / "c", CorpusOptions(clips=4, seed=8, clip_s=5.0))
    assert _digest(tmp_path / "c")["audio/scene-000000.wav"] != first["audio/scene-000000.wav"]


def test_clip_depends_only_on_seed_and_index() -> None:
    small = make_clip(CorpusOptions(clips=3, seed=1, clip_s=5.0), 2)
    large = make_clip(CorpusOptions(clips=50, seed=1, clip_s=5.0), 2)
    assert small[0] == large[0] and small[1] == large[1]
    assert np.array_equal(small[2], large[2])


def test_manifest_scenes_and_audio(tmp_path: Path) -> None:
    summary = make_corpus(tmp_path, CorpusOptions(clips=10, seed=0, clip_s=6.0,
                                                  sample_rate_hz=24000, captions_per_clip=4))
    rows = read_manifest(summary.manifest)
    scenes = read_scenes(summary.scenes)
    assert [r.split for r in rows] == ["train"] * 8 + ["val", "test"]
    assert summary.per_split == {"train": 8, "val": 1, "test": 1}
    for row in rows:
        scene = scenes[row.clip_id]
        assert len(row.captions) == 4 and len(set(row.captions)) == 4
        audio, rate = sf.read(str(row.audio), dtype="float32")
        assert rate == 24000 and audio.shape == (6 * 24000,)
        assert 0.0 < float(np.max(np.abs(audio))) <= 0.951
        for event in scene.events:
            start, end = int(event.start_s * rate), int(event.end_s * rate)
            assert 0 <= start < end <= len(audio)
            # The event is audible: its loud frames stand well above the background.
            frames = audio[start:end][: (end - start) // 480 * 480].reshape(-1, 480)
            loud = 10 * np.log10(np.max(np.mean(frames**2, axis=1)) + 1e-12)
            assert loud > scene.background_db + 6, (event, loud)


def test_scene_statistics_and_caption_consistency() -> None:
    kinds_seen: set[str] = set()
    counts = {0: 0, 1: 0, 2: 0, 3: 0}
    layouts = set()
    backgrounds = set()
    for index in range(400):
        rng = np.random.default_rng([5, index])
        scene = sample_scene(rng, index, 10.0)
        kinds_seen.update(scene.kinds)
        counts[len(scene.events)] += 1
        layouts.add(scene.layout)
        backgrounds.add(scene.background)
        starts = [e.start_s for e in scene.events]
        assert starts == sorted(starts)
        assert all(0 <= e.start_s < e.end_s <= 10.0 for e in scene.events)
        assert all(-35 <= e.level_db <= -8 for e in scene.events)
        if scene.events and scene.background != "none":
            # The bed lies 3-30 dB below the quietest event.
            assert 3 <= min(e.level_db for e in scene.events) - scene.background_db <= 30.01
        assert (scene.layout == "quiet") == (not scene.events)
        for caption in scene_captions(rng, scene, 5):
            # Every caption names every event present and no other.
            assert mentioned_events(caption) == frozenset(scene.kinds), (caption, scene.kinds)
    assert kinds_seen == set(EVENT_TYPES) and len(EVENT_TYPES) >= 12
    assert all(c > 50 for n, c in counts.items() if n > 0) and 20 < counts[0] < 100
    assert layouts == {"sequence", "overlay", "quiet"}
    assert backgrounds == set(BACKGROUNDS)


def test_quiet_captions_name_no_event_and_say_quiet_or_silence() -> None:
    assert set(QUIET_CAPTIONS) == set(BACKGROUNDS)
    for texts in QUIET_CAPTIONS.values():
        for text in texts:
            assert mentioned_events(text) == frozenset(), text
            assert {"quiet", "quietly", "silence", "nothing"} & set(text.replace(",", "").split())
    for phrases in BACKGROUND_PHRASES.values():
        for phrase in phrases:
            assert mentioned_events(phrase) == frozenset(), phrase


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_every_type_has_several_families(kind: str) -> None:
    """Draws of one synthesizer differ in more than level: their spectra are not alike."""
    from streamcap.training.data.corpus_sounds import SYNTHS

    sr = 16000
    centroids = []
    for seed in range(12):
        x = SYNTHS[kind](np.random.default_rng([77, seed]), 3 * sr, sr).astype(np.float64)
        power = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(len(x), 1 / sr)
        centroids.append(float((power * f).sum() / max(power.sum(), 1e-12)))
    assert max(centroids) / max(min(centroids), 1.0) > 1.3, centroids


def test_every_phrase_names_its_own_event_only() -> None:
    for kind, words in WORDS.items():
        for phrase in (*words.nouns, *(f"{s} {v}" for s in words.subjects for v in words.verbs)):
            assert mentioned_events(phrase) == {kind}, phrase
    assert set(EVENT_KEYWORDS) == set(EVENT_TYPES)


def test_keyword_accuracy_by_hand() -> None:
    out = keyword_accuracy(["a dog barks while rain falls", "a siren wails", "a dog barks"],
                           [["dog", "rain"], ["siren", "dog"], ["bell"]])
    assert out.recall["dog"] == pytest.approx(0.5)
    assert out.recall["rain"] == 1.0 and out.recall["siren"] == 1.0 and out.recall["bell"] == 0.0
    assert out.false_positive_rate["dog"] == pytest.approx(1.0)
    assert out.support["dog"] == 2 and "horn" not in out.recall
    assert out.exact == pytest.approx(1 / 3)
    assert out.mean_recall == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    with pytest.raises(ConfigError, match="unknown event"):
        keyword_accuracy(["x"], [["unicorn"]])
    with pytest.raises(ConfigError, match="2 predictions but 1"):
        keyword_accuracy(["x", "y"], [["dog"]])


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        CorpusOptions(clips=0, clip_s=1.0, sample_rate_hz=12345, captions_per_clip=0)
    assert len(info.value.problems) == 4


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_every_synthesizer_fills_any_length_with_finite_samples(kind: str) -> None:
    from streamcap.training.data.corpus_sounds import SYNTHS

    for seed in range(25):
        for n in (1, 100, 4000, 24000):
            x = SYNTHS[kind](np.random.default_rng([91, seed, n]), n, 16000)
            assert x.shape == (n,) and x.dtype == np.float32 and np.isfinite(x).all()
