"""Agreement of incremental (StreamingCodec) vs whole-window EnCodec encodes, random weights.

EnCodec 24 kHz is causal with an LSTM, so a cached frame computed with a finite left
context can differ from the same frame of a whole-window encode (which starts the LSTM
and the reflect padding at the window start). This measures how much, per left
context. Codebooks are initialised from latent residuals of the test signal (as
EnCodec's k-means init does), so codes are spread over the codebooks.

Usage: PYTHONPATH=. .venv/bin/python bench/encodec_streaming.py [--out bench/results/encodec_streaming.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcap.models.codecs.encodec import EncodecTokenizer, encodec_preset
from streamcap.models.codecs.streaming import StreamingCodec, StreamingOptions


def signal(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    noise = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t)
    tones = 0.3 * np.sin(2 * np.pi * (220 + 80 * np.sin(2 * np.pi * 0.1 * t)) * t)
    return (0.2 * (noise * envelope + tones)).astype(np.float32)


@torch.no_grad()
def init_codebooks(tok: EncodecTokenizer, audio: np.ndarray, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    latents = tok.module.encoder(torch.from_numpy(audio)[None, None])[0].T  # (T, D)
    residual = latents.clone()
    for layer in tok.module.quantizer.layers:
        vq: Any = layer
        embed: torch.Tensor = vq.codebook.embed
        idx = torch.randint(0, residual.shape[0], (embed.shape[0],), generator=gen)
        embed.copy_(residual[idx] + 1e-3 * torch.randn(tuple(embed.shape), generator=gen))
        codes = vq.encode(residual.T[None])
        residual = residual - vq.decode(codes)[0].T


def run(tok: EncodecTokenizer, audio: np.ndarray, options: StreamingOptions, window_s: float,
        hop_s: float) -> dict[str, object]:
    rate = tok.config.sample_rate_hz
    stream = StreamingCodec(tok, options)
    agree: list[np.ndarray] = []
    started = time.perf_counter()
    start = 0.0
    while start + window_s <= len(audio) / rate + 1e-9:
        a, b = round(start * rate), round((start + window_s) * rate)
        got = stream.feed(source_id="s", epoch=0, start_sample=a, audio=audio[a:b]).to_numpy()
        want = tok.encode(audio[a:b])
        agree.append(got == want)
        start += hop_s
    seconds = time.perf_counter() - started
    allw = np.concatenate(agree, axis=1)
    later = np.concatenate(agree[1:], axis=1)
    return {
        "options": {"context_frames_left": options.context_frames_left,
                    "context_frames_right": options.context_frames_right,
                    "exact_edges": options.exact_edges},
        "windows": len(agree),
        "overall": round(float(allw.mean()), 5),
        "first_window_excluded": round(float(later.mean()), 5),
        "codebook0_first_window_excluded": round(float(later[0].mean()), 5),
        "per_codebook_first_window_excluded": [round(float(x), 4) for x in later.mean(axis=1)],
        "frames_encoded": stream.stats.frames_encoded,
        "frames_out": stream.stats.frames_out,
        "seconds": round(seconds, 2),
    }


@torch.no_grad()
def lstm_memory(tok: EncodecTokenizer, audio: np.ndarray, offset_frames: int) -> list[float]:
    """Relative latent error of frame f (counted from a chunk start) vs the same frame in a longer chunk."""
    hop = tok.config.hop_length
    full = tok.module.encoder(torch.from_numpy(audio)[None, None])[0]
    part = tok.module.encoder(torch.from_numpy(audio[offset_frames * hop:])[None, None])[0]
    ref = full[:, offset_frames:offset_frames + part.shape[1]]
    err = (part - ref).norm(dim=0) / ref.norm(dim=0).clamp_min(1e-9)
    return [round(float(e), 6) for e in err[:200:5]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/encodec_streaming.json"))
    parser.add_argument("--preset", default="encodec24k")
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tok = EncodecTokenizer(encodec_preset(args.preset))
    audio = signal(args.seconds, tok.config.sample_rate_hz, 0)
    init_codebooks(tok, audio, 0)
    runs = [run(tok, audio, StreamingOptions(context_frames_left=left, context_frames_right=0,
                                             exact_edges=edges), 10.0, 5.0)
            for left, edges in ((0, True), (10, True), (38, True), (75, True), (150, True),
                                (375, True), (75, False))]
    result = {
        "note": "random weights, codebooks initialised from latent residuals of the signal; "
                "10 s windows every 5 s; whole-window encode is the reference; "
                "right context 0 (the encoder is causal)",
        "preset": args.preset, "torch_threads": 2,
        "lstm_latent_rel_error_every_5_frames_from_chunk_start": lstm_memory(tok, audio, 375),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
