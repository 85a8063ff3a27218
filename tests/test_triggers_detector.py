"""Trigger hysteresis: on after min_hits of of_windows, off after off_after_s, cooldown."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamcap.messages import TriggerEvent, TriggerState
from streamcap.triggers.detector import Detector, EventIds, Verdict, announcement
from streamcap.triggers.spec import TriggerSpec

RUN = "run0"
WINDOW_S = 5.0
HOP_S = 1.0


def spec(**kw: object) -> TriggerSpec:
    values: dict[str, object] = {"name": "siren", "text": ("a siren wails",), "min_hits": 2,
                                 "of_windows": 3, "cooldown_s": 10.0, "off_after_s": 3.0}
    values.update(kw)
    return TriggerSpec(**values)  # type: ignore[arg-type]


def verdict(k: int, hit: bool, *, epoch: int = 0, score: float | None = None) -> Verdict:
    start = k * HOP_S
    return Verdict(epoch=epoch, start_s=start, end_s=start + WINDOW_S, end_at=1000.0 + start
                   + WINDOW_S, score=(0.8 if hit else 0.1) if score is None else score,
                   threshold=0.5, hit=hit)


def run(detector: Detector, hits: list[bool]) -> list[tuple[int, TriggerEvent]]:
    out = []
    for k, hit in enumerate(hits):
        event = detector.observe(verdict(k, hit), caption=f"caption {k}")
        if event is not None:
            out.append((k, event))
    return out


def test_on_after_min_hits_of_the_last_windows_then_off_after_off_after_s() -> None:
    det = Detector(spec(), "street", EventIds(RUN), model="m")
    events = run(det, [False, True, False, True, True, False, False, False, False])
    assert [(k, e.state) for k, e in events] == [(3, TriggerState.ON), (7, TriggerState.OFF)]
    on, off = events[0][1], events[1][1]
    assert on.event_id == f"{RUN}:siren:street:1" and on.fired_id == ""
    assert (on.start_s, on.end_s) == (1.0, 8.0)  # from the first of the deciding hits
    assert on.captured_at == 1008.0 and on.caption == "caption 3" and on.model == "m"
    assert on.score == 0.8 and on.threshold == 0.5 and on.run_id == RUN
    assert off.event_id == f"{RUN}:siren:street:2" and off.fired_id == on.event_id
    assert (off.start_s, off.end_s) == (5.0, 12.0)  # the windows without a hit
    assert not det.on


def test_hits_spread_wider_than_of_windows_never_turn_it_on() -> None:
    det = Detector(spec(min_hits=2, of_windows=3), "s", EventIds(RUN))
    assert run(det, [True, False, False] * 10) == []


def test_cooldown_holds_back_a_new_firing_after_the_last_on() -> None:
    det = Detector(spec(cooldown_s=10.0, off_after_s=2.0), "s", EventIds(RUN))
    hits = [True, True, False, False, True, True, True, True, True, True, True, True, True]
    events = run(det, hits)
    states = [(k, e.state) for k, e in events]
    # on at 1 (t=6), off at 3 (t=8: 2 s without a hit), again on no sooner than t=16 (k=11)
    assert states == [(1, TriggerState.ON), (3, TriggerState.OFF), (11, TriggerState.ON)]


def test_a_restart_of_the_clock_forgets_the_last_windows_and_continues_stream_time() -> None:
    det = Detector(spec(off_after_s=3.0), "s", EventIds(RUN))
    assert det.observe(verdict(0, True)) is None
    assert det.observe(verdict(0, True, epoch=1)) is None  # the earlier hit is forgotten
    on = det.observe(verdict(1, True, epoch=1))
    assert on is not None and on.state is TriggerState.ON and on.start_s == 0.0
    assert det.observe(verdict(2, False, epoch=1)) is None
    assert det.observe(verdict(3, False, epoch=1)) is None
    off = det.observe(verdict(4, False, epoch=1))
    assert off is not None and off.fired_id == on.event_id


def test_a_window_from_the_past_is_refused() -> None:
    det = Detector(spec(), "s", EventIds(RUN))
    det.observe(verdict(3, False))
    with pytest.raises(ValueError, match="comes after"):
        det.observe(verdict(1, False))


def test_announcement_is_an_off_without_a_firing_and_uses_the_same_counter() -> None:
    ids = EventIds(RUN)
    first = announcement("siren", "s", ids, model="m", at=5.0)
    assert first.state is TriggerState.OFF and first.fired_id == ""
    assert math.isnan(first.score) and math.isnan(first.threshold)
    assert first.event_id == f"{RUN}:siren:s:1"
    det = Detector(spec(min_hits=1, of_windows=1), "s", ids)
    on = det.observe(verdict(0, True))
    assert on is not None and on.event_id == f"{RUN}:siren:s:2"
    assert ids.next("siren", "other") == f"{RUN}:siren:other:1"


@pytest.mark.parametrize("seed", range(8))
def test_random_sequences_keep_every_rule(seed: int) -> None:
    """Seeded random hit sequences: every event obeys the rules, checked from the windows."""
    rng = np.random.default_rng(seed)
    s = spec(min_hits=int(rng.integers(1, 4)), of_windows=4,
             cooldown_s=float(rng.choice([0.0, 3.0, 12.0])),
             off_after_s=float(rng.choice([1.0, 2.5, 6.0])))
    det = Detector(s, "src", EventIds(RUN))
    hits = list(rng.random(400) < rng.uniform(0.1, 0.7))
    events = run(det, hits)
    assert events, "a sequence this long fires at least once"
    last_on_t, last_off = -math.inf, -1
    for i, (k, event) in enumerate(events):
        t = k * HOP_S + WINDOW_S
        expected = TriggerState.ON if i % 2 == 0 else TriggerState.OFF
        assert event.state is expected  # on and off alternate, starting with on
        assert event.event_id == f"{RUN}:siren:src:{i + 1}"
        if event.state is TriggerState.ON:
            assert hits[k]  # the window that turns it on is a hit
            # enough hits since the last off among the last of_windows windows
            assert sum(hits[max(0, k - s.of_windows + 1, last_off + 1):k + 1]) >= s.min_hits
            assert t - last_on_t >= s.cooldown_s
            last_on_t = t
        else:
            last_off = k
            assert event.fired_id == events[i - 1][1].event_id
            last_hit = max(j for j in range(k + 1) if hits[j])
            assert not hits[k] and k - last_hit >= s.off_after_s / HOP_S
            assert k - 1 - last_hit < s.off_after_s / HOP_S  # the first window that could
    # the reference model, window by window, fires exactly where the detector did
    on, last_on_t, last_hit, last_off = False, -math.inf, -math.inf, -1
    expected_at: list[int] = []
    for k, hit in enumerate(hits):
        t = k * HOP_S + WINDOW_S
        last_hit = t if hit else last_hit
        if on:
            if not hit and t - last_hit >= s.off_after_s:
                on, last_off = False, k
                expected_at.append(k)
            continue
        if (hit and sum(hits[max(0, k - s.of_windows + 1, last_off + 1):k + 1]) >= s.min_hits
                and t - last_on_t >= s.cooldown_s):
            on, last_on_t = True, t
            expected_at.append(k)
    assert [k for k, _ in events] == expected_at


@pytest.mark.parametrize(("of_windows", "cooldown_s", "off_after_s"),
                         [(15, 10.0, 3.0), (3, 0.0, 1.0)])
def test_one_hit_fires_once_and_its_stale_hit_never_fires_again(
        of_windows: int, cooldown_s: float, off_after_s: float) -> None:
    det = Detector(spec(min_hits=1, of_windows=of_windows, cooldown_s=cooldown_s,
                        off_after_s=off_after_s), "s", EventIds(RUN))
    events = run(det, [k == 0 for k in range(30)])  # one hit window, then silence
    assert [e.state for _, e in events] == [TriggerState.ON, TriggerState.OFF]


def test_ids_of_two_pairs_never_collide_though_names_hold_dashes() -> None:
    ids = EventIds(RUN)
    assert ids.next("a-b", "c") != ids.next("a", "b-c")
