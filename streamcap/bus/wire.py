"""Pipeline messages as versioned JSON frames: the ``streamcap.v1`` protocol.

Pure functions, no I/O. Every sink that speaks JSON (WebSocket, MQTT,
JSON-lines files) builds its payloads here, so one schema covers them all:
``docs/protocol.md`` documents it and ``docs/streamcap.v1.schema.json`` is the
machine-readable JSON Schema that the tests validate :func:`to_wire` output
against.

Every frame is a JSON object with ``"type"`` (``hello``, ``caption``,
``embedding``, ``status`` or ``error``) and ``"v"`` (:data:`PROTOCOL_VERSION`).
``hello``, ``caption`` and ``embedding`` frames carry the ``run_id`` of the
daemon run they come from: ``seq`` and the stream clock start again with
each run, and ``window_id`` (which holds the run id) never repeats.
Non-finite floats (a ``-inf`` log-probability, say) become ``null`` so that
every frame is strict JSON, and credentials in URLs inside a status reason
are masked (``rtsp://***@cam/...``) whatever the source put there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Final, Literal

import numpy as np

from streamcap.messages import (
    Caption,
    CaptionCandidate,
    Embedding,
    Float32Array,
    Published,
    SourceStatus,
    TriggerEvent,
)
from streamcap.redact import redact

PROTOCOL: Final = "streamcap.v1"
PROTOCOL_VERSION: Final = 1

Kind = Literal["caption", "embedding", "status", "trigger"]
KINDS: Final[frozenset[str]] = frozenset({"caption", "embedding", "status", "trigger"})
"""The message kinds, as used on the wire and in a sink's ``accepts``."""

EMBEDDING_DIGITS: Final = 6
"""Significant digits kept for each embedding component (float32 holds about 7)."""


def kind_of(msg: Published) -> Kind:
    """The wire and config name of a message's kind.

    Raises:
        TypeError: ``msg`` is not a Caption, Embedding or SourceStatus.
    """
    if isinstance(msg, Caption):
        return "caption"
    if isinstance(msg, Embedding):
        return "embedding"
    if isinstance(msg, SourceStatus):
        return "status"
    if isinstance(msg, TriggerEvent):
        return "trigger"
    raise TypeError(
        f"cannot publish {type(msg).__name__}: expected Caption, Embedding, SourceStatus "
        f"or TriggerEvent"
    )


def _num(value: float | None) -> float | None:
    """``value`` as a plain float, or None when it is None, NaN or infinite."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _candidate(c: CaptionCandidate) -> dict[str, object]:
    return {
        "text": c.text,
        "score": _num(c.score),
        "decoder_score": _num(c.decoder_score),
        "encoder_score": _num(c.encoder_score),
        "flagged": bool(c.flagged),
        "error_prob": _num(c.error_prob),
    }


def _vector(vector: Float32Array) -> list[float | None]:
    """float32 (dim,) -> list of floats rounded to :data:`EMBEDDING_DIGITS` significant digits."""
    flat = np.asarray(vector, dtype=np.float32).reshape(-1)
    return [_num(float(f"{x:.{EMBEDDING_DIGITS}g}")) for x in flat.tolist()]


def _window_fields(msg: Caption | Embedding) -> dict[str, object]:
    """What captions and embeddings both say of their window."""
    return {"run_id": msg.run_id, "window_id": msg.window_id, "source_id": msg.source_id,
            "seq": int(msg.seq), "start_s": _num(msg.start_s), "end_s": _num(msg.end_s)}


def to_wire(msg: Published, *, node_id: str) -> dict[str, object]:
    """The JSON-ready frame of one published message.

    Args:
        msg: A Caption, Embedding or SourceStatus.
        node_id: The daemon's node id (``[daemon] node_id``).

    Returns:
        A dict of JSON types only (str, int, float, bool, None, list, dict),
        keys in a stable order: ``type``, ``v``, ``node_id``, then the fields
        (``run_id`` first for a caption or an embedding).
        An embedding's ``vector`` is the float32 (dim,) array as a list of
        ``dim`` floats rounded to 6 significant digits.

    Raises:
        TypeError: ``msg`` is not a publishable message.
    """
    kind = kind_of(msg)
    frame: dict[str, object] = {"type": kind, "v": PROTOCOL_VERSION, "node_id": node_id}
    if isinstance(msg, Caption):
        frame.update(
            _window_fields(msg),
            captured_at=_num(msg.captured_at),
            text=msg.text,
            score=_num(msg.score),
            flagged=bool(msg.flagged),
            confidence=_num(msg.confidence),
            abstained=bool(msg.abstained),
            speech=msg.speech,
            model=msg.model,
            latency_ms=_num(msg.latency_ms),
            lag_s=_num(msg.lag_s),
            candidates=[_candidate(c) for c in msg.candidates],
        )
    elif isinstance(msg, Embedding):
        vector = _vector(msg.vector)
        frame.update(
            _window_fields(msg),
            model=msg.model,
            dim=len(vector),
            vector=vector,
        )
    elif isinstance(msg, TriggerEvent):
        frame.update(
            run_id=msg.run_id,
            event_id=msg.event_id,
            fired_id=msg.fired_id or None,
            trigger=msg.trigger,
            source_id=msg.source_id,
            state=str(msg.state.value),
            score=_num(msg.score),
            threshold=_num(msg.threshold),
            start_s=_num(msg.start_s),
            end_s=_num(msg.end_s),
            captured_at=_num(msg.captured_at),
            model=msg.model,
            caption=msg.caption,
            clip=msg.clip,
        )
    else:
        frame.update(
            source_id=msg.source_id,
            state=str(msg.state.value),
            reason=redact(msg.reason),
            at=_num(msg.at),
            retry_in_s=_num(msg.retry_in_s),
            attempt=int(msg.attempt),
        )
    return frame


def hello(node_id: str, capabilities: Mapping[str, object], *, run_id: str) -> dict[str, object]:
    """The first frame a sink sends to a new subscriber.

    Args:
        node_id: The daemon's node id.
        capabilities: What this endpoint offers, e.g. ``{"kinds": [...],
            "sources": [...], "backfill": 20}``; copied shallowly.
        run_id: The daemon run's id (fresh and random at each start): a
            client that sees it change knows the daemon restarted, so that
            ``seq`` started again at 0 and the in-memory history is new.
    """
    return {
        "type": "hello",
        "v": PROTOCOL_VERSION,
        "protocol": PROTOCOL,
        "node_id": node_id,
        "run_id": run_id,
        "capabilities": dict(capabilities),
    }


def error_frame(code: str, message: str, **details: object) -> dict[str, object]:
    """A structured error for a subscriber (a malformed client frame, a refused request).

    Args:
        code: A short machine-readable code such as ``"bad_json"``.
        message: A human-readable explanation.
        **details: Extra JSON-ready context, nested under ``"details"``.
    """
    return {
        "type": "error",
        "v": PROTOCOL_VERSION,
        "code": code,
        "message": message,
        "details": dict(details),
    }


def encode(frame: Mapping[str, object]) -> str:
    """A frame as compact, strict JSON text (UTF-8 characters kept, no NaN)."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
