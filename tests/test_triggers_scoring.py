"""The trigger score, the hit rule, the "auto" threshold and the calibration sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamcap.triggers.scoring import (
    AutoThreshold,
    WindowScore,
    is_hit,
    robust_floor,
    score_window,
    sweep,
)


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def stack(*vectors: np.ndarray) -> np.ndarray:
    return np.stack(vectors) if vectors else np.zeros((0, 3), dtype=np.float32)


def test_score_is_the_best_positive_and_negative_and_background_are_kept_apart() -> None:
    audio = unit(1, 0, 0)
    got = score_window(audio, stack(unit(0, 1, 0), unit(1, 1, 0)), stack(unit(1, 0.1, 0)),
                       stack(unit(0, 0, 1)))
    assert got.score == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert got.negative == pytest.approx(float(unit(1, 0.1, 0)[0]), abs=1e-6)
    assert got.background == pytest.approx(0.0, abs=1e-6)


def test_without_negatives_or_background_those_scores_are_minus_infinity() -> None:
    got = score_window(unit(1, 0, 0), stack(unit(1, 0, 0)), stack(), stack())
    assert got.negative == -math.inf and got.background == -math.inf


def test_a_trigger_without_positives_or_with_another_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one positive"):
        score_window(unit(1, 0, 0), stack(), stack(), stack())
    with pytest.raises(ValueError, match="negatives"):
        score_window(unit(1, 0, 0), stack(unit(1, 0, 0)), np.ones((1, 2), np.float32), stack())


def test_a_hit_must_reach_the_threshold_and_beat_the_best_negative() -> None:
    assert is_hit(WindowScore(0.5, -math.inf, 0.0), 0.5)
    assert not is_hit(WindowScore(0.49, -math.inf, 0.0), 0.5)
    assert not is_hit(WindowScore(0.8, 0.8, 0.0), 0.5)  # a tie with a negative is no hit
    assert is_hit(WindowScore(0.8, 0.79, 0.0), 0.5)


def test_robust_floor_is_median_plus_k_mad_and_ignores_outliers() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0.1, 0.05, 500)
    plain = robust_floor(scores)
    assert plain == pytest.approx(0.1 + 4 * 0.05, abs=0.03)
    spiked = robust_floor(np.concatenate((scores, np.full(20, 0.95))))
    assert abs(spiked - plain) < 0.02
    assert robust_floor([0.3] * 50) == pytest.approx(0.3 + 4 * 0.02)  # the least spread


def test_auto_uses_the_background_floor_until_the_history_is_long_enough() -> None:
    auto = AutoThreshold(min_history=5)
    window = WindowScore(0.2, -math.inf, 0.1)
    assert auto.threshold(window) == pytest.approx(0.15)
    for _ in range(4):
        auto.observe(WindowScore(0.4, -math.inf, 0.1))
    assert auto.threshold(window) == pytest.approx(0.15)
    auto.observe(WindowScore(0.4, -math.inf, 0.1))
    assert auto.threshold(window) == pytest.approx(0.4 + 4 * 0.02)
    # a window whose background explains it better raises the threshold above the source floor
    assert auto.threshold(WindowScore(0.2, -math.inf, 0.9)) == pytest.approx(0.95)


def test_the_history_is_bounded_and_restores() -> None:
    auto = AutoThreshold(history_max=10, min_history=1000)
    for i in range(30):
        auto.observe(WindowScore(i / 100, -math.inf, 0.0))
    auto.observe(WindowScore(math.nan, -math.inf, 0.0))
    assert auto.history == tuple(i / 100 for i in range(20, 30))
    restored = AutoThreshold(auto.history, min_history=1)
    assert restored.history == auto.history
    assert restored.source_floor() == robust_floor(auto.history)


def test_once_the_history_is_full_windows_above_the_source_floor_stay_out() -> None:
    auto = AutoThreshold(min_history=3)
    for score in (0.1, 0.12, 0.11):
        auto.observe(WindowScore(score, -math.inf, 0.0))
    floor = auto.source_floor()
    assert floor == pytest.approx(0.11 + 4 * 0.02)
    auto.observe(WindowScore(floor + 0.01, -math.inf, 0.0))
    auto.observe(WindowScore(floor - 0.01, -math.inf, 0.0))
    assert auto.history == (0.1, 0.12, 0.11, pytest.approx(floor - 0.01))


def test_a_steady_source_learns_its_level_and_a_louder_sound_still_hits() -> None:
    """Seeded: 200 windows of a fan-like source near 0.35, then a sound at 0.6."""
    rng = np.random.default_rng(7)
    auto = AutoThreshold()
    fired = 0
    for score in rng.normal(0.35, 0.02, 200):
        window = WindowScore(float(score), -math.inf, 0.0)
        fired += is_hit(window, auto.threshold(window))
        auto.observe(window)
    assert 0 < fired < 40  # cold: the background floor alone lets the fan through at first
    late = [WindowScore(float(s), -math.inf, 0.0) for s in rng.normal(0.35, 0.02, 100)]
    assert not any(is_hit(w, auto.threshold(w)) for w in late)
    loud = WindowScore(0.6, -math.inf, 0.0)
    assert is_hit(loud, auto.threshold(loud))


def test_sweep_counts_precision_recall_and_f1_at_every_threshold() -> None:
    points = sweep([0.9, 0.8, 0.4], [0.5, 0.1])
    assert [p.threshold for p in points] == [0.1, 0.4, 0.5, 0.8, 0.9]
    by = {p.threshold: p for p in points}
    assert by[0.1] == (0.1, 3 / 5, 1.0, pytest.approx(0.75))
    assert by[0.5].precision == pytest.approx(2 / 3) and by[0.5].recall == pytest.approx(2 / 3)
    assert by[0.8] == (0.8, 1.0, 2 / 3, pytest.approx(0.8))
    threshold, precision, recall, f1 = points[-1]
    assert (threshold, precision, recall, f1) == (0.9, 1.0, 1 / 3, pytest.approx(0.5))


def test_sweep_refuses_no_positives_and_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="positive"):
        sweep([], [0.1])
    with pytest.raises(ValueError, match="finite"):
        sweep([0.1, math.nan], [])
