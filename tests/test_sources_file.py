"""File source with real files: soundfile for wav/flac/ogg, real ffmpeg for mp3 and resampling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from structlog.testing import capture_logs
from timing import scaled

from streamcap.errors import SourceFormatError, SourceUnavailable
from streamcap.messages import AudioBlock
from streamcap.sources import file as file_mod
from streamcap.sources.file import FileSource, create_source

RATE = 16000


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def collect(source: FileSource, limit: int | None = None) -> list[AudioBlock]:
    out: list[AudioBlock] = []
    async with asyncio.timeout(30), contextlib.aclosing(source.blocks()) as blocks:
        async for block in blocks:
            out.append(block)
            if limit is not None and len(out) >= limit:
                break
    return out


def check_contiguous(blocks: list[AudioBlock]) -> None:
    expected = 0
    for block in blocks:
        assert block.start_sample == expected
        assert block.samples.dtype == np.float32 and block.samples.ndim == 1
        assert not block.samples.flags.writeable
        expected += len(block.samples)


def write_sine(path: Path, seconds: float, *, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    data = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    sf.write(str(path), data, rate)
    return mono


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg"])
async def test_soundfile_formats_deliver_whole_file_fast(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tone{suffix}"
    write_sine(path, 1.3, channels=2)
    src = create_source("f", f"file:{path}?realtime=false", {"block_s": 0.1})
    blocks = await collect(src)
    check_contiguous(blocks)
    total = sum(len(b.samples) for b in blocks)
    assert total == sf.info(str(path)).frames == int(1.3 * RATE)
    assert {len(b.samples) for b in blocks[:-1]} == {1600}
    assert all(b.sample_rate_hz == RATE for b in blocks)
    audio = np.concatenate([b.samples for b in blocks])
    assert abs(peak_hz(audio, RATE) - 1000) < 3


async def test_wav_samples_are_exact_downmix(tmp_path: Path) -> None:
    path = tmp_path / "st.wav"
    t = np.arange(RATE) / RATE
    left = 0.5 * np.sin(2 * np.pi * 300 * t)
    right = 0.25 * np.sin(2 * np.pi * 700 * t)
    sf.write(str(path), np.stack([left, right], axis=1).astype(np.float32), RATE, subtype="FLOAT")
    blocks = await collect(create_source("f", f"file:{path}", {"realtime": False}))
    audio = np.concatenate([b.samples for b in blocks])
    np.testing.assert_allclose(audio, ((left + right) / 2).astype(np.float32), atol=1e-6)


async def test_mp3_through_real_ffmpeg(tone_file: Callable[..., Path]) -> None:
    path = tone_file("tone.mp3", frequency_hz=440, duration_s=2.0, sample_rate_hz=44100)
    src = create_source("f", f"file:{path}", {"realtime": False, "block_s": 0.05})
    blocks = await collect(src)
    check_contiguous(blocks)
    assert src.sample_rate_hz == 44100
    total = sum(len(b.samples) for b in blocks)
    # mp3 adds encoder delay and padding: at most a couple of 1152-sample frames
    assert abs(total - 2 * 44100) <= 3 * 1152
    audio = np.concatenate([b.samples for b in blocks])
    assert abs(peak_hz(audio[4000:-4000], 44100) - 440) < 3


async def test_resampling_goes_through_ffmpeg(tmp_path: Path, ffmpeg: str) -> None:
    path = tmp_path / "tone.wav"
    write_sine(path, 1.0, rate=48000)
    src = create_source("f", f"file:{path}", {"realtime": False, "sample_rate_hz": RATE})
    blocks = await collect(src)
    assert all(b.sample_rate_hz == RATE for b in blocks)
    total = sum(len(b.samples) for b in blocks)
    assert abs(total - RATE) <= 64
    assert abs(peak_hz(np.concatenate([b.samples for b in blocks]), RATE) - 1000) < 3


def short_clip(tmp_path: Path, tone_file: Callable[..., Path], name: str,
               duration_s: float) -> Path:
    """A short tone: a wav written here, anything else (mp3) by the real ffmpeg."""
    if name.endswith(".wav"):
        path = tmp_path / name
        write_sine(path, duration_s)
        return path
    return tone_file(name, duration_s=duration_s, sample_rate_hz=RATE)


@pytest.mark.parametrize("name", ["loop.wav", "loop.mp3"])
async def test_loop_continues_the_stream_clock(
    tmp_path: Path, tone_file: Callable[..., Path], name: str
) -> None:
    path = short_clip(tmp_path, tone_file, name, 0.35)
    src = create_source("f", f"file:{path}?loop=true&realtime=false", {"block_s": 0.1})
    blocks = await collect(src, limit=20)
    check_contiguous(blocks)
    assert src.passes >= 3
    rate = blocks[0].sample_rate_hz
    # captured_at follows the stream clock across loops
    for block in blocks:
        assert block.captured_at == pytest.approx(
            blocks[0].captured_at + block.start_sample / rate, abs=1e-6
        )


async def test_realtime_pacing_is_no_faster_than_wall_clock(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_sine(path, 0.6)
    src = create_source("f", f"file:{path}", {"block_s": 0.1})
    arrivals: list[tuple[float, AudioBlock]] = []
    start = time.monotonic()
    async with asyncio.timeout(10):
        async for block in src.blocks():
            arrivals.append((time.monotonic() - start, block))
    # every block arrives only once its last sample would have been heard live
    for arrived, block in arrivals:
        assert arrived >= (block.start_sample + len(block.samples)) / RATE - 0.01
    assert sum(len(b.samples) for _, b in arrivals) == int(0.6 * RATE)


async def test_fast_mode_yields_control_to_other_tasks(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    write_sine(path, 5.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    blocks = await collect(create_source("f", f"file:{path}", {"realtime": False}))
    task.cancel()
    assert len(blocks) == 50
    assert ticks >= 25


# ------------------------------------------------------------------ bad input


async def test_missing_file_is_unavailable_and_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(SourceUnavailable) as err:
        await collect(create_source("f", f"file:{path}", {}))
    assert str(path) in str(err.value)
    assert "does not exist" in str(err.value) and "expected" in str(err.value)


async def test_missing_file_appearing_later_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "later.wav"
    src = create_source("f", f"file:{path}", {"realtime": False})
    with pytest.raises(SourceUnavailable):
        await collect(src)
    write_sine(path, 0.2)
    assert sum(len(b.samples) for b in await collect(src)) == int(0.2 * RATE)


async def test_corrupt_wav_is_a_format_error(tmp_path: Path, ffmpeg: str) -> None:
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SourceFormatError) as err:
        await collect(create_source("f", f"file:{path}", {}))
    assert str(path) in str(err.value) and "expected" in str(err.value)


async def test_unsupported_format_is_a_format_error(tmp_path: Path, ffmpeg: str) -> None:
    path = tmp_path / "notes.xyz"
    path.write_text("this is not audio at all\n" * 50)
    with pytest.raises(SourceFormatError) as err:
        await collect(create_source("f", f"file:{path}", {}))
    message = str(err.value)
    assert str(path) in message and "expected an audio file" in message


async def test_directory_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(SourceFormatError, match="is a directory"):
        await collect(create_source("f", f"file:{tmp_path}", {}))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
async def test_unreadable_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "secret.wav"
    write_sine(path, 0.1)
    path.chmod(0)
    with pytest.raises(SourceUnavailable, match="not readable"):
        await collect(create_source("f", f"file:{path}", {}))


async def test_missing_ffmpeg_is_unavailable(tone_file: Callable[..., Path]) -> None:
    path = tone_file("x.mp3", duration_s=0.2)
    src = create_source("f", f"file:{path}", {"ffmpeg": "/nonexistent/ffmpeg", "realtime": False})
    with pytest.raises(SourceUnavailable, match="ffprobe"):
        await collect(src)


async def test_cancel_mid_file_kills_ffmpeg(
    tone_file: Callable[..., Path], children: Callable[[str], list[int]]
) -> None:
    path = tone_file("long.mp3", duration_s=20.0, sample_rate_hz=RATE)
    src = create_source("f", f"file:{path}", {"realtime": True})
    gen = src.blocks()
    async with asyncio.timeout(10):
        await anext(gen)
    assert children("ffmpeg")
    await gen.aclose()
    assert children("ffmpeg") == []


# --------------------------------------------------------------------------- bad samples, loops


def write_float_wav_with_nonfinite(path: Path, seconds: float = 1.0) -> np.ndarray:
    """A float WAV whose last 100 samples are NaN and infinities; returns what was written."""
    t = np.arange(int(seconds * RATE)) / RATE
    audio = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    audio[-100:] = np.nan
    audio[-50] = np.inf
    audio[-10] = -np.inf
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    return audio


async def test_nonfinite_samples_become_silence_counted_and_located(
    tmp_path: Path
) -> None:
    path = tmp_path / "nan.wav"
    audio = write_float_wav_with_nonfinite(path)
    src = create_source("f", f"file:{path}?realtime=false", {"block_s": 0.25})
    with capture_logs() as logs:
        blocks = await collect(src)
    samples = np.concatenate([b.samples for b in blocks])
    assert np.isfinite(samples).all()
    np.testing.assert_array_equal(samples[:-100], audio[:-100])
    assert not samples[-100:].any()
    assert sum(b.nonfinite for b in blocks) == 100 == src.nonfinite_samples
    assert [b.nonfinite for b in blocks] == [0, 0, 0, 100]
    [warning] = [e for e in logs if "NaN" in e["event"]]
    assert str(path) in warning["source"]
    assert warning["first_at_s"] == round((RATE - 100) / RATE, 3)  # where the first bad sample is


@pytest.mark.parametrize("name", ["short.mp3", "short.wav"])
async def test_short_looped_file_is_decoded_once_and_replayed_from_memory(
    tmp_path: Path, tone_file: Callable[..., Path], name: str
) -> None:
    path = short_clip(tmp_path, tone_file, name, 0.3)
    src = create_source("f", f"file:{path}?loop=true&realtime=false", {"block_s": 0.1})
    blocks = await collect(src, limit=40)
    check_contiguous(blocks)
    assert src.passes >= 8
    assert src.decodes == 1  # ffmpeg ran (or the file was opened) once, not once per pass
    first = np.concatenate([b.samples for b in blocks])
    length = sum(len(b.samples) for b in blocks[: len(blocks) // src.passes])
    # every pass delivers the same audio
    np.testing.assert_array_equal(first[length : 2 * length], first[:length])


async def test_long_looped_file_is_not_kept_in_memory(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_mod, "LOOP_CACHE_MAX_S", 0.2)
    path = tmp_path / "long.wav"
    write_sine(path, 0.3)
    src = create_source("f", f"file:{path}?loop=true&realtime=false", {"block_s": 0.1})
    await collect(src, limit=12)
    assert src.passes >= 2
    assert src.decodes >= src.passes  # one decode per pass: nothing was cached


async def test_truncated_wav_is_played_with_a_warning_giving_both_durations(
    tmp_path: Path
) -> None:
    whole = tmp_path / "whole.wav"
    write_sine(whole, 3.0)
    data = whole.read_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: 44 + 2 * RATE])  # the header and 1 s of 16-bit samples
    src = create_source("f", f"file:{path}?realtime=false", {})
    probe = await src.probe()
    assert probe.duration_s == pytest.approx(1.0, abs=0.01)
    assert probe.announced_s == pytest.approx(3.0, abs=0.01)
    with capture_logs() as logs:
        blocks = await collect(src)
    assert sum(len(b.samples) for b in blocks) == pytest.approx(RATE, abs=2)
    [warning] = [e for e in logs if "truncated" in e["event"]]
    assert str(path) in warning["source"]
    assert (warning["announced_s"], warning["holds_s"]) == (3.0, 1.0)
    with capture_logs() as logs:
        await collect(create_source("g", f"file:{whole}?realtime=false", {}))
    assert not [e for e in logs if "truncated" in e["event"]]


# --------------------------------------------------------------------------- as a daemon source


@pytest.mark.slow
def test_daemon_keeps_captioning_a_looped_file_with_nan_and_inf(tmp_path: Path) -> None:
    from conftest import free_port
    from daemon_process import (
        WAIT_S,
        DaemonProcess,
        NotifyListener,
        http_get,
        metric_samples,
        tiny_model_toml,
    )

    wav = tmp_path / "nan.wav"
    write_float_wav_with_nonfinite(wav)
    http_port = free_port()
    config = tmp_path / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "nan-test"
state_dir = "{tmp_path / 'state'}"
log_format = "json"

{tiny_model_toml(n_candidates=2, max_new_tokens=4)}
[sources.bad]
uri = "file:{wav}?loop=true"
window_s = 10
hop_s = 10
realtime = false

[http]
port = {http_port}
""", encoding="utf-8")
    notify = NotifyListener(Path(tempfile.mkdtemp(prefix="sc-nan-")))
    daemon = DaemonProcess.start(config, env={"NOTIFY_SOCKET": str(notify.path)},
                                 log=tmp_path / "daemon.log", jsonl=tmp_path / "none.jsonl",
                                 http_port=http_port)
    try:
        deadline = time.monotonic() + WAIT_S
        while notify.index("READY", "1") is None:  # the http server is up from then on
            daemon.check_alive()
            assert time.monotonic() < deadline, daemon.log_tail()
            time.sleep(0.2)
        daemon.wait_metric("streamcap_windows_total", '{source="bad"}', lambda v: v >= 3)
        text = daemon.wait_metric("streamcap_nonfinite_samples_total", '{source="bad"}',
                                  lambda v: v >= 1000)
        nonfinite = metric_samples(text, "streamcap_nonfinite_samples_total")['{source="bad"}']
        _, _, health = http_get(daemon.http("/healthz"))
        assert "source bad" not in health, health  # not stalled, retrying or failed
        events = daemon.log_events()
        assert not [e for e in events if "audio gap" in str(e.get("event"))]
        warnings = [e for e in events if "NaN" in str(e.get("event"))]
        assert warnings and all(str(wav) in e["source"] for e in warnings)
        assert len(warnings) < nonfinite / 100  # one pass holds 100: not one warning per pass
    finally:
        code = daemon.stop()
        notify.close()
    assert code == 0, daemon.log_tail()


# --------------------------------------------------------------------------- hostile files


def _unblock_fifo_later(path: Path) -> threading.Thread:
    """A writer that opens ``path`` (a FIFO) after a while and closes it at once.

    Code that opened the FIFO on the event loop would block until then; the writer
    makes such code fail (reading nothing) instead of hanging the test forever.
    """

    def write() -> None:
        time.sleep(scaled(3))
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("via_link", [False, True])
async def test_fifo_is_refused_without_opening_it(tmp_path: Path, via_link: bool) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    path = fifo
    if via_link:
        path = tmp_path / "link.wav"
        path.symlink_to(fifo)
    writer = _unblock_fifo_later(fifo)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        with pytest.raises(SourceFormatError) as err:
            await collect(create_source("f", f"file:{path}", {}))
    finally:
        task.cancel()
    message = str(err.value)
    assert "file source f" in message and str(path) in message
    assert "FIFO" in message and "not a regular file" in message
    if via_link:
        assert "is a link to a FIFO" in message and str(fifo) in message
    writer.join()


@pytest.mark.parametrize(("device", "kind"), [("/dev/zero", "a character device"),
                                              ("/dev/null", "a character device")])
async def test_device_is_refused(device: str, kind: str) -> None:
    if not Path(device).exists():
        pytest.skip(f"{device} is missing")
    with pytest.raises(SourceFormatError, match=f"{device} is {kind}, not a regular file"):
        await collect(create_source("f", f"file:{device}", {"realtime": False}))


async def test_socket_is_refused(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="sc-sock-"))  # AF_UNIX paths are short
    path = directory / "s.wav"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        with pytest.raises(SourceFormatError, match="is a socket, not a regular file"):
            await collect(create_source("f", f"file:{path}", {}))
    finally:
        sock.close()


def write_header_rate(path: Path, rate: int, samples: int = 100) -> None:
    """A float WAV whose header claims ``rate`` Hz (soundfile refuses to write most of them)."""
    sf.write(str(path), np.zeros(samples, dtype=np.float32), RATE, subtype="FLOAT")
    data = bytearray(path.read_bytes())
    assert data[24:28] == RATE.to_bytes(4, "little")
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = (rate * 4).to_bytes(4, "little")  # bytes per second
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [1, 999, 384001, 1_000_000])
async def test_sample_rate_outside_the_range_is_refused(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "rate.wav"
    write_header_rate(path, rate)
    with pytest.raises(SourceFormatError) as err:
        await collect(create_source("f", f"file:{path}?realtime=false", {}))
    assert str(err.value) == (f"file source f: {path} has a sample rate of {rate} Hz; "
                              "expected 1000 to 384000 Hz")


async def test_sample_rate_outside_the_range_is_refused_through_ffmpeg(
        tmp_path: Path, ffmpeg: str) -> None:
    path = tmp_path / "rate.wav"
    write_header_rate(path, 500, samples=4000)
    renamed = path.rename(tmp_path / "rate.audio")  # not a soundfile suffix: ffprobe reads it
    with pytest.raises(SourceFormatError, match="has a sample rate of 500 Hz; expected 1000"):
        await collect(create_source("f", f"file:{renamed}?realtime=false", {}))


@pytest.mark.parametrize("rate", [1000, 384000])
async def test_sample_rates_at_the_limits_are_read(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "edge.wav"
    write_header_rate(path, rate, samples=500)
    blocks = await collect(create_source("f", f"file:{path}?realtime=false", {}))
    assert blocks[0].sample_rate_hz == rate and sum(len(b.samples) for b in blocks) == 500


async def test_many_channels_are_read_in_bounded_pieces(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_mod, "_READ_SAMPLES", 4096)
    path = tmp_path / "wide.wav"
    frames = np.tile(np.arange(1000, dtype=np.float32)[:, None] / 1000, (1, 256))
    frames[:, 0] = 0.0
    sf.write(str(path), frames, RATE, subtype="FLOAT")
    reads: list[int] = []
    real_read = sf.SoundFile.read

    def counting_read(self: sf.SoundFile, frames: int = -1, **kwargs: object) -> object:
        reads.append(frames)
        return real_read(self, frames, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    blocks = await collect(create_source("f", f"file:{path}?realtime=false", {"block_s": 1.0}))
    samples = np.concatenate([b.samples for b in blocks])
    np.testing.assert_allclose(samples, frames.mean(axis=1), rtol=1e-6)
    assert max(reads) * 256 <= 4096  # 16 frames of 256 channels per read


async def test_huge_amplitudes_are_clipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    audio = np.full(RATE // 2, 1e30, dtype=np.float32)
    audio[::2] = -3.0e38
    audio[:10] = 0.5
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    src = create_source("f", f"file:{path}?realtime=false", {"block_s": 0.1})
    with capture_logs() as logs:
        blocks = await collect(src)
    samples = np.concatenate([b.samples for b in blocks])
    assert np.abs(samples).max() == 1.0 and samples[:10].tolist() == [0.5] * 10
    assert sum(b.clipped for b in blocks) == RATE // 2 - 10 == src.clipped_samples
    [warning] = [e for e in logs if "full scale" in e["event"]]
    assert str(path) in warning["source"]


@pytest.mark.parametrize("realtime", [False, True])
async def test_looped_one_sample_file_is_tiled_into_whole_blocks(tmp_path: Path,
                                                                 realtime: bool) -> None:
    path = tmp_path / "one.wav"
    sf.write(str(path), np.array([0.5], dtype=np.float32), RATE, subtype="FLOAT")
    src = create_source("f", f"file:{path}?loop=true&realtime={str(realtime).lower()}",
                        {"block_s": 0.05})
    blocks = await collect(src, limit=6)
    check_contiguous(blocks)
    assert len(blocks[0].samples) == 1  # the first pass, as read
    assert [len(b.samples) for b in blocks[1:]] == [RATE // 20] * 5  # then whole blocks
    assert all((b.samples == 0.5).all() for b in blocks)
    assert src.decodes == 1 and src.passes == 1 + 5 * RATE // 20


async def test_looped_clip_counts_its_bad_samples_on_every_pass(tmp_path: Path) -> None:
    path = tmp_path / "bad.wav"
    sf.write(str(path), np.array([np.nan, 5.0, 0.5, 0.25], dtype=np.float32), RATE,
             subtype="FLOAT")
    src = create_source("f", f"file:{path}?loop=true&realtime=false", {"block_s": 0.005})
    blocks = await collect(src, limit=3)  # 4 samples, then 80-sample blocks: 20 passes each
    assert [b.nonfinite for b in blocks] == [1, 20, 20]
    assert [b.clipped for b in blocks] == [1, 20, 20]
    assert blocks[1].samples[:4].tolist() == [0.0, 1.0, 0.5, 0.25]


async def test_empty_looped_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), RATE, subtype="FLOAT")
    with pytest.raises(SourceFormatError, match=f"{path} holds no audio frames"):
        await collect(create_source("f", f"file:{path}?loop=true&realtime=false", {}))


async def test_file_name_like_a_url_or_an_option_is_read_as_a_file(
        tmp_path: Path, tone_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tone = tone_file("tone.mp3", duration_s=0.2)
    for name in ("http:x.mp3", "-report"):
        (tmp_path / name).write_bytes(tone.read_bytes())
        src = FileSource("f", name, file_mod.FileOptions(realtime=False))
        blocks = await collect(src)
        assert sum(len(b.samples) for b in blocks) > 0
    assert not list(tmp_path.glob("ffprobe-*.log")) and not list(tmp_path.glob("ffmpeg-*.log"))
