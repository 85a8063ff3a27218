"""The WebSocket sink's per-client logic, with no sockets and no asyncio.

Four pieces, each a plain synchronous class or function:

- :func:`parse_client_frame` turns one client frame (text or bytes) into a
  :class:`SubscribeRequest`, a :class:`PingRequest` or a :class:`FrameError`
  that the sink sends back as an ``error`` frame (the connection stays up).
  An error names the field and what was expected, and never quotes the
  client's input, so that an answer is never larger than a fixed size
  whatever the client sent. Strings that are echoed (``id``, source ids) must
  be text that UTF-8 can carry: JSON escapes can spell a lone surrogate
  (``"\\ud800"``), which no frame can send, so such a string is refused
  (``bad_field``, without echoing it);
- :class:`ClientQueue` is one client's queue of encoded frames, bounded in
  frames and in bytes: when a client stops reading, the oldest frames are
  dropped (embeddings first), every drop is counted, and the next frame the
  client gets is preceded by the count;
- :class:`History` remembers the last captions (per source or overall), the
  latest status of every source, the latest trigger frame of every (source,
  trigger) pair and the sources seen so far, and replays what a new
  subscription adds;
- :class:`ConnectionGate` counts a listener's open connections, handshakes
  included, against ``max_clients``.

Frames are kept as encoded JSON text, so that a message is encoded once however
many clients receive it.
"""

from __future__ import annotations

import enum
import itertools
import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from streamcap.bus import wire

KINDS: Final = tuple(sorted(wire.KINDS))
"""Message kinds a client can subscribe to: caption, embedding, status, trigger."""

DEFAULT_KINDS: Final = frozenset({"caption", "status", "trigger"})
"""What a client receives before it subscribes: embeddings are opt-in; triggers, rare and
meant to be acted on, are in."""

CONTROL: Final = "control"
"""Queue kind of the sink's own frames (hello, subscribed, pong, error)."""

BackfillScope = Literal["source", "global"]

ErrorCode = Literal["bad_json", "bad_frame", "unknown_type", "bad_field"]

MAX_ID_CHARS: Final = 64
"""Longest string ``id`` a client frame may carry (it is echoed in the reply)."""

MAX_ID_INT: Final = 2**53
"""Largest magnitude of an integer ``id`` (exact in every JSON implementation)."""

MAX_SOURCE_ID_CHARS: Final = 64
"""Longest source id in a subscription: the config's limit on source names."""

MAX_SOURCES: Final = 256
"""Most source ids one subscription may list."""

_ID_EXPECTED: Final = (f"expected a string of 1 to {MAX_ID_CHARS} characters (no lone "
                       f"surrogates) or an integer between -2**53 and 2**53")
_SUBSCRIBE_FIELDS: Final = frozenset({"type", "id", "sources", "kinds", "backfill"})
_PING_FIELDS: Final = frozenset({"type", "id"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """What one client wants: ``sources`` None means every source, present and future."""

    sources: frozenset[str] | None = None
    kinds: frozenset[str] = DEFAULT_KINDS

    def wants(self, kind: str, source_id: str) -> bool:
        """Whether a message of ``kind`` from ``source_id`` goes to this client."""
        return kind in self.kinds and (self.sources is None or source_id in self.sources)

    def describe(self) -> dict[str, object]:
        """The JSON form used in ``subscribed`` frames: ``sources`` is ``"*"`` or a sorted list."""
        return {
            "sources": "*" if self.sources is None else sorted(self.sources),
            "kinds": sorted(self.kinds),
        }


def default_subscription(offered: frozenset[str]) -> Subscription:
    """Captions, status and triggers of every source, limited to the kinds this sink offers."""
    return Subscription(sources=None, kinds=DEFAULT_KINDS & offered)


# --------------------------------------------------------------------------- client frames


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeRequest:
    """``{"type": "subscribe", ...}``: replace the client's subscription.

    ``backfill`` is how many past captions the client asked for (None: the
    sink's default), already capped at the sink's ``backfill``.
    """

    subscription: Subscription
    backfill: int | None = None
    request_id: str | int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PingRequest:
    """``{"type": "ping"}``: an application-level keepalive for browsers, answered by ``pong``."""

    request_id: str | int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameError:
    """A malformed client frame: sent back as an ``error`` frame; the connection stays up."""

    code: ErrorCode
    message: str
    details: Mapping[str, object] = field(default_factory=dict)


ClientFrame = SubscribeRequest | PingRequest | FrameError


def _bad_field(name: str, message: str, request_id: str | int | None) -> FrameError:
    details: dict[str, object] = {"field": name}
    if request_id is not None:
        details["id"] = request_id
    return FrameError(code="bad_field", message=f"{name}: {message}", details=details)


def parse_client_frame(
    data: str | bytes, *, offered: frozenset[str], max_backfill: int
) -> ClientFrame:
    """Parse one frame a client sent.

    Args:
        data: the frame's payload: ``str`` for a text frame, ``bytes`` for binary.
        offered: the kinds this sink publishes (a client may only subscribe to these).
        max_backfill: the sink's ``backfill``; a client's ``backfill`` is capped at it.

    Returns:
        The request, or a :class:`FrameError` naming what is wrong.
    """
    if isinstance(data, bytes):
        return FrameError(code="bad_frame",
                          message="binary frames are not supported: send JSON text frames")
    try:
        obj = json.loads(data)
    except ValueError as exc:
        position = getattr(exc, "pos", None)
        where: dict[str, object] = {"offset": position} if isinstance(position, int) else {}
        # a JSONDecodeError's own text names what was expected and where, never the input;
        # other ValueErrors (an integer of thousands of digits) are told in our words
        message = (f"frame is not valid JSON: {exc.msg}" if isinstance(exc, json.JSONDecodeError)
                   else "frame is not valid JSON: a number is too large")
        return FrameError(code="bad_json", message=message, details=where)
    except RecursionError:
        return FrameError(code="bad_json",
                          message="frame is not valid JSON: arrays or objects nested too deeply")
    if not isinstance(obj, dict):
        return FrameError(code="bad_frame",
                          message=f"frame must be a JSON object, got {_json_type(obj)}")
    request_id = obj.get("id")
    if "id" in obj and not _valid_id(request_id):
        return _bad_field("id", _ID_EXPECTED, None)
    assert request_id is None or isinstance(request_id, (str, int))  # _valid_id
    frame_type = obj.get("type")
    if not isinstance(frame_type, str):
        return _bad_field("type", "expected a string: subscribe or ping", request_id)
    if frame_type == "subscribe":
        return _parse_subscribe(obj, request_id, offered=offered, max_backfill=max_backfill)
    if frame_type == "ping":
        if set(obj) - _PING_FIELDS:
            return _unknown_fields("ping", _PING_FIELDS, request_id)
        return PingRequest(request_id=request_id)
    details: dict[str, object] = {"field": "type"}
    if request_id is not None:
        details["id"] = request_id
    return FrameError(code="unknown_type",
                      message="type: unknown frame type (known: subscribe, ping)",
                      details=details)


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return 0 < len(value) <= MAX_ID_CHARS and is_utf8_text(value)
    return isinstance(value, int) and -MAX_ID_INT <= value <= MAX_ID_INT


def is_utf8_text(value: str) -> bool:
    """Whether ``value`` can be sent in a text frame: UTF-8 encodes it (no lone surrogates,
    which a JSON ``\\ud800`` escape can spell)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type: array, string, number, boolean or null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else "object"


def _unknown_fields(kind: str, known: frozenset[str],
                    request_id: str | int | None) -> FrameError:
    """An unknown field: told without its name (a client's input is never echoed)."""
    details: dict[str, object] = {}
    if request_id is not None:
        details["id"] = request_id
    return FrameError(code="bad_field",
                      message=f"unknown field in a {kind} frame "
                              f"(known: {', '.join(sorted(known))})",
                      details=details)


def _parse_subscribe(
    obj: Mapping[str, object], request_id: str | int | None, *,
    offered: frozenset[str], max_backfill: int,
) -> ClientFrame:
    if set(obj) - _SUBSCRIBE_FIELDS:
        return _unknown_fields("subscribe", _SUBSCRIBE_FIELDS, request_id)

    sources: frozenset[str] | None = None
    raw_sources = obj.get("sources", "*")
    if raw_sources != "*":
        if not isinstance(raw_sources, list) or len(raw_sources) > MAX_SOURCES or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_SOURCE_ID_CHARS and is_utf8_text(s)
                for s in raw_sources):
            return _bad_field("sources", f'expected "*" or a list of at most {MAX_SOURCES} '
                                         f"source ids (strings of 1 to {MAX_SOURCE_ID_CHARS} "
                                         f"characters, no lone surrogates)", request_id)
        sources = frozenset(raw_sources)

    kinds = DEFAULT_KINDS & offered
    raw_kinds = obj.get("kinds")
    if raw_kinds == "*":
        kinds = offered
    elif raw_kinds is not None:
        if not isinstance(raw_kinds, list) or not all(isinstance(k, str) for k in raw_kinds):
            return _bad_field("kinds", f'expected "*" or a list of kinds ({", ".join(KINDS)})',
                              request_id)
        for k in raw_kinds:
            if k not in KINDS:
                return _bad_field("kinds", f"unknown kind (known: {', '.join(KINDS)})",
                                  request_id)
            if k not in offered:
                return _bad_field("kinds", f"kind {k} is not offered by this server "
                                           f"(offered: {', '.join(sorted(offered))})",
                                  request_id)
        kinds = frozenset(raw_kinds)

    backfill: int | None = None
    if "backfill" in obj:
        raw = obj["backfill"]
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
            return _bad_field("backfill", "expected an integer >= 0", request_id)
        backfill = min(raw, max_backfill)

    return SubscribeRequest(subscription=Subscription(sources=sources, kinds=kinds),
                            backfill=backfill, request_id=request_id)


# --------------------------------------------------------------------------- per-client queue

# Drop order when a client's queue is full: embeddings first (bulky, and the
# next window supersedes them), then the oldest caption or status, then trigger
# events (rare, and meant to be acted on); the sink's own frames only when
# nothing else is left.
_TIER: Final[Mapping[str, int]] = {"embedding": 0, "caption": 1, "status": 1, "trigger": 2,
                                   CONTROL: 3}


def frame_size(frame: str) -> int:
    """Bytes ``frame`` takes on the wire as UTF-8 text (the payload, without framing)."""
    return len(frame.encode("utf-8"))


class ClientQueue:
    """One client's queue of encoded frames, bounded in frames and in bytes.

    :meth:`push` never blocks: past ``max_pending`` frames or ``max_bytes``
    bytes it drops the oldest frame of the lowest tier present (embedding, then
    caption/status, then trigger, then the sink's own frames), as often as needed, and counts
    each drop. The newest frame alone is kept even when it is larger than
    ``max_bytes``. :meth:`pop` returns the oldest remaining frame together with
    the drops since the previous pop, so that the sink can tell the client how
    many frames it missed right before the frames that follow the gap.
    """

    def __init__(self, max_pending: int, max_bytes: int | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1 (got {max_pending})")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (got {max_bytes})")
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self._tiers: tuple[deque[tuple[int, str, str, int]], ...] = tuple(
            deque() for _ in range(max(_TIER.values()) + 1))
        self._order = itertools.count()
        self._bytes = 0
        self._unreported: dict[str, int] = {}
        self._dropped_total = 0
        self._pending: dict[str, int] = dict.fromkeys(_TIER, 0)

    def __len__(self) -> int:
        return sum(len(t) for t in self._tiers)

    @property
    def bytes(self) -> int:
        """UTF-8 bytes of the frames queued now."""
        return self._bytes

    def pending(self, kind: str) -> int:
        """Frames of ``kind`` (or :data:`CONTROL`) queued now."""
        return self._pending[kind]

    @property
    def dropped_total(self) -> int:
        """Frames dropped from this queue since it was created."""
        return self._dropped_total

    def _over(self) -> bool:
        return len(self) > self.max_pending or (
            self.max_bytes is not None and self._bytes > self.max_bytes)

    def push(self, kind: str, frame: str, size: int | None = None) -> list[str]:
        """Queue ``frame`` (a message of ``kind``, or :data:`CONTROL`).

        Args:
            kind: ``caption``, ``embedding``, ``status``, ``trigger`` or :data:`CONTROL`.
            frame: the encoded frame.
            size: its UTF-8 size in bytes, when the caller knows it already.

        Returns:
            The kinds of the frames dropped to make room, oldest first (often none).
        """
        nbytes = frame_size(frame) if size is None else size
        self._tiers[_TIER[kind]].append((next(self._order), kind, frame, nbytes))
        self._bytes += nbytes
        self._pending[kind] += 1
        dropped: list[str] = []
        while self._over() and len(self) > 1:
            victim_tier = next(t for t in self._tiers if t)
            _, dropped_kind, _, victim_bytes = victim_tier.popleft()
            self._bytes -= victim_bytes
            self._pending[dropped_kind] -= 1
            self._unreported[dropped_kind] = self._unreported.get(dropped_kind, 0) + 1
            self._dropped_total += 1
            dropped.append(dropped_kind)
        return dropped

    def pop(self) -> tuple[dict[str, int], str] | None:
        """The oldest queued frame and the drops (by kind) not yet reported, or None if empty."""
        heads = [t for t in self._tiers if t]
        if not heads:
            return None
        oldest = min(heads, key=lambda t: t[0][0])
        _, kind, frame, nbytes = oldest.popleft()
        self._bytes -= nbytes
        self._pending[kind] -= 1
        drops, self._unreported = self._unreported, {}
        return drops, frame


# --------------------------------------------------------------------------- history


class History:
    """The sink's memory for new subscribers.

    Keeps the last ``size`` caption frames per source (``scope="source"``) or
    overall (``scope="global"``), the latest status frame of every source, the
    latest trigger frame of every (source, trigger) pair (a state announcement
    included: it says the trigger is off), and the ids of every source seen so
    far, in order of first appearance.
    """

    def __init__(self, size: int, scope: BackfillScope = "source") -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0 (got {size})")
        self.size = size
        self.scope: BackfillScope = scope
        self._order = itertools.count()
        self._global: deque[tuple[int, str, str]] = deque(maxlen=size)
        self._per_source: dict[str, deque[tuple[int, str, str]]] = {}
        self._status: dict[str, str] = {}
        self._triggers: dict[tuple[str, str], str] = {}  # oldest change first
        self._watched: Callable[[tuple[str, str]], bool] | None = None
        self._sources: dict[str, None] = {}

    @property
    def sources(self) -> list[str]:
        """Source ids seen so far, in order of first appearance."""
        return list(self._sources)

    def held(self) -> dict[str, int]:
        """Captions held now for backfill, per source seen so far (0 for none)."""
        counts = dict.fromkeys(self._sources, 0)
        entries = (self._global if self.scope == "global"
                   else (e for q in self._per_source.values() for e in q))
        for _, source_id, _ in entries:
            counts[source_id] += 1
        return counts

    def add(self, kind: str, source_id: str, frame: str, trigger: str | None = None) -> bool:
        """Remember ``frame`` (``trigger``: the trigger's name, for a trigger frame); returns
        True if ``source_id`` was not seen before."""
        new = source_id not in self._sources
        self._sources[source_id] = None
        if kind == "caption" and self.size > 0:
            entry = (next(self._order), source_id, frame)
            if self.scope == "global":
                self._global.append(entry)
            else:
                self._per_source.setdefault(source_id, deque(maxlen=self.size)).append(entry)
        elif kind == "status":
            self._status[source_id] = frame
        elif kind == "trigger" and trigger is not None:
            if not self.watching((source_id, trigger)):
                return new
            self._triggers.pop((source_id, trigger), None)
            self._triggers[(source_id, trigger)] = frame
        return new

    def trigger_pairs(self) -> list[tuple[str, str]]:
        """The (source, trigger) pairs whose latest frame is held, oldest change first."""
        return list(self._triggers)

    def watching(self, pair: tuple[str, str]) -> bool:
        """Whether frames of ``pair`` are wanted: the last :meth:`forget_triggers` kept it
        (every pair before the first call)."""
        return self._watched is None or self._watched(pair)

    def forget_triggers(self, keep: Callable[[tuple[str, str]], bool]) -> list[tuple[str, str]]:
        """Drop the latest frame of every pair ``keep`` refuses (a trigger removed at run
        time), and from now on refuse their frames (one decided before the removal and
        sent after it); returns the pairs dropped."""
        self._watched = keep
        gone = [pair for pair in self._triggers if not keep(pair)]
        for pair in gone:
            del self._triggers[pair]
        return gone

    def replay(self, new: Subscription, old: Subscription | None,
               limit: int) -> list[tuple[str, str]]:
        """Frames to send after a subscription changes from ``old`` to ``new``.

        Only what ``new`` adds is replayed (a source and kind ``old`` already
        delivered is skipped): first the latest status of each newly covered
        source, then the latest trigger frame of each of its (source, trigger)
        pairs (oldest change first; not limited by ``limit``), then up to
        ``limit`` captions (per source or overall, as ``scope`` says), oldest
        first.

        Returns:
            ``(kind, frame)`` pairs in sending order.
        """
        def added(kind: str, source_id: str) -> bool:
            return new.wants(kind, source_id) and not (old is not None
                                                        and old.wants(kind, source_id))

        out: list[tuple[str, str]] = [
            ("status", frame) for sid, frame in self._status.items() if added("status", sid)
        ]
        out.extend(("trigger", frame) for (sid, _), frame in self._triggers.items()
                   if added("trigger", sid))
        if limit <= 0:
            return out
        if self.scope == "global":
            picked = [e for e in self._global if added("caption", e[1])][-limit:]
        else:
            picked = []
            for sid, entries in self._per_source.items():
                if added("caption", sid):
                    picked.extend(list(entries)[-limit:])
            picked.sort(key=lambda e: e[0])
        out.extend(("caption", frame) for _, _, frame in picked)
        return out


# --------------------------------------------------------------------------- connection gate


class Admission(enum.Enum):
    """What a listener does with a connection it has just accepted."""

    SERVE = "serve"
    """Within ``max_clients``: its handshake goes on; it may become a client."""
    REFUSE = "refuse"
    """Over the cap: its request is read and answered ``503 Service Unavailable``."""
    ABORT = "abort"
    """Over the cap and every refusal slot busy: closed at once, without an answer."""


class ConnectionGate:
    """A listener's open connections, counted from accept to close, handshakes included.

    A connection still in its handshake (or refused for a bad token) holds a file
    descriptor as surely as a subscribed client, so it counts against
    ``max_clients`` from the moment it is accepted. Past the cap, up to
    ``refusal_slots`` more are held just long enough to read their request and
    answer 503; past those, a connection is closed at once. A listener therefore
    never holds more than ``max_clients + refusal_slots`` connections.
    """

    def __init__(self, max_clients: int, refusal_slots: int) -> None:
        if max_clients < 1 or refusal_slots < 0:
            raise ValueError(f"expected max_clients >= 1 and refusal_slots >= 0 "
                             f"(got {max_clients}, {refusal_slots})")
        self.max_clients = max_clients
        self.refusal_slots = refusal_slots
        self._open = dict.fromkeys(Admission, 0)

    def __len__(self) -> int:
        """Connections held now, whatever their admission."""
        return sum(self._open.values())

    def held(self, admission: Admission) -> int:
        """Connections held now with this admission."""
        return self._open[admission]

    def open(self) -> Admission:
        """Admit a connection just accepted; pair every call with :meth:`close`."""
        if self._open[Admission.SERVE] < self.max_clients:
            admission = Admission.SERVE
        elif self._open[Admission.REFUSE] < self.refusal_slots:
            admission = Admission.REFUSE
        else:
            admission = Admission.ABORT
        self._open[admission] += 1
        return admission

    def close(self, admission: Admission) -> None:
        """A connection admitted as ``admission`` has closed."""
        if self._open[admission] < 1:
            raise ValueError(f"no {admission.value} connection is open")
        self._open[admission] -= 1
