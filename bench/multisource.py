"""Benchmark: many sources at once, one at a time vs batched, for committed results.

The measuring is :mod:`streamcap.benchmark` (the same as ``streamcap bench``): the
captioner is built as the daemon builds it from a preset (random weights) on
``--device``, synthetic windows of ``max(--sources)`` distinct sources are cut by the
daemon's windower, then one window at a time and ``caption_batch`` over ``k`` sources
for every ``k`` of ``--sources`` are timed. The report gives seconds per window, the
real-time factor, batched throughput against one at a time, and the largest number of
10 s / 5 s streams kept up with (rule in ``docs/benchmark.md``), with the machine's
facts: CPU model and flags (avx2, avx512f, avx512_bf16, amx), torch version, load
average; on CUDA the card, its driver and CUDA versions and the peak GPU memory
torch allocated.

Writes ``<out-dir>/multisource_<device>_<preset>.json`` and ``.md`` after every
measured call, so a run cut short keeps what it measured (``"complete": false``).

Run:
    PYTHONPATH=. .venv/bin/python bench/multisource.py --sources 4          # CPU, base
    PYTHONPATH=. python3 bench/multisource.py --device cuda --preset large \\
        --sources 1,8,32,64,128                                             # one GPU
    PYTHONPATH=. .venv/bin/python bench/multisource.py --quick              # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from streamcap.benchmark import (
    BenchPlan,
    BenchReport,
    build,
    format_markdown,
    iter_sizes,
    report_dict,
    run_benchmark,
)
from streamcap.models.decoding.options import DecodingOptions


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--preset", default=None, help="model preset (default base; tiny with --quick)")
    p.add_argument("--sources", default="4",
                   help="comma list of batch sizes to measure; the largest is the number of "
                        "sources (e.g. 1,8,32,64,128; default 4: batches of 2 and 4 on 4 sources)")
    p.add_argument("--window-s", type=float, default=10.0, help="window length (default 10)")
    p.add_argument("--hop-s", type=float, default=5.0, help="hop between windows (default 5)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (as [model])")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own)")
    p.add_argument("--reps", type=int, default=3, help="measured calls per batch size")
    p.add_argument("--no-warm-each", action="store_true",
                   help="no unrecorded warm-up batch before each size (medians over --reps "
                        "absorb a cold first call; saves time on a GPU)")
    p.add_argument("--seconds", type=float, default=900.0,
                   help="measuring budget: no batch size or repetition starts after it")
    p.add_argument("--batch-max", type=int, default=None,
                   help="largest batch of the kept-up-with rule (default: the largest size)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="decoding max_new_tokens (default: the decoding default)")
    p.add_argument("--logit-bias-std", type=float, default=1.0,
                   help="fixed random bias on the decoder's logits so that candidates differ "
                        "(random weights; see streamcap.benchmark.add_logit_bias); 0 = off")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--name", default=None,
                   help="results file stem (default multisource_<device>_<preset>)")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, 2 sources, 8 candidates, 8 tokens, 1 repetition, no "
                        "warm-up per size, 1 s hop: a smoke run")
    return p.parse_args(argv)


def sizes_for(text: str) -> tuple[int, tuple[int, ...]]:
    """(number of sources, batch sizes to measure) from ``--sources``.

    ``"4"`` alone means 4 sources with batches of 2 and 4 (one at a time is always
    measured); a list is measured as given.
    """
    sizes = sorted(set(iter_sizes(text)))
    if not sizes:
        raise ValueError("--sources: expected at least one number")
    if len(sizes) == 1:
        n = sizes[0]
        return n, tuple(k for k in (2, 4, 8, 16, 32, 64, 128, 256) if k < n) + ((n,) if n > 1
                                                                              else ())
    return sizes[-1], tuple(sizes)


def main(argv: Sequence[str] | None = None) -> BenchReport:
    args = parse_args(argv)
    preset = args.preset or ("tiny" if args.quick else "base")
    try:
        sources, batch_sizes = sizes_for("2" if args.quick and args.sources == "4"
                                         else args.sources)
    except ValueError as exc:
        raise SystemExit(f"multisource: {exc}") from None
    decoding = DecodingOptions()
    if args.quick:
        decoding = DecodingOptions(n_candidates=8, max_new_tokens=8, min_new_tokens=2)
        args.reps, args.no_warm_each, args.hop_s = 1, True, 1.0
    if args.max_new_tokens is not None:
        decoding = DecodingOptions(n_candidates=decoding.n_candidates,
                                   max_new_tokens=args.max_new_tokens,
                                   min_new_tokens=min(decoding.min_new_tokens,
                                                      args.max_new_tokens))
    device_kind = args.device.split(":")[0]
    stem = args.name or f"multisource_{device_kind}_{preset}"
    out_json = args.out_dir / f"{stem}.json"
    out_md = args.out_dir / f"{stem}.md"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {text}", file=sys.stderr, flush=True)

    progress(f"building {preset} on {args.device}")
    built = build(preset, decoding, device=args.device, precision=args.precision,
                  threads=args.threads, logit_bias_std=args.logit_bias_std)
    progress(f"built in {built.build_s:.1f} s")
    plan = BenchPlan(sources=sources, window_s=args.window_s, hop_s=args.hop_s,
                     batch_sizes=batch_sizes,
                     batch_max=args.batch_max or max(batch_sizes, default=1),
                     seconds=args.seconds, reps=args.reps, warm_each=not args.no_warm_each)
    notes = ["command: bench/multisource.py "
             + " ".join(sys.argv[1:] if argv is None else list(argv))]

    def write(report: BenchReport) -> None:
        tmp = out_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report_dict(report), indent=1) + "\n", encoding="utf-8")
        tmp.replace(out_json)
        out_md.write_text(format_markdown(report, out_json.name), encoding="utf-8")

    report = run_benchmark(built, plan, progress=progress, on_report=write, extra_notes=notes)
    print(format_markdown(report, out_json.name))
    progress(f"wrote {out_json} and {out_md}")
    return report


if __name__ == "__main__":
    main()
