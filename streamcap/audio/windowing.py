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

Gaps and epochs. A block whose ``start_sample`` is ahead of the next expected
sample (lost input) is preceded by zeros if the gap is at most ``max_gap_s``;
the gap is counted in :attr:`Windower.gaps_filled` and
:attr:`Windower.gap_samples_filled`. A larger gap, a block that overlaps or
goes back in time, a sample-rate change within an epoch, an epoch lower than
the current one, or a block of an epoch already flushed raises ``ValueError``:
a source that restarts must start a new epoch. A new epoch resets the stream
clock, the resamplers and the buffers and drops the incomplete windows of the
old one; audio never spans epochs. ``seq`` is never reset.

Window ids. Every window carries the windower's ``run_id`` (the daemon draws
a fresh random one at each start) and ``window_id`` is
``"<source_id>:<run_id>:<epoch>:<start_ms>"``: stream time and ``seq`` start
again at 0 after a restart, the run id makes the ids unique across restarts
and across daemons.
"""

from __future__ import annotations

import math
from collections import deque
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
)


def _whole_ms(value: float, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Windower: {field} must be a finite number of seconds, got {value!r}")
    ms = round(value * 1000)
    if ms <= 0 or abs(value * 1000 - ms) > 1e-6:
        raise ValueError(
            f"Windower: {field} must be a positive whole number of milliseconds, got {value!r}"
        )
    return int(ms)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


class Windower:
    """Cuts one source's blocks into ``window_s`` windows every ``hop_s``.

    Args:
        source_id: the source whose blocks are fed; other sources' blocks are refused.
        window_s: window length in seconds, a positive whole number of milliseconds.
        hop_s: distance between window starts in seconds, a positive whole number of
            milliseconds (``hop_s > window_s`` leaves audio between windows unused).
        rates_hz: sample rates every window carries, distinct positive ints; the
            first one is the rate ``level_dbfs`` is measured at.
        max_gap_s: longest forward gap in ``start_sample`` that is zero-filled.
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
        self._epoch: int | None = None
        self._last_epoch: int | None = None
        self._flushed = False
        self._in_rate = 0  # input rate of the current epoch; 0 between epochs
        self._next_input = 0  # next expected input sample index of the epoch
        self._next_k = 0  # index of the next window of the epoch
        self._anchors: deque[tuple[int, float]] = deque()  # (start_sample, captured_at)
        self._resamplers: dict[int, StreamResampler] = {}
        self._rings: dict[int, RingBuffer] = {}
        self.reset()

    # -- public ---------------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The epoch being windowed, or None before the first block / after reset or flush."""
        return self._epoch

    def buffer_capacity(self, rate_hz: int) -> int:
        """Samples the ring buffer of ``rate_hz`` can hold now (0 between epochs)."""
        ring = self._rings.get(rate_hz)
        return 0 if ring is None else ring.capacity

    def window_indices(self, k: int, rate_hz: int) -> tuple[int, int]:
        """``(start, end)`` sample indices of window ``k`` of an epoch at ``rate_hz``."""
        t0 = k * self.hop_ms
        return _ceil_div(t0 * rate_hz, 1000), _ceil_div((t0 + self.window_ms) * rate_hz, 1000)

    def reset(self) -> None:
        """Forget the current epoch and all buffered audio; ``seq`` and the gap counters stay."""
        self._epoch = None
        self._last_epoch = None
        self._flushed = False
        self._clear_epoch_state(in_rate=0)

    def feed(self, block: AudioBlock) -> list[Window]:
        """Take the next block of the source and return the windows it completed, in order.

        Args:
            block: the next block; ``samples`` float32 (n,) at ``block.sample_rate_hz``.

        Returns:
            The completed windows (often none), oldest first.

        Raises:
            ValueError: wrong source, a block out of order (overlap, gap above
                ``max_gap_s``, older or flushed epoch) or a rate change within an epoch.
        """
        if block.source_id != self.source_id:
            raise ValueError(
                f"Windower({self.source_id!r}): got a block of source {block.source_id!r}"
            )
        if self._last_epoch is not None and block.epoch < self._last_epoch:
            raise ValueError(
                f"Windower({self.source_id!r}): block epoch {block.epoch} is older than "
                f"the current epoch {self._last_epoch}"
            )
        if block.epoch == self._last_epoch and self._flushed:
            raise ValueError(
                f"Windower({self.source_id!r}): epoch {block.epoch} was already flushed; "
                "a restarted source must start a new epoch"
            )
        if block.epoch != self._epoch:
            self._epoch = block.epoch
            self._last_epoch = block.epoch
            self._flushed = False
            self._clear_epoch_state(in_rate=block.sample_rate_hz)
        in_rate = self._in_rate
        if block.sample_rate_hz != in_rate:
            raise ValueError(
                f"Windower({self.source_id!r}): sample_rate_hz changed from {in_rate} to "
                f"{block.sample_rate_hz} within epoch {block.epoch}; start a new epoch"
            )
        gap = block.start_sample - self._next_input
        if gap < 0:
            raise ValueError(
                f"Windower({self.source_id!r}): block start_sample {block.start_sample} "
                f"overlaps audio already fed (expected {self._next_input}, epoch {block.epoch})"
            )
        samples = block.samples
        if gap > 0:
            if gap > self.max_gap_s * block.sample_rate_hz:
                raise ValueError(
                    f"Windower({self.source_id!r}): block start_sample {block.start_sample} "
                    f"leaves a gap of {gap / block.sample_rate_hz:.3f} s after sample "
                    f"{self._next_input}, above max_gap_s={self.max_gap_s}; start a new epoch"
                )
            samples = np.concatenate((np.zeros(gap, dtype=np.float32), samples))
            self.gaps_filled += 1
            self.gap_samples_filled += gap
        self._anchors.append((block.start_sample, block.captured_at))
        self._next_input = block.start_sample + block.samples.size
        for rate in self.rates_hz:
            self._push(rate, self._resamplers[rate].feed(samples))
        return self._emit()

    def flush(self) -> list[Window]:
        """End the current epoch: pad it with zeros and return the windows that completes.

        Windows reaching past the last fed sample are dropped, never padded. Later
        blocks of the same epoch are refused.

        Returns:
            The completed windows, oldest first.
        """
        if self._epoch is None:
            return []
        for rate in self.rates_hz:
            self._push(rate, self._resamplers[rate].flush())
        windows = self._emit()
        self._flushed = True
        self._epoch = None
        self._clear_epoch_state(in_rate=0)
        return windows

    # -- internals ------------------------------------------------------------------------------

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
            hop = _ceil_div(self.hop_ms * rate, 1000)
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

    def _emit(self) -> list[Window]:
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
                    epoch=self._epoch if self._epoch is not None else 0,
                    start_s=start_ms / 1000,
                    end_s=(start_ms + self.window_ms) / 1000,
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
        return windows
