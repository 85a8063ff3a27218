"""Training manifests: one JSON object per line naming a clip, its captions and its split.

A manifest row is::

    {"clip_id": "clotho/dog.wav", "audio": "audio/dog.wav", "captions": ["a dog barks"],
     "split": "train", "source": "clotho", "duration_s": 21.3}

``audio`` may be absolute or relative to the manifest's directory (written
relative when the file lies under it). :func:`read_manifest` validates every
row and reports every problem at once, each with its 1-based line number.

Converters from the public dataset layouts live in
:mod:`streamcap.training.data.datasets`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from streamcap.errors import ConfigError

SPLITS: Final = ("train", "val", "test")
"""The splits a manifest row may belong to."""

FIELDS: Final = ("clip_id", "audio", "captions", "split", "source", "duration_s")
"""The keys of every manifest object (all required; no others allowed)."""

_MAX_PROBLEMS = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestRow:
    """One clip of a training manifest.

    Attributes:
        audio: The audio file (absolute once read by :func:`read_manifest`).
        captions: One or more non-empty reference captions.
        split: One of :data:`SPLITS`.
        source: The dataset it comes from (``clotho``, ``audiocaps``, ``wavcaps-freesound`` ...).
        duration_s: Length of the audio in seconds (> 0).
        clip_id: Unique identifier within a manifest.
    """

    audio: Path
    captions: tuple[str, ...]
    split: str
    source: str
    duration_s: float
    clip_id: str

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        """The manifest object; ``audio`` relative to ``base`` when it lies under it."""
        audio = self.audio
        if base is not None:
            try:
                audio = self.audio.resolve().relative_to(base.resolve())
            except ValueError:
                audio = self.audio
        return {"clip_id": self.clip_id, "audio": audio.as_posix(),
                "captions": list(self.captions), "split": self.split, "source": self.source,
                "duration_s": self.duration_s}


def row_problems(obj: object, where: str, base: Path, *, check_files: bool) -> list[str]:
    """Every problem of one decoded manifest object, each prefixed by ``where``."""
    if not isinstance(obj, dict):
        return [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    problems: list[str] = []
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        problems.append(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)} "
                        f"(expected {', '.join(FIELDS)})")
    for key in ("clip_id", "source"):
        value = obj.get(key)
        if key in obj and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{where}: {key} must be a non-empty string, got {value!r}")
    if "split" in obj and obj["split"] not in SPLITS:
        problems.append(f"{where}: unknown split {obj['split']!r} (expected one of "
                        f"{', '.join(SPLITS)})")
    if "captions" in obj:
        captions = obj["captions"]
        if not isinstance(captions, list) or not captions:
            problems.append(f"{where}: captions must be a non-empty list of strings, "
                            f"got {captions!r}")
        else:
            for i, caption in enumerate(captions):
                if not isinstance(caption, str):
                    problems.append(f"{where}: captions[{i}] must be a string, got {caption!r}")
                elif not caption.strip():
                    problems.append(f"{where}: captions[{i}] is empty")
    if "duration_s" in obj:
        d = obj["duration_s"]
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d) or d <= 0:
            problems.append(f"{where}: bad duration_s {d!r} (expected a positive number of "
                            f"seconds)")
    if "audio" in obj:
        audio = obj["audio"]
        if not isinstance(audio, str) or not audio:
            problems.append(f"{where}: audio must be a non-empty path string, got {audio!r}")
        elif check_files:
            path = resolve_audio(audio, base)
            if not path.is_file():
                problems.append(f"{where}: audio file {path} does not exist")
    return problems


def resolve_audio(audio: str, base: Path) -> Path:
    """``audio`` as an absolute path (relative paths are relative to ``base``)."""
    path = Path(audio).expanduser()
    return path if path.is_absolute() else (base / path).absolute()


def _row_from(obj: Mapping[str, Any], base: Path) -> ManifestRow:
    return ManifestRow(audio=resolve_audio(obj["audio"], base),
                       captions=tuple(str(c).strip() for c in obj["captions"]),
                       split=str(obj["split"]), source=str(obj["source"]),
                       duration_s=float(obj["duration_s"]), clip_id=str(obj["clip_id"]))


def read_manifest(path: Path | str, *, check_files: bool = True) -> list[ManifestRow]:
    """Read and validate a JSON Lines manifest.

    Blank lines are skipped; line numbers count them.

    Args:
        path: The manifest file.
        check_files: Also require every ``audio`` file to exist.

    Returns:
        The rows in file order, audio paths absolute.

    Raises:
        ConfigError: the file cannot be read, or any row is invalid (missing
            file, empty caption, bad duration, unknown split, duplicate
            clip_id ...); ``problems`` lists them all as
            ``"<name> row <n>: <problem>"`` (up to 50, then a count).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read manifest ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: manifest is not UTF-8 text ({exc.reason})") from exc
    base = path.parent.absolute()
    rows: list[ManifestRow] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} row {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        found = row_problems(obj, where, base, check_files=check_files)
        if not found:
            clip_id = obj["clip_id"]
            if clip_id in seen:
                found.append(f"{where}: duplicate clip_id {clip_id!r} (first on row "
                             f"{seen[clip_id]})")
            else:
                seen[clip_id] = number
        if found:
            problems.extend(found)
            continue
        rows.append(_row_from(obj, base))
    if not problems and not rows:
        problems.append(f"{path}: manifest holds no rows")
    if problems:
        extra = len(problems) - _MAX_PROBLEMS
        shown = problems[:_MAX_PROBLEMS]
        if extra > 0:
            shown.append(f"{path.name}: ... and {extra} more problem(s)")
        raise ConfigError(shown)
    return rows


def write_manifest(rows: Iterable[ManifestRow], path: Path | str) -> Path:
    """Write ``rows`` as JSON Lines, atomically (a temporary file renamed over ``path``).

    Audio paths under the manifest's directory are written relative to it.

    Raises:
        ConfigError: a row is invalid (same checks as :func:`read_manifest`,
            files not checked) or two rows share a clip_id.
    """
    path = Path(path)
    base = path.parent.absolute()
    lines: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=1):
        obj = row.to_json(base)
        where = f"{path.name} row {i}"
        problems.extend(row_problems(obj, where, base, check_files=False))
        if row.clip_id in seen:
            problems.append(f"{where}: duplicate clip_id {row.clip_id!r}")
        seen.add(row.clip_id)
        lines.append(json.dumps(obj, ensure_ascii=False))
    if problems:
        raise ConfigError(problems[:_MAX_PROBLEMS])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def split_rows(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    """The rows of one split, in order.

    Raises:
        ConfigError: ``split`` is not one of :data:`SPLITS`.
    """
    if split not in SPLITS:
        raise ConfigError(f"split: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return [r for r in rows if r.split == split]
