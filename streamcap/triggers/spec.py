"""What a trigger is: ``[triggers.<name>]`` and ``[trigger_path]`` read into frozen dataclasses.

One reader for every place a trigger is defined: the config file, the HTTP
API and the MQTT command topic all call :func:`read_trigger`, so a bad
definition gets the same dotted-key message wherever it comes from.

A trigger fires for a source when ``min_hits`` of the last ``of_windows``
fast-path windows score at or above its threshold; it turns off after
``off_after_s`` without a hit, and fires again no sooner than ``cooldown_s``
after it last turned on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from streamcap.options import Read, fixed, option, read, shown, toml_key

NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PHRASES: Final = 32
MAX_PHRASE_CHARS: Final = 200
MAX_EXAMPLES: Final = 64
MAX_HOLD_S: Final = 86400.0
MAX_CLIP_PRE_S: Final = 30.0
MAX_CLIP_POST_S: Final = 60.0
AUTO: Final = "auto"


def _phrases(values: tuple[str, ...]) -> str | None:
    if len(values) > MAX_PHRASES:
        return f"at most {MAX_PHRASES} phrasings"
    for v in values:
        if not v.strip():
            return "a phrasing must not be empty"
        if len(v) > MAX_PHRASE_CHARS:
            return f"a phrasing must be at most {MAX_PHRASE_CHARS} characters"
    return None


def _examples(values: tuple[str, ...]) -> str | None:
    if len(values) > MAX_EXAMPLES:
        return f"at most {MAX_EXAMPLES} example files"
    return None if all(v.strip() for v in values) else "an example path must not be empty"


def _source_names(values: tuple[str, ...]) -> str | None:
    bad = [v for v in values if not NAME_RE.match(v)]
    return f"not a source name: {shown(bad[0])}" if bad else None


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerSpec:
    """A ``[triggers.<name>]`` table.

    ``threshold`` is None for ``"auto"`` (the calibrated rule decides); a
    number is used as it is, on the trigger's score (see the scorer).
    ``sources`` empty means every source.
    """

    name: str = fixed()
    text: tuple[str, ...] = option((), required=True, non_empty=True, check=_phrases,
                                   help="one or more phrasings of the sound")
    negative: tuple[str, ...] = option((), check=_phrases,
                                       help="phrasings that must not match better")
    examples: tuple[str, ...] = option((), check=_examples,
                                       help="audio files whose embeddings define the sound")
    sources: tuple[str, ...] = option((), check=_source_names,
                                      help="the sources it watches; empty = all")
    threshold: float | None = fixed(None)
    # [pre, post] seconds of audio saved around each "on" event (streamcap.triggers.clips);
    # None: no clip, no audio kept.
    clip_s: tuple[float, float] | None = fixed(None)
    min_hits: int = option(2, min=1, max=100, help="hits among the last of_windows to turn on")
    of_windows: int = option(3, min=1, max=100)
    cooldown_s: float = option(10.0, min=0, max=MAX_HOLD_S,
                               help="no new firing sooner after the last one turned on")
    off_after_s: float = option(3.0, above=0, max=MAX_HOLD_S,
                                help="turns off after this long without a hit")

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """min_hits within of_windows."""
        if not {"min_hits", "of_windows"} & set(refused) and self.min_hits > self.of_windows:
            yield "min_hits", (f"must be <= of_windows "
                               f"(got {self.min_hits} > {self.of_windows})")


def _threshold(value: object) -> tuple[float | None, str | None]:
    """``"auto"`` -> None; a finite number in [-1, 1] as it is; else a problem."""
    if value == AUTO:
        return None, None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f'expected "auto" or a number (got {shown(value)})'
    # an int is compared as it is: float() of a huge one overflows
    if (isinstance(value, float) and not math.isfinite(value)) or not -1 <= value <= 1:
        return None, f"must be between -1 and 1 (got {shown(value)})"
    return float(value), None


def _clip_s(value: object) -> tuple[tuple[float, float] | None, str | None]:
    """``[pre, post]`` seconds -> the pair; null (JSON) -> None; else a problem."""
    if value is None:
        return None, None
    expected = (f"expected [pre, post]: two numbers of seconds, 0 <= pre <= "
                f"{MAX_CLIP_PRE_S:g} and 0 <= post <= {MAX_CLIP_POST_S:g}")
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None, f"{expected} (got {shown(value)})"
    pair: list[float] = []
    for what, item, most in (("pre", value[0], MAX_CLIP_PRE_S),
                             ("post", value[1], MAX_CLIP_POST_S)):
        if isinstance(item, bool) or not isinstance(item, int | float):
            return None, f"{what}: {expected} (got {shown(value)})"
        # an int is compared as it is: float() of a huge one overflows
        if (isinstance(item, float) and not math.isfinite(item)) or not 0 <= item <= most:
            return None, f"{what} must be between 0 and {most:g} seconds (got {shown(value)})"
        pair.append(float(item))
    if pair[0] + pair[1] <= 0:
        return None, f"pre + post must be > 0 (got {shown(value)})"
    return (pair[0], pair[1]), None


def watches(specs: Mapping[str, TriggerSpec], trigger: str, source: str) -> bool:
    """Whether ``trigger`` is in ``specs`` and watches ``source`` (no sources: every one).

    The one test of whether an event of (``source``, ``trigger``) still belongs to the
    live set: sinks and the states shown by the API ignore events that do not (one
    produced before its trigger was removed and handled after).
    """
    spec = specs.get(trigger)
    return spec is not None and (not spec.sources or source in spec.sources)


def read_trigger(name: str, table: Mapping[str, object], where: str) -> Read[TriggerSpec]:
    """Read one trigger's table; every problem names ``<where>.<key>``.

    ``where`` is the dotted key of the table (``"triggers.dog"``); the HTTP
    API and the MQTT command topic pass the same, so their errors read like
    the config file's.
    """
    problems: list[str] = []
    if not NAME_RE.match(name):
        problems.append(f"{where}: a trigger name must be 1-64 letters, digits, '-' or '_'")
    got = read(TriggerSpec, table, where, also={"threshold", "clip_s"},
               fixed_values={"name": name})
    problems.extend(got.problems)
    spec = got.value
    if "threshold" in table:
        threshold, problem = _threshold(table["threshold"])
        if problem:
            problems.append(f"{where}.threshold: {problem}")
        spec = replace(spec, threshold=threshold)
    if "clip_s" in table:
        clip_s, problem = _clip_s(table["clip_s"])
        if problem:
            problems.append(f"{where}.clip_s: {problem}")
        spec = replace(spec, clip_s=clip_s)
    return Read(spec, tuple(problems), got.given, got.refused)


def read_triggers(tables: Mapping[str, object], sources: Collection[str],
                  problems: list[str]) -> dict[str, TriggerSpec]:
    """Every ``[triggers.<name>]`` table; a trigger naming an unknown source is a problem."""
    out: dict[str, TriggerSpec] = {}
    for name, table in tables.items():
        where = f"triggers.{toml_key(name)}"
        if not isinstance(table, Mapping):
            problems.append(f"{where}: expected a table")
            continue
        got = read_trigger(name, table, where)
        problems.extend(got.problems)
        unknown = [s for s in got.value.sources if s not in sources]
        if unknown and "sources" not in got.refused:
            problems.append(f"{where}.sources: no such source {shown(unknown[0])} "
                            f"(sources: {', '.join(sorted(sources)) or 'none'})")
        if not got.problems:
            out[name] = got.value
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerPathConfig:
    """``[trigger_path]``: the short windows triggers are scored on, apart from captioning."""

    window_s: float = option(5.0, min=1.0, max=30.0, help="audio per trigger window")
    hop_s: float = option(1.0, min=0.25, max=30.0, help="a trigger window every hop_s")
    max_pending: int = option(8, min=1, max=1000,
                              help="trigger windows waiting per source; oldest dropped beyond")

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """hop_s within window_s."""
        if not {"hop_s", "window_s"} & set(refused) and self.hop_s > self.window_s:
            yield "hop_s", f"must be <= window_s (got {self.hop_s:g} > {self.window_s:g})"


def example_paths(spec: TriggerSpec, base: Path | None) -> tuple[Path, ...]:
    """The trigger's example files, relative ones resolved against ``base`` (the config's folder)."""
    return tuple(Path(p) if Path(p).is_absolute() or base is None else base / p
                 for p in spec.examples)
