"""Device and precision choice, and the threads that run the models.

Torch is never entered on the event loop: every model call goes through
:meth:`InferenceRuntime.run`, which hands it to a dedicated worker thread
(``streamcap-infer``) and runs it under ``torch.inference_mode()``; calls run one at a
time, in the order they were made. Short calls that must not wait behind a caption (the
trigger path's few milliseconds per window) go through :meth:`InferenceRuntime.run_side`
instead: a second thread (``streamcap-infer-side``, one torch thread, started on first
use) that runs beside the first. Both only read the models' weights (inference mode), so
the two may run at once; each lane owns whatever caches its callers keep.

The thread count is applied inside each worker thread, because with OpenMP the limit
is a per-thread setting.

Precision is chosen per component (:class:`PrecisionPlan`, :func:`plan_precision`) from
what the CPU offers (:func:`cpu_features`): native bf16 where the CPU has it, else
float32. Dynamic int8 (:mod:`streamcap.models.quantize`) is opt-in
(``precision = "int8"``): it quantizes each call's activations with one scale for the
whole batch, so a window's numbers can depend on the windows batched with it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, ParamSpec, Self, TypeVar

import torch

from streamcap.errors import ModelError
from streamcap.logs import get_logger

_log = get_logger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

PRECISIONS: Final = ("auto", "fp32", "bf16", "fp16", "int8")
_DTYPES: Final = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "int8": torch.float32}
_NAMES: Final = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_CPU_BF16_FLAGS: Final = frozenset({"avx512_bf16", "amx_bf16"})
CPU_FLAGS: Final = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                    "amx_tile", "amx_bf16", "amx_int8")
"""The /proc/cpuinfo flags that matter to the precision choice (reported by benchmarks)."""
COMPONENTS: Final = ("codec", "audio", "encoder", "decoder", "text_encoder", "fluency")
"""The components a :class:`PrecisionPlan` chooses for: the DAC/EnCodec encoder, the
retriever's CNext audio encoder, the BART encoder, the BART decoder with its LM head,
the retriever's text encoder and the fluency filter."""
INT8_EXPLICIT: Final = ("decoder", "text_encoder", "fluency")
"""Components ``precision = "int8"`` makes int8 (the others stay float32). With it a
window's scores (and, through the decoder, rarely its caption) can depend on the windows
batched with it; ``[model] batch_max = 1`` restores exact independence."""
INT8_AUTO: Final[tuple[str, ...]] = ()
"""Components ``precision = "auto"`` makes int8 on an AVX2 CPU without native bf16: none.
Dynamic int8 quantizes a call's activations with one scale per tensor, so in a batch of
windows each window's rows share a scale with the other windows' rows and its scores
(for the decoder, rarely its caption) depend on what it was batched with; ``auto`` keeps
every component in float32 so that a window's result never does. The text encoder's
captions were identical to fp32 on the demo bundle (``bench/results/cpu_precision.md``);
it and the decoder and fluency filter stay available through ``precision = "int8"``."""
THREAD_NAME_PREFIX: Final = "streamcap-infer"
SIDE_THREADS: Final = 1
"""Torch threads of the side lane (:meth:`InferenceRuntime.run_side`)."""


def choose_device(requested: str = "auto", *, option: str = "device") -> torch.device:
    """Pick the torch device.

    Args:
        requested: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        option: The config key or CLI option named in errors.

    Raises:
        ModelError: CUDA was asked for but is not available, the index is out of
            range, or the value is unknown.
    """
    value = requested.strip().lower()
    if value == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif value == "cpu":
        device = torch.device("cpu")
    elif value == "cuda" or value.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"{option} = {requested!r}: CUDA is not available (no GPU, or a CPU-only torch build); "
                "use 'cpu' or 'auto'"
            )
        try:
            device = torch.device(value)
        except RuntimeError as exc:
            raise ModelError(f"{option} = {requested!r}: not a valid CUDA device: {exc}") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(
                f"{option} = {requested!r}: only {torch.cuda.device_count()} CUDA device(s) are present"
            )
    else:
        raise ModelError(f"{option} = {requested!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    _log.info("inference device chosen", device=str(device), requested=requested)
    return device


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """Return the CPU feature flags listed on the first ``flags`` line of /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_supports_bf16(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> bool:
    """Tell whether this CPU runs bf16 matrix maths natively (AVX512-BF16 or AMX-BF16).

    :attr:`CpuFeatures.native_bf16` of :func:`cpu_features`: the flags from
    ``cpuinfo_path`` (none where it cannot be read) and torch's oneDNN bf16 kernels.
    """
    return cpu_features(cpuinfo_path).native_bf16


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuFeatures:
    """What this CPU and torch build offer for inference.

    Attributes:
        flags: the :data:`CPU_FLAGS` found in /proc/cpuinfo (empty where unreadable).
        machine: ``platform.machine()``, e.g. ``"x86_64"``.
        bf16_kernels: torch's oneDNN bf16 kernels are usable here.
        int8_engine: torch has a quantized engine (fbgemm/x86/qnnpack) for int8 linears.
    """

    flags: frozenset[str] = frozenset()
    machine: str = "x86_64"
    bf16_kernels: bool = False
    int8_engine: bool = True

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix maths in hardware (AVX512-BF16 or AMX-BF16) and torch kernels for it."""
        return self.bf16_kernels and bool(self.flags & _CPU_BF16_FLAGS)

    @property
    def fast_int8(self) -> bool:
        """Dynamic int8 linears run on vector int8 kernels (x86 with AVX2; measured there)."""
        return self.int8_engine and "avx2" in self.flags

    @property
    def found(self) -> tuple[str, ...]:
        """The :data:`CPU_FLAGS` this CPU has, in that order."""
        return tuple(f for f in CPU_FLAGS if f in self.flags)

    @property
    def missing(self) -> tuple[str, ...]:
        """The :data:`CPU_FLAGS` this CPU lacks, in that order."""
        return tuple(f for f in CPU_FLAGS if f not in self.flags)

    def describe(self) -> str:
        """One line for logs: the flags found and the relevant ones missing."""
        found, missing = self.found, self.missing
        parts = [self.machine, " ".join(found) or "none of " + ",".join(CPU_FLAGS)]
        if found and missing:
            parts.append("no " + " ".join(missing))
        return "; ".join(parts)


def cpu_features(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """Read :class:`CpuFeatures` of this machine (flags from ``cpuinfo_path``)."""
    try:
        flags = parse_cpu_flags(cpuinfo_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        flags = frozenset()
    bf16 = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    torch_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if bf16 and torch_check is not None:
        bf16 = bool(torch_check())
    engines = set(torch.backends.quantized.supported_engines)
    return CpuFeatures(flags=flags & frozenset(CPU_FLAGS), machine=platform.machine(),
                       bf16_kernels=bf16, int8_engine=bool(engines & {"x86", "fbgemm", "qnnpack"}))


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecisionPlan:
    """The precision of every component (:data:`COMPONENTS`) and why.

    Attributes:
        requested: the ``precision`` option as given.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: the float compute dtype of every component not int8 (what the
            captioner casts and autocasts to).
        codec_dtype: the codec encoder's dtype.
        int8: components whose linear layers run dynamic int8 (CPU only).
        reason: why, in words (the CPU features found).
    """

    requested: str
    device: str
    dtype: torch.dtype
    codec_dtype: torch.dtype = torch.float32
    int8: frozenset[str] = field(default_factory=frozenset)
    reason: str = ""

    def component(self, name: str) -> str:
        """``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"`` for one of :data:`COMPONENTS`."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; expected one of {', '.join(COMPONENTS)}")
        if name in self.int8:
            return "int8"
        return _NAMES[self.codec_dtype if name == "codec" else self.dtype]

    def by_component(self) -> dict[str, str]:
        """Every component's precision, in :data:`COMPONENTS` order."""
        return {name: self.component(name) for name in COMPONENTS}

    def summary(self) -> str:
        """``codec=fp32 audio=fp32 ...``: one line for logs and reports."""
        return " ".join(f"{k}={v}" for k, v in self.by_component().items())


def plan_precision(requested: str, device: torch.device | str, features: CpuFeatures, *,
                   cuda_bf16: bool = False, codec_precision: str = "fp32",
                   option: str = "precision") -> PrecisionPlan:
    """Pure per-component precision policy (:func:`choose_plan` feeds it the hardware facts).

    ``auto``: on CUDA bf16 (fp16 without bf16 support); on a CPU with native bf16, bf16;
    on a CPU without it, float32 everywhere (:data:`INT8_AUTO` is empty: int8 breaks the
    independence of batched windows). ``int8``: float32 with :data:`INT8_EXPLICIT` in
    int8 (CPU only). ``fp32``/``bf16``/``fp16``: that dtype everywhere (see
    :func:`decide_precision`). The codec encoder stays float32 unless ``codec_precision``
    is ``"model"`` (then it follows the float dtype).

    Args:
        requested: the ``precision`` option.
        device: where the models run.
        features: this CPU's features (ignored on CUDA).
        cuda_bf16: the CUDA device supports bf16.
        codec_precision: ``"fp32"`` or ``"model"``.
        option: the config key named in errors.

    Raises:
        ModelError: unknown value, fp16 or int8 on a device that cannot run it.
    """
    device_type = torch.device(device).type
    value = requested.strip().lower()
    dtype = decide_precision(value, device_type=device_type, cuda_bf16=cuda_bf16,
                             cpu_bf16=features.native_bf16, option=option)
    if value == "int8" and device_type != "cpu":
        raise ModelError(f"{option} = {requested!r}: int8 runs on the CPU only; "
                         "use 'auto', 'bf16' or 'fp16' on a GPU")
    if value == "int8" and not features.int8_engine:
        raise ModelError(f"{option} = {requested!r}: this torch build has no int8 engine; "
                         "use 'auto' or 'fp32'")
    int8: frozenset[str] = frozenset()
    if device_type != "cpu":
        reason = f"{device_type}: " + ("bf16 supported" if cuda_bf16 else "no bf16 support")
    else:
        reason = features.describe()
        if value == "int8":
            int8 = frozenset(INT8_EXPLICIT)
            if not features.fast_int8:
                reason += "; no AVX2 int8 kernels: int8 may be slower than fp32"
        elif value == "auto" and dtype == torch.float32:
            int8 = frozenset(INT8_AUTO) if features.fast_int8 else frozenset()
            reason += "; no native bf16: fp32" + (
                f", int8 for {' '.join(sorted(int8))}" if int8
                else " (int8 is opt-in: precision = 'int8')")
        elif value == "auto":
            reason += "; native bf16"
    codec_dtype = dtype if codec_precision == "model" else torch.float32
    return PrecisionPlan(requested=requested, device=device_type, dtype=dtype,
                         codec_dtype=codec_dtype, int8=int8, reason=reason)


def choose_plan(requested: str, device: torch.device, *, codec_precision: str = "fp32",
                option: str = "precision") -> PrecisionPlan:
    """:func:`plan_precision` for this machine; logs one line with the choice per component."""
    on_cuda = device.type == "cuda"
    plan = plan_precision(requested, device, cpu_features(),
                          cuda_bf16=on_cuda and torch.cuda.is_bf16_supported(),
                          codec_precision=codec_precision, option=option)
    _log.info("inference precision chosen", requested=requested, device=str(device),
              plan=plan.summary(), why=plan.reason)
    return plan


def decide_precision(
    requested: str, *, device_type: str, cuda_bf16: bool, cpu_bf16: bool, option: str = "precision"
) -> torch.dtype:
    """Pure float dtype policy; :func:`plan_precision` builds the per-component plan on it.

    ``auto``: bf16 on CUDA with bf16 support, else fp16 on CUDA; bf16 on a CPU with native
    bf16; else fp32. ``fp16`` on CPU is refused (slow and unsupported by many CPU kernels).
    ``int8`` gives fp32: the float dtype of the components not made int8
    (:func:`plan_precision` decides which are).

    Raises:
        ModelError: Unknown value, or fp16 on CPU; the message names ``option``.
    """
    value = requested.strip().lower()
    if value not in PRECISIONS:
        raise ModelError(f"{option} = {requested!r}: expected one of {', '.join(PRECISIONS)}")
    on_cpu = device_type == "cpu"
    if value == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if cuda_bf16 else torch.float16
        return torch.bfloat16 if on_cpu and cpu_bf16 else torch.float32
    if value == "fp16" and on_cpu:
        raise ModelError(f"{option} = 'fp16': not supported on CPU; use 'fp32', 'bf16' or 'auto'")
    if value == "bf16" and on_cpu and not cpu_bf16:
        _log.warning("this CPU has no native bf16; expect it to be slower than fp32",
                     option=option, value="bf16")
    return _DTYPES[value]


def available_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeOptions:
    """How to run models.

    Attributes:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``.
        num_threads: Torch intra-op threads; None means every core this process may use.
        codec_precision: ``"fp32"`` or ``"model"`` (the codec follows ``precision``).
    """

    device: str = "auto"
    precision: str = "auto"
    num_threads: int | None = None
    codec_precision: str = "fp32"


class InferenceRuntime:
    """Owns the inference thread and the chosen device, dtype and precision plan.

    Use it as ``await runtime.run(fn, *args)``. A cancelled ``run`` does not stop a call
    that has already started (torch cannot be interrupted); the result is dropped.
    """

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        """Choose device and precision and start the worker thread.

        Raises:
            ModelError: A bad device, precision or thread count.
        """
        options = options or RuntimeOptions()
        if options.num_threads is not None and options.num_threads < 1:
            raise ModelError(
                f"num_threads = {options.num_threads}: expected a positive integer or None"
            )
        self.options: Final = options
        # the daemon's only source of these options is its config's [model] table
        self.device: Final = choose_device(options.device, option="model.device")
        self.plan: Final = choose_plan(options.precision, self.device,
                                       codec_precision=options.codec_precision,
                                       option="model.precision")
        self.dtype: Final = self.plan.dtype
        self.num_threads: Final = options.num_threads or available_cores()
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=THREAD_NAME_PREFIX, initializer=self._init_thread
        )
        # threads start on first use: without a side call there is no side thread
        self._side = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{THREAD_NAME_PREFIX}-side",
            initializer=torch.set_num_threads, initargs=(SIDE_THREADS,)
        )
        _log.info("inference runtime started", device=str(self.device), dtype=str(self.dtype),
                  threads=self.num_threads)

    def _init_thread(self) -> None:
        torch.set_num_threads(self.num_threads)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    async def run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn(*args, **kwargs)`` on the inference thread under ``torch.inference_mode()``.

        Exceptions raised by ``fn`` propagate unchanged.

        Raises:
            ModelError: The runtime is closed.
        """
        return await self._submit(self._executor, functools.partial(fn, *args, **kwargs))

    async def run_side(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """:meth:`run` on the side thread: beside the main one, never behind its calls.

        Raises:
            ModelError: The runtime is closed.
        """
        return await self._submit(self._side, functools.partial(fn, *args, **kwargs))

    async def _submit(self, executor: ThreadPoolExecutor, call: Callable[[], _T]) -> _T:
        if self._closed:
            raise ModelError("inference runtime is closed")
        return await asyncio.get_running_loop().run_in_executor(
            executor, _call_in_inference_mode, call)

    def close(self) -> None:
        """Refuse new calls, drop queued ones and wait for the running ones to finish."""
        self._closed = True
        for executor in (self._side, self._executor):
            executor.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _call_in_inference_mode(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    with torch.inference_mode():
        return fn(*args, **kwargs)
