"""How the speech guard's defaults were chosen: Silero VAD on espeak-ng speech vs synthetic sounds.

Windows of 10 s at 16 kHz (the shortest caption window), each one of:

* **speech**: one espeak-ng sentence (several voices, speeds and pitches) placed at
  a random offset in the window, over a quiet room-noise bed, at a random level;
  the sentence fills 1.5-6 s of the 10;
* **sounds**: every synthesizer of the demo corpus
  (:data:`streamcap.training.data.corpus_sounds.SYNTHS`: sirens, alarms, phones,
  whistles, birds, dogs, horns, bells, engines, rain...), filling the window;
* **tones**: music-like chords (three to five harmonic notes, changing every
  0.25-1 s, with vibrato);
* **chatter**: the corpus' synthetic "distant voices" bed (a sawtooth buzz with a
  syllable rhythm; not speech, reported on its own).

For each window: the fraction of its 32 ms frames whose speech probability is at
or above each probability threshold. The report gives, per class, the minimum,
median and maximum fraction, and for the chosen (threshold, fraction) rule how many
windows of each class are judged speech. Run it with::

    python -m bench.speech_guard [--per-class N] [--json OUT]

Needs the ``espeak-ng`` binary and the ``silero-vad`` package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from streamcap.audio.resample import resample
from streamcap.privacy.guard import judge
from streamcap.privacy.vad import RATE_HZ, SileroVad
from streamcap.training.data.corpus_sounds import SYNTHS, background

WINDOW_S = 10.0
THRESHOLDS = (0.3, 0.5, 0.7)
SENTENCES = (
    "Hello, this is a test of the speech guard.",
    "The quick brown fox jumps over the lazy dog.",
    "Please remember to buy milk and bread on the way home tonight.",
    "Can you hear me? I think the meeting starts at nine thirty.",
    "We should leave now, the train is already at the station.",
    "Turn left at the second corner, then walk straight for two minutes.",
)
VOICES = ("en", "en-us", "en+f3", "en+m3", "de", "fr", "es")


def espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", str(wav), text], check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    return audio, int(rate)


def speech_window(rng: np.random.Generator) -> np.ndarray:
    n = int(WINDOW_S * RATE_HZ)
    voice = VOICES[int(rng.integers(len(VOICES)))]
    text = SENTENCES[int(rng.integers(len(SENTENCES)))]
    audio, rate = espeak(text, voice, int(rng.integers(120, 220)), int(rng.integers(20, 80)))
    speech = resample(audio, rate, RATE_HZ)[: int(6 * RATE_HZ)]
    out = 0.01 * background(rng, "room", n, RATE_HZ)
    start = int(rng.integers(0, max(1, n - speech.size)))
    level = rng.uniform(0.1, 0.8) / max(float(np.abs(speech).max()), 1e-6)
    out[start:start + speech.size] += level * speech
    return out.astype(np.float32)


def tones_window(rng: np.random.Generator) -> np.ndarray:
    n = int(WINDOW_S * RATE_HZ)
    t = np.arange(n) / RATE_HZ
    out = np.zeros(n)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.25, 1.0) * RATE_HZ)
        seg = slice(pos, min(n, pos + length))
        for _ in range(int(rng.integers(3, 6))):
            f0 = 110 * 2 ** (int(rng.integers(0, 36)) / 12)
            vib = 1 + 0.005 * np.sin(2 * np.pi * 5.5 * t[seg])
            for k in range(1, 6):
                out[seg] += 0.6 ** k * np.sin(2 * np.pi * k * f0 * vib * t[seg])
        pos += length
    scaled: np.ndarray = (0.3 * out / np.abs(out).max()).astype(np.float32)
    return scaled


def sound_window(rng: np.random.Generator, kind: str) -> np.ndarray:
    n = int(WINDOW_S * RATE_HZ)
    x = SYNTHS[kind](rng, n, RATE_HZ) if kind != "chatter" else background(rng, "chatter", n,
                                                                           RATE_HZ)
    return (0.5 * x / max(float(np.abs(x).max()), 1e-6)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed")
    rng = np.random.default_rng(0)
    vad = SileroVad.load()
    classes: dict[str, list[np.ndarray]] = {"speech": [], "tones": [], "chatter": []}
    for _ in range(args.per_class):
        classes["speech"].append(speech_window(rng))
        classes["tones"].append(tones_window(rng))
        classes["chatter"].append(sound_window(rng, "chatter"))
    for kind in SYNTHS:
        classes[kind] = [sound_window(rng, kind) for _ in range(max(2, args.per_class // 3))]
    report: dict[str, dict[str, object]] = {}
    for name, windows in classes.items():
        probs = [vad.probabilities(w) for w in windows]
        row: dict[str, object] = {"windows": len(windows)}
        for th in THRESHOLDS:
            fr = np.array([float((p >= th).mean()) for p in probs])
            row[f"fraction@{th}"] = [round(float(fr.min()), 3), round(float(np.median(fr)), 3),
                                     round(float(fr.max()), 3)]
        row["peak"] = round(max(float(p.max()) for p in probs), 3)
        for rule in ((0.5, 0.05), (0.5, 0.1), (0.5, 0.2)):
            row[f"speech@{rule[0]}/{rule[1]}"] = sum(
                judge(p, threshold=rule[0], min_fraction=rule[1]).speech for p in probs)
        report[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
