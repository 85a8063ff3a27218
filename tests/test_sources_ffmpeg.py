"""streamcap.sources.ffmpeg: a real ffmpeg decoding a real file into the pipe."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from streamcap.sources.ffmpeg import FfmpegPipe, decode_args

RATE = 16000


async def decoded_to_the_end(ffmpeg: str, path: Path) -> FfmpegPipe:
    pipe = await FfmpegPipe.start(decode_args(ffmpeg, [], str(path), RATE), what=f"file {path}",
                                  task_prefix="streamcap[source:test]")
    total = 0
    while len(samples := await pipe.read(4096)) == 4096:
        total += len(samples)
    assert total > 0
    return pipe


async def test_wait_returns_the_exit_status(ffmpeg: str, tone_file: Callable[..., Path]) -> None:
    pipe = await decoded_to_the_end(ffmpeg, tone_file("tone.mp3", duration_s=0.5))
    try:
        assert await asyncio.wait_for(pipe.wait(), 30) == 0
        assert pipe.returncode == 0
    finally:
        await pipe.close()


async def test_a_cancelled_wait_is_cancelled(ffmpeg: str, tone_file: Callable[..., Path]) -> None:
    """Cancelled while it gives the stderr reader its last lines (the end of every pass of a
    looped file), wait() must end cancelled, not return the exit status as if nothing
    happened: the file source would start another pass and the shutdown would be lost."""
    pipe = await decoded_to_the_end(ffmpeg, tone_file("tone.mp3", duration_s=0.5))
    try:
        await asyncio.wait_for(pipe.wait(), 30)  # ffmpeg has exited and its pipes are closed
        waiter = asyncio.create_task(pipe.wait())
        await asyncio.sleep(0)  # the waiter now waits for the stderr reader
        assert not waiter.done()
        waiter.cancel()
        done, _ = await asyncio.wait([waiter], timeout=30)
        assert done and waiter.cancelled(), f"the cancellation was swallowed: {waiter}"
    finally:
        await pipe.close()


async def test_close_kills_a_running_ffmpeg(ffmpeg: str, tone_file: Callable[..., Path],
                                            children: Callable[[str], list[int]]) -> None:
    path = tone_file("long.mp3", duration_s=30.0)
    pipe = await FfmpegPipe.start(decode_args(ffmpeg, ["-re"], str(path), RATE),
                                  what=f"file {path}", task_prefix="streamcap[source:test]")
    assert len(await pipe.read(1600)) == 1600
    await asyncio.wait_for(pipe.close(), 30)
    assert pipe.returncode is not None
    assert pipe.pid not in children("ffmpeg")


