"""Tests for ``streamcap caption`` (streamcap.captioning).

Windowing of whole files is checked in process (no model); the command itself
runs as the real console script with the tiny random preset and a config that
keeps decoding cheap (2 candidates of 4 tokens, fp32, one thread, fixed seed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from streamcap.captioning import (
    FileEnd,
    _settings,
    check_files,
    file_windows,
    iterate,
    short_file_warning,
    stream_windows,
)
from streamcap.cli import main
from streamcap.config import ModelConfig
from streamcap.errors import ConfigError, SourceError
from streamcap.messages import Window

ROOT = Path(__file__).resolve().parent.parent
STREAMCAP = Path(sys.executable).parent / "streamcap"
if not STREAMCAP.exists():
    STREAMCAP = ROOT / ".venv" / "bin" / "streamcap"

RATE = 16000
FAST_CONFIG = """\
[model]
precision = "fp32"
threads = 1

[model.decoding]
n_candidates = 2
max_new_tokens = 4
seed = 0
"""


def noise_and_tone(duration_s: float, seed: int = 0) -> np.ndarray:
    """Mono float32 at RATE: a 440 Hz tone plus white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(duration_s * RATE)) / RATE
    signal = 0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * rng.standard_normal(t.size)
    return signal.astype(np.float32)


def write_wav(path: Path, duration_s: float, seed: int = 0) -> Path:
    sf.write(path, noise_and_tone(duration_s, seed), RATE, subtype="FLOAT")
    return path


def write_corrupt(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(7).bytes(4096))
    return path


# --------------------------------------------------------------------------- windows, no model


@pytest.mark.parametrize(("duration_s", "window_s", "hop_s", "starts"), [
    (12.0, 10.0, 5.0, [0.0, 5.0, 10.0]),
    (3.0, 10.0, 5.0, [0.0]),
    (25.0, 10.0, 10.0, [0.0, 10.0, 20.0]),
    (20.0, 10.0, 10.0, [0.0, 10.0]),  # no window that starts at the very end
    (10.0, 10.0, 5.0, [0.0, 5.0]),
    (0.5, 10.0, 2.5, [0.0]),
])
def test_file_windows_cover_the_whole_file(tmp_path: Path, duration_s: float, window_s: float,
                                           hop_s: float, starts: list[float]) -> None:
    path = write_wav(tmp_path / "clip.wav", duration_s)
    windows = list(file_windows(path, window_s, hop_s, (RATE,)))
    assert [w.start_s for w in windows] == starts
    assert [w.seq for w in windows] == list(range(len(starts)))
    assert all(w.end_s == pytest.approx(w.start_s + window_s) for w in windows)
    assert windows[-1].end_s >= duration_s  # the tail is inside a window
    assert all(len(w.samples(RATE)) == int(window_s * RATE) for w in windows)


def test_short_file_is_one_window_padded_with_silence(tmp_path: Path) -> None:
    audio = noise_and_tone(3.0)
    path = tmp_path / "short.wav"
    sf.write(path, audio, RATE, subtype="FLOAT")
    [window] = file_windows(path, 10.0, 5.0, (RATE,))
    samples = window.samples(RATE)
    np.testing.assert_array_equal(samples[:len(audio)], audio)
    assert not samples[len(audio):].any()


def test_last_window_holds_the_tail(tmp_path: Path) -> None:
    audio = noise_and_tone(25.0)
    path = tmp_path / "long.wav"
    sf.write(path, audio, RATE, subtype="FLOAT")
    windows = list(file_windows(path, 10.0, 10.0, (RATE,)))
    last = windows[-1].samples(RATE)
    np.testing.assert_array_equal(last[:5 * RATE], audio[20 * RATE:])
    assert not last[5 * RATE:].any()


def test_file_windows_missing_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(SourceError, match=str(missing)):
        list(file_windows(missing, 10.0, 5.0, (RATE,)))
    corrupt = write_corrupt(tmp_path / "corrupt.wav")
    with pytest.raises(SourceError, match=str(corrupt)):
        list(file_windows(corrupt, 10.0, 5.0, (RATE,)))


def _args(**overrides: Any) -> argparse.Namespace:
    values: dict[str, Any] = {"config": None, "window_s": None, "hop_s": None, "model": None,
                              "json": False, "files": []}
    values.update(overrides)
    return argparse.Namespace(**values)


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    assert _settings(_args()) == (ModelConfig(), 10.0, 5.0)
    assert _settings(_args(window_s=12.0)) == (ModelConfig(), 12.0, 5.0)
    assert _settings(_args(window_s=20.0, hop_s=2.5))[1:] == (20.0, 2.5)
    config = tmp_path / "c.toml"
    config.write_text('[model]\nprecision = "fp32"\n[sources.a]\nuri = "mic:default"\n'
                      'window_s = 30\nhop_s = 17.5\n')
    model, window_s, hop_s = _settings(_args(config=config))
    assert model.precision == "fp32"
    assert (window_s, hop_s) == (30.0, 17.5)
    assert _settings(_args(config=config, window_s=15.0))[1:] == (15.0, 15.0)  # hop follows


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"window_s": 31.0}, ["--window-s: must be between 10 and 30 (got 31.0)"]),
    ({"window_s": 1.0}, ["--window-s: must be between 10 and 30 (got 1.0)"]),
    ({"window_s": 0.0, "hop_s": 0.0}, ["--window-s: must be between 10 and 30 (got 0.0)",
                                       "--hop-s: must be > 0 (got 0.0)"]),
    ({"hop_s": 12.0}, ["--hop-s: must be > 0 and <= window_s (got 12 > 10)"]),
    ({"window_s": 10.0005},
     ["--window-s: must be a whole number of milliseconds (got 10.0005)"]),
    ({"hop_s": 2.0001}, ["--hop-s: must be a whole number of milliseconds (got 2.0001)"]),
    ({"window_s": float("nan")}, ["--window-s: must be a finite number (got nan)"]),
    ({"hop_s": float("nan")}, ["--hop-s: must be a finite number (got nan)"]),
    ({"window_s": float("inf"), "hop_s": float("-inf")},
     ["--window-s: must be a finite number (got inf)",
      "--hop-s: must be a finite number (got -inf)"]),
])
def test_settings_reject_bad_lengths(overrides: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(_args(**overrides))
    assert info.value.problems == expected


@pytest.mark.parametrize("flags", [["--window-s", "nan"], ["--hop-s", "nan"],
                                   ["--window-s", "inf"], ["--window-s", "1"],
                                   ["--hop-s", "-1"]])
def test_bad_window_flags_are_usage_errors_through_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    path = write_wav(tmp_path / "x.wav", 1.0)
    assert main(["caption", *flags, str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [problem] = errors(err)
    assert problem.startswith(f"{flags[0]}: must be ")


def test_short_file_warning_names_the_file_and_its_real_duration(tmp_path: Path) -> None:
    path = tmp_path / "one.wav"
    sf.write(path, np.array([0.5], dtype=np.float32), RATE, subtype="FLOAT")
    [end] = [item for item in iterate(stream_windows(path, 10.0, 5.0, (RATE,)))
             if isinstance(item, FileEnd)]
    assert end == FileEnd(1, RATE)
    warning = short_file_warning(path, end, 10.0)
    assert warning is not None
    assert str(path) in warning and "6.25e-05 s" in warning and "1 samples" in warning
    assert short_file_warning(path, FileEnd(10 * RATE, RATE), 10.0) is None


def test_check_files_reports_every_bad_file_without_decoding(tmp_path: Path) -> None:
    good = write_wav(tmp_path / "good.wav", 1.0)
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    corrupt = write_corrupt(tmp_path / "corrupt.wav")
    missing = tmp_path / "missing.wav"
    found = check_files([good, folder, corrupt, missing])
    assert found.good == [good]
    assert found.refused == [(f"{folder} is a directory, not a regular file; "
                             "expected an audio file")]
    assert len(found.problems) == 2
    assert str(corrupt) in found.problems[0] and "cannot be decoded" in found.problems[0]
    assert found.problems[1] == f"{missing}: no such file"


# --------------------------------------------------------------------------- the command


def run_caption(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not STREAMCAP.exists():
        pytest.skip(f"{STREAMCAP} is missing: pip install -e . in the venv")
    config = tmp_path / "fast.toml"
    config.write_text(FAST_CONFIG)
    done = subprocess.run([str(STREAMCAP), "caption", "--model", "tiny", "--config", str(config),
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def errors(stderr: str) -> list[str]:
    prefix = "streamcap: error: "
    return [line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def json_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``caption --json`` over good, short, corrupt, missing and mp3 files."""
    tmp = tmp_path_factory.mktemp("caption")
    files = {"wav12": write_wav(tmp / "noise12.wav", 12.0),
             "wav3": write_wav(tmp / "short3.wav", 3.0, 1),
             "corrupt": write_corrupt(tmp / "corrupt.wav"), "missing": tmp / "missing.wav"}
    mp3 = tmp / "tone12.mp3"
    ffmpeg = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i",
                             str(files["wav12"]), str(mp3)], capture_output=True, check=False)
    args = [str(files[k]) for k in ("wav12", "corrupt", "missing", "wav3")]
    if ffmpeg.returncode == 0:
        files["mp3"] = mp3
        args.append(str(mp3))
    done = run_caption(tmp, "--json", *args)
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in done.stdout.splitlines():
        row = json.loads(line)
        by_file[row["file"]].append(row)
    return {"done": done, "files": files, "by_file": by_file}


@pytest.mark.slow
def test_json_lines_per_window(json_run: dict[str, Any]) -> None:
    rows = json_run["by_file"][str(json_run["files"]["wav12"])]
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(0.0, 10.0), (5.0, 15.0),
                                                          (10.0, 20.0)]
    assert [r["window"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert isinstance(row["text"], str)
        assert isinstance(row["score"], float)
        assert isinstance(row["seconds"], float) and row["seconds"] >= 0
        assert isinstance(row["flagged"], bool)
        assert row["abstained"] is False  # a preset has no abstention rule
        assert row["confidence"] is None or isinstance(row["confidence"], float)
        assert row["model"].startswith("streamcap-tiny-random-")
        assert 1 <= len(row["candidates"]) <= 2
        assert row["text"] in [c["text"] for c in row["candidates"]]
        assert set(row["stages"]) >= {"codec", "encoder", "sampling"}


@pytest.mark.slow
def test_short_file_gives_exactly_one_padded_window(json_run: dict[str, Any]) -> None:
    rows = json_run["by_file"][str(json_run["files"]["wav3"])]
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(0.0, 10.0)]


@pytest.mark.slow
def test_bad_files_are_reported_and_the_others_still_captioned(json_run: dict[str, Any]) -> None:
    done, files = json_run["done"], json_run["files"]
    assert done.returncode == 1
    problems = errors(done.stderr)
    assert f"{files['missing']}: no such file" in problems
    [corrupt] = [p for p in problems if str(files["corrupt"]) in p]
    assert "cannot be decoded" in corrupt
    assert len(problems) == 2
    assert str(files["corrupt"]) not in json_run["by_file"]
    assert str(files["missing"]) not in json_run["by_file"]
    # Files after the bad ones in the same command were captioned.
    assert json_run["by_file"][str(files["wav3"])]


@pytest.mark.slow
def test_mp3_is_captioned(json_run: dict[str, Any]) -> None:
    if "mp3" not in json_run["files"]:
        pytest.skip("ffmpeg cannot write mp3 here")
    rows = json_run["by_file"][str(json_run["files"]["mp3"])]
    # mp3 encoders add a little padding; the windows still start every 5 s.
    assert [r["start_s"] for r in rows] == [0.0, 5.0, 10.0]


@pytest.mark.slow
def test_text_output_one_line_per_window(tmp_path: Path) -> None:
    long = write_wav(tmp_path / "long25.wav", 25.0)
    noise = write_wav(tmp_path / "noise12.wav", 12.0)
    done = run_caption(tmp_path, "--window-s", "10", "--hop-s", "10", str(long), str(noise))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    spans = [(line.split()[0], line.split()[1]) for line in lines]
    assert spans == [("long25.wav", "0.0-10.0"), ("long25.wav", "10.0-20.0"),
                     ("long25.wav", "20.0-30.0"), ("noise12.wav", "0.0-10.0"),
                     ("noise12.wav", "10.0-20.0")]
    for line in lines:
        assert line.split()[2] == "score"
        float(line.split()[3])
        assert line.split()[4].endswith("s")


def test_only_missing_files_fail_before_loading_a_model(tmp_path: Path) -> None:
    done = run_caption(tmp_path, str(tmp_path / "a.wav"), str(tmp_path / "b.flac"))
    assert done.returncode == 1
    assert errors(done.stderr) == [f"{tmp_path / 'a.wav'}: no such file",
                                   f"{tmp_path / 'b.flac'}: no such file"]
    assert "random weights" not in done.stderr  # no model was built


def test_unreadable_inputs_are_reported_before_loading_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    corrupt = write_corrupt(tmp_path / "corrupt.wav")
    done = run_caption(tmp_path, str(folder), str(corrupt), str(tmp_path / "gone.mp3"))
    assert done.returncode == 2  # a directory is no file: a usage error
    problems = errors(done.stderr)
    assert len(problems) == 3
    assert str(folder) in problems[0] and "is a directory" in problems[0]
    assert str(corrupt) in problems[1]
    assert "random weights" not in done.stderr  # no model was built


@pytest.mark.slow
def test_nonfinite_short_and_truncated_files_are_captioned_with_warnings(
        tmp_path: Path) -> None:
    audio = noise_and_tone(1.0)
    audio[-100:] = np.nan
    audio[-7] = np.inf
    nan_wav = tmp_path / "nan.wav"
    sf.write(nan_wav, audio, RATE, subtype="FLOAT")
    one = tmp_path / "one.wav"
    sf.write(one, np.array([0.25], dtype=np.float32), RATE, subtype="FLOAT")
    whole = write_wav(tmp_path / "whole.wav", 3.0)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 3])
    done = run_caption(tmp_path, "--json", str(nan_wav), str(one), str(cut))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(nan_wav), str(one), str(cut)]
    assert all(r["text"] for r in rows)
    stderr = done.stderr
    nan_lines = [line for line in stderr.splitlines() if "NaN" in line]
    assert len(nan_lines) == 1 and str(nan_wav) in nan_lines[0]
    warnings = [line for line in stderr.splitlines() if line.startswith("streamcap: warning: ")]
    assert any(str(one) in w and "6.25e-05 s" in w for w in warnings)
    assert any(str(cut) in w and "shorter than the 10 s window" in w for w in warnings)
    [truncated] = [json.loads(line) for line in stderr.splitlines() if "truncated" in line]
    assert str(cut) in truncated["source"] and truncated["announced_s"] == 3.0
    assert truncated["holds_s"] < 3.0


def test_bad_window_is_a_usage_error(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "x.wav", 1.0)
    done = run_caption(tmp_path, "--window-s", "10.0005", str(path))
    assert done.returncode == 2
    assert errors(done.stderr) == [
        "--window-s: must be a whole number of milliseconds (got 10.0005)"]


# --------------------------------------------------------------------------- streaming, hostile input


def test_file_windows_stream_with_memory_bounded_by_a_few_windows(tmp_path: Path) -> None:
    """20 minutes of 8 kHz audio (38 MB as float32) are windowed holding a few windows."""
    rate, minutes = 8000, 20
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as out:
        chunk = (0.1 * np.random.default_rng(0).standard_normal(60 * rate)).astype(np.float32)
        for _ in range(minutes):
            out.write(chunk)
    decoded_bytes = minutes * 60 * rate * 4
    tracemalloc.start()
    try:
        count = 0
        for window in file_windows(path, 10.0, 5.0, (rate,)):
            count += 1
            del window
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == minutes * 12
    assert peak < decoded_bytes / 8, f"peak {peak / 1e6:.1f} MB"


def test_first_window_comes_before_the_file_is_read_to_its_end(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "long.wav", 60.0)
    windows = stream_windows(path, 10.0, 10.0, (RATE,))
    stream = iterate(windows)
    first = next(stream)
    assert isinstance(first, Window) and first.seq == 0
    # the source is suspended inside the file: its frame is still running, not finished
    assert windows.ag_frame is not None
    stream.close()  # closes the generator and the file


def test_file_named_like_a_uri_query_is_read_as_a_file(tmp_path: Path, ffmpeg: str) -> None:
    write_wav(tmp_path / "x.wav", 1.0)
    odd = write_wav(tmp_path / "odd.wav", 3.0).rename(tmp_path / "x.wav?loop=true")
    # x.wav?loop=true itself (3 s, one window), not x.wav looped forever
    windows = list(itertools.islice(file_windows(odd, 10.0, 10.0, (RATE,)), 3))
    assert len(windows) == 1
    assert np.count_nonzero(windows[0].samples(RATE)) > 2 * RATE


def test_check_files_refuses_fifos_devices_and_links_to_them_unopened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    link = tmp_path / "link.wav"
    link.symlink_to(fifo)
    good = write_wav(tmp_path / "good.wav", 1.0)
    found = check_files([fifo, Path("/dev/zero"), link, good])  # would block on the FIFO
    assert found.good == [good]
    assert found.refused == [
        f"{fifo} is a FIFO, not a regular file; expected an audio file",
        "/dev/zero is a character device, not a regular file; expected an audio file",
        (f"{link} is a link to a FIFO ({fifo}), not a regular file; "
        "expected an audio file"),
    ]
