"""What the trigger path keeps in the state directory: learned "auto" history, calibrated thresholds.

Files under ``<state_dir>/triggers/``:

* ``auto.json`` (written here, atomically: a temporary file then a rename):
  ``{"version": 1, "histories": {"<source>": {"<trigger>": {"fingerprint": str,
  "history": [float, ...]}}}}``, the recent non-hit scores of each (source,
  trigger) (:class:`~streamcap.triggers.scoring.AutoThreshold`). A history is
  used again only when its fingerprint matches (same model, same phrasings
  and examples), so changing a trigger's words starts it cold.
* ``calibrated.json`` (written by ``streamcap triggers calibrate`` through
  :func:`write_calibrated`, merged with the other triggers' records,
  atomically): ``{"<trigger>": {"threshold": float, "model": str, "f1":
  float, "positives": int, "negatives": int, "calibrated_at": str,
  "fingerprint": str}}`` (:func:`calibration_entry`); the daemon
  (:func:`read_calibrated`) uses an entry in place of "auto" when its model is
  the running one, its fingerprint that of the trigger's words now, and its
  threshold a finite number.

For the daemon a missing file is no history; a file that cannot be read or
parsed is logged and ignored (the daemon starts cold rather than not at
all). The calibrate command instead refuses a broken ``calibrated.json``
(:func:`read_calibrated_records`) rather than overwrite it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from streamcap.atomic import replace_text
from streamcap.errors import ConfigError, StreamcapError
from streamcap.logs import get_logger
from streamcap.triggers.spec import TriggerSpec

if TYPE_CHECKING:
    from streamcap.triggers.scoring import SweepRow

_log = get_logger(__name__)

TRIGGERS_DIR: Final = "triggers"
"""The trigger path's folder in the daemon's state directory."""
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
    body = {"version": VERSION, "histories": {
        source: {trigger: {"fingerprint": fp, "history": [round(v, 6) for v in history]}
                 for trigger, (fp, history) in triggers.items()}
        for source, triggers in histories.items()}}
    replace_text(directory / AUTO_FILE, json.dumps(body, separators=(",", ":")))


def calibrated_path(state_dir: Path) -> Path:
    """``<state_dir>/triggers/calibrated.json``, ``state_dir`` being the daemon's state directory."""
    return state_dir / TRIGGERS_DIR / CALIBRATED_FILE


def calibration_entry(row: SweepRow, *, model: str, spec_fingerprint: str,
                      now: datetime) -> dict[str, Any]:
    """One trigger's record in ``calibrated.json`` (``spec_fingerprint``: :func:`fingerprint`
    of the trigger as calibrated)."""
    return {"threshold": row.threshold, "model": model, "fingerprint": spec_fingerprint,
            "f1": round(row.f1, 6),
            "positives": row.tp + row.fn, "negatives": row.fp + row.tn,
            "calibrated_at": now.astimezone(UTC).isoformat(timespec="seconds")}


def read_calibrated_records(path: Path) -> dict[str, Any]:
    """The records of ``calibrated.json`` at ``path`` as they are; empty when there is none.

    Raises:
        ConfigError: the file exists but cannot be read or is not a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read calibrated thresholds "
                          f"({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}); "
                          "fix or remove it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of triggers, "
                          f"got {type(data).__name__}; fix or remove it")
    return data


def merged(existing: Mapping[str, Any], name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """``existing`` with ``name``'s record replaced by ``entry``, other triggers kept."""
    out = dict(existing)
    out[name] = dict(entry)
    return out


def write_calibrated(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then rename).

    Raises:
        StreamcapError: the folder cannot be made or the file cannot be written.
    """
    try:
        replace_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise StreamcapError(f"{path}: cannot write calibrated thresholds "
                             f"({exc.strerror or exc})") from None


def read_calibrated(directory: Path, model_id: str,
                    fingerprints: Mapping[str, str]) -> dict[str, float]:
    """The calibrated thresholds of ``<directory>/calibrated.json`` made for ``model_id``,
    by trigger (``directory``: ``<state_dir>/triggers``); empty, and logged, when the file
    cannot be read. An entry counts only while its trigger's words are those it was
    calibrated with (``fingerprints``: :func:`fingerprint` of each trigger now): cosines
    of other phrasings are not comparable.
    """
    path = directory / CALIBRATED_FILE
    try:
        data = read_calibrated_records(path)
    except ConfigError as exc:
        _log.warning("calibrated trigger thresholds ignored", path=str(path), error=str(exc))
        return {}
    out: dict[str, float] = {}
    for trigger, entry in data.items():
        if not isinstance(entry, dict):
            continue
        threshold = entry.get("threshold")
        now = fingerprints.get(str(trigger))
        if now is None or entry.get("fingerprint") != now:
            continue
        if (entry.get("model") == model_id and isinstance(threshold, int | float)
                and not isinstance(threshold, bool) and math.isfinite(threshold)):
            out[str(trigger)] = float(threshold)
    return out
