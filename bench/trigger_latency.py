"""How long from a sound's onset to the trigger's MQTT ON at a real subscriber?

A long WAV is synthesized: a quiet pink-noise bed (:mod:`bench.scenes.beds`)
with a siren (:func:`streamcap.training.data.corpus_sounds.siren`, a new one
each time) injected at known offsets, spaced beyond the detector's
``cooldown_s + off_after_s`` so that every siren can fire anew. A real
mosquitto broker (``tests/mosquitto.py``) and a real ``streamcap run``
subprocess are started: one ``file:...?realtime=true`` source, captioning on
(the demo bundle, its own decoding settings, on this machine's CPU), an MQTT
sink, and ``[triggers.siren]`` with the "auto" threshold. An aiomqtt client
subscribes to ``<prefix>/<source>/trigger/siren/event`` and to the source's
captions, and notes the wall clock at which each frame arrives.

**Latency** of an onset = the wall clock at which its ``on`` frame arrived -
(the wall clock of the source's stream origin + the onset's offset in the
file). The origin is derived from the frames themselves: a file source stamps
every block ``captured_at = wall0 + start_sample / rate``, so every caption
frame gives ``captured_at - start_s`` and every trigger firing
``captured_at - end_s``, all the same ``wall0`` (:func:`stream_origin` takes
their median and reports their spread, which must be ~0). A real-time file
source hands a block over when its last sample is due, like a microphone.
The latency splits into *audio* (``decided_at - onset``: how much audio the
deciding window needed, ``min_hits`` of ``of_windows`` included) and
*processing and delivery* (arrival - ``decided_at``: queueing behind a caption
on the inference thread, embedding, scoring, the MQTT sink's outbox, the
broker).

An ``on`` frame is matched to the latest onset at most ``spacing_s`` before
it arrived (:func:`match`); a second ``on`` for one onset, or one with no
onset, is a false firing; an onset without an ``on`` is a miss.

Usage::

    PYTHONPATH=. .venv/bin/python bench/trigger_latency.py [--onsets 55] [--spacing-s 13]
        [--min-hits 2 --of-windows 3] [--name trigger_latency]

Writes ``bench/results/<name>.json`` and ``.md``. Needs ``mosquitto``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

RATE_HZ: Final = 32000
SIREN_S: Final = 2.0
FADE_S: Final = 0.01
BED_DBFS: Final = -40.0
SIREN_PEAK: Final = 0.3
SOURCE: Final = "street"
NODE: Final = "latency"
TAIL_S: Final = 40.0
"""Bed after the last onset's span: the measurement ends before the file does."""


# ----------------------------------------------------------------------------- pure parts


def onsets(count: int, first_s: float, spacing_s: float) -> list[float]:
    """``count`` onsets, ``spacing_s`` apart from ``first_s`` (seconds into the file)."""
    return [first_s + i * spacing_s for i in range(count)]


def stream_origin(frames: Iterable[Mapping[str, Any]]) -> tuple[float, float, int]:
    """The wall clock of the source's stream time 0, from published frames.

    A caption (or embedding) frame gives ``captured_at - start_s``; a trigger firing
    (``on``, or an ``off`` with a ``fired_id``) gives ``captured_at - end_s``; state
    announcements (no ``fired_id``, ``off``) are stamped at publication and say nothing.

    Returns:
        ``(median, spread, count)``: the median origin, max - min of the origins, how
        many frames gave one.

    Raises:
        ValueError: no frame gives an origin.
    """
    values: list[float] = []
    for f in frames:
        captured = f.get("captured_at")
        if not isinstance(captured, int | float):
            continue
        if f.get("type") in ("caption", "embedding") and isinstance(f.get("start_s"),
                                                                     int | float):
            values.append(float(captured) - float(f["start_s"]))
        elif f.get("type") == "trigger" and (f.get("state") == "on" or f.get("fired_id")):
            values.append(float(captured) - float(f["end_s"]))
    if not values:
        raise ValueError("stream_origin: no caption or trigger firing to derive it from")
    return float(np.median(values)), max(values) - min(values), len(values)


@dataclass(frozen=True, slots=True)
class Matched:
    """Onsets with the arrival of their first ``on`` (None: missed), and false firings."""

    latencies_s: tuple[float | None, ...]  # per onset: arrival - (origin + onset)
    decided_s: tuple[float | None, ...]  # per onset: the on's decision time - onset (stream)
    false_firings: int


def match(onset_s: Sequence[float], ons: Sequence[tuple[float, float]], origin: float,
          spacing_s: float) -> Matched:
    """Match ``on`` frames to onsets.

    Args:
        onset_s: onsets in the file, ascending (seconds).
        ons: ``(arrival wall clock, the frame's captured_at)`` of every ``on`` frame.
        origin: the stream origin's wall clock (:func:`stream_origin`).
        spacing_s: an ``on`` belongs to the latest onset at most this long before it.
    """
    latency: list[float | None] = [None] * len(onset_s)
    decided: list[float | None] = [None] * len(onset_s)
    false = 0
    for arrived, captured in sorted(ons):
        t = arrived - origin
        i = int(np.searchsorted(onset_s, t, side="right")) - 1
        if i < 0 or t - onset_s[i] >= spacing_s or latency[i] is not None:
            false += 1
            continue
        latency[i] = t - onset_s[i]
        decided[i] = captured - origin - onset_s[i]
    return Matched(tuple(latency), tuple(decided), false)


def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, median, p95 (linear interpolation), min and max, in seconds (3 decimals)."""
    if not values:
        return {"n": 0, "median_s": None, "p95_s": None, "min_s": None, "max_s": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "median_s": round(float(np.median(a)), 3),
            "p95_s": round(float(np.percentile(a, 95)), 3),
            "min_s": round(float(a.min()), 3), "max_s": round(float(a.max()), 3)}


# ----------------------------------------------------------------------------- audio


def synthesize(onset_s: Sequence[float], duration_s: float, seed: int = 0,
               ) -> npt.NDArray[np.float32]:
    """The bed with a siren of :data:`SIREN_S` at each onset (mono, :data:`RATE_HZ`)."""
    from bench.scenes.beds import pink
    from streamcap.training.data.corpus_sounds import siren

    rng = np.random.default_rng(seed)
    n = round(duration_s * RATE_HZ)
    bed = pink(rng, n, RATE_HZ).astype(np.float64)
    bed *= 10 ** (BED_DBFS / 20) / max(float(np.sqrt(np.mean(bed ** 2))), 1e-12)
    m = round(SIREN_S * RATE_HZ)
    fade = np.ones(m)
    k = round(FADE_S * RATE_HZ)
    fade[:k] = np.linspace(0, 1, k)
    fade[-k:] = np.linspace(1, 0, k)
    for t in onset_s:
        s = siren(rng, m, RATE_HZ).astype(np.float64)
        s = SIREN_PEAK * s / max(float(np.max(np.abs(s))), 1e-12) * fade
        start = round(t * RATE_HZ)
        bed[start:start + m] += s[:n - start]
    return np.clip(bed, -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------- the run


def config_text(work: Path, wav: Path, port: int, http_port: int, min_hits: int,
                of_windows: int) -> str:
    return f"""
[daemon]
node_id = "{NODE}"
state_dir = "{work / 'state'}"
log_format = "json"

[model]
bundle = "demo"
device = "cpu"

[sources.{SOURCE}]
uri = "file:{wav}?realtime=true"

[triggers.siren]
text = ["a siren wails", "an emergency siren"]
min_hits = {min_hits}
of_windows = {of_windows}

[sinks.mqtt]
plugin = "mqtt"
host = "127.0.0.1"
port = {port}
discovery = false

[http]
port = {http_port}
"""


async def subscribe(host: str, port: int, topics: Sequence[str],
                    got: list[tuple[float, dict[str, Any]]], ready: asyncio.Event) -> None:
    """Note ``(arrival wall clock, frame)`` of every message on ``topics`` into ``got``."""
    import aiomqtt

    async with aiomqtt.Client(host, port, identifier="latency-bench") as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        ready.set()
        async for message in client.messages:
            arrived = time.time()
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                with contextlib.suppress(ValueError):
                    got.append((arrived, json.loads(payload)))


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from conftest import free_port
    from daemon_process import http_get, metric_samples, streamcap_command
    from mosquitto import Mosquitto

    onset_s = onsets(args.onsets, args.first_s, args.spacing_s)
    duration_s = onset_s[-1] + args.spacing_s
    wav = work / "street.wav"
    import soundfile as sf

    # a tail of bed beyond the measured span: the daemon stops once its only source ends
    sf.write(wav, synthesize(onset_s, duration_s + TAIL_S), RATE_HZ)
    broker = Mosquitto(workdir=work / "broker")
    broker.start()
    http_port = free_port()
    config = work / "config.toml"
    config.write_text(config_text(work, wav, broker.port, http_port, args.min_hits,
                                  args.of_windows), "utf-8")
    prefix = f"streamcap/{NODE}/{SOURCE}"
    got: list[tuple[float, dict[str, Any]]] = []
    ready = asyncio.Event()
    sub = asyncio.create_task(subscribe(broker.host, broker.port,
                                        [f"{prefix}/trigger/siren/event", f"{prefix}/caption"],
                                        got, ready), name="bench.subscriber")
    await asyncio.wait_for(ready.wait(), 30)
    log = (work / "daemon.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    daemon = await asyncio.create_subprocess_exec(
        *streamcap_command(), "run", "--config", str(config), stdin=subprocess.DEVNULL,
        stdout=log, stderr=log, env=env, cwd=work)
    started = time.time()
    metrics = ""
    try:
        deadline = started + duration_s + 300
        while time.time() < deadline:
            await asyncio.sleep(2)
            if daemon.returncode is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}): "
                                   f"{(work / 'daemon.log').read_text()[-3000:]}")
            with contextlib.suppress(ValueError):
                origin, _, _ = stream_origin(f for _, f in got)
                if time.time() > origin + duration_s + 10:
                    break
        _, _, metrics = await asyncio.to_thread(http_get,
                                                f"http://127.0.0.1:{http_port}/metrics")
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(daemon.wait(), 60)
            except TimeoutError:
                daemon.kill()
                await daemon.wait()
        log.close()
        sub.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sub
        broker.close()
    frames = [f for _, f in got]
    origin, spread, count = stream_origin(frames)
    ons = [(arrived, float(f["captured_at"])) for arrived, f in got
           if f.get("type") == "trigger" and f.get("state") == "on"]
    matched = match(onset_s, ons, origin, args.spacing_s)
    hit = [x for x in matched.latencies_s if x is not None]
    decided = [x for x in matched.decided_s if x is not None]
    delivery = [lat - d for lat, d in zip(matched.latencies_s, matched.decided_s, strict=True)
                if lat is not None and d is not None]
    captions = [f for f in frames if f.get("type") == "caption"]
    dropped = metric_samples(metrics, "streamcap_trigger_windows_dropped_total")
    scored = metric_samples(metrics, "streamcap_trigger_windows_total")
    caption_dropped = metric_samples(metrics, "streamcap_windows_dropped_total")
    return {
        "onsets": len(onset_s), "detected": len(hit), "missed": len(onset_s) - len(hit),
        "false_firings": matched.false_firings,
        "latency": stats(hit), "audio_part": stats(decided),
        "processing_and_delivery_part": stats(delivery),
        "latencies_s": [None if x is None else round(x, 3) for x in matched.latencies_s],
        "origin": {"spread_s": round(spread, 6), "frames": count},
        "captions": len(captions),
        "caption_lag_s": stats([float(f["lag_s"]) for f in captions
                                if isinstance(f.get("lag_s"), int | float)]),
        "trigger_windows_scored": sum(scored.values()),
        "trigger_windows_dropped": sum(dropped.values()),
        "caption_windows_dropped": sum(caption_dropped.values()),
        "audio_s": round(duration_s, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from streamcap.models.runtime import parse_cpu_flags
    from streamcap.triggers.spec import TriggerSpec

    flags = parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    load_start = os.getloadavg()
    defaults = TriggerSpec(name="x", text=("x",))
    with tempfile.TemporaryDirectory(prefix="streamcap-latency-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    load_end = os.getloadavg()
    return {
        "setup": {"onsets": args.onsets, "first_s": args.first_s, "spacing_s": args.spacing_s,
                  "siren_s": SIREN_S, "siren_peak": SIREN_PEAK, "bed": f"pink {BED_DBFS} dBFS",
                  "min_hits": args.min_hits, "of_windows": args.of_windows,
                  "cooldown_s": defaults.cooldown_s, "off_after_s": defaults.off_after_s,
                  "threshold": "auto", "trigger_path": "window_s 5, hop_s 1 (defaults)",
                  "captioning": "demo bundle, its decoding settings, window 10 s every 5 s",
                  "model": "demo, device cpu, precision auto, threads 0 (all cores)"},
        **result,
        "goal": {"median_s": 2.5, "p95_s": 4.0},
        "machine": {"cpu_flags": sorted(f for f in flags if f in {"avx2", "avx512f",
                                                                  "avx512_bf16"}
                                        or f.startswith("amx")),
                    "cores": os.cpu_count(),
                    "loadavg_1m_5m_15m_start": [round(x, 2) for x in load_start],
                    "loadavg_1m_5m_15m_end": [round(x, 2) for x in load_end],
                    "note": args.machine_note},
    }


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} s"


def markdown(r: Mapping[str, Any]) -> str:
    s, lat, m = r["setup"], r["latency"], r["machine"]
    met = (lat["median_s"] is not None and lat["median_s"] <= r["goal"]["median_s"]
           and lat["p95_s"] <= r["goal"]["p95_s"])
    return "\n".join([
        "# Trigger latency: siren onset to MQTT ON", "",
        (f"`bench/trigger_latency.py`: {s['onsets']} sirens ({s['siren_s']:g} s each, peak "
         f"{s['siren_peak']}) in {r['audio_s']:g} s of {s['bed']}, every {s['spacing_s']:g} s "
         f"from {s['first_s']:g} s; a real-time file source, captioning on ({s['captioning']}),"
         f" model {s['model']}; trigger `siren`, threshold {s['threshold']}, "
         f"**{s['min_hits']} of {s['of_windows']} windows**, cooldown {s['cooldown_s']:g} s, "
         f"off after {s['off_after_s']:g} s; trigger path {s['trigger_path']}; a real "
         "mosquitto and an aiomqtt subscriber on the same machine."), "",
        (f"Machine: {m['cores']} cores, CPU flags {', '.join(m['cpu_flags']) or 'none of note'};"
         f" load average (1/5/15 min) {m['loadavg_1m_5m_15m_start']} at start, "
         f"{m['loadavg_1m_5m_15m_end']} at end; {m['note']}."), "",
        "| | n | median | p95 | min | max |", "|---|---|---|---|---|---|",
        *(f"| {name} | {v['n']} | {_s(v['median_s'])} | {_s(v['p95_s'])} | {_s(v['min_s'])} | "
          f"{_s(v['max_s'])} |"
          for name, v in (("onset to ON at the subscriber", lat),
                          ("of which audio (onset to the deciding window's end)",
                           r["audio_part"]),
                          ("of which processing and delivery",
                           r["processing_and_delivery_part"]))),
        "",
        (f"Goal (median <= {r['goal']['median_s']} s, p95 <= {r['goal']['p95_s']} s): "
         f"**{'met' if met else 'not met'}**. Detected {r['detected']} of {r['onsets']} "
         f"onsets ({r['missed']} missed), {r['false_firings']} false firings. Stream origin "
         f"from {r['origin']['frames']} frames, spread {r['origin']['spread_s']} s. "
         f"{r['captions']} captions meanwhile (lag median {_s(r['caption_lag_s']['median_s'])}"
         f"); trigger windows scored {r['trigger_windows_scored']:g}, dropped "
         f"{r['trigger_windows_dropped']:g}; caption windows dropped "
         f"{r['caption_windows_dropped']:g}."), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--onsets", type=int, default=55)
    p.add_argument("--first-s", type=float, default=30.0,
                   help="first onset: after the auto threshold has 20 windows of history")
    p.add_argument("--spacing-s", type=float, default=13.0)
    p.add_argument("--min-hits", type=int, default=2)
    p.add_argument("--of-windows", type=int, default=3)
    p.add_argument("--machine-note", default="what else ran is in the load average; "
                   "the times depend on it")
    p.add_argument("--name", default="trigger_latency")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n",
                                                     "utf-8")
    (args.out_dir / f"{args.name}.md").write_text(markdown(report), "utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
