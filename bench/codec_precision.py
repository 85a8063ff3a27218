"""Measure DAC codec precision (fp32 / bf16 / split) and streaming agreement on this CPU.

Random weights only (no trained DAC weights are available here), transformers'
default initialisation. Results go to ``bench/results/codec_precision.json``
and ``bench/results/codec_streaming.json``.

    PYTHONPATH=. .venv/bin/python bench/codec_precision.py [--part precision|streaming|all]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcap.models.codecs.dac import (
    CodecConfig,
    CodecTokenizer,
    DacEncoderQuantizer,
    codec_preset,
)
from streamcap.models.codecs.streaming import StreamingCodec, StreamingOptions

RESULTS = Path(__file__).parent / "results"
SR = 24000


def test_signal(seconds: float, seed: int = 0) -> np.ndarray:
    """float32 (n,): pink-ish noise, two gated tones and a chirp, peak about 0.6."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    noise = np.cumsum(rng.standard_normal(n)) * 0.002
    noise -= np.convolve(noise, np.ones(2400) / 2400, mode="same")
    white = 0.03 * rng.standard_normal(n)
    tone = 0.25 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 0.4 * t) > 0)
    tone2 = 0.15 * np.sin(2 * np.pi * 1234 * t + 3 * np.sin(2 * np.pi * 2 * t))
    chirp = 0.1 * np.sin(2 * np.pi * (200 * t + 300 * t**2 / max(seconds, 1e-9)))
    signal: np.ndarray = (noise + white + tone + tone2 + chirp).astype(np.float32)
    return signal


def analytic_receptive_field(config: CodecConfig) -> dict[str, float]:
    """Upper bound of the one-sided receptive field in samples and frames (kernels, dilations, strides)."""
    spacing = 1  # input samples between neighbouring positions at the current layer
    half = 3  # first conv, kernel 7
    for stride in config.downsampling_ratios:
        half += spacing * 3 * (1 + 3 + 9)  # three residual units, kernel 7, dilations 1, 3, 9
        half += spacing * math.ceil(stride / 2) + spacing * stride  # strided conv, kernel 2*stride
        spacing *= stride
    half += spacing  # last conv, kernel 3
    return {"samples": half, "frames": half / config.hop_length}


def empirical_receptive_field(tok: CodecTokenizer, seconds: float = 2.0) -> dict[str, Any]:
    """Frames whose latents change when one sample in the middle changes."""
    x = test_signal(seconds, seed=3)
    hop = tok.config.hop_length
    n = (len(x) // hop) * hop
    x = x[:n]
    p = n // 2 + hop // 2
    enc = tok.module.encoder
    with torch.inference_mode():
        a = enc(torch.from_numpy(x).view(1, 1, -1))
        y = x.copy()
        y[p] += 0.5
        b = enc(torch.from_numpy(y).view(1, 1, -1))
    changed = ((a - b).abs().amax(dim=1)[0] > 0).nonzero().flatten().tolist()
    centre = p // hop
    return {
        "perturbed_frame": centre,
        "changed_frames_left": centre - min(changed),
        "changed_frames_right": max(changed) - centre,
    }


def latent_edge_error(tok: CodecTokenizer, seconds: float = 6.0, edge: int = 40) -> list[float]:
    """Max |latent difference| (relative to latent RMS) vs distance in frames from a chunk start."""
    x = test_signal(seconds, seed=4)
    hop = tok.config.hop_length
    n_frames = len(x) // hop
    x = x[: n_frames * hop]
    cut = n_frames // 2
    enc = tok.module.encoder
    with torch.inference_mode():
        whole = enc(torch.from_numpy(x).view(1, 1, -1))[0]
        part = enc(torch.from_numpy(x[cut * hop :]).view(1, 1, -1))[0]
    rms = whole.pow(2).mean().sqrt()
    diff = (whole[:, cut : cut + edge] - part[:, :edge]).abs().amax(dim=0) / rms
    return [float(d) for d in diff]


def streaming_agreement(
    tok: CodecTokenizer,
    options: StreamingOptions,
    *,
    seconds: float,
    window_s: float = 10.0,
    hop_s: float = 5.0,
    edge_frames: int = 12,
    whole: list[np.ndarray] | None = None,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Agreement of streamed window codes with whole-window codes, interior and edges apart."""
    x = test_signal(seconds, seed=1)
    codec = StreamingCodec(tok, options)
    starts = list(range(0, int((seconds - window_s) * SR) + 1, int(hop_s * SR)))
    if whole is None:
        whole = [tok.encode(x[s : s + int(window_s * SR)]) for s in starts]
    eq_interior, eq_left, eq_right, eq_all = [], [], [], []
    for s, ref in zip(starts, whole, strict=True):
        got = codec.feed(source_id="bench", epoch=0, start_sample=s,
                         audio=x[s : s + int(window_s * SR)]).to_numpy()
        eq = got == ref
        eq_all.append(eq)
        eq_interior.append(eq[:, edge_frames:-edge_frames])
        eq_left.append(eq[:, :edge_frames])
        eq_right.append(eq[:, -edge_frames:])
    result = {
        "options": {
            "context_frames_left": options.context_frames_left,
            "context_frames_right": options.context_frames_right,
            "exact_edges": options.exact_edges,
        },
        "windows": len(starts),
        "overall": float(cat(eq_all).mean()),
        "interior": float(cat(eq_interior).mean()),
        "left_edge": float(cat(eq_left).mean()),
        "right_edge": float(cat(eq_right).mean()),
        "interior_per_codebook": [round(float(v), 5) for v in cat(eq_interior).mean(axis=1)],
        "left_edge_first_window_excluded": float(cat(eq_left[1:]).mean()) if len(eq_left) > 1 else None,
        "frames_encoded": codec.stats.frames_encoded,
        "frames_out": codec.stats.frames_out,
    }
    return result, whole


def cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=1)


def run_streaming() -> dict[str, Any]:
    out: dict[str, Any] = {
        "note": "random weights (transformers init); 10 s windows every 5 s; edges = first/last "
        "12 frames of each window; whole-window encode is the reference",
        "torch_threads": torch.get_num_threads(),
        "models": {},
    }
    for name, seconds, contexts in (("tiny", 60.0, (0, 2, 4, 6, 8, 10, 12)), ("dac24k", 20.0, (0, 8, 10))):
        config = codec_preset(name)
        torch.manual_seed(0)
        tok = CodecTokenizer(config)
        entry: dict[str, Any] = {
            "analytic_receptive_field": analytic_receptive_field(config),
            "empirical_receptive_field": empirical_receptive_field(tok),
            "latent_rel_error_by_frames_from_chunk_start": [
                round(v, 6) for v in latent_edge_error(tok)
            ],
            "runs": [],
        }
        whole = None
        for ctx in contexts:
            for exact in (True, False) if ctx == 10 else (True,):
                t0 = time.perf_counter()
                res, whole = streaming_agreement(
                    tok,
                    StreamingOptions(context_frames_left=ctx, context_frames_right=ctx, exact_edges=exact),
                    seconds=seconds,
                    whole=whole,
                )
                res["seconds"] = round(time.perf_counter() - t0, 2)
                entry["runs"].append(res)
                print(name, res["options"], res["overall"], res["interior"], res["left_edge"], flush=True)
        out["models"][name] = entry
    return out


def _codes_with(model: DacEncoderQuantizer, x: torch.Tensor, enc_dtype: torch.dtype, q_dtype: torch.dtype,
                k: int) -> tuple[np.ndarray, float]:
    with torch.inference_mode():
        t0 = time.perf_counter()
        z = model.encoder(x.to(enc_dtype))
        codes = model.quantizer(z.to(q_dtype), k)[1]
        return codes[0].numpy(), time.perf_counter() - t0


def run_precision() -> dict[str, Any]:
    config = codec_preset("dac24k")
    torch.manual_seed(0)
    tok = CodecTokenizer(config)
    fp32 = tok.module
    bf16_all = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16_enc = copy.deepcopy(fp32)
    bf16_enc.encoder.to(torch.bfloat16)
    fp16_enc = copy.deepcopy(fp32)
    fp16_enc.encoder.to(torch.float16)
    k = config.n_codebooks
    variants = {
        "fp32": (fp32, torch.float32, torch.float32),
        "bf16_all": (bf16_all, torch.bfloat16, torch.bfloat16),
        "bf16_split": (bf16_enc, torch.bfloat16, torch.float32),
        "fp16_split": (fp16_enc, torch.float16, torch.float32),
    }
    out: dict[str, Any] = {
        "note": "dac24k architecture, random weights (transformers init); signal = noise + tones + "
        "chirp; split = encoder in low precision, quantizer (in_proj + cosine nearest codebook) in "
        "fp32; timings on a shared 2-core VM (other jobs running), torch.set_num_threads(2)",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "code_change_vs_fp32": {},
        "timing_10s_encode_s": {},
    }
    for seed, seconds in ((1, 4.0), (2, 4.0)):
        x = torch.from_numpy(test_signal(seconds, seed=seed)[: int(seconds * SR) // 320 * 320]).view(1, 1, -1)
        ref, _ = _codes_with(fp32, x, torch.float32, torch.float32, k)
        for name, (model, ed, qd) in variants.items():
            codes, _ = _codes_with(model, x, ed, qd, k)
            changed = codes != ref
            entry = out["code_change_vs_fp32"].setdefault(name, {"per_signal": []})
            entry["per_signal"].append({
                "seed": seed,
                "seconds": seconds,
                "overall": round(float(changed.mean()), 5),
                "codebook0": round(float(changed[0].mean()), 5),
                "first8": round(float(changed[:8].mean()), 5),
                "per_codebook": [round(float(v), 4) for v in changed.mean(axis=1)],
            })
            print(name, seed, entry["per_signal"][-1]["overall"], entry["per_signal"][-1]["codebook0"], flush=True)
    # The split as CodecTokenizer implements it must equal the hand-made split above.
    tok_bf16 = CodecTokenizer(config, model=copy.deepcopy(fp32), precision="bf16")
    clip = test_signal(4.0, seed=1)
    clip = clip[: len(clip) // 320 * 320]
    manual, _ = _codes_with(bf16_enc, torch.from_numpy(clip).view(1, 1, -1), torch.bfloat16, torch.float32, k)
    out["tokenizer_bf16_equals_manual_split"] = bool((tok_bf16.encode(clip) == manual).all())
    x10 = torch.from_numpy(test_signal(10.0, seed=5)).view(1, 1, -1)
    # Interleaved rounds, so that load from other jobs on the shared machine hits all variants
    # alike; fp16 convolutions are slow on CPU, so fp16 is timed in one round only.
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(3):
        for name, (model, ed, qd) in variants.items():
            if name == "fp16_split" and round_ > 0:
                continue
            times[name].append(_codes_with(model, x10, ed, qd, k)[1])
            print("time", name, round(times[name][-1], 3), flush=True)
    for name, ts in times.items():
        out["timing_10s_encode_s"][name] = {
            "median": round(statistics.median(ts), 3),
            "min": round(min(ts), 3),
            "max": round(max(ts), 3),
            "runs": len(ts),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("precision", "streaming", "all"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part in ("streaming", "all"):
        (RESULTS / "codec_streaming.json").write_text(json.dumps(run_streaming(), indent=1) + "\n")
    if args.part in ("precision", "all"):
        (RESULTS / "codec_precision.json").write_text(json.dumps(run_precision(), indent=1) + "\n")


if __name__ == "__main__":
    main()
