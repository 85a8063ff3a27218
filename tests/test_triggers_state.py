"""The trigger path's files: learned history (written atomically) and calibrated thresholds."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

import streamcap.triggers.state as state_module
from streamcap.triggers.spec import TriggerSpec
from streamcap.triggers.state import (
    fingerprint,
    read_calibrated,
    read_histories,
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


def test_calibrated_thresholds_apply_to_their_model_only(tmp_path: Path) -> None:
    assert read_calibrated(tmp_path, "m1") == {}
    (tmp_path / "calibrated.json").write_text(json.dumps({
        "siren": {"threshold": 0.42, "model": "m1"},
        "dog": {"threshold": 0.3, "model": "m2"},
        "odd": {"threshold": "high", "model": "m1"},
        "bool": {"threshold": True, "model": "m1"}}))
    assert read_calibrated(tmp_path, "m1") == {"siren": 0.42}
    (tmp_path / "calibrated.json").write_text("[1, 2]")
    assert read_calibrated(tmp_path, "m1") == {}


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
    both_open = threading.Barrier(2, timeout=30)
    real_dump = json.dump

    def dump(obj: Any, fh: Any, **kw: Any) -> None:
        both_open.wait()  # each write has opened its temporary file before either writes
        real_dump(obj, fh, **kw)

    monkeypatch.setattr(state_module.json, "dump", dump)
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
