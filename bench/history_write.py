"""What the history costs on the write side: per window, and to captioning latency.

1. Write cost: windows (1024-d embeddings, two candidates) written through the SQLite
   history store in transactions of 1, 8, 64 and 256 windows (the writer thread writes
   what has queued up in one transaction), into an empty store and into one that already
   holds ``--prefill`` windows.
2. Captioning latency with and without the history on the demo bundle: windows of a
   synthetic stream are captioned one after another on this thread, alternately with
   the history off and on (on: each caption and its embedding go to the
   ``HistoryRecorder``, whose own thread writes them, as the daemon does); ``--stress``
   also has the recorder write windows of other sources at many times real time, to
   show the contention when the writer is busy.

    python bench/history_write.py --quick
    python bench/history_write.py

Writes ``bench/results/history_write.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamcap.history.records import WindowRecord

RESULTS = Path(__file__).resolve().parent / "results"


def records(n: int, dim: int, rng: np.random.Generator, *, source: str, first: int,
            start_at: float) -> list[WindowRecord]:
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return [WindowRecord(
        window_id=f"{source}-{first + i}", source_id=source, run_id="bench", seq=first + i,
        start_s=5.0 * (first + i), end_s=5.0 * (first + i) + 10, start_at=start_at + 5.0 * i,
        end_at=start_at + 5.0 * i + 10, model="bench-1024", text="a dog barks in the yard",
        score=-1.0, candidates=("a dog barks in the yard", "a dog barks"), embedding=vecs[i])
        for i in range(n)]


def write_cost(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    from streamcap.history import sqlite

    rng = np.random.default_rng(1)
    out = []
    store = sqlite.SqliteHistory(workdir / "write.sqlite3", keep_days=3650, max_bytes=1 << 50)
    now = time.time()
    seq = 0

    def measure(label: str) -> None:
        nonlocal seq
        for batch in (1, 8, 64, 256):
            per = []
            for _ in range(max(2, args.write_windows // batch)):
                items = records(batch, args.dim, rng, source="w", first=seq, start_at=now)
                seq += batch
                t = time.perf_counter()
                store.write(items)
                per.append((time.perf_counter() - t) / batch * 1e3)
            row = {"store": label, "batch": batch, "per_window_ms_p50": round(
                statistics.median(per), 3), "per_window_ms_p95": round(
                float(np.percentile(per, 95)), 3), "transactions": len(per)}
            out.append(row)
            print(json.dumps(row), flush=True)

    measure("empty")
    for lo in range(0, args.prefill, 512):
        store.write(records(min(512, args.prefill - lo), args.dim, rng, source="p", first=lo,
                           start_at=now - 86400))
    measure(f"{args.prefill:,} windows")
    store.close()
    return out


def caption_latency(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from bench.pipeline import make_windows
    from streamcap.history import sqlite, writer
    from streamcap.models.captioner import build_captioner
    from streamcap.models.decoding.options import DecodingOptions
    from streamcap.stats import Metrics

    torch.set_num_threads(args.threads)
    captioner = build_captioner("demo", DecodingOptions(), device=torch.device("cpu"),
                                dtype=torch.float32)
    windows = make_windows("bench", args.stream_s, captioner.sample_rates_hz, seed=1)
    windows = [windows[i % len(windows)] for i in range(2 * args.per_arm)]  # alternating arms
    for w in make_windows("warmup", 15.0, captioner.sample_rates_hz, seed=2):
        captioner.caption(w)
    # the windows are timed from 1970 (the synthetic stream): keep them all
    store = sqlite.SqliteHistory(workdir / "caption.sqlite3", keep_days=1e6, max_bytes=1 << 50)
    recorder = writer.HistoryRecorder(store, metrics=Metrics(), queue_size=10_000)
    recorder.start()
    retriever = captioner.components.retriever
    if retriever is not None:  # as the daemon: the vector index kept up by the writer
        from streamcap.history.vectors import HistoryVectorIndex

        index = HistoryVectorIndex(workdir / "caption.vectors", int(retriever.config.joint_dim),
                                   captioner.model_id)
        store.vector_index = index
        recorder.attach_index(index)
    stop = threading.Event()
    stress = None
    if args.stress:
        rng = np.random.default_rng(3)

        def flood() -> None:  # other sources' windows, at many times real time
            seq = 0
            while not stop.wait(0.05):
                for item in records(8, args.dim, rng, source="other", first=seq,
                                    start_at=time.time()):
                    recorder.record(item)
                seq += 8

        stress = threading.Thread(target=flood, name="bench-history-flood", daemon=True)
        stress.start()
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i, window in enumerate(windows):
        arm = "on" if i % 2 else "off"
        t = time.perf_counter()
        result = captioner.caption(window)
        if arm == "on":
            recorder.record(WindowRecord.from_caption(result.caption, result.embedding))
        times[arm].append(time.perf_counter() - t)
    stop.set()
    if stress is not None:
        stress.join()
    recorder.close(timeout_s=120.0)
    summary: dict[str, Any] = {"windows": len(windows), "stress": args.stress,
                               "threads": args.threads, "written": recorder.written,
                               "vector_index": retriever is not None}
    for arm, values in times.items():
        a = np.asarray(values) * 1e3
        summary[arm] = {f"p{q}_ms": round(float(np.percentile(a, q)), 1)
                        for q in (5, 25, 50, 75, 95)} | {"n": len(values)}
    # each "on" window against the "off" window captioned just before it (load drift cancels)
    pairs = np.asarray(times["on"][:len(times["off"])]) - np.asarray(times["off"][:len(times["on"])])
    d = pairs * 1e3
    summary["on_minus_off_ms"] = {f"p{q}": round(float(np.percentile(d, q)), 1)
                                  for q in (5, 25, 50, 75, 95)} | {"pairs": len(d)}
    print(json.dumps(summary), flush=True)
    return summary


def arm(a: dict[str, Any]) -> str:
    return "/".join(str(a.get(f"p{q}_ms", "-")) for q in (25, 50, 75, 95))


def diff(c: dict[str, Any]) -> str:
    d = c.get("on_minus_off_ms", {})
    return "/".join(str(d.get(f"p{q}", "-")) for q in (25, 50, 75))


def markdown(data: dict[str, Any]) -> str:
    lines = ["# History write cost", "",
             (f"CPU: {data['cpu']}; load average before {data['load_before']}, after "
              f"{data['load_after']}. Command: `{data['command']}`."), "",
             "| store | windows per transaction | ms per window p50 | p95 |",
             "| --- | --- | --- | --- |"]
    for r in data["write"]:
        lines.append(f"| {r['store']} | {r['batch']} | {r['per_window_ms_p50']} | "
                     f"{r['per_window_ms_p95']} |")
    for c in data["caption"]:
        lines += ["", (f"Captioning latency, demo bundle, {c['windows']} windows alternating, "
                       f"{c['threads']} torch threads{', writer flooded' if c['stress'] else ''}"
                       f": history off p25/p50/p75/p95 {arm(c['off'])} ms; on "
                       f"{arm(c['on'])} ms; on minus the off window just before, per pair, "
                       f"p25/p50/p75 {diff(c)} ms ({c['written']} records written"
                       f"{', vector index attached' if c.get('vector_index') else ''}).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.history_vectors import cpu_facts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--write-windows", type=int, default=1024,
                   help="windows written per batch size")
    p.add_argument("--prefill", type=int, default=200_000)
    p.add_argument("--stream-s", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-arm", type=int, default=40, help="captioned windows per arm")
    p.add_argument("--stress", action="store_true", help="only the flooded-writer run")
    p.add_argument("--no-stress", action="store_true", help="no flooded-writer run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.write_windows, args.prefill, args.stream_s, args.per_arm = 128, 2000, 30.0, 3
    cpu = cpu_facts()
    data: dict[str, Any] = {
        "command": "python bench/history_write.py " + " ".join(argv or sys.argv[1:]),
        "cpu": f"{cpu['model']}, {cpu['cores']} cores, avx2 {cpu['avx2']}",
        "load_before": [round(x, 2) for x in os.getloadavg()]}
    out = args.out or RESULTS / ("history_write_quick.json" if args.quick
                                 else "history_write.json")
    workdir = Path(tempfile.mkdtemp(prefix="streamcap-write-bench-"))
    try:
        data["write"] = write_cost(args, workdir)
        stress = args.stress
        data["caption"] = []
        for flooded in ([True] if stress else [False] if args.no_stress else [False, True]):
            args.stress = flooded
            data["caption"].append(caption_latency(args, workdir))
        data["load_after"] = [round(x, 2) for x in os.getloadavg()]
        out.write_text(json.dumps(data, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(data))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
