"""Tests for streamcap.models.bundle.manifest: save/load round trip, verification, --model resolution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from streamcap.errors import ModelError, WeightsError
from streamcap.models.bundle.manifest import (
    MANIFEST_NAME,
    drop_tied_duplicates,
    load_bundle,
    prepare_state_dict,
    resolve_model,
    save_bundle,
    sha256_file,
    write_abstention,
)
from streamcap.models.decoding.abstain import AbstentionRule

CODEC_CONFIG: dict[str, Any] = {
    "n_codebooks": 4,
    "codebook_size": 256,
    "rates": [2, 4, 5, 8],
    "name": "tiny",
}
ENCLAP_CONFIG: dict[str, Any] = {"d_model": 16, "layers": 2, "dropout": 0.1, "tie": True}
DECODING: dict[str, Any] = {"mode": "sample", "n_candidates": 4, "top_p": 0.95}


def _states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    codec = {
        "encoder.weight": torch.randn(8, 3, generator=gen),
        "codebook": torch.randint(0, 100, (4, 5), generator=gen),
        "scale": torch.randn(6, generator=gen).to(torch.bfloat16),
    }
    shared = torch.randn(10, 4, generator=gen)
    enclap = {
        "model.shared.weight": shared,
        "lm_head.weight": shared,  # tied: the same tensor object
        "transposed": torch.randn(4, 6, generator=gen).t(),  # not contiguous
        "half_view": shared[5:],  # overlaps the shared storage at another offset
    }
    return codec, enclap


def _tokenizer_dir(tmp_path: Path) -> Path:
    tok = tmp_path / "tok_src"
    (tok / "sub").mkdir(parents=True, exist_ok=True)
    (tok / "tokenizer.json").write_text('{"model": "bpe"}', encoding="utf-8")
    (tok / "sub" / "merges.txt").write_text("a b\nc d\n", encoding="utf-8")
    return tok


def _save(tmp_path: Path, name: str = "bundle", **kwargs: Any) -> Path:
    codec, enclap = _states()
    return save_bundle(
        tmp_path / name,
        components={"codec": (CODEC_CONFIG, codec), "enclap": (ENCLAP_CONFIG, enclap)},
        tokenizers={"text": _tokenizer_dir(tmp_path)},
        preset="tiny",
        decoding=DECODING,
        **kwargs,
    )


def _edit_manifest(directory: Path, edit: Any) -> None:
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")


def test_round_trip(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    loaded = load_bundle(directory)
    codec, enclap = _states()
    assert loaded.preset == "tiny"
    assert loaded.model_id.startswith("streamcap-tiny-")
    assert dict(loaded.component_configs) == {"codec": CODEC_CONFIG, "enclap": ENCLAP_CONFIG}
    assert dict(loaded.decoding) == DECODING
    assert loaded.extra_files == ()
    for name, expected in (("codec", codec), ("enclap", enclap)):
        got = loaded.load_weights(name)
        assert sorted(got) == sorted(expected)
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype
            assert torch.equal(got[key], tensor), key
    tok_dir = loaded.tokenizer_dirs["text"]
    assert (tok_dir / "tokenizer.json").read_text(encoding="utf-8") == '{"model": "bpe"}'
    assert (tok_dir / "sub" / "merges.txt").is_file()
    manifest = loaded.manifest
    assert manifest["format"] == "streamcap-bundle" and manifest["format_version"] == 1
    assert set(manifest["files"]) == {
        "weights/codec.safetensors",
        "weights/enclap.safetensors",
        "tokenizers/text/tokenizer.json",
        "tokenizers/text/sub/merges.txt",
    }
    for rel, digest in manifest["files"].items():
        assert sha256_file(directory / rel) == digest


def test_a_bundle_without_an_abstention_rule_never_abstains(tmp_path: Path) -> None:
    loaded = load_bundle(_save(tmp_path))
    assert "abstention" not in loaded.manifest and loaded.abstention is None


def test_the_abstention_rule_round_trips_and_can_be_set_after_training(tmp_path: Path) -> None:
    rule = AbstentionRule(min_confidence=0.31, quiet_texts=("silence",), quiet_margin=0.02,
                          calibration={"split": "val"})
    directory = _save(tmp_path, abstention=rule)
    assert load_bundle(directory).abstention == rule
    later = AbstentionRule(min_confidence=0.2)
    write_abstention(directory, later)
    assert load_bundle(directory).abstention == later  # every hash still verifies
    write_abstention(directory, None)
    assert load_bundle(directory).abstention is None


@pytest.mark.parametrize(
    ("abstention", "match"),
    [
        ({"quiet_margin": 0.1}, "missing key 'min_confidence'"),
        ({"min_confidence": 2}, "min_confidence: expected a number from -1 to 1"),
        ("0.3", "expected an object"),
    ],
)
def test_a_bad_abstention_rule_names_the_manifest_and_the_key(
        tmp_path: Path, abstention: Any, match: str) -> None:
    directory = _save(tmp_path)
    _edit_manifest(directory, lambda m: m.update(abstention=abstention))
    with pytest.raises(WeightsError, match="manifest.json: key 'abstention'") as info:
        load_bundle(directory)
    assert match in str(info.value)


def test_tied_weights_stored_once_and_restored_as_one_tensor(tmp_path: Path) -> None:
    loaded = load_bundle(_save(tmp_path))
    assert loaded.manifest["components"]["enclap"]["aliases"] == {
        "lm_head.weight": "model.shared.weight"
    }
    state = loaded.load_weights("enclap")
    assert state["lm_head.weight"] is state["model.shared.weight"]
    module = torch.nn.Module()
    module.register_parameter("w", torch.nn.Parameter(torch.zeros(10, 4)))
    module.load_state_dict({"w": state["lm_head.weight"]}, strict=True)


def test_drop_tied_duplicates_and_prepare() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    kept, aliases = drop_tied_duplicates({"a": base, "b": base, "c": base[1:], "d": base.clone()})
    assert sorted(kept) == ["a", "c", "d"] and aliases == {"b": "a"}
    prepared = prepare_state_dict({"a": base, "c": base[1:], "t": base.t()})
    ptrs = {t.untyped_storage().data_ptr() for t in prepared.values()}
    assert len(ptrs) == 3 and all(t.is_contiguous() for t in prepared.values())
    with pytest.raises(ModelError, match="'x'"):
        prepare_state_dict({"x": [1, 2]})  # type: ignore[dict-item]


def test_tampered_weight_file_rejected_with_both_hashes(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    path = directory / "weights" / "codec.safetensors"
    expected = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = sha256_file(path)
    with pytest.raises(WeightsError) as info:
        load_bundle(directory)
    message = str(info.value)
    assert "codec.safetensors" in message and expected in message and actual in message
    load_bundle(directory, verify=False)  # no hashing: loads


def test_tampered_tokenizer_file_rejected(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / "tokenizers" / "text" / "sub" / "merges.txt").write_text(
        "evil\n", encoding="utf-8"
    )
    with pytest.raises(WeightsError, match="merges.txt: sha256 mismatch"):
        load_bundle(directory)


def test_missing_file_named(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / "tokenizers" / "text" / "tokenizer.json").unlink()
    for verify in (True, False):
        with pytest.raises(
            WeightsError, match=r"tokenizer\.json: file listed in manifest.json is missing"
        ):
            load_bundle(directory, verify=verify)


def test_extra_file_warns(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / "weights" / "stray.safetensors").write_bytes(b"x")
    with capture_logs() as logs:
        loaded = load_bundle(directory)
    assert loaded.extra_files == ("weights/stray.safetensors",)
    [event] = [e for e in logs if e["log_level"] == "warning"]
    assert event["file"] == "weights/stray.safetensors"
    assert "is not listed" in event["event"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("files"), "missing key 'files'"),
        (lambda m: m.pop("decoding"), "missing key 'decoding'"),
        (lambda m: m.update(format="other"), "key 'format'"),
        (lambda m: m.update(format_version=2), "key 'format_version'"),
        (lambda m: m.update(format_version=True), "key 'format_version'"),
        (lambda m: m.update(model_id=3), "key 'model_id'"),
        (
            lambda m: m["components"]["codec"].pop("weights"),
            "missing key 'components.codec.weights'",
        ),
        (lambda m: m["components"]["codec"].update(config=[1]), "key 'components.codec.config'"),
        (
            lambda m: m["components"]["codec"].update(weights="../x.safetensors"),
            "components.codec.weights",
        ),
        (lambda m: m["files"].pop("weights/codec.safetensors"), "components.codec.weights"),
        (lambda m: m["files"].update({"weights/codec.safetensors": "abc"}), "files.weights/codec"),
        (lambda m: m["tokenizers"]["text"].update(files="x"), "tokenizers.text.files"),
    ],
)
def test_bad_manifest_names_key(tmp_path: Path, edit: Any, match: str) -> None:
    directory = _save(tmp_path)
    _edit_manifest(directory, edit)
    with pytest.raises(WeightsError, match="manifest.json") as info:
        load_bundle(directory)
    assert match in str(info.value)


def test_manifest_missing_or_not_json(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(WeightsError, match="manifest.json: not valid JSON"):
        load_bundle(directory)
    (directory / MANIFEST_NAME).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(WeightsError, match="JSON object"):
        load_bundle(directory)
    (directory / MANIFEST_NAME).unlink()
    with pytest.raises(WeightsError, match="manifest.json is missing"):
        load_bundle(directory)
    with pytest.raises(WeightsError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_overwrite_refused_then_allowed(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    first_id = load_bundle(directory).model_id
    with pytest.raises(ModelError, match="not empty"):
        _save(tmp_path)
    (directory / "keep-me").write_text("x", encoding="utf-8")
    _save(tmp_path, overwrite=True, model_id="custom-id")
    loaded = load_bundle(directory)
    assert loaded.model_id == "custom-id" and first_id != "custom-id"
    assert not (directory / "keep-me").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    empty = tmp_path / "empty"
    empty.mkdir()
    _save(tmp_path, name="empty")  # an existing empty directory is fine


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not JSON-serialisable"):
        save_bundle(
            tmp_path / "b",
            components={"codec": ({"bad": object()}, {"w": torch.zeros(2)})},
            tokenizers={},
            preset=None,
            decoding={},
        )
    with pytest.raises(ModelError, match="is not a directory"):
        save_bundle(
            tmp_path / "c",
            components={},
            tokenizers={"t": tmp_path / "no"},
            preset=None,
            decoding={},
        )
    with pytest.raises(ModelError, match="component name"):
        save_bundle(
            tmp_path / "d", components={"../x": ({}, {})}, tokenizers={}, preset=None, decoding={}
        )
    assert list(tmp_path.iterdir()) == []


def test_torch_pickle_weights(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    pt = directory / "weights" / "old.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "metadata": {"kwargs": {"a": 1}}}, pt)

    def add(m: dict[str, Any]) -> None:
        m["components"]["old"] = {"config": {}, "weights": "weights/old.pt"}
        m["files"]["weights/old.pt"] = sha256_file(pt)

    _edit_manifest(directory, add)
    assert torch.equal(load_bundle(directory).load_weights("old")["w"], torch.ones(3))
    torch.save({"w": "not a tensor"}, pt)
    _edit_manifest(directory, lambda m: m["files"].update({"weights/old.pt": sha256_file(pt)}))
    with pytest.raises(WeightsError, match="old.pt: expected a state dict"):
        load_bundle(directory).load_weights("old")
    with pytest.raises(ModelError, match="no component 'nope'"):
        load_bundle(directory).load_weights("nope")


def test_bad_weight_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    pt = directory / "weights" / "old.pt"
    pt.write_bytes(b"hello, not a weight file\n")

    def add(m: dict[str, Any]) -> None:
        m["components"]["old"] = {"config": {}, "weights": "weights/old.pt"}
        m["files"]["weights/old.pt"] = sha256_file(pt)

    _edit_manifest(directory, add)
    with pytest.raises(WeightsError) as info:
        load_bundle(directory).load_weights("old")
    assert str(info.value).startswith(f"{pt}: not a readable torch checkpoint")


def test_load_sets_offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _save(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    load_bundle(directory)
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"  # an explicit setting is kept


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _save(tmp_path)
    spec = resolve_model(str(directory))
    assert spec.kind == "bundle" and spec.bundle_path == directory and not spec.random_weights
    assert spec.warning is None

    preset = resolve_model("base")
    assert preset.kind == "preset" and preset.preset == "base" and preset.random_weights
    assert preset.warning is not None and "'base' has random weights" in preset.warning

    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="has no manifest.json"):
        resolve_model(str(tmp_path / "tok_src"))
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model(str(directory / MANIFEST_NAME))
    with pytest.raises(ModelError, match=r"not a preset \(tiny, base, large.*path to a bundle directory"):
        resolve_model("hugeee")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./tiny")  # path-like: never a preset

    monkeypatch.chdir(tmp_path)
    assert resolve_model("bundle").kind == "bundle"  # bare name of a bundle directory
    (tmp_path / "tiny").mkdir()
    assert resolve_model("tiny").kind == "preset"  # a plain directory does not shadow a preset


def test_named_bundles_are_found_along_the_search_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamcap.models.bundle import manifest

    user, system = tmp_path / "cache", tmp_path / "system"
    monkeypatch.setenv("XDG_CACHE_HOME", str(user))
    monkeypatch.setattr(manifest, "SYSTEM_BUNDLE_DIR", system)
    monkeypatch.chdir(tmp_path)
    assert manifest.bundle_search_path() == (user / "streamcap" / "bundles", system)
    assert resolve_model("base").kind == "preset"
    for root in (system, user / "streamcap" / "bundles"):  # the user's comes first
        (root / "base").mkdir(parents=True)
        (root / "base" / MANIFEST_NAME).write_text("{}")
        assert resolve_model("base").bundle_path == root / "base"  # shadows the preset
    with pytest.raises(ModelError, match="streamcap models fetch"):
        resolve_model("nothing-here")
    assert manifest.user_bundle_dir({"XDG_CACHE_HOME": "relative", "HOME": "/h"}) == \
        Path("/h/.cache/streamcap/bundles")
