"""How well do triggers defined in words work on the demo bundle, and what do they cost?

One trigger per sound type the demo bundle knows (14), each with phrasings
written here (not the training captions' templates), scored on the trigger
path's windows (5 s every 1 s) by the window scorer of
:mod:`streamcap.triggers.calibrate` (until the trigger path's own scorer is
merged: the plain best cosine with the phrasings) and turned into firings by a
simple detector written here (``min_hits`` of ``of_windows``, ``cooldown_s``,
``off_after_s``; the defaults of ``[triggers.<name>]``).

Audio:

1. **corpus test split**: clips of the project's training generator
   (:func:`streamcap.training.data.corpus.make_clip`, seed 0, 32 kHz) whose
   index is in the held-out *test* split (``index % 10 == 9``); a clip is a
   positive for every type it holds (one to three events, or none);
2. **independent scenes** (:mod:`bench.scenes`): another generator, one type
   per scene over pink/brown/hum/babble beds at 20/10/5 dB SNR, plus silences
   and beds alone. The more honest of the two;
3. **background only**: beds of :mod:`bench.scenes.beds` without events, in
   60 s chunks at -50 to -25 dBFS, two hours in all, for false firings per hour.

Per trigger and scene set: precision, recall and F1 of "the trigger fires
while the scene plays" at (a) the auto threshold (a hook: "pending merge"
until the trigger path's rule is merged), (b) a threshold calibrated on one
half of the scenes (:func:`streamcap.triggers.calibrate.sweep`, best F1) and
applied to the other half, both ways, the counts pooled: no scene is scored
with a threshold chosen on it; then false firings per hour on the background
at the threshold calibrated on the whole independent set. Cost: the retriever's
audio encoder on one 5 s window (batch 1, as the trigger path runs it).

Embeddings are cached under ``--cache-dir`` (default
``/tmp/streamcap-bench-triggers``) by model id and settings, so a rerun only
scores. Writes ``<out-dir>/<name>.json`` and ``<out-dir>/<name>.md``.

Usage::

    PYTHONPATH=. .venv/bin/python bench/triggers.py [--name triggers_demo] [--model demo]
        [--corpus-clips 300] [--per-cell 4] [--background-min 120] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamcap.triggers.calibrate import (
    AUTO_THRESHOLD,
    DEFAULT_SCORER,
    Embedder,
    PhraseEmbeddings,
    SweepRow,
    best_row,
    firing_score,
    sweep,
)
from streamcap.triggers.spec import TriggerSpec

FloatArray = npt.NDArray[np.float32]

WINDOW_S: Final = 5.0
HOP_S: Final = 1.0
CHUNK_S: Final = 60.0
RATE_HZ: Final = 32000
CORPUS_SEED: Final = 0

PHRASES: Final[Mapping[str, tuple[str, ...]]] = {
    "siren": ("a siren wails", "an ambulance siren"),
    "alarm": ("an alarm is beeping", "a smoke alarm goes off"),
    "phone": ("a telephone is ringing", "the phone rings"),
    "knock": ("someone knocks at the door", "knocking"),
    "clock": ("a clock is ticking", "the tick of a clock"),
    "engine": ("a car engine running", "a motor hums"),
    "rain": ("it is raining", "rain falling on the roof"),
    "wind": ("the wind is blowing", "wind gusts"),
    "whistle": ("someone blows a whistle", "a shrill whistle"),
    "bird": ("birds are singing", "a bird chirps"),
    "footsteps": ("footsteps on the floor", "someone walking"),
    "dog": ("a dog barks", "a dog is barking"),
    "horn": ("a car horn honks", "a horn beeps"),
    "bell": ("a bell rings", "church bells"),
}
"""The 14 types the demo bundle knows, in words a user might write."""


# ----------------------------------------------------------------------------- detector


@dataclass(frozen=True, slots=True)
class Firing:
    on_s: float
    off_s: float | None


def detect(scores: Sequence[float], ends_s: Sequence[float], threshold: float,
           spec: TriggerSpec) -> list[Firing]:
    """Firings of one trigger over one stream of windows (scores and window end times).

    On when ``min_hits`` of the last ``of_windows`` windows score ``>= threshold``
    and ``cooldown_s`` has passed since the last firing turned on; off once
    ``off_after_s`` passed without a hit.
    """
    # LEAD: replace with streamcap.triggers.detector after merge
    recent: list[bool] = []
    out: list[Firing] = []
    on_at: float | None = None
    last_on = -float("inf")
    last_hit = -float("inf")
    for score, t in zip(scores, ends_s, strict=True):
        hit = score >= threshold
        recent = (recent + [hit])[-spec.of_windows:]
        if hit:
            last_hit = t
        if on_at is None:
            if sum(recent) >= spec.min_hits and t - last_on >= spec.cooldown_s:
                on_at = last_on = t
        elif t - last_hit >= spec.off_after_s:
            out.append(Firing(on_at, t))
            on_at = None
    if on_at is not None:
        out.append(Firing(on_at, None))
    return out


# ----------------------------------------------------------------------------- audio sets


@dataclass(frozen=True, slots=True)
class Item:
    """One piece of audio: the types it holds and its windows' embeddings (W, d)."""

    item_id: str
    types: frozenset[str]
    group: str  # for the halves: items of one group alternate between them
    embeddings: FloatArray
    seconds: float


def window_embeddings(embedder: Embedder, audio: npt.NDArray[Any], rate: int,
                      source_id: str) -> tuple[FloatArray, float]:
    """The embeddings of every whole 5 s window of ``audio`` (1 s hop), and its seconds."""
    from streamcap.audio.windowing import Windower
    from streamcap.messages import make_block

    windower = Windower(source_id, WINDOW_S, HOP_S, (embedder.sample_rate_hz,))
    block = make_block(source_id=source_id, start_sample=0, sample_rate_hz=rate,
                       samples=np.asarray(audio, np.float32), captured_at=0.0)
    waves = [w.samples(embedder.sample_rate_hz) for w in windower.feed(block).windows]
    rows = [embedder.embed_waves(np.stack(waves[i:i + 16])) for i in range(0, len(waves), 16)]
    return np.concatenate(rows), len(audio) / rate


def corpus_items(n: int) -> Iterable[tuple[str, frozenset[str], str, Callable[[], Any], int]]:
    from streamcap.training.data.corpus import CorpusOptions, make_clip, split_of

    options = CorpusOptions(clips=max(1, 10 * n), seed=CORPUS_SEED, sample_rate_hz=RATE_HZ)
    indices = [i for i in range(10 * n) if split_of(i) == "test"][:n]
    for i in indices:
        scene, _captions, audio = make_clip(options, i)
        yield (scene.clip_id, frozenset(scene.kinds), scene.layout,
               functools.partial(np.asarray, audio), RATE_HZ)


def scene_items(per_cell: int) -> Iterable[tuple[str, frozenset[str], str, Callable[[], Any],
                                                 int]]:
    from bench.scenes.generate import SAMPLE_RATE_HZ, render, scene_list

    for s in scene_list(per_cell=per_cell):
        group = f"{s.kind}-{s.target or s.variant or s.bed}"
        yield (s.scene_id, frozenset({s.target} if s.target else ()), group,
               functools.partial(render, s), SAMPLE_RATE_HZ)


def background_items(minutes: int) -> Iterable[tuple[str, frozenset[str], str,
                                                     Callable[[], Any], int]]:
    from bench.scenes.beds import BEDS

    beds = sorted(BEDS)
    rng = np.random.default_rng([7, 0])
    for i in range(minutes):
        bed, seed = beds[i % len(beds)], int(rng.integers(0, 2**31))
        level_db = float(rng.uniform(-50.0, -25.0))

        def make(bed: str = bed, seed: int = seed, level_db: float = level_db) -> Any:
            audio = BEDS[bed](np.random.default_rng(seed), int(CHUNK_S * RATE_HZ), RATE_HZ)
            return audio * 10 ** (level_db / 20)

        yield f"bed-{bed}-{i:03d}", frozenset(), bed, make, RATE_HZ


def load_set(name: str, embedder: Embedder, cache: Path,
             sources: Iterable[tuple[str, frozenset[str], str, Callable[[], Any], int]],
             ) -> list[Item]:
    """The set's items, embeddings from the cache or computed (and cached)."""
    path = cache / f"{name}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        return [Item(m["id"], frozenset(m["types"]), m["group"],
                     data["emb"][m["start"]:m["end"]], m["seconds"]) for m in meta]
    items: list[Item] = []
    started = time.perf_counter()
    for n, (item_id, types, group, make, rate) in enumerate(sources, 1):
        emb, seconds = window_embeddings(embedder, make(), rate, item_id)
        items.append(Item(item_id, types, group, emb, seconds))
        if n % 50 == 0:
            print(f"[{time.perf_counter() - started:6.0f} s] {name}: {n}", flush=True)
    meta, start = [], 0
    for it in items:
        meta.append({"id": it.item_id, "types": sorted(it.types), "group": it.group,
                     "start": start, "end": start + len(it.embeddings), "seconds": it.seconds})
        start += len(it.embeddings)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, emb=np.concatenate([it.embeddings for it in items]),
             meta=np.array(json.dumps(meta)))
    return items


# ----------------------------------------------------------------------------- evaluation


def window_scores(item: Item, phrases: PhraseEmbeddings) -> list[float]:
    return [DEFAULT_SCORER(row, phrases) for row in item.embeddings]


def ends(item: Item) -> list[float]:
    return [WINDOW_S + HOP_S * i for i in range(len(item.embeddings))]


def halves(items: Sequence[Item]) -> tuple[list[int], list[int]]:
    """Item indices in two halves: the items of each group alternate between them."""
    seen: dict[str, int] = {}
    a: list[int] = []
    b: list[int] = []
    for i, it in enumerate(items):
        k = seen.get(it.group, 0)
        seen[it.group] = k + 1
        (a if k % 2 == 0 else b).append(i)
    return a, b


def rates(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    row = SweepRow(float("nan"), tp, fp, fn, 0)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": round(row.precision, 4),
            "recall": round(row.recall, 4), "f1": round(row.f1, 4)}


def calibrated_threshold(kind: str, items: Sequence[Item], firing: Sequence[float],
                         idx: Sequence[int]) -> float:
    pos = [firing[i] for i in idx if kind in items[i].types]
    neg = [firing[i] for i in idx if kind not in items[i].types]
    if not pos:  # nothing to calibrate on: the trigger never fires
        return math.inf
    return best_row(sweep(pos, neg)).threshold


def evaluate_set(kind: str, spec: TriggerSpec, items: Sequence[Item],
                 scores: Sequence[list[float]]) -> dict[str, Any]:
    """Two-fold: a threshold chosen on each half, the firings counted on the other."""
    firing = [firing_score(s, spec.min_hits, spec.of_windows) for s in scores]
    a, b = halves(items)
    tp = fp = fn = 0
    thresholds = []
    agree = True
    for calib, test in ((a, b), (b, a)):
        t = calibrated_threshold(kind, items, firing, calib)
        thresholds.append(round(t, 4))
        for i in test:
            fired = bool(detect(scores[i], ends(items[i]), t, spec))
            agree &= fired == (firing[i] >= t)
            positive = kind in items[i].types
            tp += fired and positive
            fp += fired and not positive
            fn += positive and not fired
    everything = list(range(len(items)))
    whole_t = calibrated_threshold(kind, items, firing, everything)
    whole_f1 = (best_row(sweep([firing[i] for i in everything if kind in items[i].types],
                               [firing[i] for i in everything if kind not in items[i].types])).f1
                if math.isfinite(whole_t) else 0.0)
    return {"positives": sum(kind in it.types for it in items), "items": len(items),
            "auto": "pending merge" if AUTO_THRESHOLD is None else None,
            "calibrated_halves": {**rates(tp, fp, fn), "thresholds": thresholds},
            "whole_set_threshold": round(whole_t, 4),
            "whole_set_f1_in_sample": round(whole_f1, 4),
            "detector_agrees_with_firing_score": agree}


def false_firings(spec: TriggerSpec, beds: Sequence[Item], scores: Sequence[list[float]],
                  threshold: float) -> dict[str, Any]:
    hours = sum(b.seconds for b in beds) / 3600.0
    count = sum(len(detect(s, ends(b), threshold, spec)) for b, s in zip(beds, scores,
                                                                        strict=True))
    by_bed: dict[str, int] = {}
    for b, s in zip(beds, scores, strict=True):
        by_bed[b.group] = by_bed.get(b.group, 0) + len(detect(s, ends(b), threshold, spec))
    return {"threshold": round(threshold, 4), "firings": count, "hours": round(hours, 3),
            "per_hour": round(count / hours, 2) if hours else None, "by_bed": by_bed}


def measure_cost(embedder: Embedder, phrases: Mapping[str, PhraseEmbeddings],
                 reps: int) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    wave = (0.1 * rng.standard_normal((1, int(WINDOW_S * embedder.sample_rate_hz)))
            ).astype(np.float32)
    for _ in range(5):
        embedder.embed_waves(wave)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        emb = embedder.embed_waves(wave)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(reps):
        for p in phrases.values():
            DEFAULT_SCORER(emb[0], p)
    score_s = (time.perf_counter() - t) / reps
    encoder_s = float(np.median(times))
    per_audio_s = (encoder_s + score_s) / HOP_S
    return {"encoder_s_per_window_median": round(encoder_s, 5),
            "encoder_s_per_window_p90": round(float(np.percentile(times, 90)), 5),
            "scoring_s_per_window_all_triggers": round(score_s, 6),
            "compute_s_per_audio_s_per_source": round(per_audio_s, 5),
            "sources_per_core": int(1.0 / per_audio_s) if per_audio_s > 0 else None,
            "reps": reps}


# ----------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from streamcap.models.captioner import build_captioner
    from streamcap.models.decoding.options import DecodingOptions
    from streamcap.models.runtime import parse_cpu_flags

    flags = parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    load_start = os.getloadavg()
    started = time.perf_counter()
    cpu_started = time.process_time()
    torch.set_num_threads(args.threads)
    embedder = Embedder(build_captioner(args.model, DecodingOptions(),
                                        device=torch.device("cpu"), dtype=torch.float32))
    cache = args.cache_dir / embedder.model_id
    sets = {
        "corpus_test": load_set(f"corpus-test-{args.corpus_clips}", embedder, cache,
                                corpus_items(args.corpus_clips)),
        "independent": load_set(f"scenes-{args.per_cell}", embedder, cache,
                                scene_items(args.per_cell)),
    }
    beds = load_set(f"beds-{args.background_min}", embedder, cache,
                    background_items(args.background_min))
    phrases = {k: PhraseEmbeddings(positive=embedder.embed_texts(v),
                                   negative=embedder.embed_texts(()),
                                   examples=embedder.embed_texts(()))
               for k, v in PHRASES.items()}
    spec_defaults = TriggerSpec(name="x", text=("x",))
    per_trigger: dict[str, Any] = {}
    for kind, p in phrases.items():
        spec = TriggerSpec(name=kind, text=PHRASES[kind])
        row: dict[str, Any] = {"phrases": list(PHRASES[kind])}
        for set_name, items in sets.items():
            scores = [window_scores(it, p) for it in items]
            row[set_name] = evaluate_set(kind, spec, items, scores)
        bed_scores = [window_scores(b, p) for b in beds]
        row["background"] = false_firings(spec, beds, bed_scores,
                                          row["independent"]["whole_set_threshold"])
        per_trigger[kind] = row
        print(f"{kind}: independent F1 {row['independent']['calibrated_halves']['f1']}, "
              f"corpus F1 {row['corpus_test']['calibrated_halves']['f1']}, "
              f"false/h {row['background']['per_hour']}", flush=True)
    cost = measure_cost(embedder, phrases, args.cost_reps)
    summary = {}
    for set_name in sets:
        tp = sum(r[set_name]["calibrated_halves"]["tp"] for r in per_trigger.values())
        fp = sum(r[set_name]["calibrated_halves"]["fp"] for r in per_trigger.values())
        fn = sum(r[set_name]["calibrated_halves"]["fn"] for r in per_trigger.values())
        summary[set_name] = rates(tp, fp, fn)
    return {
        "model": embedder.model_id,
        "scorer": getattr(DEFAULT_SCORER, "__name__", str(DEFAULT_SCORER)),
        "detector": "bench/triggers.py detect (pending merge of the trigger path's detector)",
        "trigger_defaults": {"min_hits": spec_defaults.min_hits,
                             "of_windows": spec_defaults.of_windows,
                             "cooldown_s": spec_defaults.cooldown_s,
                             "off_after_s": spec_defaults.off_after_s},
        "window_s": WINDOW_S, "hop_s": HOP_S, "threads": args.threads,
        "sets": {"corpus_test": {"items": len(sets["corpus_test"]),
                                 "what": f"make_clip(seed {CORPUS_SEED}, 32 kHz), test-split "
                                         f"indices (index % 10 == 9), first "
                                         f"{args.corpus_clips}"},
                 "independent": {"items": len(sets["independent"]),
                                 "what": f"bench.scenes scene_list(per_cell={args.per_cell})"},
                 "background": {"items": len(beds), "hours": round(
                     sum(b.seconds for b in beds) / 3600, 3),
                     "what": f"{args.background_min} x {CHUNK_S:g} s bench.scenes beds, "
                             "-50 to -25 dBFS"}},
        "summary_calibrated_halves": summary,
        "per_trigger": per_trigger,
        "cost": cost,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "machine": {"cpu_flags": sorted(f for f in flags if f in {"avx2", "avx512f",
                                                                  "avx512_bf16"}
                                        or f.startswith("amx")),
                    "cores": os.cpu_count(),
                    "loadavg_1m_start_end": [round(load_start[0], 2),
                                             round(os.getloadavg()[0], 2)],
                    "note": "shared with a model training run and other work while measured; "
                            "accuracy does not depend on load, the times do"},
    }


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(report: Mapping[str, Any], title: str) -> str:
    m, c = report["machine"], report["cost"]
    s = report["sets"]
    lines = [
        f"# {title}", "",
        (f"Model `{report['model']}`, scorer `{report['scorer']}` (the plain best cosine with "
        "the phrasings until the trigger path's scorer is merged), detector: "
        f"{report['detector']}, trigger defaults {report['trigger_defaults']}; "
        f"{report['window_s']:g} s windows every {report['hop_s']:g} s; "
        f"{report['threads']} thread(s); {report['seconds']} s wall, "
        f"{report['cpu_seconds']} s CPU on the first run (a rerun reuses the embeddings "
        "cached in /tmp). "
        "Written by `bench/triggers.py`."), "",
        (f"Machine: {m['cores']} cores, CPU flags {', '.join(m['cpu_flags']) or 'none of interest'}"
        f"; load average (1 min) {m['loadavg_1m_start_end'][0]} at start, "
        f"{m['loadavg_1m_start_end'][1]} at end; {m['note']}."), "",
        "Sets: corpus test split: " + s["corpus_test"]["what"]
        + f" ({s['corpus_test']['items']} clips); independent: "
        + s["independent"]["what"] + f" ({s['independent']['items']} scenes); background: "
        + s["background"]["what"] + f" ({s['background']['hours']} h).", "",
        ("A scene counts as detected when the trigger fires while it plays. "
        "**auto**: pending merge of the trigger path's auto rule. **calibrated**: the "
        "threshold with the best F1 on one half of the set, counted on the other half, both "
        "ways, pooled (never scored on the scenes it was chosen on). False firings per hour on "
        "the background use the threshold calibrated on the whole independent set."), "",
        "## Summary (calibrated on the other half, all 14 triggers pooled)", "",
        "| set | precision | recall | F1 |", "|---|---|---|---|"]
    for name, r in report["summary_calibrated_halves"].items():
        lines.append(f"| {name} | {_f(r['precision'])} | {_f(r['recall'])} | {_f(r['f1'])} |")
    lines += ["", "## Per trigger", "",
              ("| trigger | auto | indep. P | indep. R | indep. F1 | corpus P | corpus R | "
              "corpus F1 | thresholds (indep. halves) | false firings / h |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in report["per_trigger"].items():
        ind, cor = r["independent"]["calibrated_halves"], r["corpus_test"]["calibrated_halves"]
        lines.append(
            f"| {kind} | {r['independent']['auto'] or '–'} | {_f(ind['precision'])} | "
            f"{_f(ind['recall'])} | {_f(ind['f1'])} | {_f(cor['precision'])} | "
            f"{_f(cor['recall'])} | {_f(cor['f1'])} | "
            f"{', '.join(f'{t:.3f}' for t in ind['thresholds'])} | "
            f"{_f(r['background']['per_hour'])} |")
    lines += ["", "## Cost", "",
              (f"Retriever audio encoder, one {report['window_s']:g} s window (batch 1, "
              f"{report['threads']} thread): median **{c['encoder_s_per_window_median'] * 1000:.1f}"
              f" ms** (p90 {c['encoder_s_per_window_p90'] * 1000:.1f} ms); scoring all 14 "
              f"triggers {c['scoring_s_per_window_all_triggers'] * 1e6:.0f} µs. At one window "
              f"every {report['hop_s']:g} s: **{c['compute_s_per_audio_s_per_source']:.4f} s of "
              f"compute per second of audio per source**, so one core can watch about "
              f"**{c['sources_per_core']} sources** (trigger path alone; captioning is apart; "
              "measured on a shared machine, so an upper bound on the cost)."), "",
              "## TODO: latency (needs the merged daemon)", "",
              ("Not measured here: the time from a sound's onset in a live source to the `trigger` "
              "`on` frame at a WebSocket client / MQTT subscriber (window fill, queueing on the "
              "fast path, min_hits, publish). Measure it once the trigger path is merged, with "
              "the daemon subprocess and a looped file source holding an event at a known time."),
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--name", default="triggers_demo")
    p.add_argument("--title", default="Triggers on the demo bundle: accuracy and cost")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/streamcap-bench-triggers"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--corpus-clips", type=int, default=300)
    p.add_argument("--per-cell", type=int, default=4)
    p.add_argument("--background-min", type=int, default=120,
                   help="minutes of background-only audio")
    p.add_argument("--cost-reps", type=int, default=200)
    args = p.parse_args(argv)
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out_dir / f"{args.name}.json"
    fd, tmp = tempfile.mkstemp(dir=args.out_dir, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out_json)
    (args.out_dir / f"{args.name}.md").write_text(markdown(report, args.title), "utf-8")
    print(f"wrote {out_json} and {args.name}.md: {report['summary_calibrated_halves']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
