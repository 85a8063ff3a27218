"""Tests for ``streamcap models ...`` (streamcap.models.commands) and the presets.

The commands run as the real console script; preset details are checked in
process against modules built independently of ``parameter_counts``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from streamcap.errors import ModelError
from streamcap.models.bundle import presets
from streamcap.models.bundle.manifest import resolve_model
from streamcap.models.bundle.presets import (
    FluencyConfig,
    parameter_counts,
    preset_names,
    preset_spec,
)
from streamcap.models.codecs.dac import DacEncoderQuantizer
from streamcap.models.enclap.model import EnclapModel
from streamcap.models.retrieval.cnext import CNext
from streamcap.models.retrieval.retriever import AudioTextRetriever

ROOT = Path(__file__).resolve().parent.parent
STREAMCAP = Path(sys.executable).parent / "streamcap"
if not STREAMCAP.exists():
    STREAMCAP = ROOT / ".venv" / "bin" / "streamcap"


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    if not STREAMCAP.exists():
        pytest.skip(f"{STREAMCAP} is missing: pip install -e . in the venv")
    done = subprocess.run([str(STREAMCAP), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def errors(stderr: str) -> list[str]:
    prefix = "streamcap: error: "
    return [line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix)]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- presets


def test_preset_names_and_unknown_preset() -> None:
    assert preset_names() == ("tiny", "base", "large", "enclap-base", "enclap-large")
    with pytest.raises(ModelError, match=r"unknown preset 'huge' \(presets: tiny, base, large, "
                                         r"enclap-base, enclap-large\)"):
        preset_spec("huge")


def test_model_accepts_exactly_the_listed_presets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from streamcap.cli import main
    from streamcap.models.bundle.components import open_components

    monkeypatch.setitem(presets.PRESETS, "tiny-copy",
                        lambda: replace(preset_spec("tiny"), name="tiny-copy",
                                        description="a preset added by a test"))
    assert main(["models", "presets", "--json"]) == 0
    listed = [row["name"] for row in json.loads(capsys.readouterr().out)["presets"]]
    assert listed == [*preset_names()] and "tiny-copy" in listed
    for name in listed:
        resolved = resolve_model(name)
        assert resolved.kind == "preset" and resolved.preset == name
    assert open_components("tiny-copy").preset == "tiny-copy"
    with pytest.raises(ModelError, match=r"--model 'tiny-kopy': not a preset \(tiny, .*tiny-copy\)"):
        resolve_model("tiny-kopy")


def test_real_presets_have_the_documented_dimensions() -> None:
    for name in ("base", "large"):
        spec = preset_spec(name)
        assert spec.name == name
        assert spec.captioner.n_codebooks == 32
        assert spec.captioner.seq_embed_dim == 768
        assert spec.retriever.audio.embed_dim == 768
        assert spec.codec.n_codebooks >= 32
    assert preset_spec("base").captioner.d_model == 768
    assert preset_spec("large").captioner.d_model == 1024


def test_fluency_config_round_trip_and_unknown_keys() -> None:
    config = FluencyConfig(bert={"hidden_size": 32}, num_classes=6, threshold=0.8)
    assert FluencyConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ModelError, match="fluency config: unknown key"):
        FluencyConfig.from_dict({"bert": {}, "treshold": 0.5})


@pytest.fixture(scope="module")
def presets_json() -> dict[str, dict[str, Any]]:
    """``streamcap models presets --json``, by preset name, with the peak RSS of the run."""
    code = textwrap.dedent("""
        import resource, sys
        from streamcap.cli import main
        code = main(["models", "presets", "--json"])
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"PEAK_RSS_KIB={peak_kib}", file=sys.stderr)
        raise SystemExit(code)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)["presets"]}
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KIB=")]
    rows["_run"] = {"peak_rss_bytes": int(peak[0].split("=")[1]) * 1024}
    return rows


def test_presets_json_lists_every_preset_with_counts(presets_json: dict[str, Any]) -> None:
    assert set(presets_json) - {"_run"} == set(preset_names())
    for name in preset_names():
        row = presets_json[name]
        spec = preset_spec(name)
        assert row["description"] == spec.description
        assert row["codebooks"] == spec.captioner.n_codebooks
        assert row["seq_embed_dim"] == spec.captioner.seq_embed_dim
        assert row["max_window_s"] == pytest.approx(
            spec.captioner.max_frames / spec.codec.frame_rate_hz, abs=0.01)
        p = row["parameters"]
        assert set(p) == {"codec", "captioner", "retriever", "retriever_audio_encoder",
                          "fluency", "seq_embedder", "total"}
        assert p["total"] == (p["codec"] + p["captioner"] + p["retriever"] + p["fluency"]
                              + p["seq_embedder"])
        if name.startswith("enclap-"):  # the published models: 1,021 frames, CLAP, no retriever
            assert row["max_window_s"] == pytest.approx(13.61, abs=0.01)
            assert p["retriever"] == p["fluency"] == 0 and p["seq_embedder"] > 0
        else:
            assert row["max_window_s"] >= 30.0  # windows up to 30 s fit every own preset
            assert 0 < p["retriever_audio_encoder"] < p["retriever"]


def test_enclap_presets_have_the_reference_sizes(presets_json: dict[str, Any]) -> None:
    base = presets_json["enclap-base"]
    large = presets_json["enclap-large"]
    assert base["codebooks"] == large["codebooks"] == 16
    assert base["seq_embed_dim"] == large["seq_embed_dim"] == 512
    assert round(base["parameters"]["captioner"] / 1e6, 1) == 165.8
    assert round(large["parameters"]["captioner"] / 1e6, 1) == 441.4


def test_tiny_counts_match_the_built_modules(presets_json: dict[str, Any]) -> None:
    spec = preset_spec("tiny")
    torch.manual_seed(0)
    codec = n_params(DacEncoderQuantizer(spec.codec))
    captioner = n_params(EnclapModel(spec.captioner))
    retriever_module = AudioTextRetriever(spec.retriever)
    retriever = n_params(retriever_module)
    audio_encoder = n_params(CNext(spec.retriever.audio))
    from streamcap.models.bundle.components import build_components

    fluency_filter = build_components(spec).fluency
    assert fluency_filter is not None
    fluency = n_params(fluency_filter.model)
    expected = {"codec": codec, "captioner": captioner, "retriever": retriever,
                "retriever_audio_encoder": audio_encoder, "fluency": fluency,
                "seq_embedder": 0, "total": codec + captioner + retriever + fluency}
    assert presets_json["tiny"]["parameters"] == expected
    assert parameter_counts(spec) == expected
    assert n_params(retriever_module.audio_encoder) == audio_encoder


def test_base_and_large_counts_without_allocating(presets_json: dict[str, Any]) -> None:
    base = presets_json["base"]["parameters"]
    large = presets_json["large"]["parameters"]
    assert base["total"] > 1e8 and large["total"] > 1e8
    assert large["captioner"] > base["captioner"] > 1e8
    assert large["codec"] == base["codec"] and large["retriever"] == base["retriever"]
    # Allocating large in fp32 alone would take 4 bytes per parameter; the whole run
    # (python, torch, transformers) stays far below that.
    assert presets_json["_run"]["peak_rss_bytes"] < 4 * large["total"] / 2


def test_presets_text() -> None:
    done = run_cli("models", "presets")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(preset_names())
    for line in lines:
        assert " M  (codec " in line and "captioner" in line and "fluency" in line
        assert "CLAP" in line


# --------------------------------------------------------------------------- build / verify


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundles") / "tiny"
    done = run_cli("models", "build", "tiny", str(directory), "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("wrote bundle streamcap-tiny-random-")
    assert f"to {directory} (random weights of preset 'tiny')" in done.stdout
    return directory


@pytest.mark.slow
def test_build_then_verify(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    files: dict[str, str] = manifest["files"]
    assert files
    for rel, digest in files.items():
        assert hashlib.sha256((tiny_bundle / rel).read_bytes()).hexdigest() == digest
    done = run_cli("models", "verify", str(tiny_bundle))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"{tiny_bundle}: ok; model streamcap-tiny-random-")
    assert done.stdout.strip().endswith(f"{len(files)} files verified")


@pytest.mark.slow
def test_verify_rejects_a_tampered_file(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    rel = next(r for r in manifest["files"] if r.endswith(".safetensors"))
    target = copy / rel
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    expected = manifest["files"][rel]
    actual = hashlib.sha256(bytes(data)).hexdigest()
    done = run_cli("models", "verify", str(copy))
    assert done.returncode == 1
    [line] = errors(done.stderr)
    assert str(target) in line
    assert expected in line and actual in line
    assert f"expected {expected}, actual {actual}" in line


@pytest.mark.slow
def test_build_refuses_to_overwrite_without_the_flag(tiny_bundle: Path) -> None:
    done = run_cli("models", "build", "tiny", str(tiny_bundle))
    assert done.returncode == 1
    [line] = errors(done.stderr)
    assert str(tiny_bundle) in line and "not empty" in line


def test_build_unknown_preset(tmp_path: Path) -> None:
    done = run_cli("models", "build", "huge", str(tmp_path / "b"))
    assert done.returncode == 1
    assert errors(done.stderr) == [
        "unknown preset 'huge' (presets: tiny, base, large, enclap-base, enclap-large)"]
    assert not (tmp_path / "b").exists()


def test_verify_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    done = run_cli("models", "verify", str(tmp_path))
    assert done.returncode == 1
    [line] = errors(done.stderr)
    assert str(tmp_path) in line and "manifest.json is missing" in line


# --------------------------------------------------------------------------- convert-dac


def test_convert_dac_missing_file(tmp_path: Path) -> None:
    pth = tmp_path / "weights_24khz.pth"
    done = run_cli("models", "convert-dac", str(pth), str(tmp_path / "codec.safetensors"))
    assert done.returncode == 1
    assert errors(done.stderr) == [f"{pth}: no such file"]


def test_convert_dac_garbage_file(tmp_path: Path) -> None:
    pth = tmp_path / "weights_24khz.pth"
    pth.write_bytes(b"\x00not a checkpoint" * 10)
    done = run_cli("models", "convert-dac", str(pth), str(tmp_path / "codec.safetensors"))
    assert done.returncode == 1
    [line] = errors(done.stderr)
    assert line.startswith(f"{pth}: not a readable torch checkpoint")


def test_convert_dac_wrong_layout(tmp_path: Path) -> None:
    pth = tmp_path / "weights_24khz.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, pth)
    out = tmp_path / "codec.safetensors"
    done = run_cli("models", "convert-dac", str(pth), str(out))
    assert done.returncode == 1
    assert errors(done.stderr) == [
        f"{pth}: expected a dict with 'state_dict' and 'metadata' (the descript DAC .pth layout)"]
    assert not out.exists()


def _descript_checkpoint(path: Path, **extra: object) -> dict[str, torch.Tensor]:
    from test_dac_convert import KWARGS, descript_state_dict

    state = descript_state_dict(decoder=False)
    torch.save({"state_dict": state, "metadata": {"kwargs": KWARGS}, **extra}, path)
    return state


def test_convert_dac_writes_the_checked_encoder(tmp_path: Path) -> None:
    from safetensors import safe_open

    from streamcap.models.codecs.descript import read_descript_checkpoint

    pth = tmp_path / "weights_24khz.pth"
    _descript_checkpoint(pth)
    out = tmp_path / "out" / "codec.safetensors"
    done = run_cli("models", "convert-dac", str(pth), str(out))
    assert done.returncode == 0, done.stderr
    config, expected = read_descript_checkpoint(pth)
    with safe_open(str(out), framework="pt") as stored:
        assert set(stored.keys()) == set(expected)
        for key, value in expected.items():
            assert torch.equal(stored.get_tensor(key), value), key
        assert json.loads(stored.metadata()["codec_config"]) == config.to_dict()
    assert done.stdout.strip() == (f"wrote {len(expected)} tensors to {out}; "
                                   f"codec config {config.codec_id}")


def test_convert_dac_checks_weights_against_the_metadata(tmp_path: Path) -> None:
    pth = tmp_path / "weights_24khz.pth"
    state = _descript_checkpoint(pth)
    del state["encoder.block.1.block.4.bias"]
    from test_dac_convert import KWARGS

    torch.save({"state_dict": state, "metadata": {"kwargs": KWARGS}}, pth)
    out = tmp_path / "codec.safetensors"
    done = run_cli("models", "convert-dac", str(pth), str(out))
    assert done.returncode == 1
    [line] = errors(done.stderr)
    assert line.startswith(f"{pth}: descript state dict does not match ")
    assert line.endswith(": missing keys (1): encoder.block.0.conv1.bias")
    assert not out.exists()


def test_convert_dac_refuses_a_pickle_with_code(tmp_path: Path) -> None:
    import os

    class RunsCode:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    marker = tmp_path / "ran"
    pth = tmp_path / "weights_24khz.pth"
    _descript_checkpoint(pth, extra=RunsCode())
    out = tmp_path / "codec.safetensors"
    done = run_cli("models", "convert-dac", str(pth), str(out))
    assert done.returncode == 1
    [line] = errors(done.stderr)
    assert line.startswith(f"{pth}: refused: the pickle holds Python objects other than tensors")
    assert not marker.exists() and not out.exists()
