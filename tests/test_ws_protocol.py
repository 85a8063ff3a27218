"""Tests for streamcap.sinks.ws_protocol: client frames, per-client queue, history."""

from __future__ import annotations

import json

import pytest

from streamcap.sinks.ws_protocol import (
    CONTROL,
    DEFAULT_KINDS,
    Admission,
    BackfillScope,
    ClientQueue,
    ConnectionGate,
    FrameError,
    History,
    PingRequest,
    SubscribeRequest,
    Subscription,
    default_subscription,
    is_utf8_text,
    parse_client_frame,
)

ALL = frozenset({"caption", "embedding", "status", "trigger"})


def parse(obj: object, *, offered: frozenset[str] = ALL, max_backfill: int = 20) -> object:
    data = obj if isinstance(obj, (str, bytes)) else json.dumps(obj)
    return parse_client_frame(data, offered=offered, max_backfill=max_backfill)


# --------------------------------------------------------------------------- subscriptions


def test_default_subscription_is_captions_status_and_triggers_of_every_source() -> None:
    sub = default_subscription(ALL)
    assert sub.kinds == DEFAULT_KINDS == {"caption", "status", "trigger"}
    assert sub.wants("caption", "anything") and sub.wants("status", "x")
    assert sub.wants("trigger", "x")
    assert not sub.wants("embedding", "x")
    assert default_subscription(frozenset({"caption"})).kinds == {"caption"}


def test_subscription_filters_by_source_and_kind() -> None:
    sub = Subscription(sources=frozenset({"kitchen"}), kinds=frozenset({"embedding"}))
    assert sub.wants("embedding", "kitchen")
    assert not sub.wants("embedding", "garden")
    assert not sub.wants("caption", "kitchen")
    assert sub.describe() == {"sources": ["kitchen"], "kinds": ["embedding"]}
    assert Subscription().describe() == {"sources": "*",
                                         "kinds": ["caption", "status", "trigger"]}


# --------------------------------------------------------------------------- client frames


def test_subscribe_with_sources_and_kinds() -> None:
    req = parse({"type": "subscribe", "sources": ["kitchen", "hall"], "kinds": ["caption"],
                 "id": 7})
    assert isinstance(req, SubscribeRequest)
    assert req.subscription == Subscription(sources=frozenset({"kitchen", "hall"}),
                                            kinds=frozenset({"caption"}))
    assert req.request_id == 7 and req.backfill is None


def test_subscribe_defaults_and_wildcards() -> None:
    req = parse({"type": "subscribe"})
    assert isinstance(req, SubscribeRequest)
    assert req.subscription == Subscription(sources=None, kinds=DEFAULT_KINDS)
    req = parse({"type": "subscribe", "sources": "*", "kinds": "*"},
                offered=frozenset({"caption", "embedding"}))
    assert isinstance(req, SubscribeRequest)
    assert req.subscription.kinds == {"caption", "embedding"}
    assert req.subscription.sources is None


def test_subscribe_backfill_is_capped_at_the_sink_setting() -> None:
    req = parse({"type": "subscribe", "backfill": 500}, max_backfill=20)
    assert isinstance(req, SubscribeRequest) and req.backfill == 20
    req = parse({"type": "subscribe", "backfill": 0})
    assert isinstance(req, SubscribeRequest) and req.backfill == 0


def test_ping() -> None:
    assert parse({"type": "ping", "id": "a"}) == PingRequest(request_id="a")
    assert parse({"type": "ping"}) == PingRequest()


@pytest.mark.parametrize(
    ("data", "code", "field"),
    [
        ("not json {", "bad_json", None),
        ("", "bad_json", None),
        (b"\x00\x01", "bad_frame", None),
        ("[1, 2]", "bad_frame", None),
        ('"subscribe"', "bad_frame", None),
        ({"type": "unsubscribe"}, "unknown_type", None),
        ({"kinds": ["caption"]}, "bad_field", "type"),
        ({"type": 3}, "bad_field", "type"),
        ({"type": "subscribe", "sources": "kitchen"}, "bad_field", "sources"),
        ({"type": "subscribe", "sources": [1]}, "bad_field", "sources"),
        ({"type": "subscribe", "sources": [""]}, "bad_field", "sources"),
        ({"type": "subscribe", "kinds": "caption"}, "bad_field", "kinds"),
        ({"type": "subscribe", "kinds": ["captions"]}, "bad_field", "kinds"),
        ({"type": "subscribe", "backfill": -1}, "bad_field", "backfill"),
        ({"type": "subscribe", "backfill": True}, "bad_field", "backfill"),
        ({"type": "subscribe", "backfill": 2.5}, "bad_field", "backfill"),
        ({"type": "subscribe", "source": ["kitchen"]}, "bad_field", None),
        ({"type": "ping", "extra": 1}, "bad_field", None),
        ({"type": "ping", "id": [1]}, "bad_field", "id"),
        ({"type": "ping", "id": "x" * 65}, "bad_field", "id"),
        ({"type": "ping", "id": ""}, "bad_field", "id"),
        ({"type": "ping", "id": 2**53 + 1}, "bad_field", "id"),
        ({"type": "ping", "id": 1.5}, "bad_field", "id"),
        ({"type": "subscribe", "sources": ["k" * 65]}, "bad_field", "sources"),
        ({"type": "subscribe", "sources": [f"s{i}" for i in range(257)]}, "bad_field",
         "sources"),
        ("[" * 100_000, "bad_json", None),
        ('{"type": "ping", "id": ' + "9" * 5000 + "}", "bad_json", None),
    ],
)
def test_malformed_frames_name_the_problem(data: object, code: str, field: str | None) -> None:
    err = parse(data)
    assert isinstance(err, FrameError)
    assert err.code == code
    assert err.message
    if field is not None:
        assert err.details["field"] == field


def test_kind_not_offered_is_a_bad_field() -> None:
    err = parse({"type": "subscribe", "kinds": ["embedding"]},
                offered=frozenset({"caption", "status"}))
    assert isinstance(err, FrameError) and err.code == "bad_field"
    assert "not offered" in err.message


def test_errors_echo_the_request_id() -> None:
    err = parse({"type": "subscribe", "id": "r1", "kinds": 5})
    assert isinstance(err, FrameError) and err.details["id"] == "r1"
    err = parse({"type": "nope", "id": 9})
    assert isinstance(err, FrameError) and err.details == {"field": "type", "id": 9}


@pytest.mark.parametrize(
    ("frame", "field", "echoed_id"),
    [
        ('{"type": "ping", "id": "\\ud800"}', "id", None),
        ('{"type": "subscribe", "id": "a\\udfffb"}', "id", None),
        ('{"type": "subscribe", "id": 4, "sources": ["kitchen", "\\ud800"]}', "sources", 4),
        ('{"type": "subscribe", "sources": ["\\udc80x"]}', "sources", None),
    ],
)
def test_lone_surrogates_in_echoed_strings_are_refused_without_echo(
        frame: str, field: str, echoed_id: int | None) -> None:
    """JSON escapes can spell a lone surrogate, which no UTF-8 frame can carry back:
    such an id or source id is a bad_field, and the answer is encodable."""
    err = parse(frame)
    assert isinstance(err, FrameError) and err.code == "bad_field", err
    assert err.details["field"] == field and err.details.get("id") == echoed_id
    json.dumps({"message": err.message, "details": dict(err.details)},
               ensure_ascii=False).encode("utf-8")  # no UnicodeEncodeError
    assert parse('{"type": "ping", "id": "\\ud83d\\ude00"}') == PingRequest(
        request_id="\U0001f600")  # a surrogate pair is a character: fine
    assert is_utf8_text("caf\u00e9") and not is_utf8_text("\ud800")


MARK = "QQQQ"


@pytest.mark.parametrize(
    "data",
    [
        {"type": MARK * 1000},
        {"type": "subscribe", "kinds": [MARK * 1000]},
        {"type": "subscribe", MARK * 1000: 1},
        {"type": "ping", MARK * 1000: 1},
        {"type": "subscribe", "sources": [MARK * 1000]},
        {"type": "subscribe", "backfill": MARK * 1000},
        {"type": "ping", "id": MARK * 1000},
        {MARK * 1000: "x"},
        '{"type": "' + MARK * 1000,
        MARK * 1000,
        "[" * 50 + MARK * 1000,
    ],
)
def test_errors_never_echo_the_input(data: object) -> None:
    """An answer is never larger than a fixed size, whatever the client sent."""
    err = parse(data)
    assert isinstance(err, FrameError)
    text = json.dumps({"message": err.message, "details": dict(err.details)})
    assert MARK not in text and len(text) < 300


# --------------------------------------------------------------------------- client queue


def drain(q: ClientQueue) -> list[tuple[dict[str, int], str]]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_queue_is_fifo_across_kinds() -> None:
    q = ClientQueue(10)
    for kind, frame in [(CONTROL, "h"), ("caption", "c1"), ("embedding", "e1"),
                        ("status", "s1"), ("caption", "c2")]:
        assert q.push(kind, frame) == []
    assert [f for _, f in drain(q)] == ["h", "c1", "e1", "s1", "c2"]
    assert q.pop() is None and len(q) == 0


def test_queue_drops_embeddings_first_then_oldest_and_reports_once() -> None:
    q = ClientQueue(3)
    q.push(CONTROL, "hello")
    q.push("caption", "c1")
    q.push("embedding", "e1")
    assert q.push("caption", "c2") == ["embedding"]  # e1 goes first, though c1 is older
    assert q.push("caption", "c3") == ["caption"]  # then the oldest caption, c1
    assert q.dropped_total == 2
    items = drain(q)
    assert items[0] == ({"embedding": 1, "caption": 1}, "hello")
    assert [f for _, f in items] == ["hello", "c2", "c3"]
    assert all(d == {} for d, _ in items[1:])


def test_queue_drops_trigger_events_after_captions_and_status() -> None:
    q = ClientQueue(3)
    q.push("trigger", "t1")
    q.push("caption", "c1")
    q.push("status", "s1")
    assert q.push("trigger", "t2") == ["caption"]  # c1 goes, though t1 is older
    assert q.push("embedding", "e1") == ["embedding"]  # the newest goes when it is lowest
    assert q.push("trigger", "t3") == ["status"]
    assert q.push(CONTROL, "pong") == ["trigger"]  # only triggers left: the oldest one
    assert [f for _, f in drain(q)] == ["t2", "t3", "pong"]


def test_queue_drops_control_frames_only_when_nothing_else_is_left() -> None:
    q = ClientQueue(2)
    for i in range(5):
        q.push(CONTROL, f"x{i}")
    assert [f for _, f in drain(q)] == ["x3", "x4"]
    assert q.dropped_total == 3


def test_queue_reports_drops_that_happen_between_pops() -> None:
    q = ClientQueue(2)
    q.push("caption", "c1")
    assert q.pop() == ({}, "c1")
    for i in range(2, 7):
        q.push("caption", f"c{i}")
    assert q.pop() == ({"caption": 3}, "c5")
    assert q.pop() == ({}, "c6")


def test_queue_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        ClientQueue(0)
    with pytest.raises(ValueError, match="max_bytes"):
        ClientQueue(5, 0)


def test_queue_is_bounded_in_bytes_too() -> None:
    q = ClientQueue(100, max_bytes=10)
    assert q.push("caption", "c1234") == []  # 5 bytes
    assert q.push("embedding", "e1234") == []  # 10 bytes: at the bound
    assert q.push("caption", "c5678") == ["embedding"]  # embeddings go first
    assert q.bytes == 10 and len(q) == 2
    assert q.push("caption", "céé") == ["caption"]  # 5 UTF-8 bytes, not 3 characters
    assert q.bytes == 10
    # the newest frame alone is kept even when it is larger than the bound
    assert q.push("caption", "x" * 50) == ["caption", "caption"]
    assert q.bytes == 50 and q.dropped_total == 4
    assert drain(q) == [({"embedding": 1, "caption": 3}, "x" * 50)]
    assert q.bytes == 0


# --------------------------------------------------------------------------- history


def test_history_tracks_sources_and_latest_status() -> None:
    h = History(2)
    assert h.add("status", "kitchen", "s1") is True
    assert h.add("caption", "garden", "g1") is True
    assert h.add("status", "kitchen", "s2") is False
    assert h.add("embedding", "hall", "e1") is True
    assert h.sources == ["kitchen", "garden", "hall"]
    assert h.replay(Subscription(), None, 20) == [("status", "s2"), ("caption", "g1")]


def test_history_per_source_keeps_last_n_of_each_in_arrival_order() -> None:
    h = History(2, "source")
    for frame, src in [("k1", "k"), ("g1", "g"), ("k2", "k"), ("k3", "k"), ("g2", "g"),
                       ("g3", "g")]:
        h.add("caption", src, frame)
    assert [f for _, f in h.replay(Subscription(), None, 2)] == ["k2", "k3", "g2", "g3"]
    assert [f for _, f in h.replay(Subscription(), None, 1)] == ["k3", "g3"]
    only_k = Subscription(sources=frozenset({"k"}))
    assert [f for _, f in h.replay(only_k, None, 5)] == ["k2", "k3"]


def test_history_global_keeps_last_n_overall() -> None:
    h = History(3, "global")
    for frame, src in [("k1", "k"), ("g1", "g"), ("k2", "k"), ("k3", "k"), ("g2", "g")]:
        h.add("caption", src, frame)
    assert [f for _, f in h.replay(Subscription(), None, 3)] == ["k2", "k3", "g2"]
    only_g = Subscription(sources=frozenset({"g"}))
    assert [f for _, f in h.replay(only_g, None, 3)] == ["g2"]
    assert [f for _, f in h.replay(Subscription(), None, 0)] == []


def test_history_replays_only_what_a_new_subscription_adds() -> None:
    h = History(5)
    h.add("caption", "k", "k1")
    h.add("status", "k", "ks")
    h.add("caption", "g", "g1")
    h.add("status", "g", "gs")
    old = Subscription(sources=frozenset({"k"}))
    assert h.replay(Subscription(), old, 5) == [("status", "gs"), ("caption", "g1")]
    assert h.replay(old, Subscription(), 5) == []
    no_captions = Subscription(kinds=frozenset({"status", "embedding"}))
    assert h.replay(no_captions, None, 5) == [("status", "ks"), ("status", "gs")]


def test_history_replays_the_latest_trigger_frame_of_each_pair() -> None:
    h = History(5)
    h.add("trigger", "k", "k-dog-off", trigger="dog")  # the announcement at start
    h.add("trigger", "k", "k-glass-off", trigger="glass")
    h.add("trigger", "g", "g-dog-off", trigger="dog")
    h.add("caption", "k", "k1")
    h.add("trigger", "k", "k-dog-on", trigger="dog")  # replaces the announcement
    h.add("status", "k", "ks")
    assert h.trigger_pairs() == [("k", "glass"), ("g", "dog"), ("k", "dog")]
    # status, then trigger states (oldest change first, whatever the caption limit), captions
    assert h.replay(Subscription(), None, 0) == [
        ("status", "ks"), ("trigger", "k-glass-off"), ("trigger", "g-dog-off"),
        ("trigger", "k-dog-on")]
    only_g = Subscription(sources=frozenset({"g"}))
    assert h.replay(only_g, None, 5) == [("trigger", "g-dog-off")]
    no_triggers = Subscription(kinds=frozenset({"caption"}))
    assert h.replay(no_triggers, None, 5) == [("caption", "k1")]
    assert h.replay(Subscription(), no_triggers, 0) == [
        ("status", "ks"), ("trigger", "k-glass-off"), ("trigger", "g-dog-off"),
        ("trigger", "k-dog-on")]
    assert h.held() == {"k": 1, "g": 0}  # captions only
    # a trigger removed at run time is not replayed any more
    assert h.forget_triggers(lambda pair: pair[1] != "dog") == [("g", "dog"), ("k", "dog")]
    assert h.replay(Subscription(kinds=frozenset({"trigger"})), None, 5) == [
        ("trigger", "k-glass-off")]


def test_history_refuses_late_frames_of_a_forgotten_pair() -> None:
    """A trigger frame decided before its trigger was removed and sent after it does not
    bring the pair back into the replay."""
    h = History(3)
    h.add("trigger", "kitchen", "dog-on", trigger="dog")
    h.add("trigger", "kitchen", "cat-on", trigger="cat")
    assert h.watching(("kitchen", "dog"))  # before any forget: every pair
    h.forget_triggers(lambda pair: pair[1] == "cat")  # dog removed
    h.add("trigger", "kitchen", "dog-late-off", trigger="dog")
    h.add("trigger", "kitchen", "cat-off", trigger="cat")
    assert h.trigger_pairs() == [("kitchen", "cat")]
    assert not h.watching(("kitchen", "dog")) and h.watching(("kitchen", "cat"))
    h.forget_triggers(lambda pair: True)  # dog added again
    h.add("trigger", "kitchen", "dog-announced", trigger="dog")
    assert h.trigger_pairs() == [("kitchen", "cat"), ("kitchen", "dog")]


def test_history_with_size_zero_keeps_no_captions() -> None:
    h = History(0)
    h.add("caption", "k", "k1")
    assert h.replay(Subscription(), None, 10) == []
    assert h.sources == ["k"]
    assert h.held() == {"k": 0}


@pytest.mark.parametrize(("scope", "held"), [("source", {"k": 2, "g": 1, "s": 0}),
                                             ("global", {"k": 1, "g": 1, "s": 0})])
def test_history_says_how_many_captions_it_holds(scope: BackfillScope,
                                                 held: dict[str, int]) -> None:
    h = History(2, scope)
    for src in ["k", "k", "k", "g"]:
        h.add("caption", src, "x")
    h.add("status", "s", "st")
    assert h.held() == held


def test_client_queue_counts_what_is_pending_by_kind() -> None:
    q = ClientQueue(3)
    q.push(CONTROL, "hello")
    q.push("caption", "c1")
    q.push("caption", "c2")
    assert (q.pending(CONTROL), q.pending("caption")) == (1, 2)
    assert q.push("embedding", "e1") == ["embedding"]  # over 3: embeddings go first
    assert q.push("status", "s1") == ["caption"]  # then the oldest caption or status
    assert (q.pending("caption"), q.pending("status"), q.pending("embedding")) == (1, 1, 0)
    q.pop()
    assert q.pending(CONTROL) == 0


# --------------------------------------------------------------------------- connection gate


def test_gate_serves_up_to_the_cap_then_refuses_then_aborts() -> None:
    gate = ConnectionGate(max_clients=2, refusal_slots=1)
    assert [gate.open() for _ in range(5)] == [
        Admission.SERVE, Admission.SERVE, Admission.REFUSE, Admission.ABORT, Admission.ABORT]
    assert len(gate) == 5 and gate.held(Admission.SERVE) == 2
    gate.close(Admission.ABORT)
    gate.close(Admission.ABORT)
    assert gate.open() is Admission.ABORT  # the refusal slot is still taken
    gate.close(Admission.ABORT)
    gate.close(Admission.SERVE)  # a client left: the next one gets in
    assert gate.open() is Admission.SERVE
    gate.close(Admission.REFUSE)
    assert gate.open() is Admission.REFUSE


def test_gate_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        ConnectionGate(0, 1)
    with pytest.raises(ValueError, match="no serve connection is open"):
        ConnectionGate(1, 0).close(Admission.SERVE)
