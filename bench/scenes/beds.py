"""Background beds of the independent scenes: pink, brown, mains hum, babble.

Each returns float64 audio of unit RMS (the mixer sets the level).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import numpy as np

from bench.scenes.sounds import Audio, fir, osc


def _unit(x: Audio) -> Audio:
    rms = float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
    return x / rms if rms > 0 else x


def pink(rng: np.random.Generator, n: int, sr: int) -> Audio:
    """Voss-McCartney pink noise: 16 rows of held random values, row k updated every 2**k."""
    rows = 16
    out = np.zeros(n)
    idx = np.arange(n)
    for k in range(rows):
        step = 2**k
        values = rng.standard_normal(n // step + 2)
        out += values[idx // step + int(rng.integers(0, 2))]
    out += rng.standard_normal(n)
    out -= out.mean()
    return _unit(fir(out, sr, 20, 0.45 * sr, taps=63))


def brown(rng: np.random.Generator, n: int, sr: int) -> Audio:
    """Brownian noise (integrated white noise) with its drift removed by a 0.1 s moving mean."""
    x = np.cumsum(rng.standard_normal(n))
    width = max(3, sr // 10)
    x -= np.convolve(x, np.ones(width) / width, mode="same")
    return _unit(x)


def hum(rng: np.random.Generator, n: int, sr: int) -> Audio:
    """Mains hum (50 or 60 Hz and odd/even harmonics) over a faint fan-like noise."""
    mains = 50.0 if rng.random() < 0.5 else 60.0
    ph = osc(mains * (1 + 0.001 * rng.standard_normal()), n, sr)
    tone = sum(rng.uniform(0.1, 1.0) / k * np.sin(k * ph + rng.uniform(0, 6.3)) for k in range(1, 9))
    fan = fir(rng.standard_normal(n), sr, 80, 2000)
    return _unit(_unit(np.asarray(tone)) + rng.uniform(0.1, 0.5) * _unit(fan))


def babble(rng: np.random.Generator, n: int, sr: int) -> Audio:
    """Babble-like bed: 4-8 distant 'talkers', voiced buzz with pitch contours and syllable rhythm."""
    t = np.arange(n) / sr
    out = np.zeros(n)
    for _ in range(int(rng.integers(4, 9))):
        f0 = rng.uniform(90, 240) * (1 + 0.15 * np.sin(osc(rng.uniform(0.5, 2.0), n, sr)))
        ph = osc(f0, n, sr, rng.uniform(0, 6.3))
        buzz = sum(np.sin(k * ph) / k for k in range(1, 20))
        voice = fir(np.asarray(buzz), sr, rng.uniform(250, 500), rng.uniform(1800, 3500), taps=127)
        syll = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6.3)), 0, None)
        pauses = np.repeat(rng.random(n // sr + 2) < 0.75, sr)[:n]
        out += _unit(voice) * syll * pauses
    return _unit(out + 0.05 * rng.standard_normal(n))


BEDS: Final[Mapping[str, Callable[[np.random.Generator, int, int], Audio]]] = {
    "pink": pink, "brown": brown, "hum": hum, "babble": babble,
}
"""Background kind -> maker."""
