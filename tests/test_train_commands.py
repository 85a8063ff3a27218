"""``streamcap train ...`` and ``streamcap eval`` end to end on a tiny synthetic corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamcap.cli import main
from streamcap.models.bundle.components import load_components
from streamcap.models.bundle.manifest import load_bundle


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    assert main(["train", "corpus", str(out), "--clips", "20", "--seed", "2", "--clip-s", "4",
                 "--captions-per-clip", "3"]) == 0
    return out


@pytest.mark.slow
def test_the_whole_recipe_runs_and_writes_metrics(corpus: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    manifest = str(corpus / "manifest.jsonl")
    init, retr, feats = tmp_path / "init", tmp_path / "retr", tmp_path / "feats"
    capt, soup = tmp_path / "capt", tmp_path / "soup"
    assert main(["train", "init", str(init), "--manifest", manifest, "--vocab-size", "400"]) == 0
    assert main(["train", "retriever", "--model", str(init), "--manifest", manifest,
                 "--out", str(retr), "--epochs", "1", "--batch-size", "4", "--clip-s", "4"]) == 0
    retr_metrics = json.loads((tmp_path / "retr.train.json").read_text())
    assert retr_metrics["kind"] == "retriever" and retr_metrics["history"]["step_losses"]
    assert (tmp_path / "retr.checkpoints" / "epoch-001.pt").is_file()
    assert main(["train", "features", "--model", str(retr), "--manifest", manifest,
                 "--out", str(feats)]) == 0
    assert main(["train", "captioner", "--model", str(retr), "--features", str(feats),
                 "--out", str(capt), "--epochs", "1", "--batch-size", "4", "--warmup", "2",
                 "--decoding-mode", "beam", "--model-id", "test-model"]) == 0
    loaded = load_components(load_bundle(capt))
    assert loaded.model_id == "test-model" and loaded.decoding["mode"] == "beam"
    # Resuming a finished run trains nothing more and rewrites the bundle.
    assert main(["train", "captioner", "--model", str(retr), "--features", str(feats),
                 "--out", str(capt), "--epochs", "1", "--batch-size", "4",
                 "--resume", str(tmp_path / "capt.checkpoints")]) == 0
    assert main(["train", "soup", str(capt), str(capt), "--out", str(soup)]) == 0
    metrics_path = tmp_path / "eval.json"
    assert main(["eval", "--model", str(soup), "--manifest", manifest, "--split", "test",
                 "--out", str(metrics_path), "--num-beams", "2", "--no-meteor"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["clips"] == 2
    assert {"bleu_1", "cider_d", "rouge_l", "vocabulary"} <= set(metrics["captions"])
    assert 0.0 <= metrics["retrieval"]["text_to_audio"]["r1"] <= 1.0
    assert set(metrics["keywords"]) >= {"recall", "mean_recall", "support"}
    assert "CIDEr-D" in capsys.readouterr().out
    sampled = tmp_path / "eval-sample.json"
    assert main(["eval", "--model", str(capt), "--model", str(soup), "--manifest", manifest,
                 "--split", "test", "--limit", "1", "--decoding", "sample", "--no-meteor",
                 "--out", str(sampled)]) == 0
    result = json.loads(sampled.read_text())
    assert result["clips"] == 1 and result["retrieval"] is None
    first, second = result["models"]
    assert second == f"{first}-soup2"  # an output ensemble of the model and its soup


def test_manifest_errors_name_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {"clip_id": "a", "audio": "a.wav", "captions": ["x"], "split": "train",
            "source": "s", "duration_s": 1.0}
    (tmp_path / "a.wav").write_bytes(b"")
    bad = dict(good, clip_id="b", captions=["ok", ""])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    code = main(["eval", "--model", str(tmp_path), "--manifest", str(manifest),
                 "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert "row 2" in err and "captions[1]" in err


def test_train_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    assert "corpus, init, features, retriever, captioner, soup" in capsys.readouterr().err


def test_retriever_mode_needs_its_inputs(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "retriever", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--audio", "embedding"])
    assert code == 2
    assert "--features" in capsys.readouterr().err


def _wav(path: Path, seconds: float) -> None:
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)


def test_data_manifest_from_audiocaps_and_wavcaps_prepared_by_hand(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamcap.training.data.manifest import read_manifest

    (tmp_path / "ac").mkdir()
    (tmp_path / "ac" / "train.csv").write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,abc,30,a dog barks\n2,abc,30,a dog is barking\n3,missing,0,rain falls\n")
    _wav(tmp_path / "ac_audio" / "abc.wav", 1.0)
    out = tmp_path / "audiocaps.jsonl"
    assert main(["data", "manifest", "audiocaps", "--csv-dir", str(tmp_path / "ac"),
                 "--audio-dir", str(tmp_path / "ac_audio"), "--out", str(out)]) == 0
    assert "wrote 1 clips" in capsys.readouterr().out
    (row,) = read_manifest(out)
    assert row.captions == ("a dog barks", "a dog is barking") and row.split == "train"

    (tmp_path / "wc.json").write_text(json.dumps({"data": [
        {"id": "7", "caption": "birds sing", "duration": 2.0},
        {"id": "8", "caption": "too short", "duration": 0.5}]}))
    _wav(tmp_path / "wc_audio" / "7.flac", 2.0)
    _wav(tmp_path / "wc_audio" / "8.flac", 0.5)
    out = tmp_path / "wavcaps.jsonl"
    assert main(["data", "manifest", "wavcaps", "--json", str(tmp_path / "wc.json"),
                 "--audio-dir", str(tmp_path / "wc_audio"), "--source", "soundbible",
                 "--out", str(out)]) == 0
    assert [r.captions for r in read_manifest(out)] == [("birds sing",)]
    assert read_manifest(out)[0].source == "wavcaps-soundbible"


def test_data_manifest_names_missing_options_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "manifest", "wavcaps", "--out", str(tmp_path / "m.jsonl")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--json, --audio-dir, --source" in err[0]
