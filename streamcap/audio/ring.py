"""RingBuffer: a bounded float32 ring addressed by absolute sample index."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]


class RingBuffer:
    """Holds the most recent samples of a stream, indexed by their absolute position.

    The buffer holds samples ``[start, end)``. Appending beyond the capacity
    drops the oldest samples (``start`` advances); :meth:`reserve` grows the
    capacity without losing anything. Writes cost ``O(len(samples))``.

    Args:
        capacity: samples held at most (>= 1).
        start_index: absolute index of the first sample to be appended.

    Raises:
        ValueError: ``capacity`` < 1.
    """

    def __init__(self, capacity: int, *, start_index: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"RingBuffer: capacity must be >= 1, got {capacity}")
        self._data: Float32Array = np.zeros(capacity, dtype=np.float32)
        self._start = start_index
        self._end = start_index

    @property
    def capacity(self) -> int:
        """Samples the buffer can hold before dropping the oldest."""
        return int(self._data.size)

    @property
    def start(self) -> int:
        """Absolute index of the oldest sample held."""
        return self._start

    @property
    def end(self) -> int:
        """Absolute index one past the newest sample held."""
        return self._end

    def __len__(self) -> int:
        return self._end - self._start

    def reserve(self, capacity: int) -> None:
        """Grow the capacity to at least ``capacity`` samples, keeping the content."""
        if capacity <= self.capacity:
            return
        content = self.read(self._start, self._end)
        self._data = np.zeros(capacity, dtype=np.float32)
        self._data[: content.size] = content
        # Re-anchor so that absolute index i lives at i % capacity.
        self._data = np.roll(self._data, self._start % capacity)

    def append(self, samples: npt.ArrayLike) -> None:
        """Append samples at :attr:`end`, dropping the oldest ones beyond the capacity.

        Args:
            samples: float (n,).
        """
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        cap = self.capacity
        new_end = self._end + x.size
        if x.size > cap:
            x = x[-cap:]
        first = new_end - x.size  # absolute index of x[0]
        pos = first % cap
        head = min(x.size, cap - pos)
        self._data[pos : pos + head] = x[:head]
        self._data[: x.size - head] = x[head:]
        self._end = new_end
        self._start = max(self._start, new_end - cap)

    def read(self, start: int, end: int) -> Float32Array:
        """Copy out samples ``[start, end)``.

        Returns:
            float32 (end - start,), a new writable array.

        Raises:
            IndexError: the range is not within ``[self.start, self.end]``.
        """
        if not self._start <= start <= end <= self._end:
            raise IndexError(
                f"RingBuffer.read: [{start}, {end}) is outside the held range "
                f"[{self._start}, {self._end})"
            )
        cap = self.capacity
        n = end - start
        pos = start % cap
        head = min(n, cap - pos)
        out = np.empty(n, dtype=np.float32)
        out[:head] = self._data[pos : pos + head]
        out[head:] = self._data[: n - head]
        return out

    def discard_before(self, index: int) -> None:
        """Forget samples before ``index`` (clamped to ``[start, end]``)."""
        self._start = min(max(self._start, index), self._end)

    def clear(self, *, start_index: int = 0) -> None:
        """Drop all content; the next sample appended gets ``start_index``."""
        self._start = start_index
        self._end = start_index
