"""The shipped demo bundle captions fresh synthetic scenes of its strongest event types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamcap.models.bundle.components import load_components
from streamcap.models.bundle.manifest import load_bundle
from streamcap.training.data.corpus import CorpusOptions, make_clip, mentioned_events, sample_scene
from streamcap.training.data.manifest import ManifestRow
from streamcap.training.evaluation.evaluate import EvalOptions, caption_clips, clip_inputs

BUNDLE = Path(__file__).resolve().parents[1] / "streamcap" / "data" / "demo-bundle"
MAX_BYTES = 20 * 1024 * 1024
FRESH_SEED = 987_654  # not the seed the bundle was trained on


def _fresh_clips(kind: str, count: int, tmp: Path) -> list[ManifestRow]:
    """``count`` new single-event clips of ``kind`` (the bundle never heard them)."""
    import soundfile as sf

    options = CorpusOptions(clips=1, seed=FRESH_SEED, sample_rate_hz=32000)
    rows = []
    for index in range(5000):
        scene = sample_scene(np.random.default_rng([FRESH_SEED, index]), index, options.clip_s)
        if scene.kinds != (kind,):
            continue
        scene, captions, audio = make_clip(options, index)
        path = tmp / f"{scene.clip_id}.wav"
        sf.write(str(path), audio, options.sample_rate_hz)
        rows.append(ManifestRow(audio=path, captions=captions, split="test", source="fresh",
                                duration_s=options.clip_s, clip_id=scene.clip_id))
        if len(rows) == count:
            return rows
    raise AssertionError(f"no {count} single-{kind} scenes in 5000 draws")


def test_the_bundle_is_small_and_verifies() -> None:
    bundle = load_bundle(BUNDLE, verify=True)
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, size
    assert bundle.model_id == "streamcap-demo-v1"


def test_the_bundle_abstains_by_a_rule_calibrated_on_its_own_val_split() -> None:
    rule = load_bundle(BUNDLE).abstention
    assert rule is not None
    assert rule.calibration["split"] == "val" and rule.calibration["keep"] == 0.9
    assert rule.quiet_texts and -1.0 < rule.min_confidence < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rain", "engine", "wind", "dog", "whistle", "siren"])
def test_captions_of_fresh_clips_mention_the_event(kind: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    components = load_components(load_bundle(BUNDLE))
    rows = _fresh_clips(kind, 3, tmp_path)
    options = EvalOptions(num_beams=4, progress=False)
    captions = caption_clips([components], clip_inputs(components, rows, options), options)
    hits = [kind in mentioned_events(c) for c in captions]
    assert sum(hits) >= 2, captions
