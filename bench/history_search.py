"""Search latency over a long history, through the real store.

A synthetic history is written through the SQLite history store as the writer writes
it (batches of windows): 30 days of one source at a 5 s hop (518,400 windows) and ten
sources for 7 days (10 x 120,960), embeddings of 1024 dimensions, captions from a small
vocabulary, each caption tied to a cluster of embeddings (the sound it names). Text
queries then run through ``streamcap.history.search.run_search`` (the rank blend and
grouping of ``/api/search`` and ``streamcap search``), with the query's text embedding
given (a noisy centroid of its caption's cluster); the retriever's own text-embedding
time is measured separately on the demo bundle.

Each query runs in these spans: everything, the last 2 hours, the last day, and (ten
sources) one source; with the store's exact scan (``exact``) and with the vector index
of ``streamcap.history.vectors`` (``index``: exact scans of its in-memory int8 codes,
and the HNSW graph for wide spans once ``--graph`` builds it).

    python bench/history_search.py --quick          # 20,000 windows: a smoke run
    python bench/history_search.py                  # both layouts (long: builds GBs)
    python bench/history_search.py --layouts 30d --graph

Writes ``bench/results/history_search.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamcap.history.records import Span, WindowRecord
from streamcap.history.search import query_terms
from streamcap.history.vectors import HistoryVectorIndex

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {"30d": (1, 30 * 24 * 720), "10x7d": (10, 7 * 24 * 720)}
HOP_S = 5.0
MODEL = "bench-1024"
VOCABULARY = (
    "a dog barks", "a car passes by", "rain falls on a roof", "birds are singing",
    "a door closes", "people are talking", "a siren wails", "music is playing",
    "footsteps on a hard floor", "wind blows", "a baby cries", "a phone rings",
    "water runs from a tap", "a train goes by", "a cat meows", "dishes clatter",
    "a vacuum cleaner runs", "keys jingle", "a clock ticks", "thunder rumbles",
    "a motorcycle revs", "an airplane flies overhead", "a bell rings", "a crowd cheers",
)
QUERIES = ("dog barking", "siren", "rain on the roof", "a baby crying", "train",
           "people talking", "thunder", "door")


def write_history(store: Any, sources: int, per_source: int, dim: int, now: float,
                  rng: np.random.Generator, centroids: NDArray[np.float32], batch: int
                  ) -> dict[str, Any]:
    n = sources * per_source
    start = now - per_source * HOP_S
    t0 = time.perf_counter()
    batch_times = []
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        which = rng.integers(0, len(VOCABULARY), hi - lo)
        vecs = centroids[which] + rng.standard_normal((hi - lo, dim), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        items = []
        for j, i in enumerate(range(lo, hi)):
            src, step = i % sources, i // sources
            at = start + step * HOP_S
            items.append(WindowRecord(
                window_id=f"s{src}-{step}", source_id=f"source-{src}", run_id="bench",
                seq=step, start_s=step * HOP_S, end_s=step * HOP_S + 10.0, start_at=at,
                end_at=at + 10.0, model=MODEL, text=VOCABULARY[which[j]], score=-1.0,
                candidates=(VOCABULARY[which[j]], VOCABULARY[(which[j] + 1) % 24]),
                embedding=vecs[j]))
        t = time.perf_counter()
        store.write(items)
        batch_times.append((time.perf_counter() - t) / len(items))
    total = time.perf_counter() - t0
    a = np.asarray(batch_times) * 1e3
    return {"windows": n, "write_s": round(total, 1), "batch": batch,
            "per_window_ms_p50": round(float(np.percentile(a, 50)), 3),
            "per_window_ms_p95": round(float(np.percentile(a, 95)), 3)}


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def demo_text_embedding_ms(repeats: int = 20) -> dict[str, Any] | None:
    try:
        from streamcap.history.cli import text_embedder
    except ImportError:
        return None
    _, embed = text_embedder("demo")
    if embed is None:
        return None
    embed("warm up")
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        embed(QUERIES[i % len(QUERIES)])
        times.append(time.perf_counter() - t)
    a = np.asarray(times) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 2),
            "p95_ms": round(float(np.percentile(a, 95)), 2)}


def time_queries(search: Callable[[str, Span], Any], spans: dict[str, Span], repeats: int
                 ) -> dict[str, dict[str, float]]:
    out = {}
    for name, span in spans.items():
        times = []
        for r in range(repeats):
            q = QUERIES[r % len(QUERIES)]
            t = time.perf_counter()
            search(q, span)
            times.append(time.perf_counter() - t)
        a = np.asarray(times) * 1e3
        out[name] = {"p50_ms": round(float(np.percentile(a, 50)), 1),
                     "p95_ms": round(float(np.percentile(a, 95)), 1), "queries": repeats}
    return out


def run_layout(layout: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from streamcap.history import sqlite

    sources, per_source = LAYOUTS[layout]
    if args.quick:
        per_source = max(1, args.quick_n // sources)
    rng = np.random.default_rng(sources)
    centroids = rng.standard_normal((len(VOCABULARY), args.dim), dtype=np.float32) * 0.06
    now = time.time()
    path = workdir / f"{layout}.sqlite3"
    reuse = args.reuse and path.exists()
    store = sqlite.SqliteHistory(path, keep_days=3650, max_bytes=1 << 50)
    if reuse:  # a store an earlier run wrote: its times are shifted to now
        now = float(store._conn.execute("SELECT max(start_at) FROM windows").fetchone()[0]) + 5
        wrote = {"windows": sources * per_source, "reused": True}
    else:
        wrote = write_history(store, sources, per_source, args.dim, now, rng, centroids,
                              args.batch)
    result: dict[str, Any] = {"layout": layout, "dim": args.dim, **wrote,
                              "store_bytes": store_bytes(path)}
    print(json.dumps(result), flush=True)

    def embed(text: str) -> NDArray[np.float32]:
        best = max(range(len(VOCABULARY)),
                   key=lambda i: len(set(text.split()) & set(VOCABULARY[i].split())))
        v = centroids[best] + 0.5 * rng.standard_normal(args.dim, dtype=np.float32) * 0.06
        return (v / np.linalg.norm(v)).astype(np.float32)

    try:
        from streamcap.history.search import run_search
    except ImportError:
        run_search = None

    spans = {"all": Span(), "last 2h": Span(since=now - 7200), "last 1d": Span(since=now - 86400)}
    if sources > 1:
        spans["one source"] = Span(sources=("source-3",))

    def searcher(handle: Any) -> Callable[[str, Span], Any]:
        if run_search is not None:
            return lambda q, span: run_search(handle, embed, MODEL, q, span, 10)
        return lambda q, span: (handle.vector_search(embed(q), model=MODEL, span=span, limit=50),
                                handle.text_search(q.split(), span=span, limit=50))

    def vectors_only(handle: Any) -> Callable[[str, Span], Any]:  # 50: run_search's first ask
        return lambda q, span: handle.vector_search(embed(q), model=MODEL, span=span, limit=50)

    result["through"] = "run_search" if run_search is not None else "vector_search+text_search"
    reader = store.reader()
    if not args.skip_exact:
        result["exact"] = time_queries(searcher(reader), spans, args.queries)
        result["exact_vector_only"] = time_queries(vectors_only(reader), spans, args.queries)
    print(json.dumps({"exact": result.get("exact")}), flush=True)
    reader.close()

    seam = HistoryVectorIndex(workdir / f"{layout}.vectors", args.dim, MODEL,
                              search_catch_up=0,
                              **({} if args.graph else {"exact_max_rows": 1 << 62}))
    result["index_reset_reason"] = seam.reset_reason
    # the store answers the index's questions itself (IndexRows), as in the daemon
    indexed = sqlite.SqliteHistory(path, keep_days=3650, max_bytes=1 << 50, read_only=True,
                                   check=False, vector_index=seam)
    t = time.perf_counter()
    while seam.catch_up(indexed, 1 << 20):
        pass
    result["index_catch_up_s"] = round(time.perf_counter() - t, 1)
    if args.graph:
        t = time.perf_counter()
        while seam.index.maintain(65_536):
            pass
        result["index_graph_build_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    seam.index.save()
    result["index_save_s"] = round(time.perf_counter() - t, 1)
    result["index_file_bytes"] = seam.index.path.stat().st_size
    result["index_memory_bytes"] = seam.index.stats().memory_bytes
    result["index_graph_rows"] = seam.index.stats().graph_rows
    result["index"] = time_queries(searcher(indexed), spans, args.queries)
    result["index_vector_only"] = time_queries(vectors_only(indexed), spans, args.queries)
    result["index_text_only"] = time_queries(
        lambda q, span: indexed.text_search(query_terms(q), span=span, limit=50), spans,
        args.queries)
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = seam.index.stats()
    result["index_searches"] = {"exact": stats.exact_searches, "graph": stats.graph_searches,
                                "fallbacks": stats.graph_fallbacks}
    print(json.dumps({"index": result["index"]}), flush=True)
    indexed.close()
    store.close()
    return result


def markdown(data: dict[str, Any]) -> str:
    lines = ["# History search latency through the store", "",
             (f"CPU: {data['cpu']}; load average before {data['load_before']}, after "
             f"{data['load_after']}. Command: `{data['command']}`. "
             "Text query embedding, not included below: "
             f"{data.get('demo_text_embedding') or 'not measured'} (demo bundle)."), "",
             ("Search: the whole run_search (text and vector candidates, rank, group) with the "
              "vector index plugged into the store; vector: the store's vector_search alone "
              "(top 50); text: the store's text_search alone (top 50); exact: the store "
              "without an index (exact scan of the SQLite rows)."), "",
             ("| layout | windows | span | search p50/p95 ms | vector p50/p95 ms | "
              "text p50/p95 ms | search exact p50/p95 ms |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    none = {"p50_ms": "-", "p95_ms": "-"}

    def pair(d: dict[str, Any]) -> str:
        return f"{d['p50_ms']}/{d['p95_ms']}"

    for r in data["layouts"]:
        for span in r["index"]:
            lines.append(
                f"| {r['layout']} | {r['windows']:,} | {span} | {pair(r['index'][span])} | "
                f"{pair(r['index_vector_only'][span])} | "
                f"{pair(r.get('index_text_only', {}).get(span, none))} | "
                f"{pair(r.get('exact', {}).get(span, none))} |")
    lines += ["", ("| layout | store on disk MB | index file MB | index memory MB | graph rows | "
                   "process max RSS MB | write ms/window p50 |"),
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["layouts"]:
        lines.append(f"| {r['layout']} | {r['store_bytes'] / 2**20:.0f} | "
                     f"{r['index_file_bytes'] / 2**20:.0f} | "
                     f"{r['index_memory_bytes'] / 2**20:.0f} | {r.get('index_graph_rows', 0):,} | "
                     f"{r.get('max_rss_bytes', 0) / 2**20:.0f} | "
                     f"{r.get('per_window_ms_p50', '-')} |")
    lines += ["", *[f"- {n}" for n in data.get("notes", [])]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--batch", type=int, default=64, help="windows per write transaction")
    p.add_argument("--graph", action="store_true", help="build the HNSW graph (long)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quick-n", type=int, default=20_000)
    p.add_argument("--workdir", type=Path, default=None, help="where the stores go (kept)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--reuse", action="store_true",
                   help="search the stores an earlier run left in --workdir")
    p.add_argument("--skip-exact", action="store_true", help="only the index")
    args = p.parse_args(argv)
    from bench.history_vectors import cpu_facts

    cpu = cpu_facts()
    data: dict[str, Any] = {
        "command": "python bench/history_search.py " + " ".join(argv or sys.argv[1:]),
        "cpu": f"{cpu['model']}, {cpu['cores']} cores, avx2 {cpu['avx2']}, "
               f"avx512 {cpu['avx512'] or 'none'}",
        "load_before": [round(x, 2) for x in os.getloadavg()], "layouts": []}
    out = args.out or RESULTS / ("history_search_quick.json" if args.quick
                                 else "history_search.json")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="streamcap-search-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data["demo_text_embedding"] = demo_text_embedding_ms()
        for layout in args.layouts:
            data["layouts"].append(run_layout(layout, args, workdir))
            data["load_after"] = [round(x, 2) for x in os.getloadavg()]
            out.write_text(json.dumps(data, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(data))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
