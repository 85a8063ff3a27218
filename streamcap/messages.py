"""Frozen messages that cross stage boundaries.

Only these types travel between a source, the windower, the inference
worker and the sinks. Arrays are made read-only by the factory functions
(``make_block``, ``make_window``): ``frozen=True`` alone would not protect
their contents. Times named ``*_ms`` are exact integer milliseconds and
``*_s`` seconds on the source's stream clock (sample index / sample rate);
times named ``*_at`` are wall-clock UNIX seconds (UTC).
"""

from __future__ import annotations

import re
import secrets
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]

RUN_ID_PATTERN = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
"""What a run id may look like: no ``:``, so that a window id splits unambiguously."""


def new_run_id() -> str:
    """A fresh random run id: 16 lowercase hex digits (64 random bits).

    A daemon draws one at start; it goes into the hello frame and into every
    window id, so that ids never repeat across restarts or across daemons.
    """
    return secrets.token_hex(8)


def check_run_id(run_id: str) -> str:
    """``run_id`` itself if it is 1-64 of ``[0-9A-Za-z_-]``.

    Raises:
        ValueError: naming the run id and what was expected.
    """
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run_id must be 1-64 characters of [0-9A-Za-z_-], got {run_id!r}")
    return run_id


def make_window_id(*, source_id: str, run_id: str, epoch: int, start_ms: int) -> str:
    """``"<source_id>:<run_id>:<epoch>:<start_ms>"``: unique per window across runs and daemons.

    ``source_id`` never holds a ``:`` (config names are ``[A-Za-z0-9_-]``) and
    neither does ``run_id``, so ``window_id.split(":")`` gives the four parts.
    """
    return f"{source_id}:{run_id}:{epoch}:{start_ms}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioBlock:
    """A contiguous block of mono float32 samples from one source, as captured.

    ``start_sample`` counts samples at ``sample_rate_hz`` since the source
    (re)started its stream clock; a source restart after a failure starts a
    new clock epoch (``epoch``), so that windows never span a gap.
    """

    source_id: str
    start_sample: int
    sample_rate_hz: int
    samples: Float32Array  # float32 (n,), read-only, nominally in [-1, 1]
    captured_at: float  # wall clock of samples[0]
    epoch: int = 0
    overflowed: bool = False  # the device or decoder reported lost input before this block
    nonfinite: int = 0  # NaN or infinite input samples the source replaced by silence
    clipped: int = 0  # finite input samples beyond full scale the source clipped to [-1, 1]

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate_hz


def _read_only(samples: npt.ArrayLike) -> Float32Array:
    """A read-only float32 (n,) copy of ``samples``."""
    arr = np.array(samples, dtype=np.float32, copy=True).reshape(-1)
    arr.flags.writeable = False
    return arr


def make_block(
    *,
    source_id: str,
    start_sample: int,
    sample_rate_hz: int,
    samples: npt.ArrayLike,
    captured_at: float,
    epoch: int = 0,
    overflowed: bool = False,
    nonfinite: int = 0,
    clipped: int = 0,
) -> AudioBlock:
    """Build an :class:`AudioBlock`, copying ``samples`` into a read-only float32 array."""
    return AudioBlock(
        source_id=source_id,
        start_sample=start_sample,
        sample_rate_hz=sample_rate_hz,
        samples=_read_only(samples),
        captured_at=captured_at,
        epoch=epoch,
        overflowed=overflowed,
        nonfinite=nonfinite,
        clipped=clipped,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """A ``window_s``-long slice cut every ``hop_s``; the unit of captioning.

    Timebase: the window covers ``[start_ms, end_ms)`` milliseconds of its
    epoch's stream clock, exact integers. At a sample rate ``r`` its audio is
    the epoch's stream samples ``[start_sample(r), end_sample(r))``, with
    ``start_sample(r) = ceil(start_ms * r / 1000)`` (the windower's index
    rule), so positions at any rate are exact integers, never a float round
    trip. ``start_s``/``end_s`` are derived from the milliseconds.

    ``audio`` maps each sample rate the models asked for to the window's
    samples at that rate (float32 (n,), read-only).
    """

    window_id: str  # make_window_id(): f"{source_id}:{run_id}:{epoch}:{start_ms}"
    source_id: str
    seq: int  # per source, +1 per window; starts at 0 with each run
    epoch: int  # the windower's clock epoch: +1 at each restart of the stream clock
    start_ms: int  # on the epoch's stream clock
    end_ms: int
    captured_at: float  # wall clock of the window's first sample
    level_dbfs: float  # RMS level of the window
    audio: Mapping[int, Float32Array]
    run_id: str  # the daemon run that cut it (fresh and random at each start)

    @property
    def start_s(self) -> float:
        return self.start_ms / 1000

    @property
    def end_s(self) -> float:
        return self.end_ms / 1000

    @property
    def duration_s(self) -> float:
        return (self.end_ms - self.start_ms) / 1000

    def start_sample(self, sample_rate_hz: int) -> int:
        """Index of the window's first sample on its epoch's stream at ``sample_rate_hz``."""
        return sample_index(self.start_ms, sample_rate_hz)

    def end_sample(self, sample_rate_hz: int) -> int:
        """Index one past the window's last sample on its epoch's stream at ``sample_rate_hz``."""
        return sample_index(self.end_ms, sample_rate_hz)

    def samples(self, sample_rate_hz: int) -> Float32Array:
        """The window's samples at ``sample_rate_hz``; ``KeyError`` names the rates on offer."""
        try:
            return self.audio[sample_rate_hz]
        except KeyError:
            raise KeyError(
                f"window {self.window_id} has no audio at {sample_rate_hz} Hz "
                f"(has {sorted(self.audio)})"
            ) from None


def sample_index(ms: int, sample_rate_hz: int) -> int:
    """The first sample at ``sample_rate_hz`` whose time is at or after ``ms`` milliseconds.

    ``ceil(ms * rate / 1000)`` in integers: the index rule every window follows.
    """
    return -((-ms * sample_rate_hz) // 1000)


def make_window(
    *,
    source_id: str,
    seq: int,
    epoch: int,
    start_ms: int,
    end_ms: int,
    captured_at: float,
    level_dbfs: float,
    audio: Mapping[int, npt.ArrayLike],
    run_id: str | None = None,
) -> Window:
    """Build a :class:`Window` with read-only arrays and a derived ``window_id``.

    ``run_id`` is the daemon run's id; None draws a fresh one (a window of a
    run of its own). See :func:`make_window_id`.

    Raises:
        ValueError: ``run_id`` is not a valid run id, or not ``0 <= start_ms <= end_ms``.
    """
    run = new_run_id() if run_id is None else check_run_id(run_id)
    if not 0 <= start_ms <= end_ms:
        raise ValueError(f"window span must have 0 <= start_ms <= end_ms, got [{start_ms}, {end_ms})")
    frozen = {int(rate): _read_only(arr) for rate, arr in audio.items()}
    return Window(
        window_id=make_window_id(source_id=source_id, run_id=run, epoch=epoch, start_ms=start_ms),
        source_id=source_id,
        seq=seq,
        epoch=epoch,
        start_ms=start_ms,
        end_ms=end_ms,
        captured_at=captured_at,
        level_dbfs=level_dbfs,
        audio=types.MappingProxyType(frozen),
        run_id=run,
    )


class SourceState(StrEnum):
    """States a source goes through; every change is published with a reason."""

    STARTING = "starting"
    RUNNING = "running"
    STALLED = "stalled"  # open but no data within stall_s
    RETRYING = "retrying"  # waiting out a backoff before reopening
    FAILED = "failed"  # gave up (permanent error or retries exhausted)
    STOPPED = "stopped"  # ended normally (end of a file, or shutdown)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceStatus:
    """A source's state change and the reason for it."""

    source_id: str
    state: SourceState
    reason: str = ""
    at: float = 0.0  # wall clock
    retry_in_s: float | None = None  # set with RETRYING
    attempt: int = 0  # consecutive failed attempts so far


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptionCandidate:
    """One sampled caption and its scores."""

    text: str
    decoder_score: float  # mean token log-probability under the untempered model
    encoder_score: float | None = None  # cosine(retriever audio, retriever text)
    score: float = 0.0  # the blended score used for ranking
    flagged: bool = False  # the fluency filter found an error
    error_prob: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Caption:
    """The caption of one window, as published."""

    window_id: str
    source_id: str
    seq: int
    start_s: float
    end_s: float
    captured_at: float
    text: str
    score: float
    flagged: bool = False
    candidates: tuple[CaptionCandidate, ...] = ()
    model: str = ""
    latency_ms: float = 0.0  # inference time for this window
    lag_s: float = 0.0  # publish time - (captured_at + window duration)
    run_id: str = ""  # the window's run_id (Window.run_id)
    # The retriever's cosine of the model's chosen caption with the window's audio
    # (None without a retriever): what the abstention rule judged.
    confidence: float | None = None
    # True when ``text`` is the bundle's abstention text ("quiet", "an unfamiliar
    # sound") instead of the model's caption (kept in ``candidates``).
    abstained: bool = False
    # The speech guard's verdict on the window ([privacy] speech = "mark"): True when
    # it holds speech; None when the guard is off.
    speech: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Embedding:
    """The retriever's L2-normalised audio embedding of one window."""

    window_id: str
    source_id: str
    seq: int
    start_s: float
    end_s: float
    model: str
    vector: Float32Array = field(repr=False)  # float32 (dim,), read-only
    run_id: str = ""  # the window's run_id (Window.run_id)


class TriggerState(StrEnum):
    """A trigger's state for one source."""

    ON = "on"
    OFF = "off"


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerEvent:
    """A trigger turned on or off for a source.

    ``event_id`` never repeats, across restarts too (it holds the run id); the
    ``off`` event of a firing carries the ``event_id`` of its ``on`` event in
    ``fired_id``. ``start_s``/``end_s`` span the audio (stream clock) of the
    windows that decided the change; ``captured_at`` is the wall-clock time of
    the end of that audio.
    """

    event_id: str
    trigger: str
    source_id: str
    state: TriggerState
    score: float  # the deciding window's score (on: the best of the hits)
    threshold: float
    start_s: float
    end_s: float
    captured_at: float
    model: str = ""
    run_id: str = ""
    fired_id: str = ""  # on an "off" event: the event_id of the "on" it ends
    caption: str | None = None  # the source's latest caption, when there is one
    # The event clip ([triggers.<name>] clip_s), relative to the state directory's
    # clips/ ("<event_id>.flac"), on an "on" event when one is being saved; else None.
    clip: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptionResult:
    """What a captioner returns for one window: its caption, embedding and seconds per stage.

    ``batch_size`` windows (of distinct sources) were captioned together with this one
    (1: alone); ``stage_seconds`` are then the whole batch's.
    """

    caption: Caption
    embedding: Embedding | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


Published = Caption | Embedding | SourceStatus | TriggerEvent
