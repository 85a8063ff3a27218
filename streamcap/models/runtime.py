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
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, ParamSpec, Self, TypeVar

import torch

from streamcap.errors import ModelError
from streamcap.logs import get_logger

_log = get_logger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

PRECISIONS: Final = ("auto", "fp32", "bf16", "fp16")
_DTYPES: Final = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_BF16_FLAGS: Final = frozenset({"avx512_bf16", "amx_bf16"})
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

    Reads the flags from ``cpuinfo_path``; requires oneDNN (mkldnn) in the torch build
    and, where torch offers the check, its own bf16 support test. Where cpuinfo cannot
    be read (not Linux), falls back to torch's check alone.
    """
    mkldnn_ok = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    torch_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if mkldnn_ok and torch_check is not None:
        mkldnn_ok = bool(torch_check())
    try:
        flags = parse_cpu_flags(cpuinfo_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return mkldnn_ok
    return mkldnn_ok and bool(flags & _CPU_BF16_FLAGS)


def decide_precision(
    requested: str, *, device_type: str, cuda_bf16: bool, cpu_bf16: bool, option: str = "precision"
) -> torch.dtype:
    """Pure precision policy; :func:`choose_precision` feeds it the hardware facts.

    ``auto``: bf16 on CUDA with bf16 support, else fp16 on CUDA; bf16 on a CPU with native
    bf16; else fp32. ``fp16`` on CPU is refused (slow and unsupported by many CPU kernels).

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


def choose_precision(
    requested: str, device: torch.device, *, option: str = "precision"
) -> torch.dtype:
    """Pick the compute dtype for ``device`` (see :func:`decide_precision`) and log it."""
    on_cuda = device.type == "cuda"
    dtype = decide_precision(
        requested,
        device_type=device.type,
        cuda_bf16=on_cuda and torch.cuda.is_bf16_supported(),
        cpu_bf16=device.type == "cpu" and cpu_supports_bf16(),
        option=option,
    )
    _log.info("inference precision chosen", dtype=str(dtype), device=str(device),
              requested=requested)
    return dtype


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
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        num_threads: Torch intra-op threads; None means every core this process may use.
    """

    device: str = "auto"
    precision: str = "auto"
    num_threads: int | None = None


class InferenceRuntime:
    """Owns the inference thread and the chosen device and dtype.

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
        self.device: Final = choose_device(options.device)
        self.dtype: Final = choose_precision(options.precision, self.device)
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
