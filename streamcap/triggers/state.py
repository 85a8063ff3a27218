"""What the trigger path keeps in the state directory: learned "auto" history, calibrated thresholds.

Files under ``<state_dir>/triggers/``:

* ``auto.json`` (written here, atomically: a temporary file then a rename):
  ``{"version": 1, "histories": {"<source>": {"<trigger>": {"fingerprint": str,
  "history": [float, ...]}}}}``, the recent non-hit scores of each (source,
  trigger) (:class:`~streamcap.triggers.scoring.AutoThreshold`). A history is
  used again only when its fingerprint matches (same model, same phrasings
  and examples), so changing a trigger's words starts it cold.
* ``calibrated.json`` (written by ``streamcap triggers calibrate``, read
  here): ``{"<trigger>": {"threshold": float, "model": str}}``; an entry is
  used in place of "auto" when its model is the running one.

A missing file is no history; a file that cannot be read or parsed is logged
and ignored (the daemon starts cold rather than not at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from streamcap.logs import get_logger
from streamcap.triggers.spec import TriggerSpec

_log = get_logger(__name__)

AUTO_FILE: Final = "auto.json"
CALIBRATED_FILE: Final = "calibrated.json"
VERSION: Final = 1

Histories = dict[str, dict[str, tuple[str, tuple[float, ...]]]]
"""source -> trigger -> (fingerprint, history)."""


def fingerprint(spec: TriggerSpec, model_id: str) -> str:
    """What a learned history depends on: the model and the trigger's words and examples."""
    text = json.dumps([model_id, spec.text, spec.negative, spec.examples])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_json(path: Path) -> object:
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _log.warning("cannot read a trigger state file; ignored", path=str(path), error=str(exc))
        return None


def read_histories(directory: Path) -> Histories:
    """``auto.json`` of ``directory``; empty when missing or unreadable."""
    data = _read_json(directory / AUTO_FILE)
    out: Histories = {}
    if data is None:
        return out
    if not isinstance(data, dict) or data.get("version") != VERSION:
        _log.warning("trigger history of another format; ignored",
                     path=str(directory / AUTO_FILE))
        return out
    histories = data.get("histories")
    for source, triggers in (histories.items() if isinstance(histories, dict) else ()):
        if not isinstance(triggers, dict):
            continue
        for trigger, entry in triggers.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint"), str):
                continue
            values = entry.get("history")
            if not isinstance(values, list):
                continue
            kept = tuple(float(v) for v in values
                         if isinstance(v, int | float) and not isinstance(v, bool)
                         and math.isfinite(v))
            out.setdefault(str(source), {})[str(trigger)] = (entry["fingerprint"], kept)
    return out


def write_histories(directory: Path, histories: Mapping[str, Mapping[str, tuple[str,
                    Sequence[float]]]]) -> None:
    """Write ``auto.json`` atomically (a temporary file of its own renamed over it).

    Each call writes a temporary file of a unique name, so that two writes at once
    never share one; the last rename wins.

    Raises:
        OSError: the directory cannot be created or written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    body = {"version": VERSION, "histories": {
        source: {trigger: {"fingerprint": fp, "history": [round(v, 6) for v in history]}
                 for trigger, (fp, history) in triggers.items()}
        for source, triggers in histories.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{AUTO_FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(body, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / AUTO_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_calibrated(directory: Path, model_id: str) -> dict[str, float]:
    """The calibrated thresholds of ``calibrated.json`` made for ``model_id``, by trigger."""
    data = _read_json(directory / CALIBRATED_FILE)
    out: dict[str, float] = {}
    if not isinstance(data, dict):
        if data is not None:
            _log.warning("calibrated trigger thresholds: expected a JSON object; ignored",
                         path=str(directory / CALIBRATED_FILE))
        return out
    for trigger, entry in data.items():
        if not isinstance(entry, dict):
            continue
        threshold = entry.get("threshold")
        if (entry.get("model") == model_id and isinstance(threshold, int | float)
                and not isinstance(threshold, bool) and math.isfinite(threshold)):
            out[str(trigger)] = float(threshold)
    return out
