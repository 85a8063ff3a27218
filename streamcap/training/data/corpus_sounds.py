"""Procedural sound synthesizers of the demo corpus: one function per event type.

Every synthesizer takes a random generator, a length in samples and a sample
rate and returns float32 (n,) audio of arbitrary scale (the scene mixer sets
levels). Sounds are built from tones, sweeps and spectrally shaped noise
(FFT filtering, no SciPy), chosen to be easy to tell apart: a tiny model can
learn them in minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]
Synth = Callable[[np.random.Generator, int, int], Float32Array]


def shaped_noise(rng: np.random.Generator, n: int, sr: int, lo_hz: float, hi_hz: float,
                 *, tilt: float = 0.0) -> FloatArray:
    """White noise band-passed to [lo_hz, hi_hz] (soft edges), spectrum x f**tilt; unit RMS."""
    if n == 0:
        return np.zeros(0)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    f[0] = f[1] if n > 1 else 1.0
    gain = 1.0 / (1.0 + (lo_hz / f) ** 4) / (1.0 + (f / hi_hz) ** 4) * f ** tilt
    out = np.fft.irfft(spec * gain, n)
    rms = float(np.sqrt(np.mean(out**2)))
    return out / rms if rms > 0 else out


def _t(n: int, sr: int) -> FloatArray:
    return np.arange(n) / sr


def _fade(x: FloatArray, sr: int, seconds: float = 0.02) -> FloatArray:
    k = min(len(x) // 2, int(seconds * sr))
    if k > 0:
        ramp = np.linspace(0.0, 1.0, k)
        x[:k] *= ramp
        x[-k:] *= ramp[::-1]
    return x


def _place(out: FloatArray, sound: FloatArray, start: int) -> None:
    end = min(len(out), start + len(sound))
    if start < end:
        out[start:end] += sound[: end - start]


def _decay(n: int, sr: int, tau_s: float) -> FloatArray:
    return np.exp(-_t(n, sr) / tau_s)


def siren(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Wail (slow) or yelp (fast) sinusoidal frequency sweep."""
    rate = rng.uniform(0.2, 0.45) if rng.random() < 0.6 else rng.uniform(2.5, 4.0)
    centre, dev = rng.uniform(800, 1100), rng.uniform(300, 450)
    freq = centre + dev * np.sin(2 * np.pi * rate * _t(n, sr) + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return _fade(np.sin(phase) + 0.3 * np.sin(2 * phase), sr, 0.2).astype(np.float32)


def alarm(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Square-ish high beeps in a regular on/off pattern."""
    f, on = rng.uniform(2000, 3200), rng.uniform(0.08, 0.2)
    period = on * rng.uniform(1.8, 2.5)
    t = _t(n, sr)
    tone = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(6 * np.pi * f * t)
    return (tone * ((t % period) < on)).astype(np.float32)


def phone(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Warbling two-tone ring bursts (double ring, then a pause)."""
    f1 = rng.uniform(700, 1000)
    trill = rng.uniform(15, 25)
    t = _t(n, sr)
    freq = np.where(np.sin(2 * np.pi * trill * t) > 0, f1, f1 * 1.25)
    tone = np.sin(2 * np.pi * np.cumsum(freq) / sr)
    cycle = t % 2.0
    gate = (cycle < 0.4) | ((cycle > 0.6) & (cycle < 1.0))
    return (tone * gate).astype(np.float32)


def knock(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Groups of two to four damped low thuds with a click."""
    out = np.zeros(n)
    hit_n = int(0.12 * sr)
    f = rng.uniform(120, 250)
    pos = int(rng.uniform(0.0, 0.2) * sr)
    while pos < n:
        for _ in range(int(rng.integers(2, 5))):
            th = _t(hit_n, sr)
            hit = (np.sin(2 * np.pi * f * th) * np.exp(-th / 0.03)
                   + 0.5 * shaped_noise(rng, hit_n, sr, 800, 4000) * np.exp(-th / 0.004))
            _place(out, hit, pos)
            pos += int(rng.uniform(0.13, 0.25) * sr)
        pos += int(rng.uniform(0.8, 1.5) * sr)
    return out.astype(np.float32)


def clock(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Regular short high clicks, alternating tick and tock."""
    out = np.zeros(n)
    period = int((0.5 if rng.random() < 0.5 else 1.0) * sr)
    click_n = int(0.015 * sr)
    base = rng.uniform(2500, 4000)
    for k, pos in enumerate(range(int(rng.uniform(0, 0.3) * sr), n, period)):
        tc = _t(click_n, sr)
        f = base if k % 2 == 0 else base * 0.8
        _place(out, np.sin(2 * np.pi * f * tc) * np.exp(-tc / 0.003), pos)
    return out.astype(np.float32)


def engine(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Low harmonic hum with firing-rate modulation and rumble."""
    t = _t(n, sr)
    f0 = rng.uniform(25, 45) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    hum = np.sum([np.sin(k * phase) / k for k in range(1, 11)], axis=0)
    hum = hum * (1 + 0.3 * np.sin(2 * phase))
    return _fade(hum + 0.5 * shaped_noise(rng, n, sr, 30, 250), sr, 0.3).astype(np.float32)


def rain(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Broadband hiss with many random drop clicks."""
    out = shaped_noise(rng, n, sr, 400, 7000, tilt=-0.3)
    drop_n = int(0.004 * sr)
    drops = rng.integers(0, max(1, n - drop_n), size=int(rng.uniform(40, 120) * n / sr))
    click = shaped_noise(rng, drop_n, sr, 1500, 7000) * _decay(drop_n, sr, 0.001)
    for pos in drops:
        out[pos:pos + drop_n] += click * rng.uniform(1, 4)
    return _fade(out, sr, 0.3).astype(np.float32)


def wind(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Low rumbling noise with slow gusts."""
    gust = shaped_noise(rng, n, sr, 0.05, 0.6)
    envelope = np.clip(1.0 + 0.7 * gust, 0.15, None)
    return _fade(shaped_noise(rng, n, sr, 60, 700, tilt=-0.5) * envelope,
                 sr, 0.5).astype(np.float32)


def whistle(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """One to three steady high blasts with vibrato."""
    out = np.zeros(n)
    f = rng.uniform(1800, 3000)
    pos = 0
    while pos < n:
        blast_n = int(rng.uniform(0.4, 1.2) * sr)
        tb = _t(blast_n, sr)
        freq = f + 30 * np.sin(2 * np.pi * 5.5 * tb)
        tone = np.sin(2 * np.pi * np.cumsum(freq) / sr) + 0.1 * shaped_noise(
            rng, blast_n, sr, 1500, 4000)
        _place(out, _fade(tone, sr, 0.03), pos)
        pos += blast_n + int(rng.uniform(0.3, 0.8) * sr)
    return out.astype(np.float32)


def bird(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Groups of short fast frequency sweeps in the 3-6 kHz range."""
    out = np.zeros(n)
    hi, lo = rng.uniform(4500, 6500), rng.uniform(2800, 3800)
    down = rng.random() < 0.6
    pos = int(rng.uniform(0, 0.3) * sr)
    while pos < n:
        for _ in range(int(rng.integers(2, 7))):
            chirp_n = int(rng.uniform(0.04, 0.12) * sr)
            freq = np.linspace(hi, lo, chirp_n) if down else np.linspace(lo, hi, chirp_n)
            chirp = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.hanning(chirp_n)
            _place(out, chirp, pos)
            pos += chirp_n + int(rng.uniform(0.04, 0.1) * sr)
        pos += int(rng.uniform(0.4, 1.2) * sr)
    return out.astype(np.float32)


def footsteps(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Regular dull thumps with a heel click, about two per second."""
    out = np.zeros(n)
    step = rng.uniform(0.45, 0.65)
    step_n = int(0.08 * sr)
    ts = _t(step_n, sr)
    for pos in np.arange(rng.uniform(0, 0.3), n / sr, step):
        thump = (shaped_noise(rng, step_n, sr, 60, 900) * np.exp(-ts / 0.02)
                 + 0.3 * shaped_noise(rng, step_n, sr, 2000, 6000) * np.exp(-ts / 0.003))
        _place(out, thump * rng.uniform(0.7, 1.0), int((pos + rng.normal(0, 0.01)) * sr))
    return out.astype(np.float32)


def dog(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Two to five harsh harmonic barks with a falling pitch."""
    out = np.zeros(n)
    f0 = rng.uniform(350, 600)
    pos = int(rng.uniform(0, 0.2) * sr)
    while pos < n:
        bark_n = int(rng.uniform(0.12, 0.25) * sr)
        tb = _t(bark_n, sr)
        freq = f0 * (1.15 - 0.3 * tb / tb[-1])
        phase = 2 * np.pi * np.cumsum(freq) / sr
        voiced = np.sum([np.sin(k * phase) / (1 + abs(k * f0 - 1000) / 500)
                         for k in range(1, 9)], axis=0)
        env = np.minimum(1.0, tb / 0.01) * np.exp(-tb / 0.08)
        _place(out, (voiced + 0.3 * shaped_noise(rng, bark_n, sr, 500, 3000)) * env, pos)
        pos += bark_n + int(rng.uniform(0.2, 0.5) * sr)
    return out.astype(np.float32)


def horn(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """One to three square-ish two-note honks."""
    out = np.zeros(n)
    f = rng.uniform(350, 450)
    pos = 0
    while pos < n:
        honk_n = int(rng.uniform(0.3, 0.9) * sr)
        th = _t(honk_n, sr)
        tone = np.sum([np.sin(2 * np.pi * k * f * th) / k
                       + np.sin(2 * np.pi * k * 1.26 * f * th) / k for k in (1, 3, 5, 7)], axis=0)
        _place(out, _fade(tone, sr, 0.01), pos)
        pos += honk_n + int(rng.uniform(0.15, 0.5) * sr)
    return out.astype(np.float32)


def bell(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Inharmonic, slowly decaying bell strikes."""
    out = np.zeros(n)
    f0 = rng.uniform(400, 900)
    pos = 0
    while pos < n:
        ring_n = min(n - pos, int(2.0 * sr))
        tr = _t(ring_n, sr)
        strike = np.sum([a * np.sin(2 * np.pi * f0 * r * tr) * np.exp(-tr / (0.9 / r))
                         for r, a in ((1.0, 1.0), (2.0, 0.6), (2.4, 0.5), (3.0, 0.4),
                                      (4.2, 0.3), (5.4, 0.2))], axis=0)
        _place(out, strike, pos)
        pos += int(rng.uniform(0.9, 1.5) * sr)
    return out.astype(np.float32)


SYNTHS: Final[Mapping[str, Synth]] = {
    "siren": siren, "alarm": alarm, "phone": phone, "knock": knock, "clock": clock,
    "engine": engine, "rain": rain, "wind": wind, "whistle": whistle, "bird": bird,
    "footsteps": footsteps, "dog": dog, "horn": horn, "bell": bell,
}
"""Event type -> synthesizer."""


def background(rng: np.random.Generator, kind: str, n: int, sr: int) -> Float32Array:
    """Background bed of ``kind`` (``none``, ``room``, ``street``), unit RMS (zeros for none)."""
    if kind == "room":
        return shaped_noise(rng, n, sr, 40, 3000, tilt=-0.5).astype(np.float32)
    if kind == "street":
        rumble = shaped_noise(rng, n, sr, 30, 400, tilt=-0.5)
        swell = 1.0 + 0.5 * shaped_noise(rng, n, sr, 0.05, 0.3)
        hiss = 0.3 * shaped_noise(rng, n, sr, 500, 5000)
        out: FloatArray = rumble * np.clip(swell, 0.3, None) + hiss
        scaled: Float32Array = (out / np.sqrt(np.mean(out**2))).astype(np.float32)
        return scaled
    return np.zeros(n, dtype=np.float32)
