"""How fast this machine captions: ``streamcap bench`` and ``bench/multisource.py``.

One measuring module for both. It builds the captioner exactly as the daemon does
(:func:`streamcap.models.captioner.build_captioner`, device and precision chosen by
:mod:`streamcap.models.runtime`), feeds it synthetic windows of ``N`` distinct sources
cut by the daemon's own :class:`~streamcap.audio.windowing.Windower` at the configured
``window_s`` / ``hop_s``, and measures:

* **first window** of each source: the streaming codec has no cache yet and encodes the
  whole window (the warm-up, reported apart);
* **one at a time**: :meth:`Captioner.caption` on steady-state windows (each window's
  codec work is only its new hop), seconds per window and per stage;
* **batched**: :meth:`Captioner.caption_batch` over ``k`` windows of ``k`` distinct
  sources, for each batch size ``k`` of the plan (the first call of each size is a
  warm-up and is not recorded); seconds per batch, per window, and throughput against
  one at a time.

**Sources kept up with.** Every source yields one window per ``hop_s``; in steady
state the inference thread must caption ``n`` windows (one per source) per hop. They
are captioned in batches of ``B`` (the largest batch size measured, at most
``batch_max``), so one hop of ``n`` sources costs
``hop_cost(n) = (n // B) * T(B) + T(n % B)``, where ``T(k)`` is the median measured
seconds of a batch of ``k`` (linear between measured sizes; ``T(1)`` is one at a time
when batch size 1 was not measured; ``T(0) = 0``). ``n`` sources are kept up with when
``hop_cost(m) <= hop_s`` for every ``m <= n``. Steady-state windows carry the streaming
codec's per-hop cost (each source's window encodes only its new hop); a source's first
window (a whole-window encode) is a one-off and left out. A number of sources beyond the
largest batch measured is an extrapolation and is marked so.

**Real-time factor**: seconds of compute per second of audio a stream advances, that is
seconds per window / ``hop_s``; below 1 one stream keeps up.

Measuring is separate from reporting: :class:`Sample` records are turned into a
:class:`BenchReport` (frozen dataclasses) by pure functions, and
:func:`format_text` / :func:`format_markdown` render one; all testable without models.
The measuring time is bounded (:attr:`BenchPlan.seconds`): once spent, no further batch
size or repetition starts (sizes never reached are listed in ``skipped_sizes``); the
first windows of every source and one one-at-a-time window are always measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from streamcap.audio.windowing import Windower
from streamcap.messages import CaptionResult, Window, make_block

if TYPE_CHECKING:
    import torch

    from streamcap.models.captioner import Captioner
    from streamcap.models.decoding.abstain import AbstentionOptions
    from streamcap.models.decoding.options import DecodingOptions

INPUT_RATE_HZ: Final = 48000
BLOCK_S: Final = 0.1
MAX_SOURCES: Final = 100_000
"""Where the kept-up-with search stops (reported as "at least")."""
LOGIT_BIAS_SEED: Final = 1234
LOOPED_NOTE: Final = (
    "this captioner's caption_batch captioned its windows one after another: batched and "
    "one-at-a-time calls did the same work, so their difference is noise (load), not batching")
KEEP_UP_RULE: Final = (
    "n sources are kept up with when one hop's windows (n, one per source, in batches of B) "
    "are captioned within hop_s: (n // B) * T(B) + T(n % B) <= hop_s for every m <= n, "
    "T(k) = median seconds of a batch of k measured on steady-state windows (the streaming "
    "codec encodes only each source's new hop); first windows (whole encodes) left out")


# --------------------------------------------------------------------------- machine facts


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuFacts:
    """The CUDA card the benchmark ran on."""

    name: str
    total_memory_mib: float
    capability: str
    driver: str
    cuda_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineFacts:
    """What decides the speed: CPU model and features, threads, library versions, device."""

    cpu_model: str
    cpu_flags: tuple[str, ...]  # the runtime.CPU_FLAGS this CPU has
    cpu_flags_missing: tuple[str, ...]  # the runtime.CPU_FLAGS it lacks
    cores: int
    torch_threads: int
    torch_version: str
    python_version: str
    platform: str
    device: str
    gpu: GpuFacts | None = None


def cpu_model_name(cpuinfo: str) -> str:
    """The first ``model name`` of /proc/cpuinfo text ('' when absent)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return ""


def _read_cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    return ""


def _nvidia_driver() -> str:
    """The driver version nvidia-smi reports, or '' without one."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20, check=False)
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    return ""


def machine_facts(device: torch.device) -> MachineFacts:
    """Read the facts of this machine (and of ``device`` when it is a CUDA card)."""
    import torch

    from streamcap.models.runtime import available_cores, cpu_features

    cpuinfo = _read_cpuinfo()
    features = cpu_features()
    gpu: GpuFacts | None = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = GpuFacts(name=props.name, total_memory_mib=round(props.total_memory / 2**20, 1),
                       capability=f"{props.major}.{props.minor}", driver=_nvidia_driver(),
                       cuda_version=str(torch.version.cuda))
    return MachineFacts(
        cpu_model=cpu_model_name(cpuinfo) or platform.processor() or platform.machine(),
        cpu_flags=features.found, cpu_flags_missing=features.missing, cores=available_cores(),
        torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        python_version=platform.python_version(), platform=platform.platform(),
        device=str(device), gpu=gpu)


def gpu_peak_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch so far (MiB), or None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)
    return (round(one, 2), round(five, 2), round(fifteen, 2))


# --------------------------------------------------------------------------- input


def synthetic_block(start: int, n: int, rate: int, seed: int) -> np.ndarray:
    """Samples ``[start, start + n)`` of an endless synthetic stream: noise, gated tones and
    a 200 Hz -> 6 kHz chirp every 4 s; float32 in [-1, 1]. The noise of each block comes
    from its own generator seeded by ``(seed, start)``, so any block can be made alone."""
    rng = np.random.default_rng((seed, start))
    t = (start + np.arange(n, dtype=np.float64)) / rate
    x = 0.05 * rng.standard_normal(n)
    for f0, amp in ((220.0, 0.15), (440.0, 0.1), (1250.0, 0.05)):
        gate = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * t / (3.0 + f0 / 500.0)))
        x += amp * gate * np.sin(2 * np.pi * f0 * t)
    period = 4.0
    phase_t = np.mod(t, period)
    k = (6000.0 - 200.0) / period
    x += 0.1 * np.sin(2 * np.pi * (200.0 * phase_t + 0.5 * k * phase_t**2))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


class SyntheticSource:
    """One endless synthetic source fed in 0.1 s blocks at 48 kHz through a Windower."""

    def __init__(self, source_id: str, window_s: float, hop_s: float,
                 rates_hz: tuple[int, ...], *, seed: int) -> None:
        self.source_id = source_id
        self._seed = seed
        self._windower = Windower(source_id, window_s, hop_s, rates_hz)
        self._next_sample = 0
        self._ready: list[Window] = []

    def next_window(self) -> Window:
        """The source's next window (consecutive, so the streaming codec cache applies)."""
        block = int(BLOCK_S * INPUT_RATE_HZ)
        while not self._ready:
            start = self._next_sample
            samples = synthetic_block(start, block, INPUT_RATE_HZ, self._seed)
            self._ready += self._windower.feed(make_block(
                source_id=self.source_id, start_sample=start, sample_rate_hz=INPUT_RATE_HZ,
                samples=samples, captured_at=start / INPUT_RATE_HZ)).windows
            self._next_sample += block
        return self._ready.pop(0)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One measured call.

    Attributes:
        kind: ``"first"`` (first windows of sources: whole encodes), ``"single"``
            (``caption`` on one steady-state window) or ``"batch"`` (``caption_batch``).
        size: windows in the call.
        seconds: wall time of the call.
        stage_seconds: the call's seconds per stage (for a batch, the whole batch's).
        reported_batch_size: the largest ``CaptionResult.batch_size`` among the results
            (1 when ``caption_batch`` captioned its windows one after another).
        skipped: windows the captioner skipped (no result to time).
        load_1min: the 1-minute load average before the call.
    """

    kind: str
    size: int
    seconds: float
    stage_seconds: Mapping[str, float]
    reported_batch_size: int = 1
    skipped: int = 0
    load_1min: float = 0.0


def batch_stage_seconds(results: Sequence[object]) -> tuple[dict[str, float], int, int]:
    """Per-stage seconds of one ``caption_batch`` call, its largest reported batch size and
    the number of skipped windows.

    Each result carries the seconds of the batch it was captioned in (``batch_size``
    windows), so a batch's seconds are counted once: the sum over results of
    ``stage_seconds / batch_size``. A captioner that loops gives ``batch_size`` 1 and
    each window's own seconds, which this sums.
    """
    stages: dict[str, float] = {}
    largest, skipped = 1, 0
    for r in results:
        if not isinstance(r, CaptionResult):
            skipped += 1
            continue
        size = max(1, r.batch_size)
        largest = max(largest, size)
        for name, s in r.stage_seconds.items():
            stages[name] = stages.get(name, 0.0) + s / size
    return stages, largest, skipped


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """Seconds of ``n`` measurements."""

    n: int
    median_s: float
    min_s: float
    max_s: float


def stats(values: Sequence[float]) -> Stats:
    """:class:`Stats` of a non-empty sequence."""
    if not values:
        raise ValueError("stats: no values")
    return Stats(n=len(values), median_s=round(statistics.median(values), 4),
                 min_s=round(min(values), 4), max_s=round(max(values), 4))


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchPoint:
    """Batches of ``size`` windows of distinct sources.

    Attributes:
        batch: seconds per ``caption_batch`` call.
        per_window_s: median seconds per window (``batch.median_s / size``).
        windows_per_s: throughput.
        speedup: throughput over one at a time (None without a one-at-a-time measure).
        native: the captioner reported batches of ``size`` (False: it looped).
        stages: median seconds per stage per call (the whole batch).
        streams_kept_up: ``size`` streams are kept up with by one such batch per hop.
    """

    size: int
    batch: Stats
    per_window_s: float
    windows_per_s: float
    speedup: float | None
    native: bool
    stages: dict[str, float]
    streams_kept_up: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepUp:
    """The largest number of sources kept up with (see the module docstring's rule)."""

    rule: str
    batch_size: int  # B: the batch size used for full batches
    max_sources: int
    at_least: bool  # the search stopped at MAX_SOURCES
    extrapolated: bool  # max_sources is larger than the largest batch measured
    measured_sources: int  # the N sources of the run
    hop_cost_s: float  # hop_cost(N)
    keeps_up: bool  # hop_cost(N) <= hop_s


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchSetup:
    """What was measured and how."""

    model: str
    model_id: str
    random_weights: bool
    logit_bias_std: float
    window_s: float
    hop_s: float
    sources: int
    batch_max: int
    batch_sizes: tuple[int, ...]
    seconds_budget: float
    reps: int
    decoding_mode: str
    n_candidates: int
    max_new_tokens: int
    dtype: str
    precision_requested: str
    precisions: dict[str, str]
    build_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchReport:
    """Everything a benchmark run found; ``complete`` is False while it runs."""

    setup: BenchSetup
    machine: MachineFacts
    first_window: Stats | None  # seconds per window, first windows (whole encodes)
    one_at_a_time: Stats | None  # seconds per steady-state window
    stages: dict[str, float]  # median seconds per stage, one at a time
    real_time_factor: float | None  # one at a time: seconds per window / hop_s
    batches: tuple[BatchPoint, ...]
    best_batched_rtf: float | None  # per-window seconds of the fastest batch size / hop_s
    keep_up: KeepUp | None
    skipped_sizes: tuple[int, ...]
    batching_native: bool | None  # None: no batch of more than one window measured
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float]
    gpu_peak_mib: float | None
    wall_s: float
    complete: bool
    notes: tuple[str, ...] = field(default=())
    samples: tuple[Sample, ...] = field(default=())  # every measured call, in order


def _median_stages(samples: Sequence[Sample]) -> dict[str, float]:
    names = list(dict.fromkeys(k for s in samples for k in s.stage_seconds))
    return {k: round(statistics.median([s.stage_seconds.get(k, 0.0) for s in samples]), 4)
            for k in names}


def interpolate(times: Mapping[int, float], k: int) -> float:
    """``T(k)``: linear between the measured sizes; ``T(0) = 0``; below the smallest size
    the smallest size's time (a smaller batch is not assumed cheaper than measured); above
    the largest, scaled by ``k / largest``."""
    if k <= 0:
        return 0.0
    if not times:
        raise ValueError("interpolate: no measured sizes")
    sizes = sorted(times)
    if k in times:
        return times[k]
    if k < sizes[0]:
        return times[sizes[0]]
    if k > sizes[-1]:
        return times[sizes[-1]] * k / sizes[-1]
    hi = next(s for s in sizes if s > k)
    lo = max(s for s in sizes if s < k)
    return times[lo] + (times[hi] - times[lo]) * (k - lo) / (hi - lo)


def hop_cost(n: int, times: Mapping[int, float], batch: int) -> float:
    """Seconds to caption one window of each of ``n`` sources in batches of ``batch``."""
    full, rest = divmod(n, batch)
    return full * interpolate(times, batch) + interpolate(times, rest)


def keep_up(times: Mapping[int, float], batch_max: int, hop_s: float,
            measured_sources: int) -> KeepUp:
    """The largest number of sources kept up with, from median batch seconds by size.

    Args:
        times: median seconds of a batch of ``k`` windows, by ``k`` (one at a time as 1).
        batch_max: the largest batch the worker forms.
        hop_s: seconds between a source's windows.
        measured_sources: the sources of the run (``hop_cost`` is reported for them).
    """
    usable = {k: v for k, v in times.items() if 1 <= k <= batch_max}
    if not usable:
        raise ValueError("keep_up: no batch size within batch_max was measured")
    batch = max(usable)
    n = 0
    while n < MAX_SOURCES and hop_cost(n + 1, usable, batch) <= hop_s:
        n += 1
    cost = hop_cost(measured_sources, usable, batch)
    return KeepUp(rule=KEEP_UP_RULE, batch_size=batch, max_sources=n, at_least=n >= MAX_SOURCES,
                  extrapolated=n > batch, measured_sources=measured_sources,
                  hop_cost_s=round(cost, 4), keeps_up=cost <= hop_s)


def summarise(samples: Sequence[Sample], *, setup: BenchSetup, machine: MachineFacts,
              loadavg_start: tuple[float, float, float],
              loadavg_end: tuple[float, float, float], gpu_peak: float | None,
              wall_s: float, complete: bool, notes: Sequence[str] = ()) -> BenchReport:
    """Turn measured samples into a report (pure)."""
    first = [s for s in samples if s.kind == "first"]
    single = [s for s in samples if s.kind == "single"]
    one = stats([s.seconds for s in single]) if single else None
    by_size: dict[int, list[Sample]] = {}
    for s in samples:
        if s.kind == "batch":
            by_size.setdefault(s.size, []).append(s)
    one_rate = 1.0 / one.median_s if one is not None and one.median_s > 0 else None
    points: list[BatchPoint] = []
    for size in sorted(by_size):
        group = by_size[size]
        st = stats([s.seconds for s in group])
        per_window = st.median_s / size
        rate = size / st.median_s if st.median_s > 0 else math.inf
        points.append(BatchPoint(
            size=size, batch=st, per_window_s=round(per_window, 4),
            windows_per_s=round(rate, 4),
            speedup=round(rate / one_rate, 3) if one_rate else None,
            native=all(s.reported_batch_size >= size for s in group) if size > 1 else True,
            stages=_median_stages(group), streams_kept_up=st.median_s <= setup.hop_s))
    times = {p.size: p.batch.median_s for p in points}
    if one is not None and 1 not in times:
        times[1] = one.median_s
    multi = [p for p in points if p.size > 1]
    best = min(points, key=lambda p: p.per_window_s, default=None)
    native = all(p.native for p in multi) if multi else None
    if native is False:
        notes = [*notes, LOOPED_NOTE]
    return BenchReport(
        setup=setup, machine=machine,
        first_window=stats([s.seconds / s.size for s in first]) if first else None,
        one_at_a_time=one, stages=_median_stages(single),
        real_time_factor=round(one.median_s / setup.hop_s, 4) if one is not None else None,
        batches=tuple(points),
        best_batched_rtf=round(best.per_window_s / setup.hop_s, 4) if best else None,
        keep_up=(keep_up(times, setup.batch_max, setup.hop_s, setup.sources)
                 if times else None),
        skipped_sizes=tuple(k for k in setup.batch_sizes if k not in by_size),
        batching_native=native,
        loadavg_start=loadavg_start, loadavg_end=loadavg_end, gpu_peak_mib=gpu_peak,
        wall_s=round(wall_s, 1), complete=complete, notes=tuple(notes), samples=tuple(samples))


def report_dict(report: BenchReport) -> dict[str, Any]:
    """The report as JSON-ready data."""
    return dataclasses.asdict(report)


def _flags_line(m: MachineFacts) -> str:
    found = " ".join(m.cpu_flags) or "none"
    missing = " ".join(m.cpu_flags_missing) or "none"
    return f"CPU features: {found} (missing: {missing})"


def _stages_line(stages: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in stages.items())


def _keep_up_line(k: KeepUp, setup: BenchSetup) -> str:
    n = f"{'at least ' if k.at_least else ''}{k.max_sources}"
    how = (f"estimated beyond the largest batch measured ({k.batch_size})" if k.extrapolated
           else f"batches of up to {k.batch_size}")
    return (f"keeps up with {n} source(s) at {setup.window_s:g} s windows every "
            f"{setup.hop_s:g} s ({how}); the {k.measured_sources} measured: one hop takes "
            f"{k.hop_cost_s:.2f} s of {setup.hop_s:g} s, "
            f"{'kept up' if k.keeps_up else 'NOT kept up'}")


def format_text(report: BenchReport) -> str:
    """A readable report for a terminal."""
    s, m = report.setup, report.machine
    lines = [
        (f"model {s.model} ({s.model_id}{', random weights' if s.random_weights else ''}) on "
        f"{m.device}{' (' + m.gpu.name + ')' if m.gpu else ''}, {m.torch_threads} torch "
        f"thread(s), torch {m.torch_version}"),
        f"CPU: {m.cpu_model}, {m.cores} core(s); {_flags_line(m)}",
        f"precision ({s.precision_requested} requested): "
        + ", ".join(f"{k} {v}" for k, v in s.precisions.items()),
        (f"{s.sources} source(s), {s.window_s:g} s windows every {s.hop_s:g} s, batch_max "
        f"{s.batch_max}, {s.decoding_mode} decoding ({s.n_candidates} candidates, "
        f"{s.max_new_tokens} new tokens)"),
        "",
    ]
    if report.first_window is not None:
        lines.append(f"first window of a source (whole encode): "
                     f"{report.first_window.median_s:.3f} s")
    one = report.one_at_a_time
    if one is not None:
        lines += [(f"one at a time: {one.median_s:.3f} s per window (median of {one.n}, min "
                  f"{one.min_s:.3f}); real-time factor {report.real_time_factor:.3f}"),
                  f"  stages: {_stages_line(report.stages)}"]
    if report.batches:
        lines += ["", (f"{'batch':>5} {'calls':>5} {'s/batch':>9} {'s/window':>9} "
                      f"{'windows/s':>10} {'vs one':>7}  batched")]
        for p in report.batches:
            sp = f"{p.speedup:.2f}x" if p.speedup is not None else "-"
            how = "-" if p.size == 1 else "yes" if p.native else "no (looped)"
            lines.append(f"{p.size:>5} {p.batch.n:>5} {p.batch.median_s:>9.3f} "
                         f"{p.per_window_s:>9.3f} {p.windows_per_s:>10.3f} {sp:>7}  {how}")
    if report.skipped_sizes:
        lines.append(f"not measured (time budget spent): batch sizes "
                     f"{', '.join(map(str, report.skipped_sizes))}")
    if report.keep_up is not None:
        lines += ["", _keep_up_line(report.keep_up, s)]
    lines.append(f"load average {report.loadavg_start[0]:.2f} at start, "
                 f"{report.loadavg_end[0]:.2f} at end"
                 + (f"; GPU memory peak {report.gpu_peak_mib:.0f} MiB"
                    if report.gpu_peak_mib is not None else ""))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def format_markdown(report: BenchReport, json_name: str) -> str:
    """A short markdown summary for bench/results/."""
    s, m = report.setup, report.machine
    where = m.gpu.name if m.gpu else f"{m.cpu_model} ({m.cores} cores)"
    lines = [
        f"# Multi-source benchmark: {s.model} on {m.device} ({where})",
        "",
        f"{s.sources} sources, {s.window_s:g} s windows every {s.hop_s:g} s, "
        f"{s.decoding_mode} decoding ({s.n_candidates} candidates, {s.max_new_tokens} new "
        f"tokens){', random weights' if s.random_weights else ''}; torch {m.torch_version}, "
        f"{m.torch_threads} threads. {_flags_line(m)}. Load average (1 min) "
        f"{report.loadavg_start[0]:.2f} at start, {report.loadavg_end[0]:.2f} at end."
        + (f" GPU: {m.gpu.name}, {m.gpu.total_memory_mib:.0f} MiB, driver {m.gpu.driver}, "
           f"CUDA {m.gpu.cuda_version}; peak allocated {report.gpu_peak_mib:.0f} MiB."
           if m.gpu and report.gpu_peak_mib is not None else ""),
        "",
        "Precision: " + ", ".join(f"{k} {v}" for k, v in s.precisions.items()) + ".",
        "",
    ]
    one = report.one_at_a_time
    if one is not None:
        lines += [(f"One at a time: **{one.median_s:.3f} s** per window (median of {one.n}; "
                  f"min {one.min_s:.3f}), real-time factor {report.real_time_factor:.3f}. "
                  f"Stages: {_stages_line(report.stages)}."), ""]
    if report.batches:
        lines += [("| batch | calls | s / batch (median) | s / window | windows / s | vs one at a "
                  "time | batched in the captioner | kept up by one batch per hop |"),
                  "|---|---|---|---|---|---|---|---|"]
        for p in report.batches:
            sp = f"{p.speedup:.2f}x" if p.speedup is not None else "-"
            lines.append(f"| {p.size} | {p.batch.n} | {p.batch.median_s:.3f} | "
                         f"{p.per_window_s:.3f} | {p.windows_per_s:.2f} | {sp} | "
                         f"{'-' if p.size == 1 else 'yes' if p.native else 'no (looped)'} | "
                         f"{'yes' if p.streams_kept_up else 'no'} |")
        lines.append("")
    if report.skipped_sizes:
        lines += [f"Not measured (time budget spent): {', '.join(map(str, report.skipped_sizes))}.",
                  ""]
    if report.keep_up is not None:
        lines += [_keep_up_line(report.keep_up, s) + ".", "", f"Rule: {report.keep_up.rule}.",
                  ""]
    lines += [f"- {n}" for n in report.notes]
    lines += ["", (f"{'Complete' if report.complete else 'INCOMPLETE (cut short)'} run, "
              f"{report.wall_s:.0f} s. Full data: `{json_name}`."), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchPlan:
    """What to measure.

    Attributes:
        sources: distinct synthetic sources.
        window_s, hop_s: the windowing.
        batch_sizes: sizes of ``caption_batch`` calls to measure, each in 1..sources.
        batch_max: the largest batch the worker forms (for the kept-up-with rule).
        seconds: measuring budget: once spent, nothing new starts.
        reps: the most measured calls per batch size.
        singles: one-at-a-time windows measured per repetition (of distinct sources, at
            most ``sources``), so that one at a time is timed over as many load
            conditions as the batches.
        warm_each: before the first measured batch of each size, one unrecorded batch of
            that size (first calls of a shape can be slower: allocator growth, kernel and
            primitive choice); off, the median over ``reps`` absorbs a cold first call.
    """

    sources: int
    window_s: float
    hop_s: float
    batch_sizes: tuple[int, ...]
    batch_max: int
    seconds: float
    reps: int = 3
    warm_each: bool = True
    singles: int = 4

    def __post_init__(self) -> None:
        if self.sources < 1:
            raise ValueError(f"sources must be >= 1, got {self.sources}")
        if self.singles < 1:
            raise ValueError(f"singles must be >= 1, got {self.singles}")
        if self.reps < 1:
            raise ValueError(f"reps must be >= 1, got {self.reps}")
        bad = [k for k in self.batch_sizes if not 1 <= k <= self.sources]
        if bad:
            raise ValueError(f"batch sizes {bad} are outside 1..{self.sources} (the sources)")


def default_batch_sizes(sources: int, batch_max: int) -> tuple[int, ...]:
    """2, 4, 8, ... up to ``min(sources, batch_max)``, and that bound itself."""
    top = min(sources, batch_max)
    sizes = [k for k in (2**i for i in range(1, 32)) if k <= top]
    if top > 1 and top not in sizes:
        sizes.append(top)
    return tuple(sizes)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Measurer:
    """Runs a :class:`BenchPlan` against a captioner and collects :class:`Sample` records."""

    def __init__(self, captioner: Captioner, plan: BenchPlan, *,
                 progress: Callable[[str], None] = lambda _: None, seed: int = 0) -> None:
        self.captioner = captioner
        self.plan = plan
        self.progress = progress
        rates = captioner.sample_rates_hz
        self.sources = [SyntheticSource(f"bench-{i}", plan.window_s, plan.hop_s, rates,
                                        seed=seed + i) for i in range(plan.sources)]
        self.samples: list[Sample] = []
        self._next_single = 0

    def _call(self, kind: str, windows: Sequence[Window]) -> Sample:
        device = self.captioner.device
        load = loadavg()[0]
        _sync(device)
        t0 = time.perf_counter()
        if kind == "single":
            results: Sequence[object] = [self.captioner.caption(windows[0])]
        else:
            results = self.captioner.caption_batch(windows)
        _sync(device)
        seconds = time.perf_counter() - t0
        stages, largest, skipped = batch_stage_seconds(results)
        return Sample(kind=kind, size=len(windows), seconds=seconds, stage_seconds=stages,
                      reported_batch_size=largest, skipped=skipped, load_1min=load)

    def _windows(self, k: int) -> list[Window]:
        return [src.next_window() for src in self.sources[:k]]

    def run(self, on_sample: Callable[[], None] = lambda: None) -> None:
        """Warm up, then measure until the plan is done or its time is spent."""
        plan = self.plan
        chunk = max([*plan.batch_sizes, 1])
        t_start = time.perf_counter()

        def spent() -> bool:
            return time.perf_counter() - t_start > plan.seconds

        # First windows of every source: whole-window encodes, then each source has a cache.
        for lo in range(0, plan.sources, chunk):
            group = [src.next_window() for src in self.sources[lo:lo + chunk]]
            self.progress(f"warm-up: first windows of sources {lo + 1}..{lo + len(group)}")
            self.samples.append(self._call("first", group))
            on_sample()
        self._call("single", self._single_window())  # steady-state shapes, not recorded
        warmed: set[int] = set()
        for rep in range(plan.reps):
            if rep > 0 and spent():
                break
            self.progress(f"one at a time, repetition {rep + 1}")
            for _ in range(min(plan.singles, plan.sources)):
                self.samples.append(self._call("single", self._single_window()))
                on_sample()
            # Largest first: the largest batch decides the sources kept up with, so a spent
            # budget leaves out the small sizes.
            for k in sorted(plan.batch_sizes, reverse=True):
                if spent():
                    break
                if plan.warm_each and k not in warmed:
                    self.progress(f"batch of {k}: warm-up")
                    self._call("batch", self._windows(k))
                    warmed.add(k)
                    if spent():
                        break
                self.progress(f"batch of {k}, repetition {rep + 1}")
                self.samples.append(self._call("batch", self._windows(k)))
                on_sample()

    def _single_window(self) -> list[Window]:
        src = self.sources[self._next_single % len(self.sources)]
        self._next_single += 1
        return [src.next_window()]


# --------------------------------------------------------------------------- models


def _dtype_name(dtype: torch.dtype) -> str:
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def module_precision(module: torch.nn.Module, autocast: torch.dtype | None = None) -> str:
    """The precision a module computes in: its weights' dtype(s), ``int8 (dynamic)`` for
    dynamically quantized linears, and the autocast dtype it runs under."""
    import torch

    kinds = list(dict.fromkeys(_dtype_name(p.dtype) for p in module.parameters()
                               if p.is_floating_point()))
    quantized = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
                    for m in module.modules())
    if quantized:
        kinds.insert(0, f"int8 (dynamic, {quantized} linears)")
    text = " + ".join(kinds) or "none"
    if autocast is not None:
        text += f" under {_dtype_name(autocast)} autocast"
    return text


def component_precisions(captioner: Captioner) -> dict[str, str]:
    """The precision of each component, as the captioner runs it."""
    import torch

    c = captioner.components
    autocast = captioner.dtype if captioner.dtype != torch.float32 else None
    out = {"codec": str(getattr(c.codec, "precision", "?")),
           "captioner (BART)": module_precision(c.captioner)}
    if c.retriever is not None:
        out["retriever audio (CNext)"] = module_precision(c.retriever.audio_encoder, autocast)
        out["text encoder"] = module_precision(c.retriever.text_encoder, autocast)
    if c.seq_embedder is not None:
        out["sequence embedder"] = module_precision(c.seq_embedder.model)
    if c.fluency is not None:
        out["fluency"] = module_precision(c.fluency.model, autocast)
    return out


def add_logit_bias(captioner: Captioner, std: float) -> None:
    """Add a fixed random bias to the decoder's output logits.

    A randomly initialised decoder keeps repeating its previous token, so every candidate
    comes out the same and the text encoder and fluency filter would be timed on one
    caption; the bias makes candidates differ, as a trained model's do.
    """
    import torch

    if std <= 0:
        return
    with torch.no_grad():
        bias: torch.Tensor = captioner.components.captioner.bart.final_logits_bias
        gen = torch.Generator().manual_seed(LOGIT_BIAS_SEED)
        bias.add_((torch.randn(bias.shape, generator=gen) * std).to(bias.device, bias.dtype))


def is_random_preset(spec: str) -> bool:
    """True when ``spec`` names a preset (random weights), not a bundle."""
    from streamcap.models.bundle.components import DEMO_MODEL
    from streamcap.models.bundle.manifest import resolve_model

    return spec != DEMO_MODEL and resolve_model(spec).kind == "preset"


@dataclass(frozen=True, slots=True, kw_only=True)
class BuiltCaptioner:
    """A captioner made as the daemon makes it, and how long that took."""

    captioner: Captioner
    spec: str
    random_weights: bool
    logit_bias_std: float
    precision_requested: str
    build_s: float


def build(spec: str, decoding: DecodingOptions, *, device: str = "auto",
          precision: str = "auto", codec_follows_dtype: bool = False,
          abstention: AbstentionOptions | None = None, threads: int | None = None,
          logit_bias_std: float = 1.0) -> BuiltCaptioner:
    """Build the captioner as the daemon does.

    Args:
        spec: bundle directory, ``"demo"``, a fetched bundle's name or a preset name.
        logit_bias_std: see :func:`add_logit_bias`; applied to presets (random weights) only.

    Raises:
        ModelError: a bad model, device or precision.
    """
    import torch

    from streamcap.models.captioner import build_captioner
    from streamcap.models.runtime import choose_device, choose_plan

    random_weights = is_random_preset(spec)
    dev = choose_device(device)
    plan = choose_plan(precision, dev, codec_precision="model" if codec_follows_dtype else "fp32")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    captioner = build_captioner(spec, decoding, device=dev, dtype=plan.dtype,
                                codec_follows_dtype=codec_follows_dtype, abstention=abstention,
                                int8=plan.int8)
    bias = logit_bias_std if random_weights else 0.0
    add_logit_bias(captioner, bias)
    return BuiltCaptioner(captioner=captioner, spec=spec, random_weights=random_weights,
                          logit_bias_std=bias, precision_requested=precision,
                          build_s=time.perf_counter() - t0)


def _notes(built: BuiltCaptioner) -> list[str]:
    notes = [("timings on a shared machine are noisy: prefer medians and minima, and see the "
             "load averages")]
    if built.random_weights:
        notes.append("random weights: end-of-caption is (almost) never sampled, so every "
                     "candidate runs to max_new_tokens: sampling times are upper bounds; a fixed "
                     f"random logit bias (std {built.logit_bias_std:g}) makes candidates differ "
                     "where it can, but the text encoder and fluency filter only see the "
                     "distinct candidates (with random weights often one: those stages are "
                     "then under-timed or absent)")
    return notes


def run_benchmark(built: BuiltCaptioner, plan: BenchPlan, *,
                  progress: Callable[[str], None] = lambda _: None,
                  on_report: Callable[[BenchReport], None] | None = None,
                  extra_notes: Sequence[str] = ()) -> BenchReport:
    """Measure ``plan`` on ``built``'s captioner; ``on_report`` gets a partial report after
    every measured call (for writing results as they come) and the final one."""
    cap = built.captioner
    decoding = cap.decoding
    setup = BenchSetup(
        model=built.spec, model_id=cap.model_id, random_weights=built.random_weights,
        logit_bias_std=built.logit_bias_std, window_s=plan.window_s, hop_s=plan.hop_s,
        sources=plan.sources, batch_max=plan.batch_max, batch_sizes=plan.batch_sizes,
        seconds_budget=plan.seconds, reps=plan.reps, decoding_mode=decoding.mode,
        n_candidates=decoding.n_candidates, max_new_tokens=decoding.max_new_tokens,
        dtype=_dtype_name(cap.dtype), precision_requested=built.precision_requested,
        precisions=component_precisions(cap), build_s=round(built.build_s, 2))
    machine = machine_facts(cap.device)
    notes = [*_notes(built), *extra_notes]
    load0 = loadavg()
    t0 = time.perf_counter()
    measurer = Measurer(cap, plan, progress=progress)

    def report(complete: bool) -> BenchReport:
        return summarise(measurer.samples, setup=setup, machine=machine, loadavg_start=load0,
                         loadavg_end=loadavg(), gpu_peak=gpu_peak_mib(cap.device),
                         wall_s=time.perf_counter() - t0, complete=complete, notes=notes)

    def partial() -> None:
        if on_report is not None:
            on_report(report(False))

    measurer.run(partial)
    final = report(True)
    if on_report is not None:
        on_report(final)
    return final


# --------------------------------------------------------------------------- CLI


def _positive_int(name: str, top: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a whole number, got {text!r}")
        if not 1 <= value <= top:
            raise argparse.ArgumentTypeError(f"{name}: expected 1..{top}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


MAX_CLI_SOURCES: Final = 1024
DEFAULT_SOURCES: Final = 4
DEFAULT_SECONDS: Final = 60.0


def add_parser(sub: Any) -> None:
    """Add ``streamcap bench`` to the CLI's subparsers."""
    p = sub.add_parser("bench", help="measure captioning speed on this machine: per-stage "
                                     "times, real-time factor, sources kept up with")
    p.add_argument("--model", help="bundle directory, \"demo\", fetched bundle name or preset "
                                   "(default: [model] bundle)")
    p.add_argument("--sources", type=_positive_int("--sources", MAX_CLI_SOURCES),
                   help=f"distinct synthetic sources (default: the config's sources when "
                        f"there are several, else {DEFAULT_SOURCES})")
    p.add_argument("--seconds", type=_positive_float, default=DEFAULT_SECONDS,
                   help="measuring time: no new batch size or repetition starts after it "
                        f"(default {DEFAULT_SECONDS:g}; model build and first windows come "
                        "first)")
    p.add_argument("--config", type=Path, help="config file for [model] and the windowing "
                                               "(default: embedded defaults)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def bench_command(args: argparse.Namespace) -> int:
    """Run ``streamcap bench``; returns the exit code.

    Raises:
        ConfigError: a bad config file or model name (exit 2).
        ModelError: the model cannot be built or run (exit 1).
    """
    from streamcap.config import ModelConfig, SourceConfig, load_config
    from streamcap.errors import ConfigError, ModelError
    from streamcap.logs import configure_logging

    model = ModelConfig()
    source = SourceConfig(name="bench", uri="file:-")
    configured_sources = 0
    if args.config is not None:
        config = load_config(args.config)
        model = config.model
        configured_sources = len(config.sources)
        source = next(iter(config.sources.values()), source)
    spec = args.model or model.bundle
    try:
        random_weights = is_random_preset(spec)  # a bad name fails here, before any build
    except ModelError as exc:
        raise ConfigError([str(exc)]) from None
    sources = args.sources or (configured_sources if configured_sources > 1 else DEFAULT_SOURCES)
    plan = BenchPlan(sources=sources, window_s=source.window_s, hop_s=source.hop_s,
                     batch_sizes=default_batch_sizes(sources, model.batch_max),
                     batch_max=model.batch_max, seconds=args.seconds)

    def progress(text: str) -> None:
        print(f"streamcap bench: {text}", file=sys.stderr, flush=True)

    progress(f"building {spec}{' (random weights)' if random_weights else ''}")
    built = build(spec, model.decoding, device=model.device, precision=model.precision,
                  codec_follows_dtype=model.codec_precision == "model",
                  abstention=model.abstention, threads=model.threads or None)
    # transformers replaced our log handler when it loaded
    configure_logging("auto", "debug" if getattr(args, "debug", False) else "info")
    progress(f"built in {built.build_s:.1f} s; measuring for up to {args.seconds:g} s")
    report = run_benchmark(built, plan, progress=progress)
    if args.json:
        print(json.dumps(report_dict(report), indent=1))
    else:
        print(format_text(report), end="")
    return 0


def iter_sizes(text: str) -> Iterator[int]:
    """The integers of a comma list such as ``"1,8,32"`` (for bench/multisource.py).

    Raises:
        ValueError: an item is not a positive whole number.
    """
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"expected positive whole numbers separated by commas, got {item!r}")
        yield int(item)
