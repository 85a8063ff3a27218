"""Streaming band-limited resampling by a rational ratio (polyphase Kaiser-windowed sinc).

Time convention: input sample ``k`` sits at time ``k / in_rate_hz`` and output
sample ``n`` at time ``n / out_rate_hz``, both counted from the first input
sample. Input before time 0 and (at :meth:`StreamResampler.flush`) after the
end is taken as zeros. Each output is a fixed dot product of the input
samples around its time, so the output depends only on the input signal and
never on how the input was split into blocks: feeding a signal in any block
sizes and then flushing gives the same samples as :func:`resample` on the
whole signal (bit for bit on one machine; the row sums do not depend on the
batch size).

Latency: output ``n`` needs input up to index ``floor(n * M / L) + K``, where
``L / M`` is ``out_rate_hz / in_rate_hz`` in lowest terms and ``K`` is
:attr:`StreamResampler.lookahead_in` (``ceil(zero_crossings / (2 * fc))``
input samples). So :meth:`StreamResampler.feed` returns an output only once
``K`` input samples after it have arrived; :meth:`StreamResampler.flush`
pads zeros and returns the rest, for ``ceil(n_in * L / M)`` outputs in total.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]

_MAX_TABLE_ENTRIES = 1 << 21  # precompute the polyphase table below this many float64 taps
_EMPTY = np.zeros(0, dtype=np.float32)
_EMPTY.flags.writeable = False


class StreamResampler:
    """Resample a float32 stream from ``in_rate_hz`` to ``out_rate_hz`` block by block.

    The low-pass cutoff is ``rolloff * min(in_rate_hz, out_rate_hz) / 2``, so
    downsampling is anti-aliased and upsampling suppresses images. The filter
    is a sinc with ``zero_crossings`` zero crossings on each side, shaped by a
    Kaiser window of parameter ``kaiser_beta`` (8.6 gives about 86 dB of
    stop-band attenuation). Cost is ``O(n_out * taps)`` per call with
    ``taps = 2 * lookahead_in``; there is no per-sample Python loop.

    With equal rates the resampler is the identity: :meth:`feed` returns its
    input (as float32, not copied when it already is) and :meth:`flush` returns
    nothing.

    Args:
        in_rate_hz: input sample rate, a positive integer.
        out_rate_hz: output sample rate, a positive integer.
        zero_crossings: filter half-length in zero crossings of the sinc (>= 1).
        rolloff: cutoff as a fraction of the lower Nyquist frequency, in (0, 1].
        kaiser_beta: Kaiser window shape parameter (>= 0).
        max_chunk_out: outputs computed per vectorised step; bounds temporary memory.

    Raises:
        ValueError: a parameter is out of range; the message names it.
    """

    def __init__(
        self,
        in_rate_hz: int,
        out_rate_hz: int,
        *,
        zero_crossings: int = 32,
        rolloff: float = 0.94,
        kaiser_beta: float = 8.6,
        max_chunk_out: int = 4096,
    ) -> None:
        for name, value in (("in_rate_hz", in_rate_hz), ("out_rate_hz", out_rate_hz)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"StreamResampler: {name} must be a positive int, got {value!r}")
        if zero_crossings < 1:
            raise ValueError(f"StreamResampler: zero_crossings must be >= 1, got {zero_crossings}")
        if not 0.0 < rolloff <= 1.0:
            raise ValueError(f"StreamResampler: rolloff must be in (0, 1], got {rolloff}")
        if kaiser_beta < 0.0:
            raise ValueError(f"StreamResampler: kaiser_beta must be >= 0, got {kaiser_beta}")
        if max_chunk_out < 1:
            raise ValueError(f"StreamResampler: max_chunk_out must be >= 1, got {max_chunk_out}")
        self.in_rate_hz = in_rate_hz
        self.out_rate_hz = out_rate_hz
        g = math.gcd(in_rate_hz, out_rate_hz)
        self._up = out_rate_hz // g  # L
        self._down = in_rate_hz // g  # M
        self._identity = self._up == self._down
        # Cutoff in cycles per input sample, and the filter half-width in input samples.
        self._fc = rolloff * min(1.0, self._up / self._down) / 2.0
        self._half_width = zero_crossings / (2.0 * self._fc)
        self._beta = kaiser_beta
        self._i0_beta = float(np.i0(kaiser_beta))
        self._k = 0 if self._identity else math.ceil(self._half_width)
        # Tap offsets j relative to floor(t_n): -K+1 .. K (all that |t_n - k| < half_width allows).
        self._offsets: Int64Array = np.arange(-self._k + 1, self._k + 1, dtype=np.int64)
        self._chunk = max_chunk_out
        self._table: Float64Array | None = None
        if not self._identity and self._up * self._offsets.size <= _MAX_TABLE_ENTRIES:
            self._table = self._taps(np.arange(self._up, dtype=np.int64))
        self.reset()

    # -- public ---------------------------------------------------------------------------------

    @property
    def ratio(self) -> tuple[int, int]:
        """``(L, M)``: out/in rate in lowest terms; output n sits at input position ``n * M / L``."""
        return self._up, self._down

    @property
    def lookahead_in(self) -> int:
        """Input samples needed after an output's time before :meth:`feed` returns it (``K``)."""
        return self._k

    @property
    def taps(self) -> int:
        """Filter taps per output sample (0 for the identity)."""
        return 0 if self._identity else int(self._offsets.size)

    @property
    def samples_in(self) -> int:
        """Input samples fed since construction, the last :meth:`reset` or :meth:`flush`."""
        return self._n_in

    @property
    def samples_out(self) -> int:
        """Output samples returned since construction, the last :meth:`reset` or :meth:`flush`."""
        return self._n_out

    def reset(self) -> None:
        """Forget all input; the next :meth:`feed` starts a new stream at time 0."""
        self._n_in = 0
        self._n_out = 0
        # Input buffer holds absolute input indices [buf_start, buf_start + len(buf)); the K-1
        # zeros before index 0 are the silence assumed before the stream starts.
        self._buf_start = -(self._k - 1) if self._k else 0
        self._buf: Float32Array = np.zeros(max(self._k - 1, 0), dtype=np.float32)

    def feed(self, samples: npt.ArrayLike) -> Float32Array:
        """Consume the next input samples and return every output that is now determined.

        Args:
            samples: float (n,) input at ``in_rate_hz``, continuing the stream.

        Returns:
            float32 (m,) outputs ``samples_out .. samples_out + m - 1`` (possibly empty).

        Raises:
            ValueError: ``samples`` is not one-dimensional.
        """
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"StreamResampler.feed: samples must be 1-D, got shape {x.shape}")
        if self._identity:
            self._n_in += x.size
            self._n_out += x.size
            return x
        if x.size:
            self._buf = np.concatenate((self._buf, x))
            self._n_in += x.size
        # Output n is ready when floor(n*M/L) + K <= n_in - 1, i.e. n < (n_in - K) * L / M.
        ready = self._n_in - self._k
        n_end = max(0, -((-ready * self._up) // self._down)) if ready > 0 else 0
        return self._produce(n_end)

    def flush(self) -> Float32Array:
        """Pad the stream with zeros, return the remaining outputs and :meth:`reset`.

        Returns:
            float32 (m,): the outputs up to ``ceil(samples_in * L / M)`` not yet returned.
        """
        if self._identity:
            self.reset()
            return _EMPTY
        total = -((-self._n_in * self._up) // self._down)
        if total > self._n_out:
            need_end = ((total - 1) * self._down) // self._up + self._k + 1
            have_end = self._buf_start + self._buf.size
            if need_end > have_end:
                pad = np.zeros(need_end - have_end, dtype=np.float32)
                self._buf = np.concatenate((self._buf, pad))
        out = self._produce(total) if total > self._n_out else _EMPTY
        self.reset()
        return out

    # -- internals ------------------------------------------------------------------------------

    def _taps(self, phases: Int64Array) -> Float64Array:
        """Filter taps for outputs at fractional positions ``phases / L`` past an input sample.

        Returns float64 (len(phases), taps): the weight of input ``floor(t) + j`` for each
        offset ``j`` in ``self._offsets``.
        """
        frac = phases.astype(np.float64) / float(self._up)
        d = self._offsets.astype(np.float64)[None, :] - frac[:, None]  # input index - t_n
        u = d / self._half_width
        inside = np.abs(u) < 1.0
        arg = self._beta * np.sqrt(np.clip(1.0 - u * u, 0.0, None))
        window = np.where(inside, np.i0(arg) / self._i0_beta, 0.0)
        two_fc = 2.0 * self._fc
        taps: Float64Array = two_fc * np.sinc(two_fc * d) * window
        return taps

    def _produce(self, n_end: int) -> Float32Array:
        """Compute outputs ``self._n_out .. n_end - 1`` from the buffer, then trim it."""
        n0 = self._n_out
        if n_end <= n0:
            return _EMPTY
        out = np.empty(n_end - n0, dtype=np.float32)
        for c0 in range(n0, n_end, self._chunk):
            c1 = min(c0 + self._chunk, n_end)
            n = np.arange(c0, c1, dtype=np.int64)
            pos = n * self._down
            base = pos // self._up
            phase = pos % self._up
            idx = (base - self._buf_start)[:, None] + self._offsets[None, :]
            taps = self._table[phase] if self._table is not None else self._taps(phase)
            # Row-wise product sums: each output's arithmetic is independent of the chunking.
            out[c0 - n0 : c1 - n0] = (self._buf[idx] * taps).sum(axis=1)
        self._n_out = n_end
        # Keep only the input the next output can still reach.
        keep_from = (n_end * self._down) // self._up - self._k + 1
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:].copy()
            self._buf_start = keep_from
        return out


def resample(samples: npt.ArrayLike, in_rate_hz: int, out_rate_hz: int) -> Float32Array:
    """Resample a whole signal in one call (same output as streaming it, then flushing).

    Args:
        samples: float (n,) at ``in_rate_hz``.
        in_rate_hz: input sample rate.
        out_rate_hz: output sample rate.

    Returns:
        float32 (ceil(n * out_rate_hz / in_rate_hz),).
    """
    rs = StreamResampler(in_rate_hz, out_rate_hz)
    head = rs.feed(samples)
    tail = rs.flush()
    if tail.size == 0:
        return head
    return np.concatenate((head, tail))
