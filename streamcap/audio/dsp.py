"""Small pure-numpy helpers on sample arrays: downmix, PCM conversion, levels.

Levels are in dBFS relative to a full-scale *square* wave: a full-scale sine
has an RMS level of about -3.01 dBFS and a peak level of 0 dBFS. Silence
(all zeros, or no samples at all) gives :data:`SILENCE_DBFS`, never ``-inf``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]

SILENCE_DBFS = -120.0
"""The level reported for silence; also the floor of every level (dBFS)."""

_INT16_SCALE = 1.0 / 32768.0
_INT32_SCALE = 1.0 / 2147483648.0


def downmix(samples: npt.ArrayLike) -> Float32Array:
    """Average the channels of interleaved frames into one mono channel.

    Args:
        samples: float (n,) mono, returned as float32 without copying when it
            already is float32, or float (n, channels) frames.

    Returns:
        float32 (n,): the mean over channels.

    Raises:
        ValueError: ``samples`` has more than two dimensions or zero channels.
    """
    arr = np.asarray(samples)
    if arr.ndim == 1:
        return arr.astype(np.float32, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"downmix: samples must be (n,) or (n, channels), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError("downmix: samples have zero channels")
    if arr.shape[1] == 1:
        return np.ascontiguousarray(arr[:, 0], dtype=np.float32)
    # Accumulate in float64 so that the mean of many channels keeps its precision.
    mono: Float32Array = arr.mean(axis=1, dtype=np.float64).astype(np.float32)
    return mono


def pcm_to_float32(pcm: npt.ArrayLike) -> Float32Array:
    """Convert integer PCM to float32 in [-1, 1).

    int16 is divided by 2**15 and int32 by 2**31, so the most negative code
    maps to exactly -1.0. Float input is returned as float32 unchanged.

    Args:
        pcm: int16, int32, float32 or float64 samples of any shape.

    Returns:
        float32 array of the same shape.

    Raises:
        ValueError: ``pcm`` has another dtype (unsigned or 8-bit PCM, ...).
    """
    arr = np.asarray(pcm)
    if arr.dtype == np.int16:
        return (arr.astype(np.float32) * np.float32(_INT16_SCALE)).astype(np.float32)
    if arr.dtype == np.int32:
        # float64 keeps all 31 bits before the final rounding to float32.
        return (arr.astype(np.float64) * _INT32_SCALE).astype(np.float32)
    if arr.dtype in (np.float32, np.float64):
        return arr.astype(np.float32, copy=False)
    raise ValueError(
        f"pcm_to_float32: expected int16, int32, float32 or float64 samples, got {arr.dtype}"
    )


def pcm_bytes_to_float32(data: bytes, *, sample_format: str, channels: int = 1) -> Float32Array:
    """Decode little-endian interleaved PCM bytes (``s16le`` or ``s32le``) to mono float32.

    Args:
        data: raw interleaved frames; a trailing partial frame is an error.
        sample_format: ``"s16le"`` or ``"s32le"``.
        channels: channels per frame (>= 1); they are averaged.

    Returns:
        float32 (n_frames,).

    Raises:
        ValueError: unknown ``sample_format``, ``channels`` < 1, or a length
            that is not a whole number of frames.
    """
    dtypes: dict[str, np.dtype[np.signedinteger[Any]]] = {
        "s16le": np.dtype("<i2"),
        "s32le": np.dtype("<i4"),
    }
    if sample_format not in dtypes:
        raise ValueError(
            f"pcm_bytes_to_float32: sample_format must be one of {sorted(dtypes)}, "
            f"got {sample_format!r}"
        )
    if channels < 1:
        raise ValueError(f"pcm_bytes_to_float32: channels must be >= 1, got {channels}")
    dtype = dtypes[sample_format]
    frame_bytes = dtype.itemsize * channels
    if len(data) % frame_bytes:
        raise ValueError(
            f"pcm_bytes_to_float32: {len(data)} bytes is not a whole number of "
            f"{frame_bytes}-byte frames ({sample_format}, {channels} channels)"
        )
    ints = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
    return downmix(pcm_to_float32(ints.reshape(-1, channels)))


def zero_nonfinite(samples: Float32Array) -> tuple[Float32Array, int, int]:
    """Replace NaN and infinite samples by 0.0 (silence).

    Args:
        samples: float32 samples of any shape; never modified.

    Returns:
        ``(clean, count, first)``: ``clean`` is ``samples`` itself when every
        sample is finite, else a copy with the non-finite samples zeroed;
        ``count`` is how many were zeroed and ``first`` the flat index of the
        first one (-1 when there is none).
    """
    finite = np.isfinite(samples)
    if finite.all():
        return samples, 0, -1
    bad = ~finite
    clean = np.where(bad, np.float32(0.0), samples).astype(np.float32, copy=False)
    return clean, int(bad.sum()), int(np.argmax(bad.reshape(-1)))


FULL_SCALE = 1.0
"""The largest sample magnitude streamcap passes on; louder samples are clipped to it."""


def clip_full_scale(samples: Float32Array) -> tuple[Float32Array, int, int]:
    """Clip finite samples to [-:data:`FULL_SCALE`, +:data:`FULL_SCALE`].

    Integer PCM never leaves that range; a float file or decoder can hold any
    finite value (1e30), which would overflow the models' float32 arithmetic
    into NaN. Clipping keeps the waveform's sign and timing and bounds every
    value that reaches a model.

    Args:
        samples: finite float32 samples of any shape; never modified.

    Returns:
        ``(clipped, count, first)``: ``clipped`` is ``samples`` itself when
        nothing exceeds full scale, else a clipped copy; ``count`` is how many
        samples were clipped and ``first`` the flat index of the first one
        (-1 when there is none).
    """
    over = np.abs(samples) > np.float32(FULL_SCALE)
    if not over.any():
        return samples, 0, -1
    clipped = np.clip(samples, -FULL_SCALE, FULL_SCALE).astype(np.float32, copy=False)
    return clipped, int(over.sum()), int(np.argmax(over.reshape(-1)))


def _to_dbfs(amplitude: float, what: str) -> float:
    if not math.isfinite(amplitude):
        raise ValueError(f"{what}: samples contain NaN or infinity")
    if amplitude <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * math.log10(amplitude))


def rms_dbfs(samples: npt.ArrayLike) -> float:
    """RMS level in dBFS, floored at :data:`SILENCE_DBFS`.

    Args:
        samples: float samples of any shape (usually float32 (n,)).

    Returns:
        ``20 * log10(sqrt(mean(x**2)))``, or ``SILENCE_DBFS`` for silence or no samples.

    Raises:
        ValueError: the samples contain NaN or infinity.
    """
    arr = np.asarray(samples)
    if arr.size == 0:
        return SILENCE_DBFS
    flat = arr.reshape(-1).astype(np.float64, copy=False)
    mean_square = float(np.dot(flat, flat)) / flat.size
    return _to_dbfs(math.sqrt(mean_square), "rms_dbfs")


def peak_dbfs(samples: npt.ArrayLike) -> float:
    """Peak (max absolute sample) level in dBFS, floored at :data:`SILENCE_DBFS`.

    Args:
        samples: float samples of any shape (usually float32 (n,)).

    Returns:
        ``20 * log10(max|x|)``, or ``SILENCE_DBFS`` for silence or no samples.

    Raises:
        ValueError: the samples contain NaN or infinity.
    """
    arr = np.asarray(samples)
    if arr.size == 0:
        return SILENCE_DBFS
    if np.isnan(arr).any():
        raise ValueError("peak_dbfs: samples contain NaN or infinity")
    return _to_dbfs(float(np.max(np.abs(arr))), "peak_dbfs")
