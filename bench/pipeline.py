"""Benchmark: per-window cost of the captioning pipeline, optimised vs naive.

A synthetic stream (noise + tones + chirps, 48 kHz, fed in 0.1 s blocks) goes
through :class:`streamcap.audio.windowing.Windower` (10 s windows every 5 s,
at the codec's 24 kHz and the retriever's 32 kHz), and every window is
captioned by:

- the **optimised** pipeline, :meth:`streamcap.models.captioner.Captioner.caption`
  (streaming DAC cache, one batched nucleus-sampling pass over one shared
  encoder output, decoder scores taken from the sampling pass); its own
  ``stage_seconds`` give the split by stage;
- a **naive** pipeline on the same models: a whole-window DAC encode per
  window, plain HF ``bart.generate(encoder_outputs=..., num_return_sequences=N,
  do_sample=True)`` (which repeats the encoder output N times), then a separate
  teacher-forced scoring pass (:func:`streamcap.models.decoding.sampling.score_captions`),
  then the same text encoder, fluency filter and reranking.

Variants (precision of BART/CNext/text encoders + precision of the DAC encoder):
``a`` fp32 + fp32, ``b`` bf16 + fp32 (the default), ``c`` bf16 + bf16. Each
variant is run with ``max_new_tokens`` 30 (the default) and 20. Pipelines are
interleaved window by window so that load from other jobs spreads over all of
them. The first window of a stream encodes all of its audio (no cache yet);
it is reported apart from the steady-state windows. Every pipeline first
captions windows of a separate warm-up source, so the first window of the
measured stream is not also the first call of the process.

Random weights: the decoder almost never samples EOS, so every candidate runs
to ``max_new_tokens`` (an upper bound on the cost with trained weights).

Writes a JSON report and a markdown table.

Run:
    PYTHONPATH=. .venv/bin/python bench/pipeline.py            # base preset, CPU, ~10 min
    PYTHONPATH=. .venv/bin/python bench/pipeline.py --quick    # tiny preset smoke run
    PYTHONPATH=. .venv/bin/python bench/pipeline.py --device cuda --preset large \\
        --out bench/results/pipeline_cuda_large.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from streamcap.audio.windowing import Windower
from streamcap.benchmark import gpu_peak_mib, machine_facts
from streamcap.messages import Window, make_block
from streamcap.models.bundle.components import Components, build_components
from streamcap.models.bundle.presets import parameter_counts, preset_spec
from streamcap.models.captioner import TEXT_MAX_LENGTH, Captioner
from streamcap.models.decoding.candidates import DecodedCaption, attach_texts, dedupe
from streamcap.models.decoding.inference import score_captions
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.decoding.rerank import rerank

INPUT_RATE_HZ = 48000
BLOCK_S = 0.1
WINDOW_S = 10.0
HOP_S = 5.0
STAGES = ("codec", "retriever_audio", "encoder", "sampling", "scoring", "text_encoder", "fluency")
STAGE_LABELS = {
    "codec": "DAC",
    "retriever_audio": "CNext",
    "encoder": "encoder",
    "sampling": "sampling",
    "scoring": "TF scoring",
    "text_encoder": "text enc",
    "fluency": "fluency",
}
VARIANTS: dict[str, tuple[torch.dtype, torch.dtype, str]] = {
    "a": (torch.float32, torch.float32, "fp32 everywhere"),
    "b": (torch.bfloat16, torch.float32, "bf16 BART/CNext/text encoders, fp32 DAC encoder (default)"),
    "c": (torch.bfloat16, torch.bfloat16, "bf16 everywhere (DAC encoder too)"),
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------- input


def synthetic_signal(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Noise + tones + chirps, float32 (n,) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate), dtype=np.float64) / rate
    x = 0.05 * rng.standard_normal(t.size)
    for f0, amp in ((220.0, 0.15), (440.0, 0.1), (1250.0, 0.05)):
        gate = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * t / (3.0 + f0 / 500.0)))
        x += amp * gate * np.sin(2 * np.pi * f0 * t)
    period = 4.0  # a 200 Hz -> 6 kHz chirp every 4 s
    phase_t = np.mod(t, period)
    k = (6000.0 - 200.0) / period
    x += 0.1 * np.sin(2 * np.pi * (200.0 * phase_t + 0.5 * k * phase_t**2))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def make_windows(source_id: str, seconds: float, rates: tuple[int, ...], seed: int) -> list[Window]:
    """All complete windows of a synthetic stream fed in 0.1 s blocks at 48 kHz."""
    signal = synthetic_signal(seconds, INPUT_RATE_HZ, seed)
    windower = Windower(source_id, WINDOW_S, HOP_S, rates)
    block = int(BLOCK_S * INPUT_RATE_HZ)
    windows: list[Window] = []
    for start in range(0, signal.size, block):
        windows += windower.feed(
            make_block(source_id=source_id, start_sample=start, sample_rate_hz=INPUT_RATE_HZ,
                       samples=signal[start : start + block], captured_at=start / INPUT_RATE_HZ)
        ).windows
    return [*windows, *windower.flush()]


# --------------------------------------------------------------------------- pipelines


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """What the captioner does around CNext, the text encoder and the fluency model."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@torch.inference_mode()
def naive_caption(cap: Captioner, window: Window, decoding: DecodingOptions) -> dict[str, float]:
    """The naive pipeline on ``cap``'s models; returns seconds per stage.

    Whole-window DAC encode; HF ``generate`` repeating the encoder output
    ``n_candidates`` times; a teacher-forced scoring pass; then the same text
    encoder, fluency filter and reranking as the captioner.
    """
    c: Components = cap.components
    device, dtype = cap.device, cap.dtype
    if c.retriever is None:
        raise SystemExit("naive pipeline: the benchmark needs a preset with a retriever")
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        _sync(device)
        now = time.perf_counter()
        seconds[stage] = now - t
        t = now

    codec_rate, mel_rate = c.codec.config.sample_rate_hz, c.retriever.config.audio.mel.sample_rate
    tokens = c.codec.tokens(window.samples(codec_rate))  # no cache: the whole window
    lap("codec")
    wave = torch.tensor(window.samples(mel_rate)).to(device)[None, :]
    with _autocast(device, dtype):
        clip, audio_joint = c.retriever.embed_audio(wave)
    audio_joint = torch.nn.functional.normalize(audio_joint.float(), dim=-1)
    lap("retriever_audio")
    hidden, mask = c.captioner.encode(tokens.batched(), clip.to(dtype))
    lap("encoder")
    bart = c.captioner.bart
    n, new = decoding.n_candidates, decoding.max_new_tokens
    # generate() expands encoder_outputs in place: a fresh BaseModelOutput every call.
    out = bart.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
        do_sample=True, top_p=decoding.top_p, temperature=decoding.temperature,
        num_return_sequences=n, max_new_tokens=new, min_new_tokens=decoding.min_tokens,
        no_repeat_ngram_size=decoding.no_repeat_ngram_size, num_beams=1,
        decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2,
        pad_token_id=1, eos_token_id=2, use_cache=True,
    )
    rows: list[list[int]] = []
    for seq in out[:, 1:].tolist():  # drop the decoder start token
        ids: list[int] = []
        for tok in seq:
            ids.append(tok)
            if tok == 2:
                break
        rows.append(ids)
    texts = [c.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in rows]
    lap("sampling")
    scores = score_captions(bart, hidden, mask, rows)
    lap("scoring")
    sampled = [DecodedCaption(token_ids=tuple(ids), decoder_score=s, log_likelihood=s * len(ids),
                              ended_by_model=False, text=txt)
               for ids, s, txt in zip(rows, scores, texts, strict=True)]
    unique = dedupe(sampled) or attach_texts(sampled[:1], c.tokenizer)
    uniq_texts = [u.text for u in unique]
    enc = c.text_tokenizer(uniq_texts, padding=True, truncation=True, max_length=TEXT_MAX_LENGTH,
                           return_tensors="pt")
    with _autocast(device, dtype):
        text_joint = c.retriever.embed_text(enc["input_ids"].to(device),
                                            enc["attention_mask"].to(device))
    text_joint = torch.nn.functional.normalize(text_joint.float(), dim=-1)
    encoder_scores = (text_joint @ audio_joint[0]).tolist()
    lap("text_encoder")
    error_probs = None
    if c.fluency is not None:
        with _autocast(device, dtype):
            error_probs = c.fluency.error_probs(uniq_texts).tolist()
    lap("fluency")
    rerank(uniq_texts, [u.decoder_score for u in unique], encoder_scores, error_probs, decoding)
    lap("rerank")
    return seconds


@dataclass
class Pipeline:
    """One measured configuration."""

    name: str
    kind: str  # "optimised" or "naive"
    variant: str
    captioner: Captioner
    decoding: DecodingOptions
    warm: bool = False  # warm up on another source first (the short pipelines share its models)
    records: list[dict[str, Any]] = field(default_factory=list)

    def run(self, window: Window) -> dict[str, Any]:
        """Caption ``window``; returns per-stage seconds, wall total and load averages."""
        device = self.captioner.device
        load_before = os.getloadavg()
        _sync(device)
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if self.kind == "optimised":
            result = self.captioner.caption(window)
            _sync(device)
            stages = dict(result.stage_seconds)
            extra["n_unique"] = len(result.caption.candidates)
        else:
            stages = naive_caption(self.captioner, window, self.decoding)
        total = time.perf_counter() - t0
        return {"seq": window.seq, "start_s": window.start_s, "stage_seconds": stages,
                "total_s": total, "loadavg_before": list(load_before),
                "loadavg_after": list(os.getloadavg()), **extra}


def _rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(peak / 1024 if sys.platform != "darwin" else peak / 2**20, 1)


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"min_s": round(min(values), 4), "median_s": round(statistics.median(values), 4),
            "max_s": round(max(values), 4)}


def summarise(p: Pipeline) -> dict[str, Any]:
    """Per-stage min/median over the steady-state windows, and the first window."""
    first = [r for r in p.records if r["phase"] == "first"]
    steady = [r for r in p.records if r["phase"] == "steady"]
    out: dict[str, Any] = {"kind": p.kind, "variant": p.variant,
                           "dtype": _DTYPE_NAMES[p.captioner.dtype],
                           "codec_dtype": str(getattr(p.captioner.components.codec, "precision",
                                                      "?")),
                           "max_new_tokens": p.decoding.max_new_tokens,
                           "n_candidates": p.decoding.n_candidates}
    if first:
        out["first_window"] = {"stage_seconds": {k: round(v, 4) for k, v in
                                                 first[0]["stage_seconds"].items()},
                               "total_s": round(first[0]["total_s"], 4)}
    if steady:
        names = [s for s in STAGES + ("rerank",) if s in steady[0]["stage_seconds"]]
        out["steady"] = {
            "n_windows": len(steady),
            "stages": {s: _stats([r["stage_seconds"][s] for r in steady]) for s in names},
            "total": _stats([r["total_s"] for r in steady]),
            "loadavg_1min_range": [round(min(r["loadavg_before"][0] for r in steady), 2),
                                   round(max(r["loadavg_after"][0] for r in steady), 2)],
        }
    if p.kind == "optimised":
        stats = p.captioner._stream.stats
        out["streaming_codec"] = {"windows": stats.windows, "frames_out": stats.frames_out,
                                  "frames_encoded": stats.frames_encoded,
                                  "whole_encodes": stats.whole_encodes}
    out["windows"] = p.records
    return out


# --------------------------------------------------------------------------- report


def compare(summaries: dict[str, dict[str, Any]], target_s: float,
            target_x: float) -> list[dict[str, Any]]:
    """Speed-up of every optimised pipeline over the naive one of the same precision."""
    rows = []
    for name, s in summaries.items():
        if s["kind"] != "optimised" or "steady" not in s:
            continue
        naive = next((n for n, t in summaries.items() if t["kind"] == "naive"
                      and t["variant"] == s["variant"] and "steady" in t
                      and t["max_new_tokens"] == s["max_new_tokens"]), None)
        opt_med = s["steady"]["total"]["median_s"]
        row: dict[str, Any] = {"optimised": name, "naive": naive, "variant": s["variant"],
                               "max_new_tokens": s["max_new_tokens"],
                               "optimised_median_s": opt_med,
                               "optimised_min_s": s["steady"]["total"]["min_s"],
                               "meets_time_target": opt_med <= target_s}
        if naive is not None:
            nv = summaries[naive]["steady"]["total"]
            row.update(naive_median_s=nv["median_s"], naive_min_s=nv["min_s"],
                       speedup_median=round(nv["median_s"] / opt_med, 2),
                       speedup_min=round(nv["min_s"] / s["steady"]["total"]["min_s"], 2))
            row["meets_speedup_target"] = row["speedup_median"] >= target_x
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """A short markdown table of the steady-state medians (min in brackets)."""
    setup = report["setup"]
    lines = [
        f"# Pipeline benchmark: {setup['preset']} preset on {setup['device_name']}",
        "",
        f"{setup['window_s']:g} s windows every {setup['hop_s']:g} s, {setup['n_candidates']} "
        f"candidates, top_p {setup['top_p']}, temperature {setup['temperature']}, "
        f"{setup['threads']} torch threads, random weights (every candidate runs to "
        "max_new_tokens: an upper bound; a fixed random logit bias of std "
        f"{setup.get('logit_bias_std', 0)} keeps the candidates distinct, as a trained model's "
        "are). Seconds per window, steady state: median (min). "
        f"Load average (1 min) {setup['loadavg_start'][0]:.2f} at start, "
        f"{report['loadavg_end'][0]:.2f} at end: the machine is shared, timings are noisy.",
        "",
        "| pipeline | precision (model / DAC) | new tok | " +
        " | ".join(STAGE_LABELS[s] for s in STAGES) + " | **total** | first window | speed-up |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|---|---|",
    ]
    speedups = {r["optimised"]: r for r in report["comparisons"]}
    for name, s in report["pipelines"].items():
        if "steady" not in s:
            continue
        st = s["steady"]["stages"]
        cells = [f"{st[k]['median_s']:.2f} ({st[k]['min_s']:.2f})" if k in st else "-"
                 for k in STAGES]
        tot = s["steady"]["total"]
        first = s.get("first_window", {}).get("total_s")
        cmp = speedups.get(name)
        sp = f"{cmp['speedup_median']:.1f}x" if cmp and "speedup_median" in cmp else ""
        lines.append(
            f"| {name} | {s['dtype']} / {s['codec_dtype']} | {s['max_new_tokens']} | "
            + " | ".join(cells)
            + f" | **{tot['median_s']:.2f}** ({tot['min_s']:.2f}) | "
            + (f"{first:.2f}" if first is not None else "-") + f" | {sp} |"
        )
    lines += ["", f"Targets: <= {report['targets']['seconds_per_window']} s per window and "
              f">= {report['targets']['speedup']}x over naive (same precision, same new tokens).", ""]
    for r in report["comparisons"]:
        sp = (f"{r['speedup_median']:.1f}x median ({r['speedup_min']:.1f}x min) over "
              f"{r['naive']}: {'meets' if r['meets_speedup_target'] else 'misses'} the speed-up target"
              if r.get("naive") else "no naive baseline")
        lines.append(f"- {r['optimised']}: {r['optimised_median_s']:.2f} s median, "
                     f"{'meets' if r['meets_time_target'] else 'misses'} the time target; {sp}.")
    gpu = (f" GPU memory peak {report['gpu_peak_mib']:.0f} MiB (torch allocated)."
           if report.get("gpu_peak_mib") is not None else "")
    lines += ["", (f"Peak RSS {report['rss_mib']['peak']:.0f} MiB.{gpu} Full data: "
                   f"`{Path(report['json_path']).name}`."), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="model preset (default base; tiny with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--variants", default="a,b,c", help="comma list of a, b, c")
    parser.add_argument("--windows", type=int, default=4, help="steady windows, optimised, 30 tokens")
    parser.add_argument("--naive-windows", type=int, default=3, help="steady windows, naive, 30 tokens")
    parser.add_argument("--short-windows", type=int, default=2,
                        help="steady windows of every pipeline with max_new_tokens 20")
    parser.add_argument("--short-tokens", type=int, default=20, help="the shorter max_new_tokens")
    parser.add_argument("--stream-s", type=float, default=60.0, help="length of the synthetic stream")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--out", default="bench/results/pipeline_cpu.json")
    parser.add_argument("--md", default=None, help="markdown table path (default: --out with .md)")
    parser.add_argument("--logit-bias-std", type=float, default=1.0,
                        help="std of a fixed random bias added to the decoder's output logits. "
                             "A randomly initialised BART with tied embeddings keeps repeating "
                             "its previous token, so all candidates come out identical and the "
                             "text encoder and fluency stages would be timed on one caption; the "
                             "bias makes the candidates differ, as a trained model's do. 0 = off")
    parser.add_argument("--target-s", type=float, default=1.5)
    parser.add_argument("--target-x", type=float, default=4.0)
    args = parser.parse_args(argv)
    preset = args.preset or ("tiny" if args.quick else "base")
    if args.quick:
        args.windows, args.naive_windows, args.short_windows, args.stream_s = 1, 1, 1, 15.0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wall0 = time.perf_counter()
    load_start = os.getloadavg()
    spec = preset_spec(preset)

    n_cand, n_tok = (8, 10) if args.quick else (DecodingOptions().n_candidates,
                                                 DecodingOptions().max_new_tokens)
    short_tokens = min(args.short_tokens, n_tok - 2) if args.quick else args.short_tokens
    base_decoding = DecodingOptions(seed=0, n_candidates=n_cand, max_new_tokens=n_tok)
    short_decoding = DecodingOptions(seed=0, n_candidates=n_cand, max_new_tokens=short_tokens)
    t_build = time.perf_counter()
    fresh = build_components(spec, seed=0)
    if args.logit_bias_std > 0:
        with torch.no_grad():
            bias = fresh.captioner.bart.final_logits_bias
            gen = torch.Generator().manual_seed(1234)
            bias += torch.randn(bias.shape, generator=gen) * args.logit_bias_std
    build_s = time.perf_counter() - t_build
    pipelines: list[tuple[Pipeline, int]] = []  # (pipeline, steady windows)
    for v in args.variants.split(","):
        dtype, codec_dtype, _ = VARIANTS[v]
        comps = copy.deepcopy(fresh)  # Captioner casts its components in place
        opt = Captioner(comps, base_decoding, device=device, dtype=dtype, codec_dtype=codec_dtype)
        # Same models, own streaming cache.
        short = Captioner(comps, short_decoding, device=device, dtype=dtype,
                          codec_dtype=codec_dtype)
        pipelines += [
            (Pipeline(f"opt-{v}", "optimised", v, opt, base_decoding, warm=True), args.windows),
            (Pipeline(f"naive-{v}", "naive", v, opt, base_decoding, warm=True),
             args.naive_windows),
            (Pipeline(f"opt-{v}-m{short_tokens}", "optimised", v, short, short_decoding),
             args.short_windows),
            (Pipeline(f"naive-{v}-m{short_tokens}", "naive", v, short, short_decoding),
             args.short_windows),
        ]
    del fresh
    rates = pipelines[0][0].captioner.sample_rates_hz
    windows = make_windows("bench", args.stream_s, rates, seed=1)
    warmup = make_windows("warmup", WINDOW_S + HOP_S, rates, seed=2)
    n_needed = 1 + max(args.windows, args.naive_windows, args.short_windows)
    if len(windows) < n_needed:
        parser.error(f"--stream-s {args.stream_s} gives {len(windows)} windows, {n_needed} needed")
    rss_built = _rss_mib()
    print(f"built {preset} x{len(args.variants.split(','))} in {time.perf_counter() - wall0:.1f} s, "
          f"RSS {rss_built:.0f} MiB", flush=True)

    for p, _ in pipelines:  # warm-up: first-window and steady-state shapes, other source
        if not p.warm:
            continue
        for w in warmup[: 2 if p.kind == "optimised" else 1]:
            p.run(w)
        print(f"warm {p.name}", flush=True)
    counts = parameter_counts(spec)
    out_path = Path(args.out)
    machine = dataclasses.asdict(machine_facts(device))  # CPU flags; on CUDA the card

    def write_report(done: bool) -> dict[str, Any]:
        """Write the JSON and the table (after every round, so a cut run keeps its data)."""
        summaries = {p.name: summarise(p) for p, _ in pipelines}
        report: dict[str, Any] = {
            "setup": {
                "preset": preset, "device": str(device),
                "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                else f"{platform.machine()} CPU, {os.cpu_count()} cores"),
                "cpu_model": _cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
                "threads": args.threads, "window_s": WINDOW_S, "hop_s": HOP_S,
                "stream_s": args.stream_s, "input_rate_hz": INPUT_RATE_HZ, "block_s": BLOCK_S,
                "model_rates_hz": list(rates), "n_candidates": base_decoding.n_candidates,
                "top_p": base_decoding.top_p, "temperature": base_decoding.temperature,
                "max_new_tokens": [base_decoding.max_new_tokens, short_tokens],
                "no_repeat_ngram_size": base_decoding.no_repeat_ngram_size,
                "variants": {v: VARIANTS[v][2] for v in args.variants.split(",")},
                "parameter_counts": counts, "build_components_s": round(build_s, 2),
                "logit_bias_std": args.logit_bias_std,
                "loadavg_start": list(load_start),
                "notes": [
                    "random weights: EOS is (almost) never sampled, so every candidate runs to "
                    "max_new_tokens; real captions stop earlier, so sampling/scoring costs are upper bounds",
                    "shared machine: other jobs ran at the same time; per-window load averages are in "
                    "'windows'; prefer min and median",
                    "optimised stage split from Captioner.caption's stage_seconds; naive stages timed "
                    "here with the same boundaries, plus 'scoring' (teacher-forced pass) and 'rerank'",
                    "first window: the streaming codec has no cache yet and encodes the whole window; "
                    "every pipeline warmed up on another source first",
                ],
            },
            "targets": {"seconds_per_window": args.target_s, "speedup": args.target_x},
            "comparisons": compare(summaries, args.target_s, args.target_x),
            "pipelines": summaries,
            "rss_mib": {"after_build": rss_built, "peak": _rss_mib()},
            "machine": machine,
            "gpu_peak_mib": gpu_peak_mib(device),
            "loadavg_end": list(os.getloadavg()),
            "wall_s": round(time.perf_counter() - wall0, 1),
            "complete": done,
            "json_path": str(out_path),
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        md_path = Path(args.md) if args.md else out_path.with_suffix(".md")
        md_path.write_text(markdown(report), encoding="utf-8")
        if done:
            print(markdown(report))
        return report

    for k in range(n_needed):
        for p, steady in pipelines:
            if k > steady:
                continue
            rec = p.run(windows[k])
            rec["phase"] = "first" if k == 0 else "steady"
            p.records.append(rec)
            stages = " ".join(f"{s}={v:.2f}" for s, v in rec["stage_seconds"].items())
            print(f"w{k} {p.name:14s} total={rec['total_s']:.2f} s  {stages}  "
                  f"load={rec['loadavg_before'][0]:.2f}", flush=True)
        write_report(False)

    return write_report(True)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
