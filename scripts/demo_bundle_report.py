"""Collects the demo bundle's training times and held-out metrics into one JSON file.

Usage: python scripts/demo_bundle_report.py WORK_DIR BUNDLE_DIR OUT_JSON [TOTAL_SECONDS]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main(argv: list[str]) -> int:
    work, bundle, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    total = float(argv[3]) if len(argv) > 3 else None
    evaluation = json.loads((work / "eval-test.json").read_text("utf-8"))
    stages = {}
    for name in ("retriever", "pretrained", "finetuned"):
        path = work / f"{name}.train.json"
        if path.is_file():
            data = json.loads(path.read_text("utf-8"))
            history = data["history"]
            stages[name] = {"seconds": round(history["seconds"], 1),
                            "steps": len(history["step_losses"]),
                            "epochs": len(history["epoch_losses"]),
                            "epoch_losses": [round(x, 4) for x in history["epoch_losses"]],
                            "stopped_early": history["stopped_early"],
                            "examples": data.get("examples")}
    keywords = evaluation.get("keywords", {})
    manifest = json.loads((bundle / "manifest.json").read_text("utf-8"))
    retrieval = evaluation.get("retrieval") or {}
    report = {
        "bundle": str(bundle),
        "bundle_bytes": _size_bytes(bundle),
        "model_id": evaluation["models"][0],
        "codec": "tiny DAC encoder with FIXED RANDOM weights (never trained)",
        "held_out": {"split": evaluation.get("split"), "clips": evaluation["clips"]},
        "decoding": evaluation["decoding"],
        "keyword_recall_per_event": keywords.get("recall"),
        "keyword_false_positive_rate": keywords.get("false_positive_rate"),
        "keyword_mean_recall": keywords.get("mean_recall"),
        "keyword_exact": keywords.get("exact"),
        "retrieval_text_to_audio": retrieval.get("text_to_audio"),
        "retrieval_audio_to_text": retrieval.get("audio_to_text"),
        "retrieval_chance_r1": retrieval.get("chance_r1"),
        "captions": evaluation["captions"],
        "examples": evaluation["examples"][:10],
        "abstention": manifest.get("abstention"),
        "training": stages,
        "pipeline_seconds": total,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
