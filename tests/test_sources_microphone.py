"""Microphone capture through a real PortAudio device: a PulseAudio null sink's monitor."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamcap.errors import SourceFormatError, SourceUnavailable
from streamcap.messages import AudioBlock
from streamcap.sources.devices import describe_devices, find_input_device, list_input_devices
from streamcap.sources.microphone import MicrophoneSource, create_source

RATE = 48000


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def record(src: MicrophoneSource, seconds: float) -> tuple[list[AudioBlock], float]:
    """Record until ``seconds`` of audio arrived; return the blocks and the wall time taken
    from the first block to the last."""
    blocks: list[AudioBlock] = []
    first = last = 0.0
    async with asyncio.timeout(seconds * 4 + 10), contextlib.aclosing(src.blocks()) as stream:
        async for block in stream:
            last = time.monotonic()
            if not blocks:
                first = last
            blocks.append(block)
            if sum(len(b.samples) for b in blocks[1:]) >= seconds * src.sample_rate_hz:  # type: ignore[operator]
                break
    return blocks, last - first


def test_devices_are_listed(pulse: Any) -> None:
    devices, reason = list_input_devices()
    assert reason == ""
    names = [d.name for d in devices]
    assert "pulse" in names and "default" in names
    default = find_input_device("default", devices)
    assert default is not None and default.is_default
    assert find_input_device("PULS", devices) is not None  # case-insensitive name part
    assert find_input_device(str(default.index), devices) == default
    assert find_input_device("no such card", devices) is None
    assert all(d.max_input_channels > 0 for d in devices)
    assert "pulse" in describe_devices(devices)
    assert set(devices[0].to_dict()) == {
        "index", "name", "host_api", "max_input_channels", "default_sample_rate_hz", "is_default",
    }  # fmt: skip


@pytest.mark.parametrize("device", ["default", "pulse"])
async def test_records_a_tone_played_into_the_null_sink(
    pulse: Any, tone_file: Callable[..., Path], device: str
) -> None:
    wav = tone_file("tone.wav", frequency_hz=1000, duration_s=8.0, sample_rate_hz=RATE)
    player = await asyncio.create_subprocess_exec(
        "paplay",
        f"--device={pulse.sink}",
        str(wav),
        env=pulse.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        src = create_source("mic", f"mic:{device}", {"sample_rate_hz": RATE, "block_s": 0.1})
        blocks, wall_s = await record(src, 2.0)
    finally:
        player.kill()
        await player.wait()
    assert src.device_info is not None and src.device_info.name == device
    assert src.channels == 2  # default: min(2, device maximum), downmixed to mono
    expected = 0
    for block in blocks:
        assert block.start_sample == expected
        assert block.sample_rate_hz == RATE and block.samples.ndim == 1
        assert block.source_id == "mic"
        expected += len(block.samples)
    audio = np.concatenate([b.samples for b in blocks])
    loud = audio[np.abs(audio) > 0.01]
    assert len(loud) > RATE // 2, "the tone did not reach the recording"
    assert abs(peak_hz(audio, RATE) - 1000) < 3
    # correctness of the clock, not speed: the samples after the first block cover the
    # wall time between the first and the last block (PulseAudio paces the null sink)
    recorded_s = sum(len(b.samples) for b in blocks[1:]) / RATE
    assert recorded_s == pytest.approx(wall_s, rel=0.25)
    # captured_at advances with the audio
    spans = np.diff([b.captured_at for b in blocks])
    assert abs(float(np.sum(spans)) - sum(len(b.samples) for b in blocks[:-1]) / RATE) < 0.5
    assert src.dropped_blocks == 0


async def test_mono_capture_at_another_rate(pulse: Any) -> None:
    src = create_source("mic", "mic:default", {"sample_rate_hz": 16000, "channels": 1})
    blocks, _ = await record(src, 0.5)
    assert src.channels == 1 and blocks[0].sample_rate_hz == 16000
    assert len(blocks[1].samples) == 1600


async def test_unknown_device_names_it_and_lists_devices(pulse: Any) -> None:
    src = create_source("mic", "mic:Imaginary USB Card", {})
    with pytest.raises(SourceUnavailable) as err:
        await record(src, 0.1)
    message = str(err.value)
    assert "'Imaginary USB Card'" in message and "no such input device" in message
    assert "pulse" in message and "default" in message  # the available devices


async def test_unknown_device_index_is_unavailable(pulse: Any) -> None:
    with pytest.raises(SourceUnavailable, match="'999'"):
        await record(create_source("mic", "mic:999", {}), 0.1)


async def test_unsupported_channel_count_is_a_format_error(pulse: Any) -> None:
    with pytest.raises(SourceFormatError, match="at most 32 channels"):
        await record(create_source("mic", "mic:pulse", {"channels": 64}), 0.1)


async def test_slow_consumer_drops_oldest_blocks_and_flags_overflow(pulse: Any) -> None:
    src = create_source("mic", "mic:default", {"sample_rate_hz": 16000, "block_s": 0.02})
    stream = src.blocks()
    try:
        async with asyncio.timeout(20):
            first = await anext(stream)
            # QUEUE_S (5 s) of 20 ms blocks is 250 blocks; stall the consumer past that
            while src.dropped_blocks < 5:
                await asyncio.sleep(0.25)
            after = await anext(stream)
    finally:
        await stream.aclose()
    assert not first.overflowed
    assert after.overflowed
    # the oldest blocks were dropped: the stream clock jumps over them (it counts
    # captured samples, not delivered ones), so the gap is visible downstream
    assert after.start_sample == len(first.samples) * (1 + src.dropped_blocks)
