"""When a trigger turns on and off for a source: hysteresis over scored windows (pure).

One :class:`Detector` per (source, trigger) takes that source's fast-path
windows in order, each already decided hit or not (see
:mod:`streamcap.triggers.scoring`), and returns the :class:`TriggerEvent` a
window causes, if any:

* **on** when the current window hits and at least ``min_hits`` of the last
  ``of_windows`` windows hit, counting only hits since the last *off* (a
  firing never comes back from the hits that made the last one), unless the
  last *on* is less than ``cooldown_s`` of stream time ago; its span is the audio from the first of those hits to the end of the
  window that decided it, its score the best of those hits;
* **off** once ``off_after_s`` of stream time passed without a hit (from
  the end of the last hit window to the end of the current one); it carries
  the *on* event's id in ``fired_id``; its span covers the windows without a
  hit since the last hit.

Stream time runs on across restarts of the source's clock (a new window
epoch continues where the last one ended); the last ``of_windows`` windows
are forgotten at a restart, since their audio is not continuous with the new.

Event ids are ``f"{run_id}:{trigger}:{source_id}:{n}"``, ``n`` counting from 1
per (trigger, source) and run (:class:`EventIds`, kept by the engine across
changes of the trigger, so that ids never repeat; ``:`` is in no run id, trigger
or source name, so two pairs never share an id). :func:`announcement` is the
*state announcement* published at start and when a trigger is added or
changed: an *off* with ``fired_id == ""`` and NaN score and threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

from streamcap.messages import TriggerEvent, TriggerState
from streamcap.triggers.spec import TriggerSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One fast-path window of a source, decided for one trigger."""

    epoch: int  # the window's clock epoch
    start_s: float  # stream clock of the epoch
    end_s: float
    end_at: float  # wall clock of the window's end
    score: float
    threshold: float
    hit: bool


class EventIds:
    """``f"{run_id}:{trigger}:{source_id}:{n}"``, ``n`` from 1 per (trigger, source)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._counts: dict[tuple[str, str], int] = {}

    def next(self, trigger: str, source_id: str) -> str:
        n = self._counts.get((trigger, source_id), 0) + 1
        self._counts[(trigger, source_id)] = n
        return f"{self.run_id}:{trigger}:{source_id}:{n}"


def announcement(trigger: str, source_id: str, ids: EventIds, *, model: str,
                 at: float) -> TriggerEvent:
    """The state announcement of one (source, trigger): off, no firing, NaN score."""
    return TriggerEvent(event_id=ids.next(trigger, source_id), trigger=trigger,
                        source_id=source_id, state=TriggerState.OFF, score=math.nan,
                        threshold=math.nan, start_s=0.0, end_s=0.0, captured_at=at,
                        model=model, run_id=ids.run_id, fired_id="")


class Detector:
    """The on/off state of one trigger for one source (see the module doc)."""

    def __init__(self, spec: TriggerSpec, source_id: str, ids: EventIds, *,
                 model: str = "") -> None:
        self.spec = spec
        self.source_id = source_id
        self.model = model
        self._ids = ids
        self._recent: deque[Verdict] = deque(maxlen=spec.of_windows)
        self._epoch: int | None = None
        self._offset = 0.0  # continuous stream time = offset + the epoch's end_s
        self._t = 0.0  # continuous stream time of the end of the last window
        self._last_hit_t = -math.inf
        self._last_on_t = -math.inf
        self._first_miss: Verdict | None = None  # first window without a hit since the last hit
        self._last: Verdict | None = None  # the last window
        self.on_id = ""
        """The event id of the current firing; "" while off."""

    @property
    def on(self) -> bool:
        return bool(self.on_id)

    def observe(self, verdict: Verdict, caption: str | None = None) -> TriggerEvent | None:
        """Take the source's next window; the event it causes, if any.

        Raises:
            ValueError: a window older than the last one of the same epoch.
        """
        if verdict.epoch != self._epoch:
            if self._epoch is not None:
                self._offset = self._t - verdict.start_s
                self._recent.clear()
                self._first_miss = None
            self._epoch = verdict.epoch
        t = self._offset + verdict.end_s
        if t < self._t:
            raise ValueError(f"detector {self.spec.name}/{self.source_id}: window ending at "
                             f"{verdict.end_s} s comes after one ending later")
        self._t = t
        self._last = verdict
        self._recent.append(verdict)
        if verdict.hit:
            self._last_hit_t = t
            self._first_miss = None
        elif self._first_miss is None:
            self._first_miss = verdict
        if self.on:
            if verdict.hit or t - self._last_hit_t < self.spec.off_after_s:
                return None
            first = self._first_miss or verdict
            event = self._event(TriggerState.OFF, verdict, start_s=first.start_s,
                                score=verdict.score, fired_id=self.on_id, caption=caption)
            self.on_id = ""
            self._recent.clear()  # the hits of this firing never count for the next one
            return event
        if not verdict.hit:
            return None
        hits = [v for v in self._recent if v.hit]
        if len(hits) < self.spec.min_hits or t - self._last_on_t < self.spec.cooldown_s:
            return None
        self._last_on_t = t
        event = self._event(TriggerState.ON, verdict, start_s=hits[0].start_s,
                            score=max(v.score for v in hits), fired_id="", caption=caption)
        self.on_id = event.event_id
        return event

    def respec(self, spec: TriggerSpec) -> None:
        """Follow new hysteresis settings (same trigger, same words), keeping the state."""
        self.spec = spec
        self._recent = deque(self._recent, maxlen=spec.of_windows)

    def end(self, at: float, caption: str | None = None) -> TriggerEvent | None:
        """If on, the *off* that ends the firing now (the trigger changed, the source stopped).

        Its span is the windows without a hit since the last hit (none: the end of the
        last window), its score and threshold the last window's, ``captured_at`` ``at``.
        """
        last = self._last
        if not self.on or last is None:
            return None
        first = self._first_miss
        event = self._event(TriggerState.OFF, last, start_s=last.end_s if first is None
                            else first.start_s, score=last.score, fired_id=self.on_id,
                            caption=caption)
        event = dataclasses.replace(event, captured_at=at)
        self.on_id = ""
        self._recent.clear()
        return event

    def _event(self, state: TriggerState, verdict: Verdict, *, start_s: float, score: float,
               fired_id: str, caption: str | None) -> TriggerEvent:
        return TriggerEvent(
            event_id=self._ids.next(self.spec.name, self.source_id), trigger=self.spec.name,
            source_id=self.source_id, state=state, score=score, threshold=verdict.threshold,
            start_s=start_s, end_s=verdict.end_s, captured_at=verdict.end_at,
            model=self.model, run_id=self._ids.run_id, fired_id=fired_id, caption=caption)
