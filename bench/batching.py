"""Benchmark: captioning windows of several sources one at a time vs as one batch.

``--sources`` synthetic streams (noise + tones + chirps, each its own seed, fed
in 0.1 s blocks at 48 kHz through the windower: 10 s windows every 5 s) are
captioned by one :class:`streamcap.models.captioner.Captioner` (random weights,
fp32, ``--threads`` torch threads):

- **one at a time**: ``caption(window)`` for each source's window in turn;
- **batched**: one ``caption_batch`` of the next window of every source.

Rounds alternate the two modes on consecutive windows (each mode sees the
streaming codec in its steady state: one hop of new audio per window); which
mode goes first alternates by round, so that load from other jobs spreads over
both. The first window of every source (whole-window encodes) is a warm-up,
captioned as a batch, and the second one too, captioned one at a time; neither
is counted. Per stage the report gives the seconds
the W windows cost in each mode (one at a time: the sum of the W calls;
batched: the batch's ``stage_seconds``) and the ratio; the throughput gain is
one-at-a-time total / batched total.

Random weights: EOS is almost never sampled, so every candidate runs to
``max_new_tokens``, in both modes alike; a fixed random logit bias keeps the
candidates distinct (as in ``bench/pipeline.py``).

Run:
    PYTHONPATH=. .venv/bin/python bench/batching.py            # base preset, 4 sources
    PYTHONPATH=. .venv/bin/python bench/batching.py --quick    # tiny preset smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.pipeline import HOP_S, WINDOW_S, make_windows
from streamcap.messages import CaptionResult, Window
from streamcap.models.bundle.components import build_components
from streamcap.models.bundle.presets import preset_spec
from streamcap.models.captioner import Captioner
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.runtime import parse_cpu_flags

STAGES = ("codec", "retriever_audio", "encoder", "sampling", "text_encoder", "fluency",
          "abstention")
LABELS = {"codec": "DAC", "retriever_audio": "CNext", "encoder": "encoder",
          "sampling": "sampling", "text_encoder": "text enc", "fluency": "fluency",
          "abstention": "abstention"}
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _summed(results: Sequence[CaptionResult]) -> dict[str, float]:
    """Seconds per stage of W one-at-a-time results, summed."""
    out: dict[str, float] = {}
    for r in results:
        for stage, s in r.stage_seconds.items():
            out[stage] = out.get(stage, 0.0) + s
    return out


def run_solo(captioner: Captioner, windows: Sequence[Window]) -> dict[str, Any]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = [captioner.caption(w) for w in windows]
    total = time.perf_counter() - t0
    return {"mode": "one_at_a_time", "seq": windows[0].seq, "total_s": total,
            "stage_seconds": _summed(results), "loadavg_before": load,
            "loadavg_after": os.getloadavg()[0]}


def run_batch(captioner: Captioner, windows: Sequence[Window]) -> dict[str, Any]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = captioner.caption_batch(windows)
    total = time.perf_counter() - t0
    assert all(r.batch_size == len(windows) for r in results)
    return {"mode": "batched", "seq": windows[0].seq, "total_s": total,
            "stage_seconds": dict(results[0].stage_seconds), "loadavg_before": load,
            "loadavg_after": os.getloadavg()[0]}


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median per stage and total for each mode, and the ratios."""
    modes: dict[str, Any] = {}
    for mode in ("one_at_a_time", "batched"):
        rows = [r for r in records if r["mode"] == mode]
        modes[mode] = {
            "stages_median_s": {s: round(statistics.median(r["stage_seconds"].get(s, 0.0)
                                                           for r in rows), 4) for s in STAGES},
            "total_median_s": round(statistics.median(r["total_s"] for r in rows), 3),
            "total_min_s": round(min(r["total_s"] for r in rows), 3),
        }
    solo, batch = modes["one_at_a_time"], modes["batched"]
    gains = {s: round(solo["stages_median_s"][s] / batch["stages_median_s"][s], 2)
             for s in STAGES if batch["stages_median_s"][s] > 0}
    per_round = [a["total_s"] / b["total_s"] for a, b in zip(
        [r for r in records if r["mode"] == "one_at_a_time"],
        [r for r in records if r["mode"] == "batched"], strict=True)]
    return {**modes, "stage_gain": gains,
            "throughput_gain_median": round(solo["total_median_s"] / batch["total_median_s"], 2),
            "throughput_gain_per_round": [round(g, 2) for g in per_round]}


def markdown(report: dict[str, Any]) -> str:
    setup, summary = report["setup"], report["summary"]
    w = setup["sources"]
    lines = [
        f"# Batching across sources: {setup['preset']} preset, {w} sources, CPU",
        "",
        (f"{setup['cpu_model']} ({', '.join(setup['cpu_flags']) or 'no listed flags'}; "
        f"{setup['cores']} cores), torch {setup['torch']}, {setup['threads']} threads, fp32, "
        f"random weights (every candidate runs to {setup['max_new_tokens']} tokens), "
        f"{setup['n_candidates']} candidates per window, {WINDOW_S:g} s windows every "
        f"{HOP_S:g} s. Seconds for the {w} windows of one round (median of "
        f"{len(report['records']) // 2} rounds{'' if report['complete'] else ', run cut short'}): one at a time = the sum of {w} `caption` calls, batched = "
        f"one `caption_batch`. Load average (1 min) {report['loadavg_start']:.2f} at start, "
        f"{report['loadavg_end']:.2f} at end (a shared machine: timings are noisy)."),
        "",
        "| mode | " + " | ".join(LABELS[s] for s in STAGES) + " | **total** |",
        "|---|" + "---|" * len(STAGES) + "---|",
    ]
    for mode, label in (("one_at_a_time", "one at a time"), ("batched", f"batch of {w}")):
        m = summary[mode]
        lines.append(f"| {label} | " + " | ".join(f"{m['stages_median_s'][s]:.2f}"
                                                  for s in STAGES)
                     + f" | **{m['total_median_s']:.2f}** |")
    lines.append("| gain | " + " | ".join(f"{summary['stage_gain'].get(s, 0):.2f}x"
                                          for s in STAGES)
                 + f" | **{summary['throughput_gain_median']:.2f}x** |")
    goal = report["goal_throughput_gain"]
    gain = summary["throughput_gain_median"]
    lines += ["", (f"Throughput gain {gain:.2f}x (per round: "
              f"{', '.join(f'{g:.2f}x' for g in summary['throughput_gain_per_round'])}); goal "
              f">= {goal}x: {'met' if gain >= goal else 'missed'}."), ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["", f"Full data: `{Path(report['json_path']).name}`.", ""]
    return "\n".join(lines)


NOTES = [
    ("DAC (codec) does not gain: each source's new hop is its own chunk, encoded one after "
    "another; a 5 s chunk at 24 kHz is already a long convolution (compute-bound: the FLOPs "
    "per window are the same batched or not)."),
    ("CNext and the EnCLAP encoder gain little on a CPU: one window is already a large "
    "matrix/convolution problem, so batching W windows does W times the FLOPs in about W "
    "times the time."),
    ("Sampling gains most: each decoding step multiplies a few dozen rows by every decoder "
    "weight and the LM head (memory-bound: the weights are read once per step whatever the "
    "rows); batching W windows reads them once for W x n_candidates rows."),
    ("Text encoder and fluency: one padded pass over all windows' distinct texts instead of "
    "W small ones (fluency runs in chunks of its batch_size, 32, either way)."),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default=None, help="model preset (default base; tiny with --quick)")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--logit-bias-std", type=float, default=1.0,
                        help="std of a fixed random bias on the decoder's logits (see "
                             "bench/pipeline.py); 0 = off")
    parser.add_argument("--goal", type=float, default=1.6, help="throughput gain goal")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", default="bench/results/batching_cpu.json")
    args = parser.parse_args(argv)
    preset = args.preset or ("tiny" if args.quick else "base")
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    decoding = (DecodingOptions(seed=0, n_candidates=8, max_new_tokens=10) if args.quick
                else DecodingOptions(seed=0))
    components = build_components(preset_spec(preset), seed=0)
    if args.logit_bias_std > 0:
        with torch.no_grad():
            bias = components.captioner.bart.final_logits_bias
            noise = torch.randn(bias.shape, generator=torch.Generator().manual_seed(1234))
            bias.add_(noise * args.logit_bias_std)
    captioner = Captioner(components, decoding, dtype=torch.float32)
    rates = captioner.sample_rates_hz
    n_windows = 2 + 2 * args.rounds
    stream_s = WINDOW_S + HOP_S * (n_windows - 1) + 1.0
    streams = [make_windows(f"source-{i}", stream_s, rates, seed=10 + i)[:n_windows]
               for i in range(args.sources)]
    by_seq = [[s[k] for s in streams] for k in range(n_windows)]
    print(f"built {preset} in {time.perf_counter() - wall0:.1f} s", flush=True)
    captioner.caption_batch(by_seq[0])  # warm-up: every source's first window (whole encodes)
    run_solo(captioner, by_seq[1])  # warm-up of the one-window shapes, in the steady state
    records: list[dict[str, Any]] = []

    def write_report(records: Sequence[dict[str, Any]], *, done: bool) -> dict[str, Any]:
        return _report(args, preset, decoding, records, load_start, wall0, done)

    for r in range(args.rounds):
        first, second = by_seq[2 + 2 * r], by_seq[3 + 2 * r]
        if r % 2 == 0:
            records += [run_solo(captioner, first), run_batch(captioner, second)]
        else:
            records += [run_batch(captioner, first), run_solo(captioner, second)]
        for rec in records[-2:]:
            stages = " ".join(f"{s}={v:.2f}" for s, v in rec["stage_seconds"].items())
            print(f"round {r} {rec['mode']:13s} total={rec['total_s']:.2f} s  {stages}  "
                  f"load={rec['loadavg_before']:.2f}", flush=True)
        write_report(records, done=False)
    return write_report(records, done=True)


def _report(args: argparse.Namespace, preset: str, decoding: DecodingOptions,
            records: Sequence[dict[str, Any]], load_start: float, wall0: float,
            done: bool) -> dict[str, Any]:
    """Write the JSON and the table (after every round, so that a cut run keeps its data)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = parse_cpu_flags(cpuinfo.read_text(encoding="utf-8")) if cpuinfo.exists() else set()
    out_path = Path(args.out)
    report: dict[str, Any] = {
        "setup": {"preset": preset, "sources": args.sources, "rounds": args.rounds,
                  "threads": args.threads, "dtype": "fp32", "torch": torch.__version__,
                  "python": platform.python_version(), "cpu_model": _cpu_model(),
                  "cores": os.cpu_count(), "cpu_flags": sorted(f for f in FLAGS if f in flags),
                  "n_candidates": decoding.n_candidates,
                  "max_new_tokens": decoding.max_new_tokens,
                  "logit_bias_std": args.logit_bias_std},
        "summary": summarise(records),
        "goal_throughput_gain": args.goal,
        "notes": NOTES,
        "records": records,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
        "wall_s": round(time.perf_counter() - wall0, 1),
        "complete": done,
        "json_path": str(out_path),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    out_path.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    if done:
        print(markdown(report))
    return report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
