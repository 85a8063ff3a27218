"""streamcap.training.evaluation.calibrate and ``streamcap train calibrate``.

A tiny random bundle whose caption decoder is made to write "a dog barks" is
calibrated on a small synthetic corpus whose held-out scenes are relabelled so
that some hold a dog (its caption is right there) and some do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamcap.cli import main
from streamcap.models.bundle.components import build_components, save_components
from streamcap.models.bundle.manifest import load_bundle
from streamcap.models.bundle.presets import preset_spec
from streamcap.training.evaluation.calibrate import Judged, is_right, rule_from


def test_a_caption_is_right_when_it_names_only_present_types() -> None:
    assert is_right("a dog barks while rain falls", frozenset({"dog", "rain", "wind"}))
    assert not is_right("a dog barks and a phone rings", frozenset({"dog"}))
    assert not is_right("a quiet room", frozenset({"dog"}))  # names nothing that is there
    assert is_right("a quiet room", frozenset())  # a scene without events
    assert not is_right("a bird tweets", frozenset())


def judged(confidence: float, right: bool, quiet: float | None = None) -> Judged:
    return Judged(clip_id="c", text="t", confidence=confidence, quiet_confidence=quiet,
                  level_dbfs=-30.0, right=right)


def test_the_rule_keeps_the_share_of_right_captions_and_reports_the_wrong_ones() -> None:
    clips = [judged(0.1 * i, True) for i in range(1, 11)] + [judged(0.05, False),
                                                             judged(0.95, False)]
    rule, summary = rule_from(clips, keep=0.9, quiet_texts=(), quiet_dbfs=-70.0, split="val")
    assert rule.min_confidence == pytest.approx(0.1999)
    assert summary["right_kept"] == 0.9 and summary["wrong_abstained"] == 0.5
    assert rule.calibration["split"] == "val" and rule.calibration["right_kept"] == 0.9


def test_without_a_right_caption_there_is_nothing_to_calibrate() -> None:
    from streamcap.errors import ConfigError

    with pytest.raises(ConfigError, match="no held-out caption was right"):
        rule_from([judged(0.5, False)], keep=0.9, quiet_texts=(), quiet_dbfs=-70.0, split="val")


@pytest.mark.slow
def test_train_calibrate_writes_the_rule_into_the_bundle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    corpus = tmp_path / "corpus"
    assert main(["train", "corpus", str(corpus), "--clips", "30", "--seed", "3", "--clip-s",
                 "4", "--captions-per-clip", "1"]) == 0
    lines = (corpus / "scenes.jsonl").read_text(encoding="utf-8").splitlines()
    scenes = [json.loads(line) for line in lines]
    template = next(scene["events"][0] for scene in scenes if scene["events"])
    relabelled = []
    for number, scene in enumerate(scenes):  # quiet scenes (no events) get one too
        kind = "dog" if number % 3 else "rain"  # val clips 8, 18, 28: two with a dog
        scene["events"] = [{**template, "kind": kind}]
        relabelled.append(json.dumps(scene))
    (corpus / "scenes.jsonl").write_text("\n".join(relabelled) + "\n", encoding="utf-8")
    bundle = save_components(build_components(preset_spec("tiny")), tmp_path / "bundle")
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(PreTrainedTokenizerFast, "decode",
                        lambda self, ids, skip_special_tokens=False: "a dog barks")
    assert load_bundle(bundle).abstention is None
    assert main(["train", "calibrate", "--model", str(bundle), "--manifest",
                 str(corpus / "manifest.jsonl"), "--keep", "1.0", "--quiet-text", "silence"]) == 0
    rule = load_bundle(bundle).abstention  # every file still verifies
    assert rule is not None and rule.quiet_texts == ("silence",)
    assert rule.calibration["clips"] == 3 and rule.calibration["right"] == 2
    assert rule.calibration["right_kept"] == 1.0
    report = json.loads((tmp_path / "bundle.calibration.json").read_text(encoding="utf-8"))
    assert [c["right"] for c in report["captions"]].count(True) == 2
    assert "min_confidence" in capsys.readouterr().out
