"""streamcap.bus.change: the change-only rule, pure (no bus, no clock)."""

from __future__ import annotations

import numpy as np
import pytest

from streamcap.bus.change import (
    DEFAULT_CHANGE_DISTANCE,
    DEFAULT_HEARTBEAT_S,
    ChangeFilter,
    ChangeRule,
    Reason,
    cosine_distance,
    recalled_changes,
)
from streamcap.messages import (
    Caption,
    Embedding,
    Float32Array,
    Published,
    TriggerEvent,
    TriggerState,
)

T0 = 1_700_000_000.0


def vec(*values: float) -> Float32Array:
    v = np.array(values, dtype=np.float32)
    v.flags.writeable = False
    return v


def unit_at(angle_deg: float) -> Float32Array:
    """A unit vector in the plane at ``angle_deg``: cosine distance to (1, 0) is 1 - cos."""
    a = np.deg2rad(angle_deg)
    return vec(float(np.cos(a)), float(np.sin(a)), 0.0)


def window(seq: int, text: str, at: float, source: str = "kitchen",
           vector: Float32Array | None = None) -> tuple[Caption, Embedding | None]:
    wid = f"{source}:run:0:{seq * 5000}"
    caption = Caption(window_id=wid, source_id=source, seq=seq, start_s=seq * 5.0,
                      end_s=seq * 5.0 + 10, captured_at=at, text=text, score=0.5)
    embedding = None if vector is None else Embedding(
        window_id=wid, source_id=source, seq=seq, start_s=seq * 5.0, end_s=seq * 5.0 + 10,
        model="m", vector=vector)
    return caption, embedding


def test_the_first_window_of_a_source_is_published() -> None:
    f = ChangeFilter(ChangeRule())
    assert f.last("kitchen") is None
    assert f.admit(*window(0, "a dog barks", T0, vector=unit_at(0))) is Reason.FIRST
    last = f.last("kitchen")
    assert last is not None and last.text == "a dog barks" and last.captured_at == T0


def test_the_same_text_and_a_near_embedding_is_suppressed_a_new_text_is_not() -> None:
    f = ChangeFilter(ChangeRule())
    f.admit(*window(0, "a dog barks", T0, vector=unit_at(0)))
    assert f.admit(*window(1, "a dog barks", T0 + 5, vector=unit_at(5))) is Reason.UNCHANGED
    assert f.admit(*window(2, "rain falls", T0 + 10, vector=unit_at(5))) is Reason.TEXT
    # the reference is now the published "rain falls" window
    assert f.admit(*window(3, "a dog barks", T0 + 15, vector=unit_at(5))) is Reason.TEXT
    # text is compared exactly
    assert f.admit(*window(4, "A dog barks", T0 + 20, vector=unit_at(5))) is Reason.TEXT


def test_an_embedding_further_than_change_distance_is_a_change() -> None:
    f = ChangeFilter(ChangeRule(change_distance=0.3))
    f.admit(*window(0, "a dog barks", T0, vector=unit_at(0)))
    # 1 - cos(40 deg) = 0.234: within; 1 - cos(50 deg) = 0.357: beyond
    assert f.admit(*window(1, "a dog barks", T0 + 5, vector=unit_at(40))) is Reason.UNCHANGED
    assert f.admit(*window(2, "a dog barks", T0 + 10, vector=unit_at(50))) is Reason.DISTANCE
    # compared with the last *published* window (50 deg): 80 deg is 30 deg away, within
    assert f.admit(*window(3, "a dog barks", T0 + 15, vector=unit_at(80))) is Reason.UNCHANGED


def test_a_slow_drift_adds_up_against_the_last_published_window() -> None:
    f = ChangeFilter(ChangeRule(change_distance=0.3))
    f.admit(*window(0, "wind", T0, vector=unit_at(0)))
    verdicts = [f.admit(*window(i, "wind", T0 + 5 * i, vector=unit_at(10 * i)))
                for i in range(1, 8)]
    # every step is 10 degrees (distance 0.015); 50 degrees from the reference crosses 0.3
    assert verdicts == [Reason.UNCHANGED] * 4 + [Reason.DISTANCE] + [Reason.UNCHANGED] * 2


def test_heartbeat_republishes_an_unchanged_caption() -> None:
    f = ChangeFilter(ChangeRule(heartbeat_s=60.0))
    f.admit(*window(0, "a clock ticks", T0, vector=unit_at(0)))
    assert f.admit(*window(1, "a clock ticks", T0 + 59.5, vector=unit_at(0))) is Reason.UNCHANGED
    assert f.admit(*window(2, "a clock ticks", T0 + 60, vector=unit_at(0))) is Reason.HEARTBEAT
    # the heartbeat counts from the window just published
    assert f.admit(*window(3, "a clock ticks", T0 + 100, vector=unit_at(0))) is Reason.UNCHANGED
    assert f.admit(*window(4, "a clock ticks", T0 + 120, vector=unit_at(0))) is Reason.HEARTBEAT


def test_a_wall_clock_that_went_back_publishes() -> None:
    f = ChangeFilter(ChangeRule(heartbeat_s=60.0))
    f.admit(*window(0, "a clock ticks", T0))
    assert f.admit(*window(1, "a clock ticks", T0 - 3600)) is Reason.CLOCK
    assert f.admit(*window(2, "a clock ticks", T0 - 3595)) is Reason.UNCHANGED


def test_sources_are_independent() -> None:
    f = ChangeFilter(ChangeRule(heartbeat_s=60.0))
    assert f.admit(*window(0, "a dog barks", T0, "kitchen")) is Reason.FIRST
    assert f.admit(*window(0, "a dog barks", T0 + 1, "porch")) is Reason.FIRST
    assert f.admit(*window(1, "rain falls", T0 + 5, "porch")) is Reason.TEXT
    # the porch's change does not touch the kitchen's reference
    assert f.admit(*window(1, "a dog barks", T0 + 5, "kitchen")) is Reason.UNCHANGED
    assert f.admit(*window(2, "rain falls", T0 + 10, "porch")) is Reason.UNCHANGED
    assert f.admit(*window(2, "a dog barks", T0 + 61, "kitchen")) is Reason.HEARTBEAT


def test_without_embeddings_text_and_heartbeat_decide() -> None:
    f = ChangeFilter(ChangeRule(heartbeat_s=60.0, change_distance=0.0))
    f.admit(*window(0, "a dog barks", T0))
    assert f.admit(*window(1, "a dog barks", T0 + 5)) is Reason.UNCHANGED
    # one side without an embedding: nothing to compare, even at change_distance 0
    assert f.admit(*window(2, "a dog barks", T0 + 10, vector=unit_at(90))) is Reason.UNCHANGED
    assert f.admit(*window(3, "a siren wails", T0 + 15)) is Reason.TEXT
    assert f.admit(*window(4, "a siren wails", T0 + 75)) is Reason.HEARTBEAT


def test_embeddings_that_cannot_be_compared_are_not_a_change() -> None:
    f = ChangeFilter(ChangeRule(change_distance=0.0))
    f.admit(*window(0, "hum", T0, vector=vec(1, 0, 0)))
    assert f.admit(*window(1, "hum", T0 + 5, vector=vec(0, 1))) is Reason.UNCHANGED  # other length
    assert f.admit(*window(2, "hum", T0 + 10, vector=vec(0, 0, 0))) is Reason.UNCHANGED  # zero
    assert f.admit(*window(3, "hum", T0 + 15, vector=vec(0, 1, 0))) is Reason.DISTANCE


def test_cosine_distance() -> None:
    assert cosine_distance(vec(1, 0), vec(1, 0)) == pytest.approx(0.0)
    assert cosine_distance(vec(1, 0), vec(0, 2)) == pytest.approx(1.0)
    assert cosine_distance(vec(1, 0), vec(-3, 0)) == pytest.approx(2.0)
    assert cosine_distance(vec(1, 0), vec(1, 0, 0)) is None
    assert cosine_distance(vec(1, 0), vec(float("nan"), 0)) is None


def test_rule_defaults_and_bounds() -> None:
    rule = ChangeRule()
    assert (rule.heartbeat_s, rule.change_distance) == (DEFAULT_HEARTBEAT_S,
                                                        DEFAULT_CHANGE_DISTANCE)
    for bad in ({"heartbeat_s": 0.0}, {"heartbeat_s": float("inf")},
                {"change_distance": -0.1}, {"change_distance": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ChangeRule(**bad)


def test_forgetting_the_reference_publishes_the_next_window_as_first() -> None:
    f = ChangeFilter(ChangeRule())
    c0, e0 = window(0, "a dog barks", T0, vector=unit_at(0))
    c1, e1 = window(1, "a dog barks", T0 + 5, vector=unit_at(1))
    assert f.admit(c0, e0) is Reason.FIRST
    assert f.forget(c1) is False  # not the reference: nothing changes
    assert f.admit(c1, e1) is Reason.UNCHANGED
    assert f.forget(c0) is True  # the reference never reached the sink
    assert f.last("kitchen") is None
    assert f.admit(c1, e1) is Reason.FIRST
    other, _ = window(0, "a dog barks", T0, source="porch")
    assert f.forget(other) is False


def test_a_recalled_backfill_keeps_what_the_rule_admits() -> None:
    """After a restart a change-only sink replays the changes, not every stored window."""
    rain, rain_again = window(0, "rain", T0)[0], window(1, "rain", T0 + 5)[0]
    porch = window(0, "rain", T0 + 1, source="porch")[0]
    dog = window(2, "a dog barks", T0 + 10)[0]
    dog_again = window(3, "a dog barks", T0 + 15)[0]
    dog_later = window(4, "a dog barks", T0 + 75)[0]
    event = TriggerEvent(event_id="e1", trigger="dog", source_id="kitchen",
                         state=TriggerState.ON, score=0.6, threshold=0.4, start_s=10.0,
                         end_s=15.0, captured_at=T0 + 12, model="m", run_id="run")
    recalled: list[Published] = [rain, porch, rain_again, dog, event, dog_again, dog_later]
    got = recalled_changes(ChangeRule(heartbeat_s=60.0), recalled)
    assert got == [rain, porch, dog, event, dog_later]  # first, per source; text; heartbeat
    assert recalled_changes(ChangeRule(heartbeat_s=60.0), []) == []
