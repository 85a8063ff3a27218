"""Smoke test of bench/pipeline.py: a tiny run writes a well-formed report (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"codec", "retriever_audio", "encoder", "sampling", "text_encoder", "fluency"}


def test_quick_run_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--quick", "--preset", "tiny",
         "--variants", "a,b", "--threads", "1", "--out", str(out)],
        check=True, cwd=tmp_path, env=env, capture_output=True, timeout=600,
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["setup"]["preset"] == "tiny"
    assert report["setup"]["threads"] == 1
    assert len(report["setup"]["loadavg_start"]) == 3
    assert report["rss_mib"]["peak"] > 0
    pipelines = report["pipelines"]
    assert {"opt-a", "naive-a", "opt-b", "naive-b"} <= set(pipelines)
    assert pipelines["opt-b"]["dtype"] == "bf16"
    assert pipelines["opt-b"]["codec_dtype"] == "fp32"
    for name, p in pipelines.items():
        stages = set(p["steady"]["stages"])
        assert STAGES <= stages, name
        assert ("scoring" in stages) == (p["kind"] == "naive"), name
        total = p["steady"]["total"]
        assert 0 < total["min_s"] <= total["median_s"] <= total["max_s"], name
        phases = [w["phase"] for w in p["windows"]]
        assert phases[0] == "first" and phases[1:] and set(phases[1:]) == {"steady"}, name
        for w in p["windows"]:
            assert len(w["loadavg_before"]) == 3 and len(w["loadavg_after"]) == 3
    # The streaming codec encodes less than it returns once it has a cache.
    codec = pipelines["opt-a"]["streaming_codec"]
    assert codec["whole_encodes"] == 0
    assert codec["frames_encoded"] < codec["frames_out"]
    comparisons = {c["optimised"]: c for c in report["comparisons"]}
    assert comparisons["opt-a"]["naive"] == "naive-a"
    assert comparisons["opt-b"]["naive"] == "naive-b"
    assert isinstance(comparisons["opt-a"]["meets_time_target"], bool)
    assert comparisons["opt-a"]["speedup_median"] > 0
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| opt-a |" in table and "| naive-b |" in table
