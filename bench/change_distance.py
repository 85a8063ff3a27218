"""How far apart are the demo bundle's window embeddings of one scene, and of different scenes?

Chooses the default ``change_distance`` of change-only publishing (a sink's ``publish =
"change"``): a window whose caption text is unchanged is still published when the
cosine distance between its embedding and the last published one exceeds it.

Streams: for each of the 14 sound types of :mod:`bench.scenes`, ``--streams`` streams of
``--scenes`` consecutive 10 s scenes of that type over one bed at one SNR (a steady
scene: a dog that keeps barking in the same room), plus streams of a bed alone
(a quiet room). Each stream is cut as the caption path cuts it (10 s windows every
5 s) and embedded with the retriever (the joint audio embedding the daemon publishes).

Distances (1 - cosine): consecutive windows of one stream ("same scene"), and
windows of streams of different types ("different scenes"); the fraction of each
above a few thresholds.

Usage::

    PYTHONPATH=. .venv/bin/python bench/change_distance.py [--model demo] [--streams 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WINDOW_S, HOP_S = 10.0, 5.0
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)


def streams(per_type: int, scenes: int) -> list[tuple[str, np.ndarray]]:
    from bench.scenes.beds import BEDS
    from bench.scenes.generate import EvalScene, render
    from bench.scenes.sounds import MAKERS

    rng = np.random.default_rng([21, 0])
    beds = sorted(BEDS)
    out: list[tuple[str, np.ndarray]] = []
    for target in [*sorted(MAKERS), "background"]:
        for i in range(per_type):
            bed = beds[(i + len(out)) % len(beds)]
            bed_db = round(float(rng.uniform(-50, -30)), 2)
            snr = (20.0, 10.0, 5.0)[i % 3]
            parts = [render(EvalScene(
                scene_id=f"{target}-{i}-{k}", kind="background" if target == "background"
                else "event", target=None if target == "background" else target,
                snr_db=snr, bed=bed, bed_db=bed_db, variant="",
                seed=int(rng.integers(0, 2**31)))) for k in range(scenes)]
            out.append((target, np.concatenate(parts)))
    return out


def embed(model: Any, audio: np.ndarray, rate: int, source_id: str) -> np.ndarray:
    from streamcap.audio.windowing import Windower
    from streamcap.messages import make_block

    windower = Windower(source_id, WINDOW_S, HOP_S, (model.sample_rate_hz,))
    block = make_block(source_id=source_id, start_sample=0, sample_rate_hz=rate,
                       samples=np.asarray(audio, np.float32), captured_at=0.0)
    windows = windower.feed(block).windows
    try:
        return np.asarray(model.embed_windows(windows), np.float64)
    finally:
        model.forget(source_id)


def summary(values: list[float]) -> dict[str, Any]:
    x = np.asarray(values)
    return {"n": len(x), **{f"p{p}": round(float(np.percentile(x, p)), 3)
                            for p in (5, 25, 50, 75, 90, 95)},
            "over": {str(t): round(float(np.mean(x > t)), 3) for t in THRESHOLDS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--streams", type=int, default=3, help="streams per sound type")
    parser.add_argument("--scenes", type=int, default=4, help="10 s scenes per stream")
    args = parser.parse_args(argv)

    import torch

    from bench.scenes.generate import SAMPLE_RATE_HZ
    from streamcap.models.captioner import build_captioner
    from streamcap.models.decoding.options import DecodingOptions
    from streamcap.triggers.fastpath import RetrieverTriggerModel

    torch.set_num_threads(1)
    model = RetrieverTriggerModel(build_captioner(args.model, DecodingOptions(),
                                                  device=torch.device("cpu"),
                                                  dtype=torch.float32))
    embedded = [(kind, embed(model, audio, SAMPLE_RATE_HZ, f"s{i}"))
                for i, (kind, audio) in enumerate(streams(args.streams, args.scenes))]
    same: dict[str, list[float]] = {"events": [], "background": []}
    for kind, e in embedded:
        key = "background" if kind == "background" else "events"
        same[key] += [float(1 - e[i] @ e[i + 1]) for i in range(len(e) - 1)]
    different: list[float] = []
    for a, (kind_a, ea) in enumerate(embedded):
        for kind_b, eb in embedded[a + 1:]:
            if kind_a != kind_b:
                different += [float(d) for d in (1 - ea @ eb.T).ravel()]
    report = {"model": model.model_id, "window_s": WINDOW_S, "hop_s": HOP_S,
              "streams": len(embedded),
              "same_scene_consecutive": summary(same["events"]),
              "quiet_room_consecutive": summary(same["background"]),
              "different_scenes": summary(different)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
