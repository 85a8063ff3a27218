"""Which vector search serves the history: measured on this machine.

For a history of ``N`` windows with retriever embeddings of ``dim`` (1024 for the
base preset, 64 for the demo bundle), stored as the history store keeps them
(int8, ``q = round(127 * v / max|v|)``, a float32 scale per row), this measures:

- ``numpy_int8``: the store's exact scan, chunked int8 -> float32 decode + matmul;
- ``usearch_exact``: the same exact cosine ranking by ``usearch.index.search(...,
  exact=True)`` on the int8 rows (SIMD dot products, no float copy), 1 and 2 threads;
- ``hnsw_i8`` / ``hnsw_f16``: a usearch HNSW index (build time, memory, p50/p95 of a
  top-100 query, recall@10 against the exact int8 ranking);
- ``filters``: a span holding a fraction of the rows: exact over just those rows
  (gather + exact scan) against HNSW over-fetch (``k * m`` nearest, filtered), with
  the recall@10 and how often the over-fetch left fewer than 10 rows.

For cosine, scaling a vector does not change the ranking, so usearch is fed the int8
rows themselves (the same quantisation as the store). Embeddings are synthetic but
clustered (sounds of a place repeat: a few hundred centroids plus noise), queries are
noisy centroids, like a text embedding near the sounds it names; uniform random
vectors would be the worst case for a graph index and unlike real audio.

    python bench/history_vectors.py                      # the full run (long on 2 cores)
    python bench/history_vectors.py --quick              # small N, a smoke run
    python bench/history_vectors.py --layouts 30d --dims 1024 --hnsw-max 518400

Writes ``bench/results/history_vectors.json`` (and ``.md``) section by section, so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamcap.history.vectors import exact_search

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {  # name: (sources, windows per source); 5 s hop
    "30d": (1, 30 * 24 * 720),  # 518,400: 30 days of one source
    "10x7d": (10, 7 * 24 * 720),  # 10 x 120,960: ten sources, 7 days
}
CHUNK = 32_768


def cpu_facts() -> dict[str, Any]:
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "machine": platform.machine()}


def quantise(v: NDArray[np.float32]) -> NDArray[np.int8]:
    """The store's int8 code of each row: round(127 * v / max|v|)."""
    peak = np.abs(v).max(axis=1, keepdims=True)
    peak[peak == 0] = 1
    return np.round(127.0 * v / peak).astype(np.int8)


def synthetic(n: int, dim: int, rng: np.random.Generator, centroids: NDArray[np.float32]
              ) -> NDArray[np.int8]:
    out = np.empty((n, dim), dtype=np.int8)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        which = rng.integers(0, len(centroids), hi - lo)
        noise = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        out[lo:hi] = quantise(centroids[which] + noise)
    return out


def queries(count: int, dim: int, rng: np.random.Generator, centroids: NDArray[np.float32]
            ) -> NDArray[np.float32]:
    q = centroids[rng.integers(0, len(centroids), count)] + 1.5 * rng.standard_normal(
        (count, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32)


def numpy_scan(data: NDArray[np.int8], q: NDArray[np.float32], k: int
               ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Exact cosine top-k by chunked decode + matmul (what the store's scan does)."""
    sims = np.empty(len(data), dtype=np.float32)
    for lo in range(0, len(data), CHUNK):
        block = data[lo:lo + CHUNK].astype(np.float32)
        norms = np.linalg.norm(block, axis=1)
        norms[norms == 0] = 1
        sims[lo:lo + CHUNK] = (block @ q) / norms
    top = np.argpartition(-sims, min(k, len(sims) - 1))[:k]
    top = top[np.argsort(-sims[top])]
    return top.astype(np.int64), sims[top]


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 2),
            "p95_ms": round(float(np.percentile(a, 95)), 2),
            "queries": len(samples)}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[Any]]:
    times, outs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        outs.append(fn())
        times.append(time.perf_counter() - t)
    return times, outs


def recall(found: NDArray[np.int64], truth: NDArray[np.int64], k: int = 10) -> float:
    if len(truth) == 0:
        return 1.0
    return len(set(found[:k].tolist()) & set(truth[:k].tolist())) / min(k, len(truth))


def cos_ratio(data: NDArray[np.int8], q: NDArray[np.float32], found: NDArray[np.int64],
              truth: NDArray[np.int64], k: int = 10) -> float:
    def mean_cos(rows: NDArray[np.int64]) -> float:
        block = data[rows[:k]].astype(np.float32)
        return float(np.mean(block @ q / np.linalg.norm(block, axis=1)))

    return mean_cos(found) / mean_cos(truth)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Report:
    def __init__(self, path: Path, meta: dict[str, Any], append: bool = False) -> None:
        self.path = path
        self.data: dict[str, Any] = {**meta, "runs": []}
        if append and path.exists():  # a later run of other layouts/dims joins the file
            old = json.loads(path.read_text())
            self.data["runs"] = old["runs"]
            self.data["notes"] = [*old.get("notes", []), *[n for n in meta.get("notes", [])
                                                           if n not in old.get("notes", [])]]
            self.data["command"] = f"{old['command']}; then {meta['command']}"
            self.data["load_before"] = old["load_before"]
            self.data["load_before_last"] = meta["load_before"]

    def add(self, run: dict[str, Any]) -> None:
        run["load_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine
        self.data["runs"].append(run)
        self.save()
        print(json.dumps(run), flush=True)

    def save(self) -> None:
        self.data["load_after"] = os.getloadavg()
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")
        self.path.with_suffix(".md").write_text(markdown(self.data))


def markdown(data: dict[str, Any]) -> str:
    cpu = data["cpu"]
    lines = [
        "# History vector search on this machine",
        "",
        (f"CPU: {cpu['model']}, {cpu['cores']} cores, avx2 {cpu['avx2']}, "
        f"avx512 {cpu['avx512'] or 'none'}; usearch {data['usearch']} ({data['simd']}), "
        f"numpy {data['numpy']}. Load average before {data['load_before']}, "
        f"after {[round(x, 2) for x in data.get('load_after', [])]}."),
        (f"Command: `{data['command']}`. Latency of one top-{data['k']} query over all rows "
        "of the layout (the query's text embedding not included). Recall@10 against the "
        "exact ranking; in brackets the mean cosine of the found top 10 over the exact "
        "top 10's."),
        "",
        ("| layout | dim | N | method | build s | memory MB | p50 ms | p95 ms | recall@10 "
         "| load |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["runs"]:
        if r["kind"] != "search":
            continue
        lines.append(
            f"| {r['layout']} | {r['dim']} | {r['n']:,} | {r['method']} | "
            f"{r.get('build_s', '')} | {r.get('memory_mb', '')} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r.get('recall_at_10', 1.0)}"
            f"{' (' + str(r['cosine_ratio_at_10']) + ')' if 'cosine_ratio_at_10' in r else ''} | "
            f"{r.get('load_1min', '')} |")
    filt = [r for r in data["runs"] if r["kind"] == "filter"]
    if filt:
        lines += ["", ("Filtered spans (a fraction of the rows match): exact over the matching "
                  "rows against HNSW i8 over-fetch of k*m then filter."), "",
                  ("| layout | dim | fraction | rows | exact p50/p95 ms | m | over-fetch "
                  "p50/p95 ms | recall@10 | short |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in filt:
            for m in r["overfetch"]:
                lines.append(
                    f"| {r['layout']} | {r['dim']} | {r['fraction']} | {r['rows']:,} | "
                    f"{r['exact']['p50_ms']}/{r['exact']['p95_ms']} | {m['m']} | "
                    f"{m['p50_ms']}/{m['p95_ms']} | {m['recall_at_10']} | {m['short']} |")
    notes = data.get("notes", [])
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def run_layout(report: Report, layout: str, dim: int, args: argparse.Namespace) -> None:
    from usearch.index import Index, MetricKind, search

    sources, per_source = LAYOUTS[layout]
    n = sources * per_source if not args.quick else min(sources * per_source, args.quick_n)
    rng = np.random.default_rng(dim * 7 + sources)
    centroids = rng.standard_normal((400, dim), dtype=np.float32) * 1.2
    t = time.perf_counter()
    data = synthetic(n, dim, rng, centroids)
    print(f"{layout} dim {dim}: {n:,} rows made in {time.perf_counter() - t:.1f} s", flush=True)
    source_of = np.arange(n) % sources  # sources interleaved in time, as rowids are
    qs = queries(args.queries, dim, rng, centroids)
    q8 = quantise(qs)
    k = args.k
    base = {"kind": "search", "layout": layout, "dim": dim, "n": n, "k": k}
    agree: list[float] = []

    # Ground truth: exact cosine of the float query over the int8 rows (the store's own
    # ranking): the numpy scan for the timed queries; for the rest the same ranking by
    # an exact int8 scan with a margin, rescored with the float query (exact_search).
    truth: list[NDArray[np.int64]] = []
    np_times: list[float] = []
    for i, q in enumerate(qs):
        if i < args.numpy_queries:
            t = time.perf_counter()
            keys, _ = numpy_scan(data, q, k)
            np_times.append(time.perf_counter() - t)
            check = np.asarray([r for r, _ in exact_search(data, q, k)], dtype=np.int64)
            agree.append(recall(check, keys))
        else:
            keys = np.asarray([r for r, _ in exact_search(data, q, k)], dtype=np.int64)
        truth.append(keys)
    report.add({**base, "method": "numpy_int8", **percentiles(np_times),
                "exact_search_agrees_at_10": round(float(np.mean(agree)), 4)})

    for threads in (1, 2):
        times: list[float] = []
        found = []
        for q in q8:
            t = time.perf_counter()
            m = search(data, q, k, MetricKind.Cos, exact=True, threads=threads)
            times.append(time.perf_counter() - t)
            found.append(np.asarray(m.keys, dtype=np.int64))
        rec = float(np.mean([recall(f, g) for f, g in zip(found, truth, strict=True)]))
        report.add({**base, "method": f"usearch_exact_t{threads}", **percentiles(times),
                    "recall_at_10": round(rec, 4)})

    hnsw_n = min(n, args.hnsw_max)
    i8_index = None
    for dtype in args.hnsw_dtypes:
        cap = hnsw_n if dtype == "i8" else min(hnsw_n, args.f16_max)
        index = Index(ndim=dim, metric=MetricKind.Cos, dtype=dtype,
                      connectivity=args.connectivity, expansion_add=args.expansion_add,
                      expansion_search=args.expansion_search)
        before = rss_mb()
        t = time.perf_counter()
        for lo in range(0, cap, 65_536):
            hi = min(cap, lo + 65_536)
            rows = data[lo:hi] if dtype == "i8" else data[lo:hi].astype(np.float16)
            index.add(np.arange(lo, hi, dtype=np.int64), rows, threads=args.threads)
        build = time.perf_counter() - t
        mem = index.memory_usage / 2**20
        if cap < n:  # recall against the exact ranking of the same prefix
            sub_truth = [np.asarray([r for r, _ in exact_search(data[:cap], q, k)],
                                    dtype=np.int64) for q in qs]
        else:
            sub_truth = truth
        rss_growth = rss_mb() - before
        for ef in args.ef_search:
            index.expansion_search = ef
            times: list[float] = []
            found = []
            for q, q_8 in zip(qs, q8, strict=True):
                query = q_8 if dtype == "i8" else q.astype(np.float16)
                t = time.perf_counter()
                m = index.search(query, k, threads=1)
                times.append(time.perf_counter() - t)
                found.append(np.asarray(m.keys, dtype=np.int64))
            rec = float(np.mean([recall(f, g) for f, g in zip(found, sub_truth, strict=True)]))
            # How close in cosine the found top 10 are to the exact top 10 (near-ties in
            # a cluster make recall harsh: another row about as near is no worse a hit).
            ratio = float(np.mean([cos_ratio(data, q, f, g)
                                   for q, f, g in zip(qs, found, sub_truth, strict=True)]))
            report.add({**base, "n": cap, "method": f"hnsw_{dtype}_ef{ef}", **percentiles(times),
                        "recall_at_10": round(rec, 4), "cosine_ratio_at_10": round(ratio, 4),
                        "build_s": round(build, 1),
                        "build_per_s": round(cap / build), "memory_mb": round(mem),
                        "rss_growth_mb": round(rss_growth),
                        "params": {"connectivity": args.connectivity,
                                   "expansion_add": args.expansion_add,
                                   "expansion_search": ef, "threads": args.threads}})
        index.expansion_search = args.expansion_search
        if dtype == "i8" and cap == n:
            i8_index = index
        else:
            del index
        gc.collect()

    if i8_index is None:
        return
    # Filters: a span holding a fraction of the rows (a time range: a contiguous block
    # of rowids; a source: every sources-th row).
    for fraction in args.fractions:
        rows_n = max(1, int(n * fraction))
        if sources > 1 and fraction == 1 / sources:
            allowed = np.flatnonzero(source_of == 0)
            shape = "one source"
        else:
            start = int(rng.integers(0, n - rows_n + 1))
            allowed = np.arange(start, start + rows_n)
            shape = "time range"
        allowed_set = np.zeros(n, dtype=bool)
        allowed_set[allowed] = True
        ex_times: list[float] = []
        ex_found: list[NDArray[np.int64]] = []
        for q_8 in q8:
            t = time.perf_counter()
            subset = data[allowed] if shape == "one source" else data[allowed[0]:allowed[-1] + 1]
            m = search(subset, q_8, min(k, len(subset)), MetricKind.Cos, exact=True,
                       threads=args.threads)
            ex_found.append(allowed[np.asarray(m.keys, dtype=np.int64)])
            ex_times.append(time.perf_counter() - t)
        over = []
        for mult in args.overfetch:
            times = []
            recs = []
            short = 0
            for q_8, truth_q in zip(q8, ex_found, strict=True):
                t = time.perf_counter()
                m = i8_index.search(q_8, min(n, k * mult), threads=1)
                keys = np.asarray(m.keys, dtype=np.int64)
                keys = keys[allowed_set[keys]][:k]
                times.append(time.perf_counter() - t)
                short += len(keys) < min(10, rows_n)
                recs.append(recall(keys, truth_q))
            over.append({"m": mult, **percentiles(times),
                         "recall_at_10": round(float(np.mean(recs)), 4),
                         "short": f"{short}/{len(q8)}"})
        report.add({"kind": "filter", "layout": layout, "dim": dim, "n": n,
                    "fraction": round(fraction, 4), "shape": shape, "rows": len(allowed),
                    "exact": percentiles(ex_times), "overfetch": over})
    del i8_index, data
    gc.collect()


def sqlite_vec_note() -> str:
    import sqlite3

    con = sqlite3.connect(":memory:")
    if not hasattr(con, "enable_load_extension"):
        return ("sqlite-vec not measured: this Python's sqlite3 (SQLite "
                f"{sqlite3.sqlite_version}) is built without extension loading, so the store "
                "could only use it through a second SQLite binding (apsw) beside its own "
                "connection; and its vec0 tables scan exactly (no ANN index in 0.1.x), "
                "which usearch_exact already measures.")
    return "sqlite-vec: extension loading is available but was not measured here."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--dims", nargs="+", type=int, default=[1024, 64])
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--numpy-queries", type=int, default=8,
                   help="queries timed for the (slow) numpy scan")
    p.add_argument("--hnsw-dtypes", nargs="*", default=["i8", "f16"])
    p.add_argument("--hnsw-max", type=int, default=1_300_000,
                   help="build HNSW over at most this many rows")
    p.add_argument("--f16-max", type=int, default=1_300_000)
    p.add_argument("--connectivity", type=int, default=16)
    p.add_argument("--expansion-add", type=int, default=40)
    p.add_argument("--expansion-search", type=int, default=128,
                   help="for the filter runs")
    p.add_argument("--ef-search", nargs="+", type=int, default=[128, 512, 2048],
                   help="expansion_search values measured for the unfiltered query")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fractions", nargs="*", type=float,
                   default=[0.5, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001])
    p.add_argument("--overfetch", nargs="*", type=int, default=[4, 10])
    p.add_argument("--quick", action="store_true", help="small N: a smoke run")
    p.add_argument("--quick-n", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--append", action="store_true",
                   help="add these runs to the results file instead of replacing it")
    args = p.parse_args(argv)

    import usearch
    from usearch.index import Index

    out = args.out or RESULTS / ("history_vectors_quick.json" if args.quick
                                 else "history_vectors.json")
    report = Report(out, {
        "command": "python bench/history_vectors.py " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu_facts(), "load_before": [round(x, 2) for x in os.getloadavg()],
        "usearch": usearch.__version__, "numpy": np.__version__,
        "simd": Index(ndim=8, dtype="i8").hardware_acceleration, "k": args.k,
        "notes": [sqlite_vec_note()],
    }, append=args.append)
    report.save()
    for dim in args.dims:
        for layout in args.layouts:
            run_layout(report, layout, dim, args)
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
