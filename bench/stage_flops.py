"""Benchmark: where a steady-state window's time goes, stage by stage, against this CPU's peak.

For one preset (random weights, as ``streamcap bench`` builds it) and one precision plan:

- **FLOPs per stage** of one steady-state 10 s window at a 5 s hop, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and
  attention; element-wise work such as DAC's snake activations is not counted) and
  booked to the stage whose module ran them;
- **seconds per stage**, the captioner's own ``stage_seconds`` (median of ``--windows``
  windows, measured without the counter, which slows every op down);
- **the machine's peak** for the precisions that run here: a 2048 x 2048 fp32 matrix
  product, and the same product through a dynamic int8 ``Linear``, both at the
  benchmark's thread count.

The achieved rate (FLOPs / seconds) of each stage against the peak says whether a stage
is compute-bound (near the peak: only fewer FLOPs or a faster precision helps) or
bound by something else (memory traffic, element-wise work, Python, small matrices).
Int8 stages are counted with their float FLOPs (the same products, done in int8).

Run (about 3 minutes for the base preset on a 2-core CPU):
    PYTHONPATH=. .venv/bin/python bench/stage_flops.py --preset base --precision auto
    PYTHONPATH=. .venv/bin/python bench/stage_flops.py --preset base --precision int8 \\
        --out bench/results/stage_flops_cpu_base_int8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.utils.flop_counter import FlopCounterMode

from streamcap.benchmark import (
    SyntheticSource,
    build,
    component_precisions,
    loadavg,
    machine_facts,
)
from streamcap.models.captioner import Captioner
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.quantize import quantize_linears

WINDOW_S, HOP_S = 10.0, 5.0


def module_stages(captioner: Captioner) -> dict[str, torch.nn.Module]:
    """The module whose FLOPs each stage books (stage names as in ``stage_seconds``)."""
    c = captioner.components
    codec: torch.nn.Module = getattr(c.codec, "module")  # noqa: B009 - not in the protocol
    stages: dict[str, torch.nn.Module] = {"codec": codec}  # encoder + quantizer
    if c.retriever is not None:
        stages["retriever_audio"] = c.retriever.audio_encoder
        stages["text_encoder"] = c.retriever.text_encoder
    bart = c.captioner.bart
    stages["encoder"] = bart.model.encoder
    stages["sampling"] = bart.model.decoder
    stages["sampling (LM head)"] = bart.lm_head
    if c.fluency is not None:
        stages["fluency"] = c.fluency.model
    return stages


def stage_flops(captioner: Captioner, window: Any) -> dict[str, int]:
    """FLOPs per stage of one ``caption`` call.

    One counter runs over the whole call; every leaf module of a stage's module books
    the counter's growth during its call to that stage (leaf modules are called even
    where the decoding loop calls a layer's parts directly). Dynamic int8 Linears are
    not seen by the counter: their products are counted from their shapes. What no leaf
    module ran (functional attention, the quantizer's distance products) is booked to
    ``"other (functional ops)"``.
    """
    stages = module_stages(captioner)
    counts = dict.fromkeys(stages, 0)
    counter = FlopCounterMode(display=False)
    handles = []
    before: list[int] = []
    int8_flops = [0]

    def pre(_module: torch.nn.Module, _args: Any) -> None:
        before.append(int(counter.get_total_flops()))

    def post(stage: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, _out: Any) -> None:
            counts[stage] += int(counter.get_total_flops()) - before.pop()
            if isinstance(module, Int8Linear):
                x = args[0]  # a dynamic int8 Linear: 2 * rows * in * out
                rows = x.numel() // module.in_features
                flops = 2 * rows * module.in_features * module.out_features
                counts[stage] += flops
                int8_flops[0] += flops
        return hook

    for stage, module in stages.items():
        for leaf in module.modules():
            # a dynamic int8 Linear holds its packed weights in a child that is never called
            if next(leaf.children(), None) is None or isinstance(leaf, Int8Linear):
                handles.append(leaf.register_forward_pre_hook(pre))
                handles.append(leaf.register_forward_hook(post(stage)))
    try:
        with counter:
            captioner.caption(window)
    finally:
        for h in handles:
            h.remove()
    total = int(counter.get_total_flops())
    counted = sum(counts.values()) - int8_flops[0]  # int8 products are not in ``total``
    counts["other (functional ops)"] = total - counted
    counts["all stages"] = total + int8_flops[0]
    return counts


def peak_gflops(threads: int, size: int = 2048, reps: int = 10) -> dict[str, float]:
    """Best-of-``reps`` GFLOP/s of an fp32 matrix product and of a dynamic int8 Linear."""
    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    linear = torch.nn.Linear(size, size, bias=False)
    int8 = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False))
    quantize_linears(int8)  # in place
    flops = 2 * size**3
    out: dict[str, float] = {}
    for name, fn in (("fp32_matmul", lambda: a @ linear.weight.T),
                     ("int8_dynamic_linear", lambda: int8(a))):
        fn()
        best = min(_timed(fn) for _ in range(reps))
        out[name] = round(flops / best / 1e9, 1)
    return out


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--precision", default="auto", help="auto, fp32 or int8 (as [model])")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=3, help="steady windows timed")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/stage_flops_cpu_<preset>_<precision>.json)")
    args = p.parse_args(argv)
    out = Path(args.out or f"bench/results/stage_flops_cpu_{args.preset}_{args.precision}.json")
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    built = build(args.preset, DecodingOptions(seed=0), device="cpu", precision=args.precision,
                  threads=args.threads)
    cap = built.captioner
    source = SyntheticSource("flops", WINDOW_S, HOP_S, cap.sample_rates_hz, seed=0)
    cap.caption(source.next_window())  # first window: whole encode, fills the codec cache
    cap.caption(source.next_window())  # steady-state shapes once
    timed = [cap.caption(source.next_window()) for _ in range(args.windows)]
    seconds = {stage: statistics.median(r.stage_seconds.get(stage, 0.0) for r in timed)
               for stage in timed[0].stage_seconds}
    flops = stage_flops(cap, source.next_window())
    peaks = peak_gflops(args.threads)
    precisions = component_precisions(cap)
    rows = []
    for stage, seconds_s in seconds.items():
        f = flops.get(stage, 0) + (flops.get("sampling (LM head)", 0) if stage == "sampling" else 0)
        rate = f / seconds_s / 1e9 if seconds_s > 0 and f else None
        rows.append({"stage": stage, "seconds": round(seconds_s, 3),
                     "gflop": round(f / 1e9, 2), "gflops_achieved":
                     None if rate is None else round(rate, 1),
                     "share_of_fp32_peak": None if rate is None
                     else round(rate / peaks["fp32_matmul"], 2)})
    machine = machine_facts(torch.device("cpu"))
    report: dict[str, Any] = {
        "preset": args.preset, "precision_requested": args.precision,
        "precisions": precisions, "threads": args.threads, "window_s": WINDOW_S,
        "hop_s": HOP_S, "torch": torch.__version__,
        "machine": {"cpu": machine.cpu_model, "flags": list(machine.cpu_flags),
                    "missing": list(machine.cpu_flags_missing)},
        "peak_gflops": peaks, "stages": rows,
        "total_seconds": round(sum(seconds.values()), 3),
        "flops_all_stages_gflop": round(flops["all stages"] / 1e9, 2),
        "flops_functional_gflop": round(flops["other (functional ops)"] / 1e9, 2),
        "loadavg_start": list(load_start), "loadavg_end": list(loadavg()),
        "notes": [("FLOPs of matrix products, convolutions and attention only; element-wise "
                  "work (DAC's snake activations, softmax, layer norms) is not counted"),
                  "int8 stages counted with the FLOPs of the same products in float",
                  "random weights: every candidate runs to max_new_tokens (upper bound)"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    peaks = r["peak_gflops"]
    m = r["machine"]
    lines = [
        f"# Where a window's time goes: {r['preset']} preset, precision {r['precision_requested']}",
        "",
        (f"{m['cpu']}, {r['threads']} torch threads, torch {r['torch']}. CPU features: "
        f"{' '.join(m['flags']) or 'none'} (missing: {' '.join(m['missing']) or 'none'}). "
        f"Load average (1 min) {r['loadavg_start'][0]:.2f} at start, "
        f"{r['loadavg_end'][0]:.2f} at end."),
        "",
        (f"Measured peak here: fp32 matrix product {peaks['fp32_matmul']} GFLOP/s, dynamic int8 "
        f"Linear {peaks['int8_dynamic_linear']} GFLOP/s (2048 x 2048, best of 10)."),
        "",
        "Precision per component: " + ", ".join(f"{k} {v}" for k, v in r["precisions"].items()),
        "",
        "| stage | seconds (median) | GFLOP | GFLOP/s achieved | share of fp32 peak |",
        "|---|---|---|---|---|",
    ]
    for row in r["stages"]:
        lines.append(f"| {row['stage']} | {row['seconds']:.3f} | {row['gflop']:.2f} | "
                     f"{row['gflops_achieved'] if row['gflops_achieved'] is not None else '-'} | "
                     f"{row['share_of_fp32_peak'] if row['share_of_fp32_peak'] is not None else '-'} |")
    lines += ["", (f"Total {r['total_seconds']:.2f} s per steady-state window "
              f"({r['window_s']:g} s windows every {r['hop_s']:g} s); all counted stages "
              f"{r['flops_all_stages_gflop']:.1f} GFLOP, of which {r['flops_functional_gflop']:.1f} in "
              "functional ops (attention, the quantizer) booked to no stage above."), ""]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
