"""Tests for streamcap.models.bundle.weights: the one weights reader and the one key/shape check."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamcap.errors import ModelError, WeightsError
from streamcap.models.bundle.weights import (
    check_state,
    naming_file,
    read_checkpoint,
    read_state_dict,
    state_dict_from,
    state_problems,
)

STATE = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2)}


class _RunsCode:
    """Unpickling this runs ``touch MARKER`` in a shell: code hidden in a weight file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# --------------------------------------------------------------------------- reading


def test_reads_both_formats(tmp_path: Path) -> None:
    st = tmp_path / "w.safetensors"
    save_file(STATE, st)
    _assert_equal(read_state_dict(st), STATE)
    for name, payload in (("bare.pt", STATE), ("nested.ckpt", {"state_dict": STATE, "step": 3})):
        torch.save(payload, tmp_path / name)
        _assert_equal(read_state_dict(tmp_path / name), STATE)
    torch.save({"model": STATE}, tmp_path / "model.pth")
    _assert_equal(read_state_dict(tmp_path / "model.pth", nested=("model",)), STATE)
    raw = read_checkpoint(tmp_path / "nested.ckpt")
    assert isinstance(raw, dict) and raw["step"] == 3


def test_missing_file_is_named(tmp_path: Path) -> None:
    for name in ("absent.safetensors", "absent.pt"):
        with pytest.raises(WeightsError) as info:
            read_checkpoint(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: no such file"
    with pytest.raises(WeightsError, match="a directory, not a weight file"):
        read_checkpoint(tmp_path)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    """Truncated, empty and foreign files of both formats."""
    torch.save(STATE, tmp_path / "full.pt")
    save_file(STATE, tmp_path / "full.safetensors")
    files: dict[str, Path] = {}
    for suffix in (".pt", ".safetensors"):
        data = (tmp_path / f"full{suffix}").read_bytes()
        for kind, content in (("truncated", data[: len(data) // 2]), ("empty", b""),
                              ("text", b"hello, this is not a weight file\n")):
            path = tmp_path / f"{kind}{suffix}"
            path.write_bytes(content)
            files[f"{kind}{suffix}"] = path
    return files


def test_corrupt_and_foreign_files_give_one_line_naming_the_file(tmp_path: Path) -> None:
    for label, path in _bad_files(tmp_path).items():
        with pytest.raises(WeightsError) as info:
            read_checkpoint(path)
        message = str(info.value)
        kind = "safetensors file" if label.endswith(".safetensors") else "torch checkpoint"
        assert message.startswith(f"{path}: not a readable {kind} ("), (label, message)
        assert "\n" not in message, (label, message)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")  # starts like a pickle the unpickler cannot follow
    with pytest.raises(WeightsError) as info:
        read_checkpoint(junk)
    assert str(info.value).startswith(f"{junk}: not a readable torch checkpoint (unpickling stopped")


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_with_code_is_refused_unrun(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if zip_format:
        torch.save({"state_dict": STATE, "extra": _RunsCode(marker)}, path)
    else:  # a plain pickle, as torch.save wrote before its zip format
        path.write_bytes(pickle.dumps({"extra": _RunsCode(marker)}, protocol=2))
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: the pickle holds Python objects other than")
    assert "system" in message  # the function it would have called is named
    assert "weights_only=True" in message and "\n" not in message
    assert not marker.exists()


def test_state_dict_from_names_what_is_wrong() -> None:
    assert state_dict_from({"state_dict": STATE}, "x") == STATE
    assert state_dict_from(STATE, "x", nested=()) == STATE
    with pytest.raises(WeightsError) as info:
        state_dict_from([1, 2], "ckpt.pt")
    assert str(info.value) == ("ckpt.pt: expected a state dict (a mapping of names to tensors "
                               "or one under 'state_dict'), got list")
    with pytest.raises(WeightsError, match=r"^w\.pt: expected a state dict .*not tensors: b, c$"):
        state_dict_from({"a": torch.zeros(1), "b": 1.0, "c": "x"}, "w.pt")


def test_naming_file_prefixes_once(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    with pytest.raises(WeightsError) as info, naming_file(path):
        raise WeightsError("missing keys (1): a")
    assert str(info.value) == f"{path}: missing keys (1): a"
    with pytest.raises(WeightsError) as info, naming_file(path):
        raise WeightsError(f"{path}: no such file")
    assert str(info.value) == f"{path}: no such file"


# --------------------------------------------------------------------------- checking


def test_check_names_missing_unexpected_and_misshaped_keys() -> None:
    expected = {"a.weight": (2, 3), "a.bias": (2,), "b.weight": (4,)}
    got = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(2), "c.weight": torch.zeros(1)}
    with pytest.raises(WeightsError) as info:
        check_state(expected, got, "w.safetensors: does not match the model")
    assert str(info.value) == (
        "w.safetensors: does not match the model: missing keys (1): b.weight; "
        "unexpected keys (1): c.weight; "
        "shape mismatches (1): a.weight: expected (2, 3), got (3, 2)"
    )


def test_check_passes_and_accepts_tensors_or_shapes() -> None:
    check_state(STATE, {k: tuple(v.shape) for k, v in STATE.items()}, "x")
    check_state({k: tuple(v.shape) for k, v in STATE.items()}, STATE, "x")
    assert state_problems(STATE, STATE) == []


def test_check_optional_extra_and_error_type() -> None:
    expected = {"a": (1,), "pos.position_ids": (5,)}
    check_state(expected, {"a": (1,)}, "x", optional=("position_ids",))
    with pytest.raises(WeightsError, match=r"^x: missing keys \(1\): pos\.position_ids$"):
        check_state(expected, {"a": (1,)}, "x")
    with pytest.raises(WeightsError, match=r"^x: lm_head: tied but differs$"):
        check_state(expected, expected, "x", extra=["lm_head: tied but differs"])
    with pytest.raises(ModelError) as info:
        check_state(expected, {}, "codec model", optional=("position_ids",), error=ModelError)
    assert type(info.value) is ModelError


def test_long_lists_are_cut_and_counted() -> None:
    expected = {f"k{i:02d}": (1,) for i in range(20)}
    [missing] = state_problems(expected, {})
    assert missing.startswith("missing keys (20): k00, k01,")
    assert missing.endswith("k07, ... (12 more)")
    [mismatched] = state_problems(expected, {k: (2,) for k in expected})
    assert mismatched.count("expected (1,), got (2,)") == 8 and mismatched.endswith("(12 more)")
