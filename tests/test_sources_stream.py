"""Network streams through real ffmpeg, fed by a second real ffmpeg on loopback (127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamcap.audio.watchdog import WatchdogOptions
from streamcap.errors import SourceFormatError, SourceUnavailable
from streamcap.messages import AudioBlock, SourceState, SourceStatus
from streamcap.sources.base import parse_source_options
from streamcap.sources.stream import FfmpegStreamSource, create_source
from streamcap.sources.supervisor import SourceSupervisor

RATE = 16000
Children = Callable[[str], list[int]]


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def udp_source(port: int) -> FfmpegStreamSource:
    return create_source("net", f"udp://127.0.0.1:{port}", {"sample_rate_hz": RATE, "probe_s": 0.5})


async def test_udp_stream_delivers_the_tone(
    ffmpeg: str, free_udp_port: int, tone_sender: Callable[..., Any], children: Children
) -> None:
    sender = tone_sender(url=f"udp://127.0.0.1:{free_udp_port}", frequency_hz=440)
    sender.start()
    src = udp_source(free_udp_port)
    blocks: list[AudioBlock] = []
    async with asyncio.timeout(20), contextlib.aclosing(src.blocks()) as stream:
        async for block in stream:
            blocks.append(block)
            if len(blocks) == 15:
                pid = src.pid
                break
    expected = 0
    for block in blocks:
        assert block.start_sample == expected and block.sample_rate_hz == RATE
        assert len(block.samples) == RATE // 10
        expected += len(block.samples)
    audio = np.concatenate([b.samples for b in blocks])
    assert abs(peak_hz(audio, RATE) - 440) < 3
    # closing the generator killed its ffmpeg (the sender still runs)
    assert pid is not None and pid not in children("ffmpeg")
    assert sender.proc is not None and sender.proc.pid in children("ffmpeg")


async def test_unreachable_url_is_unavailable_with_ffmpeg_message(
    ffmpeg: str, free_tcp_port: int
) -> None:
    src = create_source("net", f"tcp://watcher:hunter22@127.0.0.1:{free_tcp_port}?token=abc123", {})
    with pytest.raises(SourceUnavailable) as err:
        async with asyncio.timeout(20):
            async for _ in src.blocks():
                pass
    message = str(err.value)
    assert f"tcp://***@127.0.0.1:{free_tcp_port}?token=***" in message
    assert "exited with code 1" in message
    assert "Connection refused" in message  # ffmpeg's own stderr line
    assert "hunter22" not in message and "abc123" not in message


async def test_unknown_protocol_is_a_format_error(ffmpeg: str) -> None:
    # a scheme this ffmpeg build lacks is permanent; the source is built directly
    # because URI parsing would reject the scheme first
    src = FfmpegStreamSource("net", "nosuchproto://127.0.0.1/x", parse_source_options("stream", {}))
    with pytest.raises(SourceFormatError, match="Protocol not found"):
        async with asyncio.timeout(20):
            async for _ in src.blocks():
                pass


async def test_missing_ffmpeg_is_unavailable() -> None:
    src = create_source("net", "udp://127.0.0.1:9", {"ffmpeg": "/nonexistent/ffmpeg"})
    with pytest.raises(SourceUnavailable, match="not found"):
        async with asyncio.timeout(5):
            async for _ in src.blocks():
                pass


async def test_cancel_while_waiting_for_data_kills_ffmpeg(
    ffmpeg: str, free_udp_port: int, children: Children
) -> None:
    # nobody sends: ffmpeg stays alive and silent until cancelled
    src = udp_source(free_udp_port)
    task = asyncio.create_task(anext(src.blocks()))
    async with asyncio.timeout(10):
        while src.pid is None:
            await asyncio.sleep(0.02)
        pid = src.pid
        assert pid in children("ffmpeg")
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pid not in children("ffmpeg")
    assert src.pid is None


async def test_supervisor_recovers_when_the_sender_restarts(
    ffmpeg: str, free_udp_port: int, tone_sender: Callable[..., Any], children: Children
) -> None:
    sender = tone_sender(url=f"udp://127.0.0.1:{free_udp_port}", frequency_hz=440)
    sender.start()
    statuses: list[SourceStatus] = []
    blocks: list[AudioBlock] = []
    opts = WatchdogOptions(
        stall_s=1.0,
        start_timeout_s=3.0,
        backoff_initial_s=0.2,
        backoff_max_s=0.5,
        backoff_jitter=0.0,
    )
    sup = SourceSupervisor(lambda: udp_source(free_udp_port), "net", opts)
    task = sup.start(blocks.append, statuses.append)

    def seconds(epoch_at_least: int) -> float:
        return sum(len(b.samples) for b in blocks if b.epoch >= epoch_at_least) / RATE

    def seen(state: SourceState) -> bool:
        return any(s.state is state for s in statuses)

    try:
        async with asyncio.timeout(45):
            while seconds(0) < 1.0:
                await asyncio.sleep(0.05)
            sender.stop()
            while not (seen(SourceState.STALLED) and seen(SourceState.RETRYING)):
                await asyncio.sleep(0.05)
            assert not task.done()
            epoch_after_stall = sup.epoch + 1  # the next attempt's epoch
            sender.start()
            while seconds(epoch_after_stall) < 1.0:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    states = [s.state for s in statuses]
    first_stall = states.index(SourceState.STALLED)
    assert states[:2] == [SourceState.STARTING, SourceState.RUNNING]
    assert states[first_stall + 1] is SourceState.RETRYING
    assert SourceState.RUNNING in states[first_stall:]  # recovered in the same process
    assert states[-1] is SourceState.STOPPED and statuses[-1].reason == "shutdown"
    assert "no data for" in statuses[first_stall].reason

    recovered = [b for b in blocks if b.epoch >= epoch_after_stall]
    assert recovered[0].start_sample == 0
    assert abs(peak_hz(np.concatenate([b.samples for b in recovered]), RATE) - 440) < 3
    # epochs only grow, and each epoch's clock is contiguous from 0
    by_epoch: dict[int, int] = {}
    for block in blocks:
        assert block.start_sample == by_epoch.get(block.epoch, 0)
        by_epoch[block.epoch] = block.start_sample + len(block.samples)
    assert list(by_epoch) == sorted(by_epoch)
    # only the sender is left running
    assert sender.proc is not None and children("ffmpeg") == [sender.proc.pid]
