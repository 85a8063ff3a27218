"""bench/history_quality.py: the timelines, the relevance and metrics, and a tiny smoke run."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.history_quality import (
    FADE_S,
    START_AT,
    Event,
    WindowSpan,
    audible_extent,
    average_precision,
    event_windows,
    events_at,
    hit_precision,
    main,
    plan,
    recall_at,
    render_segment,
    timeline,
)
from bench.scenes.beds import BEDS
from bench.scenes.generate import SAMPLE_RATE_HZ, active_level
from bench.scenes.sounds import MAKERS

SR = SAMPLE_RATE_HZ


def test_a_plan_plays_every_type_at_every_snr_and_is_deterministic() -> None:
    segments = plan("porch", 0, types=list(MAKERS), per_snr=2, quiet_segments=3,
                    segment_s=(20.0, 45.0), seed=1)
    events = [s for s in segments if s.target is not None]
    assert len(events) == 14 * 3 * 2 and sum(s.target is None for s in segments) == 3
    for kind in MAKERS:
        for snr in (20.0, 10.0, 5.0):
            assert sum(s.target == kind and s.snr_db == snr for s in events) == 2
    assert all(20.0 <= s.length_s <= 45.0 for s in segments)
    for before, after in itertools.pairwise(segments):
        assert after.start_s == pytest.approx(before.start_s + before.length_s)
    assert plan("porch", 0, types=list(MAKERS), per_snr=2, quiet_segments=3,
                segment_s=(20.0, 45.0), seed=1) == segments
    other = plan("kitchen", 1, types=list(MAKERS), per_snr=2, quiet_segments=3,
                 segment_s=(20.0, 45.0), seed=1)
    assert [s.target for s in other] != [s.target for s in segments]


def test_an_event_is_mixed_inside_its_segment_at_its_snr() -> None:
    segment = next(s for s in plan("porch", 0, types=["horn"], per_snr=1, quiet_segments=0,
                                   segment_s=(12.0, 14.0), seed=3) if s.snr_db == 5.0)
    mix, extent = render_segment(segment)
    assert mix.shape == (round(segment.length_s * SR) + int(FADE_S * SR),)
    assert extent is not None and 1.0 <= extent[0] < extent[1] <= segment.length_s - 1.0
    assert np.array_equal(mix, render_segment(segment)[0])
    bed = BEDS[segment.bed](np.random.default_rng(segment.seed), len(mix), SR)
    bed *= 10 ** (segment.bed_db / 20)
    event = mix - bed  # the bed is drawn first from the segment's seed
    if float(np.max(np.abs(mix))) < 0.99:  # not peak-limited
        snr = 20 * np.log10(active_level(event, SR) / np.sqrt(np.mean(bed**2)))
        assert snr == pytest.approx(5.0, abs=0.3)
    loud = np.flatnonzero(np.abs(event) > 1e-6)
    assert extent[0] - 0.05 <= loud[0] / SR and loud[-1] / SR <= extent[1] + 0.35


def test_a_timeline_is_as_long_as_its_segments_and_dates_its_events() -> None:
    segments = plan("porch", 0, types=["dog"], per_snr=1, quiet_segments=1,
                    segment_s=(5.0, 6.0), seed=2)
    parts = list(timeline(segments))
    assert [len(a) for a, _ in parts] == [round(s.length_s * SR) for s in segments]
    events = [e for _, e in parts if e is not None]
    assert [e.target for e in events] == ["dog"] * 3
    for segment, (_, event) in zip(segments, parts, strict=True):
        if event is not None:
            assert START_AT + segment.start_s + 1.0 <= event.start_at < event.end_at \
                <= START_AT + segment.start_s + segment.length_s - 1.0


def test_the_audible_extent_skips_leading_and_trailing_silence() -> None:
    sound = np.zeros(SR * 3)
    sound[SR:2 * SR] = np.sin(np.arange(SR) * 0.1)
    on, off = audible_extent(sound, SR)
    assert on == pytest.approx(1.0, abs=0.03) and off == pytest.approx(2.0, abs=0.03)
    assert audible_extent(np.zeros(100), SR) == (0.0, 0.0)


def span(window_id: str, start: float) -> WindowSpan:
    return WindowSpan(window_id=window_id, source_id="porch", start_at=start,
                      end_at=start + 10.0)


def test_a_window_is_relevant_when_it_overlaps_an_event_by_a_second() -> None:
    windows = [span("w0", 0.0), span("w1", 5.0), span("w2", 10.0),
               WindowSpan(window_id="k0", source_id="kitchen", start_at=0.0, end_at=10.0)]
    dog = Event(event_id="e", source_id="porch", target="dog", snr_db=5.0, start_at=9.5,
                end_at=12.0)
    assert event_windows(windows, [dog]) == {"e": frozenset({"w1", "w2"})}  # w0: 0.5 s only


def test_the_ranking_metrics() -> None:
    relevant = frozenset({"a", "b", "c"})
    ranked = ["a", "x", "b", "y"]
    assert recall_at(ranked, relevant, k=3) == pytest.approx(2 / 3)
    assert recall_at(ranked, frozenset()) is None
    assert average_precision(ranked, relevant) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision(["c", "a", "b"], relevant) == pytest.approx(1.0)
    found_by = {"e1": frozenset({"a", "z"}), "e2": frozenset({"c"})}
    assert events_at(ranked, found_by, k=2) == 0.5 and events_at(ranked, {}) is None
    assert hit_precision([("x", "a"), ("y",), ("b",)], relevant, k=10) == pytest.approx(0.2)


def test_a_smoke_run_writes_the_results(tmp_path: Path) -> None:
    assert main(["--sources", "1", "--types", "dog", "--per-snr", "1", "--quiet-segments", "0",
                 "--segment-s", "12", "14", "--out-dir", str(tmp_path), "--name", "q",
                 "--store", str(tmp_path / "h.sqlite3")]) == 0
    report = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))
    assert report["windows"] == report["stored_windows"] == len(report["window_list"]) > 0
    assert report["events"] == len(report["event_list"]) == 3
    assert report["blend_loop_differs_from_run_search"] == 0
    assert report["blend_loop_differs_on"] == []
    assert [q["phrase"] for q in report["queries"]] == ["a dog barks", "a dog is barking"]
    windows = [WindowSpan(window_id=w["window_id"], source_id=w["source_id"],
                          start_at=w["start_at"], end_at=w["start_at"] + 10.0)
               for w in report["window_list"]]
    events = [Event(event_id=e["event_id"], source_id=e["source_id"], target=e["type"],
                    snr_db=e["snr_db"], start_at=e["start_at"], end_at=e["end_at"])
              for e in report["event_list"]]
    relevant = frozenset().union(*event_windows(windows, events).values())
    dog = report["per_type"]["dog"]
    assert dog["relevant_windows"] == len(relevant) > 0
    for name in ("similarity", "text", "blend"):
        for metric in ("recall_at_10", "events_at_10", "hit_precision_at_10", "ap"):
            assert 0.0 <= dog[name][metric] <= 1.0
    for query in report["queries"]:
        assert query["similarity"]["returned_windows"] == report["windows"]
        assert set(query["blend"]["top_10"]) <= {w.window_id for w in windows}
    text = (tmp_path / "q.md").read_text(encoding="utf-8")
    assert "| dog | 3 |" in text
    assert set(report["events_at_10_by_snr"]) == {"20", "10", "5"}
    for cells in report["events_at_10_by_snr"].values():
        assert all(0.0 <= cells[name] <= 1.0 for name in ("similarity", "text", "blend"))
    # the tables again from the JSON alone, without a capture
    assert main(["--from-json", str(tmp_path / "q.json"), "--out-dir", str(tmp_path),
                 "--name", "again"]) == 0
    assert (tmp_path / "again.md").read_text(encoding="utf-8") == text
