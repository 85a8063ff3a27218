"""Network audio streams (RTSP, RTMP, HTTP/HLS, UDP, TCP, SRT) decoded by an ffmpeg child.

ffmpeg writes float32 mono PCM at the capture rate to a pipe; the source
reads it in blocks. A live stream has no normal end: any exit of ffmpeg is
reported as :class:`~streamcap.errors.SourceUnavailable` carrying the exit
status and ffmpeg's last stderr lines, and the supervisor decides whether to
retry. An ffmpeg that stays alive but sends nothing is left to the
supervisor's stall timeout.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping

from streamcap.errors import ConfigError, SourceFormatError, SourceUnavailable
from streamcap.messages import AudioBlock, make_block
from streamcap.redact import redact, url_secrets
from streamcap.sources.base import (
    DEFAULT_STREAM_RATE_HZ,
    SampleCheck,
    StreamOptions,
    parse_source_uri,
    read_source_options,
)
from streamcap.sources.ffmpeg import FfmpegPipe, decode_args

IO_TIMEOUT_S = 15.0
"""ffmpeg gives up on a connection that transfers nothing for this long."""

# Messages of ffmpeg that no retry will change.
_PERMANENT_MARKERS = ("Protocol not found", "Unknown input format")


def input_args(url: str, options: StreamOptions) -> list[str]:
    """ffmpeg input options suited to ``url``'s protocol (before ``-i``)."""
    scheme = url.partition(":")[0].lower()
    args = [
        "-rw_timeout",
        str(int(IO_TIMEOUT_S * 1e6)),
        "-analyzeduration",
        str(int(options.probe_s * 1e6)),
        "-fflags",
        "nobuffer",
    ]
    if scheme in ("http", "https"):
        args += ["-reconnect", "1", "-reconnect_streamed", "1", "-reconnect_delay_max", "2"]
    elif scheme in ("rtsp", "rtsps"):
        args += ["-rtsp_transport", "tcp"]
    return args


class FfmpegStreamSource:
    """Decode a network stream with ffmpeg into mono float32 blocks.

    Args:
        source_id: Name of the source in messages.
        url: Stream URL handed to ffmpeg (may carry credentials; never logged as is).
        options: Validated options; ``sample_rate_hz`` defaults to 48000.
    """

    def __init__(self, source_id: str, url: str, options: StreamOptions) -> None:
        self._source_id = source_id
        self._url = url
        self._options = options
        self.sample_rate_hz: int = options.sample_rate_hz or DEFAULT_STREAM_RATE_HZ
        self.block_samples: int = max(1, round(self.sample_rate_hz * options.block_s))
        self.pid: int | None = None
        """Process id of the running ffmpeg (``None`` when none runs); for diagnostics."""

    @property
    def source_id(self) -> str:
        return self._source_id

    @property
    def url(self) -> str:
        """The stream URL with credentials replaced by ``***``."""
        return redact(self._url)

    def __repr__(self) -> str:
        return f"FfmpegStreamSource({self._source_id!r}, {self.url!r})"

    async def blocks(self) -> AsyncGenerator[AudioBlock, None]:
        """Yield blocks of ``block_s`` seconds until ffmpeg exits.

        Raises:
            SourceUnavailable: ffmpeg exited (refused connection, stream ended,
                timeout ...) or cannot be started; the message holds the
                redacted URL, the exit status and ffmpeg's last stderr lines.
            SourceFormatError: ffmpeg reported an error no retry can fix
                (unknown protocol or format).
        """
        what = f"stream {self.url}"
        args = decode_args(
            self._options.ffmpeg,
            input_args(self._url, self._options),
            self._url,
            self.sample_rate_hz,
        )
        pipe = await FfmpegPipe.start(
            args,
            what=what,
            task_prefix=f"streamcap[source:{self._source_id}]",
            secrets=url_secrets(self._url),
        )
        self.pid = pipe.pid
        start_sample = 0
        checker = SampleCheck(f"source {self._source_id}: {what}")
        try:
            while True:
                samples = await pipe.read(self.block_samples)
                if len(samples):
                    now = time.time()
                    checked = checker.check(
                        samples,
                        position_s=start_sample / self.sample_rate_hz,
                        sample_rate_hz=self.sample_rate_hz,
                    )
                    yield make_block(
                        source_id=self._source_id,
                        start_sample=start_sample,
                        sample_rate_hz=self.sample_rate_hz,
                        samples=checked.samples,
                        captured_at=now - len(samples) / self.sample_rate_hz,
                        nonfinite=checked.nonfinite,
                        clipped=checked.clipped,
                    )
                    start_sample += len(samples)
                if len(samples) < self.block_samples:
                    code = await pipe.wait()
                    message = f"source {self._source_id}: " + pipe.failure_message(code)
                    if code != 0 and any(m in pipe.stderr_tail() for m in _PERMANENT_MARKERS):
                        raise SourceFormatError(message)
                    if code == 0:
                        message += " (a live stream should not end)"
                    raise SourceUnavailable(message)
        finally:
            self.pid = None
            await pipe.close()


def create_source(source_id: str, uri: str, options: Mapping[str, object]) -> FfmpegStreamSource:
    """Plugin entry point ``stream``: build a stream source for a network URL.

    Raises:
        ConfigError: ``uri`` is not a stream URL, or an option is unknown or invalid.
    """
    kind, target, params = parse_source_uri(uri)
    if kind != "stream":
        raise ConfigError(
            f"source {source_id!r}: uri {redact(uri)!r} is a {kind} source, "
            "not a network stream URL"
        )
    return FfmpegStreamSource(source_id, target, read_source_options(StreamOptions, options, params))
