"""Calibration of a bundle's abstention rule on its own held-out synthetic scenes.

Every clip of a split (``val`` by default) goes through the captioner exactly as
the daemon runs it (one 10 s window, the bundle's decoding defaults), with
abstention off. A caption is *right* when it names at least one sound type and
only types the scene holds, or, for a scene without events (silence, a room or
street bed alone), when it names none. The floors of
:func:`streamcap.models.decoding.abstain.calibrate` then keep ``keep`` of the
right captions (the quiet margin: of those whose scene holds events, since a
right caption of a quiet scene loses nothing by becoming "quiet"); the share of
wrong captions the rule turns into abstentions is reported beside it (never
used to choose the floors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamcap.audio.dsp import rms_dbfs
from streamcap.errors import ConfigError
from streamcap.messages import make_window
from streamcap.models.captioner import Captioner
from streamcap.models.decoding.abstain import AbstentionRule, calibrate, decide
from streamcap.training.data.audio_io import load_audio
from streamcap.training.data.corpus import Scene, mentioned_events
from streamcap.training.data.manifest import ManifestRow


@dataclass(frozen=True, slots=True, kw_only=True)
class Judged:
    """One held-out caption: its confidence, the best quiet text's, level and rightness."""

    clip_id: str
    text: str
    confidence: float
    quiet_confidence: float | None
    level_dbfs: float
    right: bool
    has_events: bool = True  # the scene holds at least one event


def is_right(text: str, present: frozenset[str]) -> bool:
    """A caption is right when it names only present types, and at least one if any."""
    named = mentioned_events(text)
    return named <= present and (bool(named) or not present)


def judge_clips(captioner: Captioner, rows: Sequence[ManifestRow], scenes: Mapping[str, Scene],
                quiet_texts: Sequence[str],
                progress: Callable[[int, int], None] | None = None) -> list[Judged]:
    """Caption every row (abstention off) and judge it against its scene."""
    missing = [r.clip_id for r in rows if r.clip_id not in scenes]
    if missing:
        raise ConfigError(f"calibration: no scene for clip(s) {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
    saved = captioner.abstention
    captioner.abstention = None
    quiet = captioner.text_embeddings(quiet_texts) if quiet_texts else None
    out: list[Judged] = []
    try:
        for i, row in enumerate(rows, 1):
            audio = {rate: load_audio(row.audio, rate, max_s=10.0)
                     for rate in captioner.sample_rates_hz}
            first = audio[captioner.sample_rates_hz[0]]
            window = make_window(source_id=f"calibrate-{i}", seq=0, epoch=0, start_ms=0,
                                 end_ms=round(1000 * len(first) / captioner.sample_rates_hz[0]),
                                 captured_at=0.0, level_dbfs=rms_dbfs(first), audio=audio)
            result = captioner.caption(window)
            caption = result.caption
            if caption.confidence is None or result.embedding is None:
                raise ConfigError("calibration needs a bundle with a retriever")
            quiet_conf = None
            if quiet is not None:
                vector = torch.from_numpy(np.array(result.embedding.vector))
                quiet_conf = float((quiet @ vector).max())
            present = frozenset(scenes[row.clip_id].kinds)
            out.append(Judged(clip_id=row.clip_id, text=caption.text,
                              confidence=caption.confidence, quiet_confidence=quiet_conf,
                              level_dbfs=window.level_dbfs, right=is_right(caption.text, present),
                              has_events=bool(present)))
            if progress is not None:
                progress(i, len(rows))
    finally:
        captioner.abstention = saved
    return out


def rule_from(judged: Sequence[Judged], *, keep: float, quiet_texts: Sequence[str],
              quiet_dbfs: float, split: str) -> tuple[AbstentionRule, dict[str, Any]]:
    """The calibrated rule and what it does on the same clips (a summary for people)."""
    right = [j for j in judged if j.right]
    if not right:
        raise ConfigError("calibration: no held-out caption was right; nothing to keep")
    # Margins over the quiet texts come from right captions of scenes with events only:
    # turning a right caption of a quiet scene into "quiet" loses nothing.
    margins = ([j.confidence - j.quiet_confidence for j in right
                if j.quiet_confidence is not None and j.has_events] if quiet_texts else None)
    rule = calibrate([j.confidence for j in right], margins, keep=keep,
                     quiet_texts=quiet_texts, quiet_dbfs=quiet_dbfs,
                     notes={"split": split, "clips": len(judged)})
    verdicts = [decide(rule, level_dbfs=j.level_dbfs, confidence=j.confidence,
                       quiet_confidence=j.quiet_confidence) for j in judged]
    wrong = [v for j, v in zip(judged, verdicts, strict=True) if not j.right]
    kept_right = [not v.abstained for j, v in zip(judged, verdicts, strict=True) if j.right]
    summary = {
        "clips": len(judged), "right": len(right),
        "right_kept": round(sum(kept_right) / len(kept_right), 4),
        "wrong_abstained": round(sum(v.abstained for v in wrong) / len(wrong), 4) if wrong else None,
    }
    return AbstentionRule(**{**_fields(rule), "calibration": {**rule.calibration, **summary}}), \
        summary


def _fields(rule: AbstentionRule) -> dict[str, Any]:
    return {"min_confidence": rule.min_confidence, "quiet_dbfs": rule.quiet_dbfs,
            "quiet_texts": rule.quiet_texts, "quiet_margin": rule.quiet_margin,
            "quiet_text": rule.quiet_text, "unfamiliar_text": rule.unfamiliar_text}
