"""URI parsing and option validation shared by the sources."""

from __future__ import annotations

import numpy as np
import pytest
from structlog.testing import capture_logs

from streamcap.clock import FakeClock
from streamcap.errors import ConfigError
from streamcap.options import known_keys
from streamcap.sources import file as file_mod
from streamcap.sources import microphone, stream
from streamcap.sources.base import (
    SOURCE_OPTIONS,
    AudioSource,
    FileOptions,
    MicOptions,
    SampleCheck,
    StreamOptions,
    parse_source_options,
    parse_source_uri,
)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mic:default", ("mic", "default", {})),
        ("mic:3", ("mic", "3", {})),
        ("mic:USB Audio", ("mic", "USB Audio", {})),
        ("MIC:default", ("mic", "default", {})),
        ("file:/data/x.wav", ("file", "/data/x.wav", {})),
        (
            "file:/data/x.wav?loop=true&realtime=false",
            ("file", "/data/x.wav", {"loop": "true", "realtime": "false"}),
        ),
        ("file:relative/y.flac", ("file", "relative/y.flac", {})),
        ("file:///data/my%20clip.mp3", ("file", "/data/my clip.mp3", {})),
        ("file://localhost/data/z.ogg", ("file", "/data/z.ogg", {})),
        ("rtsp://cam.local:554/stream1", ("stream", "rtsp://cam.local:554/stream1", {})),
        ("rtmp://127.0.0.1/live/key", ("stream", "rtmp://127.0.0.1/live/key", {})),
        ("http://radio/stream?x=1", ("stream", "http://radio/stream?x=1", {})),
        ("https://radio/stream", ("stream", "https://radio/stream", {})),
        ("udp://127.0.0.1:5000", ("stream", "udp://127.0.0.1:5000", {})),
        ("tcp://127.0.0.1:5000", ("stream", "tcp://127.0.0.1:5000", {})),
        ("srt://127.0.0.1:9000", ("stream", "srt://127.0.0.1:9000", {})),
        ("hls+http://h/live.m3u8", ("stream", "http://h/live.m3u8", {})),
        ("hls+https://h/live.m3u8", ("stream", "https://h/live.m3u8", {})),
    ],
)
def test_parse_source_uri_maps_every_form(
    uri: str, expected: tuple[str, str, dict[str, str]]
) -> None:
    assert parse_source_uri(uri) == expected


@pytest.mark.parametrize("uri", ["ftp://host/x.wav", "gopher:x", "/data/x.wav", "mic:", "file:"])
def test_parse_source_uri_rejects_unknown_forms_naming_them(uri: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_source_uri(uri)
    message = str(err.value)
    assert repr(uri) in message
    assert "mic:default" in message and "file:" in message


def test_parse_source_uri_rejects_remote_file_host() -> None:
    with pytest.raises(ConfigError, match="must be local"):
        parse_source_uri("file://server/share/x.wav")


def test_unknown_scheme_message_redacts_credentials() -> None:
    with pytest.raises(ConfigError) as err:
        parse_source_uri("ftp://bob:hunter2@host/x")
    assert "hunter2" not in str(err.value)


def test_options_defaults_and_coercion() -> None:
    assert parse_source_options("file", {}) == FileOptions()
    assert parse_source_options("stream", {}) == StreamOptions()
    opts = parse_source_options(
        "file", {"block_s": 0.25}, {"loop": "true", "realtime": "0", "sample_rate_hz": "16000"}
    )
    assert opts.loop is True and opts.realtime is False
    assert opts.sample_rate_hz == 16000 and opts.block_s == 0.25


def test_config_options_win_over_uri_params() -> None:
    opts = parse_source_options("file", {"loop": False}, {"loop": "true"})
    assert opts.loop is False


@pytest.mark.parametrize(
    ("kind", "options", "fragment"),
    [
        ("mic", {"loop": True}, "'loop'"),
        ("stream", {"channels": 2}, "'channels'"),
        ("file", {"bogus": 1}, "'bogus'"),
        ("mic", {"sample_rate_hz": -1}, "'sample_rate_hz'"),
        ("mic", {"sample_rate_hz": True}, "'sample_rate_hz'"),
        ("file", {"block_s": 0}, "'block_s'"),
        ("file", {"block_s": "fast"}, "'block_s'"),
        ("file", {"loop": "maybe"}, "'loop'"),
        ("stream", {"ffmpeg": ""}, "'ffmpeg'"),
    ],
)
def test_bad_options_name_the_key(kind: str, options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_source_options(kind, options)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("file", "block_s", "nan"),
        ("file", "block_s", "inf"),
        ("file", "block_s", "0.001"),
        ("file", "block_s", "2.5"),
        ("file", "block_s", 1e-320),
        ("file", "sample_rate_hz", "-5"),
        ("file", "sample_rate_hz", "7999"),
        ("file", "sample_rate_hz", "192001"),
        ("file", "sample_rate_hz", 10**12),
        ("mic", "channels", 65),
        ("stream", "probe_s", 0),
        ("stream", "probe_s", 61),
    ],
)
def test_values_obey_the_config_table_ranges_wherever_they_come_from(
    kind: str, key: str, value: object
) -> None:
    for options, params in (({key: value}, {}), ({}, {key: str(value)})):
        with pytest.raises(ConfigError) as err:
            parse_source_options(kind, options, params)
        [problem] = err.value.problems
        assert problem.startswith(f"source option {key!r}: must be "), problem


def test_zero_means_automatic_wherever_it_comes_from() -> None:
    assert parse_source_options("mic", {"channels": 0, "sample_rate_hz": 0}) == MicOptions()
    assert parse_source_options("mic", {}, {"channels": "0", "sample_rate_hz": "0"}) == MicOptions()


@pytest.mark.parametrize(("kind", "cls"), [("mic", MicOptions), ("file", FileOptions),
                                           ("stream", StreamOptions)])
def test_each_kind_takes_the_keys_its_options_type_declares(kind: str, cls: type) -> None:
    assert SOURCE_OPTIONS[kind] is cls
    with pytest.raises(ConfigError) as err:
        parse_source_options(kind, {"bogus": 1})
    assert err.value.problems == [
        f"source option 'bogus': unknown key (known keys: {', '.join(sorted(known_keys(cls)))})"]


def test_range_limits_are_accepted() -> None:
    opts = parse_source_options("file", {}, {"block_s": "0.005", "sample_rate_hz": "192000"})
    assert (opts.block_s, opts.sample_rate_hz) == (0.005, 192000)
    assert parse_source_options("mic", {"channels": 64, "block_s": 2}).channels == 64


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_source_options("mic", {"a": 1, "b": 2, "block_s": -1})
    assert len(err.value.problems) == 3


def test_entry_points_build_sources_of_the_right_kind() -> None:
    sources: list[AudioSource] = [
        microphone.create_source("m", "mic:default", {}),
        file_mod.create_source("f", "file:/x.wav?realtime=false", {}),
        stream.create_source("s", "udp://127.0.0.1:5000", {"sample_rate_hz": 16000}),
    ]
    for src in sources:
        assert isinstance(src, AudioSource)
    assert [s.source_id for s in sources] == ["m", "f", "s"]


@pytest.mark.parametrize(
    ("factory", "uri"),
    [
        (microphone.create_source, "file:/x.wav"),
        (file_mod.create_source, "mic:default"),
        (stream.create_source, "file:/x.wav"),
    ],
)
def test_entry_points_reject_other_kinds(factory: object, uri: str) -> None:
    with pytest.raises(ConfigError, match="source 'x'"):
        factory("x", uri, {})  # type: ignore[operator]


def test_stream_source_never_shows_credentials() -> None:
    src = stream.create_source("s", "rtsp://admin:hunter2@127.0.0.1/s?token=t0k", {})
    assert "hunter2" not in repr(src) and "t0k" not in repr(src)
    assert "hunter2" not in src.url


# --------------------------------------------------------------------------- SampleCheck


def _check(clock: FakeClock, *, realtime: bool = False) -> SampleCheck:
    return SampleCheck("file source a: /data/bad.wav", realtime=realtime, clock=clock)


def test_sample_check_zeroes_counts_and_names_the_position() -> None:
    check = _check(FakeClock(100.0))
    block = np.full(1000, 0.1, dtype=np.float32)
    block[900:] = np.nan
    block[950] = np.inf
    with capture_logs() as logs:
        checked = check.check(block, position_s=2.0, sample_rate_hz=1000)
    clean, count = checked.samples, checked.nonfinite
    assert count == 100 and check.nonfinite_total == 100 and checked.clipped == 0
    assert np.isfinite(clean).all() and not clean[900:].any()
    [event] = logs
    assert event["log_level"] == "warning"
    assert event["source"] == "file source a: /data/bad.wav"
    assert event["first_at_s"] == 2.9  # 2 s + sample 900 at 1000 Hz


@pytest.mark.parametrize("huge", [1e30, -1e30, float(np.finfo(np.float32).max), 1.5])
def test_sample_check_clips_samples_beyond_full_scale_and_counts_them(huge: float) -> None:
    check = _check(FakeClock(100.0))
    block = np.full(1000, 0.25, dtype=np.float32)
    block[500:600] = huge
    block[700] = np.nan
    with capture_logs() as logs:
        checked = check.check(block, position_s=1.0, sample_rate_hz=1000)
    assert (checked.nonfinite, checked.clipped) == (1, 100)
    assert check.clipped_total == 100 and check.nonfinite_total == 1
    assert np.isfinite(checked.samples).all() and np.abs(checked.samples).max() == 1.0
    np.testing.assert_array_equal(checked.samples[500:600], np.sign(huge))
    np.testing.assert_array_equal(checked.samples[:500], block[:500])  # the rest untouched
    [clip_warning] = [e for e in logs if "full scale" in e["event"]]
    assert clip_warning["source"] == "file source a: /data/bad.wav"
    assert (clip_warning["clipped"], clip_warning["first_at_s"]) == (100, 1.5)


def test_sample_check_passes_full_scale_samples_untouched() -> None:
    check = _check(FakeClock(100.0))
    block = np.array([1.0, -1.0, 0.5, 0.0], dtype=np.float32)
    with capture_logs() as logs:
        checked = check.check(block, position_s=0.0, sample_rate_hz=4)
    assert checked.samples is block and checked.clipped == 0 and not logs


def test_sample_check_clipping_warns_at_most_once_per_interval() -> None:
    clock = FakeClock(100.0)
    check = _check(clock)
    block = np.array([2.0, 0.0, -3.0, 0.0], dtype=np.float32)
    with capture_logs() as logs:
        for i in range(480):  # 60 s of blocks, every one of them too loud
            clock.now = 100.0 + i * 0.125
            check.check(block, position_s=i * 0.125, sample_rate_hz=32)
    assert check.clipped_total == 960
    assert len(logs) == 6 and all(e["event"].startswith("samples beyond") for e in logs)


def test_sample_check_warns_at_most_once_per_interval() -> None:
    clock = FakeClock(100.0)
    check = _check(clock)
    block = np.array([np.nan, 0.0, np.inf, 0.0], dtype=np.float32)
    with capture_logs() as logs:
        for i in range(480):  # 60 s of blocks, every one of them bad
            clock.now = 100.0 + i * 0.125
            check.check(block, position_s=i * 0.125, sample_rate_hz=32)
    assert check.nonfinite_total == 960
    assert len(logs) == 6  # at 0, 10, 20, 30, 40, 50 s
    assert logs[0]["replaced"] == 2
    assert logs[1]["replaced"] == 160  # the blocks counted since the first warning
    assert logs[-1]["total"] == 802


def test_sample_check_reports_a_source_slower_than_real_time() -> None:
    clock = FakeClock(100.0)
    check = _check(clock, realtime=True)
    block = np.zeros(100, dtype=np.float32)
    with capture_logs() as logs:
        for _ in range(20):  # 1 s of audio every 1.25 s
            clock.now += 1.25
            check.check(block, position_s=0.0, sample_rate_hz=100)
    assert check.slow_warnings == 1
    [event] = logs
    assert "slower than real time" in event["event"]
    assert event["source"] == "file source a: /data/bad.wav"


def test_sample_check_is_quiet_for_a_source_that_keeps_up() -> None:
    clock = FakeClock(100.0)
    check = _check(clock, realtime=True)
    fast = _check(clock, realtime=False)
    block = np.zeros(100, dtype=np.float32)
    with capture_logs() as logs:
        for i in range(100):  # on time, with jitter
            clock.now = 100.0 + i + (0.5 if i % 2 else 0.0)
            check.check(block, position_s=0.0, sample_rate_hz=100)
        for _ in range(10):  # not meant to be real time: never slow
            clock.now += 5.0
            fast.check(block, position_s=0.0, sample_rate_hz=100)
    assert check.slow_warnings == 0 and fast.slow_warnings == 0
    assert not logs
