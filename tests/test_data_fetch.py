"""``streamcap data fetch clotho`` against the stand-in host of ``test_fetch``.

A tiny Clotho in the published layout: three ``clotho_audio_<split>.7z`` archives (a
folder of a few WAV files each, made with py7zr), ``clotho_captions_<split>.csv`` and
``clotho_metadata_<split>.csv``, served under Zenodo's record path. Nothing here touches
the internet.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import py7zr
import pytest
import soundfile as sf
from test_fetch import Host, serving

from streamcap.cli import main
from streamcap.errors import ConfigError, ModelError, WeightsError
from streamcap.models.artefacts import CLOTHO, DATASETS, BundleRecipe
from streamcap.training.data.fetch import fetch_dataset, unsafe_members
from streamcap.training.data.manifest import read_manifest

CLIPS = {"development": 3, "validation": 2, "evaluation": 2}


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("clotho")
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for split, n in CLIPS.items():
        folder = tmp / split
        folder.mkdir()
        names = [f"{split} sound {i}.wav" for i in range(n)]  # Clotho names have spaces
        for name in names:
            sf.write(folder / name, (0.1 * rng.standard_normal(4410)).astype(np.float32),
                     44100, subtype="PCM_16")
        archive = tmp / f"clotho_audio_{split}.7z"
        with py7zr.SevenZipFile(archive, mode="w") as handle:
            handle.writeall(folder, arcname=split)
        files[archive.name] = archive.read_bytes()
        files[f"clotho_captions_{split}.csv"] = _csv(
            ["file_name", *(f"caption_{k}" for k in range(1, 6))],
            [[name, *(f"caption {k} of {name}" for k in range(1, 6))] for name in names])
        files[f"clotho_metadata_{split}.csv"] = _csv(
            ["file_name", "keywords", "sound_id", "sound_link", "start_end_samples",
             "manufacturer", "license"],
            [[name, "noise", str(100 + i), "", "", "x", "CC0"] for i, name in enumerate(names)])
    return files


def _local(item: BundleRecipe, host: Host, files: dict[str, bytes]) -> BundleRecipe:
    parts = {}
    for role, group in item.parts.items():
        changed = []
        for a in group:
            data = files[a.filename]
            path = urlsplit(a.repo).path
            host.serve(path, data)
            changed.append(dataclasses.replace(a, repo=host.url + path, size=len(data),
                                               md5=hashlib.md5(data).hexdigest()))
        parts[role] = tuple(changed)
    return dataclasses.replace(item, parts=parts, bundle_size=1_000_000)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, standins: dict[str, bytes]) -> Iterator[Host]:
    with serving(monkeypatch) as state:
        monkeypatch.setattr("streamcap.models.artefacts.DATASETS",
                            {**DATASETS, "clotho": _local(CLOTHO, state, standins)})
        yield state


def _patched() -> BundleRecipe:
    """The registry entry as the fixture patched it (served by the stand-in host)."""
    from streamcap.models import artefacts

    return artefacts.DATASETS["clotho"]


def test_fetch_extracts_and_writes_the_manifest(
        host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "fetch", "clotho", "--dir", str(tmp_path), "--accept-licences"])
    out = capsys.readouterr().out
    assert code == 0
    root = tmp_path / "clotho"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clotho"]  # no temp, no downloads
    assert not list(root.glob("*.7z"))  # archives deleted once extracted
    assert all(p.startswith("/records/4783391/files/clotho_") for p in host.files)
    rows = read_manifest(root / "manifest.jsonl")
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in by_split.items()} == {"train": 3, "val": 2, "test": 2}
    first = by_split["train"][0]
    assert first.audio == root / "development" / first.audio.name and first.audio.is_file()
    assert first.captions == tuple(f"caption {k} of {first.audio.name}" for k in range(1, 6))
    assert first.source == "clotho" and first.duration_s == pytest.approx(0.1)
    assert '"audio": "development/' in (root / "manifest.jsonl").read_text()  # relative
    assert "test 2, train 3, val 2 clips" in out and "train init" in out


def test_keep_archives_and_a_second_fetch(host: Host, tmp_path: Path) -> None:
    fetch_dataset(_patched(), directory=tmp_path, accept_licences=True,
                  keep_archives=True, say=lambda line: None)
    assert len(list((tmp_path / "clotho").glob("clotho_audio_*.7z"))) == 3
    with pytest.raises(ModelError, match="already holds"):
        fetch_dataset(_patched(), directory=tmp_path, accept_licences=True,
                      say=lambda line: None)


def test_wrong_md5_refused(host: Host, tmp_path: Path) -> None:
    item = _patched()
    audio = item.parts["audio"]
    bad = dataclasses.replace(item, parts={**item.parts, "audio": (
        dataclasses.replace(audio[0], md5="1" * 32), *audio[1:])})
    with pytest.raises(WeightsError, match=f"expected md5 {'1' * 32}"):
        fetch_dataset(bad, directory=tmp_path, accept_licences=True, say=lambda line: None)
    assert not (tmp_path / "clotho").exists()


def test_broken_archive_is_one_line_naming_it(
        host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    item = _patched()
    archive = item.parts["audio"][1]
    path = urlsplit(archive.repo).path
    host.files[path] = b"not a 7z archive at all"
    broken = dataclasses.replace(archive, size=len(host.files[path]),
                                 md5=hashlib.md5(host.files[path]).hexdigest())
    with pytest.raises(ConfigError, match="clotho_audio_validation.7z: cannot extract") as info:
        fetch_dataset(dataclasses.replace(item, parts={**item.parts, "audio": (
            item.parts["audio"][0], broken, item.parts["audio"][2])}),
            directory=tmp_path, accept_licences=True, say=lambda line: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "clotho").exists()  # nothing half-built


def test_unknown_data_set_and_unsafe_entries(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "fetch", "audiocaps", "--accept-licences"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clotho" in err[0] and "docs/data-fetch.md" in err[0]
    assert unsafe_members(["development/a.wav", "/etc/passwd", "x/../../y", "ok.wav"]) == [
        "/etc/passwd", "x/../../y"]


def test_the_registry_has_the_published_clotho_files() -> None:
    names = {a.filename: a for a in CLOTHO.artefacts}
    assert set(names) == {f"clotho_{kind}_{split}.{ext}" for split in CLIPS
                          for kind, ext in (("audio", "7z"), ("captions", "csv"),
                                            ("metadata", "csv"))}
    assert names["clotho_audio_development.7z"].md5 == "c8b05bc7acdb13895bb3c6a29608667e"
    assert all(a.url().startswith("https://zenodo.org/records/4783391/files/clotho_")
               and a.md5 is not None for a in CLOTHO.artefacts)
