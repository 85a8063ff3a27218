"""The speech guard's rule: pure functions over the VAD's frame probabilities.

A window *holds speech* when at least ``min_fraction`` of its 32 ms frames have a
speech probability of ``threshold`` or more (``[privacy] speech_threshold`` and
``speech_fraction``; docs/privacy.md says how the defaults were measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechVerdict:
    """The guard's judgement of one stretch of audio."""

    speech: bool
    fraction: float  # part of the frames at or above the threshold, in [0, 1]
    frames: int


def judge(probabilities: npt.ArrayLike, *, threshold: float, min_fraction: float) -> SpeechVerdict:
    """Whether frames with these speech probabilities hold speech (see the module doc).

    No frames hold no speech.
    """
    p = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    if p.size == 0:
        return SpeechVerdict(speech=False, fraction=0.0, frames=0)
    fraction = float(np.count_nonzero(p >= threshold)) / p.size
    return SpeechVerdict(speech=fraction >= min_fraction, fraction=fraction, frames=int(p.size))
