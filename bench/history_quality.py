"""How well does history search find each demo sound type in long recordings?

Long synthetic recordings with known event times are built per source from the
*independent* evaluation generator (:mod:`bench.scenes`: its sound makers, its
background beds, its SNR rule), never from the training corpus's generator that
the demo bundle was trained on. Each source's timeline is a run of segments
(``--segment-s`` long, 15 to 35 s by default), each a background bed (pink,
brown, mains hum or babble at -50 to -30 dBFS, crossfaded into the next) holding
one event of one of the 14 demo types at 20, 10 or 5 dB SNR, or nothing (a bed
alone). Every type plays ``--per-snr`` times per SNR per source, in shuffled order.

The timeline goes through the path the daemon takes: 1 s blocks into the
:class:`~streamcap.audio.windowing.Windower` (10 s windows, 5 s hop), each window
captioned by the captioner ``streamcap run`` builds, each caption and embedding
written into a real :class:`~streamcap.history.sqlite.SqliteHistory` via
:meth:`~streamcap.history.records.WindowRecord.from_caption`. Then each query (two
phrasings per type, the words of ``bench/triggers.py``, never tuned here) is
ranked three ways: the similarity alone, the caption text match alone, and the
search's blend ``similarity + W * text_match`` (W = 0.1).

**Relevance.** An event's time is its audible extent (first to last 25 ms frame
within 40 dB of its loudest). A window is relevant to a type when it overlaps an
event of that type by at least 1 s. A hit (grouped windows) is relevant when one
of its windows is.

**Metrics** (per query, averaged over the type's two phrasings, then over types):

* ``recall@10``: of the type's relevant windows, the share among the 10 best
  ranked windows (the standard definition; since a type has more than 10
  relevant windows its ceiling is below 1: ``recall_ceiling``);
* ``events@10``: of the type's events, the share with at least one relevant
  window among the 10 best ranked windows (ceiling 1 up to 10 events);
* ``P@10 hits``: relevant hits among the first 10 hits the search returns
  (its grouping of adjacent windows), divided by 10;
* ``AP``: average precision of the window ranking, over all the type's relevant
  windows (one never returned counts as missed); mAP is its mean.

The window rankings come from the store's own indexes (``vector_search`` over
every window, ``text_search``); ties fall as the search breaks them (newer first).
The hit rankings are ``run_search`` itself for the blend and for the text alone
(no text embedder), and the same loop with W = 0 for the similarity alone (checked
to equal ``run_search`` at W = 0.1).

Writes ``<out-dir>/<name>.json`` and ``<out-dir>/<name>.md``.

Usage::

    PYTHONPATH=. python bench/history_quality.py [--model demo] [--sources 2] [--per-snr 2]
        [--quiet-segments 8] [--segment-s 15 35] [--types dog,siren] [--threads 1]
        [--store PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scenes.beds import BEDS
from bench.scenes.generate import SAMPLE_RATE_HZ, SNRS_DB, active_level
from bench.scenes.sounds import DURATION_S, MAKERS
from bench.triggers import PHRASES

Audio = npt.NDArray[np.float64]

WINDOW_S: Final = 10.0
HOP_S: Final = 5.0
BLOCK_S: Final = 1.0
MIN_OVERLAP_S: Final = 1.0
K: Final = 10
EDGE_S: Final = 1.0  # an event starts and ends at least this far inside its segment
FADE_S: Final = 0.5  # crossfade between segments' beds
EXTENT_DB: Final = 40.0
START_AT: Final = 1_750_000_000.0  # wall clock of every timeline's first sample
SOURCE_NAMES: Final = ("porch", "kitchen", "garage", "hall")
RANKINGS: Final = ("similarity", "text", "blend")


# ----------------------------------------------------------------------------- timeline


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """One stretch of a source's timeline: a bed, and at most one event in it."""

    source_id: str
    index: int
    start_s: float  # on the source's timeline
    length_s: float
    bed: str
    bed_db: float
    target: str | None
    snr_db: float | None
    seed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """An event's audible extent on the wall clock."""

    event_id: str
    source_id: str
    target: str
    snr_db: float
    start_at: float
    end_at: float


def plan(source_id: str, source_index: int, *, types: Sequence[str], per_snr: int,
         quiet_segments: int, segment_s: tuple[float, float], seed: int) -> list[Segment]:
    """The segments of one source's timeline (deterministic in its arguments)."""
    rng = np.random.default_rng([seed, source_index])
    slots: list[tuple[str | None, float | None]] = [
        (t, snr) for t in types for snr in SNRS_DB for _ in range(per_snr)]
    slots += [(None, None)] * quiet_segments
    order = rng.permutation(len(slots))
    beds = sorted(BEDS)
    out: list[Segment] = []
    at = 0.0
    for i, j in enumerate(order):
        target, snr = slots[int(j)]
        length = round(float(rng.uniform(*segment_s)), 2)
        out.append(Segment(source_id=source_id, index=i, start_s=at, length_s=length,
                           bed=beds[int(rng.integers(0, len(beds)))],
                           bed_db=round(float(rng.uniform(-50, -30)), 2), target=target,
                           snr_db=snr, seed=int(rng.integers(0, 2**31))))
        at += length
    return out


def audible_extent(sound: Audio, sr: int, below_db: float = EXTENT_DB) -> tuple[float, float]:
    """Seconds from the start of ``sound`` to the first and past the last 25 ms frame
    within ``below_db`` of its loudest frame; (0, 0) for silence."""
    frame = max(1, int(0.025 * sr))
    count = math.ceil(len(sound) / frame)
    if count == 0:
        return (0.0, 0.0)
    padded = np.zeros(count * frame)
    padded[:len(sound)] = sound
    power = (padded.reshape(count, frame) ** 2).mean(axis=1)
    if not power.max() > 0:
        return (0.0, 0.0)
    loud = np.flatnonzero(power >= power.max() * 10 ** (-below_db / 10))
    return (loud[0] * frame / sr, min(len(sound), (loud[-1] + 1) * frame) / sr)


def render_segment(segment: Segment, sr: int = SAMPLE_RATE_HZ
                   ) -> tuple[Audio, tuple[float, float] | None]:
    """The segment's audio plus a ``FADE_S`` tail of its bed (for the crossfade), and its
    event's audible extent in seconds from the segment's start (None: no event).

    The bed and the event are those of :mod:`bench.scenes` (its makers, its active-level
    SNR rule, a short room reverb on half of the events); the event keeps ``EDGE_S``
    from the segment's ends.
    """
    rng = np.random.default_rng(segment.seed)
    n = round(segment.length_s * sr) + int(FADE_S * sr)
    bed = BEDS[segment.bed](rng, n, sr) * 10 ** (segment.bed_db / 20)
    if segment.target is None or segment.snr_db is None:
        return bed, None
    lo, hi = DURATION_S[segment.target]
    seconds = min(float(rng.uniform(lo, hi)), segment.length_s - 2 * EDGE_S)
    start = float(rng.uniform(EDGE_S, segment.length_s - EDGE_S - seconds))
    sound = MAKERS[segment.target](rng, seconds, sr)
    if rng.random() < 0.5:  # a little room, as the independent scenes have
        tail = np.exp(-np.arange(int(0.3 * sr)) / (rng.uniform(0.02, 0.12) * sr))
        tail *= rng.standard_normal(len(tail)) * rng.uniform(0.02, 0.08)
        tail[0] = 1.0
        size = len(sound) + len(tail)
        sound = np.fft.irfft(np.fft.rfft(sound, size) * np.fft.rfft(tail, size),
                             size)[:len(sound)]
    bed_rms = 10 ** (segment.bed_db / 20)  # the beds are of unit RMS
    sound = sound * (bed_rms * 10 ** (segment.snr_db / 20) / max(active_level(sound, sr), 1e-12))
    first = int(start * sr)
    mix = bed.copy()
    mix[first:first + len(sound)] += sound[:n - first]
    peak = float(np.max(np.abs(mix)))
    if peak > 0.99:
        mix *= 0.99 / peak
    on, off = audible_extent(sound, sr)
    return mix, (start + on, start + off)


def timeline(segments: Sequence[Segment], sr: int = SAMPLE_RATE_HZ
             ) -> Iterator[tuple[Audio, Event | None]]:
    """Each segment's audio, crossfaded into the previous one, and its event (wall clock)."""
    fade = int(FADE_S * sr)
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
    tail = np.zeros(fade)
    for segment in segments:
        audio, extent = render_segment(segment, sr)
        length = len(audio) - fade
        audio[:fade] = audio[:fade] * ramp + tail * (1.0 - ramp)
        tail = audio[length:].copy()
        event = None
        if extent is not None and segment.target is not None and segment.snr_db is not None:
            base = START_AT + segment.start_s
            event = Event(event_id=f"{segment.source_id}-{segment.index:03d}",
                          source_id=segment.source_id, target=segment.target,
                          snr_db=segment.snr_db, start_at=round(base + extent[0], 3),
                          end_at=round(base + extent[1], 3))
        yield audio[:length], event


# ----------------------------------------------------------------------------- judging (pure)


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowSpan:
    window_id: str
    source_id: str
    start_at: float
    end_at: float


def overlap_s(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def event_windows(windows: Sequence[WindowSpan], events: Sequence[Event],
                  min_overlap_s: float = MIN_OVERLAP_S) -> dict[str, frozenset[str]]:
    """Event id -> the windows of its source overlapping it by at least ``min_overlap_s``."""
    out: dict[str, frozenset[str]] = {}
    for event in events:
        out[event.event_id] = frozenset(
            w.window_id for w in windows if w.source_id == event.source_id
            and overlap_s(w.start_at, w.end_at, event.start_at, event.end_at) >= min_overlap_s)
    return out


def recall_at(ranked: Sequence[str], relevant: frozenset[str], k: int = K) -> float | None:
    """Share of ``relevant`` among the first ``k`` of ``ranked`` (None: nothing relevant)."""
    if not relevant:
        return None
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def events_at(ranked: Sequence[str], found_by: Mapping[str, frozenset[str]],
              k: int = K) -> float | None:
    """Share of the events (id -> relevant windows) with a window among the first ``k``."""
    if not found_by:
        return None
    top = set(ranked[:k])
    return sum(bool(ws & top) for ws in found_by.values()) / len(found_by)


def average_precision(ranked: Sequence[str], relevant: frozenset[str]) -> float | None:
    """Mean of the precision at each relevant window's rank, over every relevant window
    (one missing from ``ranked`` adds 0)."""
    if not relevant:
        return None
    found, total = 0, 0.0
    for rank, window_id in enumerate(ranked, 1):
        if window_id in relevant:
            found += 1
            total += found / rank
    return total / len(relevant)


def hit_precision(hits: Sequence[Sequence[str]], relevant: frozenset[str],
                  k: int = K) -> float:
    """Hits (each its window ids) among the first ``k`` holding a relevant window, over k."""
    return sum(bool(relevant.intersection(h)) for h in hits[:k]) / k


def mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


# ----------------------------------------------------------------------------- running


def machine() -> dict[str, Any]:
    from streamcap.models.runtime import parse_cpu_flags

    try:
        flags = parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    except OSError:
        flags = frozenset()
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model_name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu": model_name or platform.processor(), "cores": os.cpu_count(),
            "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}),
            "python": platform.python_version()}


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=False, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def capture(args: argparse.Namespace, store: Any, captioner: Any,
            ) -> tuple[list[Segment], list[Event], list[WindowSpan], list[dict[str, Any]]]:
    """Render every source's timeline, window, caption and store it."""
    from tqdm import tqdm

    from streamcap.audio.windowing import Windower
    from streamcap.history.records import WindowRecord
    from streamcap.messages import make_block

    sr = SAMPLE_RATE_HZ
    block = int(BLOCK_S * sr)
    plans = [plan(SOURCE_NAMES[i], i, types=args.types, per_snr=args.per_snr,
                  quiet_segments=args.quiet_segments, segment_s=tuple(args.segment_s),
                  seed=args.seed) for i in range(args.sources)]
    total_s = sum(s.length_s for p in plans for s in p)
    segments = [s for p in plans for s in p]
    events: list[Event] = []
    spans: list[WindowSpan] = []
    rows: list[dict[str, Any]] = []
    pending: list[Any] = []
    bar = tqdm(total=int(total_s / HOP_S), unit="window", mininterval=10.0, file=sys.stdout)

    def take(windows: Sequence[Any]) -> None:
        for window in windows:
            result = captioner.caption(window)
            caption = result.caption
            pending.append(WindowRecord.from_caption(caption, result.embedding))
            spans.append(WindowSpan(window_id=caption.window_id, source_id=caption.source_id,
                                    start_at=caption.captured_at,
                                    end_at=caption.captured_at + caption.end_s
                                    - caption.start_s))
            rows.append({"window_id": caption.window_id, "source_id": caption.source_id,
                         "start_at": caption.captured_at, "text": caption.text,
                         "abstained": caption.abstained})
            bar.update(1)
        if len(pending) >= 16:
            store.write(pending)
            pending.clear()

    for source_plan in plans:
        source_id = source_plan[0].source_id
        windower = Windower(source_id, WINDOW_S, HOP_S, captioner.sample_rates_hz)
        position = 0
        for audio, event in timeline(source_plan, sr):
            if event is not None:
                events.append(event)
            samples = audio.astype(np.float32)
            for i in range(0, len(samples), block):
                chunk = samples[i:i + block]
                fed = make_block(source_id=source_id, start_sample=position,
                                 sample_rate_hz=sr, samples=chunk,
                                 captured_at=START_AT + position / sr)
                position += len(chunk)
                take(windower.feed(fed).windows)
        take(windower.flush())
    if pending:
        store.write(pending)
    bar.close()
    return segments, events, spans, rows


def search_hits(store: Any, vector: Any, model: str, terms: Sequence[str], limit: int,
                weight: float) -> list[Any]:
    """:func:`streamcap.history.search.run_search`'s loop with the text weight ``weight``."""
    from streamcap.history.records import Span
    from streamcap.history.search import (
        MAX_CANDIDATES,
        candidate_count,
        group_hits,
        score_windows,
    )

    span = Span()
    count = candidate_count(limit)
    while True:
        near = [] if vector is None else store.vector_search(vector, model=model, span=span,
                                                             limit=count)
        matched = [] if not terms else store.text_search(terms, span=span, limit=count)
        ids = list(dict.fromkeys([w for w, _ in near] + matched))
        records = store.windows(ids, vectors=vector is not None)
        kept = [records[i] for i in ids if i in records]
        hits = group_hits(score_windows(kept, query=vector, model=model, terms=terms,
                                        weight=weight))
        more = len(near) >= count or len(matched) >= count
        if len(hits) >= limit or not more or count >= MAX_CANDIDATES:
            return list(hits[:limit])
        count = min(MAX_CANDIDATES, count * 4)


def window_rankings(store: Any, vector: Any, model: str, terms: Sequence[str],
                    n: int) -> dict[str, list[str]]:
    """Every window ranked by the similarity alone and by the blend; the text matches
    ranked by the text alone (the store's indexes, the search's scores and tie-break)."""
    from streamcap.history.records import Span
    from streamcap.history.search import TEXT_WEIGHT, score_windows

    near = [w for w, _ in store.vector_search(vector, model=model, span=Span(), limit=n)]
    matched = store.text_search(terms, span=Span(), limit=n) if terms else []
    records = store.windows(list(dict.fromkeys(near + matched)), vectors=True)

    def ranked(ids: Sequence[str], query: Any, weight: float) -> list[str]:
        scored = score_windows([records[i] for i in ids], query=query, model=model,
                               terms=terms, weight=weight)
        scored.sort(key=lambda s: (-s.score, -s.record.start_at, s.record.window_id))
        return [s.record.window_id for s in scored]

    return {"similarity": ranked(near, vector, 0.0), "text": ranked(matched, None, TEXT_WEIGHT),
            "blend": ranked(near, vector, TEXT_WEIGHT)}


def constant(vector: Any) -> Callable[[str], Any]:
    """A text embedder that gives ``vector`` (the query's, computed once)."""

    def embed(_text: str) -> Any:
        return vector

    return embed


def evaluate(store: Any, captioner: Any, types: Sequence[str], events: Sequence[Event],
             spans: Sequence[WindowSpan]) -> dict[str, Any]:
    import torch

    from streamcap.history.records import Span, unit_vector
    from streamcap.history.search import TEXT_WEIGHT, query_terms, run_search

    model = captioner.model_id
    by_event = event_windows(spans, events)
    queries: list[dict[str, Any]] = []
    mismatches: list[str] = []
    for kind in types:
        found_by = {e.event_id: by_event[e.event_id] for e in events if e.target == kind}
        relevant = frozenset().union(*found_by.values()) if found_by else frozenset()
        for phrase in PHRASES[kind]:
            with torch.inference_mode():
                raw = captioner.text_embeddings([phrase])[0].cpu().numpy()
            vector = unit_vector(unit_vector(raw))  # as run_search normalises what it is given
            terms = query_terms(phrase)
            ranks = window_rankings(store, vector, model, terms, len(spans))
            hits = {
                "similarity": search_hits(store, vector, model, terms, K, 0.0),
                "text": run_search(store, None, model, phrase, Span(), K),
                "blend": run_search(store, constant(unit_vector(raw)), model, phrase, Span(), K),
            }
            if search_hits(store, vector, model, terms, K, TEXT_WEIGHT) != hits["blend"]:
                mismatches.append(phrase)
            row: dict[str, Any] = {"type": kind, "phrase": phrase, "terms": list(terms),
                                   "relevant_windows": len(relevant), "events": len(found_by)}
            for name in RANKINGS:
                ranked = ranks[name]
                row[name] = {
                    "returned_windows": len(ranked),
                    "recall_at_10": recall_at(ranked, relevant),
                    "events_at_10": events_at(ranked, found_by),
                    "hit_precision_at_10": hit_precision([h.window_ids for h in hits[name]],
                                                         relevant),
                    "hits_returned": len(hits[name]),
                    "ap": average_precision(ranked, relevant),
                    "top_10": ranked[:K],
                }
            queries.append(row)
    per_type: dict[str, Any] = {}
    for kind in types:
        mine = [q for q in queries if q["type"] == kind]
        relevant = mine[0]["relevant_windows"]
        cell: dict[str, Any] = {"events": mine[0]["events"], "relevant_windows": relevant,
                                "recall_ceiling": (round(min(K, relevant) / relevant, 4)
                                                   if relevant else None)}
        for name in RANKINGS:
            cell[name] = {metric: mean([q[name][metric] for q in mine])
                          for metric in ("recall_at_10", "events_at_10",
                                         "hit_precision_at_10", "ap")}
        per_type[kind] = cell
    overall = {name: {metric: mean([per_type[k][name][metric] for k in types])
                      for metric in ("recall_at_10", "events_at_10", "hit_precision_at_10",
                                     "ap")}
               for name in RANKINGS}
    return {"per_type": per_type, "overall": overall, "queries": queries,
            "blend_loop_differs_from_run_search": len(mismatches),
            "blend_loop_differs_on": mismatches}


def caption_accuracy(types: Sequence[str], events: Sequence[Event], spans: Sequence[WindowSpan],
                     rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Per type: the share of its relevant windows whose caption names it (context for the
    text match; the keywords of bench/demo_honesty.py)."""
    from bench.demo_honesty import named_types

    by_event = event_windows(spans, events)
    text = {r["window_id"]: r["text"] for r in rows}
    out: dict[str, float | None] = {}
    for kind in types:
        relevant = set().union(*(by_event[e.event_id] for e in events if e.target == kind))
        out[kind] = (round(sum(kind in named_types(text[w]) for w in relevant) / len(relevant), 4)
                     if relevant else None)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from streamcap.history.sqlite import SqliteHistory
    from streamcap.models.captioner import build_captioner
    from streamcap.models.decoding.options import DecodingOptions

    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    captioner = build_captioner(args.model, DecodingOptions(), device=torch.device("cpu"),
                                dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="history-quality-") as tmp:
        path = args.store if args.store is not None else Path(tmp) / "history.sqlite3"
        store = SqliteHistory(path, keep_days=36500.0, max_bytes=2**40)
        try:
            segments, events, spans, rows = capture(args, store, captioner)
            captured = time.perf_counter() - started
            reader = store.reader()
            try:
                stored = reader.stats().windows
                result = evaluate(reader, captioner, args.types, events, spans)
            finally:
                reader.close()
        finally:
            store.close()
    accuracy = caption_accuracy(args.types, events, spans, rows)
    for kind, share in accuracy.items():
        result["per_type"][kind]["caption_names_type"] = share
    audio_s = sum(s.length_s for s in segments)
    return {
        "model": captioner.model_id,
        "generator": ("bench/scenes (the independent evaluation generator; the demo bundle "
                      "was trained on streamcap/training/data, which shares no code with it)"),
        "git": git_commit(),
        "machine": {**machine(), "threads": args.threads,
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"sources": args.sources, "per_snr": args.per_snr,
                     "quiet_segments": args.quiet_segments, "segment_s": list(args.segment_s),
                     "types": list(args.types), "seed": args.seed, "window_s": WINDOW_S,
                     "hop_s": HOP_S, "min_overlap_s": MIN_OVERLAP_S, "k": K,
                     "snrs_db": list(SNRS_DB), "text_weight": 0.1},
        "audio_s": round(audio_s, 1),
        "windows": len(spans),
        "stored_windows": stored,
        "events": len(events),
        "seconds": {"capture": round(captured, 1),
                    "total": round(time.perf_counter() - started, 1)},
        **result,
        "event_list": [{"event_id": e.event_id, "source_id": e.source_id, "type": e.target,
                        "snr_db": e.snr_db, "start_at": e.start_at, "end_at": e.end_at}
                       for e in events],
        "window_list": rows,
    }


# ----------------------------------------------------------------------------- report


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    git = report["git"]
    lines = [
        f"# History search quality on `{report['model']}`", "",
        (f"Written by `bench/history_quality.py`. {s['sources']} sources, "
         f"{report['audio_s'] / 60:.1f} min of audio, {report['windows']} windows of "
         f"{s['window_s']:g} s every {s['hop_s']:g} s, {report['events']} events "
         f"({len(s['types'])} types x {len(s['snrs_db'])} SNRs "
         f"({', '.join(f'{x:g}' for x in s['snrs_db'])} dB) x {s['per_snr']} per source), "
         f"{2 * len(s['types'])} queries (two phrasings per type)."),
        "",
        (f"Audio: {report['generator']}. Segments of {s['segment_s'][0]:g} to "
         f"{s['segment_s'][1]:g} s, each a background bed with one event or none "
         f"({s['quiet_segments']} per source without). A window is relevant to a type when it "
         f"overlaps an event of the type by at least {s['min_overlap_s']:g} s; a hit when one of "
         "its windows is."),
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['cpu_flags'])}; "
         f"{m['threads']} torch thread(s); load average (1/5/15 min) "
         f"{'/'.join(str(x) for x in m['loadavg_start'])} at start, "
         f"{'/'.join(str(x) for x in m['loadavg_end'])} at end; "
         f"{report['seconds']['total']:.0f} s in all. Commit "
         f"`{git['commit']}`{' (with uncommitted changes)' if git['dirty'] else ''}."),
        "",
        "Metrics (per query, averaged over the two phrasings of a type, then over types):",
        "",
        ("- **recall@10**: of the type's relevant windows, the share among the 10 best ranked "
         "windows (standard; its ceiling is min(10, relevant) / relevant, below 1 when a type "
         "has more than 10 relevant windows);"),
        ("- **events@10**: of the type's events, the share with a relevant window among the "
         "10 best ranked windows;"),
        ("- **P@10 hits**: relevant hits among the first 10 the search returns (adjacent "
         "windows grouped), over 10;"),
        "- **AP**: average precision of the window ranking over all relevant windows.",
        "",
        ("Rankings: **sim** the similarity alone (W = 0), **text** the caption text match "
         "alone (only windows whose caption or candidates hold a word of the query are "
         f"returned), **blend** `similarity + {s['text_weight']:g} * text_match` (the search)."),
        "",
        "## Overall (mean over types)", "",
        "| ranking | recall@10 | events@10 | P@10 hits | mAP |", "|---|---|---|---|---|",
    ]
    for name in RANKINGS:
        o = report["overall"][name]
        lines.append(f"| {name} | {_f(o['recall_at_10'])} | {_f(o['events_at_10'])} | "
                     f"{_f(o['hit_precision_at_10'])} | {_f(o['ap'])} |")
    lines += ["", "## Per type", "",
              ("`rel` relevant windows (`ceil` the recall@10 ceiling); `named` the share of "
               "them whose caption names the type (the demo's captioning accuracy here, for "
               "context). Each metric: sim / text / blend."), "",
              "| type | events | rel | ceil | named | recall@10 | events@10 | P@10 hits | AP |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind, cell in report["per_type"].items():
        def three(metric: str, cell: Mapping[str, Any] = cell) -> str:
            return " / ".join(_f(cell[name][metric]) for name in RANKINGS)

        lines.append(f"| {kind} | {cell['events']} | {cell['relevant_windows']} | "
                     f"{_f(cell['recall_ceiling'])} | {_f(cell.get('caption_names_type'))} | "
                     f"{three('recall_at_10')} | {three('events_at_10')} | "
                     f"{three('hit_precision_at_10')} | {three('ap')} |")
    snr = report.get("events_at_10_by_snr") or by_snr(report)
    lines += ["", "## By SNR", "",
              ("events@10 over every type's events at that SNR (and both phrasings): the "
               "share found among the 10 best ranked windows."), "",
              "| SNR | " + " | ".join(RANKINGS) + " |", "|---" * (len(RANKINGS) + 1) + "|"]
    for level, cells in snr.items():
        lines.append(f"| {level} dB | " + " | ".join(_f(cells[name]) for name in RANKINGS)
                     + " |")
    differs = report["blend_loop_differs_from_run_search"]
    lines += ["", (f"The blend's hits were also computed by the bench's own copy of the "
                   f"search loop (the one that gives the similarity alone its hits): it "
                   f"differed from `run_search` on {differs} queries"
                   + (f" ({', '.join(report['blend_loop_differs_on'])})."
                      if differs and report.get("blend_loop_differs_on") else ".")), ""]
    return "\n".join(lines)


def by_snr(report: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """events@10 per SNR and ranking, over every (query, event of the query's type) pair,
    from the report's events, windows and each query's 10 best windows."""
    spans = [WindowSpan(window_id=w["window_id"], source_id=w["source_id"],
                        start_at=w["start_at"], end_at=w["start_at"] + WINDOW_S)
             for w in report["window_list"]]
    events = [Event(event_id=e["event_id"], source_id=e["source_id"], target=e["type"],
                    snr_db=e["snr_db"], start_at=e["start_at"], end_at=e["end_at"])
              for e in report["event_list"]]
    found_by = event_windows(spans, events, report["settings"]["min_overlap_s"])
    out: dict[str, dict[str, float | None]] = {}
    for level in report["settings"]["snrs_db"]:
        cells: dict[str, float | None] = {}
        for name in RANKINGS:
            found = [bool(found_by[e.event_id] & set(q[name]["top_10"]))
                     for q in report["queries"] for e in events
                     if e.target == q["type"] and e.snr_db == level]
            cells[name] = round(sum(found) / len(found), 4) if found else None
        out[f"{level:g}"] = cells
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--sources", type=int, default=2, choices=range(1, len(SOURCE_NAMES) + 1))
    p.add_argument("--per-snr", type=int, default=2,
                   help="events of each type per SNR per source (default 2)")
    p.add_argument("--quiet-segments", type=int, default=8,
                   help="segments without an event per source (default 8)")
    p.add_argument("--segment-s", type=float, nargs=2, default=(15.0, 35.0),
                   metavar=("MIN", "MAX"))
    p.add_argument("--types", default=",".join(MAKERS),
                   help="comma-separated sound types (default: all 14)")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--store", type=Path, default=None,
                   help="keep the store here (default: a temporary one)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="write the tables again from this run's JSON (no capture)")
    p.add_argument("--name", default="history_quality")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in args.types if t not in MAKERS]
    if unknown or not args.types:
        p.error(f"--types: expected some of {', '.join(MAKERS)} (got {args.types})")
    lo, hi = args.segment_s
    if not 2 * EDGE_S + 1.0 <= lo <= hi:
        p.error(f"--segment-s: expected {2 * EDGE_S + 1.0:g} <= MIN <= MAX (got {lo} {hi})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:  # the tables again from a run's JSON, nothing rerun
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        report = run(args)
    report["events_at_10_by_snr"] = by_snr(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n",
                                                    encoding="utf-8")
    text = markdown(report)
    (args.out_dir / f"{args.name}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
