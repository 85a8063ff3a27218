"""Tests for streamcap.models.runtime: device and precision policy, the inference thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from streamcap.errors import ModelError
from streamcap.models import runtime as runtime_mod
from streamcap.models.runtime import (
    THREAD_NAME_PREFIX,
    CpuFeatures,
    InferenceRuntime,
    RuntimeOptions,
    choose_device,
    choose_plan,
    cpu_supports_bf16,
    decide_precision,
    parse_cpu_flags,
)

CPUINFO = (
    "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 {extra}\n\nprocessor\t: 1\n"
)


def test_choose_device_cpu_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto") == torch.device("cuda")


def test_choose_device_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="model.device = 'cuda': CUDA is not available"):
        choose_device("cuda", option="model.device")
    with pytest.raises(ModelError, match="expected 'auto', 'cpu', 'cuda'"):
        choose_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ModelError, match="only 1 CUDA device"):
        choose_device("cuda:3")


def test_parse_cpu_flags() -> None:
    flags = parse_cpu_flags(CPUINFO.format(extra="avx512_bf16"))
    assert {"fpu", "avx2", "avx512_bf16"} <= flags
    assert parse_cpu_flags("no flags here") == frozenset()


@pytest.mark.parametrize(
    ("extra", "expected"), [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("", False)]
)
def test_cpu_supports_bf16_reads_flags(tmp_path: Path, extra: str, expected: bool) -> None:
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        pytest.skip("torch built without oneDNN")
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra), encoding="utf-8")
    has_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    torch_ok = has_check is None or bool(has_check())
    assert cpu_supports_bf16(path) is (expected and torch_ok)


@pytest.mark.parametrize(
    ("requested", "device_type", "cuda_bf16", "cpu_bf16", "expected"),
    [
        ("auto", "cuda", True, False, torch.bfloat16),
        ("auto", "cuda", False, False, torch.float16),
        ("auto", "cpu", False, True, torch.bfloat16),
        ("auto", "cpu", False, False, torch.float32),
        ("fp32", "cuda", True, True, torch.float32),
        ("bf16", "cpu", False, False, torch.bfloat16),  # allowed, with a warning
        ("fp16", "cuda", True, False, torch.float16),
        ("FP32", "cpu", False, True, torch.float32),
    ],
)
def test_decide_precision(
    requested: str, device_type: str, cuda_bf16: bool, cpu_bf16: bool, expected: torch.dtype
) -> None:
    got = decide_precision(
        requested, device_type=device_type, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16
    )
    assert got == expected


def test_decide_precision_errors() -> None:
    with pytest.raises(ModelError, match="model.precision = 'fp16': not supported on CPU"):
        decide_precision(
            "fp16", device_type="cpu", cuda_bf16=False, cpu_bf16=True, option="model.precision"
        )
    with pytest.raises(ModelError, match="expected one of auto, fp32, bf16, fp16, int8"):
        decide_precision("int4", device_type="cpu", cuda_bf16=False, cpu_bf16=False)


def test_choose_plan_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mod, "cpu_features",
                        lambda: CpuFeatures(flags=frozenset({"avx2"}), bf16_kernels=True))
    assert choose_plan("auto", torch.device("cpu")).dtype == torch.float32
    monkeypatch.setattr(runtime_mod, "cpu_features", lambda: CpuFeatures(
        flags=frozenset({"avx2", "avx512_bf16"}), bf16_kernels=True))
    assert choose_plan("auto", torch.device("cpu")).dtype == torch.bfloat16


async def test_run_on_one_dedicated_thread_in_inference_mode() -> None:
    loop_thread = threading.get_ident()
    async with InferenceRuntime(
        RuntimeOptions(device="cpu", precision="fp32", num_threads=1)
    ) as rt:
        assert rt.device == torch.device("cpu") and rt.dtype == torch.float32

        def probe(x: torch.Tensor, *, scale: float) -> tuple[int, str, bool, int, torch.Tensor]:
            thread = threading.current_thread()
            return (
                thread.ident or 0,
                thread.name,
                torch.is_inference_mode_enabled(),
                torch.get_num_threads(),
                x * scale,
            )

        results = [await rt.run(probe, torch.ones(2), scale=float(i)) for i in range(3)]
    idents = {r[0] for r in results}
    assert len(idents) == 1 and loop_thread not in idents
    assert all(r[1].startswith("streamcap-infer") and r[2] and r[3] == 1 for r in results)
    assert torch.equal(results[2][4], torch.full((2,), 2.0))
    assert not torch.is_inference_mode_enabled()


async def test_calls_never_overlap_and_keep_order() -> None:
    rt = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32", num_threads=1))
    active = 0
    peak = 0
    order: list[int] = []
    gate = threading.Event()

    def job(i: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if i == 0:
            gate.wait(5.0)  # hold the thread while the others queue up
        order.append(i)
        active -= 1
        return i

    tasks = [asyncio.create_task(rt.run(job, i)) for i in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3, 4]
    assert peak == 1 and order == [0, 1, 2, 3, 4]
    rt.close()


async def test_exceptions_propagate_and_closed_runtime_refuses() -> None:
    rt = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32", num_threads=1))

    def boom() -> None:
        raise ValueError("bad window")

    with pytest.raises(ValueError, match="bad window"):
        await rt.run(boom)
    assert await rt.run(lambda: 5) == 5  # the thread survives a failing call
    await rt.aclose()
    assert rt.closed
    with pytest.raises(ModelError, match="closed"):
        await rt.run(lambda: 1)
    rt.close()  # idempotent


def test_runtime_option_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="num_threads = 0"):
        InferenceRuntime(RuntimeOptions(device="cpu", num_threads=0))
    with pytest.raises(ModelError, match="fp16"):
        InferenceRuntime(RuntimeOptions(device="cpu", precision="fp16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        InferenceRuntime(RuntimeOptions(device="cuda"))


def test_default_threads_use_all_cores() -> None:
    rt = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32"))
    try:
        assert rt.num_threads == runtime_mod.available_cores() >= 1
    finally:
        rt.close()


async def test_a_side_call_runs_while_the_main_thread_is_busy() -> None:
    runtime = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32", num_threads=1))
    held = threading.Event()
    release = threading.Event()

    def busy() -> str:
        held.set()
        release.wait(30.0)
        return threading.current_thread().name

    def side() -> tuple[str, bool, int]:
        return threading.current_thread().name, torch.is_inference_mode_enabled(), \
            torch.get_num_threads()

    try:
        main = asyncio.ensure_future(runtime.run(busy))
        await asyncio.to_thread(held.wait, 30.0)
        name, inference, threads = await asyncio.wait_for(runtime.run_side(side), 30.0)
        assert not main.done()  # the side call finished while the main one still ran
        assert name.startswith(THREAD_NAME_PREFIX + "-side") and inference and threads == 1
        release.set()
        assert (await main).startswith(THREAD_NAME_PREFIX)
    finally:
        release.set()
        await runtime.aclose()
    with pytest.raises(ModelError, match="closed"):
        await runtime.run_side(side)
