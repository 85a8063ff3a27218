"""What every audio source shares: the protocol, URI parsing, options.

A source is anything with a ``source_id`` and a ``blocks()`` async generator
yielding mono float32 :class:`~streamcap.messages.AudioBlock` objects. It
raises :class:`~streamcap.errors.SourceUnavailable` when the input cannot be
opened or is lost (retrying may help), :class:`~streamcap.errors.SourceFormatError`
when the input is reached but cannot be decoded (retrying will not help), and
returns normally at the end of finite input.

Source URIs::

    mic:default            the default input device
    mic:3                  input device number 3 (see ``streamcap devices``)
    mic:USB Audio          the first input device whose name contains "USB Audio"
    file:/path/x.wav?loop=true&realtime=false
    file:///path/x.mp3     the same, in URL form (percent-decoded)
    rtsp:// rtmp:// http:// https:// udp:// tcp:// srt://   network streams (ffmpeg)
    hls+http:// hls+https://                                 HLS playlists (ffmpeg)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, unquote

import numpy as np
import structlog

from streamcap.audio.dsp import clip_full_scale, zero_nonfinite
from streamcap.clock import Clock, SystemClock
from streamcap.errors import ConfigError
from streamcap.logs import Throttle, get_logger
from streamcap.messages import AudioBlock, Float32Array
from streamcap.options import option, read_options, shown
from streamcap.redact import redact

STREAM_SCHEMES: frozenset[str] = frozenset(
    {
        "rtsp",
        "rtsps",
        "rtmp",
        "rtmps",
        "http",
        "https",
        "udp",
        "tcp",
        "srt",
        "hls+http",
        "hls+https",
    }
)
"""URI schemes handled by the ffmpeg stream source."""

ACCEPTED_FORMS = (
    "mic:default, mic:<index>, mic:<device name part>, file:<path>[?loop=true&realtime=false], "
    "or a stream URL (" + ", ".join(f"{s}://" for s in sorted(STREAM_SCHEMES)) + ")"
)

DEFAULT_BLOCK_S = 0.1
DEFAULT_STREAM_RATE_HZ = 48000

# The ranges of the capture options (declared once, below: SOURCE_OPTIONS).
MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 192000
MAX_CHANNELS = 64
MIN_BLOCK_S = 0.005
MAX_BLOCK_S = 2.0
MAX_PROBE_S = 60.0
MIN_FILE_RATE_HZ = 1000
"""The lowest native rate of an audio file that is read (a header claiming 1 Hz is refused)."""
MAX_FILE_RATE_HZ = 384000
"""The highest native rate of an audio file that is read."""

_log = get_logger(__name__)

NONFINITE_WARN_INTERVAL_S = 10.0
"""At most one warning about NaN or infinite samples, and one about samples beyond full
scale, per source this often (the rest are counted)."""
SLOW_LAG_S = 2.0
"""A real-time source whose audio falls this far behind the wall clock is reported as slow."""
SLOW_WARN_INTERVAL_S = 60.0
"""At most one slower-than-real-time warning per source this often."""


@runtime_checkable
class AudioSource(Protocol):
    """An audio input delivering mono float32 blocks on its own stream clock."""

    @property
    def source_id(self) -> str:
        """The configured name of this source, as used in every message."""
        ...

    def blocks(self) -> AsyncIterator[AudioBlock]:
        """Yield blocks until the input ends; raise ``SourceError`` subclasses on failure.

        Each block's ``samples`` are float32 of shape (n,); ``start_sample``
        counts samples since this call began (0 for the first block) and
        ``captured_at`` is the wall clock of the block's first sample.
        """
        ...


class SourceFactory(Protocol):
    """The signature of every ``create_source`` plugin entry point."""

    def __call__(self, source_id: str, uri: str, options: Mapping[str, object]) -> AudioSource: ...


@dataclass(frozen=True, slots=True)
class CheckedSamples:
    """Samples as they enter streamcap, after :meth:`SampleCheck.check`.

    Attributes:
        samples: float32 (n,), finite and within [-1, 1].
        nonfinite: NaN or infinite samples replaced by silence.
        clipped: Finite samples beyond full scale clipped to -1 or 1.
    """

    samples: Float32Array
    nonfinite: int = 0
    clipped: int = 0


_NONFINITE: Final = "replaced"
_CLIPPED: Final = "clipped"
_REPAIR_EVENTS: Final = {_NONFINITE: "NaN or infinite samples replaced by silence",
                         _CLIPPED: "samples beyond full scale clipped to [-1, 1]"}
"""The warning of each kind of repaired sample, by the field holding its count."""


class SampleCheck:
    """What every built-in source does to its samples as they enter streamcap.

    * NaN and infinite samples (a broken float file, a misbehaving driver or
      decoder) are replaced by silence and counted: :attr:`nonfinite_total`,
      and per block in ``AudioBlock.nonfinite`` for the
      ``streamcap_nonfinite_samples_total`` metric.
    * Finite samples beyond full scale (|x| > 1: a float file holding 1e30,
      which would overflow the models into NaN) are clipped to -1 or 1 and
      counted: :attr:`clipped_total`, and per block in ``AudioBlock.clipped``
      for the ``streamcap_clipped_samples_total`` metric. Integer PCM never
      clips; a float file with overs loses only their excess.
    * Either kind is logged the first time with its position, later at most
      once per ``warn_interval_s`` with the count since the last warning, so
      a stream of them cannot flood the log. Nothing downstream ever sees a
      non-finite sample or one beyond full scale.
    * For a source that should deliver in real time (``realtime=True``):
      when its audio falls more than ``lag_s`` behind the wall clock since
      its first block, a warning says how far (at most once per
      ``slow_interval_s``).

    Args:
        what: Names the source in warnings (``"file source a: /x.wav"``).
        realtime: Watch the delivery pace.
        clock: Where time is read (tests inject a fake one).
        logger: Where warnings go.
    """

    def __init__(
        self,
        what: str,
        *,
        realtime: bool = True,
        clock: Clock | None = None,
        logger: structlog.stdlib.BoundLogger = _log,
        warn_interval_s: float = NONFINITE_WARN_INTERVAL_S,
        lag_s: float = SLOW_LAG_S,
        slow_interval_s: float = SLOW_WARN_INTERVAL_S,
    ) -> None:
        self.what = what
        self.realtime = realtime
        self._clock = clock or SystemClock()
        self._log = logger
        self._lag_s = lag_s
        self._warn_interval_s = warn_interval_s
        self._repair_log = Throttle(warn_interval_s, clock=self._clock)
        self._slow_log = Throttle(slow_interval_s, clock=self._clock)
        self._totals = {_NONFINITE: 0, _CLIPPED: 0}
        self._unreported = {_NONFINITE: 0, _CLIPPED: 0}  # since the last warning
        self._first_at: float | None = None
        self._audio_s = 0.0  # audio delivered after the first block
        self.slow_warnings = 0
        """Slower-than-real-time warnings logged so far."""

    @property
    def nonfinite_total(self) -> int:
        """Non-finite samples replaced by silence so far."""
        return self._totals[_NONFINITE]

    @property
    def clipped_total(self) -> int:
        """Samples beyond full scale clipped so far."""
        return self._totals[_CLIPPED]

    def check(
        self, samples: Float32Array, *, position_s: float, sample_rate_hz: int
    ) -> CheckedSamples:
        """Return the samples with NaN/inf zeroed and overs clipped, and both counts.

        Args:
            samples: float32 mono samples just read; never modified.
            position_s: Where ``samples[0]`` lies in the input, for the
                warning (seconds into the file, or since the stream opened).
            sample_rate_hz: Their rate.
        """
        clean, nonfinite, first_bad = zero_nonfinite(np.asarray(samples, dtype=np.float32))
        clean, clipped, first_over = clip_full_scale(clean)
        now = self._clock.monotonic()
        if nonfinite:
            self._repaired(_NONFINITE, nonfinite, position_s + first_bad / sample_rate_hz)
        if clipped:
            self._repaired(_CLIPPED, clipped, position_s + first_over / sample_rate_hz)
        if self.realtime and len(clean):
            self._pace(len(clean) / sample_rate_hz, now)
        return CheckedSamples(clean, nonfinite, clipped)

    def _repaired(self, field: str, count: int, at_s: float) -> None:
        """Count ``count`` repaired samples; warn at most once per ``warn_interval_s``,
        with the number repaired since the last warning as ``field``."""
        self._totals[field] += count
        self._unreported[field] += count
        if self._repair_log.allow(field) is None:
            return
        fields: dict[str, object] = {field: self._unreported[field]}
        self._log.warning(_REPAIR_EVENTS[field], source=self.what, first_at_s=round(at_s, 3),
                          total=self._totals[field], warn_interval_s=self._warn_interval_s,
                          **fields)
        self._unreported[field] = 0

    def _pace(self, duration_s: float, now: float) -> None:
        if self._first_at is None:
            self._first_at = now
            return
        self._audio_s += duration_s
        elapsed = now - self._first_at
        if elapsed - self._audio_s <= self._lag_s:
            return
        if self._slow_log.allow() is None:
            return
        self.slow_warnings += 1
        self._log.warning(
            "source delivers audio slower than real time; captions will fall behind",
            source=self.what, audio_s=round(self._audio_s, 1), elapsed_s=round(elapsed, 1),
            speed=round(self._audio_s / elapsed, 2),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceOptions:
    """The capture options every built-in source takes, validated.

    One declaration per source kind (:data:`SOURCE_OPTIONS`) is read from a
    ``[sources.<name>]`` table, from a ``file:`` URI's query and by the
    source's ``create_source``, so the three agree on keys and ranges.

    Attributes:
        sample_rate_hz: Capture rate; ``None`` (0 in a table or URI) means
            the device default, the file's native rate, or 48000 Hz for streams.
        block_s: Duration of each yielded block in seconds.
    """

    sample_rate_hz: int | None = option(
        None, min=MIN_SAMPLE_RATE_HZ, max=MAX_SAMPLE_RATE_HZ, null=0,
        help="capture rate in Hz; 0 = the device's or file's own rate (streams: 48000)")
    block_s: float = option(DEFAULT_BLOCK_S, min=MIN_BLOCK_S, max=MAX_BLOCK_S,
                            help="duration of each block read from the source, in seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class MicOptions(SourceOptions):
    """The options of a ``mic:`` source.

    Attributes:
        channels: Channels captured before the downmix to mono; ``None`` (0)
            means min(2, the device's maximum).
    """

    channels: int | None = option(None, min=1, max=MAX_CHANNELS, null=0,
                                  help="channels captured before the downmix to mono")


def _program(value: str) -> str | None:
    return None if value.strip() else "expected a program name or path"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileOptions(SourceOptions):
    """The options of a ``file:`` source.

    Attributes:
        realtime: Pace blocks at wall-clock speed.
        loop: Restart at the end, continuing the stream clock.
        ffmpeg: The ffmpeg executable that decodes what soundfile cannot.
    """

    realtime: bool = option(True, help="deliver at wall-clock speed")
    loop: bool = option(False, help="start again at the end")
    ffmpeg: str = option("ffmpeg", check=_program, help="the ffmpeg executable")


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOptions(SourceOptions):
    """The options of a network stream source.

    Attributes:
        probe_s: How long ffmpeg may analyse the input before it starts decoding.
        ffmpeg: The ffmpeg executable to run.
    """

    probe_s: float = option(1.0, above=0, max=MAX_PROBE_S,
                            help="how long ffmpeg may analyse the input, in seconds")
    ffmpeg: str = option("ffmpeg", check=_program, help="the ffmpeg executable")


S = TypeVar("S", bound=SourceOptions)

SOURCE_OPTIONS: Final[Mapping[str, type[SourceOptions]]] = {
    "mic": MicOptions,
    "file": FileOptions,
    "stream": StreamOptions,
}
"""The options type of each source kind: the one declaration of its keys."""


def parse_source_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """Split a source URI into ``(kind, target, params)``.

    Args:
        uri: One of the forms listed in this module's docstring.

    Returns:
        ``kind`` is ``"mic"``, ``"file"`` or ``"stream"``. ``target`` is the
        device selector (``"default"``, an index or a name part), the file
        path, or the URL to hand to ffmpeg (``hls+`` prefix removed).
        ``params`` are the query parameters of a ``file:`` URI (options),
        empty otherwise: a stream URL's query belongs to the server.

    Raises:
        ConfigError: the scheme is unknown or the target is empty.
    """
    scheme, sep, rest = uri.partition(":")
    scheme_l = scheme.strip().lower()
    if not sep:
        raise ConfigError(f"source uri {uri!r} has no scheme; expected {ACCEPTED_FORMS}")
    if scheme_l == "mic":
        target = rest.strip()
        if not target:
            raise ConfigError(f"source uri {uri!r} names no device; expected {ACCEPTED_FORMS}")
        return "mic", target, {}
    if scheme_l == "file":
        path, _, query = rest.partition("?")
        if path.startswith("//"):
            # file:///abs/path or file://localhost/abs/path
            host_and_path = path[2:]
            host, slash, tail = host_and_path.partition("/")
            if host not in ("", "localhost"):
                raise ConfigError(
                    f"source uri {redact(uri)!r} names host {host!r}; file: URIs must be local"
                )
            path = unquote(slash + tail)
        if not path:
            raise ConfigError(f"source uri {uri!r} names no file; expected {ACCEPTED_FORMS}")
        params = dict(parse_qsl(query, keep_blank_values=True))
        return "file", path, params
    if scheme_l in STREAM_SCHEMES:
        if not rest.startswith("//") or len(rest) <= 2:
            raise ConfigError(
                f"source uri {redact(uri)!r} is not a URL; expected {scheme_l}://host..."
            )
        target = uri.strip()
        if scheme_l.startswith("hls+"):
            target = target[len("hls+") :]
        return "stream", target, {}
    raise ConfigError(
        f"source uri {redact(uri)!r} has unknown scheme {scheme!r}; expected {ACCEPTED_FORMS}"
    )


def parse_source_options(
    kind: str,
    options: Mapping[str, object],
    uri_params: Mapping[str, str] | None = None,
) -> SourceOptions:
    """Validate a source's options (from config and from the URI query) for ``kind``.

    A value obeys the same declaration wherever it comes from (:data:`SOURCE_OPTIONS`):
    ``file:x.wav?block_s=9`` is refused like ``block_s = 9`` in the table
    (sample_rate_hz 8000-192000, channels 1-64, 0 meaning automatic for both,
    block_s 0.005-2 s, probe_s up to 60 s; NaN and infinities never). A URI's
    values are text: ``0.5``, ``true``/``false``, ``1``/``0``, ``yes``/``no``.

    Args:
        kind: ``"mic"``, ``"file"`` or ``"stream"``.
        options: Options from the configuration; they win over ``uri_params``.
        uri_params: Options from the URI query string (``file:`` URIs).

    Raises:
        ConfigError: listing every unknown key and every bad value.
    """
    cls = SOURCE_OPTIONS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown source kind {kind!r}; expected one of {sorted(SOURCE_OPTIONS)}")
    return read_source_options(cls, options, uri_params)


def read_source_options(
    cls: type[S],
    options: Mapping[str, object],
    uri_params: Mapping[str, str] | None = None,
) -> S:
    """:func:`parse_source_options` for the options type ``cls`` of one kind (typed)."""
    merged: dict[str, object] = dict(uri_params or {})
    merged.update(options)
    return read_options(cls, merged, text=True, label=lambda key: f"source option {shown(key)}")
