"""Throughput of a square matmul in fp32 vs bf16 (and fp16 on CUDA) on this machine.

Decides whether ``precision = "auto"`` should pick bf16 on this CPU. Run::

    PYTHONPATH=. .venv/bin/python bench/matmul.py [--size 1024] [--iters 20] [--threads N]
        [--device cpu|cuda] [--out bench/results/matmul.json] [--note TEXT]

Writes one JSON object (machine, settings, per-dtype timings) to ``--out``; when the
file already holds results for other devices they are kept, keyed by device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from streamcap.models.runtime import available_cores, cpu_supports_bf16, parse_cpu_flags


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _bench(dtype: torch.dtype, size: int, iters: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(3):  # warm-up: kernel selection, caches, clocks
            torch.mm(a, b)
        sync()
        times: list[float] = []
        for _ in range(iters):
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            times.append(time.perf_counter() - start)
        ref = torch.mm(a.float(), b.float())
        err = (torch.mm(a, b).float() - ref).abs().max().item() / ref.abs().max().item()
    flops = 2.0 * size**3
    median = statistics.median(times)
    return {
        "median_ms": round(median * 1e3, 3),
        "min_ms": round(min(times) * 1e3, 3),
        "max_ms": round(max(times) * 1e3, 3),
        "gflops_median": round(flops / median / 1e9, 1),
        "gflops_best": round(flops / min(times) / 1e9, 1),
        "max_rel_error_vs_fp32_input": float(f"{err:.3g}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/matmul.json"))
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    load_before = os.getloadavg()
    results = {name: _bench(dtype, args.size, args.iters, device) for name, dtype in dtypes.items()}
    load_after = os.getloadavg()
    fp32 = results["fp32"]["median_ms"]
    for res in results.values():
        res["speedup_vs_fp32"] = round(fp32 / res["median_ms"], 2)

    flags = parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    record = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"}),
        "cpu_supports_bf16": cpu_supports_bf16(),
        "cores_available": available_cores(),
        "torch": torch.__version__,
        "threads": args.threads,
        "size": args.size,
        "iters": args.iters,
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "note": args.note,
        "results": results,
    }
    existing: dict[str, Any] = {}
    if args.out.is_file():
        existing = json.loads(args.out.read_text(encoding="utf-8"))
    existing[device.type] = record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
