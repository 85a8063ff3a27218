"""Procedural sound synthesizers of the demo corpus: one function per event type.

Every synthesizer takes a random generator, a length in samples and a sample
rate and returns float32 (n,) audio of arbitrary scale (the scene mixer sets
levels). Sounds are built from tones, sweeps and spectrally shaped noise
(FFT filtering, no SciPy). Each type has several *families* (a wailing, a
yelping and a two-tone siren; a small and a big dog; a church bell and a bicycle
bell ...) with wide random parameters, so that a model learns the type rather
than one recipe; :func:`colour` (random EQ) and :func:`reverberate` (a random
room) vary them further in the scene mixer.
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
    if start < 0:  # jittered to before the start: keep what falls inside
        sound, start = sound[-start:], 0
    end = min(len(out), start + len(sound))
    if start < end:
        out[start:end] += sound[: end - start]


def _decay(n: int, sr: int, tau_s: float) -> FloatArray:
    return np.exp(-_t(n, sr) / tau_s)


def _family(rng: np.random.Generator, weights: tuple[float, ...]) -> int:
    return int(rng.choice(len(weights), p=np.asarray(weights) / sum(weights)))


def colour(rng: np.random.Generator, x: FloatArray, sr: int) -> FloatArray:
    """A random EQ: spectral tilt, and maybe a low cut and a high cut (a cheap
    speaker, a wall between, a far microphone); RMS kept."""
    n = len(x)
    if n < 2:
        return x
    f = np.fft.rfftfreq(n, 1.0 / sr)
    f[0] = f[1]
    gain = (f / 1000.0) ** rng.uniform(-0.6, 0.3)
    if rng.random() < 0.5:
        gain /= 1.0 + (rng.uniform(60, 600) / f) ** 2
    if rng.random() < 0.5:
        gain /= 1.0 + (f / rng.uniform(1500, 9000)) ** 2
    out = np.fft.irfft(np.fft.rfft(x) * gain, n)
    before, after = float(np.sqrt(np.mean(x**2))), float(np.sqrt(np.mean(out**2)))
    return out * (before / after) if after > 0 else out


def reverberate(rng: np.random.Generator, x: FloatArray, sr: int) -> FloatArray:
    """``x`` in a random room: an exponentially decaying noise tail (RT60 0.15-1.5 s)
    after the direct sound, mixed wet 10-60 %, same length."""
    n = len(x)
    rt60 = rng.uniform(0.15, 1.5)
    ir_n = max(2, int(min(rt60, 1.2) * sr))
    ir = rng.standard_normal(ir_n) * np.exp(-6.9 * _t(ir_n, sr) / rt60)
    ir = shaped_noise(rng, ir_n, sr, 80, rng.uniform(3000, 9000)) * np.abs(ir)
    ir *= 1.0 / max(float(np.sqrt(np.sum(ir**2))), 1e-9)
    size = n + ir_n
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[:n]
    mix = rng.uniform(0.1, 0.6)
    scale = float(np.sqrt(np.mean(x**2))) / max(float(np.sqrt(np.mean(wet**2))), 1e-12)
    out: FloatArray = (1 - mix) * x + mix * scale * wet
    return out


def siren(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Wail (slow sweep), yelp (fast sweep) or hi-lo (two alternating tones)."""
    t = _t(n, sr)
    family = _family(rng, (0.4, 0.3, 0.3))
    if family == 2:
        lo = rng.uniform(400, 900)
        step = rng.uniform(0.3, 1.0)
        freq = np.where((t // step) % 2 == 0, lo, lo * rng.uniform(1.15, 1.5))
    else:
        rate = rng.uniform(0.1, 0.6) if family == 0 else rng.uniform(2.0, 8.0)
        centre, dev = rng.uniform(600, 1400), rng.uniform(150, 600)
        freq = centre + dev * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    tone = np.tanh(rng.uniform(0.5, 3.0) * np.sin(phase)) + rng.uniform(0, 0.4) * np.sin(2 * phase)
    return _fade(tone, sr, 0.2).astype(np.float32)


def alarm(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """High beeps in a regular pattern: steady pulses, groups of three, or rising beeps."""
    f = rng.uniform(1200, 4500)
    t = _t(n, sr)
    family = _family(rng, (0.5, 0.25, 0.25))
    if family == 1:
        on, off = rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5)
        cycle = 3 * (on + off) + rng.uniform(0.7, 1.6)
        pos = t % cycle
        gate = (pos < 3 * (on + off)) & ((pos % (on + off)) < on)
    else:
        on = rng.uniform(0.05, 0.4)
        period = on * rng.uniform(1.3, 3.0)
        gate = (t % period) < on
    freq = f * (1 + 0.3 * (t % 0.25) / 0.25) if family == 2 else np.full(n, f)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    tone = np.sin(phase) + rng.uniform(0.1, 0.5) * np.sin(3 * phase)
    return (tone * gate).astype(np.float32)


def phone(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Ring bursts: a warbling trill, a two-tone line ring (double or long), or a
    bell-type ring (a hammer striking a small bell ~20 times a second)."""
    t = _t(n, sr)
    family = _family(rng, (0.3, 0.45, 0.25))
    if family == 0:
        f1 = rng.uniform(600, 1200)
        trill = rng.uniform(12, 28)
        freq = np.where(np.sin(2 * np.pi * trill * t) > 0, f1, f1 * rng.uniform(1.15, 1.35))
        tone = np.sin(2 * np.pi * np.cumsum(freq) / sr)
    elif family == 1:
        f1 = rng.uniform(330, 520)
        tone = np.sin(2 * np.pi * f1 * t) + np.sin(2 * np.pi * (f1 + rng.uniform(25, 90)) * t)
        tone *= 1 + rng.uniform(0, 0.4) * np.sin(2 * np.pi * rng.uniform(15, 25) * t)
    else:
        f0 = rng.uniform(800, 2400)
        rate = rng.uniform(15, 28)
        tr = t % (1.0 / rate)
        tone = (np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(2 * np.pi * 2.7 * f0 * t)) * np.exp(
            -tr / 0.02)
    period = rng.uniform(2.0, 6.0)
    cycle = t % period
    if rng.random() < 0.5:
        on, gap = rng.uniform(0.3, 0.5), rng.uniform(0.15, 0.3)
        gate = (cycle < on) | ((cycle > on + gap) & (cycle < 2 * on + gap))
    else:
        gate = cycle < rng.uniform(0.8, min(2.2, period - 0.3))
    return (tone * gate).astype(np.float32)


def knock(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Groups of two to four damped low thuds with a click."""
    out = np.zeros(n)
    hit_n = int(0.15 * sr)
    f = rng.uniform(70, 450)
    damp = rng.uniform(0.01, 0.05)
    click = rng.uniform(0.1, 0.9)
    pos = int(rng.uniform(0.0, 0.3) * sr)
    while pos < n:
        for _ in range(int(rng.integers(2, 7))):
            th = _t(hit_n, sr)
            body = sum(a * np.sin(2 * np.pi * f * r * th) for r, a in ((1, 1), (1.6, 0.5),
                                                                      (2.3, 0.3)))
            hit = (body * np.exp(-th / damp)
                   + click * shaped_noise(rng, hit_n, sr, 600, 5000) * np.exp(-th / 0.004))
            _place(out, hit * rng.uniform(0.6, 1.0), pos)
            pos += int(rng.uniform(0.1, 0.35) * sr)
        pos += int(rng.uniform(0.6, 2.5) * sr)
    return out.astype(np.float32)


def clock(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Regular short high clicks, alternating tick and tock."""
    out = np.zeros(n)
    period = max(1, int(rng.choice([rng.uniform(0.2, 0.35), 0.5, 1.0, rng.uniform(0.4, 1.2)])
                        * sr))
    click_n = int(0.02 * sr)
    base = rng.uniform(1500, 5000)
    noisy = rng.uniform(0.0, 1.0)
    tock = rng.uniform(0.5, 1.0)
    for k, pos in enumerate(range(int(rng.uniform(0, 0.3) * sr), n, period)):
        tc = _t(click_n, sr)
        f = base if k % 2 == 0 else base * rng.uniform(0.75, 0.9)
        tick = (np.sin(2 * np.pi * f * tc) + noisy * shaped_noise(rng, click_n, sr, 1500, 9000)
                ) * np.exp(-tc / rng.uniform(0.001, 0.004))
        _place(out, tick * (1.0 if k % 2 == 0 else tock), pos + int(rng.normal(0, 0.002) * sr))
    return out.astype(np.float32)


def engine(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Low harmonic hum with firing-rate modulation and rumble."""
    t = _t(n, sr)
    family = _family(rng, (0.5, 0.25, 0.25))  # idling, revving, diesel
    drift = 1 + rng.uniform(0.01, 0.08) * np.sin(2 * np.pi * rng.uniform(0.03, 0.3) * t)
    if family == 1:
        drift = drift * (1 + rng.uniform(0.3, 1.2) * np.sin(np.pi * t / max(t[-1], 1.0 / sr)) ** 2)
    f0 = rng.uniform(15, 70) * drift
    phase = 2 * np.pi * np.cumsum(f0) / sr
    slope = rng.uniform(0.3, 1.2)
    hum = np.sum([rng.uniform(0.3, 1.0) * np.sin(k * phase) / k**slope for k in range(1, 15)],
                 axis=0)
    pulses = (1 + np.cos(phase)) ** (4 if family == 2 else 1)
    rumble = shaped_noise(rng, n, sr, 25, rng.uniform(200, 900)) * pulses / np.max(pulses)
    return _fade(hum + rng.uniform(0.3, 1.0) * rumble, sr, 0.3).astype(np.float32)


def rain(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Broadband hiss with many random drop clicks."""
    out = rng.uniform(0.3, 1.0) * shaped_noise(rng, n, sr, rng.uniform(150, 1000),
                                                rng.uniform(4000, 12000),
                                                tilt=rng.uniform(-0.6, 0.0))
    drop_n = int(0.01 * sr)
    drops = rng.integers(0, max(1, n - drop_n), size=int(rng.uniform(20, 500) * n / sr))
    clicks = [shaped_noise(rng, drop_n, sr, 1000, 8000) * _decay(drop_n, sr, 0.0015),
              np.sin(2 * np.pi * rng.uniform(1500, 6000) * _t(drop_n, sr))
              * _decay(drop_n, sr, 0.002)]
    for k, pos in enumerate(drops):
        _place(out, clicks[k % 2] * rng.uniform(0.5, 3), int(pos))
    return _fade(out, sr, 0.3).astype(np.float32)


def wind(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Low rumbling noise with slow gusts."""
    gust = shaped_noise(rng, n, sr, 0.05, 0.6)
    envelope = np.clip(1.0 + rng.uniform(0.3, 0.9) * gust, 0.1, None)
    roar = shaped_noise(rng, n, sr, rng.uniform(20, 120), rng.uniform(400, 2000),
                        tilt=rng.uniform(-1.0, -0.3))
    if rng.random() < 0.4:  # whistling through a gap: a narrow band that follows the gusts
        centre = rng.uniform(300, 1400) * np.sqrt(envelope)
        band = np.sin(2 * np.pi * np.cumsum(centre) / sr) * shaped_noise(rng, n, sr, 0.5, 30)
        roar = roar + rng.uniform(0.3, 1.5) * band
    return _fade(roar * envelope, sr, 0.5).astype(np.float32)


def whistle(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """One to three steady high blasts with vibrato."""
    out = np.zeros(n)
    f = rng.uniform(1500, 4500)
    trill = rng.uniform(15, 45) if rng.random() < 0.5 else 0.0  # a pea whistle rattles
    pos = int(rng.uniform(0, 0.3) * sr)
    while pos < n:
        blast_n = int(rng.uniform(0.2, 2.0) * sr)
        tb = _t(blast_n, sr)
        freq = f * (1 + rng.uniform(0.002, 0.015) * np.sin(2 * np.pi * rng.uniform(4, 8) * tb))
        tone = np.sin(2 * np.pi * np.cumsum(freq) / sr)
        if trill:
            tone *= 0.55 + 0.45 * np.sin(2 * np.pi * trill * tb)
        tone += rng.uniform(0.02, 0.15) * shaped_noise(rng, blast_n, sr, f * 0.8, f * 1.3)
        _place(out, _fade(tone, sr, 0.02), pos)
        pos += blast_n + int(rng.uniform(0.2, 1.2) * sr)
    return out.astype(np.float32)


def bird(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Groups of short fast frequency sweeps in the 3-6 kHz range."""
    out = np.zeros(n)
    base = rng.uniform(1800, 6500)
    pos = int(rng.uniform(0, 0.3) * sr)
    while pos < n:
        style = _family(rng, (0.5, 0.25, 0.25))  # sweeps, warbles, trilled notes
        span = rng.uniform(-0.7, 0.7) * base
        for _ in range(int(rng.integers(2, 10))):
            chirp_n = int(rng.uniform(0.02, 0.2) * sr)
            tc = _t(chirp_n, sr)
            if style == 0:
                freq = base + span * np.linspace(0, 1, chirp_n)
            elif style == 1:
                freq = base * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(25, 90) * tc))
            else:
                freq = np.full(chirp_n, base * rng.uniform(0.9, 1.3))
            freq = np.clip(freq, 900, 9000)
            chirp = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.hanning(chirp_n)
            _place(out, chirp * rng.uniform(0.5, 1.0), pos)
            pos += chirp_n + int(rng.uniform(0.02, 0.15) * sr)
        pos += int(rng.uniform(0.3, 2.0) * sr)
        base = float(np.clip(base * rng.uniform(0.8, 1.25), 1500, 7000))
    return out.astype(np.float32)


def footsteps(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Regular dull thumps with a heel click, about two per second."""
    out = np.zeros(n)
    step = rng.uniform(0.35, 0.85)
    surface = _family(rng, (0.4, 0.35, 0.25))  # hard floor, carpet, gravel
    step_n = int((0.25 if surface == 2 else 0.1) * sr)
    ts = _t(step_n, sr)
    for pos in np.arange(rng.uniform(0, 0.3), n / sr, step):
        if surface == 0:
            thump = (shaped_noise(rng, step_n, sr, 600, 8000) * np.exp(-ts / 0.006)
                     + 0.3 * shaped_noise(rng, step_n, sr, 60, 900) * np.exp(-ts / 0.02))
        elif surface == 1:
            thump = (shaped_noise(rng, step_n, sr, 40, 700) * np.exp(-ts / 0.03)
                     + 0.1 * shaped_noise(rng, step_n, sr, 2000, 6000) * np.exp(-ts / 0.003))
        else:
            grains = rng.standard_normal(step_n) * (rng.random(step_n) < 0.06)
            thump = 3 * grains * np.exp(-ts / 0.08)
        _place(out, thump * rng.uniform(0.6, 1.0), int((pos + rng.normal(0, 0.02)) * sr))
    return out.astype(np.float32)


def dog(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Two to five harsh harmonic barks with a falling pitch."""
    out = np.zeros(n)
    size = _family(rng, (1, 1, 1))  # small, medium, big dog
    f0 = (rng.uniform(450, 950), rng.uniform(280, 550), rng.uniform(140, 320))[size]
    formant = (rng.uniform(1000, 2200), rng.uniform(700, 1500), rng.uniform(350, 900))[size]
    pos = int(rng.uniform(0, 0.3) * sr)
    while pos < n:
        for _ in range(int(rng.integers(1, 5))):
            bark_n = int(rng.uniform(0.08, 0.35) * sr)
            tb = _t(bark_n, sr)
            rise = rng.uniform(0.0, 0.4)
            freq = f0 * (1 + rise * np.sin(np.pi * tb / tb[-1]) - 0.2 * tb / tb[-1])
            phase = 2 * np.pi * np.cumsum(freq) / sr
            voiced = np.sum([np.sin(k * phase) / (1 + abs(k * f0 - formant) / (0.5 * formant))
                             for k in range(1, 16)], axis=0)
            env = np.minimum(1.0, tb / 0.008) * np.exp(-tb / rng.uniform(0.05, 0.15))
            breath = rng.uniform(0.2, 0.9) * shaped_noise(rng, bark_n, sr, 400, 4000)
            _place(out, (voiced + breath) * env * rng.uniform(0.6, 1.0), pos)
            pos += bark_n + int(rng.uniform(0.08, 0.45) * sr)
        pos += int(rng.uniform(0.3, 2.0) * sr)
    return out.astype(np.float32)


def horn(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """One to three square-ish two-note honks."""
    out = np.zeros(n)
    family = _family(rng, (0.5, 0.25, 0.25))  # car (two notes), truck air horn (chord), one note
    f = rng.uniform(150, 300) if family == 1 else rng.uniform(280, 500)
    ratios = ((1.0, rng.uniform(1.18, 1.32)), (1.0, 1.25, 1.5), (1.0,))[family]
    drive = rng.uniform(1.0, 4.0)
    pos = int(rng.uniform(0, 0.3) * sr)
    while pos < n:
        honk_n = int(rng.uniform(0.15, 1.8) * sr)
        th = _t(honk_n, sr)
        tone = np.sum([np.tanh(drive * np.sin(2 * np.pi * r * f * th)) for r in ratios], axis=0)
        _place(out, _fade(tone, sr, 0.01), pos)
        pos += honk_n + int(rng.uniform(0.1, 1.5) * sr)
    return out.astype(np.float32)


def bell(rng: np.random.Generator, n: int, sr: int) -> Float32Array:
    """Inharmonic, slowly decaying bell strikes."""
    out = np.zeros(n)
    family = _family(rng, (0.4, 0.35, 0.25))  # church bell, hand bell, bicycle bell
    f0 = (rng.uniform(150, 500), rng.uniform(400, 1500), rng.uniform(2200, 4500))[family]
    decay = (rng.uniform(1.5, 4.0), rng.uniform(0.4, 1.5), rng.uniform(0.15, 0.5))[family]
    gap = (rng.uniform(1.0, 2.5), rng.uniform(0.3, 1.5), rng.uniform(0.1, 0.3))[family]
    partials = (((0.5, 0.6), (1.0, 1.0), (1.19, 0.7), (1.5, 0.5), (2.0, 0.5), (2.5, 0.3)),
                ((1.0, 1.0), (2.0, 0.6), (2.4, 0.5), (3.0, 0.4), (4.2, 0.3), (5.4, 0.2)),
                ((1.0, 1.0), (1.5, 0.6), (2.1, 0.3)))[family]
    pos = int(rng.uniform(0, 0.3) * sr)
    while pos < n:
        ring_n = min(n - pos, int(min(4.0, 4 * decay) * sr))
        tr = _t(ring_n, sr)
        strike = np.sum([a * np.sin(2 * np.pi * f0 * r * tr) * np.exp(-tr * r**0.5 / decay)
                         for r, a in partials], axis=0)
        _place(out, strike * rng.uniform(0.7, 1.0), pos)
        pos += int(gap * rng.uniform(0.85, 1.15) * sr)
        if family == 2 and rng.random() < 0.3:
            pos += int(rng.uniform(0.4, 1.5) * sr)
    return out.astype(np.float32)


SYNTHS: Final[Mapping[str, Synth]] = {
    "siren": siren, "alarm": alarm, "phone": phone, "knock": knock, "clock": clock,
    "engine": engine, "rain": rain, "wind": wind, "whistle": whistle, "bird": bird,
    "footsteps": footsteps, "dog": dog, "horn": horn, "bell": bell,
}
"""Event type -> synthesizer."""


BACKGROUNDS: Final = ("none", "room", "street", "hum", "chatter", "hiss")
"""Background beds: nothing, room tone, street, mains hum, distant chatter, broadband hiss."""


def _chatter(rng: np.random.Generator, n: int, sr: int) -> FloatArray:
    """Several distant voices: sawtooth buzz with wandering pitch and syllable rhythm,
    pauses, then one vowel-like band for them all (a room away)."""
    control = np.arange(n) / sr * 100.0  # contours drawn at 100 Hz, interpolated
    steps = int(control[-1]) + 2 if n else 2
    out = np.zeros(n)
    for _ in range(int(rng.integers(3, 9))):
        pitch = np.cumsum(rng.normal(0, 0.02, steps))
        f0 = rng.uniform(85, 260) * np.exp(np.interp(control, np.arange(steps),
                                                     pitch - pitch.mean()))
        buzz = 2.0 * ((np.cumsum(f0) / sr) % 1.0) - 1.0  # every harmonic, falling as 1/k
        rate = rng.uniform(3.0, 6.0)
        syllables = np.clip(np.sin(2 * np.pi * rate * control / 100.0 + rng.uniform(0, 6.3))
                            + rng.normal(0, 0.3, steps)[control.astype(int)], 0, None)
        talking = np.repeat(rng.random(n // sr + 2) < 0.7, sr)[:n]
        out += buzz * syllables * talking
    f = np.fft.rfftfreq(n, 1.0 / sr)
    lo, hi = rng.uniform(200, 500), rng.uniform(1500, 3500)
    band = 1 / (1 + (lo / np.maximum(f, 1.0)) ** 2) / (1 + (f / hi) ** 4)
    mixed: FloatArray = np.fft.irfft(np.fft.rfft(out) * band, n) + 0.02 * rng.standard_normal(n)
    return mixed


def background(rng: np.random.Generator, kind: str, n: int, sr: int) -> Float32Array:
    """Background bed of ``kind`` (:data:`BACKGROUNDS`), unit RMS (zeros for none)."""
    if kind == "room":
        return shaped_noise(rng, n, sr, rng.uniform(20, 80), rng.uniform(1500, 6000),
                            tilt=rng.uniform(-1.0, -0.3)).astype(np.float32)
    if kind == "hum":
        mains = 50.0 if rng.random() < 0.5 else 60.0
        t = _t(n, sr)
        tone = np.sum([rng.uniform(0.1, 1.0) / k * np.sin(2 * np.pi * k * mains * t
                                                         + rng.uniform(0, 6.3))
                       for k in range(1, 9)], axis=0)
        tone /= max(float(np.sqrt(np.mean(tone**2))), 1e-9)
        fan = shaped_noise(rng, n, sr, 60, 2500, tilt=-0.5)
        hum: FloatArray = tone + rng.uniform(0.1, 0.6) * fan
        bed: Float32Array = (hum / np.sqrt(np.mean(hum**2))).astype(np.float32)
        return bed
    if kind == "chatter":
        voices = _chatter(rng, n, sr)
        return (voices / max(float(np.sqrt(np.mean(voices**2))), 1e-9)).astype(np.float32)
    if kind == "hiss":
        return shaped_noise(rng, n, sr, 20, 0.45 * sr,
                            tilt=rng.uniform(-1.0, 0.0)).astype(np.float32)
    if kind == "street":
        rumble = shaped_noise(rng, n, sr, 30, 400, tilt=-0.5)
        swell = 1.0 + 0.5 * shaped_noise(rng, n, sr, 0.05, 0.3)
        hiss = 0.3 * shaped_noise(rng, n, sr, 500, 5000)
        out: FloatArray = rumble * np.clip(swell, 0.3, None) + hiss
        scaled: Float32Array = (out / np.sqrt(np.mean(out**2))).astype(np.float32)
        return scaled
    return np.zeros(n, dtype=np.float32)
