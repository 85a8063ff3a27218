"""The shipped demo bundle: small, verified, and abstaining by its own calibrated rule.

How right its captions are is measured, not asserted: bench/demo_honesty.py on
independent scenes and real recordings (bench/results/demo_honesty_*.md).
"""

from __future__ import annotations

from pathlib import Path

from streamcap.models.bundle.manifest import load_bundle

BUNDLE = Path(__file__).resolve().parents[1] / "streamcap" / "data" / "demo-bundle"
MAX_BYTES = 20 * 1024 * 1024


def test_the_bundle_is_small_and_verifies() -> None:
    bundle = load_bundle(BUNDLE, verify=True)
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, size
    assert bundle.model_id == "streamcap-demo-v2"


def test_the_bundle_abstains_by_a_rule_calibrated_on_its_own_val_split() -> None:
    rule = load_bundle(BUNDLE).abstention
    assert rule is not None
    assert rule.calibration["split"] == "val" and rule.calibration["keep"] == 0.9
    assert rule.quiet_texts and -1.0 < rule.min_confidence < 1.0
