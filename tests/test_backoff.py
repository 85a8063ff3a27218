"""The shared retry schedule: capped exponential backoff with documented jitter, reset when healthy."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamcap.backoff import Backoff
from streamcap.errors import ConfigError


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    b = Backoff(initial_s=0.5, max_s=5.0, multiplier=2.0, jitter=0.0)
    assert [b.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_backoff_full_jitter_stays_within_the_capped_bound() -> None:
    b = Backoff(initial_s=1.0, max_s=8.0, multiplier=2.0, jitter=1.0, rng=random.Random(7))
    caps = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    delays = [b.next_delay() for _ in caps]
    for delay, cap in zip(delays, caps, strict=True):
        assert 0.0 <= delay <= cap
    # jitter actually varies the delays
    assert len({round(d, 6) for d in delays}) == len(delays)


@given(attempts=st.integers(0, 100), initial=st.floats(0.001, 10), max_s=st.floats(10, 120),
       jitter=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_every_delay_lies_in_the_documented_band(attempts: int, initial: float, max_s: float,
                                                 jitter: float, seed: int) -> None:
    b = Backoff(initial, max_s, jitter=jitter, rng=random.Random(seed))
    for _ in range(attempts):
        b.next_delay()
    cap = min(max_s, initial * 2.0 ** min(attempts, 64))
    delay = b.next_delay()
    assert cap * (1 - jitter) - 1e-9 <= delay <= cap + 1e-9


def test_half_jitter_keeps_half_of_the_bound_and_spreads_out() -> None:
    """The reconnect schedule of the MQTT sink: uniform in [c/2, c]."""
    b = Backoff(0.5, 8.0, jitter=0.5, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert min(delays[6:]) >= 4.0 and max(delays[6:]) <= 8.0
    assert len(set(delays)) == len(delays)


def test_backoff_partial_jitter_keeps_a_floor() -> None:
    b = Backoff(initial_s=2.0, max_s=2.0, jitter=0.25, rng=random.Random(1))
    for _ in range(200):
        assert 1.5 <= b.next_delay() <= 2.0


def test_backoff_huge_attempt_count_does_not_overflow() -> None:
    b = Backoff(initial_s=1.0, max_s=30.0, multiplier=10.0, jitter=0.0)
    assert b.cap(10_000) == 30.0
    assert Backoff(1.0, 1.0, multiplier=1.0).cap(10**9) == 1.0


def test_backoff_resets_only_after_a_healthy_period() -> None:
    b = Backoff(initial_s=1.0, max_s=60.0, jitter=0.0, reset_after_s=10.0)
    for _ in range(3):
        b.next_delay()
    assert not b.healthy(9.9)
    assert b.next_delay() == 8.0
    assert b.healthy(10.0)
    assert b.attempt == 0
    assert b.next_delay() == 1.0


def test_healthy_before_any_failure_changes_nothing() -> None:
    b = Backoff(jitter=0.0, reset_after_s=0.0)
    assert not b.healthy(100.0)
    assert b.next_delay() == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0.0},
        {"initial_s": 5.0, "max_s": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"reset_after_s": -1.0},
    ],
)
def test_backoff_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="backoff"):
        Backoff(**kwargs)  # type: ignore[arg-type]
