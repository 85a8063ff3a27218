"""Audio files as a source: replayed in real time (like a live input) or as fast as possible.

WAV, FLAC, OGG, AIFF and AU files are streamed block by block through
soundfile; every other format (mp3, m4a, opus, ...) and any file that must be
resampled is decoded by an ffmpeg child writing float32 mono to a pipe.
Nothing reads a whole long file into memory; a looped file of at most
:data:`LOOP_CACHE_MAX_S` is decoded once and replayed from memory, so that a
short clip does not restart ffmpeg (or reopen the file) every few tenths of a
second.

Every block passes :class:`~streamcap.sources.base.SampleCheck`: NaN and
infinite samples become silence and samples beyond full scale are clipped
(both counted and warned about), and a real-time file that cannot keep up is
reported. A WAV or AIFF file whose header announces more audio than the file
holds (truncated) is played as far as it goes, with a warning.

Hostile files: only a regular file (or a link to one) is read. A FIFO, a
device, a socket or a directory is refused by ``os.stat`` before anything
opens it (a FIFO's open blocks), and soundfile's descriptor is opened
non-blocking and checked again with ``fstat``
(:func:`streamcap.options.open_regular`). Every blocking call
(``stat``, open, header, reads) runs in a thread of the source's own, so a
slow disk never stalls the event loop; closing waits for a read in progress,
shutdown never waits for the thread. A native sample rate outside
:data:`~streamcap.sources.base.MIN_FILE_RATE_HZ` -
:data:`~streamcap.sources.base.MAX_FILE_RATE_HZ` (1000-384000 Hz) is refused;
reads take at most ``_READ_SAMPLES`` samples of all channels at once, so no
header value sizes an allocation. ffmpeg and ffprobe get an absolute
``file:`` URL and only the file protocol.

Error classes: a missing or unreadable file is :class:`SourceUnavailable`
(it may appear later); a file that exists but cannot be decoded is
:class:`SourceFormatError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import numpy as np
import numpy.typing as npt
import soundfile as sf

from streamcap.audio.dsp import FULL_SCALE, downmix
from streamcap.errors import ConfigError, SourceFormatError, SourceUnavailable
from streamcap.logs import get_logger
from streamcap.messages import AudioBlock, Float32Array, make_block
from streamcap.options import as_found, not_regular, open_regular
from streamcap.sources.base import (
    MAX_FILE_RATE_HZ,
    MIN_FILE_RATE_HZ,
    CheckedSamples,
    FileOptions,
    SampleCheck,
    parse_source_uri,
    read_source_options,
)
from streamcap.sources.ffmpeg import FfmpegPipe, decode_args

_log = get_logger(__name__)

SOUNDFILE_SUFFIXES = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".au"})
"""File name suffixes read with soundfile; everything else goes through ffmpeg."""

FFMPEG_FALLBACK_SUFFIXES = frozenset({".ogg", ".oga"})
"""Soundfile suffixes whose codecs (e.g. Opus in Ogg) an older libsndfile may lack: try ffmpeg.
A corrupt WAV or FLAC is not handed to ffmpeg, which might guess another format for it."""

LOOP_CACHE_MAX_S = 60.0
"""A looped file at most this long is decoded once and replayed from memory."""

_READ_SAMPLES = 1 << 20
"""At most this many samples (all channels) are read from soundfile at once."""
_INPUT_ARGS = ("-protocol_whitelist", "file")
"""ffmpeg and ffprobe read a file source through the file protocol only (a playlist in it
cannot make them fetch a URL)."""

_SHORTFALL_RE = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_EXPECTED = "an audio file (wav, flac, ogg through soundfile; mp3, m4a, opus, ... through ffmpeg)"
_PROBE_TIMEOUT_S = 30.0

PassReader = Callable[["_FileThread"], AsyncGenerator[Float32Array, None]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileProbe:
    """What opening a file found out, before any audio is decoded.

    Attributes:
        sample_rate_hz: The rate blocks will be delivered at.
        decoder: ``"soundfile"`` or ``"ffmpeg"``.
        duration_s: The audio the file holds (soundfile only; None through ffmpeg).
        announced_s: For a truncated file, the duration its header announces
            (longer than ``duration_s``); None when the file is whole or unknown.
    """

    sample_rate_hz: int
    decoder: str
    duration_s: float | None = None
    announced_s: float | None = None


def announced_duration_s(extra_info: str, duration_s: float) -> float | None:
    """The duration a truncated file's header announces, from libsndfile's log of the header.

    libsndfile plays a WAV or AIFF whose data chunk is shorter than its header says
    as far as it goes and notes ``data : <declared bytes> (should be <bytes present>)``.

    Returns:
        ``duration_s`` scaled by declared/present bytes, or None when nothing is missing.
    """
    match = _SHORTFALL_RE.search(extra_info)
    if match is None:
        return None
    declared, present = int(match[1]), int(match[2])
    if declared <= present:
        return None
    if present <= 0:
        return float("inf")
    return duration_s * declared / present


def ffprobe_for(ffmpeg: str) -> str:
    """The ffprobe next to ``ffmpeg`` (same directory, same naming)."""
    head, _, tail = ffmpeg.rpartition("ffmpeg")
    return f"{head}ffprobe{tail}" if _ else "ffprobe"


class FileSource:
    """Replay an audio file as mono float32 blocks.

    Args:
        source_id: Name of the source in messages.
        path: The file to read.
        options: Validated options: ``realtime`` (pace at wall-clock speed,
            default true), ``loop`` (restart at the end, continuing the
            stream clock), ``block_s``, ``sample_rate_hz`` (resample with
            ffmpeg; default: the file's own rate), ``ffmpeg``.
    """

    def __init__(
        self, source_id: str, path: str | os.PathLike[str], options: FileOptions
    ) -> None:
        self._source_id = source_id
        self._path = Path(path)
        self._options = options
        self.sample_rate_hz: int | None = options.sample_rate_hz
        """The delivered rate; known once ``blocks()`` has opened the file."""
        self.passes: int = 0
        """How many times the file has been read to its end."""
        self.decodes: int = 0
        """How many times the file was opened and decoded (a cached loop replays from memory)."""
        self.nonfinite_samples: int = 0
        """NaN or infinite samples replaced by silence so far."""
        self.clipped_samples: int = 0
        """Samples beyond full scale clipped to [-1, 1] so far."""

    @property
    def source_id(self) -> str:
        return self._source_id

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"FileSource({self._source_id!r}, {str(self._path)!r})"

    def _what(self) -> str:
        return f"file source {self._source_id}: {self._path}"

    def _check_file(self) -> None:
        """Refuse what is not a readable regular file, by ``os.stat`` (never by opening it)."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError as exc:
            raise SourceUnavailable(f"{self._what()} does not exist; expected {_EXPECTED}") from exc
        except OSError as exc:
            raise SourceUnavailable(
                f"{self._what()} cannot be accessed ({exc.strerror}); expected {_EXPECTED}"
            ) from exc
        if (kind := not_regular(st.st_mode)) is not None:
            raise self._not_regular(kind)
        if not os.access(self._path, os.R_OK):
            raise SourceUnavailable(f"{self._what()} is not readable; expected {_EXPECTED}")

    def _not_regular(self, kind: str) -> SourceFormatError:
        return SourceFormatError(f"{self._what()} is {as_found(self._path, kind)}, not a "
                                 f"regular file; expected {_EXPECTED}")

    def _open(self) -> _OpenFile:
        """Open the file for soundfile, refusing anything but a regular file (race-free:
        :func:`~streamcap.options.open_regular`)."""
        try:
            fd = open_regular(self._path, self._not_regular)
        except FileNotFoundError as exc:
            raise SourceUnavailable(f"{self._what()} does not exist; expected {_EXPECTED}") from exc
        except OSError as exc:
            raise SourceUnavailable(
                f"{self._what()} cannot be opened ({exc.strerror}); expected {_EXPECTED}"
            ) from exc
        try:
            return _OpenFile(sf.SoundFile(fd, closefd=False), fd)
        except BaseException:
            os.close(fd)
            raise

    def _soundfile_info(self) -> tuple[int, int, float, str]:
        """``(rate, frames, duration_s, extra_info)`` of the header; runs in the file thread."""
        self._check_file()
        with self._open() as opened:
            handle = opened.handle
            rate, frames = int(handle.samplerate), int(handle.frames)
            if handle.channels < 1:
                raise SourceFormatError(f"{self._what()} has no channels")
            self._check_rate(rate)
            return rate, frames, frames / rate, str(handle.extra_info)

    def _check_rate(self, rate: int) -> None:
        if not MIN_FILE_RATE_HZ <= rate <= MAX_FILE_RATE_HZ:
            raise SourceFormatError(
                f"{self._what()} has a sample rate of {rate} Hz; expected "
                f"{MIN_FILE_RATE_HZ} to {MAX_FILE_RATE_HZ} Hz"
            )

    async def probe(self) -> FileProbe:
        """Check that the file exists, is a readable regular file and is audio; choose its decoder.

        Decodes nothing (ffprobe reads the header of files soundfile cannot).
        Every blocking call runs in a thread of its own, off the event loop.

        Raises:
            SourceUnavailable: the file does not exist or cannot be read, or
                ffmpeg is needed and missing.
            SourceFormatError: the file exists but cannot be decoded, is not a
                regular file (a directory, FIFO, device or socket), or its
                sample rate is outside 1000-384000 Hz.
        """
        thread = _FileThread(f"streamcap[source:{self._source_id}].probe")
        try:
            return await self._probe(thread)
        finally:
            thread.shutdown()

    async def _probe(self, thread: _FileThread) -> FileProbe:
        await thread.run(self._check_file)
        soundfile_error = ""
        if self._path.suffix.lower() in SOUNDFILE_SUFFIXES:
            try:
                rate, frames, duration_s, extra = await thread.run(self._soundfile_info)
            except (sf.LibsndfileError, RuntimeError) as exc:
                soundfile_error = str(exc)
                if self._path.suffix.lower() not in FFMPEG_FALLBACK_SUFFIXES:
                    raise SourceFormatError(
                        f"{self._what()} cannot be decoded; expected a valid "
                        f"{self._path.suffix.lstrip('.').lower()} file ({soundfile_error})"
                    ) from exc
            else:
                if frames == 0:
                    raise SourceFormatError(f"{self._what()} holds no audio frames")
                announced = announced_duration_s(extra, duration_s)
                if self._options.sample_rate_hz in (None, rate):
                    return FileProbe(sample_rate_hz=rate, decoder="soundfile",
                                     duration_s=duration_s, announced_s=announced)
                rate = await self._probe_rate(soundfile_error)
                return FileProbe(sample_rate_hz=rate, decoder="ffmpeg",
                                 duration_s=duration_s, announced_s=announced)
        rate = await self._probe_rate(soundfile_error)
        return FileProbe(sample_rate_hz=rate, decoder="ffmpeg")

    def _ffmpeg_input(self) -> str:
        """The file as ffmpeg's input: an absolute ``file:`` URL, so that a name holding
        ``:`` or starting with ``-`` is never read as a protocol or an option."""
        return "file:" + str(self._path.absolute())

    async def _probe_rate(self, soundfile_error: str) -> int:
        """Ask ffprobe for the first audio stream's rate; the delivered rate is the option or it."""
        ffprobe = ffprobe_for(self._options.ffmpeg)
        args = [
            ffprobe, "-v", "error", *_INPUT_ARGS, "-select_streams", "a:0",
            "-show_entries", "stream=sample_rate", "-of", "csv=p=0", self._ffmpeg_input(),
        ]  # fmt: skip
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise SourceUnavailable(
                f"{self._what()} needs ffmpeg to decode, but {ffprobe!r} cannot be run ({exc})"
            ) from exc
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                out, err = await proc.communicate()
        except TimeoutError as exc:
            raise SourceFormatError(
                f"{self._what()}: ffprobe found no audio stream within {_PROBE_TIMEOUT_S:g} s; "
                f"expected {_EXPECTED}"
            ) from exc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        said = err.decode("utf-8", "replace").strip().splitlines()
        details = []
        if soundfile_error:
            details.append(f"soundfile: {soundfile_error}")
        if said:
            details.append(f"ffprobe: {' | '.join(line[:400] for line in said[-3:])}")
        detail = "; ".join(details)
        if proc.returncode != 0:
            raise SourceFormatError(
                f"{self._what()} cannot be decoded; expected {_EXPECTED} ({detail})"
            )
        fields = out.decode("ascii", "replace").split()
        if not fields or not fields[0].strip(",").isdigit() or len(fields[0]) > 12:
            raise SourceFormatError(
                f"{self._what()} has no audio stream; expected {_EXPECTED}"
                + (f" ({detail})" if detail else "")
            )
        native = int(fields[0].strip(","))
        self._check_rate(native)
        return self._options.sample_rate_hz or native

    async def _soundfile_pass(self, thread: _FileThread) -> AsyncGenerator[Float32Array, None]:
        self.decodes += 1
        n = self._block_samples()
        try:
            opened = await thread.run(self._open)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise SourceFormatError(f"{self._what()} cannot be decoded: {exc}") from exc
        try:
            while True:
                try:
                    mono = await thread.run(_read_mono, opened.handle, n)
                except (sf.LibsndfileError, RuntimeError) as exc:
                    raise SourceFormatError(f"{self._what()} is corrupt: {exc}") from exc
                if len(mono) == 0:
                    return
                yield mono
                if len(mono) < n:
                    return
        finally:
            # after any read still running (a cancelled one): the thread runs one call at a time
            thread.submit(opened.close)

    async def _ffmpeg_pass(self, thread: _FileThread) -> AsyncGenerator[Float32Array, None]:
        del thread  # ffmpeg reads the file in its own process
        rate = self.sample_rate_hz
        if rate is None:  # blocks() sets it before any pass runs
            raise SourceFormatError(f"{self._what()}: sample rate unknown")
        self.decodes += 1
        n = self._block_samples()
        args = decode_args(self._options.ffmpeg, _INPUT_ARGS, self._ffmpeg_input(), rate)
        pipe = await FfmpegPipe.start(
            args, what=f"file {self._path}", task_prefix=f"streamcap[source:{self._source_id}]"
        )
        try:
            while True:
                samples = await pipe.read(n)
                if len(samples):
                    yield samples
                if len(samples) < n:
                    code = await pipe.wait()
                    if code != 0:
                        raise SourceFormatError(
                            f"{self._what()} cannot be decoded; expected {_EXPECTED}: "
                            + pipe.failure_message(code)
                        )
                    return
        finally:
            await pipe.close()

    def _block_samples(self) -> int:
        return max(1, round((self.sample_rate_hz or 0) * self._options.block_s))

    async def blocks(self) -> AsyncGenerator[AudioBlock, None]:
        """Yield the file's audio as blocks of ``block_s`` (the last one may be shorter).

        ``start_sample`` runs on across loops; ``captured_at`` is the wall clock
        at the start plus the stream time of the block's first sample. A looped
        file of at most :data:`LOOP_CACHE_MAX_S` is replayed from memory in
        whole blocks across its end (a 1-sample file gives blocks of
        ``block_s`` like any other), paced like the first pass.

        Raises:
            SourceUnavailable: the file does not exist or cannot be read, or
                ffmpeg is needed and missing.
            SourceFormatError: the file exists but cannot be decoded, is not a
                regular file, has a sample rate out of range, or holds no audio.
        """
        probe = await self.probe()
        rate = probe.sample_rate_hz
        self.sample_rate_hz = rate
        n = self._block_samples()
        if probe.announced_s is not None and probe.duration_s is not None:
            _log.warning("file is truncated: its header announces more audio than it holds; "
                         "playing what is there", source=self._what(),
                         announced_s=round(probe.announced_s, 3),
                         holds_s=round(probe.duration_s, 3),
                         samples=round(probe.duration_s * rate), rate_hz=rate)
        checker = SampleCheck(self._what(), realtime=self._options.realtime)
        read_pass = self._soundfile_pass if probe.decoder == "soundfile" else self._ffmpeg_pass
        thread = _FileThread(f"streamcap[source:{self._source_id}].read")
        t0 = time.monotonic()
        wall0 = time.time()
        start_sample = 0
        try:
            async with contextlib.aclosing(
                self._chunks(read_pass, thread, checker, rate, n)
            ) as chunks:
                async for checked in chunks:
                    self.nonfinite_samples += checked.nonfinite
                    self.clipped_samples += checked.clipped
                    end = start_sample + len(checked.samples)
                    if self._options.realtime:
                        delay = t0 + end / rate - time.monotonic()
                        await asyncio.sleep(max(0.0, delay))
                    else:
                        await asyncio.sleep(0)
                    yield make_block(
                        source_id=self._source_id,
                        start_sample=start_sample,
                        sample_rate_hz=rate,
                        samples=checked.samples,
                        captured_at=wall0 + start_sample / rate,
                        nonfinite=checked.nonfinite,
                        clipped=checked.clipped,
                    )
                    start_sample = end
        finally:
            thread.shutdown()

    async def _chunks(
        self, read_pass: PassReader, thread: _FileThread, checker: SampleCheck, rate: int, n: int
    ) -> AsyncGenerator[CheckedSamples, None]:
        """The checked audio of every pass; a short looped file from memory after the first."""
        cache_limit = round(LOOP_CACHE_MAX_S * rate) if self._options.loop else 0
        while True:
            # the first pass of a looped file is kept while it is short enough
            caching: list[tuple[CheckedSamples, Float32Array]] | None = (
                [] if self.passes == 0 and cache_limit > 0 else None
            )
            delivered = 0
            async with contextlib.aclosing(_checked(read_pass(thread), checker, rate)) as decoded:
                async for checked, raw in decoded:
                    if caching is not None:
                        if delivered + len(raw) <= cache_limit:
                            caching.append((checked, raw))
                        else:
                            caching = None
                    delivered += len(checked.samples)
                    yield checked
            self.passes += 1
            if delivered == 0:
                raise SourceFormatError(f"{self._what()} decoded to no audio samples")
            if not self._options.loop:
                return
            if caching:
                clip = LoopClip.of(caching)
                del caching
                _log.debug("looping from memory", source=self._what(),
                           duration_s=round(delivered / rate, 3))
                while True:
                    checked, wraps = clip.take(n)
                    self.passes += wraps
                    yield checked
            _log.debug("looping", source=self._what(), passes=self.passes)


class LoopClip:
    """A short looped file held in memory, replayed in whole blocks across its end.

    Tiling keeps blocks at ``block_s`` however short the clip is: a 1-sample
    file is not replayed one sample per block (which would pin a core).
    The clip keeps where its first pass found NaN/inf or overs, so that
    every replay counts them again.
    """

    def __init__(self, samples: Float32Array, nonfinite: npt.NDArray[np.bool_] | None,
                 clipped: npt.NDArray[np.bool_] | None) -> None:
        if len(samples) == 0:
            raise ValueError("LoopClip: no samples")
        self.samples = samples
        self._nonfinite = nonfinite
        self._clipped = clipped
        self.position = 0
        """Where the next block starts in the clip."""

    @classmethod
    def of(cls, parts: list[tuple[CheckedSamples, Float32Array]]) -> LoopClip:
        """The clip of a first pass: its checked chunks, each with the raw samples read."""
        samples = np.concatenate([checked.samples for checked, _ in parts])
        nonfinite = clipped = None
        if any(checked.nonfinite for checked, _ in parts):
            nonfinite = np.concatenate([~np.isfinite(raw) for _, raw in parts])
        if any(checked.clipped for checked, _ in parts):
            with np.errstate(invalid="ignore"):
                clipped = np.concatenate([np.isfinite(raw) & (np.abs(raw) > FULL_SCALE)
                                          for _, raw in parts])
        return cls(samples, nonfinite, clipped)

    def take(self, n: int) -> tuple[CheckedSamples, int]:
        """The next ``n`` samples (wrapping around the end) and how many ends were crossed."""
        length = len(self.samples)
        index = (self.position + np.arange(n)) % length
        wraps = (self.position + n) // length
        self.position = (self.position + n) % length
        nonfinite = 0 if self._nonfinite is None else int(np.count_nonzero(self._nonfinite[index]))
        clipped = 0 if self._clipped is None else int(np.count_nonzero(self._clipped[index]))
        return CheckedSamples(self.samples[index], nonfinite, clipped), wraps


class _OpenFile:
    """A soundfile handle on a descriptor streamcap opened (and closes)."""

    def __init__(self, handle: sf.SoundFile, fd: int) -> None:
        self.handle = handle
        self._fd: int | None = fd

    def close(self) -> None:
        """Close the handle and the descriptor; safe to call more than once."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.handle.close()
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FileThread:
    """One thread for a source's blocking file calls, so that the event loop never waits on them.

    Calls run one at a time in the order given: closing a handle after a
    cancelled read runs once that read is over, never during it. A call
    cancelled by its caller still finishes in the thread (a read of a regular
    file always ends); nothing ever waits for the thread.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def submit(self, fn: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # already shut down
            self._pool.submit(fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


def _read_mono(handle: sf.SoundFile, n: int) -> Float32Array:
    """Read up to ``n`` frames as mono; at most :data:`_READ_SAMPLES` samples per read.

    A header may claim any channel count libsndfile accepts: reading ``n``
    frames of them at once could allocate gigabytes; reading in pieces bounds
    the memory by the block, whatever the channels.
    """
    step = max(1, _READ_SAMPLES // max(1, handle.channels))
    parts: list[Float32Array] = []
    got = 0
    while got < n:
        want = min(step, n - got)
        data = handle.read(want, dtype="float32", always_2d=True)
        if len(data):
            parts.append(downmix(data))
            got += len(data)
        if len(data) < want:
            break
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


async def _checked(
    chunks: AsyncGenerator[Float32Array, None], checker: SampleCheck, rate: int
) -> AsyncGenerator[tuple[CheckedSamples, Float32Array], None]:
    """One decoded pass through ``checker``: each chunk checked, with the raw samples read."""
    position = 0
    async with contextlib.aclosing(chunks):
        async for raw in chunks:
            checked = checker.check(raw, position_s=position / rate, sample_rate_hz=rate)
            position += len(raw)
            yield checked, raw


def create_source(source_id: str, uri: str, options: Mapping[str, object]) -> FileSource:
    """Plugin entry point ``file``: build a file source from ``file:<path>[?options]``.

    Raises:
        ConfigError: ``uri`` is not a ``file:`` URI, or an option is unknown or invalid.
    """
    kind, target, params = parse_source_uri(uri)
    if kind != "file":
        raise ConfigError(f"source {source_id!r}: uri {uri!r} is a {kind} source, not file:<path>")
    return FileSource(source_id, target, read_source_options(FileOptions, options, params))
