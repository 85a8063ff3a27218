"""streamcap.triggers.calibrate and ``streamcap triggers calibrate``.

Windows are scored with the daemon's hit rule and embedded by the daemon's
fast-path code (the same embedding for the same window, shown on the demo
bundle); the table; bad input as one line and exit 2; and one end-to-end run
of the command (a subprocess, the demo bundle) on synthesized sirens
(positive) and rain (negative) whose threshold the daemon's reader then
takes. The sweep and the firing score are tested with the rest of
:mod:`streamcap.triggers.scoring`, the file format with
:mod:`streamcap.triggers.state`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from timing import scaled

from streamcap.audio.windowing import Windower
from streamcap.cli import main
from streamcap.config import load_config
from streamcap.messages import make_block
from streamcap.models.captioner import build_captioner
from streamcap.models.decoding.options import DecodingOptions
from streamcap.triggers.calibrate import (
    file_window_embeddings,
    format_table,
    shown_rows,
    window_hit_scores,
)
from streamcap.triggers.fastpath import RetrieverTriggerModel
from streamcap.triggers.scoring import sweep
from streamcap.triggers.state import calibrated_path, fingerprint, read_calibrated

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pure helpers


def unit(*v: float) -> np.ndarray:
    a = np.array(v, np.float32)
    return a / np.linalg.norm(a)


def test_windows_score_with_the_daemons_hit_rule() -> None:
    positives = np.stack([unit(1, 0, 0), unit(0, 1, 0)])
    negatives = np.stack([unit(0, 0, 1)])
    windows = np.stack([unit(0.2, 0.9, 0.1), unit(0.1, 0.3, 0.9)])
    got = window_hit_scores(windows, positives, negatives)
    assert got[0] == pytest.approx(float(windows[0][1]))  # best positive, above the negative
    assert got[1] == -math.inf  # the negative phrasing explains it better: never a hit
    assert window_hit_scores(windows, positives, np.zeros((0, 3), np.float32))[1] == \
        pytest.approx(float(windows[1][1]))


def test_the_table_shows_a_bounded_spread_of_rows_with_the_chosen_one() -> None:
    rows = sweep([i / 100 for i in range(0, 100, 2)], [i / 100 for i in range(1, 100, 2)])
    chosen = rows[37]
    shown = shown_rows(rows, chosen, limit=10)
    assert len(shown) <= 10 and chosen in shown and shown[0] is rows[0]
    assert shown == sorted(shown, key=lambda r: -r.threshold)
    text = format_table(rows, chosen)
    assert f"*{chosen.threshold:+9.4f}" in text and "--json lists them all" in text


# ----------------------------------------------------------------------------- the command


def _wav(path: Path, kind: str, seed: int, seconds: float = 4.0) -> Path:
    from streamcap.training.data.corpus_sounds import SYNTHS

    sr = 32000
    audio = SYNTHS[kind](np.random.default_rng(seed), int(seconds * sr), sr).astype(np.float64)
    sf.write(path, (0.3 * audio / np.max(np.abs(audio))).astype(np.float32), sr)
    return path


def _config(tmp_path: Path, triggers: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                      '[sources.yard]\nuri = "mic:default"\n' + triggers, "utf-8")
    return config


SIREN = '[triggers.siren]\ntext = ["a siren wails", "an emergency siren"]\n'
RAIN = '[triggers.rain]\ntext = ["rain falls"]\n'


@pytest.mark.parametrize(("extra", "expected"), [
    (["--trigger", "dog"], ("streamcap: error: --trigger: no trigger 'dog' in {config} "
                           "(triggers: rain, siren)")),
    ([], ("streamcap: error: --trigger: needed, the config defines several triggers "
         "(rain, siren)")),
])
def test_a_trigger_not_in_the_config_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
        expected: str) -> None:
    config = _config(tmp_path, SIREN + RAIN)
    wav = _wav(tmp_path / "s.wav", "siren", 0, 1.0)
    code = main(["triggers", "calibrate", "--config", str(config), "--positive", str(wav),
                 "--negative", str(wav), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [expected.format(config=config)]


def test_missing_files_and_no_positives_are_named_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, SIREN)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio", "utf-8")
    code = main(["triggers", "calibrate", "--config", str(config),
                 "--negative", str(tmp_path / "gone.wav"), str(not_audio)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0] == ("streamcap: error: --positive: at least one audio file that holds "
                      "the sound is needed")
    assert err[1] == f"streamcap: error: {tmp_path / 'gone.wav'}: no such file"
    assert len(err) == 3 and "notes.wav" in err[2] and "Traceback" not in err[2]
    assert not (tmp_path / "state").exists()


def test_calibrate_writes_a_threshold_and_prints_the_table(tmp_path: Path) -> None:
    config = _config(tmp_path, SIREN)
    positives = [str(_wav(tmp_path / f"siren{i}.wav", "siren", i)) for i in range(2)]
    negatives = [str(_wav(tmp_path / f"rain{i}.wav", "rain", 10 + i)) for i in range(2)]
    out = calibrated_path(tmp_path / "state")
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"dog": {"threshold": 0.3, "model": "x"}}), "utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamcap", "triggers", "calibrate", "--config", str(config),
         "--positive", *positives, "--negative", *negatives],
        capture_output=True, text=True, env=env, timeout=scaled(240), check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("trigger siren: 2 positive and 2 negative files, 5 s windows")
    assert lines[1].split() == ["threshold", "precision", "recall", "F1", "tp", "fp", "fn",
                                "tn"]
    assert sum(line.startswith("*") for line in lines) == 1
    assert lines[-1].endswith(f"written to {out}")
    data = json.loads(out.read_text("utf-8"))
    manifest_id = json.loads((ROOT / "streamcap" / "data" / "demo-bundle" / "manifest.json")
                             .read_text("utf-8"))["model_id"]
    # the daemon's reader takes the siren's threshold for the demo model and these words
    siren = load_config(config).triggers["siren"]
    words = {"siren": fingerprint(siren, manifest_id)}
    assert read_calibrated(out.parent, manifest_id, words) == {"siren": data["siren"]["threshold"]}
    assert read_calibrated(out.parent, "x", words) == {}
    reworded = {"siren": fingerprint(dataclasses.replace(siren, text=("a horn",)), manifest_id)}
    assert read_calibrated(out.parent, manifest_id, reworded) == {}
    assert data["dog"] == {"threshold": 0.3, "model": "x"}  # the other trigger is kept
    entry = data["siren"]
    manifest = json.loads((ROOT / "streamcap" / "data" / "demo-bundle" / "manifest.json")
                          .read_text("utf-8"))
    assert entry["model"] == manifest["model_id"]
    assert np.isfinite(entry["threshold"]) and -1.0 <= entry["threshold"] <= 1.0
    assert (entry["positives"], entry["negatives"]) == (2, 2)
    assert 0.0 <= entry["f1"] <= 1.0 and entry["calibrated_at"].endswith("+00:00")


def test_calibrate_embeds_a_window_as_the_daemons_fast_path_does(tmp_path: Path) -> None:
    """A file cut by calibrate and the same audio fed as a live source's blocks to the fast
    path's windower give the same windows and the same embeddings."""
    captioner = build_captioner("demo", DecodingOptions(), device=torch.device("cpu"),
                                dtype=torch.float32)
    model = RetrieverTriggerModel(captioner)
    wav = _wav(tmp_path / "siren.wav", "siren", 5, seconds=9.0)
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == model.sample_rate_hz
    calibrated = file_window_embeddings(model, wav, 5.0, 1.0)
    windower = Windower("live", 5.0, 1.0, (rate,), run_id="run")
    live = []
    for start in range(0, audio.size, rate // 4):  # 250 ms blocks, as a source sends them
        block = make_block(source_id="live", start_sample=start, sample_rate_hz=rate,
                           samples=audio[start:start + rate // 4], captured_at=0.0)
        live += windower.feed(block).windows
    daemon = model.embed_windows(live)
    assert len(live) == 5 and calibrated.shape[0] >= len(live)  # calibrate pads the tail
    np.testing.assert_allclose(calibrated[:len(live)], daemon, atol=1e-5)
    # a second file starts at 0 again: the frames cached for the first are not reused
    other = _wav(tmp_path / "rain.wav", "rain", 6, seconds=9.0)
    again = file_window_embeddings(model, other, 5.0, 1.0)
    fresh = file_window_embeddings(RetrieverTriggerModel(captioner), other, 5.0, 1.0)
    np.testing.assert_allclose(again, fresh, atol=1e-6)
