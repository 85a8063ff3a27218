"""Which weight W of the caption text match ranks history searches best on the demo bundle?

``score = similarity + W * text_match`` (:mod:`streamcap.history.search`). Every
independent scene of :mod:`bench.scenes` (14 sound types over noise beds at 20, 10
and 5 dB SNR, plus silences and beds alone) is captioned as one 10 s window by the
captioner ``streamcap run`` builds; each window keeps its caption, candidates and
audio embedding as the history would. Then each query (two phrasings per type,
the trigger bench's words a user might write, never the training captions'
templates) ranks every window with the search's own scoring
(:func:`streamcap.history.search.score_windows`) for each W, and the ranking is
judged by average precision (a window is relevant when its scene plays the
query's type) and precision at 10, averaged over the queries.

Writes ``<out-dir>/<name>.json`` and ``<out-dir>/<name>.md``.

Usage::

    PYTHONPATH=. python bench/search_weight.py [--model demo] [--per-cell 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scenes.generate import SAMPLE_RATE_HZ, render, scene_list
from bench.triggers import PHRASES

WEIGHTS: Final = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0)


def average_precision(ranked_relevant: Sequence[bool]) -> float:
    hits, total = 0, 0.0
    for i, relevant in enumerate(ranked_relevant, 1):
        if relevant:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def caption_scenes(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]], list[Any]]:
    import torch

    from streamcap.audio.windowing import Windower
    from streamcap.history.records import WindowRecord
    from streamcap.messages import make_block
    from streamcap.models.captioner import build_captioner
    from streamcap.models.decoding.options import DecodingOptions

    torch.set_num_threads(args.threads)
    captioner = build_captioner(args.model, DecodingOptions(), device=torch.device("cpu"),
                                dtype=torch.float32)
    rates = captioner.sample_rates_hz
    rows: list[dict[str, Any]] = []
    records: list[Any] = []
    started = time.perf_counter()
    scenes = scene_list(per_cell=args.per_cell)
    for i, scene in enumerate(scenes, 1):
        audio = np.concatenate([render(scene).astype(np.float32),
                                np.zeros(SAMPLE_RATE_HZ, np.float32)])
        block = make_block(source_id=scene.scene_id, start_sample=0,
                           sample_rate_hz=SAMPLE_RATE_HZ, samples=audio, captured_at=1000.0 * i)
        window = Windower(scene.scene_id, 10.0, 5.0, rates).feed(block).windows[0]
        result = captioner.caption(window)
        records.append(WindowRecord.from_caption(result.caption, result.embedding))
        rows.append({"scene_id": scene.scene_id, "target": scene.target,
                     "text": result.caption.text,
                     "candidates": [c.text for c in result.caption.candidates]})
        if i % 20 == 0 or i == len(scenes):
            print(f"[{time.perf_counter() - started:6.0f} s] scenes {i}/{len(scenes)}",
                  flush=True)

    def embed(text: str) -> Any:
        with torch.inference_mode():
            return captioner.text_embeddings([text])[0].cpu().numpy()

    queries = [(kind, phrase, embed(phrase)) for kind, phrases in PHRASES.items()
               for phrase in phrases]
    return captioner.model_id, rows, [records, queries]


def evaluate(model: str, rows: list[dict[str, Any]], records: list[Any],
             queries: list[Any]) -> dict[str, Any]:
    from streamcap.history.records import unit_vector
    from streamcap.history.search import query_terms, score_windows

    targets = [r["target"] for r in rows]
    table: dict[str, Any] = {}
    per_query: dict[str, list[float]] = {}
    spreads, matched = [], []
    for weight in WEIGHTS:
        aps, p10s = [], []
        for kind, phrase, vector in queries:
            scored = score_windows(records, query=unit_vector(vector), model=model,
                                   terms=query_terms(phrase), weight=weight)
            if weight == WEIGHTS[0]:
                sims = np.array([s.similarity for s in scored], dtype=np.float64)
                spreads.append(float(np.percentile(sims, 90) - np.percentile(sims, 10)))
                matched.append(float(np.mean([s.text_match > 0 for s in scored])))
            order = sorted(range(len(scored)), key=lambda i: -scored[i].score)
            relevant = [targets[i] == kind for i in order]
            aps.append(average_precision(relevant))
            p10s.append(sum(relevant[:10]) / 10)
        per_query[str(weight)] = [round(a, 4) for a in aps]
        table[str(weight)] = {"map": round(float(np.mean(aps)), 4),
                              "p_at_10": round(float(np.mean(p10s)), 4)}
    # paired bootstrap over queries: how often each W beats W = 0 (similarity alone)
    rng = np.random.default_rng(0)
    base = np.array(per_query[str(WEIGHTS[0])])
    draws = rng.integers(0, len(base), size=(2000, len(base)))
    for weight in WEIGHTS[1:]:
        diff = np.array(per_query[str(weight)]) - base
        means = diff[draws].mean(axis=1)
        table[str(weight)]["map_gain_ci90"] = [round(float(np.percentile(means, 5)), 4),
                                               round(float(np.percentile(means, 95)), 4)]
    text_only = []
    for kind, phrase, _vector in queries:
        scored = score_windows(records, query=None, model=model, terms=query_terms(phrase))
        order = sorted(range(len(scored)), key=lambda i: -scored[i].score)
        text_only.append(average_precision([targets[i] == kind for i in order]))
    return {"weights": table, "text_only_map": round(float(np.mean(text_only)), 4),
            "per_query_ap": per_query,
            "similarity_spread_p10_p90": round(float(np.median(spreads)), 4),
            "share_of_windows_with_a_word_match": round(float(np.median(matched)), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--per-cell", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="search_weight")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    model, rows, (records, queries) = caption_scenes(args)
    result = evaluate(model, rows, records, queries)
    report = {"model": model, "scenes": len(rows), "queries": len(queries),
              "per_cell": args.per_cell, "threads": args.threads,
              "seconds": round(time.perf_counter() - started, 1),
              "load_before": load, "load_after": os.getloadavg()[0], **result,
              "windows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Search text weight W on {model}", "",
             (f"{len(rows)} windows (one per scene), {len(queries)} queries; mean average "
              "precision (mAP) and precision at 10 of `similarity + W * text_match`."), "",
             "| W | mAP | P@10 | mAP gain over W=0, 90 % bootstrap interval |",
             "|---|---|---|---|"]
    for weight, cell in result["weights"].items():
        gain = cell.get("map_gain_ci90")
        shown = "" if gain is None else f"[{gain[0]:+.4f}, {gain[1]:+.4f}]"
        lines.append(f"| {weight} | {cell['map']:.4f} | {cell['p_at_10']:.4f} | {shown} |")
    lines += ["", f"Text match alone (no similarity): mAP {result['text_only_map']:.4f}.",
              (f"Median over queries of the similarity's spread (90th - 10th percentile over "
              f"the windows): {result['similarity_spread_p10_p90']:.4f}; median share of "
              f"windows with a word of the query: "
              f"{result['share_of_windows_with_a_word_match']:.4f}."), ""]
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
