"""The trigger score, the hit rule, the "auto" threshold and the calibration sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamcap.triggers.detector import Detector, EventIds, Verdict
from streamcap.triggers.scoring import (
    AutoThreshold,
    SweepRow,
    WindowScore,
    at_threshold,
    best_row,
    decide,
    firing_score,
    hit_score,
    is_hit,
    robust_floor,
    score_window,
    sweep,
)
from streamcap.triggers.spec import TriggerSpec


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


def test_the_hit_score_is_the_highest_threshold_at_which_a_window_hits() -> None:
    plain = WindowScore(0.6, -math.inf, 0.1)
    beaten = WindowScore(0.6, 0.7, 0.1)
    tied = WindowScore(0.6, 0.6, 0.1)
    assert hit_score(plain) == 0.6 and hit_score(beaten) == -math.inf
    assert hit_score(tied) == -math.inf  # a tie goes to the negative phrasing
    for score in (plain, beaten, tied):
        for t in (-1.0, 0.0, 0.5, 0.6, 0.6001, 1.0):
            assert is_hit(score, t) == (hit_score(score) >= t)


def test_decide_uses_a_fixed_threshold_else_auto_and_auto_always_learns() -> None:
    auto = AutoThreshold(min_history=1)
    window = WindowScore(0.4, -math.inf, 0.0)
    assert decide(window, 0.3, auto) == (0.3, True)
    assert auto.history == (0.4,)  # observed under a fixed threshold too
    assert decide(window, 0.5, auto) == (0.5, False)
    threshold, hit = decide(WindowScore(0.9, -math.inf, 0.0), None, auto)
    assert threshold == pytest.approx(0.4 + 4 * 0.02) and hit  # the source floor of [0.4, 0.4]


def test_the_firing_score_is_the_best_runs_min_hits_th_score() -> None:
    scores = [0.1, 0.9, 0.2, 0.8, 0.3]
    # runs of 3: (0.1 0.9 0.2) -> 0.2, (0.9 0.2 0.8) -> 0.8, (0.2 0.8 0.3) -> 0.3
    assert firing_score(scores, 2, 3) == 0.8
    assert firing_score(scores, 1, 3) == 0.9
    assert firing_score(scores, 3, 3) == 0.2
    assert firing_score([0.4, 0.7], 2, 3) == 0.4  # shorter than a run: one run
    assert firing_score([0.5], 2, 3) == 0.5  # fewer windows than min_hits: all of them
    assert firing_score([0.9, -math.inf, 0.9, -math.inf], 2, 2) == -math.inf
    with pytest.raises(ValueError, match="no window scores"):
        firing_score([], 2, 3)


@pytest.mark.parametrize(("min_hits", "of_windows"), [(1, 1), (2, 3), (3, 3), (2, 5)])
def test_the_detector_turns_on_at_a_fixed_threshold_exactly_when_the_firing_score_reaches_it(
        min_hits: int, of_windows: int) -> None:
    rng = np.random.default_rng(min_hits * 10 + of_windows)
    spec = TriggerSpec(name="t", text=("x",), min_hits=min_hits, of_windows=of_windows)
    for trial in range(200):
        n = int(rng.integers(1, 12))
        windows = [WindowScore(float(s), float(g), -math.inf)
                   for s, g in zip(rng.uniform(0, 1, n),
                                   rng.choice([-math.inf, 0.5, 0.9], n), strict=True)]
        scores = [hit_score(w) for w in windows]
        t = float(rng.uniform(0.2, 0.9))
        detector = Detector(spec, "s", EventIds("run"))
        fired = False
        for k, w in enumerate(windows):
            event = detector.observe(Verdict(epoch=0, start_s=float(k), end_s=k + 5.0,
                                             end_at=k + 5.0, score=w.score, threshold=t,
                                             hit=is_hit(w, t)))
            fired |= event is not None and event.state.value == "on"
        # fewer windows than min_hits: the firing score asks for all of them, the detector
        # for min_hits it never gets
        expected = firing_score(scores, min_hits, of_windows) >= t and n >= min_hits
        assert fired == expected, (trial, scores, t)


def test_the_sweep_counts_exactly_at_every_distinct_score() -> None:
    rows = sweep([0.9, 0.7, 0.4], [0.8, 0.3])
    assert [r.threshold for r in rows] == [0.9, 0.8, 0.7, 0.4, 0.3]
    by_t = {r.threshold: r for r in rows}
    assert by_t[0.7] == SweepRow(0.7, tp=2, fp=1, fn=1, tn=1)
    assert by_t[0.7].precision == pytest.approx(2 / 3)
    assert by_t[0.7].recall == pytest.approx(2 / 3)
    assert by_t[0.7].f1 == pytest.approx(2 / 3)
    assert (by_t[0.9].precision, by_t[0.9].recall) == (1.0, pytest.approx(1 / 3))
    assert by_t[0.9].f1 == pytest.approx(0.5)
    assert by_t[0.4].f1 == pytest.approx(6 / 7)  # P 3/4, R 1
    assert by_t[0.3] == SweepRow(0.3, tp=3, fp=2, fn=0, tn=0)
    assert best_row(rows).threshold == 0.4


def test_an_item_at_the_threshold_counts_as_detected_and_minus_inf_never() -> None:
    assert at_threshold([0.5], [0.5], 0.5) == SweepRow(0.5, tp=1, fp=1, fn=0, tn=0)
    assert at_threshold([0.5], [0.5], 0.50001) == SweepRow(0.50001, tp=0, fp=0, fn=1, tn=1)
    rows = sweep([0.6, -math.inf], [-math.inf, 0.2])
    assert [r.threshold for r in rows] == [0.6, 0.2]
    assert rows[-1] == SweepRow(0.2, tp=1, fp=1, fn=1, tn=1)


def test_of_equal_f1_the_higher_threshold_is_chosen_whatever_the_order() -> None:
    positives, negatives = [0.9, 0.6], [0.8, 0.7]
    rows = sweep(positives, negatives)
    # 0.9: tp 1 fn 1 -> F1 2/3; 0.6: tp 2 fp 2 -> F1 4/6: the same F1
    assert {r.threshold: round(r.f1, 9) for r in rows}[0.6] == round(2 / 3, 9)
    assert best_row(rows).threshold == 0.9
    assert best_row(list(reversed(rows))).threshold == 0.9
    assert best_row(sweep(positives[::-1], negatives[::-1])).threshold == 0.9


def test_a_sweep_needs_positives_and_scores_finite_or_minus_inf() -> None:
    with pytest.raises(ValueError, match="positive"):
        sweep([], [0.1])
    with pytest.raises(ValueError, match="finite"):
        sweep([0.2, math.nan], [0.1])
    with pytest.raises(ValueError, match="finite"):
        sweep([0.2], [math.inf])
    with pytest.raises(ValueError, match="every score is -inf"):
        sweep([-math.inf], [-math.inf])
    with pytest.raises(ValueError, match="no rows"):
        best_row([])
