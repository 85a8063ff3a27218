"""Tests for bench/multisource.py and scripts/gpu_bench.sh (its --quick smoke run on CPU).

No timing is checked: the GPU script is run for real in its quick mode (tiny preset, on
the CPU), and the results it writes are checked for their structure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from timing import scaled

from bench.multisource import sizes_for

ROOT = Path(__file__).resolve().parent.parent


def test_sizes_for() -> None:
    assert sizes_for("4") == (4, (2, 4))
    assert sizes_for("6") == (6, (2, 4, 6))
    assert sizes_for("1") == (1, ())
    assert sizes_for("32,1,8") == (32, (1, 8, 32))
    with pytest.raises(ValueError, match="at least one"):
        sizes_for(",")


@pytest.mark.slow
def test_gpu_script_quick_run_writes_both_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": "",
           "GPU_BENCH_SECONDS": str(int(scaled(900)))}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--quick", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=scaled(900) + 60, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    log = (out / "gpu_bench.log").read_text(encoding="utf-8")
    assert "== step 1: multisource" in log and "== step 2: pipeline" in log

    multi = json.loads((out / "multisource_cpu_tiny.json").read_text(encoding="utf-8"))
    assert multi["complete"] is True
    assert multi["setup"]["model"] == "tiny" and multi["setup"]["sources"] == 2
    assert multi["setup"]["batch_sizes"] == [1, 2] and multi["setup"]["batch_max"] == 2
    assert multi["machine"]["device"] == "cpu" and multi["machine"]["gpu"] is None
    assert multi["gpu_peak_mib"] is None
    assert multi["one_at_a_time"]["median_s"] > 0
    assert multi["keep_up"]["rule"]
    sizes = {b["size"] for b in multi["batches"]}
    assert sizes | set(multi["skipped_sizes"]) == {1, 2}
    assert any("command: bench/multisource.py" in n for n in multi["notes"])
    md = (out / "multisource_cpu_tiny.md").read_text(encoding="utf-8")
    assert md.startswith("# Multi-source benchmark: tiny on cpu")

    pipe = json.loads((out / "pipeline_cpu_tiny.json").read_text(encoding="utf-8"))
    assert pipe["complete"] is True and pipe["setup"]["device"] == "cpu"
    assert set(pipe["machine"]["cpu_flags"]) <= set(multi["machine"]["cpu_flags"]) | set(
        multi["machine"]["cpu_flags_missing"])
    assert {"opt-a", "naive-a"} <= set(pipe["pipelines"])
    assert (out / "pipeline_cpu_tiny.md").exists()


def test_gpu_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_bench.sh")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
