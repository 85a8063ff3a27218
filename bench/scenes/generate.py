"""The independent scene list and its renderer (44.1 kHz, 10 s, mono).

Scenes:

* **event**: one sound type (its event(s) placed at random in the 10 s) over a
  background bed (pink, brown, mains hum or babble) mixed at an SNR of 20, 10
  or 5 dB: the event's *active* RMS (its 25 ms frames within 25 dB of its
  loudest) over the bed's RMS. ``per_cell`` scenes per type and SNR.
* **silence**: digital silence, a -90 dBFS dither floor, or a single click in
  silence. The right answer is "quiet" (or "unfamiliar"), never a sound type.
* **background**: a bed alone at -50 to -25 dBFS. The right answer is "quiet"
  or "unfamiliar", never a sound type.

Scene ``i`` depends only on the base seed and its own fields; the whole list
is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from bench.scenes.beds import BEDS
from bench.scenes.sounds import DURATION_S, MAKERS, Audio

SAMPLE_RATE_HZ: Final = 44100
SCENE_S: Final = 10.0
SNRS_DB: Final = (20.0, 10.0, 5.0)
SILENCE_KINDS: Final = ("digital", "dither", "click")


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalScene:
    """One scene: ``kind`` event/silence/background; ``target`` the sound type of an event."""

    scene_id: str
    kind: str
    target: str | None
    snr_db: float | None
    bed: str | None
    bed_db: float | None
    variant: str
    seed: int

    def to_json(self) -> dict[str, object]:
        return {"scene_id": self.scene_id, "kind": self.kind, "target": self.target,
                "snr_db": self.snr_db, "bed": self.bed, "bed_db": self.bed_db,
                "variant": self.variant, "seed": self.seed}


def scene_list(*, per_cell: int = 8, seed: int = 12, silences: int = 4,
               backgrounds_per_bed: int = 6) -> list[EvalScene]:
    """Every scene: 14 types x 3 SNRs x ``per_cell`` events, then silences and beds alone."""
    rng = np.random.default_rng([seed, 0])
    beds = sorted(BEDS)
    out: list[EvalScene] = []
    for target in MAKERS:
        for snr in SNRS_DB:
            for i in range(per_cell):
                out.append(EvalScene(
                    scene_id=f"{target}-snr{int(snr):02d}-{i:02d}", kind="event", target=target,
                    snr_db=snr, bed=beds[(i + int(snr)) % len(beds)],
                    bed_db=round(float(rng.uniform(-50, -30)), 2), variant="",
                    seed=int(rng.integers(0, 2**31))))
    for variant in SILENCE_KINDS:
        for i in range(silences):
            out.append(EvalScene(scene_id=f"silence-{variant}-{i:02d}", kind="silence",
                                 target=None, snr_db=None, bed=None, bed_db=None,
                                 variant=variant, seed=int(rng.integers(0, 2**31))))
    for bed in beds:
        for i in range(backgrounds_per_bed):
            level = -50.0 + 25.0 * i / max(1, backgrounds_per_bed - 1)
            out.append(EvalScene(scene_id=f"background-{bed}-{i:02d}", kind="background",
                                 target=None, snr_db=None, bed=bed, bed_db=round(level, 2),
                                 variant="", seed=int(rng.integers(0, 2**31))))
    return out


def active_level(x: Audio, sr: int) -> float:
    """RMS over the 25 ms frames within 25 dB of the loudest one."""
    frame = int(0.025 * sr)
    usable = len(x) // frame * frame
    if usable == 0:
        return 0.0
    power = (x[:usable].reshape(-1, frame) ** 2).mean(axis=1)
    loud = power[power >= power.max() * 10 ** (-25 / 10)]
    return float(np.sqrt(loud.mean()))


def _event_track(rng: np.random.Generator, target: str, n: int, sr: int) -> Audio:
    lo, hi = DURATION_S[target]
    seconds = float(rng.uniform(lo, hi))
    start = float(rng.uniform(0.0, SCENE_S - seconds))
    sound = MAKERS[target](rng, seconds, sr)
    if rng.random() < 0.5:  # a little room: a short exponential-decay reverb tail
        tail = np.exp(-np.arange(int(0.3 * sr)) / (rng.uniform(0.02, 0.12) * sr))
        tail *= rng.standard_normal(len(tail)) * rng.uniform(0.02, 0.08)
        tail[0] = 1.0
        size = len(sound) + len(tail)
        sound = np.fft.irfft(np.fft.rfft(sound, size) * np.fft.rfft(tail, size), size)[: len(sound)]
    track = np.zeros(n)
    first = int(start * sr)
    track[first:first + len(sound)] = sound[: n - first]
    return track


def render(scene: EvalScene) -> Audio:
    """The scene's audio: float64 (441000,) at 44.1 kHz, peak at most 0.99."""
    sr, n = SAMPLE_RATE_HZ, int(SCENE_S * SAMPLE_RATE_HZ)
    rng = np.random.default_rng(scene.seed)
    if scene.kind == "silence":
        out = np.zeros(n)
        if scene.variant == "dither":
            out = rng.standard_normal(n) * 10 ** (-90 / 20)
        elif scene.variant == "click":
            at = int(rng.uniform(1.0, 9.0) * sr)
            width = int(0.001 * sr)
            out[at:at + width] = rng.uniform(0.3, 0.9) * np.hanning(width)
        return out
    assert scene.bed is not None and scene.bed_db is not None
    bed = BEDS[scene.bed](rng, n, sr) * 10 ** (scene.bed_db / 20)
    if scene.kind == "background":
        return bed
    assert scene.target is not None and scene.snr_db is not None
    event = _event_track(rng, scene.target, n, sr)
    level = active_level(event, sr)
    bed_rms = float(np.sqrt(np.mean(bed**2)))
    mix = bed + event * (bed_rms * 10 ** (scene.snr_db / 20) / max(level, 1e-12))
    peak = float(np.max(np.abs(mix)))
    return mix * (0.99 / peak) if peak > 0.99 else mix
