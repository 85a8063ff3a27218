"""Live capture from a PortAudio input device (sounddevice ``InputStream``).

The PortAudio callback runs on PortAudio's thread and does only two things:
copy ``indata`` and hand the copy to the event loop with
``loop.call_soon_threadsafe``. On the loop, blocks go into a bounded queue
that drops the oldest block when the consumer falls behind (counted in
``dropped_blocks``). Overruns reported by PortAudio are counted in
``overruns``; both mark the next delivered block ``overflowed=True``.
``start_sample`` counts every captured sample, dropped ones included, so a
drop shows as a jump in the stream clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import numpy as np

from streamcap.errors import ConfigError, SourceFormatError, SourceUnavailable
from streamcap.logs import get_logger
from streamcap.messages import AudioBlock, make_block
from streamcap.sources import devices as _devices
from streamcap.sources.base import (
    MicOptions,
    SampleCheck,
    parse_source_uri,
    read_source_options,
)
from streamcap.sources.devices import DeviceInfo

_log = get_logger(__name__)

QUEUE_S = 5.0
"""Seconds of audio buffered between PortAudio and the consumer before blocks are dropped."""

_STREAM_ENDED = object()


class MicrophoneSource:
    """Record mono float32 blocks from an input device.

    Args:
        source_id: Name of the source in messages.
        device: ``"default"``, a device index, or a part of a device name.
        options: Validated options: ``sample_rate_hz`` (default: the device's
            default rate), ``channels`` (captured before the downmix; default
            min(2, device maximum)), ``block_s``.
    """

    def __init__(self, source_id: str, device: str, options: MicOptions) -> None:
        self._source_id = source_id
        self._device = device
        self._options = options
        self.overruns: int = 0
        """Callbacks in which PortAudio reported an input overflow."""
        self.dropped_blocks: int = 0
        """Blocks dropped because the consumer fell more than ``QUEUE_S`` behind."""
        self.device_info: DeviceInfo | None = None
        """The device in use, once ``blocks()`` has opened it."""
        self.sample_rate_hz: int | None = options.sample_rate_hz
        self.channels: int | None = options.channels
        self._queue: asyncio.Queue[tuple[Any, float, int] | object] | None = None
        self._pending_overflow = False
        self._captured = 0
        self._anchor = float("inf")

    @property
    def source_id(self) -> str:
        return self._source_id

    def __repr__(self) -> str:
        return f"MicrophoneSource({self._source_id!r}, {self._device!r})"

    def _what(self) -> str:
        return f"microphone {self._source_id} (device {self._device!r})"

    def _resolve(self) -> DeviceInfo:
        devices, reason = _devices.list_input_devices()
        found = _devices.find_input_device(self._device, devices)
        if found is None and _devices.refresh_portaudio():
            # the device (or the sound server) may have appeared since PortAudio started
            devices, reason = _devices.list_input_devices()
            found = _devices.find_input_device(self._device, devices)
        if found is None:
            raise SourceUnavailable(
                f"{self._what()}: no such input device; available input devices: "
                f"{_devices.describe_devices(devices, reason)}"
            )
        return found

    # -- called on the event loop, handed off from PortAudio's thread --------------------

    def _on_audio(self, frames: Any, overflow: bool, wall: float) -> None:
        """Queue one callback's frames; ``wall`` is the wall clock when the callback ran."""
        queue = self._queue
        if queue is None:
            return
        if overflow:
            self.overruns += 1
            self._pending_overflow = True
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
                self.dropped_blocks += 1
                self._pending_overflow = True
        # The device clock (sample count) times the audio; the wall clock only anchors
        # it. A block's last sample was captured before its callback ran, so
        # anchor <= wall - (index + frames) / rate; the tightest bound seen is kept.
        rate = self.sample_rate_hz or 1
        index = self._captured
        self._captured += len(frames)
        self._anchor = min(self._anchor, wall - self._captured / rate)
        queue.put_nowait((frames, self._anchor + index / rate, index))

    def _on_finished(self) -> None:
        queue = self._queue
        if queue is None:
            return
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
        queue.put_nowait(_STREAM_ENDED)

    # ------------------------------------------------------------------------------------

    def _open_stream(
        self,
        loop: asyncio.AbstractEventLoop,
        sd: Any,
        device: DeviceInfo,
        rate: int,
        channels: int,
    ) -> Any:
        """Create and start the InputStream (runs in a worker thread: opening may block)."""
        on_audio = self._on_audio
        on_finished = self._on_finished

        def callback(indata: Any, frames: int, time_info: Any, status: Any) -> None:
            try:
                loop.call_soon_threadsafe(
                    on_audio,
                    indata.copy(),
                    bool(status.input_overflow),
                    time.time(),
                )
            except RuntimeError:  # the loop is closed: the stream is being torn down
                pass

        def finished() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_finished)

        stream = sd.InputStream(
            device=device.index,
            samplerate=rate,
            channels=channels,
            dtype="float32",
            blocksize=max(1, round(rate * self._options.block_s)),
            latency="high",
            callback=callback,
            finished_callback=finished,
        )
        try:
            stream.start()
        except BaseException:
            stream.close()
            raise
        return stream

    async def blocks(self) -> AsyncGenerator[AudioBlock, None]:
        """Record until cancelled; yield one block per PortAudio buffer of ``block_s``.

        Raises:
            SourceUnavailable: PortAudio is missing, the device does not exist
                (the message lists the available input devices), cannot be
                opened, or stopped delivering.
            SourceFormatError: the device does not support the requested
                sample rate or channel count.
        """
        sd, reason = _devices.load_sounddevice()
        if sd is None:
            raise SourceUnavailable(f"{self._what()}: {reason}")
        device = self._resolve()
        self.device_info = device
        rate = self._options.sample_rate_hz or round(device.default_sample_rate_hz)
        channels = self._options.channels or min(2, device.max_input_channels)
        where = f"{self._what()} = {device.index}: {device.name}"
        if channels > device.max_input_channels:
            raise SourceFormatError(
                f"{where} records at most {device.max_input_channels} channels, "
                f"{channels} requested (option 'channels')"
            )
        try:
            sd.check_input_settings(
                device=device.index, channels=channels, dtype="float32", samplerate=rate
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise SourceFormatError(
                f"{where} does not support {rate} Hz, {channels} channels, float32: {exc}"
            ) from exc
        self.sample_rate_hz = rate
        self.channels = channels
        block_samples = max(1, round(rate * self._options.block_s))
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=max(4, round(QUEUE_S * rate / block_samples)))
        self._pending_overflow = False
        self._captured = 0
        self._anchor = float("inf")

        _devices.stream_opened()
        opener = asyncio.create_task(
            asyncio.to_thread(self._open_stream, loop, sd, device, rate, channels),
            name=f"streamcap[source:{self._source_id}].open",
        )
        try:
            stream = await asyncio.shield(opener)
        except asyncio.CancelledError:
            opener.add_done_callback(_close_when_opened)
            self._queue = None
            raise
        except sd.PortAudioError as exc:
            _devices.stream_closed()
            self._queue = None
            raise SourceUnavailable(f"{where} cannot be opened: {exc}") from exc
        except BaseException:
            _devices.stream_closed()
            self._queue = None
            raise
        _log.info("recording", source=where, rate_hz=rate, channels=channels)
        queue = self._queue
        checker = SampleCheck(where)
        try:
            while True:
                item = await queue.get()
                if item is _STREAM_ENDED:
                    raise SourceUnavailable(f"{where}: the input stream stopped delivering")
                frames, captured_at, start_sample = item  # type: ignore[misc]
                mono = frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1)
                overflowed = self._pending_overflow
                self._pending_overflow = False
                checked = checker.check(
                    np.asarray(mono, dtype=np.float32),
                    position_s=start_sample / rate,
                    sample_rate_hz=rate,
                )
                yield make_block(
                    source_id=self._source_id,
                    start_sample=start_sample,
                    sample_rate_hz=rate,
                    samples=checked.samples,
                    captured_at=captured_at,
                    overflowed=overflowed,
                    nonfinite=checked.nonfinite,
                    clipped=checked.clipped,
                )
        finally:
            self._queue = None
            _close_stream(stream)


def _close_stream(stream: Any) -> None:
    try:
        stream.abort()
        stream.close()
    except Exception as exc:  # noqa: BLE001 - PortAudioError while closing a dead device
        _log.debug("closing input stream failed", error=str(exc))
    finally:
        _devices.stream_closed()


def _close_when_opened(task: asyncio.Task[Any]) -> None:
    if task.cancelled() or task.exception() is not None:
        _devices.stream_closed()
    else:
        _close_stream(task.result())


def create_source(source_id: str, uri: str, options: Mapping[str, object]) -> MicrophoneSource:
    """Plugin entry point ``mic``: build a microphone source from ``mic:<device>``.

    Raises:
        ConfigError: ``uri`` is not a ``mic:`` URI, or an option is unknown or invalid.
    """
    kind, target, params = parse_source_uri(uri)
    if kind != "mic":
        raise ConfigError(f"source {source_id!r}: uri {uri!r} is a {kind} source, not mic:<device>")
    return MicrophoneSource(source_id, target, read_source_options(MicOptions, options, params))
