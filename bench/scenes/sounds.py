"""Sound makers of the independent evaluation scenes: several families per sound type.

Written apart from the training corpus on purpose (no code shared with
``streamcap/training/data``): other designs, other parameter ranges, 44.1 kHz,
time-domain FIR filtering and additive partials. Every maker takes a random
generator, a duration in seconds and a sample rate and returns float64 audio
of arbitrary scale (the mixer sets levels). Each draws one of its *families*
(e.g. a wailing, a yelping and a two-tone siren) and then wide random
parameters, so that a model that only learned one recipe per type fails here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

Audio = npt.NDArray[np.float64]
Maker = Callable[[np.random.Generator, float, int], Audio]


# ----------------------------------------------------------------------------- helpers


def times(seconds: float, sr: int) -> Audio:
    return np.arange(round(seconds * sr)) / sr


def sinc_kernel(sr: int, lo_hz: float, hi_hz: float, taps: int = 255) -> Audio:
    """Windowed-sinc band-pass FIR kernel (lo_hz <= 0: low-pass)."""
    m = np.arange(taps) - (taps - 1) / 2
    def low(fc: float) -> Audio:
        return 2 * fc / sr * np.sinc(2 * fc / sr * m)
    hi = min(hi_hz, 0.49 * sr)
    h = low(hi) - (low(lo_hz) if lo_hz > 0 else 0.0)
    out: Audio = h * np.blackman(taps)
    return out


def fir(x: Audio, sr: int, lo_hz: float, hi_hz: float, taps: int = 255) -> Audio:
    """``x`` band-passed by a windowed-sinc FIR (same length)."""
    if len(x) == 0:
        return x
    out: Audio = np.convolve(x, sinc_kernel(sr, lo_hz, hi_hz, taps), mode="same")
    return out


def noise_band(rng: np.random.Generator, seconds: float, sr: int, lo_hz: float,
               hi_hz: float) -> Audio:
    x = fir(rng.standard_normal(len(times(seconds, sr))), sr, lo_hz, hi_hz)
    rms = float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
    return x / rms if rms > 0 else x


def osc(freq: Audio | float, n: int, sr: int, phase0: float = 0.0) -> Audio:
    """Phase of an oscillator following ``freq`` (Hz per sample, or constant)."""
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    out: Audio = phase0 + 2 * np.pi * np.cumsum(f) / sr
    return out


def attack_release(n: int, sr: int, attack_s: float, release_s: float) -> Audio:
    env = np.ones(n)
    a, r = min(n, int(attack_s * sr)), min(n, int(release_s * sr))
    if a > 0:
        env[:a] = np.linspace(0, 1, a)
    if r > 0:
        env[n - r:] *= np.linspace(1, 0, r)
    return env


def add_at(out: Audio, sound: Audio, start: int) -> None:
    if start >= len(out) or start + len(sound) <= 0:
        return
    s0 = max(0, -start)
    end = min(len(out), start + len(sound))
    out[max(0, start):end] += sound[s0:s0 + end - max(0, start)]


def partials(t: Audio, f0: float, ratios: Mapping[float, float], decay_s: float) -> Audio:
    """Sum of decaying sinusoids at ``f0 * ratio`` (higher partials decay faster)."""
    out = np.zeros(len(t))
    for ratio, amp in ratios.items():
        out += amp * np.sin(2 * np.pi * f0 * ratio * t) * np.exp(-t * ratio**0.7 / decay_s)
    return out


def family(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(0, n))


# ----------------------------------------------------------------------------- sounds


def siren(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Wail (slow sweep), yelp (fast sweep) or hi-lo (two alternating tones)."""
    t = times(seconds, sr)
    kind = family(rng, 3)
    if kind == 2:
        lo = rng.uniform(380, 700)
        hi = lo * rng.uniform(1.2, 1.45)
        half = rng.uniform(0.35, 0.9)
        freq = np.where((t // half) % 2 == 0, lo, hi)
    else:
        rate = rng.uniform(0.12, 0.6) if kind == 0 else rng.uniform(2.5, 7.0)
        lo, hi = rng.uniform(500, 900), rng.uniform(1100, 1800)
        tri = 2 * np.abs((t * rate + rng.uniform()) % 1.0 - 0.5)  # triangle sweep 0..1
        freq = lo + (hi - lo) * tri ** rng.uniform(0.7, 1.5)
    ph = osc(freq, len(t), sr)
    drive = rng.uniform(1.0, 4.0)
    return np.tanh(drive * np.sin(ph)) + rng.uniform(0, 0.3) * np.sin(3 * ph)


def alarm(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Regular beeps: steady piezo beeps, a three-beep pattern, or chirped beeps."""
    t = times(seconds, sr)
    f = rng.uniform(1400, 4200)
    kind = family(rng, 3)
    if kind == 1:  # temporal-three: three beeps, pause
        on, gap = rng.uniform(0.3, 0.5), rng.uniform(0.3, 0.5)
        cycle = 3 * (on + gap) + rng.uniform(0.8, 1.5)
        pos = t % cycle
        gate = (pos < 3 * (on + gap)) & ((pos % (on + gap)) < on)
        tone = np.sign(np.sin(osc(f, len(t), sr)))
        tone = fir(tone, sr, 0, 9000)
    else:
        on = rng.uniform(0.05, 0.35)
        period = on + rng.uniform(0.05, 0.4)
        gate = (t % period) < on
        if kind == 2:
            sweep = f * (1 + 0.25 * ((t % period) / on))
            tone = np.sin(osc(sweep, len(t), sr))
        else:
            tone = np.sin(osc(f, len(t), sr)) + 0.4 * np.sin(osc(2 * f, len(t), sr))
    return tone * gate


def phone(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Two-tone double ring, long single ring, or an electromechanical bell ring."""
    t = times(seconds, sr)
    kind = family(rng, 3)
    if kind == 2:  # hammer striking two small bells ~20 times a second
        rate = rng.uniform(16, 28)
        f0 = rng.uniform(900, 2200)
        out = np.zeros(len(t))
        strike_t = times(0.06, sr)
        ping = partials(strike_t, f0, {1.0: 1.0, 2.7: 0.5, 5.2: 0.25}, 0.05)
        cycle = rng.uniform(3.0, 5.0)
        ring = rng.uniform(1.0, 2.0)
        for s in np.arange(0, seconds, 1 / rate):
            if s % cycle < ring:
                add_at(out, ping * rng.uniform(0.8, 1.0), int(s * sr))
        return out
    f1 = rng.uniform(350, 520)
    f2 = f1 + rng.uniform(30, 80)
    tone = np.sin(osc(f1, len(t), sr)) + np.sin(osc(f2, len(t), sr))
    tone = tone * (1 + 0.3 * np.sin(osc(rng.uniform(15, 25), len(t), sr)))
    if kind == 0:
        cycle = t % rng.uniform(2.6, 3.4)
        gate = (cycle < 0.4) | ((cycle > 0.6) & (cycle < 1.0))
    else:
        cycle = t % rng.uniform(4.5, 6.0)
        gate = cycle < rng.uniform(1.2, 2.0)
    return tone * gate


def knock(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Knuckles on a door: runs of 2-6 wooden knocks, light or heavy."""
    out = np.zeros(len(times(seconds, sr)))
    heavy = family(rng, 2) == 1
    body_hz = rng.uniform(70, 160) if heavy else rng.uniform(150, 420)
    hit_t = times(0.18, sr)
    pos = rng.uniform(0.0, 0.5)
    while pos < seconds:
        for _ in range(int(rng.integers(2, 7))):
            body = partials(hit_t, body_hz * rng.uniform(0.95, 1.05), {1.0: 1.0, 1.6: 0.5,
                                                                      2.3: 0.3}, 0.025)
            crack = fir(rng.standard_normal(len(hit_t)), sr, 600, 5000) * np.exp(-hit_t / 0.003)
            add_at(out, (body + rng.uniform(0.2, 0.8) * crack) * rng.uniform(0.6, 1.0),
                   int(pos * sr))
            pos += rng.uniform(0.1, 0.35)
        pos += rng.uniform(0.7, 2.5)
    return out


def clock(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """A ticking clock: mechanical tick-tock, a quiet quartz tick, or a fast watch."""
    out = np.zeros(len(times(seconds, sr)))
    kind = family(rng, 3)
    period = {0: rng.uniform(0.45, 1.05), 1: rng.uniform(0.95, 1.05), 2: rng.uniform(0.18, 0.3)}[kind]
    lo, hi = rng.uniform(1200, 3000), rng.uniform(5000, 9000)
    click_t = times(0.02, sr)
    base = fir(rng.standard_normal(len(click_t)), sr, lo, hi) * np.exp(-click_t / rng.uniform(0.001, 0.004))
    resonance = np.sin(2 * np.pi * rng.uniform(2000, 5000) * click_t) * np.exp(-click_t / 0.004)
    for k, s in enumerate(np.arange(rng.uniform(0, period), seconds, period)):
        gain = 1.0 if k % 2 == 0 or kind != 0 else rng.uniform(0.5, 0.8)
        add_at(out, gain * (base + 0.5 * resonance), int((s + rng.normal(0, 0.002)) * sr))
    return out


def engine(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """An idling or revving motor: harmonics of the firing rate, exhaust noise, or a diesel."""
    t = times(seconds, sr)
    kind = family(rng, 3)
    fire = rng.uniform(18, 65)
    drift = 1 + rng.uniform(0.02, 0.1) * np.sin(osc(rng.uniform(0.03, 0.3), len(t), sr))
    if kind == 1:  # revving: the firing rate rises and falls
        drift = drift * (1 + rng.uniform(0.4, 1.2) * np.sin(np.pi * t / seconds) ** 2)
    ph = osc(fire * drift, len(t), sr)
    amps = rng.uniform(0.2, 1.0, size=14) / np.arange(1, 15) ** rng.uniform(0.3, 1.0)
    hum = sum(a * np.sin(k * ph + rng.uniform(0, 6.3)) for k, a in enumerate(amps, start=1))
    rumble = fir(rng.standard_normal(len(t)), sr, 20, rng.uniform(300, 900))
    pulses = (1 + np.cos(ph)) ** (4 if kind == 2 else 1)
    out: Audio = np.asarray(hum) + rng.uniform(0.3, 1.0) * rumble * pulses / np.max(pulses)
    return out * attack_release(len(t), sr, 0.3, 0.3)


def rain(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Rain: a hiss bed plus drops (plinks on a roof, splashes on a window or in puddles)."""
    n = len(times(seconds, sr))
    lo, hi = rng.uniform(200, 1200), rng.uniform(4000, 12000)
    bed = fir(rng.standard_normal(n), sr, lo, hi)
    out = rng.uniform(0.3, 1.0) * bed / max(float(np.sqrt(np.mean(bed**2))), 1e-9)
    rate = rng.uniform(30, 600)  # drops per second
    drop_t = times(0.012, sr)
    for s in rng.uniform(0, seconds, size=int(rate * seconds)):
        if rng.random() < 0.5:
            drop = np.sin(2 * np.pi * rng.uniform(1500, 7000) * drop_t) * np.exp(-drop_t / 0.002)
        else:
            drop = rng.standard_normal(len(drop_t)) * np.exp(-drop_t / rng.uniform(0.001, 0.004))
        add_at(out, drop * rng.uniform(0.5, 3.0), int(s * sr))
    return out * attack_release(n, sr, 0.5, 0.5)


def wind(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Wind: a low roar with gusts, or whistling through a gap (a moving narrow band)."""
    n = len(times(seconds, sr))
    step = max(1, sr // 50)
    walk = np.cumsum(rng.standard_normal(n // step + 2))
    walk = (walk - walk.mean()) / (walk.std() + 1e-9)
    env = np.clip(1 + 0.6 * np.interp(np.arange(n), np.arange(len(walk)) * step, walk), 0.1, None)
    brown = np.cumsum(rng.standard_normal(n))
    brown -= np.convolve(brown, np.ones(2001) / 2001, mode="same")
    roar = fir(brown, sr, 30, rng.uniform(400, 1500))
    roar /= max(float(np.sqrt(np.mean(roar**2))), 1e-9)
    if family(rng, 2) == 1:
        centre = rng.uniform(400, 1200) * env ** 0.5
        whistle = np.sin(osc(centre, n, sr)) * fir(rng.standard_normal(n), sr, 0, 40)
        roar = roar + rng.uniform(0.5, 2.0) * whistle / max(float(np.std(whistle)), 1e-9)
    out: Audio = roar * env * attack_release(n, sr, 0.8, 0.8)
    return out


def whistle(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """A pea whistle (trilled) or a plain whistle: one to four blasts, short or long."""
    n = len(times(seconds, sr))
    out = np.zeros(n)
    f = rng.uniform(2000, 4200)
    trill = rng.uniform(20, 45) if family(rng, 2) == 0 else 0.0
    pos = rng.uniform(0, 0.3)
    while pos < seconds:
        blast = times(rng.uniform(0.2, 1.8), sr)
        freq = f * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 8) * blast))
        tone = np.sin(osc(freq, len(blast), sr))
        if trill:
            tone *= 0.55 + 0.45 * np.sin(2 * np.pi * trill * blast)
        tone += 0.05 * fir(rng.standard_normal(len(blast)), sr, f * 0.8, f * 1.3)
        add_at(out, tone * attack_release(len(blast), sr, 0.015, 0.04), int(pos * sr))
        pos += len(blast) / sr + rng.uniform(0.2, 1.2)
    return out


def bird(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Songbird phrases: chirps (up/down sweeps), warbles or trills, 1.5-9 kHz."""
    n = len(times(seconds, sr))
    out = np.zeros(n)
    pos = rng.uniform(0, 0.5)
    base = rng.uniform(1800, 5000)
    while pos < seconds:
        style = family(rng, 3)
        for _ in range(int(rng.integers(2, 10))):
            dur = rng.uniform(0.02, 0.2)
            st = times(dur, sr)
            if style == 0:  # sweep
                span = rng.uniform(-1, 1) * base * rng.uniform(0.3, 0.8)
                freq = base + span * st / dur
            elif style == 1:  # warble
                freq = base * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(30, 90) * st))
            else:  # trill note
                freq = np.full(len(st), base * rng.uniform(0.9, 1.4))
            syl = np.sin(osc(np.clip(freq, 800, 9500), len(st), sr)) * np.hanning(len(st))
            add_at(out, syl * rng.uniform(0.5, 1.0), int(pos * sr))
            pos += dur + rng.uniform(0.02, 0.15)
        pos += rng.uniform(0.3, 2.0)
        base = float(np.clip(base * rng.uniform(0.8, 1.25), 1500, 6500))
    return out


def footsteps(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Walking on a hard floor (heel-toe clicks), on carpet (dull thuds) or on gravel."""
    out = np.zeros(len(times(seconds, sr)))
    surface = family(rng, 3)
    pace = rng.uniform(0.38, 0.8)
    step_t = times(0.25 if surface == 2 else 0.1, sr)
    for s in np.arange(rng.uniform(0, 0.4), seconds, pace):
        if surface == 0:
            heel = fir(rng.standard_normal(len(step_t)), sr, 800, 8000) * np.exp(-step_t / 0.006)
            toe = fir(rng.standard_normal(len(step_t)), sr, 1500, 9000) * np.exp(-step_t / 0.004)
            sound = heel
            add_at(out, 0.5 * toe * rng.uniform(0.5, 1.0), int((s + rng.uniform(0.05, 0.1)) * sr))
        elif surface == 1:
            sound = fir(rng.standard_normal(len(step_t)), sr, 40, 600) * np.exp(-step_t / 0.03)
        else:
            grains = rng.standard_normal(len(step_t)) * (rng.random(len(step_t)) < 0.05)
            sound = fir(grains, sr, 1000, 10000) * np.exp(-step_t / 0.08) * 3
        add_at(out, sound * rng.uniform(0.6, 1.0), int((s + rng.normal(0, 0.02)) * sr))
    return out


def dog(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Barks of a small, medium or big dog: voiced bursts with formants and breath noise."""
    n = len(times(seconds, sr))
    out = np.zeros(n)
    size = family(rng, 3)
    f0 = {0: rng.uniform(500, 950), 1: rng.uniform(300, 550), 2: rng.uniform(150, 320)}[size]
    formant = {0: (900, 3500), 1: (600, 2800), 2: (300, 2000)}[size]
    pos = rng.uniform(0, 0.5)
    while pos < seconds:
        for _ in range(int(rng.integers(1, 5))):
            dur = rng.uniform(0.08, 0.35)
            bt = times(dur, sr)
            contour = f0 * (1 + rng.uniform(0.1, 0.4) * np.sin(np.pi * bt / dur))
            ph = osc(contour, len(bt), sr)
            voiced = sum(np.sin(k * ph) / k ** 0.6 for k in range(1, 16))
            voiced = fir(np.asarray(voiced), sr, formant[0], formant[1], taps=127)
            breath = fir(rng.standard_normal(len(bt)), sr, 400, 4000, taps=127)
            env = attack_release(len(bt), sr, 0.008, dur * 0.6)
            bark = (voiced / max(float(np.std(voiced)), 1e-9) + rng.uniform(0.2, 0.9) * breath) * env
            add_at(out, bark * rng.uniform(0.6, 1.0), int(pos * sr))
            pos += dur + rng.uniform(0.08, 0.4)
        pos += rng.uniform(0.5, 2.0)
    return out


def horn(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """Car horn (two-note, bright), truck air horn (low chord) or a bike horn honk."""
    n = len(times(seconds, sr))
    out = np.zeros(n)
    kind = family(rng, 3)
    if kind == 0:
        notes = [rng.uniform(330, 480)]
        notes.append(notes[0] * rng.uniform(1.18, 1.3))
    elif kind == 1:
        root = rng.uniform(150, 280)
        notes = [root, root * 1.25, root * 1.5]
    else:
        notes = [rng.uniform(250, 420)]
    pos = rng.uniform(0, 0.4)
    while pos < seconds:
        ht = times(rng.uniform(0.15, 1.6), sr)
        tone = sum(np.tanh(3 * np.sin(osc(f * (1 + 0.003 * rng.standard_normal()), len(ht), sr)))
                   for f in notes)
        add_at(out, np.asarray(tone) * attack_release(len(ht), sr, 0.01, 0.03), int(pos * sr))
        pos += len(ht) / sr + rng.uniform(0.1, 1.5)
    return out


def bell(rng: np.random.Generator, seconds: float, sr: int) -> Audio:
    """A church bell (low, long, inharmonic), a hand bell, or a bicycle bell."""
    n = len(times(seconds, sr))
    out = np.zeros(n)
    kind = family(rng, 3)
    if kind == 0:
        f0, decay, gap, ratios = rng.uniform(150, 450), rng.uniform(1.5, 4.0), \
            rng.uniform(1.2, 2.5), {0.5: 0.6, 1.0: 1.0, 1.19: 0.7, 1.5: 0.5, 2.0: 0.5, 2.51: 0.3,
                                    3.0: 0.2}
    elif kind == 1:
        f0, decay, gap, ratios = rng.uniform(700, 1500), rng.uniform(0.4, 1.2), \
            rng.uniform(0.3, 0.9), {1.0: 1.0, 2.76: 0.5, 5.4: 0.3, 8.9: 0.15}
    else:
        f0, decay, gap, ratios = rng.uniform(2500, 4500), rng.uniform(0.15, 0.5), \
            rng.uniform(0.1, 0.25), {1.0: 1.0, 1.48: 0.6, 2.1: 0.3}
    strike = partials(times(min(seconds, decay * 4), sr), f0, ratios, decay)
    pos = rng.uniform(0, 0.3)
    while pos < seconds:
        add_at(out, strike * rng.uniform(0.7, 1.0), int(pos * sr))
        pos += gap * rng.uniform(0.9, 1.1)
        if kind == 2 and rng.random() < 0.3:
            pos += rng.uniform(0.5, 1.5)
    return out


MAKERS: Final[Mapping[str, Maker]] = {
    "siren": siren, "alarm": alarm, "phone": phone, "knock": knock, "clock": clock,
    "engine": engine, "rain": rain, "wind": wind, "whistle": whistle, "bird": bird,
    "footsteps": footsteps, "dog": dog, "horn": horn, "bell": bell,
}
"""Sound type -> maker; the 14 types the demo bundle claims to know."""

DURATION_S: Final[Mapping[str, tuple[float, float]]] = {
    "siren": (4.0, 9.5), "alarm": (2.0, 7.0), "phone": (3.0, 9.0), "knock": (1.5, 5.0),
    "clock": (5.0, 9.5), "engine": (5.0, 9.5), "rain": (6.0, 9.8), "wind": (6.0, 9.8),
    "whistle": (1.0, 5.0), "bird": (2.0, 8.0), "footsteps": (2.5, 8.0), "dog": (1.0, 6.0),
    "horn": (0.5, 4.0), "bell": (2.0, 8.0),
}
"""Duration range of one event of each type within a 10 s scene."""
