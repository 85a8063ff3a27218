"""``streamcap triggers calibrate``: choose a trigger's threshold from labelled audio files.

The user gives files that hold the sound (``--positive``) and files that do
not (``--negative``). Every file is cut into the trigger path's windows
(``[trigger_path]`` ``window_s`` every ``hop_s``, by the windower the daemon
uses, the end of a file padded with silence as ``streamcap caption`` does),
and each window is embedded and scored exactly as the daemon's fast path does
it: the same model code (:class:`~streamcap.triggers.fastpath.RetrieverTriggerModel`,
cached log-mel frames and all), the same trigger embeddings
(:func:`~streamcap.triggers.engine.trigger_vectors`: phrasings and example
files), the same score and hit rule (:mod:`streamcap.triggers.scoring`: a
window is a hit when its score reaches the threshold *and* beats every
negative phrasing, so a window's :func:`~streamcap.triggers.scoring.hit_score`
is ``-inf`` where a negative phrasing wins).

**A file counts, not a window.** A file's *firing score* is the highest
threshold at which the trigger would turn on while that file plays
(:func:`~streamcap.triggers.scoring.firing_score` of its windows' hit scores:
the largest, over every run of ``of_windows`` consecutive windows, of the
``min_hits``-th best). A positive file is a hit at threshold ``t`` when its
firing score is ``>= t``, a negative file a false firing. Per-window labels
would be wrong: a positive clip says the sound is *in* it, not in which 5 s
windows, and a 1 s bark at the end of a 10 s clip is missing from most of
them; and the detector never fires on one stray window, so a negative file is
only a false firing where ``min_hits`` windows in a run score high.
``cooldown_s`` and ``off_after_s`` do not change whether a trigger first turns
on, so they play no part here.

The sweep (:func:`~streamcap.triggers.scoring.sweep`) tries every distinct
firing score as a threshold and counts true/false positives at each; the
chosen threshold (:func:`~streamcap.triggers.scoring.best_row`) has the best
F1, and of equal F1 the higher threshold (the fewer false firings on audio not
in the set). It is the lowest firing score that still counts, merged into
``<state_dir>/triggers/calibrated.json`` (its format and writer:
:mod:`streamcap.triggers.state`), which the daemon reads for a trigger whose
``threshold`` is ``"auto"``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from streamcap.errors import ConfigError
from streamcap.triggers.scoring import (
    SweepRow,
    best_row,
    firing_score,
    hit_score,
    score_window,
    sweep,
)
from streamcap.triggers.spec import TriggerSpec, example_paths
from streamcap.triggers.state import (
    calibrated_path,
    calibration_entry,
    fingerprint,
    merged,
    read_calibrated_records,
    write_calibrated,
)

if TYPE_CHECKING:  # numpy and torch load when used: `streamcap --help` stays quick
    import numpy as np

    from streamcap.config import Config
    from streamcap.triggers.fastpath import RetrieverTriggerModel

TABLE_ROWS: Final = 25
"""The most sweep rows the text table shows (the chosen one always among them)."""
BATCH: Final = 8
"""Windows embedded in one call (the fast path's batch)."""


# ----------------------------------------------------------------------------- scoring (pure)


def window_hit_scores(embeddings: np.ndarray, positives: np.ndarray,
                      negatives: np.ndarray) -> list[float]:
    """Each window's :func:`~streamcap.triggers.scoring.hit_score` for a trigger.

    Args:
        embeddings: (W, d) the windows' L2-normalised audio embeddings.
        positives: (n, d) the trigger's phrasings and examples; negatives: (m, d).
    """
    import numpy as np

    none = np.zeros((0, positives.shape[1]), np.float32)
    return [hit_score(score_window(row, positives, negatives, none)) for row in embeddings]


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


# ----------------------------------------------------------------------------- embedding (I/O)


def file_window_embeddings(model: RetrieverTriggerModel, path: Path, window_s: float,
                           hop_s: float) -> np.ndarray:
    """Every window of one file, embedded by the fast path's model code: (W, d).

    Raises:
        SourceError: the file cannot be decoded.
    """
    import numpy as np

    from streamcap.captioning import file_windows

    rows: list[np.ndarray] = []
    pending = []
    source = ""
    try:
        for window in file_windows(path, window_s, hop_s, (model.sample_rate_hz,)):
            source = window.source_id
            pending.append(window)
            if len(pending) == BATCH:
                rows.append(model.embed_windows(pending))
                pending = []
        if pending:
            rows.append(model.embed_windows(pending))
    finally:
        if source:
            model.forget(source)  # the next file's windows start at 0 again
    return np.concatenate(rows)


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


def _model(config: Config, model: str | None) -> RetrieverTriggerModel:
    from streamcap.models.captioner import build_captioner
    from streamcap.models.runtime import choose_device, choose_plan
    from streamcap.triggers.fastpath import trigger_model

    m = config.model
    device = choose_device(m.device)
    plan = choose_plan(m.precision, device)
    if m.threads:
        import torch

        torch.set_num_threads(m.threads)
    return trigger_model(build_captioner(model or m.bundle, m.decoding, device=device,
                                         dtype=plan.dtype, abstention=m.abstention,
                                         int8=plan.int8))


def score_files(model: RetrieverTriggerModel, files: Sequence[Path], spec: TriggerSpec,
                vectors: tuple[np.ndarray, np.ndarray], window_s: float, hop_s: float,
                progress: Callable[[str], None]) -> list[FileScore]:
    """Each file's firing score for ``spec`` (``vectors``: its positives and negatives);
    ``progress`` is called with each file's name when it is done.

    Raises:
        ConfigError: a file cannot be decoded (named).
    """
    from streamcap.errors import SourceError

    out = []
    for path in files:
        try:
            emb = file_window_embeddings(model, path, window_s, hop_s)
        except SourceError as exc:
            raise ConfigError(str(exc)) from None
        scores = window_hit_scores(emb, *vectors)
        out.append(FileScore(str(path), firing_score(scores, spec.min_hits, spec.of_windows),
                             len(scores)))
        progress(path.name)
    return out


def _file_json(f: FileScore) -> dict[str, object]:
    """``score`` None where no window beats the negative phrasings (JSON has no -inf)."""
    return {**asdict(f), "score": f.score if math.isfinite(f.score) else None}


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
    existing = read_calibrated_records(out_path)  # a broken file is named before the model loads
    window_s, hop_s = config.trigger_path.window_s, config.trigger_path.hop_s
    model = _model(config, args.model)
    from streamcap.logs import configure_logging
    from streamcap.triggers.engine import trigger_vectors

    configure_logging("auto", "debug" if getattr(args, "debug", False) else "info")
    vectors = trigger_vectors(model, spec, config.path.parent if config.path else None, window_s)
    with tqdm(total=len(positives) + len(negatives), unit="file", desc="embedding",
              file=sys.stderr, disable=None) as bar:
        def done(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

        pos = score_files(model, positives, spec, vectors, window_s, hop_s, done)
        neg = score_files(model, negatives, spec, vectors, window_s, hop_s, done)
    try:
        rows = sweep([f.score for f in pos], [f.score for f in neg])
    except ValueError:
        raise ConfigError(f"triggers.{spec.name}: in no file does any window score above the "
                          "trigger's negative phrasings, so no threshold can be chosen; "
                          "check its negative phrasings") from None
    chosen = best_row(rows)
    entry = calibration_entry(chosen, model=model.model_id,
                              spec_fingerprint=fingerprint(spec, model.model_id),
                              now=datetime.now(UTC))
    write_calibrated(out_path, merged(existing, spec.name, entry))
    report = {"trigger": spec.name, "model": model.model_id, "window_s": window_s,
              "hop_s": hop_s, "min_hits": spec.min_hits, "of_windows": spec.of_windows,
              "rule": "hit: score >= threshold and above every negative phrasing",
              "chosen": chosen.to_json(), "written": str(out_path), "entry": entry,
              "positives": [_file_json(f) for f in pos], "negatives": [_file_json(f) for f in neg],
              "rows": [r.to_json() for r in rows]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"trigger {spec.name}: {len(pos)} positive and {len(neg)} negative files, "
          f"{window_s:g} s windows every {hop_s:g} s, fires on {spec.min_hits} of "
          f"{spec.of_windows} windows; model {model.model_id}")
    print(format_table(rows, chosen))
    print(f"threshold {chosen.threshold:.4f} (precision {chosen.precision:.3f}, recall "
          f"{chosen.recall:.3f}, F1 {chosen.f1:.3f}) written to {out_path}")
    return 0
