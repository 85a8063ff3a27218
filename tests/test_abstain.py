"""streamcap.models.decoding.abstain: the abstention rule (pure logic, made-up scores)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcap.errors import WeightsError
from streamcap.models.decoding.abstain import (
    QUIET_TEXT,
    UNFAMILIAR_TEXT,
    AbstentionOptions,
    AbstentionRule,
    calibrate,
    decide,
    quantile_floor,
)

RULE = AbstentionRule(min_confidence=0.3, quiet_dbfs=-70.0, quiet_texts=("a quiet room",),
                      quiet_margin=0.05)


def test_without_a_rule_nothing_is_replaced() -> None:
    for level, confidence in ((-200.0, -1.0), (-20.0, 0.0), (float("-inf"), None)):
        verdict = decide(None, level_dbfs=level, confidence=confidence, quiet_confidence=0.9)
        assert not verdict.abstained and verdict.text is None


@pytest.mark.parametrize("level", [-70.5, -120.0, float("-inf"), float("nan")])
def test_a_window_below_the_quiet_level_is_quiet_whatever_the_model_says(level: float) -> None:
    verdict = decide(RULE, level_dbfs=level, confidence=0.99, quiet_confidence=0.0)
    assert verdict.text == QUIET_TEXT and verdict.reason == "level"


def test_a_confident_caption_stands() -> None:
    verdict = decide(RULE, level_dbfs=-30.0, confidence=0.5, quiet_confidence=0.2)
    assert verdict.text is None and verdict.reason == "confident"


def test_the_floor_itself_is_confident_enough() -> None:
    assert not decide(RULE, level_dbfs=-30.0, confidence=0.3, quiet_confidence=0.0).abstained
    below = decide(RULE, level_dbfs=-30.0, confidence=0.2999, quiet_confidence=0.0)
    assert below.text == UNFAMILIAR_TEXT and below.reason == "low_confidence"


def test_quiet_wins_when_it_comes_within_the_margin() -> None:
    near = decide(RULE, level_dbfs=-30.0, confidence=0.5, quiet_confidence=0.46)
    assert near.text == QUIET_TEXT and near.reason == "quiet_wins"
    clear = decide(RULE, level_dbfs=-30.0, confidence=0.5, quiet_confidence=0.449)
    assert not clear.abstained


def test_quiet_scores_are_ignored_without_quiet_texts() -> None:
    rule = AbstentionRule(min_confidence=0.3)
    assert not decide(rule, level_dbfs=-30.0, confidence=0.5, quiet_confidence=0.9).abstained


def test_without_a_confidence_only_the_level_rule_applies() -> None:
    assert not decide(RULE, level_dbfs=-30.0, confidence=None).abstained
    assert decide(RULE, level_dbfs=-90.0, confidence=None).text == QUIET_TEXT


def test_the_rule_round_trips_through_the_manifest_json() -> None:
    rule = AbstentionRule(min_confidence=0.25, quiet_texts=("silence",), quiet_margin=-0.1,
                          unfamiliar_text="something I do not know",
                          calibration={"split": "val", "keep": 0.9})
    assert AbstentionRule.from_json(rule.to_json()) == rule
    assert AbstentionRule.from_json({"min_confidence": 0}) == AbstentionRule(min_confidence=0.0)


@pytest.mark.parametrize(
    ("obj", "names"),
    [
        ([0.3], "expected an object"),
        ({}, "missing key 'min_confidence'"),
        ({"min_confidence": "0.3"}, "min_confidence: expected a number"),
        ({"min_confidence": True}, "min_confidence: expected a number"),
        ({"min_confidence": 1.5}, "min_confidence: expected a number from -1 to 1"),
        ({"min_confidence": float("nan")}, "min_confidence: expected a number from -1 to 1"),
        ({"min_confidence": 0.3, "quiet_dbfs": 3}, "quiet_dbfs"),
        ({"min_confidence": 0.3, "quiet_texts": "silence"}, "quiet_texts: expected a list"),
        ({"min_confidence": 0.3, "quiet_texts": [""]}, "quiet_texts: every text"),
        ({"min_confidence": 0.3, "quiet_text": "a\nb"}, "quiet_text: expected one line"),
        ({"min_confidence": 0.3, "threshold": 1}, "unknown key(s) threshold"),
    ],
)
def test_a_bad_abstention_object_names_the_key(obj: Any, names: str) -> None:
    with pytest.raises(WeightsError, match="manifest.json: key 'abstention'") as info:
        AbstentionRule.from_json(obj)
    assert names in str(info.value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=1, max_size=40), st.floats(0.05, 1.0))
def test_the_quantile_floor_keeps_at_least_keep_and_is_the_highest_that_does(
        values: list[float], keep: float) -> None:
    floor = quantile_floor(values, keep)
    kept = sum(v >= floor for v in values) / len(values)
    assert kept >= keep - 1e-9
    higher = [v for v in values if v > floor]
    if higher:
        assert sum(v >= min(higher) for v in values) / len(values) < keep - 1e-9 or \
            math.isclose(sum(v >= min(higher) for v in values) / len(values), keep)


def test_quantile_floor_refuses_nothing_to_calibrate_on() -> None:
    with pytest.raises(ValueError, match="no values"):
        quantile_floor([], 0.9)
    with pytest.raises(ValueError, match="keep"):
        quantile_floor([0.1], 0.0)


def test_calibrated_floors_together_keep_the_share_of_right_captions() -> None:
    confidences = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    margins = [0.05 * (10 - i) for i in range(10)]  # the least confident have the widest margins
    rule = calibrate(confidences, margins, keep=0.8, quiet_texts=("silence",))
    kept = [not decide(rule, level_dbfs=-20.0, confidence=c, quiet_confidence=c - m).abstained
            for c, m in zip(confidences, margins, strict=True)]
    assert sum(kept) / len(kept) >= 0.8
    assert rule.quiet_texts == ("silence",) and rule.calibration["keep"] == 0.8
    no_quiet = calibrate(confidences, None, keep=0.8)
    assert no_quiet.min_confidence == pytest.approx(0.2999) and no_quiet.quiet_texts == ()


def test_config_changes_only_the_keys_it_sets() -> None:
    bundle = AbstentionRule(min_confidence=0.6, quiet_texts=("a quiet room",), quiet_margin=0.03)
    assert AbstentionOptions().apply(bundle) is bundle
    changed = AbstentionOptions(min_confidence=0.4).apply(bundle)
    assert changed is not None
    assert (changed.min_confidence, changed.quiet_margin, changed.quiet_texts) == (
        0.4, 0.03, ("a quiet room",))
    assert changed.calibration["overridden_by_config"] == ["min_confidence"]


def test_config_turns_the_rule_off_or_gives_a_bundle_one() -> None:
    bundle = AbstentionRule(min_confidence=0.6)
    assert AbstentionOptions(enabled=False).apply(bundle) is None
    assert AbstentionOptions(quiet_margin=0.1).apply(None) is None
    given = AbstentionOptions(min_confidence=0.5).apply(None)
    assert given is not None and given.min_confidence == 0.5 and given.quiet_texts == ()


def test_config_values_out_of_range_name_the_dotted_key() -> None:
    from streamcap.config import parse_config
    from streamcap.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.abstention\.min_confidence: must be between"):
        parse_config({"model": {"abstention": {"min_confidence": 1.5}}})
