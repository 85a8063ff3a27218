"""The source watchdog state machine, driven by a fake clock (plain floats)."""

from __future__ import annotations

import pytest

from streamcap.audio.watchdog import SourceWatchdog, WatchdogOptions
from streamcap.errors import ConfigError, SourceUnavailable
from streamcap.messages import SourceState


def test_watchdog_options_reject_bad_values() -> None:
    with pytest.raises(ConfigError) as err:
        WatchdogOptions(stall_s=0, start_timeout_s=-1, max_retries=-2)
    assert len(err.value.problems) == 3


# ------------------------------------------------------------------ SourceWatchdog


def make(**kwargs: object) -> SourceWatchdog:
    opts = WatchdogOptions(
        stall_s=2.0,
        start_timeout_s=5.0,
        backoff_initial_s=1.0,
        backoff_max_s=4.0,
        backoff_jitter=0.0,
        backoff_reset_after_s=10.0,
        **kwargs,  # type: ignore[arg-type]
    )
    return SourceWatchdog("kitchen", opts)


def test_start_then_data_runs() -> None:
    wd = make()
    s = wd.started(100.0, at=1_700_000_000.0)
    assert (s.state, s.source_id, s.at, s.attempt) == (SourceState.STARTING, "kitchen", 1.7e9, 0)
    assert wd.tick(104.9) is None
    s2 = wd.data(1600, 101.0)
    assert s2 is not None and s2.state is SourceState.RUNNING
    assert "receiving data" in s2.reason
    assert wd.data(1600, 101.1) is None  # no change, nothing to publish
    assert wd.samples == 3200


def test_running_source_stalls_after_stall_s_without_data() -> None:
    wd = make()
    wd.started(0.0)
    wd.data(10, 1.0)
    assert wd.deadline() == 3.0
    assert wd.tick(2.99) is None
    wd.data(10, 2.5)
    assert wd.tick(4.4) is None
    s = wd.tick(4.5)
    assert s is not None and s.state is SourceState.STALLED
    assert "no data for 2.0 s" in s.reason


def test_silent_start_stalls_after_start_timeout() -> None:
    # e.g. an ffmpeg that connected but never writes a byte
    wd = make()
    wd.started(10.0)
    assert wd.tick(14.9) is None
    s = wd.tick(15.0)
    assert s is not None and s.state is SourceState.STALLED
    assert "within 5 s of opening" in s.reason


def test_data_after_stall_resumes_running() -> None:
    wd = make()
    wd.started(0.0)
    wd.data(1, 0.5)
    wd.tick(3.0)
    s = wd.data(1, 3.5)
    assert s is not None and s.state is SourceState.RUNNING and "resumed" in s.reason


def test_transient_errors_retry_with_growing_backoff_and_count_attempts() -> None:
    wd = make()
    delays = []
    for i in range(5):
        wd.started(float(i))
        s = wd.error(SourceUnavailable("connection refused"), permanent=False, now=float(i))
        assert s.state is SourceState.RETRYING
        assert s.reason == "connection refused"
        assert s.attempt == i + 1
        delays.append(s.retry_in_s)
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert "after 5 failed attempts" in wd.started(9.0).reason


def test_stall_then_error_is_retried() -> None:
    wd = make()
    wd.started(0.0)
    stalled = wd.tick(5.0)
    assert stalled is not None
    s = wd.error(stalled.reason, permanent=False, now=5.0)
    assert s.state is SourceState.RETRYING and s.retry_in_s == 1.0


def test_permanent_error_fails_at_once() -> None:
    wd = make()
    wd.started(0.0)
    s = wd.error("not a wav file", permanent=True, now=0.1)
    assert s.state is SourceState.FAILED and s.reason == "not a wav file"
    assert not wd.active and wd.deadline() is None


def test_max_retries_gives_up() -> None:
    wd = make(max_retries=2)
    states = []
    for i in range(3):
        wd.started(float(i))
        states.append(wd.error("refused", permanent=False, now=float(i)))
    assert [s.state for s in states] == [
        SourceState.RETRYING,
        SourceState.RETRYING,
        SourceState.FAILED,
    ]
    assert "gave up after 3 failed attempts; last: refused" == states[-1].reason


def test_zero_retries_fails_on_first_transient_error() -> None:
    wd = make(max_retries=0)
    wd.started(0.0)
    assert wd.error("refused", permanent=False, now=0.0).state is SourceState.FAILED


def test_attempts_reset_after_healthy_data_period() -> None:
    wd = make()
    for i in range(3):
        wd.started(float(i))
        wd.error("refused", permanent=False, now=float(i))
    wd.started(10.0)
    wd.data(100, 11.0)  # RUNNING since 11.0
    wd.data(100, 20.9)
    assert wd.attempt == 3
    wd.data(100, 21.0)  # healthy for 10 s
    assert wd.attempt == 0
    assert wd.error("refused", permanent=False, now=22.0).retry_in_s == 1.0


def test_short_bursts_of_data_do_not_reset_the_backoff() -> None:
    wd = make()
    delays = []
    for i in range(4):
        t = 10.0 * i
        wd.started(t)
        wd.data(100, t + 0.5)  # connects, delivers a block, dies again
        delays.append(wd.error("reset by peer", permanent=False, now=t + 1.0).retry_in_s)
    assert delays == [1.0, 2.0, 4.0, 4.0]


def test_end_and_shutdown_stop() -> None:
    wd = make()
    wd.started(0.0)
    wd.data(1, 0.1)
    s = wd.ended(1.0)
    assert s.state is SourceState.STOPPED and s.reason == "end of input"
    assert wd.tick(100.0) is None
    assert wd.data(1, 100.0) is None
    wd.started(200.0)
    assert wd.stopped(201.0).reason == "shutdown"
    assert wd.last_status is not None and wd.last_status.state is SourceState.STOPPED


def test_exception_without_message_uses_its_type() -> None:
    wd = make()
    wd.started(0.0)
    assert wd.error(TimeoutError(), permanent=False, now=0.0).reason == "TimeoutError"
