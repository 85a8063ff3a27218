"""``streamcap triggers calibrate``: choose a trigger's threshold from labelled audio files.

The user gives files that hold the sound (``--positive``) and files that do
not (``--negative``). Every file is cut into the trigger path's windows
(``[trigger_path]`` ``window_s`` every ``hop_s``, by the windower the daemon
uses, the end of a file padded with silence as ``streamcap caption`` does),
each window is embedded by the bundle's retriever (its audio encoder on the
window's waveform, as the captioner does for a caption window) and scored
against the trigger by the window scorer.

**A file counts, not a window.** A file's *firing score* is the highest
threshold at which the trigger would turn on while that file plays: the
largest, over every run of ``of_windows`` consecutive windows, of the
``min_hits``-th best window score in the run (:func:`firing_score`). A
positive file is a hit at threshold ``t`` when its firing score is ``>= t``, a
negative file a false firing when its firing score is ``>= t``. Per-window
labels would be wrong: a positive clip says the sound is *in* it, not in
which 5 s windows, and a 1 s bark at the end of a 10 s clip is missing from
most of them; and the detector never fires on one stray window, so a
negative file is only a false firing where ``min_hits`` windows in a run
score high. A file with fewer windows than ``of_windows`` is one run;
one with fewer than ``min_hits`` windows needs every window to hit.
``cooldown_s`` and ``off_after_s`` do not change whether a trigger first
turns on, so they play no part here.

The sweep (:func:`sweep`) tries every distinct firing score as a threshold
and counts true/false positives at each; the chosen threshold
(:func:`best_row`) has the best F1, and of equal F1 the higher threshold (the
fewer false firings on audio not in the set). It is the lowest firing score
that still counts, written into ``<state_dir>/triggers/calibrated.json``
(:func:`write_calibrated`, merged with the other triggers there, written
atomically), which the daemon reads for a trigger whose ``threshold`` is
``"auto"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

from streamcap.errors import ConfigError, StreamcapError
from streamcap.triggers.spec import TriggerSpec, example_paths

if TYPE_CHECKING:  # numpy and torch load when used: `streamcap --help` stays quick
    import numpy as np
    import numpy.typing as npt
    import torch

    from streamcap.config import Config
    from streamcap.models.captioner import Captioner

    FloatArray: TypeAlias = npt.NDArray[np.float32]

CALIBRATED_DIR: Final = "triggers"
CALIBRATED_FILE: Final = "calibrated.json"
TABLE_ROWS: Final = 25
"""The most sweep rows the text table shows (the chosen one always among them)."""


# ----------------------------------------------------------------------------- scoring (pure)


@dataclass(frozen=True, slots=True)
class PhraseEmbeddings:
    """A trigger's embeddings in the retriever's joint space, L2-normalised rows.

    Attributes:
        positive: (n, d) its ``text`` phrasings.
        negative: (m, d) its ``negative`` phrasings (m may be 0).
        examples: (k, d) one row per ``examples`` file (k may be 0).
    """

    positive: FloatArray
    negative: FloatArray
    examples: FloatArray


class WindowScorer(Protocol):
    """Score of one window's L2-normalised audio embedding (d,) against a trigger."""

    def __call__(self, audio: FloatArray, phrases: PhraseEmbeddings) -> float: ...


def plain_score(audio: FloatArray, phrases: PhraseEmbeddings) -> float:
    """The best cosine of the window with the trigger's phrasings and example files.

    Negative phrasings are not used (the scorer of the trigger path decides how
    they count).
    """
    import numpy as np

    rows = np.concatenate([phrases.positive, phrases.examples]).astype(np.float32)
    return float(np.max(rows @ audio.astype(np.float32)))


# LEAD: replace with streamcap.triggers.scoring.<fn> after merge
DEFAULT_SCORER: WindowScorer = plain_score


class AutoThreshold(Protocol):
    """The "auto" threshold of a trigger, given embeddings of background windows (n, d)."""

    def __call__(self, phrases: PhraseEmbeddings, background: FloatArray) -> float: ...


# LEAD: replace with streamcap.triggers.scoring.<auto threshold fn> after merge
AUTO_THRESHOLD: AutoThreshold | None = None
"""None until the trigger path's auto rule is merged: reports say "auto: pending merge"."""


def firing_score(window_scores: Sequence[float], min_hits: int, of_windows: int) -> float:
    """The highest threshold at which ``min_hits`` of some ``of_windows`` consecutive
    windows reach it: the max over runs of the run's ``min_hits``-th best score.

    A sequence shorter than ``of_windows`` is one run; one shorter than ``min_hits``
    needs all its windows (its lowest score).

    Raises:
        ValueError: no window scores, or ``min_hits``/``of_windows`` below 1.
    """
    if not window_scores:
        raise ValueError("firing_score: no window scores")
    if min_hits < 1 or of_windows < 1:
        raise ValueError("firing_score: min_hits and of_windows must be >= 1")
    scores = [float(s) for s in window_scores]
    span = min(of_windows, len(scores))
    k = min(min_hits, span)
    return max(sorted(scores[i:i + span], reverse=True)[k - 1]
               for i in range(len(scores) - span + 1))


@dataclass(frozen=True, slots=True)
class SweepRow:
    """Counts at one threshold (an item counts as detected when its score is ``>= threshold``)."""

    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        """tp / (tp + fp); 1.0 when nothing is detected (no false firing was made)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """tp / (tp + fn); 0.0 without positives."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """2 tp / (2 tp + fp + fn): the harmonic mean of precision and recall (0 when tp = 0)."""
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {"threshold": self.threshold, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "tn": self.tn, "precision": round(self.precision, 6),
                "recall": round(self.recall, 6), "f1": round(self.f1, 6)}


def at_threshold(positives: Sequence[float], negatives: Sequence[float],
                 threshold: float) -> SweepRow:
    """The counts of ``positives`` and ``negatives`` scores at ``threshold``."""
    tp = sum(1 for s in positives if s >= threshold)
    fp = sum(1 for s in negatives if s >= threshold)
    return SweepRow(threshold, tp, fp, len(positives) - tp, len(negatives) - fp)


def sweep(positives: Sequence[float], negatives: Sequence[float]) -> tuple[SweepRow, ...]:
    """One row per distinct score (every threshold that changes a count), highest first.

    Raises:
        ValueError: no positive score, or a score that is not finite.
    """
    if not positives:
        raise ValueError("sweep: at least one positive score is needed")
    everything = [float(s) for s in (*positives, *negatives)]
    if not all(math.isfinite(s) for s in everything):
        raise ValueError("sweep: every score must be finite")
    return tuple(at_threshold(positives, negatives, t)
                 for t in sorted(set(everything), reverse=True))


def best_row(rows: Sequence[SweepRow]) -> SweepRow:
    """The row with the best F1; of equal F1 the one with the higher threshold.

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("best_row: no rows")
    return max(rows, key=lambda r: (r.f1, r.threshold))


def shown_rows(rows: Sequence[SweepRow], chosen: SweepRow,
               limit: int = TABLE_ROWS) -> list[SweepRow]:
    """At most ``limit`` rows, evenly spread over ``rows`` (in their order), ``chosen`` included."""
    if len(rows) <= limit:
        return list(rows)
    step = (len(rows) - 1) / (limit - 2)
    picked = {round(i * step) for i in range(limit - 1)} | {rows.index(chosen)}
    return [rows[i] for i in sorted(picked)]


def format_table(rows: Sequence[SweepRow], chosen: SweepRow) -> str:
    """The sweep as a text table, the chosen row marked ``*``."""
    lines = [" threshold  precision  recall     F1   tp   fp   fn   tn",
             " ---------  ---------  ------  -----  ---  ---  ---  ---"]
    for r in shown_rows(rows, chosen):
        mark = "*" if r is chosen else " "
        lines.append(f"{mark}{r.threshold:+9.4f}  {r.precision:9.3f}  {r.recall:6.3f}  "
                     f"{r.f1:5.3f}  {r.tp:3d}  {r.fp:3d}  {r.fn:3d}  {r.tn:3d}")
    if len(rows) > len(shown_rows(rows, chosen)):
        lines.append(f"({len(rows)} thresholds; --json lists them all)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- calibrated.json


def calibrated_path(state_dir: Path) -> Path:
    """Where the daemon reads calibrated thresholds: ``<state_dir>/triggers/calibrated.json``."""
    return state_dir / CALIBRATED_DIR / CALIBRATED_FILE


def calibration_entry(row: SweepRow, *, model: str, now: datetime) -> dict[str, Any]:
    """One trigger's record in ``calibrated.json``."""
    return {"threshold": row.threshold, "model": model, "f1": round(row.f1, 6),
            "positives": row.tp + row.fn, "negatives": row.fp + row.tn,
            "calibrated_at": now.astimezone(UTC).isoformat(timespec="seconds")}


def read_calibrated(path: Path) -> dict[str, Any]:
    """The records already in ``path``; empty when there is no such file.

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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise StreamcapError(f"{path}: cannot write calibrated thresholds "
                             f"({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------- embedding (I/O)


class Embedder:
    """The bundle's retriever: audio windows and phrasings into its joint space.

    The audio side is the retriever's audio encoder on the window's waveform
    at its own rate, as the captioner does for each caption window; any
    window length works. Call from one thread.
    """

    def __init__(self, captioner: Captioner) -> None:
        if captioner.components.retriever is None:
            raise ConfigError(f"model {captioner.model_id}: has no retriever; triggers need "
                              "a bundle with an audio-text retriever")
        self.captioner = captioner
        self.retriever = captioner.components.retriever
        self.sample_rate_hz: int = self.retriever.config.audio.mel.sample_rate
        self.model_id = captioner.model_id

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        import torch

        c = self.captioner
        if c.dtype == torch.float32:
            yield
            return
        with torch.autocast(device_type=c.device.type, dtype=c.dtype):
            yield

    def embed_waves(self, waves: FloatArray) -> FloatArray:
        """(B, n) waveforms at :attr:`sample_rate_hz` -> (B, d) L2-normalised embeddings."""
        import numpy as np
        import torch

        with torch.inference_mode(), self._autocast():
            wave: torch.Tensor = torch.as_tensor(np.ascontiguousarray(waves, np.float32))
            _clip, joint = self.retriever.embed_audio(wave.to(self.captioner.device))
        out = torch.nn.functional.normalize(joint.float(), dim=-1).cpu().numpy()
        return np.asarray(out, dtype=np.float32)

    def embed_texts(self, texts: Sequence[str]) -> FloatArray:
        """(n, d) L2-normalised text embeddings; (0, d) for no text."""
        import numpy as np
        import torch

        if not texts:
            return np.zeros((0, self.retriever.config.joint_dim), np.float32)
        with torch.inference_mode():
            out = self.captioner.text_embeddings(list(texts)).cpu().numpy()
        return np.asarray(out, dtype=np.float32)


def file_window_embeddings(embedder: Embedder, path: Path, window_s: float, hop_s: float,
                           batch: int = 16) -> FloatArray:
    """Every window of one file, embedded: (W, d).

    Raises:
        SourceError: the file cannot be decoded.
    """
    import numpy as np

    from streamcap.captioning import file_windows

    rate = embedder.sample_rate_hz
    rows: list[FloatArray] = []
    pending: list[FloatArray] = []
    for window in file_windows(path, window_s, hop_s, (rate,)):
        pending.append(window.samples(rate))
        if len(pending) == batch:
            rows.append(embedder.embed_waves(np.stack(pending)))
            pending = []
    if pending:
        rows.append(embedder.embed_waves(np.stack(pending)))
    return np.concatenate(rows)


def example_embeddings(embedder: Embedder, paths: Sequence[Path], window_s: float,
                       hop_s: float) -> FloatArray:
    """One row per example file: the mean of its window embeddings, L2-normalised."""
    # LEAD: replace with the trigger path's example embedding after merge
    import numpy as np

    rows = []
    for path in paths:
        mean = file_window_embeddings(embedder, path, window_s, hop_s).mean(axis=0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    if not rows:
        return np.zeros((0, embedder.embed_texts(["x"]).shape[1]), np.float32)
    return np.stack(rows).astype(np.float32)


def phrase_embeddings(embedder: Embedder, spec: TriggerSpec, example_files: Sequence[Path],
                      window_s: float, hop_s: float) -> PhraseEmbeddings:
    """The trigger's phrasings and example files, embedded."""
    return PhraseEmbeddings(positive=embedder.embed_texts(spec.text),
                            negative=embedder.embed_texts(spec.negative),
                            examples=example_embeddings(embedder, example_files, window_s,
                                                        hop_s))


# ----------------------------------------------------------------------------- the command


@dataclass(frozen=True, slots=True)
class FileScore:
    """One file's firing score and how many windows it gave."""

    file: str
    score: float
    windows: int


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``streamcap triggers calibrate``."""
    triggers = sub.add_parser("triggers", help="sound triggers defined in words")
    tsub = triggers.add_subparsers(dest="triggers_command", metavar="SUBCOMMAND")
    cal = tsub.add_parser(
        "calibrate", help="choose a trigger's threshold from audio files with and without it",
        description="Score every file's trigger windows against a trigger, report precision, "
                    "recall and F1 across thresholds, and write the best threshold to "
                    "<state_dir>/triggers/calibrated.json.")
    cal.add_argument("--positive", nargs="*", type=Path, default=[], metavar="FILE",
                     help="audio files that hold the sound")
    cal.add_argument("--negative", nargs="*", type=Path, default=[], metavar="FILE",
                     help="audio files that do not")
    cal.add_argument("--trigger", metavar="NAME",
                     help="the [triggers.<NAME>] to calibrate (needed when there are several)")
    cal.add_argument("--config", type=Path,
                     help="config file (default: ./config.toml)")
    cal.add_argument("--model", help="bundle directory or preset name (overrides [model] bundle)")
    cal.add_argument("--out", type=Path, metavar="PATH",
                     help="file to write (default: <state_dir>/triggers/calibrated.json)")
    cal.add_argument("--json", action="store_true", help="print the report as JSON")


def _config(path: Path | None) -> Config:
    from streamcap.config import load_config

    chosen = path if path is not None else Path("config.toml")
    if path is None and not chosen.exists():
        raise ConfigError("no config file: pass --config PATH (the triggers are defined in "
                          "its [triggers.<name>] tables), or run where config.toml is")
    return load_config(chosen)


def _trigger(config: Config, name: str | None, where: Path | None) -> TriggerSpec:
    names = ", ".join(sorted(config.triggers)) or "none"
    if name is None:
        if len(config.triggers) == 1:
            return next(iter(config.triggers.values()))
        if not config.triggers:
            raise ConfigError(f"{where}: defines no trigger; add a [triggers.<name>] table")
        raise ConfigError(f"--trigger: needed, the config defines several triggers ({names})")
    if name not in config.triggers:
        raise ConfigError(f"--trigger: no trigger {name!r} in {where} (triggers: {names})")
    return config.triggers[name]


def _check_inputs(positives: list[Path], negatives: list[Path],
                  examples: Sequence[Path], trigger: str) -> None:
    from streamcap.captioning import check_files

    problems = []
    if not positives:
        problems.append("--positive: at least one audio file that holds the sound is needed")
    if not negatives:
        problems.append("--negative: at least one audio file without the sound is needed")
    checked = check_files([*positives, *negatives])
    problems += checked.refused + checked.problems
    found = check_files(list(examples))
    problems += [f"triggers.{trigger}.examples: {p}" for p in found.refused + found.problems]
    if problems:
        raise ConfigError(problems)


def _embedder(config: Config, model: str | None) -> Embedder:
    from streamcap.models.captioner import build_captioner
    from streamcap.models.runtime import choose_device, choose_precision

    m = config.model
    device = choose_device(m.device)
    dtype = choose_precision(m.precision, device)
    if m.threads:
        import torch

        torch.set_num_threads(m.threads)
    return Embedder(build_captioner(model or m.bundle, m.decoding, device=device, dtype=dtype,
                                    abstention=m.abstention))


def score_files(embedder: Embedder, files: Sequence[Path], spec: TriggerSpec,
                phrases: PhraseEmbeddings, window_s: float, hop_s: float,
                scorer: WindowScorer, progress: Callable[[str], None]) -> list[FileScore]:
    """Each file's firing score for ``spec``; ``progress`` is called with each file's name
    when it is done.

    Raises:
        ConfigError: a file cannot be decoded (named).
    """
    from streamcap.errors import SourceError

    out = []
    for path in files:
        try:
            emb = file_window_embeddings(embedder, path, window_s, hop_s)
        except SourceError as exc:
            raise ConfigError(str(exc)) from None
        scores = [scorer(row, phrases) for row in emb]
        out.append(FileScore(str(path), firing_score(scores, spec.min_hits, spec.of_windows),
                             len(scores)))
        progress(path.name)
    return out


def calibrate_command(args: argparse.Namespace) -> int:
    """Run ``streamcap triggers calibrate``; returns the exit code."""
    from tqdm import tqdm

    from streamcap.daemon import state_root

    if getattr(args, "triggers_command", None) != "calibrate":
        raise ConfigError("triggers: a subcommand is needed: calibrate")
    config = _config(args.config)
    spec = _trigger(config, args.trigger, config.path)
    examples = example_paths(spec, config.path.parent if config.path else None)
    positives, negatives = list(args.positive), list(args.negative)
    _check_inputs(positives, negatives, examples, spec.name)
    out_path = args.out if args.out is not None else calibrated_path(state_root(config))
    existing = read_calibrated(out_path)  # a broken file is reported before the model loads
    window_s, hop_s = config.trigger_path.window_s, config.trigger_path.hop_s
    embedder = _embedder(config, args.model)
    from streamcap.logs import configure_logging

    configure_logging("auto", "debug" if getattr(args, "debug", False) else "info")
    phrases = phrase_embeddings(embedder, spec, examples, window_s, hop_s)
    scorer = DEFAULT_SCORER
    with tqdm(total=len(positives) + len(negatives), unit="file", desc="embedding",
              file=sys.stderr, disable=None) as bar:
        def done(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

        pos = score_files(embedder, positives, spec, phrases, window_s, hop_s, scorer, done)
        neg = score_files(embedder, negatives, spec, phrases, window_s, hop_s, scorer, done)
    rows = sweep([f.score for f in pos], [f.score for f in neg])
    chosen = best_row(rows)
    entry = calibration_entry(chosen, model=embedder.model_id, now=datetime.now(UTC))
    write_calibrated(out_path, merged(existing, spec.name, entry))
    report = {"trigger": spec.name, "model": embedder.model_id, "window_s": window_s,
              "hop_s": hop_s, "min_hits": spec.min_hits, "of_windows": spec.of_windows,
              "scorer": getattr(scorer, "__name__", str(scorer)),
              "auto": "pending merge" if AUTO_THRESHOLD is None else "available",
              "chosen": chosen.to_json(), "written": str(out_path), "entry": entry,
              "positives": [asdict(f) for f in pos], "negatives": [asdict(f) for f in neg],
              "rows": [r.to_json() for r in rows]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"trigger {spec.name}: {len(pos)} positive and {len(neg)} negative files, "
          f"{window_s:g} s windows every {hop_s:g} s, fires on {spec.min_hits} of "
          f"{spec.of_windows} windows; model {embedder.model_id}")
    print(format_table(rows, chosen))
    print(f"threshold {chosen.threshold:.4f} (precision {chosen.precision:.3f}, recall "
          f"{chosen.recall:.3f}, F1 {chosen.f1:.3f}) written to {out_path}")
    return 0
