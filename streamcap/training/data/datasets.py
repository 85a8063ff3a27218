"""Converters from the public layouts of caption datasets to manifest rows.

Nothing here downloads; users fetch the datasets and point these functions
at their directories:

- **Clotho** (v2.1): ``clotho_captions_<split>.csv`` (``file_name``,
  ``caption_1`` .. ``caption_5``) next to per-split audio directories
  (``<split>/``, ``clotho_audio_<split>/`` or ``clotho_audio_files/<split>/``);
  optional ``clotho_metadata_<split>.csv`` gives each file's Freesound
  ``sound_id`` for the exclusion list. development -> train,
  validation -> val, evaluation -> test.
- **AudioCaps**: ``train.csv``/``val.csv``/``test.csv`` (``audiocap_id``,
  ``youtube_id``, ``start_time``, ``caption``; several rows per clip) and a
  directory of clips named by youtube id, ``Y``-prefixed id,
  ``<youtube_id>_<start_time>`` or audiocap id (flat or in split folders).
- **WavCaps**: one JSON file per source (``{"data": [{"id", "caption",
  "duration", ...}]}``) with audio ``<id>.flac`` in a directory; the
  report's filters keep clips of 1-30 s and drop excluded Freesound ids.
- **Clotho-ChatGPT-Mixup**: ``{"dataset": [{"selected_pair": [a, b],
  "audio_files": [fa, fb], "chatgpt_mixups": [...]}]}`` plus an optional
  rejection list ``[{"idx": [i, j]}]``; :func:`mix_clotho_pairs` writes the
  mixed audio the rows point at.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile as sf

from streamcap.errors import ConfigError, SourceError
from streamcap.training.data.audio_io import audio_duration_s, load_audio
from streamcap.training.data.manifest import ManifestRow

CLOTHO_SPLITS: Final[Mapping[str, str]] = {
    "development": "train", "validation": "val", "evaluation": "test"}
AUDIOCAPS_SPLITS: Final[Mapping[str, str]] = {"train": "train", "val": "val", "test": "test"}
AUDIO_SUFFIXES: Final = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus")


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversion:
    """Rows produced by a converter and how many clips were left out, by reason."""

    rows: list[ManifestRow]
    skipped: Mapping[str, int] = field(default_factory=dict)


def read_id_list(path: Path) -> frozenset[str]:
    """Freesound ids, one per line (blank lines, ``#`` comments and a header line allowed).

    Raises:
        ConfigError: the file cannot be read or a line is not an integer id
            (the message names the line).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read id list ({exc.strerror or exc})") from exc
    ids: set[str] = set()
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        value = line.split("#", 1)[0].strip().split(",", 1)[0].strip()
        if not value:
            continue
        if not value.isdigit():
            if not ids and not problems and number == 1:
                continue  # a header such as "id" or "sound_id"
            problems.append(f"{path.name} line {number}: expected a Freesound id (an integer), "
                            f"got {value!r}")
            continue
        ids.add(str(int(value)))
    if problems:
        raise ConfigError(problems[:50])
    return frozenset(ids)


def _read_csv(path: Path, needed: Iterable[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in needed if c not in header]
            if missing:
                raise ConfigError(f"{path}: missing column(s) {', '.join(missing)} "
                                  f"(found {', '.join(header) or 'none'})")
            return list(reader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _duration(path: Path) -> float | None:
    try:
        return audio_duration_s(path)
    except SourceError:
        return None


def _row(audio: Path | None, captions: tuple[str, ...], skipped: Counter[str], *,
         split: str, source: str, clip_id: str) -> ManifestRow | None:
    """The manifest row of one clip, or None (counted in ``skipped``) without audio or captions."""
    duration = _duration(audio) if audio is not None else None
    if audio is None or duration is None:
        skipped["missing audio"] += 1
        return None
    if not captions:
        skipped["no caption"] += 1
        return None
    return ManifestRow(audio=audio, captions=captions, split=split, source=source,
                       duration_s=duration, clip_id=clip_id)


def _first_existing(candidates: Iterable[Path]) -> Path | None:
    for path in candidates:
        if path.is_file():
            return path
    return None


def from_clotho(root: Path, *, audio_root: Path | None = None,
                splits: Mapping[str, str] = CLOTHO_SPLITS,
                exclude_ids: frozenset[str] = frozenset()) -> Conversion:
    """Rows of every Clotho split found under ``root``.

    Args:
        root: Directory holding ``clotho_captions_<split>.csv``.
        audio_root: Where the per-split audio directories are (default ``root``).
        splits: Clotho split name -> manifest split; splits without a CSV are skipped.
        exclude_ids: Freesound ids to leave out (needs ``clotho_metadata_<split>.csv``).

    Raises:
        ConfigError: no caption CSV found, or a CSV lacks its columns.
    """
    audio_root = audio_root or root
    rows: list[ManifestRow] = []
    skipped: Counter[str] = Counter()
    found = False
    for name, split in splits.items():
        csv_path = root / f"clotho_captions_{name}.csv"
        if not csv_path.is_file():
            continue
        found = True
        dirs = [audio_root / name, audio_root / f"clotho_audio_{name}",
                audio_root / "clotho_audio_files" / name]
        sound_ids: dict[str, str] = {}
        meta = root / f"clotho_metadata_{name}.csv"
        if exclude_ids and meta.is_file():
            for m in _read_csv(meta, ("file_name", "sound_id")):
                sound_ids[m["file_name"]] = m["sound_id"].strip()
        for rec in _read_csv(csv_path, ("file_name", "caption_1")):
            file_name = rec["file_name"]
            if sound_ids.get(file_name) in exclude_ids:
                skipped["excluded id"] += 1
                continue
            captions = tuple(v.strip() for k, v in sorted(rec.items())
                             if k.startswith("caption_") and v and v.strip())
            audio = _first_existing(d / file_name for d in dirs)
            row = _row(audio, captions, skipped, split=split, source="clotho",
                       clip_id=f"clotho/{name}/{file_name}")
            if row is not None:
                rows.append(row)
    if not found:
        raise ConfigError(f"{root}: no clotho_captions_<split>.csv found (expected one of "
                          f"{', '.join(f'clotho_captions_{n}.csv' for n in splits)})")
    return Conversion(rows=rows, skipped=dict(skipped))


def from_audiocaps(csv_dir: Path, audio_dir: Path, *,
                   splits: Mapping[str, str] = AUDIOCAPS_SPLITS) -> Conversion:
    """Rows of the AudioCaps splits whose CSVs are in ``csv_dir``.

    Captions of one clip (same youtube id and start time) are grouped into one row.

    Raises:
        ConfigError: no split CSV found, or a CSV lacks its columns.
    """
    rows: list[ManifestRow] = []
    skipped: Counter[str] = Counter()
    found = False
    columns = ("audiocap_id", "youtube_id", "start_time", "caption")
    for name, split in splits.items():
        csv_path = csv_dir / f"{name}.csv"
        if not csv_path.is_file():
            continue
        found = True
        clips: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
        for rec in _read_csv(csv_path, columns):
            clips[(rec["youtube_id"].strip(), rec["start_time"].strip())].append(rec)
        for (ytid, start), recs in clips.items():
            captions = tuple(r["caption"].strip() for r in recs if r["caption"].strip())
            stems = [ytid, f"Y{ytid}", f"{ytid}_{start}", f"{ytid}_{int(float(start or 0))}",
                     *(r["audiocap_id"].strip() for r in recs)]
            audio = _first_existing(d / f"{s}{suffix}" for d in (audio_dir / name, audio_dir)
                                    for s in stems for suffix in AUDIO_SUFFIXES)
            row = _row(audio, captions, skipped, split=split, source="audiocaps",
                       clip_id=f"audiocaps/{ytid}_{start}")
            if row is not None:
                rows.append(row)
    if not found:
        raise ConfigError(f"{csv_dir}: no AudioCaps CSV found (expected "
                          f"{', '.join(f'{n}.csv' for n in splits)})")
    return Conversion(rows=rows, skipped=dict(skipped))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from exc


def from_wavcaps(json_path: Path, audio_dir: Path, *, source: str, split: str = "train",
                 min_s: float = 1.0, max_s: float = 30.0,
                 exclude_ids: frozenset[str] = frozenset()) -> Conversion:
    """Rows of one WavCaps source (the report's filters applied).

    Args:
        json_path: The source's metadata (``{"data": [...]}`` or a bare list).
        audio_dir: Directory of ``<id>.flac`` (or ``<id>`` itself, or other suffixes).
        source: Short source name (``freesound``, ``bbc``, ``soundbible``,
            ``audioset``); rows get source ``wavcaps-<source>``.
        split: Manifest split of every row.
        min_s: Shortest clip kept (seconds, inclusive).
        max_s: Longest clip kept (seconds, inclusive).
        exclude_ids: Freesound ids to drop; applied when ``source`` is Freesound.

    Raises:
        ConfigError: the JSON cannot be read or has no entry list.
    """
    data = _load_json(json_path)
    entries = data.get("data") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError(f"{json_path}: expected {{\"data\": [...]}} or a list of entries")
    rows: list[ManifestRow] = []
    skipped: Counter[str] = Counter()
    is_freesound = "freesound" in source.lower()
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise ConfigError(f"{json_path}: data[{i}] is not an object with an 'id'")
        clip = str(entry["id"]).strip()
        caption = str(entry.get("caption") or "").strip()
        if not caption:
            skipped["no caption"] += 1
            continue
        if is_freesound and clip in exclude_ids:
            skipped["excluded id"] += 1
            continue
        if clip in seen:
            skipped["duplicate id"] += 1
            continue
        stem = clip.rsplit(".", 1)[0] if clip.lower().endswith(AUDIO_SUFFIXES) else clip
        audio = _first_existing([audio_dir / clip,
                                 *(audio_dir / f"{stem}{s}" for s in AUDIO_SUFFIXES)])
        if audio is None:
            skipped["missing audio"] += 1
            continue
        listed = entry.get("duration")
        duration = float(listed) if isinstance(listed, int | float) else _duration(audio)
        if duration is None:
            skipped["missing audio"] += 1
            continue
        if not min_s <= duration <= max_s:
            skipped["duration out of range"] += 1
            continue
        seen.add(clip)
        rows.append(ManifestRow(audio=audio, captions=(caption,), split=split,
                                source=f"wavcaps-{source}", duration_s=duration,
                                clip_id=f"wavcaps-{source}/{stem}"))
    return Conversion(rows=rows, skipped=dict(skipped))


def _mixup_entries(json_path: Path, rejected_json: Path | None
                   ) -> list[tuple[str, str, str, str, list[str]]]:
    data = _load_json(json_path)
    entries = data.get("dataset") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{json_path}: expected {{\"dataset\": [...]}}")
    rejected: set[tuple[int, int]] = set()
    if rejected_json is not None:
        for rej in _load_json(rejected_json):
            idx = rej.get("idx") if isinstance(rej, dict) else None
            if isinstance(idx, list) and len(idx) == 2:
                rejected.add((int(idx[0]), int(idx[1])))
    out: list[tuple[str, str, str, str, list[str]]] = []
    for i, entry in enumerate(entries):
        try:
            a, b = (str(x) for x in entry["selected_pair"])
            fa, fb = (str(x) for x in entry["audio_files"])
            mixups = [str(c).strip() for j, c in enumerate(entry["chatgpt_mixups"])
                      if (i, j) not in rejected and str(c).strip()]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{json_path}: dataset[{i}] lacks selected_pair, audio_files "
                              f"(two each) or chatgpt_mixups") from None
        out.append((a, b, fa, fb, mixups))
    return out


def from_clotho_mixup(json_path: Path, mixed_dir: Path, *, rejected_json: Path | None = None,
                      split: str = "train") -> Conversion:
    """Rows of Clotho-ChatGPT-Mixup whose mixture ``<a>_<b>.wav`` exists in ``mixed_dir``."""
    rows: list[ManifestRow] = []
    skipped: Counter[str] = Counter()
    for a, b, _, _, captions in _mixup_entries(json_path, rejected_json):
        if not captions:
            skipped["no caption"] += 1
            continue
        audio = mixed_dir / f"{a}_{b}.wav"
        duration = _duration(audio) if audio.is_file() else None
        if duration is None:
            skipped["missing audio"] += 1
            continue
        rows.append(ManifestRow(audio=audio, captions=tuple(captions), split=split,
                                source="clotho-mixup", duration_s=duration,
                                clip_id=f"clotho-mixup/{a}_{b}"))
    return Conversion(rows=rows, skipped=dict(skipped))


def mix_clotho_pairs(json_path: Path, clotho_audio_dir: Path, mixed_dir: Path, *,
                     seed: int = 0, sample_rate_hz: int = 44100) -> int:
    """Write the mixture ``<a>_<b>.wav`` of every pair (existing files are kept).

    The shorter clip is added to the longer at a random offset with an energy
    ratio drawn uniformly in [-5, 5] dB; the result is peak-limited to 0.99.
    The draw of pair ``i`` depends only on ``seed`` and ``i``.

    Returns:
        How many mixtures were written.
    """
    mixed_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, (a, b, fa, fb, _) in enumerate(_mixup_entries(json_path, None)):
        out = mixed_dir / f"{a}_{b}.wav"
        if out.is_file():
            continue
        try:
            xa = load_audio(clotho_audio_dir / fa, sample_rate_hz)
            xb = load_audio(clotho_audio_dir / fb, sample_rate_hz)
        except SourceError:
            continue
        rng = np.random.default_rng([seed, i])
        ratio_db = rng.uniform(-5.0, 5.0)
        ea = float(np.mean(xa**2)) + 1e-12
        eb = float(np.mean(xb**2)) + 1e-12
        xb = xb * np.float32(np.sqrt(ea / (eb * 10 ** (ratio_db / 10))))
        long, short = (xa, xb) if len(xa) >= len(xb) else (xb, xa)
        start = int(rng.integers(0, len(long) - len(short) + 1))
        mix = long.copy()
        mix[start:start + len(short)] += short
        peak = float(np.max(np.abs(mix)))
        if peak > 0.99:
            mix *= np.float32(0.99 / peak)
        tmp = out.with_suffix(".part.wav")
        sf.write(str(tmp), mix, sample_rate_hz, subtype="PCM_16")
        tmp.replace(out)
        written += 1
    return written
