"""What the sinks share about trigger events: (source, trigger) pairs and announcements.

Pure functions, no I/O. A sink keeps per-pair state (a retained topic, a Home
Assistant entity, the latest frame for a new subscriber); when the live set of
triggers changes it drops the pairs that :func:`watches` no longer holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from streamcap.messages import TriggerEvent, TriggerState
from streamcap.triggers import spec as _spec

if TYPE_CHECKING:
    from streamcap.triggers.spec import TriggerSpec

Pair = tuple[str, str]
"""A (source_id, trigger name) pair."""


def pair_of(event: TriggerEvent) -> Pair:
    """The (source_id, trigger) pair an event belongs to."""
    return (event.source_id, event.trigger)


def watches(specs: Mapping[str, TriggerSpec], pair: Pair) -> bool:
    """Whether ``pair``'s trigger is in ``specs`` and watches its source (no sources: all);
    :func:`streamcap.triggers.spec.watches` for a pair."""
    return _spec.watches(specs, pair[1], pair[0])


def is_announcement(frame: Mapping[str, object]) -> bool:
    """Whether a trigger frame only states ``off`` (no firing ends: ``fired_id`` is empty).

    The engine sends one per watched pair at start and when a trigger is added
    or changed; sinks publish the state and no event for it.
    """
    return frame.get("state") == TriggerState.OFF.value and not frame.get("fired_id")
