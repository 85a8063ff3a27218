"""Windower: cut a source's AudioBlocks into overlapping Windows at the models' sample rates.

Sans-I/O: :meth:`Windower.feed` takes one :class:`~streamcap.messages.AudioBlock`
and returns the :class:`~streamcap.messages.Window` objects it completed.

Stream clock. Within an epoch, input sample ``i`` (``AudioBlock.start_sample``
counts them) is at stream time ``i / in_rate``; each target rate ``r`` gets
its own stream, produced by one :class:`StreamResampler` per rate, whose
sample ``n`` is at time ``n / r``. Every block is resampled exactly once per
target rate, whatever the number of windows.

Index rule. ``window_s`` and ``hop_s`` must be whole milliseconds
(``window_ms``, ``hop_ms``). Window ``k`` (0, 1, 2, ... within an epoch)
covers ``[k * hop_ms, k * hop_ms + window_ms)`` milliseconds and holds, at
rate ``r``, exactly the resampled samples whose time lies in that interval::

    start_k(r) = ceil(k * hop_ms * r / 1000)
    end_k(r)   = ceil((k * hop_ms + window_ms) * r / 1000)
    audio[r]   = resampled_stream_r[start_k(r) : end_k(r)]

computed with integers. With ``hop == window`` consecutive windows tile the
stream (``end_k == start_{k+1}``). When ``window_ms * r / 1000`` is not an
integer the length alternates between its floor and ceiling.

A window is emitted once its audio is complete at every rate, i.e. after
the resamplers' look-ahead (:attr:`StreamResampler.lookahead_in` input
samples past its end). :meth:`Windower.flush` pads the end of the stream
with zeros so that the last whole windows come out.

Epochs and restarts. The windower owns the window clock: its epochs count
0, 1, 2, ... per windower and start the stream clock (and ``start_ms``)
afresh. A new epoch starts, and :meth:`Windower.feed` reports it as a
:class:`Restart` in its :class:`Windowed` result, when

* the source started a new clock (``AudioBlock.epoch`` changed: the
  supervisor restarted it), reason :attr:`RestartReason.SOURCE_RESTART`;
* a block's ``start_sample`` is ahead of the next expected sample by more
  than ``max_gap_s`` (lost input; hours of silent windows would follow),
  reason :attr:`RestartReason.GAP`: the new epoch starts at that block.

A shorter forward gap is filled with zeros and counted in
:attr:`Windower.gaps_filled` and :attr:`Windower.gap_samples_filled`. A new
epoch resets the resamplers and the buffers and drops the incomplete windows
of the old one; audio never spans epochs. ``seq`` and the epoch counter are
never reset. Input that no source produces is a bug and raises
``ValueError``, never a restart: a block of another source, one that overlaps
audio already fed, a sample-rate change within a source clock, a source clock
older than the current one, a block of a clock already flushed, or samples
that are NaN or infinite (sources replace those by silence).

Window ids. Every window carries the windower's ``run_id`` (the daemon draws
a fresh random one at each start) and ``window_id`` is
``"<source_id>:<run_id>:<epoch>:<start_ms>"``: stream time and ``seq`` start
again at 0 after a restart, the run id makes the ids unique across restarts
and across daemons.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

import numpy as np

from streamcap.audio.dsp import rms_dbfs
from streamcap.audio.resample import StreamResampler
from streamcap.audio.ring import RingBuffer
from streamcap.messages import (
    AudioBlock,
    Float32Array,
    Window,
    check_run_id,
    make_window,
    new_run_id,
    sample_index,
)


class RestartReason(StrEnum):
    """Why the windower started a new epoch."""

    SOURCE_RESTART = "source_restart"  # the source started a new clock (AudioBlock.epoch)
    GAP = "gap"  # lost input longer than max_gap_s


@dataclass(frozen=True, slots=True, kw_only=True)
class Restart:
    """A new window epoch: the stream clock starts again at 0 with the block that caused it."""

    reason: RestartReason
    epoch: int  # the new window epoch
    detail: str  # human-readable: what was seen
    lost_s: float = 0.0  # input lost in a gap (seconds at the input rate); 0 for a source restart


@dataclass(frozen=True, slots=True, kw_only=True)
class Windowed:
    """What one :meth:`Windower.feed` produced: the completed windows and any restart."""

    windows: tuple[Window, ...] = ()
    restart: Restart | None = None  # set when this block started a new epoch (not the first)


def _whole_ms(value: float, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Windower: {field} must be a finite number of seconds, got {value!r}")
    ms = round(value * 1000)
    if ms <= 0 or abs(value * 1000 - ms) > 1e-6:
        raise ValueError(
            f"Windower: {field} must be a positive whole number of milliseconds, got {value!r}"
        )
    return int(ms)


class Windower:
    """Cuts one source's blocks into ``window_s`` windows every ``hop_s``.

    Args:
        source_id: the source whose blocks are fed; other sources' blocks are refused.
        window_s: window length in seconds, a positive whole number of milliseconds.
        hop_s: distance between window starts in seconds, a positive whole number of
            milliseconds (``hop_s > window_s`` leaves audio between windows unused).
        rates_hz: sample rates every window carries, distinct positive ints; the
            first one is the rate ``level_dbfs`` is measured at.
        max_gap_s: longest forward gap in ``start_sample`` that is zero-filled; a
            longer one starts a new epoch.
        run_id: the daemon run's id, part of every ``window_id``; None draws a
            fresh random one (a run of its own).

    Raises:
        ValueError: a parameter is invalid; the message names it.
    """

    def __init__(
        self,
        source_id: str,
        window_s: float,
        hop_s: float,
        rates_hz: tuple[int, ...],
        *,
        max_gap_s: float = 1.0,
        run_id: str | None = None,
    ) -> None:
        self.source_id = source_id
        try:
            self.run_id = new_run_id() if run_id is None else check_run_id(run_id)
        except ValueError as exc:
            raise ValueError(f"Windower: {exc}") from None
        self.window_ms = _whole_ms(window_s, "window_s")
        self.hop_ms = _whole_ms(hop_s, "hop_s")
        if not rates_hz:
            raise ValueError("Windower: rates_hz must name at least one sample rate")
        for rate in rates_hz:
            if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
                raise ValueError(f"Windower: rates_hz must hold positive ints, got {rate!r}")
        if len(set(rates_hz)) != len(rates_hz):
            raise ValueError(f"Windower: rates_hz has duplicates: {rates_hz}")
        if not (math.isfinite(max_gap_s) and max_gap_s >= 0):
            raise ValueError(f"Windower: max_gap_s must be >= 0, got {max_gap_s!r}")
        self.rates_hz = tuple(rates_hz)
        self.max_gap_s = max_gap_s
        self._seq = 0
        self.gaps_filled = 0
        """Forward gaps zero-filled since construction."""
        self.gap_samples_filled = 0
        """Input samples of zeros inserted for those gaps."""
        self.restarts: dict[RestartReason, int] = dict.fromkeys(RestartReason, 0)
        """New epochs started after the first, by reason."""
        self._epoch = -1  # the current window epoch; -1 before the first block
        self._source_epoch: int | None = None  # AudioBlock.epoch of the current source clock
        self._flushed = False  # the current source clock was flushed
        self._in_rate = 0  # input rate of the current epoch; 0 between epochs
        self._origin = 0  # source start_sample at which the current epoch's clock is 0
        self._next_input = 0  # next expected input sample index, on the epoch's clock
        self._next_k = 0  # index of the next window of the epoch
        self._anchors: deque[tuple[int, float]] = deque()  # (epoch sample, captured_at)
        self._resamplers: dict[int, StreamResampler] = {}
        self._rings: dict[int, RingBuffer] = {}

    # -- public ---------------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The window epoch being cut, or None before the first block and after a flush."""
        return self._epoch if self._in_rate else None

    def buffer_capacity(self, rate_hz: int) -> int:
        """Samples the ring buffer of ``rate_hz`` can hold now (0 between epochs)."""
        ring = self._rings.get(rate_hz)
        return 0 if ring is None else ring.capacity

    def window_indices(self, k: int, rate_hz: int) -> tuple[int, int]:
        """``(start, end)`` sample indices of window ``k`` of an epoch at ``rate_hz``."""
        t0 = k * self.hop_ms
        return sample_index(t0, rate_hz), sample_index(t0 + self.window_ms, rate_hz)

    def feed(self, block: AudioBlock) -> Windowed:
        """Take the next block of the source: the windows it completed, and any restart.

        Args:
            block: the next block; ``samples`` float32 (n,) at ``block.sample_rate_hz``.

        Returns:
            The completed windows (often none), oldest first, and the :class:`Restart`
            when this block started a new epoch (not for the very first block).

        Raises:
            ValueError: input no source produces (see the module doc): another source,
                an overlap, a rate change within a source clock, an older or flushed
                source clock, or NaN/infinite samples.
        """
        restart = self._check(block)
        if restart is None:
            position = block.start_sample - self._origin
            gap = position - self._next_input
            samples = block.samples
            if gap > 0:
                samples = np.concatenate((np.zeros(gap, dtype=np.float32), samples))
                self.gaps_filled += 1
                self.gap_samples_filled += gap
        else:
            self.restarts[restart.reason] += 1
            position, samples = 0, block.samples
        self._anchors.append((position, block.captured_at))
        self._next_input = position + block.samples.size
        for rate in self.rates_hz:
            self._push(rate, self._resamplers[rate].feed(samples))
        return Windowed(windows=self._emit(), restart=restart)

    def flush(self) -> tuple[Window, ...]:
        """End the current epoch: pad it with zeros and return the windows that completes.

        Windows reaching past the last fed sample are dropped, never padded. Later
        blocks of the same source clock are refused.

        Returns:
            The completed windows, oldest first.
        """
        if not self._in_rate:
            return ()
        for rate in self.rates_hz:
            self._push(rate, self._resamplers[rate].flush())
        windows = self._emit()
        self._flushed = True
        self._clear_epoch_state(in_rate=0)
        return windows

    # -- internals ------------------------------------------------------------------------------

    def _check(self, block: AudioBlock) -> Restart | None:
        """Refuse input no source produces; start a new epoch when the block needs one.

        Returns:
            The restart, when a new epoch started after an earlier one; else None.
        """
        name = f"Windower({self.source_id!r})"
        if block.source_id != self.source_id:
            raise ValueError(f"{name}: got a block of source {block.source_id!r}")
        if not np.isfinite(block.samples).all():
            raise ValueError(
                f"{name}: block at start_sample {block.start_sample} holds NaN or infinite "
                "samples; a source must replace them by silence"
            )
        current = self._source_epoch
        if current is not None and block.epoch < current:
            raise ValueError(
                f"{name}: block epoch {block.epoch} is older than the current source epoch "
                f"{current}"
            )
        if block.epoch == current and self._flushed:
            raise ValueError(
                f"{name}: source epoch {block.epoch} was already flushed; "
                "a restarted source must start a new epoch"
            )
        if block.epoch != current:
            self._source_epoch = block.epoch
            self._flushed = False
            detail = (f"source clock epoch {block.epoch} began" if current is None else
                      f"source clock epoch {block.epoch} follows {current}")
            return self._new_epoch(block, RestartReason.SOURCE_RESTART, detail)
        if block.sample_rate_hz != self._in_rate:
            raise ValueError(
                f"{name}: sample_rate_hz changed from {self._in_rate} to "
                f"{block.sample_rate_hz} within source epoch {block.epoch}; "
                "a source must start a new epoch"
            )
        position = block.start_sample - self._origin
        gap = position - self._next_input
        if gap < 0:
            raise ValueError(
                f"{name}: block start_sample {block.start_sample} overlaps audio already fed "
                f"(expected {self._next_input + self._origin}, source epoch {block.epoch})"
            )
        if gap > self.max_gap_s * block.sample_rate_hz:
            lost_s = gap / block.sample_rate_hz
            detail = (f"{lost_s:.3f} s of input lost after sample "
                      f"{self._next_input + self._origin}, above max_gap_s={self.max_gap_s:g}")
            return self._new_epoch(block, RestartReason.GAP, detail, lost_s=lost_s)
        return None

    def _new_epoch(self, block: AudioBlock, reason: RestartReason, detail: str,
                   *, lost_s: float = 0.0) -> Restart | None:
        """Start the next window epoch with its clock at 0 at ``block``."""
        first = self._epoch < 0
        self._epoch += 1
        self._origin = block.start_sample
        self._clear_epoch_state(in_rate=block.sample_rate_hz)
        if first:
            return None
        return Restart(reason=reason, epoch=self._epoch, detail=detail, lost_s=lost_s)

    def _clear_epoch_state(self, *, in_rate: int) -> None:
        self._in_rate = in_rate
        self._next_input = 0
        self._next_k = 0
        self._anchors = deque()
        self._resamplers = {}
        self._rings = {}
        if not in_rate:
            return
        for rate in self.rates_hz:
            self._resamplers[rate] = StreamResampler(in_rate, rate)
            start, end = self.window_indices(0, rate)
            hop = sample_index(self.hop_ms, rate)
            self._rings[rate] = RingBuffer(end - start + hop + 1)

    def _push(self, rate: int, samples: Float32Array) -> None:
        ring = self._rings[rate]
        need = len(ring) + samples.size
        if need > ring.capacity:
            ring.reserve(max(need, ring.capacity + ring.capacity // 2))
        ring.append(samples)

    def _captured_at(self, k: int) -> float:
        """Wall clock of window ``k``'s first sample, from the block that holds it."""
        position = Fraction(k * self.hop_ms * self._in_rate, 1000)  # input samples
        anchor_sample, anchor_at = self._anchors[0]
        for sample, at in self._anchors:
            if sample > position:
                break
            anchor_sample, anchor_at = sample, at
        return anchor_at + float((position - anchor_sample) / self._in_rate)

    def _emit(self) -> tuple[Window, ...]:
        windows: list[Window] = []
        while self._anchors:
            k = self._next_k
            spans = {rate: self.window_indices(k, rate) for rate in self.rates_hz}
            if any(self._rings[r].end < end for r, (_, end) in spans.items()):
                break
            audio = {r: self._rings[r].read(start, end) for r, (start, end) in spans.items()}
            start_ms = k * self.hop_ms
            windows.append(
                make_window(
                    source_id=self.source_id,
                    seq=self._seq,
                    epoch=self._epoch,
                    start_ms=start_ms,
                    end_ms=start_ms + self.window_ms,
                    captured_at=self._captured_at(k),
                    level_dbfs=rms_dbfs(audio[self.rates_hz[0]]),
                    audio=audio,
                    run_id=self.run_id,
                )
            )
            self._seq += 1
            self._next_k += 1
        if windows:
            for rate in self.rates_hz:
                self._rings[rate].discard_before(self.window_indices(self._next_k, rate)[0])
            next_pos = Fraction(self._next_k * self.hop_ms * self._in_rate, 1000)
            while len(self._anchors) > 1 and self._anchors[1][0] <= next_pos:
                self._anchors.popleft()
        return tuple(windows)
