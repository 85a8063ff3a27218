"""Benchmark: the retriever text encoder and the fluency filter on 30 distinct captions.

The pipeline benchmark runs randomly initialised models whose sampled candidates
collapse to one or two distinct texts, so it cannot time these two stages at
their real load. This script times them on 30 distinct 8-14-token captions with
the base preset's BERT-base sized encoders, in fp32 and in bf16 (weights cast,
as the captioner does). Run: PYTHONPATH=. .venv/bin/python bench/text_stages.py
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from streamcap.models.bundle.components import build_components
from streamcap.models.bundle.presets import preset_spec
from streamcap.models.captioner import TEXT_MAX_LENGTH
from streamcap.models.enclap.tokenizer import caption_corpus


def main() -> None:
    torch.set_num_threads(2)
    comp = build_components(preset_spec("base"), seed=0)
    assert comp.retriever is not None and comp.fluency is not None  # the base preset has both
    texts = [t for t in caption_corpus() if 8 <= len(t.split()) <= 14][:30]
    enc = comp.text_tokenizer(texts, padding=True, truncation=True, max_length=TEXT_MAX_LENGTH,
                              return_tensors="pt")
    results: dict[str, dict[str, float]] = {}
    load = os.getloadavg()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.nn.Module.to(comp.retriever.text_encoder, dtype)
        comp.fluency.model.to(dtype)
        text_s, fluency_s = [], []
        ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.no_grad()
        with torch.inference_mode(), ctx:
            for _ in range(5):
                t = time.perf_counter()
                comp.retriever.embed_text(enc["input_ids"], enc["attention_mask"])
                text_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                comp.fluency.error_probs(texts)
                fluency_s.append(time.perf_counter() - t)
        results[name] = {"text_encoder_median_s": round(statistics.median(text_s[1:]), 4),
                         "fluency_median_s": round(statistics.median(fluency_s[1:]), 4)}
    report = {"captions": len(texts), "tokens_per_caption": int(enc["input_ids"].shape[1]),
              "threads": 2, "loadavg_start": list(load), "loadavg_end": list(os.getloadavg()),
              "results": results}
    out = Path("bench/results/text_stages_cpu.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
