"""The trigger path's files: learned history (written atomically) and calibrated thresholds."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import streamcap.atomic as atomic_module
from streamcap.errors import ConfigError, StreamcapError
from streamcap.triggers.scoring import SweepRow
from streamcap.triggers.spec import TriggerSpec
from streamcap.triggers.state import (
    calibrated_path,
    calibration_entry,
    fingerprint,
    merged,
    read_calibrated,
    read_calibrated_records,
    read_histories,
    write_calibrated,
    write_histories,
)


def test_histories_round_trip_and_leave_no_temporary_file(tmp_path: Path) -> None:
    directory = tmp_path / "triggers"
    write_histories(directory, {"street": {"siren": ("fp1", (0.1, 0.25))}})
    assert read_histories(directory) == {"street": {"siren": ("fp1", (0.1, 0.25))}}
    assert sorted(p.name for p in directory.iterdir()) == ["auto.json"]


def test_a_missing_or_broken_history_starts_cold(tmp_path: Path) -> None:
    assert read_histories(tmp_path) == {}
    (tmp_path / "auto.json").write_text("{not json")
    assert read_histories(tmp_path) == {}
    (tmp_path / "auto.json").write_text(json.dumps({"version": 1, "histories": {
        "s": {"ok": {"fingerprint": "f", "history": [0.1, "x", None, 1e999, True]},
              "bad": {"history": [0.2]}}}}))
    assert read_histories(tmp_path) == {"s": {"ok": ("f", (0.1,))}}


FPS = {"siren": "f-siren", "dog": "f-dog", "odd": "f-odd", "bool": "f-bool"}


def test_calibrated_thresholds_apply_to_their_model_only(tmp_path: Path) -> None:
    assert read_calibrated(tmp_path, "m1", FPS) == {}
    (tmp_path / "calibrated.json").write_text(json.dumps({
        "siren": {"threshold": 0.42, "model": "m1", "fingerprint": "f-siren"},
        "dog": {"threshold": 0.3, "model": "m2", "fingerprint": "f-dog"},
        "odd": {"threshold": "high", "model": "m1", "fingerprint": "f-odd"},
        "bool": {"threshold": True, "model": "m1", "fingerprint": "f-bool"}}))
    assert read_calibrated(tmp_path, "m1", FPS) == {"siren": 0.42}
    (tmp_path / "calibrated.json").write_text("[1, 2]")
    assert read_calibrated(tmp_path, "m1", FPS) == {}


def test_a_calibrated_threshold_does_not_outlive_new_phrasings(tmp_path: Path) -> None:
    old = TriggerSpec(name="siren", text=("a siren",))
    new = TriggerSpec(name="siren", text=("an ambulance",))
    (tmp_path / "calibrated.json").write_text(json.dumps({"siren": {
        "threshold": 0.42, "model": "m1", "fingerprint": fingerprint(old, "m1")}}))
    assert read_calibrated(tmp_path, "m1", {"siren": fingerprint(old, "m1")}) == {"siren": 0.42}
    assert read_calibrated(tmp_path, "m1", {"siren": fingerprint(new, "m1")}) == {}
    assert read_calibrated(tmp_path, "m1", {}) == {}


def test_the_fingerprint_follows_the_words_and_the_model_not_the_timing() -> None:
    a = TriggerSpec(name="siren", text=("a siren",))
    assert fingerprint(a, "m") == fingerprint(TriggerSpec(name="siren", text=("a siren",),
                                                          min_hits=1), "m")
    assert fingerprint(a, "m") != fingerprint(a, "m2")
    assert fingerprint(a, "m") != fingerprint(TriggerSpec(name="siren", text=("a siren",),
                                                          negative=("a horn",)), "m")


def test_two_writes_at_once_never_share_a_temporary_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "triggers"
    both_written = threading.Barrier(2, timeout=30)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        both_written.wait()  # each write has written its temporary file before either renames
        real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", replace)
    failures: list[BaseException] = []

    def write(fp: str) -> None:
        try:
            write_histories(directory, {"s": {"siren": (fp, (0.1,))}})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(fp,)) for fp in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.undo()
    assert failures == []
    assert read_histories(directory)["s"]["siren"][0] in {"one", "two"}
    assert sorted(p.name for p in directory.iterdir()) == ["auto.json"]
def test_calibrated_json_is_merged_and_written_whole(tmp_path: Path) -> None:
    path = calibrated_path(tmp_path)
    assert path == tmp_path / "triggers" / "calibrated.json"
    assert read_calibrated_records(path) == {}
    entry = calibration_entry(SweepRow(0.42, tp=3, fp=1, fn=1, tn=5), model="m1",
                              spec_fingerprint="f-siren",
                              now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert entry == {"threshold": 0.42, "model": "m1", "fingerprint": "f-siren", "f1": 0.75,
                     "positives": 4, "negatives": 6,
                     "calibrated_at": "2026-01-02T03:04:05+00:00"}
    write_calibrated(path, merged({"dog": {"threshold": 0.1}}, "siren", entry))
    write_calibrated(path, merged(read_calibrated_records(path), "siren",
                                  {**entry, "threshold": 0.5}))
    data = read_calibrated_records(path)
    assert data["dog"] == {"threshold": 0.1} and data["siren"]["threshold"] == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["calibrated.json"]  # no temp left
    # what the writer wrote is what the daemon's reader takes, for its model only
    assert read_calibrated(path.parent, "m1", FPS) == {"siren": 0.5}
    assert read_calibrated(path.parent, "m2", FPS) == {}


def test_a_broken_calibrated_json_is_named_for_the_command_and_ignored_by_the_daemon(
        tmp_path: Path) -> None:
    path = tmp_path / "calibrated.json"
    path.write_text("{not json", "utf-8")
    with pytest.raises(ConfigError, match=r"calibrated.json: not valid JSON \(line 1"):
        read_calibrated_records(path)
    assert read_calibrated(tmp_path, "m1", FPS) == {}
    path.write_text("[1, 2]", "utf-8")
    with pytest.raises(ConfigError, match="expected a JSON object of triggers, got list"):
        read_calibrated_records(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_calibrated_json_is_one_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StreamcapError, match="cannot write calibrated thresholds"):
            write_calibrated(folder / "calibrated.json", {})
    finally:
        folder.chmod(0o700)
