"""streamcap.bus.wire: golden frames, JSON Schema conformance, number handling."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcap.bus.wire import (
    KINDS,
    PROTOCOL,
    PROTOCOL_VERSION,
    encode,
    error_frame,
    hello,
    kind_of,
    to_wire,
)
from streamcap.messages import (
    Caption,
    CaptionCandidate,
    Embedding,
    SourceState,
    SourceStatus,
    TriggerEvent,
    TriggerState,
)

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
SCHEMA_PATH = ROOT / "docs" / "streamcap.v1.schema.json"
UPDATE = os.environ.get("STREAMCAP_UPDATE_SNAPSHOTS") == "1"
RUN = "3f2a9c51d07e4b88"
WINDOW_ID = f"kitchen:{RUN}:0:20000"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def caption() -> Caption:
    return Caption(
        window_id=WINDOW_ID,
        run_id=RUN,
        source_id="kitchen",
        seq=3,
        start_s=20.0,
        end_s=30.0,
        captured_at=1767225620.25,
        text="a dog barks while a kettle whistles",
        score=0.8125,
        flagged=False,
        candidates=(
            CaptionCandidate(text="a dog barks while a kettle whistles", decoder_score=-1.25,
                             encoder_score=0.375, score=0.8125, flagged=False, error_prob=0.0625),
            CaptionCandidate(text="a dog dog barks", decoder_score=-2.5, encoder_score=None,
                             score=0.25, flagged=True, error_prob=None),
        ),
        model="enclap-tiny",
        latency_ms=812.5,
        lag_s=1.5,
        confidence=0.375,
        abstained=False,
    )


def embedding() -> Embedding:
    vector = np.array([0.6, -0.8, 0.0, 1.0 / 3.0], dtype=np.float32)
    vector.flags.writeable = False
    return Embedding(window_id=WINDOW_ID, run_id=RUN, source_id="kitchen", seq=3,
                     start_s=20.0, end_s=30.0, model="clap-tiny", vector=vector)


def status() -> SourceStatus:
    return SourceStatus(source_id="porch", state=SourceState.RETRYING,
                        reason="rtsp://cam/live: connection refused", at=1767225600.5,
                        retry_in_s=2.0, attempt=2)


def trigger(state: TriggerState = TriggerState.ON, fired_id: str = "") -> TriggerEvent:
    return TriggerEvent(event_id=f"{RUN}-dog-kitchen-2", trigger="dog", source_id="kitchen",
                        state=state, score=0.3125, threshold=0.25, start_s=41.0, end_s=46.0,
                        captured_at=1767225646.5, model="clap-tiny", run_id=RUN,
                        fired_id=fired_id, caption="a dog barks while a kettle whistles")


def announcement() -> TriggerEvent:
    """What the engine publishes at start for every pair it watches: off, no firing."""
    return TriggerEvent(event_id=f"{RUN}-dog-kitchen-1", trigger="dog", source_id="kitchen",
                        state=TriggerState.OFF, score=math.nan, threshold=math.nan,
                        start_s=math.nan, end_s=math.nan, captured_at=1767225600.0,
                        model="clap-tiny", run_id=RUN)


FRAMES: dict[str, Any] = {
    "hello": lambda: hello("node-a", {"kinds": ["caption", "embedding", "status"],
                                      "sources": ["kitchen", "porch"], "backfill": 20,
                                      "backfill_scope": "source",
                                      "history": {"store": "memory", "covers": "run",
                                                  "max_captions": 20, "scope": "source",
                                                  "captions": {"kitchen": 20, "porch": 3}}},
                           run_id=RUN),
    "caption": lambda: to_wire(caption(), node_id="node-a"),
    "embedding": lambda: to_wire(embedding(), node_id="node-a"),
    "status": lambda: to_wire(status(), node_id="node-a"),
    "error": lambda: error_frame("bad_json", "frame is not valid JSON", offset=7),
    "trigger": lambda: to_wire(trigger(), node_id="node-a"),
}


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_frame_matches_golden_snapshot(name: str) -> None:
    text = json.dumps(FRAMES[name](), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    path = SNAPSHOTS / f"{name}.json"
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_frame_validates_against_schema(
    name: str, validator: jsonschema.Draft202012Validator
) -> None:
    frame = FRAMES[name]()
    validator.validate(frame)
    assert frame["type"] == name
    assert frame["v"] == PROTOCOL_VERSION


def test_every_snapshot_file_is_a_known_frame(validator: jsonschema.Draft202012Validator) -> None:
    names = {p.stem for p in SNAPSHOTS.glob("*.json")}
    assert names == set(FRAMES)
    for p in SNAPSHOTS.glob("*.json"):
        validator.validate(json.loads(p.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("caption", lambda f: f.pop("window_id")),
        ("caption", lambda f: f.pop("run_id")),
        ("caption", lambda f: f.update(run_id="")),
        ("embedding", lambda f: f.pop("run_id")),
        ("hello", lambda f: f.pop("run_id")),
        ("hello", lambda f: f.update(run_id="a:b")),
        ("hello", lambda f: f["capabilities"]["history"].update(store="disk")),
        ("caption", lambda f: f.update(seq="3")),
        ("caption", lambda f: f.update(extra=1)),
        ("embedding", lambda f: f.update(vector="AAAA")),
        ("status", lambda f: f.update(state="sleeping")),
        ("hello", lambda f: f.update(protocol="streamcap.v2")),
        ("error", lambda f: f.pop("code")),
        ("caption", lambda f: f.update(v=2)),
        ("caption", lambda f: f.pop("confidence")),
        ("caption", lambda f: f.pop("abstained")),
        ("caption", lambda f: f.update(abstained="no")),
        ("caption", lambda f: f.update(confidence="high")),
        ("trigger", lambda f: f.update(state="ON")),
        ("trigger", lambda f: f.update(trigger="dog/bark")),
        ("trigger", lambda f: f.update(event_id="")),
        ("trigger", lambda f: f.pop("fired_id")),
        ("trigger", lambda f: f.pop("run_id")),
        ("trigger", lambda f: f.update(window_id="x")),
    ],
)
def test_schema_rejects_malformed_frames(
    name: str, mutate: Any, validator: jsonschema.Draft202012Validator
) -> None:
    frame = FRAMES[name]()
    mutate(frame)
    assert not validator.is_valid(frame)


def test_an_abstained_caption_says_so_and_keeps_the_model_caption_among_candidates(
    validator: jsonschema.Draft202012Validator,
) -> None:
    from dataclasses import replace

    frame = to_wire(replace(caption(), text="an unfamiliar sound", abstained=True,
                            confidence=0.125), node_id="node-a")
    validator.validate(frame)
    assert frame["abstained"] is True and frame["confidence"] == 0.125
    assert frame["text"] == "an unfamiliar sound"
    assert frame["candidates"][0]["text"] == "a dog barks while a kettle whistles"
    no_retriever = to_wire(replace(caption(), confidence=None), node_id="node-a")
    validator.validate(no_retriever)
    assert no_retriever["confidence"] is None and no_retriever["abstained"] is False


def test_kind_of_names_each_message_type() -> None:
    assert kind_of(caption()) == "caption"
    assert kind_of(embedding()) == "embedding"
    assert kind_of(status()) == "status"
    assert KINDS == {"caption", "embedding", "status", "trigger"}
    with pytest.raises(TypeError, match="expected Caption, Embedding, SourceStatus or Trigger"):
        kind_of("not a message")  # type: ignore[arg-type]


def test_hello_carries_protocol_and_copies_capabilities() -> None:
    caps: dict[str, object] = {"kinds": ["caption"]}
    frame = hello("n", caps, run_id=RUN)
    caps["kinds"] = []
    assert frame["protocol"] == PROTOCOL == "streamcap.v1"
    assert frame["capabilities"] == {"kinds": ["caption"]}
    assert frame["run_id"] == RUN


def test_caption_and_embedding_frames_carry_the_run_and_the_window_id() -> None:
    c, e = to_wire(caption(), node_id="n"), to_wire(embedding(), node_id="n")
    assert c["run_id"] == e["run_id"] == RUN
    assert c["window_id"] == e["window_id"] == WINDOW_ID
    assert WINDOW_ID.split(":") == ["kitchen", RUN, "0", "20000"]


def test_embedding_vector_is_rounded_to_six_significant_digits() -> None:
    frame = to_wire(embedding(), node_id="n")
    assert frame["dim"] == 4
    assert frame["vector"] == [0.6, -0.8, 0.0, 0.333333]
    vec = np.asarray(frame["vector"], dtype=np.float64)
    assert np.allclose(vec, embedding().vector, rtol=5e-6, atol=0)  # half a unit in the 6th digit


def test_non_finite_scores_become_null_and_frames_stay_strict_json(
    validator: jsonschema.Draft202012Validator,
) -> None:
    msg = Caption(window_id=f"a:{RUN}:0:0", run_id=RUN, source_id="a", seq=0, start_s=0.0,
                  end_s=10.0,
                  captured_at=1.0, text="silence", score=float("-inf"), lag_s=float("nan"),
                  candidates=(CaptionCandidate(text="silence", decoder_score=float("-inf")),))
    frame = to_wire(msg, node_id="n")
    assert frame["score"] is None and frame["lag_s"] is None
    candidates = frame["candidates"]
    assert isinstance(candidates, list) and candidates[0]["decoder_score"] is None
    validator.validate(frame)
    assert json.loads(encode(frame)) == frame


def test_status_reason_never_carries_url_credentials() -> None:
    msg = SourceStatus(source_id="porch", state=SourceState.FAILED,
                       reason="rtsp://admin:hunter2@10.0.0.5/live?token=abc refused (401)")
    frame = to_wire(msg, node_id="n")
    assert frame["reason"] == "rtsp://***@10.0.0.5/live?token=*** refused (401)"


def test_encode_is_compact_and_keeps_unicode() -> None:
    text = encode(error_frame("bad_frame", "Unerwartetes Zeichen »x«"))
    assert text == ('{"type":"error","v":1,"code":"bad_frame",'
                    '"message":"Unerwartetes Zeichen »x«","details":{}}')
    with pytest.raises(ValueError):
        encode({"x": math.inf})


_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_text = st.text(max_size=40)
_ids = st.text(alphabet="abcdefghij_-", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    source=_ids, seq=st.integers(0, 2**40), start=st.floats(0, 1e6), text=_text, score=_floats,
    flagged=st.booleans(), latency=st.floats(0, 1e5), lag=_floats,
    cands=st.lists(st.tuples(_text, _floats, st.none() | _floats, st.booleans()), max_size=4),
)
def test_any_caption_validates(
    validator: jsonschema.Draft202012Validator, source: str, seq: int, start: float, text: str,
    score: float, flagged: bool, latency: float, lag: float,
    cands: list[tuple[str, float, float | None, bool]],
) -> None:
    msg = Caption(
        window_id=f"{source}:{RUN}:0:{int(start * 1000)}", run_id=RUN, source_id=source,
        seq=seq, start_s=start,
        end_s=start + 10.0, captured_at=1.7e9 + start, text=text, score=score, flagged=flagged,
        model="m", latency_ms=latency, lag_s=lag,
        candidates=tuple(CaptionCandidate(text=t, decoder_score=d, encoder_score=e,
                                          score=d, flagged=f) for t, d, e, f in cands),
    )
    frame = to_wire(msg, node_id="node")
    validator.validate(frame)
    assert json.loads(encode(frame)) == frame


@settings(max_examples=30, deadline=None)
@given(
    source=_ids,
    values=st.lists(st.floats(-1, 1, width=32), max_size=64),
    state=st.sampled_from(list(SourceState)),
    retry=st.none() | st.floats(0, 3600),
)
def test_any_embedding_and_status_validate(
    validator: jsonschema.Draft202012Validator, source: str, values: list[float],
    state: SourceState, retry: float | None,
) -> None:
    emb = Embedding(window_id=f"{source}:{RUN}:1:0", run_id=RUN, source_id=source, seq=1,
                    start_s=0.0, end_s=10.0, model="m", vector=np.asarray(values, dtype=np.float32))
    frame = to_wire(emb, node_id="node")
    validator.validate(frame)
    assert frame["dim"] == len(values)
    st_frame = to_wire(SourceStatus(source_id=source, state=state, retry_in_s=retry),
                       node_id="node")
    validator.validate(st_frame)
    assert st_frame["state"] == state.value


def test_trigger_frames_on_off_and_announcement(validator: jsonschema.Draft202012Validator) -> None:
    """An on frame has no fired_id; its off carries the on's event_id; an announcement is an
    off without fired_id whose numbers are null (NaN), and every one is strict JSON."""
    on = to_wire(trigger(), node_id="node-a")
    off = to_wire(trigger(TriggerState.OFF, fired_id=str(on["event_id"])), node_id="node-a")
    told = to_wire(announcement(), node_id="node-a")
    for frame in (on, off, told):
        validator.validate(frame)
        assert json.loads(encode(frame)) == frame
    assert kind_of(trigger()) == "trigger"
    assert (on["state"], on["fired_id"]) == ("on", None)
    assert (off["state"], off["fired_id"]) == ("off", on["event_id"])
    assert told["state"] == "off" and told["fired_id"] is None
    assert told["score"] is None and told["threshold"] is None and told["start_s"] is None


def test_speech_and_clip_are_on_the_wire_and_in_the_schema(
        validator: jsonschema.Draft202012Validator) -> None:
    """The speech guard's verdict (null when off) and an event clip's name are carried and
    validate; a clip name that is not "<event_id>.flac" does not."""
    from dataclasses import replace

    for speech in (True, False, None):
        frame = to_wire(replace(caption(), speech=speech), node_id="node-a")
        assert frame["speech"] is speech
        validator.validate(frame)
    event_id = f"{RUN}:dog:kitchen:2"
    on = to_wire(replace(trigger(), event_id=event_id, clip=f"{event_id}.flac"), node_id="n")
    assert on["clip"] == f"{event_id}.flac"
    validator.validate(on)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**on, "clip": "../../etc/passwd"})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**to_wire(caption(), node_id="n"), "speech": "yes"})
