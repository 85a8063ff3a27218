"""streamcap.triggers.calibrate and ``streamcap triggers calibrate``.

The sweep, the threshold choice and the firing score on made-up scores; the
calibrated.json merge; bad input as one line and exit 2; and one end-to-end
run of the command (a subprocess, the demo bundle) on synthesized sirens
(positive) and rain (negative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from timing import scaled

from streamcap.cli import main
from streamcap.errors import ConfigError
from streamcap.triggers.calibrate import (
    PhraseEmbeddings,
    SweepRow,
    at_threshold,
    best_row,
    calibrated_path,
    calibration_entry,
    firing_score,
    format_table,
    merged,
    plain_score,
    read_calibrated,
    shown_rows,
    sweep,
    write_calibrated,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pure helpers


def test_the_firing_score_is_the_best_runs_min_hits_th_score() -> None:
    scores = [0.1, 0.9, 0.2, 0.8, 0.3]
    # runs of 3: (0.1 0.9 0.2) -> 0.2, (0.9 0.2 0.8) -> 0.8, (0.2 0.8 0.3) -> 0.3
    assert firing_score(scores, 2, 3) == 0.8
    assert firing_score(scores, 1, 3) == 0.9
    assert firing_score(scores, 3, 3) == 0.2
    assert firing_score([0.4, 0.7], 2, 3) == 0.4  # shorter than a run: one run
    assert firing_score([0.5], 2, 3) == 0.5  # fewer windows than min_hits: all of them
    with pytest.raises(ValueError, match="no window scores"):
        firing_score([], 2, 3)


def test_the_sweep_counts_exactly_at_every_distinct_score() -> None:
    rows = sweep([0.9, 0.7, 0.4], [0.8, 0.3])
    assert [r.threshold for r in rows] == [0.9, 0.8, 0.7, 0.4, 0.3]
    by_t = {r.threshold: r for r in rows}
    assert by_t[0.7] == SweepRow(0.7, tp=2, fp=1, fn=1, tn=1)
    assert by_t[0.7].precision == pytest.approx(2 / 3)
    assert by_t[0.7].recall == pytest.approx(2 / 3)
    assert by_t[0.7].f1 == pytest.approx(2 / 3)
    assert (by_t[0.9].precision, by_t[0.9].recall) == (1.0, pytest.approx(1 / 3))
    assert by_t[0.9].f1 == pytest.approx(0.5)
    assert by_t[0.4].f1 == pytest.approx(6 / 7)  # P 3/4, R 1
    assert by_t[0.3] == SweepRow(0.3, tp=3, fp=2, fn=0, tn=0)
    assert best_row(rows).threshold == 0.4


def test_an_item_at_the_threshold_counts_as_detected() -> None:
    assert at_threshold([0.5], [0.5], 0.5) == SweepRow(0.5, tp=1, fp=1, fn=0, tn=0)
    assert at_threshold([0.5], [0.5], 0.50001) == SweepRow(0.50001, tp=0, fp=0, fn=1, tn=1)


def test_of_equal_f1_the_higher_threshold_is_chosen_whatever_the_order() -> None:
    positives, negatives = [0.9, 0.6], [0.8, 0.7]
    rows = sweep(positives, negatives)
    # 0.9: tp 1 fn 1 -> F1 2/3; 0.6: tp 2 fp 2 -> F1 4/6: the same F1
    assert {r.threshold: round(r.f1, 9) for r in rows}[0.6] == round(2 / 3, 9)
    assert best_row(rows).threshold == 0.9
    assert best_row(list(reversed(rows))).threshold == 0.9
    assert best_row(sweep(positives[::-1], negatives[::-1])).threshold == 0.9


def test_a_sweep_needs_positives_and_finite_scores() -> None:
    with pytest.raises(ValueError, match="positive"):
        sweep([], [0.1])
    with pytest.raises(ValueError, match="finite"):
        sweep([0.2, float("nan")], [0.1])


def test_the_plain_score_is_the_best_cosine_with_phrasings_and_examples() -> None:
    def unit(*v: float) -> np.ndarray:
        a = np.array(v, np.float32)
        return a / np.linalg.norm(a)

    phrases = PhraseEmbeddings(positive=np.stack([unit(1, 0, 0), unit(0, 1, 0)]),
                               negative=np.stack([unit(0, 0, 1)]),
                               examples=np.zeros((0, 3), np.float32))
    audio = unit(0.2, 0.6, 0.9)
    assert plain_score(audio, phrases) == pytest.approx(float(audio[1]))  # negative not used
    with_example = PhraseEmbeddings(phrases.positive, phrases.negative,
                                    np.stack([unit(0, 0.5, 1)]))
    assert plain_score(audio, with_example) == pytest.approx(float(audio @ unit(0, 0.5, 1)))


def test_the_table_shows_a_bounded_spread_of_rows_with_the_chosen_one() -> None:
    rows = sweep([i / 100 for i in range(0, 100, 2)], [i / 100 for i in range(1, 100, 2)])
    chosen = rows[37]
    shown = shown_rows(rows, chosen, limit=10)
    assert len(shown) <= 10 and chosen in shown and shown[0] is rows[0]
    assert shown == sorted(shown, key=lambda r: -r.threshold)
    text = format_table(rows, chosen)
    assert f"*{chosen.threshold:+9.4f}" in text and "--json lists them all" in text


def test_calibrated_json_is_merged_and_written_whole(tmp_path: Path) -> None:
    path = calibrated_path(tmp_path)
    assert path == tmp_path / "triggers" / "calibrated.json"
    assert read_calibrated(path) == {}
    from datetime import UTC, datetime

    entry = calibration_entry(SweepRow(0.42, tp=3, fp=1, fn=1, tn=5), model="m1",
                              now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert entry == {"threshold": 0.42, "model": "m1", "f1": 0.75, "positives": 4,
                     "negatives": 6, "calibrated_at": "2026-01-02T03:04:05+00:00"}
    write_calibrated(path, merged({"dog": {"threshold": 0.1}}, "siren", entry))
    write_calibrated(path, merged(read_calibrated(path), "siren", {**entry, "threshold": 0.5}))
    data = read_calibrated(path)
    assert data["dog"] == {"threshold": 0.1} and data["siren"]["threshold"] == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["calibrated.json"]  # no temp left


def test_a_broken_calibrated_json_is_named_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "calibrated.json"
    path.write_text("{not json", "utf-8")
    with pytest.raises(ConfigError, match=r"calibrated.json: not valid JSON \(line 1"):
        read_calibrated(path)
    path.write_text("[1, 2]", "utf-8")
    with pytest.raises(ConfigError, match="expected a JSON object of triggers, got list"):
        read_calibrated(path)


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
    assert data["dog"] == {"threshold": 0.3, "model": "x"}  # the other trigger is kept
    entry = data["siren"]
    manifest = json.loads((ROOT / "streamcap" / "data" / "demo-bundle" / "manifest.json")
                          .read_text("utf-8"))
    assert entry["model"] == manifest["model_id"]
    assert np.isfinite(entry["threshold"]) and -1.0 <= entry["threshold"] <= 1.0
    assert (entry["positives"], entry["negatives"]) == (2, 2)
    assert 0.0 <= entry["f1"] <= 1.0 and entry["calibrated_at"].endswith("+00:00")
