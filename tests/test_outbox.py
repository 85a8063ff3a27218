"""The MQTT outbox: order, bound, acknowledgement, reopening, corruption."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamcap.sinks.outbox import (
    ACK_FILE,
    SEGMENT_SUFFIX,
    Outbox,
    OutboxRecord,
    decode_record,
    encode_record,
)


def _open(path: Path, **kw: int) -> Outbox:
    return Outbox(path, max_messages=kw.get("max_messages", 100),
                  max_bytes=kw.get("max_bytes", 1 << 20),
                  segment_bytes=kw.get("segment_bytes", 1 << 20), fsync=False)


def _fill(box: Outbox, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        box.append(key=f"kitchen:0:{i}", topic="streamcap/n/kitchen/caption",
                   payload=f'{{"seq":{i},"text":"a dog barks é"}}'.encode())


def _keys(box: Outbox) -> list[str]:
    return [r.key for r in box]


def test_record_round_trip() -> None:
    rec = OutboxRecord(seq=7, key="k:0:1", topic="a/b", payload='{"t":"é\\n"}'.encode())
    line = encode_record(rec)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_record(line) == rec


def test_decode_rejects_a_flipped_byte() -> None:
    line = bytearray(encode_record(OutboxRecord(seq=1, key="k", topic="t", payload=b"{}")))
    line[20] ^= 0x01
    with pytest.raises(ValueError, match="checksum"):
        decode_record(bytes(line))


def test_non_utf8_payload_is_refused(tmp_path: Path) -> None:
    box = _open(tmp_path)
    with pytest.raises(ValueError, match="UTF-8"):
        box.append(key="k", topic="t", payload=b"\xff\xfe")
    assert box.depth == 0


def test_order_is_kept_and_peek_does_not_remove(tmp_path: Path) -> None:
    box = _open(tmp_path)
    _fill(box, 5)
    assert [r.seq for r in box.peek(3)] == [1, 2, 3]
    assert _keys(box) == [f"kitchen:0:{i}" for i in range(5)]
    assert box.depth == 5
    assert box.pending_bytes == sum(r.size for r in box)


def test_ack_removes_a_prefix(tmp_path: Path) -> None:
    box = _open(tmp_path)
    _fill(box, 5)
    assert box.ack(2) == 2
    assert [r.seq for r in box] == [3, 4, 5]
    assert box.ack(2) == 0  # acknowledging again changes nothing
    assert box.ack(5) == 3
    assert box.depth == 0 and box.pending_bytes == 0
    assert not list(tmp_path.glob(f"*{SEGMENT_SUFFIX}"))  # fully acknowledged segments go


def test_bound_by_messages_drops_oldest_and_counts(tmp_path: Path) -> None:
    box = _open(tmp_path, max_messages=3)
    _fill(box, 3)
    dropped = box.append(key="new", topic="t", payload=b"{}")
    assert [r.key for r in dropped] == ["kitchen:0:0"]
    assert _keys(box) == ["kitchen:0:1", "kitchen:0:2", "new"]
    assert box.dropped_total == 1
    _fill(box, 2, start=10)
    assert box.dropped_total == 3
    assert box.depth == 3


def test_bound_by_bytes(tmp_path: Path) -> None:
    payload = b"x" * 100
    size = len(b"t") + len(payload)
    box = _open(tmp_path, max_bytes=size * 2 + 10)
    for i in range(4):
        box.append(key=str(i), topic="t", payload=payload)
    assert _keys(box) == ["2", "3"]
    assert box.dropped_total == 2
    assert box.pending_bytes <= box.max_bytes


def test_a_record_bigger_than_the_bound_drops_itself(tmp_path: Path) -> None:
    box = _open(tmp_path, max_bytes=50)
    box.append(key="small", topic="t", payload=b"{}")
    dropped = box.append(key="huge", topic="t", payload=b"y" * 200)
    assert [r.key for r in dropped] == ["small", "huge"]
    assert box.depth == 0


def test_reopen_resumes_pending_in_order(tmp_path: Path) -> None:
    box = _open(tmp_path, segment_bytes=200)  # several segments
    _fill(box, 10)
    box.ack(4)
    assert len(list(tmp_path.glob(f"*{SEGMENT_SUFFIX}"))) > 1
    box.close()

    again = _open(tmp_path, segment_bytes=200)
    assert [r.seq for r in again] == list(range(5, 11))
    assert _keys(again) == [f"kitchen:0:{i}" for i in range(4, 10)]
    again.append(key="after", topic="t", payload=b"{}")
    assert [r.seq for r in again][-1] == 11  # sequence numbers continue, never reused
    again.ack(11)
    again.close()

    third = _open(tmp_path)
    assert third.depth == 0
    third.append(key="later", topic="t", payload=b"{}")
    assert next(iter(third)).seq == 12


def test_reopen_with_a_smaller_bound_drops_oldest(tmp_path: Path) -> None:
    box = _open(tmp_path)
    _fill(box, 6)
    box.close()
    smaller = _open(tmp_path, max_messages=4)
    assert _keys(smaller) == [f"kitchen:0:{i}" for i in range(2, 6)]
    assert smaller.dropped_total == 2


def test_corrupted_record_is_skipped(tmp_path: Path) -> None:
    box = _open(tmp_path)
    _fill(box, 5)
    box.close()
    (segment,) = tmp_path.glob(f"*{SEGMENT_SUFFIX}")
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"dog", b"cat")  # checksum no longer matches
    lines[3] = b"garbage without a checksum\n"
    segment.write_bytes(b"".join(lines) + b"0000abcd {\"seq\":9")  # and a torn last write

    again = _open(tmp_path)
    assert _keys(again) == ["kitchen:0:0", "kitchen:0:1", "kitchen:0:4"]
    assert again.skipped_total == 3
    again.append(key="next", topic="t", payload=b"{}")  # appends never follow a torn line
    again.close()
    third = _open(tmp_path)
    assert _keys(third)[-1] == "next"
    assert third.skipped_total == 3


def test_corrupted_ack_file_means_resend_not_loss(tmp_path: Path) -> None:
    box = _open(tmp_path)
    _fill(box, 4)
    box.ack(2)
    box.close()
    (tmp_path / ACK_FILE).write_text("not a number")
    again = _open(tmp_path)
    # the acknowledged records 1 and 2 come back (sent twice); 3 and 4 are never lost
    assert [r.seq for r in again] == [1, 2, 3, 4]


def test_invalid_bounds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_messages"):
        Outbox(tmp_path, max_messages=0, max_bytes=10)
