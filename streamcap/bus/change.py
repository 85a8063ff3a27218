"""Change-only publishing: which captioned windows a sink with ``publish = "change"`` gets.

Pure logic, no I/O and no clock of its own. A sink table may say
``publish = "change"``; the bus then runs every captioned window of every source
through that sink's :class:`ChangeFilter` before offering it. Per source, a
window is published when

1. no caption of that source was published to the sink yet (``first``), or
2. its caption text differs from the last published caption's text (``text``;
   exact comparison: captions are already one line of NFC text), or
3. the cosine distance (``1 - cos``) between its embedding and the last published
   caption's embedding is above ``change_distance`` (``distance``; only when both
   windows have an embedding of the same length), or
4. ``heartbeat_s`` or more have passed, by the windows' wall-clock ``captured_at``,
   since the last published caption of that source (``heartbeat``), or the wall
   clock went back since then (``clock``: after a clock step the elapsed time
   would say nothing).

A published caption that the sink's inbox then drops (the sink fell behind) is
forgotten as the reference (:meth:`ChangeFilter.forget`): the next window of that
source is published as ``first``, so a change is never lost to a drop.

Otherwise it is suppressed (``unchanged``): neither its caption nor its
embedding reaches the sink (a window's embedding follows its caption's
verdict), and the bus counts it. A backfill recalled from the history store
after a restart passes the same rule (:func:`recalled_changes`), so that a
change-only sink replays changes, not every stored window. The comparison is always with the last
*published* window, so a slow drift adds up until it crosses
``change_distance``. The decision is made as the window arrives: nothing is
ever held back waiting for a later window. Status messages and trigger events
never pass through here.

The default ``change_distance`` (0.3) comes from ``bench/change_distance.py``
on the demo bundle (``bench/results/change_distance_demo.json``): consecutive
windows of one steady scene are further apart than 0.3 in 8.6 % of pairs (a
quiet room: never), windows of different scenes in 65.7 % (0.25: 14.3 % and
72.3 %; 0.4: 4.8 % and 53.0 %). A scene change usually changes the caption text
too, which rule 2 catches; the distance is the net for changes the text misses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

import numpy as np

from streamcap.messages import Caption, Embedding, Float32Array, Published

PublishMode = Literal["every", "change"]
"""A sink's ``publish`` option: every captioned window, or only the changes."""

DEFAULT_HEARTBEAT_S: Final = 300.0
"""Default ``heartbeat_s``: an unchanged scene is published again every 5 minutes."""

MAX_HEARTBEAT_S: Final = 7 * 24 * 3600.0
"""Largest ``heartbeat_s``: a week."""

DEFAULT_CHANGE_DISTANCE: Final = 0.3
"""Default ``change_distance`` (see the module docstring for the measurement)."""


class Reason(StrEnum):
    """Why a window was published to a sink with ``publish = "change"``, or that it was not."""

    FIRST = "first"
    TEXT = "text"
    DISTANCE = "distance"
    HEARTBEAT = "heartbeat"
    CLOCK = "clock"
    UNCHANGED = "unchanged"

    @property
    def published(self) -> bool:
        """Whether the window goes to the sink."""
        return self is not Reason.UNCHANGED


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeRule:
    """A sink's change-only settings.

    Raises:
        ValueError: ``heartbeat_s`` is not > 0, or ``change_distance`` not in [0, 2].
    """

    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    change_distance: float = DEFAULT_CHANGE_DISTANCE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.heartbeat_s) and self.heartbeat_s > 0):
            raise ValueError(f"heartbeat_s must be > 0 (got {self.heartbeat_s})")
        if not (math.isfinite(self.change_distance) and 0 <= self.change_distance <= 2):
            raise ValueError(f"change_distance must be between 0 and 2 "
                             f"(got {self.change_distance})")


@dataclass(frozen=True, slots=True, kw_only=True)
class LastPublished:
    """What a source's last published window left to compare the next one with."""

    text: str
    captured_at: float
    vector: Float32Array | None
    window_id: str = ""
    """The window it was (to forget it if the sink's inbox drops it undelivered)."""


def cosine_distance(a: Float32Array, b: Float32Array) -> float | None:
    """``1 - cos(a, b)`` in [0, 2]; None when the two cannot be compared (other lengths, a zero
    or non-finite vector)."""
    if a.shape != b.shape or a.ndim != 1:
        return None
    x, y = a.astype(np.float64), b.astype(np.float64)
    norms = float(np.linalg.norm(x)) * float(np.linalg.norm(y))
    if not math.isfinite(norms) or norms == 0.0:
        return None
    cos = float(x @ y) / norms
    if not math.isfinite(cos):
        return None
    return 1.0 - max(-1.0, min(1.0, cos))


def decide(rule: ChangeRule, last: LastPublished | None, caption: Caption,
           embedding: Embedding | None) -> Reason:
    """The verdict on one window of a source whose last published window is ``last``."""
    if last is None:
        return Reason.FIRST
    if caption.text != last.text:
        return Reason.TEXT
    if embedding is not None and last.vector is not None:
        distance = cosine_distance(embedding.vector, last.vector)
        if distance is not None and distance > rule.change_distance:
            return Reason.DISTANCE
    elapsed = caption.captured_at - last.captured_at
    if elapsed < 0:
        return Reason.CLOCK
    if elapsed >= rule.heartbeat_s:
        return Reason.HEARTBEAT
    return Reason.UNCHANGED


class ChangeFilter:
    """One sink's change-only state: the last published window of each source.

    Holds one small entry per source seen (sources come from the config). Call
    from one thread at a time (the bus calls it on the event loop).
    """

    def __init__(self, rule: ChangeRule) -> None:
        self.rule = rule
        self._last: dict[str, LastPublished] = {}

    def admit(self, caption: Caption, embedding: Embedding | None) -> Reason:
        """The verdict on a window; a published window becomes its source's new reference."""
        reason = decide(self.rule, self._last.get(caption.source_id), caption, embedding)
        if reason.published:
            self._last[caption.source_id] = LastPublished(
                text=caption.text, captured_at=caption.captured_at,
                vector=None if embedding is None else embedding.vector,
                window_id=caption.window_id)
        return reason

    def forget(self, caption: Caption) -> bool:
        """``caption`` never reached the sink (its inbox dropped it): if it is its source's
        reference, forget it, so that the next window of that source is published
        (``first``) instead of being suppressed as unchanged from a caption the sink
        never got. Returns whether it was the reference."""
        last = self._last.get(caption.source_id)
        if last is None or not last.window_id or last.window_id != caption.window_id:
            return False
        del self._last[caption.source_id]
        return True

    def last(self, source_id: str) -> LastPublished | None:
        """The last window of ``source_id`` published to the sink, None before the first."""
        return self._last.get(source_id)


def recalled_changes(rule: ChangeRule, messages: Iterable[Published]) -> list[Published]:
    """Of a backfill recalled from the history store (oldest first), what a sink with
    ``rule`` would have published: the captions the rule admits one after the other,
    from a fresh start, by text and heartbeat (recalled captions come without their
    embeddings), and every other message."""
    gate = ChangeFilter(rule)
    return [m for m in messages
            if not isinstance(m, Caption) or gate.admit(m, None).published]
