"""The speech guard on the inference thread: a captioner wrapped so that VAD runs first.

:class:`GuardedCaptioner` asks the windower for 16 kHz audio besides the rates the
model wants (``sample_rates_hz``), judges each window with Silero VAD
(:mod:`streamcap.privacy.vad`, rule in :mod:`streamcap.privacy.guard`) before the
captioner runs, and then:

* ``[privacy] speech = "mark"``: captions the window and sets ``Caption.speech``;
* ``"skip"``: a window with speech is not captioned: the answer is a
  :class:`~streamcap.pipeline.SkippedWindow` (the worker counts it and publishes
  nothing); a window without speech is captioned with ``speech=False``.

A batch (:meth:`GuardedCaptioner.caption_batch`) is judged window by window; the
windows that are to be captioned go to the captioner together, in one call.

:class:`SpeechGuard` is also what a trigger event clip is checked with
(:meth:`SpeechGuard.holds_speech`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from streamcap.audio.resample import resample
from streamcap.messages import CaptionResult, Window
from streamcap.pipeline import SkippedWindow, WindowCaptioner
from streamcap.privacy.guard import SpeechVerdict, judge
from streamcap.privacy.options import PrivacyConfig
from streamcap.privacy.vad import RATE_HZ, SileroVad

SPAN_S: Final = 10.0
"""A clip is judged in spans of this long (the shortest caption window): one span with
speech keeps the clip from being written."""


class SpeechGuard:
    """The loaded VAD and the ``[privacy]`` rule; one call at a time (it holds a lock).

    Args:
        vad: The model, or None to load it on first use (:meth:`load` loads at once).
    """

    def __init__(self, options: PrivacyConfig, vad: SileroVad | None = None) -> None:
        self.options = options
        self._vad = vad
        self._lock = threading.Lock()

    @classmethod
    def load(cls, options: PrivacyConfig) -> SpeechGuard:
        """Load the model now (on the calling thread).

        Raises:
            ModelError: silero-vad is missing or its model cannot be loaded.
        """
        return cls(options, SileroVad.load())

    def _model(self) -> SileroVad:
        if self._vad is None:
            self._vad = SileroVad.load()
        return self._vad

    def judge(self, samples_16k: npt.ArrayLike) -> SpeechVerdict:
        """Whether 16 kHz mono audio holds speech, by the ``[privacy]`` rule."""
        with self._lock:
            probs = self._model().probabilities(samples_16k)
        return judge(probs, threshold=self.options.speech_threshold,
                     min_fraction=self.options.speech_fraction)

    def holds_speech(self, samples: npt.ArrayLike, rate_hz: int) -> bool:
        """Whether any :data:`SPAN_S` span of ``samples`` (at ``rate_hz``) holds speech.

        A clip is judged span by span, not whole, so that a long clip with a few
        seconds of talk is caught like a caption window would be.
        """
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        x16 = x if rate_hz == RATE_HZ else resample(x, rate_hz, RATE_HZ)
        span = int(SPAN_S * RATE_HZ)
        for k in range(max(1, math.ceil(x16.size / span))):
            if self.judge(x16[k * span:(k + 1) * span]).speech:
                return True
        return False


class GuardedCaptioner:
    """A :class:`~streamcap.pipeline.WindowCaptioner` that runs the speech guard first.

    Args:
        captioner: The model's captioner.
        guard: The loaded guard; its options' ``speech`` is "mark" or "skip".
    """

    def __init__(self, captioner: WindowCaptioner, guard: SpeechGuard) -> None:
        if not guard.options.guarded:
            raise ValueError('GuardedCaptioner: [privacy] speech is "caption" (no guard)')
        self.inner = captioner
        self.guard = guard
        rates = tuple(captioner.sample_rates_hz)
        self._rates = rates if RATE_HZ in rates else (*rates, RATE_HZ)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def sample_rates_hz(self) -> tuple[int, ...]:
        """The captioner's rates, and 16 kHz for the VAD (last: levels stay measured
        at the captioner's first rate)."""
        return self._rates

    def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult | SkippedWindow]:
        """VAD on each window, then the windows not skipped in ONE call of the captioner's
        ``caption_batch``; one result per window, in input order.

        A skipped window (``"skip"`` and speech) never reaches the captioner. Each caption
        gets its window's ``speech`` verdict, and ``stage_seconds["vad"]`` is the VAD time
        of the whole batch (``stage_seconds`` are the batch's).

        Two windows of one source are refused by the captioner's ``caption_batch`` (this
        guard only forwards them).

        Raises:
            ValueError: A window without 16 kHz audio.
        """
        started = time.perf_counter()
        verdicts = [self.guard.judge(_audio_16k(window)) for window in windows]
        vad_s = time.perf_counter() - started
        skip = self.guard.options.speech == "skip"
        out: list[CaptionResult | SkippedWindow | None] = [None] * len(windows)
        captioned: list[int] = []
        for n, (window, verdict) in enumerate(zip(windows, verdicts, strict=True)):
            if verdict.speech and skip:
                out[n] = SkippedWindow(window_id=window.window_id, source_id=window.source_id,
                                       reason="speech", detail=f"fraction={verdict.fraction:.3f}")
            else:
                captioned.append(n)
        if captioned:
            results = self.inner.caption_batch([windows[n] for n in captioned])
            if len(results) != len(captioned):
                raise RuntimeError(f"{self.inner.model_id}: caption_batch returned "
                                   f"{len(results)} results for {len(captioned)} windows")
            for n, result in zip(captioned, results, strict=True):
                if isinstance(result, CaptionResult):
                    caption = dataclasses.replace(result.caption, speech=verdicts[n].speech)
                    result = dataclasses.replace(
                        result, caption=caption, stage_seconds={**result.stage_seconds,
                                                                "vad": vad_s})
                out[n] = result
        return [r for r in out if r is not None]

    def caption(self, window: Window) -> CaptionResult | SkippedWindow:
        """One window: :meth:`caption_batch` of one."""
        return self.caption_batch([window])[0]


def _audio_16k(window: Window) -> npt.NDArray[np.float32]:
    audio = window.audio.get(RATE_HZ)
    if audio is None:
        raise ValueError(f"window {window.window_id} has no {RATE_HZ} Hz audio for the "
                         f"speech guard (it has {sorted(window.audio)})")
    return audio
