"""Synthesize streamcap/data/example.ogg, the clip `streamcap run` loops when no microphone exists.

Twelve seconds at 16 kHz: soft rain-like noise, bird-like chirps and three
knocks. Seeded, so the file is reproducible. Run from the repository root:
    .venv/bin/python scripts/make_example_clip.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
SECONDS = 12.0


def main() -> None:
    rng = np.random.default_rng(20261126)
    n = int(RATE * SECONDS)
    t = np.arange(n) / RATE
    # Rain: white noise, gently low-passed, with a slow swell.
    noise = rng.standard_normal(n)
    kernel = np.ones(8) / 8
    rain = np.convolve(noise, kernel, mode="same") * (0.05 + 0.02 * np.sin(2 * np.pi * 0.1 * t))
    out = rain
    # Chirps: short upward sweeps in pairs.
    for start in rng.uniform(0.5, SECONDS - 1.0, size=9):
        for k in range(2):
            s = int((start + 0.12 * k) * RATE)
            m = int(0.08 * RATE)
            tt = np.arange(m) / RATE
            f0, f1 = rng.uniform(2500, 3200), rng.uniform(3800, 4800)
            phase = 2 * np.pi * (f0 * tt + (f1 - f0) * tt**2 / (2 * tt[-1]))
            out[s:s + m] += 0.25 * np.sin(phase) * np.hanning(m)
    # Knocks: damped low thumps.
    for start in (3.0, 3.35, 3.7):
        s = int(start * RATE)
        m = int(0.15 * RATE)
        tt = np.arange(m) / RATE
        out[s:s + m] += 0.6 * np.sin(2 * np.pi * 180 * tt) * np.exp(-tt * 40)
    out = np.clip(out, -1.0, 1.0).astype(np.float32)
    target = Path(__file__).resolve().parent.parent / "streamcap" / "data" / "example.ogg"
    target.parent.mkdir(parents=True, exist_ok=True)
    sf.write(target, out, RATE, format="OGG", subtype="VORBIS")
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
