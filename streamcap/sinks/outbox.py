"""The MQTT sink's on-disk outbox: captions wait here until the broker acknowledges them.

At-least-once delivery across broker outages and daemon restarts, in order,
within a bound. Plain synchronous file logic (no asyncio, no MQTT): the sink
appends each caption before trying to publish it, publishes the oldest
pending records first, and acknowledges a record only once the broker
confirmed it (PUBACK). A record that was published but not yet acknowledged
when the connection or the process died is published again later: consumers
recognise such duplicates by their key (the caption's ``window_id``).

Layout on disk (``directory``)::

    0000000000000001.seg    append-only segment: one record per line
    0000000000000042.seg    (named after the first sequence number it holds)
    acked                   the highest acknowledged sequence number, as text

A record line is ``<crc32 as 8 hex digits> <json>\\n`` where the JSON object
holds ``seq``, ``key``, ``topic`` and ``payload`` (UTF-8 text). Records are
never rewritten: acknowledging moves the number in ``acked`` forward
(written to a temporary file, flushed and renamed over the old one), and a
segment whose records are all acknowledged is deleted. Dropping the oldest
records when the outbox is full is an acknowledgement that nobody confirmed,
counted and reported to the caller.

Crash safety: a torn last line (power cut mid-write), a bit flip, or any line
that fails its checksum or does not parse is skipped with a warning when the
outbox is reopened; the rest loads. Appends after a reopen always go to a new
segment, so a torn line never merges with a new record. A lost or unreadable
``acked`` file means records are sent again (duplicates), never lost.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from streamcap.logs import get_logger

_log = get_logger(__name__)

SEGMENT_SUFFIX: Final = ".seg"
ACK_FILE: Final = "acked"
DEFAULT_SEGMENT_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRecord:
    """One pending message.

    Attributes:
        seq: Position in the outbox; strictly increasing, never reused.
        key: Identifies duplicates downstream (a caption's ``window_id``).
        topic: The MQTT topic to publish on.
        payload: The message body (UTF-8 text, usually JSON).
    """

    seq: int
    key: str
    topic: str
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes counted against the outbox bound (topic + payload)."""
        return len(self.topic.encode()) + len(self.payload)


def encode_record(record: OutboxRecord) -> bytes:
    """The record's line in a segment file, newline included.

    Raises:
        ValueError: The payload is not UTF-8 text.
    """
    try:
        text = record.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"outbox payloads must be UTF-8 text (record {record.key!r})") from exc
    body = json.dumps(
        {"seq": record.seq, "key": record.key, "topic": record.topic, "payload": text},
        ensure_ascii=True, separators=(",", ":"),
    ).encode("ascii")
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_record(line: bytes) -> OutboxRecord:
    """Parse one segment line (with or without its newline).

    Raises:
        ValueError: The checksum does not match or the line is not a record.
    """
    line = line.rstrip(b"\n")
    head, sep, body = line.partition(b" ")
    if not sep or len(head) != 8:
        raise ValueError("no checksum")
    try:
        crc = int(head, 16)
    except ValueError:
        raise ValueError("bad checksum field") from None
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    try:
        obj = json.loads(body)
        seq, key, topic, payload = obj["seq"], obj["key"], obj["topic"], obj["payload"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("not a record") from None
    if (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1 or not isinstance(key, str)
            or not isinstance(topic, str) or not isinstance(payload, str)):
        raise ValueError("record fields have the wrong types")
    return OutboxRecord(seq=seq, key=key, topic=topic, payload=payload.encode("utf-8"))


def _segment_first_seq(path: Path) -> int | None:
    stem = path.name[: -len(SEGMENT_SUFFIX)]
    return int(stem) if stem.isdigit() else None


class Outbox:
    """A bounded, persistent FIFO of records awaiting acknowledgement.

    Opening loads what a previous run left (pending records, oldest first).
    Every pending record is also held in memory, so the bound
    (``max_messages``, ``max_bytes``) is the memory cost too.

    Args:
        directory: Where the segments and the ack file live (created if missing).
        max_messages: Most records pending at once (>= 1).
        max_bytes: Most bytes (topics + payloads) pending at once (>= 1).
        segment_bytes: A new segment starts once the current one is this big.
        fsync: Flush appends and acknowledgements to the disk before returning
            (survives a power cut, costs a few milliseconds per call).

    Raises:
        ValueError: A bound is < 1.
        OSError: The directory cannot be created or read.
    """

    def __init__(self, directory: Path, *, max_messages: int, max_bytes: int,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, fsync: bool = True) -> None:
        if max_messages < 1 or max_bytes < 1 or segment_bytes < 1:
            raise ValueError(f"outbox bounds must be >= 1 (max_messages={max_messages}, "
                             f"max_bytes={max_bytes}, segment_bytes={segment_bytes})")
        self.directory = directory
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._pending: deque[OutboxRecord] = deque()
        self._bytes = 0
        self._acked = 0
        self._next_seq = 1
        self._segments: list[tuple[int, Path]] = []  # (first seq, path), oldest first
        self._current: tuple[Path, int] | None = None  # segment appended to, its size
        self.dropped_total = 0
        self.skipped_total = 0  # corrupted records found while loading
        directory.mkdir(parents=True, exist_ok=True)
        self._load()

    # ------------------------------------------------------------------ state

    @property
    def depth(self) -> int:
        """Records pending."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes pending (topics + payloads)."""
        return self._bytes

    def __iter__(self) -> Iterator[OutboxRecord]:
        return iter(tuple(self._pending))

    def peek(self, n: int) -> list[OutboxRecord]:
        """Up to ``n`` oldest pending records, oldest first (they stay pending)."""
        return [self._pending[i] for i in range(min(n, len(self._pending)))]

    # ------------------------------------------------------------------ changes

    def append(self, *, key: str, topic: str, payload: bytes) -> list[OutboxRecord]:
        """Persist a new record at the end.

        When the bound would be exceeded, the oldest pending records are
        dropped (a record bigger than ``max_bytes`` on its own drops itself).

        Returns:
            The records dropped to make room, oldest first (usually none).

        Raises:
            ValueError: ``payload`` is not UTF-8 text.
            OSError: The segment cannot be written.
        """
        record = OutboxRecord(seq=self._next_seq, key=key, topic=topic, payload=payload)
        line = encode_record(record)
        self._write(line, record.seq)
        self._next_seq += 1
        self._pending.append(record)
        self._bytes += record.size
        dropped = self._enforce_bound()
        return dropped

    def ack(self, seq: int) -> int:
        """Acknowledge every pending record up to and including ``seq``.

        Returns:
            How many records left the outbox.

        Raises:
            OSError: The ack file cannot be written.
        """
        n = 0
        while self._pending and self._pending[0].seq <= seq:
            self._bytes -= self._pending.popleft().size
            n += 1
        if n:
            self._set_acked(max(self._acked, seq if not self._pending else
                                self._pending[0].seq - 1))
        return n

    def close(self) -> None:
        """Nothing is buffered in memory that is not on disk; kept for symmetry."""
        self._current = None

    # ------------------------------------------------------------------ internals

    def _enforce_bound(self) -> list[OutboxRecord]:
        dropped: list[OutboxRecord] = []
        while self._pending and (len(self._pending) > self.max_messages
                                 or self._bytes > self.max_bytes):
            victim = self._pending.popleft()
            self._bytes -= victim.size
            dropped.append(victim)
        if dropped:
            self.dropped_total += len(dropped)
            self._set_acked(dropped[-1].seq)
        return dropped

    def _write(self, line: bytes, seq: int) -> None:
        if self._current is None or self._current[1] >= self.segment_bytes:
            path = self.directory / f"{seq:016d}{SEGMENT_SUFFIX}"
            self._segments.append((seq, path))
            self._current = (path, 0)
        path, size = self._current
        with path.open("ab") as fh:
            fh.write(line)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        self._current = (path, size + len(line))

    def _set_acked(self, seq: int) -> None:
        self._acked = seq
        tmp = self.directory / f"{ACK_FILE}.tmp"
        with tmp.open("w", encoding="ascii") as fh:
            fh.write(f"{seq}\n")
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, self.directory / ACK_FILE)
        self._collect_segments()

    def _collect_segments(self) -> None:
        """Delete segments that hold only acknowledged records."""
        if not self._pending:
            for _, path in self._segments:
                path.unlink(missing_ok=True)
            self._segments.clear()
            self._current = None
            return
        first_pending = self._pending[0].seq
        keep = 0
        # segment i holds seqs [first_i, first_{i+1}); it is done when first_{i+1} <= first_pending
        while keep + 1 < len(self._segments) and self._segments[keep + 1][0] <= first_pending:
            self._segments[keep][1].unlink(missing_ok=True)
            keep += 1
        del self._segments[:keep]

    def _read_acked(self) -> int:
        path = self.directory / ACK_FILE
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            _log.warning("outbox ack file unreadable; pending records will be sent again",
                         path=str(path), error=str(exc))
            return 0
        if not text.isdigit():
            _log.warning("outbox ack file corrupted; pending records will be sent again",
                         path=str(path), content=text[:40])
            return 0
        return int(text)

    def _load(self) -> None:
        self._acked = self._read_acked()
        highest = self._acked
        found = sorted((first, p) for p in self.directory.glob(f"*{SEGMENT_SUFFIX}")
                       if (first := _segment_first_seq(p)) is not None)
        last_seq = self._acked
        for first, path in found:
            highest = max(highest, first)
            self._segments.append((first, path))
            for lineno, line in enumerate(path.read_bytes().splitlines(keepends=True), 1):
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("torn write (no end of line)")
                    record = decode_record(line)
                except ValueError as exc:
                    self.skipped_total += 1
                    _log.warning("outbox record corrupted, skipped", path=str(path),
                                 line=lineno, reason=str(exc))
                    continue
                highest = max(highest, record.seq)
                if record.seq <= last_seq:
                    continue  # acknowledged already (or out of order: never re-send backwards)
                last_seq = record.seq
                self._pending.append(record)
                self._bytes += record.size
        self._next_seq = highest + 1
        if self.skipped_total:
            _log.warning("outbox loaded with corrupted records skipped",
                         directory=str(self.directory), skipped=self.skipped_total,
                         pending=len(self._pending))
        dropped = self._enforce_bound()
        if dropped:
            _log.warning("outbox over its bound after reopening; oldest records dropped",
                         directory=str(self.directory), dropped=len(dropped),
                         first_key=dropped[0].key)
        if not dropped:
            self._collect_segments()
