"""Smoke test of bench/stage_flops.py: a tiny run books FLOPs to the stages (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tiny_run_books_flops_to_each_stage(tmp_path: Path, precision: str) -> None:
    out = tmp_path / "flops.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "stage_flops.py"), "--preset", "tiny",
         "--precision", precision, "--threads", "1", "--windows", "1", "--out", str(out)],
        check=True, cwd=tmp_path, env=env, capture_output=True, timeout=600,
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {row["stage"]: row for row in report["stages"]}
    # every compute stage ran products; int8 Linears are counted from their shapes
    for stage in ("codec", "retriever_audio", "encoder", "sampling"):
        assert rows[stage]["gflop"] > 0, stage
        assert rows[stage]["seconds"] > 0, stage
    assert report["precisions"]["captioner (BART)"].startswith("int8" if precision == "int8" else "fp32")
    assert set(report["peak_gflops"]) == {"fp32_matmul", "int8_dynamic_linear"}
    assert out.with_suffix(".md").read_text(encoding="utf-8").startswith("# Where a window")
