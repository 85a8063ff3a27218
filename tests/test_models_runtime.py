"""Per-component precision: the plan for fake CPU feature sets and devices, reading the features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from streamcap.errors import ModelError
from streamcap.models import runtime as runtime_mod
from streamcap.models.runtime import (
    COMPONENTS,
    CPU_FLAGS,
    INT8_AUTO,
    INT8_EXPLICIT,
    CpuFeatures,
    InferenceRuntime,
    RuntimeOptions,
    choose_plan,
    cpu_features,
    plan_precision,
)

AVX2 = CpuFeatures(flags=frozenset({"avx2", "fma"}), bf16_kernels=True, int8_engine=True)
BF16 = CpuFeatures(flags=frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}),
                   bf16_kernels=True, int8_engine=True)
OLD = CpuFeatures(flags=frozenset(), bf16_kernels=False, int8_engine=True)


def test_auto_on_avx2_without_bf16_is_fp32_everywhere() -> None:
    # int8 quantizes a batch's activations with one scale: auto never picks it
    assert INT8_AUTO == ()
    plan = plan_precision("auto", "cpu", AVX2)
    assert plan.dtype == torch.float32 and plan.int8 == frozenset()
    by = plan.by_component()
    assert list(by) == list(COMPONENTS)
    assert set(by.values()) == {"fp32"}
    assert "avx2" in plan.reason and "no avx512f" in plan.reason and "no native bf16" in plan.reason
    assert "int8 is opt-in" in plan.reason


def test_auto_on_a_bf16_cpu_is_bf16_with_the_codec_in_fp32_unless_asked() -> None:
    plan = plan_precision("auto", "cpu", BF16)
    assert plan.dtype == torch.bfloat16 and not plan.int8
    assert plan.component("codec") == "fp32"
    assert {plan.component(c) for c in COMPONENTS if c != "codec"} == {"bf16"}
    assert "native bf16" in plan.reason
    follows = plan_precision("auto", "cpu", BF16, codec_precision="model")
    assert follows.component("codec") == "bf16" and follows.codec_dtype == torch.bfloat16


def test_the_bf16_flag_without_torch_kernels_is_not_native_bf16() -> None:
    features = CpuFeatures(flags=BF16.flags, bf16_kernels=False)
    assert not features.native_bf16
    assert plan_precision("auto", "cpu", features).dtype == torch.float32


def test_auto_without_avx2_stays_fp32_everywhere() -> None:
    plan = plan_precision("auto", "cpu", OLD)
    assert plan.int8 == frozenset() and set(plan.by_component().values()) == {"fp32"}
    assert "no native bf16: fp32" in plan.reason


@pytest.mark.parametrize(("cuda_bf16", "dtype", "name"),
                         [(True, torch.bfloat16, "bf16"), (False, torch.float16, "fp16")])
def test_auto_on_cuda_ignores_the_cpu(cuda_bf16: bool, dtype: torch.dtype, name: str) -> None:
    plan = plan_precision("auto", "cuda:0", OLD, cuda_bf16=cuda_bf16)
    assert plan.device == "cuda" and plan.dtype == dtype and not plan.int8
    assert plan.by_component()["decoder"] == name and plan.component("codec") == "fp32"


def test_explicit_values() -> None:
    assert plan_precision("int8", "cpu", AVX2).int8 == frozenset(INT8_EXPLICIT)
    slow = plan_precision("int8", "cpu", OLD)
    assert slow.int8 == frozenset(INT8_EXPLICIT) and "may be slower" in slow.reason
    assert not plan_precision("fp32", "cpu", AVX2).int8
    assert plan_precision("bf16", "cpu", BF16).dtype == torch.bfloat16
    assert plan_precision(" INT8 ", "cpu", AVX2).dtype == torch.float32


def test_impossible_values_name_the_option() -> None:
    with pytest.raises(ModelError, match=r"model\.precision = 'int8': int8 runs on the CPU only"):
        plan_precision("int8", "cuda", AVX2, cuda_bf16=True, option="model.precision")
    no_engine = CpuFeatures(flags=AVX2.flags, int8_engine=False)
    assert plan_precision("auto", "cpu", no_engine).int8 == frozenset()
    with pytest.raises(ModelError, match="no int8 engine"):
        plan_precision("int8", "cpu", no_engine)
    with pytest.raises(ModelError, match=r"model\.precision = 'int4': expected one of "
                                         "auto, fp32, bf16, fp16, int8"):
        plan_precision("int4", "cpu", AVX2, option="model.precision")
    with pytest.raises(ModelError, match="fp16': not supported on CPU"):
        plan_precision("fp16", "cpu", AVX2)
    with pytest.raises(ValueError, match="unknown component 'lm'"):
        plan_precision("auto", "cpu", AVX2).component("lm")


def test_cpu_features_keep_the_relevant_flags(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f amx_tile\n\n",
                    encoding="utf-8")
    features = cpu_features(path)
    assert features.flags == frozenset({"avx2", "fma", "avx512f", "amx_tile"})
    assert features.flags <= set(CPU_FLAGS)
    assert features.fast_int8 is features.int8_engine
    assert not features.native_bf16  # no avx512_bf16 / amx_bf16 listed
    assert cpu_features(tmp_path / "absent").flags == frozenset()
    assert "avx2 fma avx512f amx_tile" in features.describe()
    assert features.found == ("avx2", "fma", "avx512f", "amx_tile")
    assert set(features.found) | set(features.missing) == set(CPU_FLAGS)
    assert not set(features.found) & set(features.missing)


def test_choose_plan_logs_one_line_with_every_component(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mod, "cpu_features", lambda: AVX2)
    with capture_logs() as logs:
        plan = choose_plan("auto", torch.device("cpu"))
    [line] = [e for e in logs if e["event"] == "inference precision chosen"]
    assert line["plan"] == plan.summary()
    assert all(f"{c}=" in line["plan"] for c in COMPONENTS)
    assert "int8" not in line["plan"]
    assert "codec=fp32" in line["plan"] and "avx2" in line["why"]


def test_the_runtime_names_the_config_key_of_a_refused_precision(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    with pytest.raises(ModelError, match=r"^model\.precision = 'int8': int8 runs on the CPU only"):
        InferenceRuntime(RuntimeOptions(device="cuda", precision="int8", num_threads=1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"^model\.device = 'cuda': CUDA is not available"):
        InferenceRuntime(RuntimeOptions(device="cuda", precision="auto", num_threads=1))


async def test_the_runtime_holds_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mod, "cpu_features", lambda: AVX2)
    async with InferenceRuntime(RuntimeOptions(device="cpu", precision="int8",
                                               num_threads=1)) as runtime:
        assert runtime.plan.int8 == frozenset(INT8_EXPLICIT)
        assert runtime.dtype == torch.float32 == runtime.plan.dtype
