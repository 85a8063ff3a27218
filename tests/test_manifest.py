"""Manifests (validation with row numbers) and the public dataset converters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamcap.errors import ConfigError
from streamcap.training.data.datasets import (
    from_audiocaps,
    from_clotho,
    from_clotho_mixup,
    from_wavcaps,
    mix_clotho_pairs,
    read_id_list,
)
from streamcap.training.data.manifest import ManifestRow, read_manifest, split_rows, write_manifest


def _wav(path: Path, seconds: float, rate: int = 16000, value: float = 0.1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.full(int(seconds * rate), value, dtype=np.float32), rate)
    return path


def _row(tmp_path: Path, clip: str, **kw: object) -> ManifestRow:
    args: dict[str, object] = {"audio": _wav(tmp_path / "audio" / f"{clip}.wav", 1.0),
                                   "captions": ("a dog barks",), "split": "train", "source": "test",
                                   "duration_s": 1.0, "clip_id": clip}
    args.update(kw)
    return ManifestRow(**args)  # type: ignore[arg-type]


def test_round_trip_with_relative_paths(tmp_path: Path) -> None:
    rows = [_row(tmp_path, "a"), _row(tmp_path, "b", split="test", captions=("x", "y"))]
    path = write_manifest(rows, tmp_path / "manifest.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["audio"] == "audio/a.wav"
    assert read_manifest(path) == [r for r in rows]
    assert [r.clip_id for r in split_rows(rows, "test")] == ["b"]


def test_every_problem_is_reported_with_its_row_number(tmp_path: Path) -> None:
    good = {"clip_id": "ok", "audio": str(_wav(tmp_path / "ok.wav", 1.0)),
            "captions": ["fine"], "split": "train", "source": "s", "duration_s": 1.0}
    lines = [
        json.dumps(good),
        json.dumps({**good, "clip_id": "m", "audio": "nope.wav"}),
        "",
        json.dumps({**good, "clip_id": "e", "captions": ["one", "two", " "]}),
        json.dumps({**good, "clip_id": "d", "duration_s": -3}),
        json.dumps({**good, "clip_id": "s", "split": "dev"}),
        json.dumps({**good}),
        "{not json",
        json.dumps({k: v for k, v in good.items() if k != "source"} | {"clip_id": "z"}),
        json.dumps({**good, "clip_id": "n", "duration_s": float("nan")}),
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        read_manifest(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "manifest.jsonl row 2: audio file" in text and "does not exist" in text
    assert "manifest.jsonl row 4: captions[2] is empty" in text
    assert "manifest.jsonl row 5: bad duration_s -3" in text
    assert "manifest.jsonl row 6: unknown split 'dev'" in text
    assert "manifest.jsonl row 7: duplicate clip_id 'ok' (first on row 1)" in text
    assert "manifest.jsonl row 8: invalid JSON" in text
    assert "manifest.jsonl row 9: missing field(s) source" in text
    assert "manifest.jsonl row 10: bad duration_s nan" in text
    assert len(problems) == 8


def test_unreadable_or_empty_manifest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read manifest"):
        read_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no rows"):
        read_manifest(tmp_path / "empty.jsonl")


def test_write_refuses_invalid_rows(tmp_path: Path) -> None:
    rows = [_row(tmp_path, "a", captions=("",)), _row(tmp_path, "a")]
    with pytest.raises(ConfigError) as info:
        write_manifest(rows, tmp_path / "m.jsonl")
    assert "m.jsonl row 1: captions[0] is empty" in info.value.problems
    assert "m.jsonl row 2: duplicate clip_id 'a'" in info.value.problems
    assert not (tmp_path / "m.jsonl").exists()


def test_from_clotho_with_exclusions(tmp_path: Path) -> None:
    (tmp_path / "clotho_captions_development.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        "a.wav,one,two,three,four,five\nb.wav,x,y,z,w,v\nmissing.wav,p,q,r,s,t\n")
    (tmp_path / "clotho_metadata_development.csv").write_text(
        "file_name,keywords,sound_id\na.wav,k,111\nb.wav,k,222\nmissing.wav,k,333\n")
    (tmp_path / "clotho_captions_evaluation.csv").write_text(
        "file_name,caption_1,caption_2\nc.wav,c one,c two\n")
    _wav(tmp_path / "development" / "a.wav", 15.0)
    _wav(tmp_path / "development" / "b.wav", 20.0)
    _wav(tmp_path / "clotho_audio_evaluation" / "c.wav", 16.0)
    out = from_clotho(tmp_path, exclude_ids=frozenset({"222"}))
    assert [(r.clip_id, r.split) for r in out.rows] == [
        ("clotho/development/a.wav", "train"), ("clotho/evaluation/c.wav", "test")]
    assert out.rows[0].captions == ("one", "two", "three", "four", "five")
    assert out.rows[0].duration_s == pytest.approx(15.0)
    assert out.skipped == {"excluded id": 1, "missing audio": 1}
    with pytest.raises(ConfigError, match="clotho_captions"):
        from_clotho(tmp_path / "nothing")


def test_from_audiocaps_groups_captions_per_clip(tmp_path: Path) -> None:
    (tmp_path / "val.csv").write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,abc,30,A dog barks\n2,abc,30,Dog barking\n3,zzz,0,Rain\n")
    _wav(tmp_path / "audio" / "Yabc.wav", 10.0)
    out = from_audiocaps(tmp_path, tmp_path / "audio")
    assert len(out.rows) == 1
    row = out.rows[0]
    assert (row.clip_id, row.split, row.captions) == ("audiocaps/abc_30", "val",
                                                      ("A dog barks", "Dog barking"))
    assert out.skipped == {"missing audio": 1}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.csv").write_text("youtube_id,caption\nx,y\n")
    with pytest.raises(ConfigError, match="missing column"):
        from_audiocaps(tmp_path / "bad", tmp_path)


def test_from_wavcaps_filters_duration_and_excluded_ids(tmp_path: Path) -> None:
    data = {"data": [
        {"id": "1", "caption": "short", "duration": 0.5},
        {"id": "2", "caption": "ok", "duration": 12.0},
        {"id": "3", "caption": "long", "duration": 45.0},
        {"id": "4", "caption": "excluded", "duration": 5.0},
        {"id": "5", "caption": "no file", "duration": 5.0},
        {"id": "6", "caption": "", "duration": 5.0},
    ]}
    (tmp_path / "fsd.json").write_text(json.dumps(data))
    for clip in "1234":
        _wav(tmp_path / "flac" / f"{clip}.flac", 1.0)
    ids = tmp_path / "forbidden.txt"
    ids.write_text("sound_id\n4\n\n# comment\n")
    assert read_id_list(ids) == frozenset({"4"})
    out = from_wavcaps(tmp_path / "fsd.json", tmp_path / "flac", source="freesound",
                       exclude_ids=read_id_list(ids))
    assert [(r.clip_id, r.source, r.duration_s) for r in out.rows] == [
        ("wavcaps-freesound/2", "wavcaps-freesound", 12.0)]
    assert out.skipped == {"duration out of range": 2, "excluded id": 1, "missing audio": 1,
                           "no caption": 1}
    ids.write_text("1\nabc\n")
    with pytest.raises(ConfigError, match="forbidden.txt line 2"):
        read_id_list(ids)


def test_clotho_mixup_mixes_and_converts(tmp_path: Path) -> None:
    _wav(tmp_path / "dev" / "a.wav", 2.0, rate=8000, value=0.2)
    _wav(tmp_path / "dev" / "b.wav", 1.0, rate=8000, value=0.1)
    meta = {"dataset": [{"selected_pair": [3, 7], "audio_files": ["a.wav", "b.wav"],
                         "chatgpt_mixups": ["a and b", "b over a", "rejected"]}]}
    (tmp_path / "mix.json").write_text(json.dumps(meta))
    (tmp_path / "err.json").write_text(json.dumps([{"idx": [0, 2]}]))
    assert mix_clotho_pairs(tmp_path / "mix.json", tmp_path / "dev", tmp_path / "mixed",
                            sample_rate_hz=8000) == 1
    mixed, rate = sf.read(str(tmp_path / "mixed" / "3_7.wav"))
    assert rate == 8000 and len(mixed) == 16000
    assert mix_clotho_pairs(tmp_path / "mix.json", tmp_path / "dev", tmp_path / "mixed",
                            sample_rate_hz=8000) == 0
    out = from_clotho_mixup(tmp_path / "mix.json", tmp_path / "mixed",
                            rejected_json=tmp_path / "err.json")
    assert [(r.clip_id, r.captions) for r in out.rows] == [
        ("clotho-mixup/3_7", ("a and b", "b over a"))]
    assert out.rows[0].duration_s == pytest.approx(2.0)
