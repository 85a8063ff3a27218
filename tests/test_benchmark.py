"""Tests for streamcap/benchmark.py and ``streamcap bench``.

The report arithmetic (interpolation, sources kept up with, batch stage seconds,
throughput against one at a time) and rendering are pure and tested on made-up
samples; the measuring loop's scheduling is tested with a recording stand-in captioner;
the command runs for real (the installed console script, tiny preset) and only the
report's structure is checked, never a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from timing import scaled

from streamcap.benchmark import (
    MAX_SOURCES,
    BenchPlan,
    BenchSetup,
    MachineFacts,
    Measurer,
    Sample,
    SyntheticSource,
    batch_stage_seconds,
    cpu_model_name,
    default_batch_sizes,
    format_markdown,
    format_text,
    hop_cost,
    interpolate,
    iter_sizes,
    keep_up,
    report_dict,
    summarise,
)
from streamcap.messages import Caption, CaptionResult, Window
from streamcap.models.runtime import CPU_FLAGS
from streamcap.pipeline import SkippedWindow

ROOT = Path(__file__).resolve().parent.parent
STREAMCAP = Path(sys.executable).parent / "streamcap"
if not STREAMCAP.exists():
    STREAMCAP = ROOT / ".venv" / "bin" / "streamcap"


# --------------------------------------------------------------------------- pure arithmetic


def test_interpolate_between_below_and_above_the_measured_sizes() -> None:
    times = {2: 3.0, 4: 5.0}
    assert interpolate(times, 0) == 0.0
    assert interpolate(times, 2) == 3.0
    assert interpolate(times, 3) == pytest.approx(4.0)
    assert interpolate(times, 1) == 3.0  # not assumed cheaper than the smallest measured
    assert interpolate(times, 8) == pytest.approx(10.0)  # scaled from the largest
    with pytest.raises(ValueError, match="no measured sizes"):
        interpolate({}, 1)


def test_hop_cost_splits_sources_into_batches() -> None:
    times = {1: 2.0, 2: 3.0, 4: 5.0}
    assert hop_cost(4, times, 4) == pytest.approx(5.0)
    assert hop_cost(5, times, 4) == pytest.approx(7.0)  # a batch of 4, then one alone
    assert hop_cost(6, times, 2) == pytest.approx(9.0)  # three batches of 2
    assert hop_cost(0, times, 4) == 0.0


def test_keep_up_finds_the_largest_number_of_sources() -> None:
    times = {1: 2.0, 2: 3.0, 4: 5.0}
    k = keep_up(times, batch_max=4, hop_s=5.0, measured_sources=4)
    assert (k.max_sources, k.batch_size, k.extrapolated, k.at_least) == (4, 4, False, False)
    assert k.keeps_up and k.hop_cost_s == pytest.approx(5.0)
    # batch_max 2: 1 -> 2 s, 2 -> 3 s, 3 -> 3 + 2 s, 4 -> 6 s > 5 s
    k = keep_up(times, batch_max=2, hop_s=5.0, measured_sources=4)
    assert (k.max_sources, k.batch_size, k.extrapolated) == (3, 2, True)
    assert not k.keeps_up and k.hop_cost_s == pytest.approx(6.0)
    assert "hop_s" in k.rule
    # one window alone is too slow: nothing is kept up with
    assert keep_up({1: 7.6}, batch_max=8, hop_s=5.0, measured_sources=1).max_sources == 0


def test_keep_up_stops_at_its_search_bound() -> None:
    k = keep_up({1: 1e-9}, batch_max=1, hop_s=5.0, measured_sources=1)
    assert k.at_least and k.max_sources == MAX_SOURCES


def test_keep_up_needs_a_size_within_batch_max() -> None:
    with pytest.raises(ValueError, match="batch_max"):
        keep_up({8: 1.0}, batch_max=4, hop_s=5.0, measured_sources=8)


def test_default_batch_sizes() -> None:
    assert default_batch_sizes(4, 8) == (2, 4)
    assert default_batch_sizes(6, 8) == (2, 4, 6)
    assert default_batch_sizes(20, 8) == (2, 4, 8)
    assert default_batch_sizes(1, 8) == ()
    assert default_batch_sizes(5, 1) == ()


def test_plan_refuses_sizes_beyond_its_sources() -> None:
    with pytest.raises(ValueError, match=r"batch sizes \[8\]"):
        BenchPlan(sources=4, window_s=10, hop_s=5, batch_sizes=(2, 8), batch_max=8, seconds=1)
    with pytest.raises(ValueError, match="sources"):
        BenchPlan(sources=0, window_s=10, hop_s=5, batch_sizes=(), batch_max=8, seconds=1)


def test_iter_sizes() -> None:
    assert list(iter_sizes("1, 8,32,")) == [1, 8, 32]
    for bad in ("1,x", "0", "-2"):
        with pytest.raises(ValueError, match="positive whole numbers"):
            list(iter_sizes(bad))


def test_cpu_model_from_cpuinfo() -> None:
    text = ("processor\t: 0\nmodel name\t: Example CPU 9000\n"
            "flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile\n")
    assert cpu_model_name(text) == "Example CPU 9000"
    assert cpu_model_name("") == ""


# --------------------------------------------------------------------------- results


def _result(source: str, stages: dict[str, float], batch_size: int = 1) -> CaptionResult:
    caption = Caption(window_id=f"{source}-0", source_id=source, seq=0, start_s=0.0,
                      end_s=10.0, captured_at=0.0, text="a dog barks", score=0.5)
    return CaptionResult(caption=caption, embedding=None, stage_seconds=stages,
                         batch_size=batch_size)


def test_batch_stage_seconds_counts_a_whole_batch_once() -> None:
    # A batching captioner: every result carries the whole batch's seconds.
    batch = [_result(s, {"codec": 0.3, "sampling": 1.2}, batch_size=3) for s in "abc"]
    stages, largest, skipped = batch_stage_seconds(batch)
    assert stages == pytest.approx({"codec": 0.3, "sampling": 1.2})
    assert (largest, skipped) == (3, 0)
    # A looping captioner: each result its own seconds, batch_size 1; a skipped window.
    looped = [_result("a", {"codec": 0.1}), _result("b", {"codec": 0.2}),
              SkippedWindow(window_id="c-0", source_id="c", reason="speech")]
    stages, largest, skipped = batch_stage_seconds(looped)
    assert stages == pytest.approx({"codec": 0.3})
    assert (largest, skipped) == (1, 1)


def _setup(**changes: Any) -> BenchSetup:
    values: dict[str, Any] = {
        "model": "tiny", "model_id": "tiny-x", "random_weights": True, "logit_bias_std": 1.0,
        "window_s": 10.0, "hop_s": 5.0, "sources": 4, "batch_max": 8, "batch_sizes": (2, 4),
        "seconds_budget": 60.0, "reps": 3, "decoding_mode": "sample", "n_candidates": 30,
        "max_new_tokens": 30, "dtype": "fp32", "precision_requested": "auto",
        "precisions": {"codec": "fp32", "captioner (BART)": "fp32"}, "build_s": 1.0}
    values.update(changes)
    return BenchSetup(**values)


MACHINE = MachineFacts(cpu_model="Example CPU", cpu_flags=("avx2", "fma"),
                       cpu_flags_missing=("avx512f",), cores=2, torch_threads=2,
                       torch_version="2.x", python_version="3.11", platform="linux",
                       device="cpu")


def _samples(batched: bool) -> list[Sample]:
    out = [Sample(kind="first", size=4, seconds=12.0, stage_seconds={"codec": 8.0})]
    out += [Sample(kind="single", size=1, seconds=s,
                   stage_seconds={"codec": 0.5, "sampling": s - 0.5}) for s in (2.0, 2.2, 2.4)]
    size4 = 5.0 if batched else 8.8
    out += [Sample(kind="batch", size=4, seconds=size4 + d, stage_seconds={"codec": 1.0},
                   reported_batch_size=4 if batched else 1) for d in (0.0, 0.4)]
    return out


def test_summarise_compares_batches_with_one_at_a_time() -> None:
    report = summarise(_samples(batched=True), setup=_setup(), machine=MACHINE,
                       loadavg_start=(1.0, 1.0, 1.0), loadavg_end=(1.5, 1.0, 1.0),
                       gpu_peak=None, wall_s=30.0, complete=True)
    assert report.first_window is not None and report.first_window.median_s == 3.0
    assert report.one_at_a_time is not None and report.one_at_a_time.median_s == 2.2
    assert report.real_time_factor == pytest.approx(2.2 / 5.0)
    assert report.stages == pytest.approx({"codec": 0.5, "sampling": 1.7})
    (point,) = report.batches
    assert point.size == 4 and point.batch.n == 2 and point.batch.median_s == pytest.approx(5.2)
    assert point.per_window_s == pytest.approx(1.3)
    assert point.speedup == pytest.approx((4 / 5.2) / (1 / 2.2), rel=1e-3)
    assert point.native and report.batching_native is True
    assert not point.streams_kept_up  # 5.2 s > 5 s hop
    assert report.skipped_sizes == (2,)
    assert report.keep_up is not None
    # T(1) = 2.2 (one at a time), T(4) = 5.2: 2 sources -> 3.2 s, 3 -> 4.2 s, 4 -> 5.2 s
    assert report.keep_up.max_sources == 3 and report.keep_up.batch_size == 4
    assert report.best_batched_rtf == pytest.approx(1.3 / 5.0)
    json.dumps(report_dict(report))  # JSON-ready


def test_summarise_tells_a_looping_captioner() -> None:
    report = summarise(_samples(batched=False), setup=_setup(), machine=MACHINE,
                       loadavg_start=(0, 0, 0), loadavg_end=(0, 0, 0), gpu_peak=None,
                       wall_s=1.0, complete=False)
    assert report.batching_native is False
    assert any("one after another" in n for n in report.notes)
    assert [x.kind for x in report.samples] == ["first", "single", "single", "single", "batch",
                                                "batch"]
    assert report.batches[0].speedup is not None and report.batches[0].speedup < 1.1


def test_summarise_without_measurements() -> None:
    report = summarise([], setup=_setup(), machine=MACHINE, loadavg_start=(0, 0, 0),
                       loadavg_end=(0, 0, 0), gpu_peak=None, wall_s=0.0, complete=False)
    assert report.one_at_a_time is None and report.keep_up is None and report.batches == ()
    assert report.batching_native is None and report.skipped_sizes == (2, 4)
    assert "model tiny" in format_text(report)
    assert "INCOMPLETE" in format_markdown(report, "x.json")


def test_renderings_name_what_matters() -> None:
    report = summarise(_samples(batched=True), setup=_setup(), machine=MACHINE,
                       loadavg_start=(1.0, 1.0, 1.0), loadavg_end=(1.5, 1.0, 1.0),
                       gpu_peak=2048.0, wall_s=30.0, complete=True)
    text = format_text(report)
    for needle in ("CPU features: avx2 fma (missing: avx512f)", "precision (auto requested)",
                   "one at a time: 2.200 s per window", "keeps up with 3 source(s)",
                   "not measured (time budget spent): batch sizes 2", "GPU memory peak 2048"):
        assert needle in text, needle
    md = format_markdown(report, "multisource_cpu_tiny.json")
    assert "| 4 | 2 | 5.200 | 1.300 |" in md
    assert "`multisource_cpu_tiny.json`" in md and "Rule:" in md


# --------------------------------------------------------------------------- measuring


def test_synthetic_source_yields_consecutive_reproducible_windows() -> None:
    a = SyntheticSource("s", 2.0, 1.0, (16000,), seed=3)
    b = SyntheticSource("s", 2.0, 1.0, (16000,), seed=3)
    wa = [a.next_window() for _ in range(3)]
    wb = [b.next_window() for _ in range(3)]
    assert [w.seq for w in wa] == [0, 1, 2]
    assert [w.start_s for w in wa] == [0.0, 1.0, 2.0]
    for x, y in zip(wa, wb, strict=True):
        assert np.array_equal(x.samples(16000), y.samples(16000))
    assert np.abs(wa[0].samples(16000)).max() > 0.01


class RecordingCaptioner:
    """Stands in for the captioner to test the measuring loop's scheduling."""

    device = torch.device("cpu")
    sample_rates_hz = (16000,)

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Window]]] = []

    def caption(self, window: Window) -> CaptionResult:
        self.calls.append(("caption", [window]))
        return _result(window.source_id, {"codec": 0.01})

    def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
        self.calls.append(("batch", list(windows)))
        return [_result(w.source_id, {"codec": 0.01}, batch_size=len(windows)) for w in windows]


def _measure(plan: BenchPlan) -> tuple[RecordingCaptioner, Measurer]:
    cap = RecordingCaptioner()
    measurer = Measurer(cap, plan)  # type: ignore[arg-type]
    measurer.run()
    return cap, measurer


def test_measuring_loop_order_and_stream_continuity() -> None:
    plan = BenchPlan(sources=4, window_s=2.0, hop_s=1.0, batch_sizes=(2, 4), batch_max=4,
                     seconds=1e9, reps=2, singles=1)
    cap, measurer = _measure(plan)
    kinds = [(k, len(w)) for k, w in cap.calls]
    assert kinds == [("batch", 4),  # first windows of all sources
                     ("caption", 1),  # steady-state warm-up
                     ("caption", 1), ("batch", 4), ("batch", 4), ("batch", 2), ("batch", 2),
                     ("caption", 1), ("batch", 4), ("batch", 2)]
    seen: dict[str, list[int]] = {}
    for _, windows in cap.calls:
        assert len({w.source_id for w in windows}) == len(windows)  # distinct sources
        for w in windows:
            seen.setdefault(w.source_id, []).append(w.seq)
    for seqs in seen.values():  # each source's windows follow one another
        assert seqs == list(range(len(seqs)))
    recorded = [(s.kind, s.size) for s in measurer.samples]
    assert recorded == [("first", 4), ("single", 1), ("batch", 4), ("batch", 2),
                        ("single", 1), ("batch", 4), ("batch", 2)]
    assert all(s.reported_batch_size == s.size for s in measurer.samples if s.kind == "batch")


def test_measuring_loop_without_budget_measures_the_minimum() -> None:
    plan = BenchPlan(sources=3, window_s=2.0, hop_s=1.0, batch_sizes=(2, 3), batch_max=8,
                     seconds=0.0, reps=3, warm_each=False)  # singles: 4, at most the 3 sources
    cap, measurer = _measure(plan)
    assert [(s.kind, s.size) for s in measurer.samples] == [("first", 3)] + [("single", 1)] * 3
    singles = [w[0].source_id for k, w in cap.calls if k == "caption"]
    assert singles == ["bench-0", "bench-1", "bench-2", "bench-0"]  # warm-up, then one each


# --------------------------------------------------------------------------- the command


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if not STREAMCAP.exists():
        pytest.skip(f"{STREAMCAP} is missing: pip install -e . in the venv")
    done = subprocess.run([str(STREAMCAP), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=ROOT)
    assert "Traceback" not in done.stderr, done.stderr
    return done


TINY_CONFIG = """
[model]
bundle = "tiny"
batch_max = 2

[model.decoding]
n_candidates = 4
max_new_tokens = 6
min_new_tokens = 2

[sources.kitchen]
uri = "file:kitchen.wav"
window_s = 10.0
hop_s = 1.0

[sources.garden]
uri = "file:garden.wav"
"""


def test_bench_command_reports_on_the_tiny_preset(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(TINY_CONFIG, encoding="utf-8")
    done = _cli("bench", "--config", str(config), "--seconds", "1", "--json",
                timeout=scaled(600))
    assert done.returncode == 0, done.stderr
    assert "streamcap bench: building tiny" in done.stderr  # progress on stderr
    report = json.loads(done.stdout)
    setup, machine = report["setup"], report["machine"]
    assert setup["model"] == "tiny" and setup["random_weights"] is True
    # [model] and the first source's windowing; one synthetic source per configured one
    assert (setup["sources"], setup["window_s"], setup["hop_s"]) == (2, 10.0, 1.0)
    assert (setup["batch_sizes"], setup["batch_max"]) == ([2], 2)
    assert (setup["n_candidates"], setup["max_new_tokens"]) == (4, 6)
    assert {"codec", "captioner (BART)", "text encoder", "fluency"} <= set(setup["precisions"])
    assert set(machine["cpu_flags"]) | set(machine["cpu_flags_missing"]) == set(CPU_FLAGS)
    assert machine["device"] == "cpu" and machine["torch_threads"] >= 1
    assert report["first_window"]["median_s"] > 0
    assert report["one_at_a_time"]["median_s"] > 0 and report["real_time_factor"] > 0
    assert report["stages"]["codec"] > 0 and report["stages"]["sampling"] > 0
    # the 1 s budget may or may not leave time for the batch of 2: either way it is accounted
    measured = {b["size"] for b in report["batches"]}
    assert measured | set(report["skipped_sizes"]) == {2}
    assert not measured & set(report["skipped_sizes"])
    for b in report["batches"]:
        assert b["batch"]["median_s"] > 0 and b["windows_per_s"] > 0 and b["speedup"] > 0
    assert report["keep_up"]["max_sources"] >= 0 and report["keep_up"]["hop_cost_s"] > 0
    assert len(report["loadavg_start"]) == 3 and report["complete"] is True


def test_bench_command_prints_a_table_for_the_sources_asked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(TINY_CONFIG, encoding="utf-8")
    done = _cli("bench", "--config", str(config), "--sources", "1", "--seconds", "1",
                timeout=scaled(600))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("model tiny (")
    assert "CPU features: " in out and "precision (auto requested): codec fp32" in out
    assert "1 source(s), 10 s windows every 1 s, batch_max 2" in out
    assert "one at a time: " in out and "keeps up with " in out


def test_bench_command_refuses_an_unknown_model_before_building() -> None:
    done = _cli("bench", "--model", "no-such-model", timeout=scaled(120))
    assert done.returncode == 2
    assert "streamcap: error: --model 'no-such-model': not a preset" in done.stderr
    assert "building" not in done.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (("--sources", "0"), "--sources: expected 1..1024, got 0"),
    (("--seconds", "-1"), "expected a number of seconds > 0"),
])
def test_bench_command_refuses_bad_flags(args: tuple[str, ...], needle: str) -> None:
    done = _cli("bench", *args, timeout=scaled(120))
    assert done.returncode == 2
    assert needle in done.stderr
