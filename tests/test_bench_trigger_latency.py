"""The arithmetic of bench/trigger_latency.py: the stream origin, matching ON frames to onsets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.trigger_latency import match, onsets, stats, stream_origin, synthesize

WALL0 = 1_700_000_000.0


def test_the_origin_comes_from_captions_and_firings_not_announcements() -> None:
    frames = [
        {"type": "caption", "captured_at": WALL0 + 5.0, "start_s": 5.0},
        {"type": "caption", "captured_at": WALL0 + 10.0, "start_s": 10.0},
        {"type": "trigger", "state": "on", "captured_at": WALL0 + 37.0, "end_s": 37.0},
        {"type": "trigger", "state": "off", "fired_id": "r-siren-s-2",
         "captured_at": WALL0 + 44.0, "end_s": 44.0},
        # an announcement is stamped when published: it must not count
        {"type": "trigger", "state": "off", "fired_id": None, "captured_at": WALL0 + 3.0,
         "end_s": 0.0},
        {"type": "status", "captured_at": WALL0 + 99.0},
    ]
    origin, spread, count = stream_origin(frames)
    assert origin == pytest.approx(WALL0) and spread == pytest.approx(0.0, abs=1e-6)
    assert count == 4
    with pytest.raises(ValueError, match="no caption or trigger firing"):
        stream_origin(frames[4:])


def test_on_frames_are_matched_to_the_latest_onset_and_the_rest_are_false() -> None:
    at = onsets(4, 30.0, 13.0)
    assert at == [30.0, 43.0, 56.0, 69.0]
    ons = [
        (WALL0 + 32.4, WALL0 + 32.0),  # onset 30: 2.4 s, decided 2.0 s after the onset
        (WALL0 + 33.0, WALL0 + 33.0),  # a second ON for the same onset: false
        (WALL0 + 10.0, WALL0 + 10.0),  # before any onset: false
        (WALL0 + 58.9, WALL0 + 58.0),  # onset 56: 2.9 s
        (WALL0 + 69.0 + 13.5, WALL0 + 82.0),  # beyond the last onset's span: false
    ]
    m = match(at, ons, WALL0, 13.0)
    assert m.latencies_s[0] == pytest.approx(2.4) and m.latencies_s[2] == pytest.approx(2.9)
    assert m.latencies_s[1] is None and m.latencies_s[3] is None
    assert m.decided_s[0] == pytest.approx(2.0) and m.decided_s[2] == pytest.approx(2.0)
    assert m.false_firings == 3


def test_stats_are_median_and_interpolated_p95() -> None:
    got = stats([float(x) for x in range(1, 21)])
    assert got == {"n": 20, "median_s": 10.5, "p95_s": 19.05, "min_s": 1.0, "max_s": 20.0}
    assert stats([])["median_s"] is None


def test_the_sirens_start_at_the_onsets_over_a_quiet_bed() -> None:
    at = [1.0, 4.0]
    audio = synthesize(at, 7.0, seed=1)
    rate = 32000
    assert audio.dtype == np.float32 and audio.size == 7 * rate
    rms = [float(np.sqrt(np.mean(audio[round(t * rate):round((t + 0.5) * rate)] ** 2)))
           for t in (0.2, 1.1, 3.2, 4.1)]
    bed, siren = rms[0], rms[1]
    assert 20 * math.log10(bed) == pytest.approx(-40.0, abs=3.0)
    assert siren > 10 * bed and rms[3] > 10 * rms[2]
