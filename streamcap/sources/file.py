"""Audio files as a source: replayed in real time (like a live input) or as fast as possible.

WAV, FLAC, OGG, AIFF and AU files are streamed block by block through
soundfile; every other format (mp3, m4a, opus, ...) and any file that must be
resampled is decoded by an ffmpeg child writing float32 mono to a pipe.
Nothing reads a whole long file into memory; a looped file of at most
:data:`LOOP_CACHE_MAX_S` is decoded once and replayed from memory, so that a
short clip does not restart ffmpeg (or reopen the file) every few tenths of a
second.

Every block passes :class:`~streamcap.sources.base.SampleCheck`: NaN and
infinite samples become silence (counted and warned about), and a real-time
file that cannot keep up is reported. A WAV or AIFF file whose header
announces more audio than the file holds (truncated) is played as far as it
goes, with a warning.

Error classes: a missing or unreadable file is :class:`SourceUnavailable`
(it may appear later); a file that exists but cannot be decoded is
:class:`SourceFormatError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from streamcap.errors import ConfigError, SourceFormatError, SourceUnavailable
from streamcap.logs import get_logger
from streamcap.messages import AudioBlock, Float32Array, make_block
from streamcap.sources.base import (
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

_SHORTFALL_RE = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_EXPECTED = "an audio file (wav, flac, ogg through soundfile; mp3, m4a, opus, ... through ffmpeg)"
_PROBE_TIMEOUT_S = 30.0

PassReader = Callable[[], AsyncGenerator[Float32Array, None]]


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
        try:
            st = self._path.stat()
        except FileNotFoundError as exc:
            raise SourceUnavailable(f"{self._what()} does not exist; expected {_EXPECTED}") from exc
        except OSError as exc:
            raise SourceUnavailable(
                f"{self._what()} cannot be accessed ({exc.strerror}); expected {_EXPECTED}"
            ) from exc
        if stat.S_ISDIR(st.st_mode):
            raise SourceFormatError(f"{self._what()} is a directory; expected {_EXPECTED}")
        if not os.access(self._path, os.R_OK):
            raise SourceUnavailable(f"{self._what()} is not readable; expected {_EXPECTED}")

    async def probe(self) -> FileProbe:
        """Check that the file exists, is readable and is audio; choose its decoder.

        Decodes nothing (ffprobe reads the header of files soundfile cannot).

        Raises:
            SourceUnavailable: the file does not exist or cannot be read, or
                ffmpeg is needed and missing.
            SourceFormatError: the file exists but cannot be decoded.
        """
        self._check_file()
        soundfile_error = ""
        if self._path.suffix.lower() in SOUNDFILE_SUFFIXES:
            try:
                info = sf.info(str(self._path))
            except (sf.LibsndfileError, RuntimeError) as exc:
                soundfile_error = str(exc)
                if self._path.suffix.lower() not in FFMPEG_FALLBACK_SUFFIXES:
                    raise SourceFormatError(
                        f"{self._what()} cannot be decoded; expected a valid "
                        f"{self._path.suffix.lstrip('.').lower()} file ({soundfile_error})"
                    ) from exc
            else:
                rate = int(info.samplerate)
                if info.frames == 0:
                    raise SourceFormatError(f"{self._what()} holds no audio frames")
                duration_s = info.frames / rate
                announced = announced_duration_s(str(info.extra_info), duration_s)
                if self._options.sample_rate_hz in (None, rate):
                    return FileProbe(sample_rate_hz=rate, decoder="soundfile",
                                     duration_s=duration_s, announced_s=announced)
                rate = await self._probe_rate(soundfile_error)
                return FileProbe(sample_rate_hz=rate, decoder="ffmpeg",
                                 duration_s=duration_s, announced_s=announced)
        rate = await self._probe_rate(soundfile_error)
        return FileProbe(sample_rate_hz=rate, decoder="ffmpeg")

    async def _probe_rate(self, soundfile_error: str) -> int:
        """Ask ffprobe for the first audio stream's rate; the delivered rate is the option or it."""
        ffprobe = ffprobe_for(self._options.ffmpeg)
        args = [
            ffprobe, "-v", "error", "-select_streams", "a:0",
            "-show_entries", "stream=sample_rate", "-of", "csv=p=0", str(self._path),
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
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        said = err.decode("utf-8", "replace").strip().splitlines()
        details = []
        if soundfile_error:
            details.append(f"soundfile: {soundfile_error}")
        if said:
            details.append(f"ffprobe: {' | '.join(said[-3:])}")
        detail = "; ".join(details)
        if proc.returncode != 0:
            raise SourceFormatError(
                f"{self._what()} cannot be decoded; expected {_EXPECTED} ({detail})"
            )
        fields = out.decode("ascii", "replace").split()
        if not fields or not fields[0].strip(",").isdigit():
            raise SourceFormatError(
                f"{self._what()} has no audio stream; expected {_EXPECTED}"
                + (f" ({detail})" if detail else "")
            )
        native = int(fields[0].strip(","))
        return self._options.sample_rate_hz or native

    async def _soundfile_pass(self) -> AsyncGenerator[Float32Array, None]:
        self.decodes += 1
        n = self._block_samples()
        try:
            handle = sf.SoundFile(str(self._path))
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise SourceFormatError(f"{self._what()} cannot be decoded: {exc}") from exc
        with handle:
            while True:
                try:
                    data = handle.read(n, dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError) as exc:
                    raise SourceFormatError(f"{self._what()} is corrupt: {exc}") from exc
                if len(data) == 0:
                    return
                mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
                yield np.ascontiguousarray(mono, dtype=np.float32)
                if len(data) < n:
                    return

    async def _ffmpeg_pass(self) -> AsyncGenerator[Float32Array, None]:
        rate = self.sample_rate_hz
        if rate is None:  # blocks() sets it before any pass runs
            raise SourceFormatError(f"{self._what()}: sample rate unknown")
        self.decodes += 1
        n = self._block_samples()
        args = decode_args(self._options.ffmpeg, [], str(self._path), rate)
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
        at the start plus the stream time of the block's first sample.

        Raises:
            SourceUnavailable: the file does not exist or cannot be read, or
                ffmpeg is needed and missing.
            SourceFormatError: the file exists but cannot be decoded.
        """
        probe = await self.probe()
        rate = probe.sample_rate_hz
        self.sample_rate_hz = rate
        read_pass = self._soundfile_pass if probe.decoder == "soundfile" else self._ffmpeg_pass
        if probe.announced_s is not None and probe.duration_s is not None:
            _log.warning("file is truncated: its header announces more audio than it holds; "
                         "playing what is there", source=self._what(),
                         announced_s=round(probe.announced_s, 3),
                         holds_s=round(probe.duration_s, 3),
                         samples=round(probe.duration_s * rate), rate_hz=rate)
        checker = SampleCheck(self._what(), realtime=self._options.realtime)
        cache_limit = round(LOOP_CACHE_MAX_S * rate) if self._options.loop else -1
        cache: list[tuple[Float32Array, int]] | None = None
        t0 = time.monotonic()
        wall0 = time.time()
        start_sample = 0
        while True:
            delivered = 0
            # the first pass of a looped file is kept while it is short enough
            caching: list[tuple[Float32Array, int]] | None = [] if start_sample == 0 else None
            async with contextlib.aclosing(
                _replay(cache) if cache is not None else _checked(read_pass(), checker, rate)
            ) as chunks:
                async for samples, nonfinite in chunks:
                    self.nonfinite_samples += nonfinite
                    if caching is not None:
                        if delivered + len(samples) <= cache_limit:
                            caching.append((samples, nonfinite))
                        else:
                            caching = None
                    end = start_sample + len(samples)
                    if self._options.realtime:
                        delay = t0 + end / rate - time.monotonic()
                        await asyncio.sleep(max(0.0, delay))
                    else:
                        await asyncio.sleep(0)
                    yield make_block(
                        source_id=self._source_id,
                        start_sample=start_sample,
                        sample_rate_hz=rate,
                        samples=samples,
                        captured_at=wall0 + start_sample / rate,
                        nonfinite=nonfinite,
                    )
                    start_sample = end
                    delivered += len(samples)
            self.passes += 1
            if delivered == 0:
                raise SourceFormatError(f"{self._what()} decoded to no audio samples")
            if not self._options.loop:
                return
            if caching:
                cache = caching
                _log.debug("looping from memory", source=self._what(),
                           duration_s=round(delivered / rate, 3))
            _log.debug("looping", source=self._what(), passes=self.passes)


async def _checked(
    chunks: AsyncGenerator[Float32Array, None], checker: SampleCheck, rate: int
) -> AsyncGenerator[tuple[Float32Array, int], None]:
    """One decoded pass through ``checker``: ``(clean samples, non-finite count)`` per chunk."""
    position = 0
    async with contextlib.aclosing(chunks):
        async for raw in chunks:
            clean, count = checker.check(raw, position_s=position / rate, sample_rate_hz=rate)
            position += len(raw)
            yield clean, count


async def _replay(
    cache: list[tuple[Float32Array, int]],
) -> AsyncGenerator[tuple[Float32Array, int], None]:
    """A pass decoded earlier, from memory."""
    for item in cache:
        yield item


def create_source(source_id: str, uri: str, options: Mapping[str, object]) -> FileSource:
    """Plugin entry point ``file``: build a file source from ``file:<path>[?options]``.

    Raises:
        ConfigError: ``uri`` is not a ``file:`` URI, or an option is unknown or invalid.
    """
    kind, target, params = parse_source_uri(uri)
    if kind != "file":
        raise ConfigError(f"source {source_id!r}: uri {uri!r} is a {kind} source, not file:<path>")
    return FileSource(source_id, target, read_source_options(FileOptions, options, params))
