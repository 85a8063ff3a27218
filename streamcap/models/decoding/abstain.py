"""Abstention: say "quiet" or "an unfamiliar sound" instead of a caption the model cannot back.

Pure: scores in, a verdict out. The captioner (:mod:`streamcap.models.captioner`)
gives every window's chosen caption a **confidence**: the retriever's cosine
similarity between the window's audio embedding and the caption's text
embedding (the same score sampling reranks by). A bundle that carries an
``abstention`` object in its manifest (:class:`AbstentionRule`) then replaces
the caption, in this order, when

1. **level**: the window's RMS level is below ``quiet_dbfs`` (digital
   silence, a dither floor): the text becomes ``quiet_text`` ("quiet"), whatever
   the model wrote;
2. **quiet wins**: ``quiet_texts`` are given (texts that describe no event, "a
   quiet room") and the best of their confidences comes within ``quiet_margin``
   of the caption's (``confidence - quiet_confidence < quiet_margin``): the
   retriever finds the audio at least as much like quiet as like the caption,
   so the text becomes ``quiet_text``;
3. **low confidence**: ``confidence < min_confidence``: the text becomes
   ``unfamiliar_text`` ("an unfamiliar sound").

Otherwise the caption stands. Without a retriever there is no confidence and
only the level rule applies. A bundle without ``abstention`` never abstains
(bundles written before the rule existed behave as they did).
``min_confidence`` and ``quiet_margin`` are calibrated per bundle on its own
held-out data (:func:`calibrate`, ``streamcap train calibrate``): they keep a
chosen share of the held-out captions that named their scene's sounds right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal

from streamcap.errors import WeightsError
from streamcap.options import option

QUIET_TEXT: Final = "quiet"
UNFAMILIAR_TEXT: Final = "an unfamiliar sound"
DEFAULT_QUIET_DBFS: Final = -70.0

Reason = Literal["confident", "no_confidence", "level", "quiet_wins", "low_confidence"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AbstentionRule:
    """A bundle's abstention settings (the manifest's ``abstention`` object).

    Attributes:
        min_confidence: the floor on the chosen caption's retriever cosine (-1 to 1).
        quiet_dbfs: windows whose RMS level is below this are quiet (-200 to 0 dBFS).
        quiet_texts: texts that describe no sound event; empty turns rule 2 off.
        quiet_margin: how far the caption's confidence must exceed the best quiet
            text's (-2 to 2; 0: it must merely be higher).
        quiet_text: what is published for a quiet window.
        unfamiliar_text: what is published for a caption below the floor.
        calibration: how the thresholds were chosen (free-form, for people).
    """

    min_confidence: float
    quiet_dbfs: float = DEFAULT_QUIET_DBFS
    quiet_texts: tuple[str, ...] = ()
    quiet_margin: float = 0.0
    quiet_text: str = QUIET_TEXT
    unfamiliar_text: str = UNFAMILIAR_TEXT
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["quiet_texts"] = list(self.quiet_texts)
        out["calibration"] = dict(self.calibration)
        return out

    @classmethod
    def from_json(cls, obj: object, where: str = "manifest.json: key 'abstention'"
                  ) -> AbstentionRule:
        """The rule of a manifest's ``abstention`` object.

        Raises:
            WeightsError: not an object, an unknown or missing key, a wrong type or
                a value out of range; the message names ``where`` and the key.
        """
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{where}: expected an object, got {type(obj).__name__}")
        known = {"min_confidence", "quiet_dbfs", "quiet_texts", "quiet_margin", "quiet_text",
                 "unfamiliar_text", "calibration"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise WeightsError(f"{where}: unknown key(s) {', '.join(unknown)} "
                               f"(expected {', '.join(sorted(known))})")
        if "min_confidence" not in obj:
            raise WeightsError(f"{where}: missing key 'min_confidence'")
        values: dict[str, Any] = {}
        for key in ("min_confidence", "quiet_dbfs", "quiet_margin"):
            if key in obj:
                value = obj[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise WeightsError(f"{where}.{key}: expected a number, got {value!r}")
                values[key] = float(value)
        for key in ("quiet_text", "unfamiliar_text"):
            if key in obj:
                if not isinstance(obj[key], str):
                    raise WeightsError(f"{where}.{key}: expected a string, got {obj[key]!r}")
                values[key] = obj[key]
        if "quiet_texts" in obj:
            texts = obj["quiet_texts"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise WeightsError(f"{where}.quiet_texts: expected a list of strings, "
                                   f"got {texts!r}")
            values["quiet_texts"] = tuple(texts)
        if "calibration" in obj:
            if not isinstance(obj["calibration"], Mapping):
                raise WeightsError(f"{where}.calibration: expected an object")
            values["calibration"] = dict(obj["calibration"])
        try:
            return cls(**values)
        except ValueError as exc:
            raise WeightsError(f"{where}: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class AbstentionOptions:
    """``[model.abstention]``: the user's changes to the bundle's rule (each unset key keeps it).

    ``enabled = false`` turns abstention off (every caption stands); a
    ``min_confidence`` given for a bundle without a rule gives it one (with the
    default level rule and no quiet texts).
    """

    enabled: bool = option(True, help="false: publish every caption as the model wrote it")
    min_confidence: float | None = option(None, min=-1.0, max=1.0,
                                          help="floor on the caption's retriever cosine; "
                                               "unset = the bundle's")
    quiet_margin: float | None = option(None, min=-2.0, max=2.0,
                                        help="caption must beat the quiet texts by this; "
                                             "unset = the bundle's")
    quiet_dbfs: float | None = option(None, min=-200.0, max=0.0,
                                      help="windows below this level are quiet; "
                                           "unset = the bundle's")

    def apply(self, rule: AbstentionRule | None) -> AbstentionRule | None:
        """The rule the captioner uses: the bundle's ``rule`` with these changes."""
        if not self.enabled:
            return None
        if rule is None:
            if self.min_confidence is None:
                return None
            rule = AbstentionRule(min_confidence=self.min_confidence)
        changes: dict[str, Any] = {
            k: v for k, v in (("min_confidence", self.min_confidence),
                              ("quiet_margin", self.quiet_margin),
                              ("quiet_dbfs", self.quiet_dbfs)) if v is not None}
        if not changes:
            return rule
        changes["calibration"] = {**rule.calibration, "overridden_by_config": sorted(changes)}
        return replace(rule, **changes)


def _problems(rule: AbstentionRule) -> list[str]:
    problems = []
    ranges = (("min_confidence", rule.min_confidence, -1.0, 1.0),
              ("quiet_dbfs", rule.quiet_dbfs, -200.0, 0.0),
              ("quiet_margin", rule.quiet_margin, -2.0, 2.0))
    for name, value, lo, hi in ranges:
        if not (math.isfinite(value) and lo <= value <= hi):
            problems.append(f"{name}: expected a number from {lo:g} to {hi:g}, got {value!r}")
    for name, text in (("quiet_text", rule.quiet_text), ("unfamiliar_text", rule.unfamiliar_text)):
        if not text.strip() or not text.isprintable():
            problems.append(f"{name}: expected one line of printable text, got {text!r}")
    if any(not t.strip() for t in rule.quiet_texts):
        problems.append("quiet_texts: every text must be non-empty")
    return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What to publish: ``text`` is the replacement, or None to keep the model's caption."""

    text: str | None
    reason: Reason

    @property
    def abstained(self) -> bool:
        return self.text is not None


def decide(rule: AbstentionRule | None, *, level_dbfs: float, confidence: float | None,
           quiet_confidence: float | None = None) -> Verdict:
    """Keep the caption or replace it (the rules of the module docstring, in order).

    Args:
        rule: the bundle's rule, or None (never abstain).
        level_dbfs: the window's RMS level (``-inf`` for digital silence).
        confidence: the caption's retriever cosine, or None without a retriever.
        quiet_confidence: the best retriever cosine of ``rule.quiet_texts``, or None.
    """
    if rule is None:
        return Verdict(text=None, reason="confident" if confidence is not None
                       else "no_confidence")
    if not level_dbfs >= rule.quiet_dbfs:  # NaN counts as quiet: there is nothing to judge
        return Verdict(text=rule.quiet_text, reason="level")
    if confidence is None or not math.isfinite(confidence):
        return Verdict(text=None, reason="no_confidence")
    if (rule.quiet_texts and quiet_confidence is not None
            and confidence - quiet_confidence < rule.quiet_margin):
        return Verdict(text=rule.quiet_text, reason="quiet_wins")
    if confidence < rule.min_confidence:
        return Verdict(text=rule.unfamiliar_text, reason="low_confidence")
    return Verdict(text=None, reason="confident")


def quantile_floor(values: Sequence[float], keep: float) -> float:
    """The largest floor that keeps at least ``keep`` of ``values`` (those >= it).

    Raises:
        ValueError: no values, or ``keep`` outside (0, 1].
    """
    if not values:
        raise ValueError("quantile_floor: no values to calibrate on")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"quantile_floor: keep must be in (0, 1], got {keep}")
    ordered = sorted(float(v) for v in values)
    drop = math.floor((1.0 - keep) * len(ordered) + 1e-9)
    return ordered[min(drop, len(ordered) - 1)]


def calibrate(confidences: Sequence[float], margins: Sequence[float] | None, *,
              keep: float, quiet_texts: Sequence[str] = (),
              quiet_dbfs: float = DEFAULT_QUIET_DBFS,
              notes: Mapping[str, Any] | None = None) -> AbstentionRule:
    """A rule whose floors keep ``keep`` of the captions that were right on held-out data.

    ``confidences[i]`` is the confidence of right caption ``i`` and ``margins[i]`` its
    confidence minus the best quiet text's. With margins, each floor keeps
    ``1 - (1 - keep) / 2`` of them, so that both rules together keep at least ``keep``.
    Floors are rounded down to 4 decimals.
    """
    share = keep if not margins else 1.0 - (1.0 - keep) / 2
    rule_notes = {"keep": keep, "right_captions": len(confidences), **(notes or {})}
    return AbstentionRule(
        min_confidence=_round_down(quantile_floor(confidences, share)),
        quiet_dbfs=quiet_dbfs,
        quiet_texts=tuple(quiet_texts) if margins else (),
        quiet_margin=_round_down(quantile_floor(margins, share)) if margins else 0.0,
        calibration=rule_notes)


def _round_down(x: float) -> float:
    """``x`` to 4 decimals, never up (and a hair below), so the values it was chosen
    from stay above it despite the float noise of recomputing them."""
    return max(-2.0, math.floor(x * 1e4 - 1e-6) / 1e4)
