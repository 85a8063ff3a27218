"""Benchmark: CPU precision candidates per component, speed and agreement with float32.

For a CPU without native bf16 (this project's AVX2/FMA machines), each component of the
captioner is run in float32 and in the candidates that exist there:

- **dynamic int8** (:mod:`streamcap.models.quantize`: ``torch.ao`` dynamic quantization
  of the ``nn.Linear`` layers) for CNext's pointwise linears, the BART encoder, the BART
  decoder step with its LM head (driven the way the captioner drives it, by
  :class:`~streamcap.models.decoding.inference.SharedCrossInference`), the retriever's
  text encoder and the fluency filter's BERT;
- **ONNX Runtime** for the DAC encoder, when ``onnxruntime`` (and ``onnx`` for the export)
  can be imported: the bench exports the encoder with ``torch.onnx.export`` and runs it
  in an ``InferenceSession`` with the same thread count. Not a project dependency.

Part 1, **speed**: the ``base`` preset with random weights, one 10 s window (the DAC
encoder gets ``--codec-s`` seconds, about what the streaming cache encodes per 5 s hop);
float32 and candidate calls are interleaved ``--reps`` times, median and min reported,
with each candidate's agreement on these random weights (codes per codebook, cosine of
embeddings / hidden states, next-token agreement of the decoder under teacher forcing).

Part 2, **agreement on trained weights**: the demo bundle captions held-out scenes
(``bench/scenes``: synthesised independently of the training data, as in
``bench/demo_honesty.py``): one event scene per sound type at 20 and at 5 dB SNR, plus
every sixth silence/background scene (34 windows). Decoding is nucleus sampling with
reranking (``mode = "sample"``, set explicitly: the demo bundle's own default is beam
search, which would skip the text encoder and the fluency filter), with the daemon's
default candidates. Each variant (one component int8, all of ``precision = "int8"``'s
components, ONNX Runtime DAC) is compared with float32 window by window with the same
decoding seed (each window draws from its own stream seeded from the seed, its source and
its sequence number, so both draw the same random numbers), and float32 with another
seed gives the noise floor of sampling itself:
identical chosen caption, identical abstention, the share of windows whose caption names
the right sound (or quiet; judged as in ``bench/demo_honesty.py``), cosine of the retriever's audio
embedding, cosine of the text embeddings of float32's candidates, fluency error
probability of those candidates, codec codes per codebook.

Records the CPU flags that matter (avx2, avx512f, avx512_bf16, amx...), torch version,
thread count and load average. Writes ``bench/results/cpu_precision.json`` and ``.md``.

Run (about 10 min on an idle 2-core machine; the parts can be run one at a time):
    PYTHONPATH=. .venv/bin/python bench/cpu_precision.py
    PYTHONPATH=. .venv/bin/python bench/cpu_precision.py --only agreement --threads 1
    PYTHONPATH=. .venv/bin/python bench/cpu_precision.py --quick      # tiny preset, smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.demo_honesty import judge_scene
from bench.scenes.generate import SAMPLE_RATE_HZ, EvalScene, render, scene_list
from streamcap.audio.windowing import Windower
from streamcap.benchmark import machine_facts
from streamcap.messages import Window, make_block
from streamcap.models.bundle.components import build_components
from streamcap.models.bundle.presets import preset_spec
from streamcap.models.captioner import Captioner, build_captioner
from streamcap.models.codecs.dac import CodecTokenizer
from streamcap.models.decoding.inference import SharedCrossInference
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.quantize import quantize_linears
from streamcap.models.runtime import (
    INT8_EXPLICIT,
    cpu_features,
    plan_precision,
)

TEXTS = [
    "a dog barks in the distance", "a car passes by on a wet road", "people talk in a room",
    "birds chirp outside", "a door slams shut", "rain falls on a roof", "a phone rings",
    "water runs from a tap", "an engine idles", "footsteps on a wooden floor",
    "a baby cries", "wind blows through trees", "a man speaks and a woman laughs",
    "music plays softly", "a siren wails", "typing on a keyboard", "a clock ticks",
    "a train horn sounds", "glass breaks", "a cat meows", "thunder rumbles",
    "a crowd cheers", "a vacuum cleaner runs", "dishes clatter in a kitchen",
    "an alarm beeps", "a helicopter flies overhead", "a kettle whistles",
    "someone coughs", "a motorcycle accelerates", "leaves rustle",
]


def _ort() -> Any | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


class OrtEncoder(nn.Module):
    """A codec encoder exported to ONNX and run by ONNX Runtime (bench only)."""

    def __init__(self, encoder: nn.Module, n_samples: int, threads: int, ort: Any) -> None:
        super().__init__()
        path = Path(tempfile.mkdtemp()) / "encoder.onnx"
        example = torch.zeros(1, 1, n_samples)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "b", 2: "n"}, "y": {0: "b", 2: "t"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run(None, {"x": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(y)


def with_ort_codec(codec: CodecTokenizer, n_samples: int, threads: int, ort: Any) -> CodecTokenizer:
    """A copy of ``codec`` whose encoder runs in ONNX Runtime (same quantizer)."""
    other = copy.copy(codec)
    other._encoder_run = OrtEncoder(codec._encoder_run, n_samples, threads, ort)
    return other


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.perf_counter() - t, out


def race(calls: dict[str, Callable[[], Any]], reps: int) -> tuple[dict[str, dict[str, float]],
                                                                  dict[str, Any]]:
    """Interleave the calls ``reps`` times (after one warm-up each): median/min seconds."""
    outs = {name: timed(fn)[1] for name, fn in calls.items()}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            s, _ = timed(fn)
            seconds[name].append(s)
    return ({name: {"median_s": round(statistics.median(v), 4), "min_s": round(min(v), 4)}
             for name, v in seconds.items()}, outs)


def code_agreement(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Fraction of equal codes per codebook; a, b int (K, T)."""
    return [round(float((a[k] == b[k]).float().mean()), 4) for k in range(a.shape[0])]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two (n, d) tensors (flattened beyond the first axis)."""
    a2, b2 = a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()
    return torch.nn.functional.cosine_similarity(a2, b2, dim=-1)


def decode_steps(bart: Any, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced next-token log-probs (steps, b, V) through SharedCrossInference."""
    inference = SharedCrossInference(bart, hidden, None)
    inference.start(tokens.shape[1])
    inference.keep(torch.zeros(tokens.shape[0], dtype=torch.long))  # batch 1 -> one row each
    out = [torch.log_softmax(inference.logits(tokens[:, : i + 1]).float(), dim=-1)
           for i in range(tokens.shape[1])]
    return torch.stack(out)


# --------------------------------------------------------------------------- part 1: speed


def speed(preset: str, reps: int, threads: int, codec_s: float, n_cand: int, n_steps: int,
          ort: Any | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    comps = build_components(preset_spec(preset), seed=0)
    built_s = time.perf_counter() - t0
    retr, bart_model, fluency = comps.retriever, comps.captioner, comps.fluency
    assert retr is not None and fluency is not None
    rng = np.random.default_rng(0)
    rows: dict[str, Any] = {}

    # codec
    codec = comps.codec
    assert isinstance(codec, CodecTokenizer)
    audio = (0.1 * rng.standard_normal(int(codec_s * codec.config.sample_rate_hz))).astype(
        np.float32)
    calls: dict[str, Callable[[], Any]] = {"fp32": lambda: codec.tokens(audio).codes}
    if ort is not None:
        ort_codec = with_ort_codec(codec, audio.size, threads, ort)
        calls["onnxruntime"] = lambda: ort_codec.tokens(audio).codes
    times, outs = race(calls, reps)
    rows["codec"] = {"what": f"DAC encoder + RVQ, {codec_s:g} s of audio", "times": times,
                     "agreement": {k: {"codes_per_codebook": code_agreement(outs["fp32"], v)}
                                   for k, v in outs.items() if k != "fp32"}}
    print(f"codec: {times}", flush=True)

    # CNext and text encoder (one int8 copy of the retriever)
    retr_q = copy.deepcopy(retr)
    quantize_linears(retr_q.audio_encoder)
    quantize_linears(retr_q.text_encoder)
    rate = retr.config.audio.mel.sample_rate
    wave = torch.tensor(0.1 * rng.standard_normal((1, 10 * rate)), dtype=torch.float32)
    times, outs = race({"fp32": lambda: retr.embed_audio(wave),
                        "int8": lambda: retr_q.embed_audio(wave)}, reps)
    rows["audio"] = {"what": "CNext + projection, 10 s at 32 kHz", "times": times,
                     "agreement": {"int8": {
                         "clip_cosine": round(float(cosines(outs["fp32"][0], outs["int8"][0])[0]), 5),
                         "joint_cosine": round(float(cosines(outs["fp32"][1], outs["int8"][1])[0]), 5)}}}
    print(f"audio: {times}", flush=True)
    enc = comps.text_tokenizer(TEXTS[:n_cand], padding=True, return_tensors="pt")
    times, outs = race({"fp32": lambda: retr.embed_text(enc["input_ids"], enc["attention_mask"]),
                        "int8": lambda: retr_q.embed_text(enc["input_ids"],
                                                          enc["attention_mask"])}, reps)
    cos = cosines(outs["fp32"], outs["int8"])
    rows["text_encoder"] = {"what": f"retriever text encoder, {n_cand} captions", "times": times,
                            "agreement": {"int8": {"joint_cosine_min": round(float(cos.min()), 5),
                                                   "joint_cosine_mean": round(float(cos.mean()), 5)}}}
    print(f"text: {times}", flush=True)

    # BART encoder and decoder (one int8 copy of the EnCLAP model)
    model_q = copy.deepcopy(bart_model)
    quantize_linears(model_q.bart.model.encoder)
    holder = nn.Module()
    holder.head = model_q.bart.lm_head
    quantize_linears(model_q.bart.model.decoder)
    quantize_linears(holder)
    model_q.bart.lm_head = holder.head
    k = codec.config.n_codebooks
    codes = torch.tensor(rng.integers(0, codec.config.codebook_size, (1, k, 750)))
    clip = torch.randn(1, retr.config.audio.embed_dim)
    times, outs = race({"fp32": lambda: bart_model.encode(codes, clip),
                        "int8": lambda: model_q.encode(codes, clip)}, reps)
    hidden = outs["fp32"][0]
    cos = cosines(outs["fp32"][0][0], outs["int8"][0][0])
    rows["encoder"] = {"what": "EnCLAP BART encoder, 750 frames", "times": times,
                       "agreement": {"int8": {"hidden_cosine_min": round(float(cos.min()), 5),
                                              "hidden_cosine_mean": round(float(cos.mean()), 5)}}}
    print(f"encoder: {times}", flush=True)
    vocab = bart_model.bart.config.vocab_size
    tokens = torch.cat([torch.full((n_cand, 1), 2), torch.tensor(
        rng.integers(4, vocab, (n_cand, n_steps - 1)))], dim=1)
    times, outs = race({"fp32": lambda: decode_steps(bart_model.bart, hidden, tokens),
                        "int8": lambda: decode_steps(model_q.bart, hidden, tokens)}, reps)
    rows["decoder"] = {"what": f"decoder steps + LM head, {n_cand} rows x {n_steps} steps",
                       "times": times, "agreement": {"int8": decoder_agreement(outs)}}
    print(f"decoder: {times}", flush=True)

    fl_q = copy.deepcopy(fluency)
    quantize_linears(fl_q.model.encoder)
    times, outs = race({"fp32": lambda: fluency.error_probs(TEXTS[:n_cand]),
                        "int8": lambda: fl_q.error_probs(TEXTS[:n_cand])}, reps)
    diff = np.abs(outs["fp32"] - outs["int8"])
    rows["fluency"] = {"what": f"fluency filter, {n_cand} captions", "times": times,
                       "agreement": {"int8": {"error_prob_max_abs_diff": round(float(diff.max()), 5)}}}
    print(f"fluency: {times}", flush=True)
    return {"preset": preset, "build_components_s": round(built_s, 1), "components": rows}


def decoder_agreement(outs: dict[str, torch.Tensor]) -> dict[str, float]:
    a, b = outs["fp32"], outs["int8"]
    top = (a.argmax(-1) == b.argmax(-1)).float().mean()
    return {"next_token_top1_agreement": round(float(top), 4),
            "logprob_max_abs_diff": round(float((a - b).abs().max()), 4),
            "logprob_mean_abs_diff": round(float((a - b).abs().mean()), 5)}


# --------------------------------------------------------------------------- part 2: agreement


def scene_windows(rates: tuple[int, ...]) -> list[tuple[EvalScene, Window]]:
    scenes = scene_list(per_cell=1)
    others = [s for s in scenes if s.kind != "event"]
    chosen = [s for s in scenes if s.kind == "event" and s.snr_db != 10.0] + others[::6]
    out = []
    for scene in chosen:
        audio = np.concatenate([render(scene).astype(np.float32),
                                np.zeros(SAMPLE_RATE_HZ, np.float32)])
        block = make_block(source_id=scene.scene_id, start_sample=0,
                           sample_rate_hz=SAMPLE_RATE_HZ, samples=audio, captured_at=0.0)
        out.append((scene, Windower(scene.scene_id, 10.0, 5.0, rates).feed(
            block).windows[0]))
    return out


def caption_all(cap: Captioner, windows: Sequence[tuple[EvalScene, Window]]
                ) -> list[dict[str, Any]]:
    """Caption each window alone; its random stream comes from the captioner's seed."""
    rows = []
    for scene, window in windows:
        t = time.perf_counter()
        result = cap.caption(window)
        c = result.caption
        rows.append({"text": c.text, "abstained": c.abstained, "score": float(c.score),
                     "candidates": [x.text for x in c.candidates],
                     "embedding": torch.from_numpy(np.array(result.embedding.vector)),
                     "seconds": time.perf_counter() - t,
                     "right": judge_scene(scene, c.text, c.abstained)["right"]})
    return rows


def sampling(seed: int) -> DecodingOptions:
    """Sampling with reranking, whatever the bundle's default mode (explicit wins over it)."""
    return DecodingOptions(mode="sample", seed=seed, explicit=frozenset({"mode", "seed"}))


def agreement(model: str, threads: int, ort: Any | None, quick: bool) -> dict[str, Any]:
    load_start = os.getloadavg()
    decoding = sampling(0)
    ref = build_captioner(model, decoding, device=torch.device("cpu"), dtype=torch.float32)
    assert ref.decoding.mode == "sample", ref.decoding
    windows = scene_windows(ref.sample_rates_hz)
    if quick:
        windows = windows[:4]
    print(f"agreement: {len(windows)} held-out scene windows", flush=True)
    ref_rows = caption_all(ref, windows)
    variants: dict[str, Captioner] = {
        # the noise floor: the same fp32 model with another random stream
        "fp32, another seed": build_captioner(model, sampling(1), device=torch.device("cpu"),
                                              dtype=torch.float32)}
    for name in ("decoder", "text_encoder", "fluency", "encoder", "audio"):
        variants[f"int8:{name}"] = build_captioner(model, decoding, device=torch.device("cpu"),
                                                   dtype=torch.float32, int8=[name])
    variants["int8 (precision = \"int8\")"] = build_captioner(
        model, decoding, device=torch.device("cpu"), dtype=torch.float32, int8=INT8_EXPLICIT)
    codec = ref.components.codec
    if ort is not None and isinstance(codec, CodecTokenizer):
        cap = build_captioner(model, decoding, device=torch.device("cpu"), dtype=torch.float32)
        cap_codec = cap.components.codec
        assert isinstance(cap_codec, CodecTokenizer)
        ort_codec = with_ort_codec(cap_codec, 10 * cap_codec.config.sample_rate_hz, threads, ort)
        cap.components.codec = ort_codec
        from streamcap.models.captioner import streaming_options
        from streamcap.models.codecs.streaming import StreamingCodec
        cap._stream = StreamingCodec(ort_codec, streaming_options(ort_codec))
        variants["onnxruntime:codec"] = cap
    report: dict[str, Any] = {"model": model, "windows": len(windows),
                              "decoding": {"mode": ref.decoding.mode,
                                           "n_candidates": ref.decoding.n_candidates,
                                           "seed": 0, "noise_floor_seed": 1},
                              "fp32_right": round(float(np.mean([r["right"] for r in ref_rows])), 4),
                              "fp32_seconds_per_window": round(statistics.median(
                                  r["seconds"] for r in ref_rows), 4), "variants": {}}
    for name, cap in variants.items():
        rows = caption_all(cap, windows)
        same_text = [a["text"] == b["text"] for a, b in zip(ref_rows, rows, strict=True)]
        same_abst = [a["abstained"] == b["abstained"] for a, b in zip(ref_rows, rows, strict=True)]
        emb = torch.stack([cosines(a["embedding"][None], b["embedding"][None])[0]
                           for a, b in zip(ref_rows, rows, strict=True)])
        text_cos: list[float] = []
        fl_diff: list[float] = []
        flag_same: list[bool] = []
        codes: list[list[float]] = []
        with torch.inference_mode():
            for (_, window), a in zip(windows, ref_rows, strict=True):
                texts = list(dict.fromkeys(a["candidates"]))
                text_cos.append(float(cosines(ref.text_embeddings(texts),
                                              cap.text_embeddings(texts)).min()))
                if ref.components.fluency is not None and cap.components.fluency is not None:
                    p, q = (ref.components.fluency.error_probs(texts),
                            cap.components.fluency.error_probs(texts))
                    fl_diff.append(float(np.abs(p - q).max()))
                    th = ref.components.fluency.options.threshold
                    flag_same.append(bool(np.array_equal(p > th, q > th)))
                rate = codec.config.sample_rate_hz
                codes.append(code_agreement(codec.tokens(window.samples(rate)).codes,
                                            cap.components.codec.tokens(window.samples(rate)).codes))
        report["variants"][name] = {
            "seconds_per_window": round(statistics.median(r["seconds"] for r in rows), 4),
            "same_caption": round(float(np.mean(same_text)), 4),
            "same_abstention": round(float(np.mean(same_abst)), 4),
            "right": round(float(np.mean([r["right"] for r in rows])), 4),
            "audio_embedding_cosine_min": round(float(emb.min()), 5),
            "text_embedding_cosine_min": round(min(text_cos), 5),
            "fluency_error_prob_max_abs_diff": round(max(fl_diff), 5) if fl_diff else None,
            "fluency_flags_same": round(float(np.mean(flag_same)), 4) if flag_same else None,
            "codes_per_codebook_min": [round(min(c[k] for c in codes), 4)
                                       for k in range(len(codes[0]))],
            "codes_per_codebook_mean": [round(float(np.mean([c[k] for c in codes])), 4)
                                        for k in range(len(codes[0]))],
            "differing_captions": [{"scene": sc.scene_id, "fp32": a["text"], "variant": b["text"]}
                                   for (sc, _), a, b in zip(windows, ref_rows, rows, strict=True)
                                   if a["text"] != b["text"]][:8],
        }
        print(f"{name}: same caption {np.mean(same_text):.3f}", flush=True)
    report["load_start"], report["load_end"] = load_start, os.getloadavg()
    return report


# --------------------------------------------------------------------------- report


def machine(threads: int, ort: Any | None) -> dict[str, Any]:
    features = cpu_features()
    model_name = machine_facts(torch.device("cpu")).cpu_model
    plan = plan_precision("auto", "cpu", features)
    return {"cpu": model_name, "machine": platform.machine(), "cores": os.cpu_count(),
            "flags": sorted(features.flags), "native_bf16": features.native_bf16,
            "fast_int8": features.fast_int8, "torch": torch.__version__,
            "onnxruntime": getattr(ort, "__version__", None), "threads": threads,
            "auto_plan": plan.by_component(), "python": platform.python_version()}


def fmt_times(times: dict[str, dict[str, float]]) -> str:
    base = times["fp32"]["median_s"]
    cells = [f"{k} {v['median_s']:.3f} ({v['min_s']:.3f})" + (
        f" **{base / v['median_s']:.2f}x**" if k != "fp32" and v["median_s"] > 0 else "")
        for k, v in times.items()]
    return "; ".join(cells)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# CPU precision: float32 vs int8 / ONNX Runtime per component", "",
             (f"CPU {m['cpu']} ({m['machine']}, {m['cores']} cores), flags found: "
              f"{', '.join(m['flags']) or 'none'}; native bf16: {m['native_bf16']}; torch "
              f"{m['torch']}, onnxruntime {m['onnxruntime'] or 'not installed'}; "
              f"{m['threads']} torch threads. Load average (1 min) at start and end of each "
              "run: " + "; ".join(f"{r['part']} {r['load_start'][0]:.2f} to "
                                  f"{r.get('load_end', r['load_start'])[0]:.2f}"
                                  for r in report.get("runs", []))
              + ": the machine is shared, timings are noisy."), "",
             f"## Speed: `{report.get('speed', {}).get('preset')}` preset, random weights", "",
             ("Seconds per call, median (min) of interleaved runs; speed-up over fp32 (of the "
              "medians) in bold. Load average (1 min) when this part started: "
              f"{report.get('speed', {}).get('load_start', report['load_start'])[0]:.2f}."),
             "", "| component | what | times | agreement with fp32 (random weights) |",
             "|---|---|---|---|"]
    for name, row in report.get("speed", {}).get("components", {}).items():
        agree = "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items())
                          for k, v in row["agreement"].items())
        lines.append(f"| {name} | {row['what']} | {fmt_times(row['times'])} | {agree} |")
    a = report.get("agreement", {"model": None, "windows": 0, "fp32_seconds_per_window": 0.0,
                                 "variants": {}})
    dec = a.get("decoding", {"mode": "beam (the bundle's default)", "n_candidates": "-"})
    lines += ["", (f"## Agreement: `{a['model']}` (trained), {a['windows']} held-out scene "
                   f"windows, decoding mode {dec['mode']} ({dec['n_candidates']} candidates), "
                   "the same seed as fp32 (fp32, another seed: the noise floor)"), "",
              (f"fp32 median {a['fp32_seconds_per_window']:.3f} s per window; fp32 names the "
               f"right sound (or quiet) in {a.get('fp32_right', 0):.3f} of the windows "
               "(`right`, judged as in `bench/demo_honesty.py`)."
               + (f" Load average (1 min) {a['load_start'][0]:.2f} when this part started, "
                  f"{a['load_end'][0]:.2f} when it ended." if "load_start" in a else "")), "",
              ("| variant | s/window | same caption | same abstention | right | audio emb cos min | "
               "text emb cos min | fluency p diff max | fluency flags same | "
               "codes/codebook min |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in a["variants"].items():
        lines.append(f"| {name} | {v['seconds_per_window']:.3f} | {v['same_caption']:.3f} | "
                     f"{v['same_abstention']:.3f} | {v['right']:.3f} | "
                     f"{v['audio_embedding_cosine_min']:.5f} | "
                     f"{v['text_embedding_cosine_min']:.5f} | "
                     f"{v['fluency_error_prob_max_abs_diff']} | {v['fluency_flags_same']} | "
                     f"{', '.join(f'{x:.3f}' for x in v['codes_per_codebook_min'])} |")
    lines += ["", "`precision = \"auto\"` on this CPU: "
              + ", ".join(f"{k} {v}" for k, v in m["auto_plan"].items()) + ".", "",
              "Full data: `cpu_precision.json`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--model", default="demo", help="trained bundle for the agreement part")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--codec-s", type=float, default=5.0)
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime even if installed")
    p.add_argument("--quick", action="store_true", help="tiny preset, few windows")
    p.add_argument("--only", choices=("speed", "agreement"),
                   help="rerun one part, keeping the other from the existing --out JSON")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_precision.json")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.reps, args.candidates, args.steps = "tiny", 1, 4, 4
    torch.set_num_threads(args.threads)
    ort = None if args.no_ort else _ort()
    report: dict[str, Any] = {}
    if args.only and args.out.exists():
        report = json.loads(args.out.read_text(encoding="utf-8"))
    report.setdefault("runs", []).append({"part": args.only or "all",
                                          "load_start": os.getloadavg()})
    if "load_start" not in report:
        report["load_start"] = os.getloadavg()
    report["machine"] = machine(args.threads, ort)
    started = time.perf_counter()
    if args.only in (None, "speed"):
        report["speed"] = speed(args.preset, args.reps, args.threads, args.codec_s,
                                args.candidates, args.steps, ort)
        report["speed"]["load_start"] = os.getloadavg() if args.only else report["load_start"]
    if args.only in (None, "agreement"):
        report["agreement"] = agreement(args.model, args.threads, ort, args.quick)
    report["load_end"] = os.getloadavg()
    report["runs"][-1]["load_end"] = report["load_end"]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md = args.out.with_suffix(".md")
    md.write_text(markdown(report), encoding="utf-8")
    print(f"wrote {args.out} and {md} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
