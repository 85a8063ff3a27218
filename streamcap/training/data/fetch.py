"""``streamcap data fetch clotho``: download Clotho v2.1, extract it, write its manifest.

The files, their md5 sums and sizes are in :mod:`streamcap.models.artefacts`; the
download (resumable, checked, built in a temporary directory and renamed into place)
is :func:`streamcap.models.fetch.fetch_bundle`. This module adds what a data set needs
once its files are verified:

- the ``.7z`` audio archives are extracted with py7zr (a pure-Python 7-Zip reader
  installed with streamcap, so no system package is needed) into ``development/``,
  ``validation/`` and ``evaluation/``, then deleted (``--keep-archives`` keeps them);
  an archive entry with an absolute path or ``..`` is refused;
- ``manifest.jsonl`` is written with the Clotho converter
  (:func:`streamcap.training.data.datasets.from_clotho`: development -> train,
  validation -> val, evaluation -> test), audio paths relative to it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from streamcap.errors import ConfigError
from streamcap.models.artefacts import BundleRecipe
from streamcap.models.fetch import fetch_bundle
from streamcap.training.data.datasets import from_clotho
from streamcap.training.data.manifest import write_manifest

MANIFEST = "manifest.jsonl"
ARCHIVE_PREFIX = "clotho_audio_"


def unsafe_members(names: list[str]) -> list[str]:
    """Archive entries that would land outside the extraction directory."""
    bad = []
    for name in names:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts:
            bad.append(name)
    return bad


def extract_archive(archive: Path, target: Path) -> int:
    """Extract a Clotho audio archive so that its files end up directly in ``target``
    (one top-level folder in the archive is dropped); returns the number of files.

    Raises:
        ConfigError: not a readable 7z archive, or an unsafe entry (named).
    """
    import py7zr

    scratch = target.with_name(f".{target.name}.extracting")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with py7zr.SevenZipFile(archive, mode="r") as handle:
            names = handle.getnames()
            bad = unsafe_members(names)
            if bad:
                raise ConfigError(f"{archive}: refused: entries outside the archive's folder: "
                                  f"{', '.join(bad[:5])}")
            handle.extractall(path=scratch)
    except ConfigError:
        raise
    except Exception as exc:  # py7zr raises its own errors and OSError/EOFError
        shutil.rmtree(scratch, ignore_errors=True)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{archive}: cannot extract ({reason[:160]}); expected a 7z "
                          "archive; run the fetch again with --overwrite") from exc
    entries = list(scratch.iterdir())
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else scratch
    shutil.rmtree(target, ignore_errors=True)
    root.rename(target)
    shutil.rmtree(scratch, ignore_errors=True)
    return sum(1 for p in target.rglob("*") if p.is_file())


@dataclass(frozen=True, slots=True, kw_only=True)
class ClothoSummary:
    """What ``data fetch clotho`` produced."""

    directory: Path
    manifest: Path
    per_split: Mapping[str, int]
    skipped: Mapping[str, int]


def finish_clotho(directory: Path, *, keep_archives: bool = False) -> dict[str, Any]:
    """Extract the archives in ``directory`` and write its manifest; returns what is
    recorded in ``component.json``.

    Raises:
        ConfigError: an archive cannot be extracted, or the captions do not convert.
    """
    extracted: dict[str, int] = {}
    for archive in sorted(directory.glob(f"{ARCHIVE_PREFIX}*.7z")):
        split = archive.name.removeprefix(ARCHIVE_PREFIX).removesuffix(".7z")
        extracted[split] = extract_archive(archive, directory / split)
        if not keep_archives:
            archive.unlink()
    conversion = from_clotho(directory)
    write_manifest(conversion.rows, directory / MANIFEST)
    per_split: dict[str, int] = {}
    for row in conversion.rows:
        per_split[row.split] = per_split.get(row.split, 0) + 1
    return {"manifest": MANIFEST, "extracted_files": extracted, "clips": per_split,
            "skipped": dict(conversion.skipped)}


def fetch_dataset(item: BundleRecipe, *, directory: Path | None, accept_licences: bool,
                  overwrite: bool = False, keep_archives: bool = False,
                  say: Callable[[str], None] = print) -> ClothoSummary:
    """Download, check and extract ``item`` (Clotho) and write its manifest.

    Raises:
        ModelError: licences refused, not enough space, a host unreachable or a file
            missing (one line naming the URL).
        WeightsError: a checksum mismatch.
        ConfigError: an archive cannot be extracted.
    """
    if item.name != "clotho":
        raise ConfigError(f"data fetch: no extraction recipe for {item.name!r}")
    record: dict[str, Any] = {}

    def finish(staged: Path) -> Mapping[str, Any]:
        record.update(finish_clotho(staged, keep_archives=keep_archives))
        return record

    result = fetch_bundle(item, directory=directory, accept_licences=accept_licences,
                          overwrite=overwrite, say=say, finish=finish)
    return ClothoSummary(directory=result.path, manifest=result.path / MANIFEST,
                         per_split=dict(record["clips"]), skipped=dict(record["skipped"]))


__all__ = ["MANIFEST", "ClothoSummary", "extract_archive", "fetch_dataset", "finish_clotho",
           "unsafe_members"]
