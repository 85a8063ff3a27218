"""The speech guard on the inference path: the real Silero VAD marks a window of
espeak-ng speech and not a synthesized siren; "skip" keeps the captioner from seeing a
speech window, and the worker publishes nothing for it and counts it. A batch of windows
is judged window by window and the windows kept reach the captioner in one call.

The speech is synthesized by the ``espeak-ng`` binary (scripts/install.sh --test
installs it); without it the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from daemon_process import metric_samples

from streamcap.audio.resample import resample
from streamcap.messages import Caption, CaptionResult, Published, Window, make_window
from streamcap.models.runtime import InferenceRuntime, RuntimeOptions
from streamcap.pipeline import InferenceWorker, SkippedWindow, WindowQueue
from streamcap.privacy.options import PrivacyConfig
from streamcap.privacy.speech import GuardedCaptioner, SpeechGuard
from streamcap.privacy.vad import RATE_HZ
from streamcap.stats import Metrics
from streamcap.training.data.corpus_sounds import siren

MODEL_RATE = 32000
WINDOW_S = 10
RUN = "3f2a9c51d07e4b88"
ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="the espeak-ng binary is not installed "
                                  "(scripts/install.sh --test installs it)")


def spoken(tmp: Path, text: str, voice: str = "en") -> npt.NDArray[np.float32]:
    """``text`` spoken by espeak-ng, at 16 kHz."""
    assert ESPEAK is not None
    wav = tmp / "speech.wav"
    subprocess.run([ESPEAK, "-v", voice, "-w", str(wav), text], check=True, capture_output=True,
                   timeout=60)
    audio, rate = sf.read(wav, dtype="float32")
    return resample(audio, int(rate), RATE_HZ)


def in_window(sound: npt.NDArray[np.float32], rate: int, *, at_s: float = 2.0,
              ) -> npt.NDArray[np.float32]:
    """``sound`` at ``at_s`` in a 10 s window of faint noise."""
    out = 0.003 * np.random.default_rng(1).standard_normal(WINDOW_S * rate).astype(np.float32)
    start = int(at_s * rate)
    part = sound[: out.size - start]
    out[start:start + part.size] += part
    return out


def window_of(audio_16k: npt.NDArray[np.float32], seq: int = 0, source: str = "porch") -> Window:
    """A window carrying the model's rate and 16 kHz, as the windower cuts them."""
    return make_window(source_id=source, seq=seq, epoch=0, start_ms=seq * 10_000,
                       end_ms=seq * 10_000 + 10_000, captured_at=1_700_000_000.0 + seq * 10,
                       level_dbfs=-20.0, run_id=RUN,
                       audio={MODEL_RATE: resample(audio_16k, RATE_HZ, MODEL_RATE),
                              RATE_HZ: audio_16k})


class FakeCaptioner:
    model_id = "fake"
    sample_rates_hz: tuple[int, ...] = (MODEL_RATE,)

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
        with self.lock:
            self.seen.extend(w.window_id for w in windows)
            self.batches.append([w.window_id for w in windows])
        return [CaptionResult(caption=Caption(
            window_id=window.window_id, source_id=window.source_id, seq=window.seq,
            start_s=window.start_ms / 1000, end_s=window.end_ms / 1000,
            captured_at=window.captured_at, text="a sound", score=0.5, model=self.model_id,
            run_id=window.run_id), embedding=None, stage_seconds={"model": 0.25},
            batch_size=len(windows)) for window in windows]

    def caption(self, window: Window) -> CaptionResult:
        return self.caption_batch([window])[0]


@pytest.fixture(scope="module")
def guard_mark() -> SpeechGuard:
    return SpeechGuard.load(PrivacyConfig(speech="mark"))


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, npt.NDArray[np.float32]]:
    if ESPEAK is None:
        pytest.skip("the espeak-ng binary is not installed (scripts/install.sh --test installs it)")
    tmp = tmp_path_factory.mktemp("speech")
    speech = spoken(tmp, "Hello, this is a test of the speech guard. Please call me back "
                         "when you get home tonight.")
    wail = siren(np.random.default_rng(3), WINDOW_S * RATE_HZ, RATE_HZ)
    return {"speech": in_window(0.5 * speech / np.abs(speech).max(), RATE_HZ),
            "siren": (0.3 * wail / np.abs(wail).max()).astype(np.float32)}


def test_the_guard_adds_16k_to_the_captioners_rates_once() -> None:
    guard = SpeechGuard(PrivacyConfig(speech="mark"))  # the model loads on first use only
    assert GuardedCaptioner(FakeCaptioner(), guard).sample_rates_hz == (MODEL_RATE, RATE_HZ)

    class At16k(FakeCaptioner):
        sample_rates_hz = (RATE_HZ, MODEL_RATE)

    assert GuardedCaptioner(At16k(), guard).sample_rates_hz == (RATE_HZ, MODEL_RATE)
    with pytest.raises(ValueError, match="caption"):
        GuardedCaptioner(FakeCaptioner(), SpeechGuard(PrivacyConfig()))


@needs_espeak
def test_mark_says_speech_for_espeak_speech_and_not_for_a_siren(
        guard_mark: SpeechGuard, sounds: Mapping[str, npt.NDArray[np.float32]]) -> None:
    inner = FakeCaptioner()
    guarded = GuardedCaptioner(inner, guard_mark)
    verdicts = {}
    for seq, name in enumerate(("speech", "siren")):
        result = guarded.caption(window_of(sounds[name], seq))
        assert isinstance(result, CaptionResult)
        verdicts[name] = result.caption.speech
        assert "vad" in result.stage_seconds
    assert verdicts == {"speech": True, "siren": False}
    assert len(inner.seen) == 2  # "mark" captions every window


@needs_espeak
def test_the_verdict_follows_the_measured_margin(
        guard_mark: SpeechGuard, sounds: Mapping[str, npt.NDArray[np.float32]]) -> None:
    """The speech window's fraction is well above the default, the siren's well below."""
    speech = guard_mark.judge(sounds["speech"])
    wail = guard_mark.judge(sounds["siren"])
    fraction = guard_mark.options.speech_fraction
    assert speech.fraction >= 2 * fraction and wail.fraction <= fraction / 2, (speech, wail)
    assert guard_mark.holds_speech(resample(sounds["speech"], RATE_HZ, 48000), 48000)
    assert not guard_mark.holds_speech(sounds["siren"], RATE_HZ)
    # a long clip with a few seconds of talk at its end: judged per 10 s span
    long_clip = np.concatenate([sounds["siren"], sounds["siren"], sounds["speech"][:3 * RATE_HZ]])
    assert guard_mark.holds_speech(long_clip, RATE_HZ)


@needs_espeak
async def test_skip_never_captions_a_speech_window_and_counts_it(
        guard_mark: SpeechGuard, sounds: Mapping[str, npt.NDArray[np.float32]]) -> None:
    inner = FakeCaptioner()
    guard = SpeechGuard(PrivacyConfig(speech="skip"), guard_mark._model())
    guarded = GuardedCaptioner(inner, guard)
    speech_window, siren_window = window_of(sounds["speech"], 0), window_of(sounds["siren"], 1)
    skipped = guarded.caption(speech_window)
    assert isinstance(skipped, SkippedWindow)
    assert skipped.reason == "speech" and skipped.window_id == speech_window.window_id
    assert inner.seen == []  # the captioner never saw it
    # through the worker: nothing published for the speech window, the siren captioned
    metrics = Metrics()
    published: list[Published] = []
    queue = WindowQueue(4)
    runtime = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32", num_threads=1))
    try:
        worker = InferenceWorker(guarded, queue, published.append, runtime.run, metrics)
        queue.offer(speech_window)
        queue.offer(siren_window)
        queue.close()
        await worker.run()
    finally:
        await runtime.aclose()
    captions = [m for m in published if isinstance(m, Caption)]
    assert [c.window_id for c in captions] == [siren_window.window_id]
    assert captions[0].speech is False
    assert worker.skipped == 1 and worker.processed == 1
    samples = metric_samples(metrics.render(), "streamcap_windows_skipped_total")
    assert samples['{reason="speech",source="porch"}'] == 1


@needs_espeak
def test_mark_judges_each_window_of_a_batch_and_captions_them_in_one_call(
        guard_mark: SpeechGuard, sounds: Mapping[str, npt.NDArray[np.float32]]) -> None:
    inner = FakeCaptioner()
    guarded = GuardedCaptioner(inner, guard_mark)
    windows = [window_of(sounds["siren"], 0, "yard"), window_of(sounds["speech"], 0, "porch"),
               window_of(sounds["siren"], 0, "gate")]
    results = guarded.caption_batch(windows)
    assert inner.batches == [[w.window_id for w in windows]]  # one inner call, in order
    assert all(isinstance(r, CaptionResult) for r in results)
    captions = [r.caption for r in results if isinstance(r, CaptionResult)]
    assert [c.window_id for c in captions] == [w.window_id for w in windows]
    assert [c.speech for c in captions] == [False, True, False]
    # the batch's stage times: the model's, and one VAD time for the whole batch
    stages = [r.stage_seconds for r in results if isinstance(r, CaptionResult)]
    assert all(st["model"] == 0.25 and st["vad"] > 0 for st in stages)
    assert len({st["vad"] for st in stages}) == 1
    assert all(r.batch_size == 3 for r in results if isinstance(r, CaptionResult))


@needs_espeak
def test_skip_keeps_speech_windows_of_a_batch_from_the_captioner(
        guard_mark: SpeechGuard, sounds: Mapping[str, npt.NDArray[np.float32]]) -> None:
    inner = FakeCaptioner()
    guarded = GuardedCaptioner(inner, SpeechGuard(PrivacyConfig(speech="skip"),
                                                  guard_mark._model()))
    windows = [window_of(sounds["speech"], 0, "porch"), window_of(sounds["siren"], 0, "yard"),
               window_of(sounds["speech"], 0, "hall"), window_of(sounds["siren"], 0, "gate")]
    results = guarded.caption_batch(windows)
    # the two siren windows went to the captioner together; the speech never did
    assert inner.batches == [[windows[1].window_id, windows[3].window_id]]
    assert [type(r).__name__ for r in results] == ["SkippedWindow", "CaptionResult",
                                                   "SkippedWindow", "CaptionResult"]
    assert [r.window_id if isinstance(r, SkippedWindow) else r.caption.window_id
            for r in results] == [w.window_id for w in windows]
    assert all(r.reason == "speech" for r in results if isinstance(r, SkippedWindow))
    assert all(r.caption.speech is False and "vad" in r.stage_seconds
               for r in results if isinstance(r, CaptionResult))
    # a batch of speech only: the captioner is not called at all
    inner.batches.clear()
    only_speech = guarded.caption_batch([windows[0], windows[2]])
    assert inner.batches == [] and all(isinstance(r, SkippedWindow) for r in only_speech)


def test_a_guarded_batch_refuses_a_window_without_16k() -> None:
    inner = FakeCaptioner()
    guarded = GuardedCaptioner(inner, SpeechGuard(PrivacyConfig(speech="mark")))
    quiet = np.zeros(WINDOW_S * RATE_HZ, dtype=np.float32)
    at_32k_only = make_window(source_id="yard", seq=0, epoch=0, start_ms=0, end_ms=10_000,
                              captured_at=1_700_000_000.0, level_dbfs=-20.0, run_id=RUN,
                              audio={MODEL_RATE: np.zeros(WINDOW_S * MODEL_RATE, np.float32)})
    with pytest.raises(ValueError, match="has no 16000 Hz audio"):
        guarded.caption_batch([window_of(quiet, 0), at_32k_only])
    assert inner.batches == []
