"""Audio files as a source: replayed in real time (like a live input) or as fast as possible.

WAV, FLAC, OGG, AIFF and AU files are streamed block by block through
soundfile; every other format (mp3, m4a, opus, ...) and any file that must be
resampled is decoded by an ffmpeg child writing float32 mono to a pipe.
Nothing reads the whole file into memory.

Error classes: a missing or unreadable file is :class:`SourceUnavailable`
(it may appear later); a file that exists but cannot be decoded is
:class:`SourceFormatError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path

import numpy as np
import soundfile as sf

from streamcap.errors import ConfigError, SourceFormatError, SourceUnavailable
from streamcap.messages import AudioBlock, Float32Array, make_block
from streamcap.sources.base import SourceOptions, parse_source_options, parse_source_uri
from streamcap.sources.ffmpeg import FfmpegPipe, decode_args

_LOGGER = logging.getLogger(__name__)

SOUNDFILE_SUFFIXES = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".au"})
"""File name suffixes read with soundfile; everything else goes through ffmpeg."""

FFMPEG_FALLBACK_SUFFIXES = frozenset({".ogg", ".oga"})
"""Soundfile suffixes whose codecs (e.g. Opus in Ogg) an older libsndfile may lack: try ffmpeg.
A corrupt WAV or FLAC is not handed to ffmpeg, which might guess another format for it."""

_EXPECTED = "an audio file (wav, flac, ogg through soundfile; mp3, m4a, opus, ... through ffmpeg)"
_PROBE_TIMEOUT_S = 30.0

PassReader = Callable[[], AsyncGenerator[Float32Array, None]]


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
        self, source_id: str, path: str | os.PathLike[str], options: SourceOptions
    ) -> None:
        self._source_id = source_id
        self._path = Path(path)
        self._options = options
        self.sample_rate_hz: int | None = options.sample_rate_hz
        """The delivered rate; known once ``blocks()`` has opened the file."""
        self.passes: int = 0
        """How many times the file has been read to its end."""

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

    async def _open(self) -> tuple[int, PassReader]:
        """Choose a decoder and find the delivered rate; raise the right error if impossible."""
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
                if self._options.sample_rate_hz in (None, rate):
                    return rate, self._soundfile_pass
        rate = await self._probe_rate(soundfile_error)
        return rate, self._ffmpeg_pass

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
        if rate is None:  # _open sets it before any pass runs
            raise SourceFormatError(f"{self._what()}: sample rate unknown")
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
        rate, read_pass = await self._open()
        self.sample_rate_hz = rate
        t0 = time.monotonic()
        wall0 = time.time()
        start_sample = 0
        while True:
            delivered = 0
            async with contextlib.aclosing(read_pass()) as chunks:
                async for samples in chunks:
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
                    )
                    start_sample = end
                    delivered += len(samples)
            self.passes += 1
            if delivered == 0:
                raise SourceFormatError(f"{self._what()} decoded to no audio samples")
            if not self._options.loop:
                return
            _LOGGER.debug("%s: looping after pass %d", self._what(), self.passes)


def create_source(source_id: str, uri: str, options: Mapping[str, object]) -> FileSource:
    """Plugin entry point ``file``: build a file source from ``file:<path>[?options]``.

    Raises:
        ConfigError: ``uri`` is not a ``file:`` URI, or an option is unknown or invalid.
    """
    kind, target, params = parse_source_uri(uri)
    if kind != "file":
        raise ConfigError(f"source {source_id!r}: uri {uri!r} is a {kind} source, not file:<path>")
    return FileSource(source_id, target, parse_source_options("file", options, params))
