"""The embedded history backend: one SQLite database file (WAL) in the state directory.

Schema version 1 (``PRAGMA user_version``; docs/history.md describes every column):

* ``windows``: one row per captioned window; the audio embedding is stored as int8
  with a per-vector float scale (``q = round(127 * v / max|v|)``), so a 1024-d
  vector takes 1 KiB and the cosine of two unit vectors stays precise.
* ``events``: one row per trigger event.
* ``windows_fts``: an FTS5 index over caption text and candidates, kept in step with
  ``windows`` by triggers (external content).

Durability: WAL with ``synchronous = NORMAL``. A committed transaction survives the
process being killed (``kill -9``): it is in the WAL file, which SQLite replays on
the next open. Only a power loss or OS crash may lose the last transactions before a
checkpoint; FULL would fsync every commit to close that gap at a cost per window.

Every method is blocking and one handle serves one thread at a time
(:class:`~streamcap.history.store.HistoryStore`); :meth:`SqliteHistory.reader` opens
another, read-only connection for another thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import heapq
import json
import math
import os
import sqlite3
import stat
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from streamcap.errors import HistoryCursorError, HistoryError
from streamcap.history.records import (
    HistoryItem,
    HistoryPage,
    Span,
    StoreStats,
    WindowRecord,
    unit_vector,
)
from streamcap.messages import Float32Array, TriggerEvent, TriggerState

if TYPE_CHECKING:
    from streamcap.history.vectors import IndexBatch

SCHEMA_VERSION: Final = 1
"""The ``user_version`` this code writes and reads; a newer one is refused."""

BUSY_TIMEOUT_S: Final = 5.0
"""How long a statement waits for another connection's lock before failing."""
VECTOR_CHUNK: Final = 4096
"""Embeddings decoded at a time by the exact vector search (bounded memory)."""
MAX_TERMS: Final = 64
"""Text search terms used at most (the rest are ignored)."""
MAX_TERM_CHARS: Final = 200
TEXT_SCAN_MIN: Final = 2000
TEXT_SCAN_PER_RESULT: Final = 8
"""The text search ranks the newest ``max(MIN, PER_RESULT * limit)`` matches of a span
(:func:`text_scan`)."""
_IN_CHUNK: Final = 500  # ids per "IN (...)" query
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # what a rowid can be
_DAY_S: Final = 86400.0
SIZE_MARGIN: Final = 1.25
"""One retention run deletes for size at most the excess's worth of average records
times this (and one more)."""
ORPHAN_GRACE_S: Final = 3600.0
"""A file in the clips folder no event names is garbage once older than this (a clip is
written seconds after its event is queued; a temporary file within seconds)."""
CLEAN_MARK_SUFFIX: Final = ".clean"
"""``<file>.clean``: written at a clean close (the file's size and mtime), removed at
open; ``PRAGMA quick_check`` runs at open only without it (a kill, a crash, a file
changed since)."""
SIZE_ROUNDS: Final = 4
"""Rounds of deletion for size in one run at most (the estimate is refined in each)."""
_WINDOW, _EVENT = 0, 1  # kinds in the time order: a window before an event at the same time

_SCHEMA: Final = """
CREATE TABLE windows (
    id INTEGER PRIMARY KEY,
    window_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    start_s REAL NOT NULL,
    end_s REAL NOT NULL,
    start_at REAL NOT NULL,
    end_at REAL NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    score REAL,
    confidence REAL,
    abstained INTEGER NOT NULL,
    flagged INTEGER NOT NULL,
    speech INTEGER,
    candidates TEXT NOT NULL,
    embedding BLOB,
    scale REAL,
    dim INTEGER
);
CREATE INDEX windows_source_time ON windows (source, start_at);
CREATE INDEX windows_time ON windows (start_at);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    trigger TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    score REAL,
    threshold REAL,
    start_s REAL NOT NULL,
    end_s REAL NOT NULL,
    captured_at REAL NOT NULL,
    model TEXT NOT NULL,
    run_id TEXT NOT NULL,
    fired_id TEXT NOT NULL,
    caption TEXT,
    clip TEXT
);
CREATE INDEX events_source_time ON events (source, captured_at);
CREATE INDEX events_time ON events (captured_at);
CREATE VIRTUAL TABLE windows_fts USING fts5(
    text, candidates, content='windows', content_rowid='id',
    tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER windows_fts_insert AFTER INSERT ON windows BEGIN
    INSERT INTO windows_fts (rowid, text, candidates) VALUES (new.id, new.text, new.candidates);
END;
CREATE TRIGGER windows_fts_delete AFTER DELETE ON windows BEGIN
    INSERT INTO windows_fts (windows_fts, rowid, text, candidates)
    VALUES ('delete', old.id, old.text, old.candidates);
END;
CREATE TRIGGER windows_fts_update AFTER UPDATE ON windows BEGIN
    INSERT INTO windows_fts (windows_fts, rowid, text, candidates)
    VALUES ('delete', old.id, old.text, old.candidates);
    INSERT INTO windows_fts (rowid, text, candidates) VALUES (new.id, new.text, new.candidates);
END;
"""

_WINDOW_COLUMNS: Final = ("window_id", "source", "run_id", "seq", "start_s", "end_s", "start_at",
                          "end_at", "model", "text", "score", "confidence", "abstained",
                          "flagged", "speech", "candidates", "embedding", "scale", "dim")
_EVENT_COLUMNS: Final = ("event_id", "trigger", "source", "state", "score", "threshold",
                         "start_s", "end_s", "captured_at", "model", "run_id", "fired_id",
                         "caption", "clip")


def _upsert(table: str, columns: Sequence[str], key: str) -> str:
    # ON CONFLICT ... DO UPDATE (not INSERT OR REPLACE): an update fires the FTS
    # trigger, where REPLACE's implicit delete would not.
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


_INSERT_WINDOW: Final = _upsert("windows", _WINDOW_COLUMNS, "window_id")
_INSERT_EVENT: Final = _upsert("events", _EVENT_COLUMNS, "event_id")


class VectorIndex(Protocol):
    """An approximate nearest-neighbour index that may answer a vector search instead of
    the exact scan (for large spans); see :class:`SqliteHistory`.

    It reads the store's rows through :meth:`SqliteHistory.index_rows` (the rows after a
    key), :meth:`SqliteHistory.index_rows_at` and :meth:`SqliteHistory.window_ids`.
    """

    def nearest(self, store: SqliteHistory, vector: Float32Array, *, model: str, span: Span,
                limit: int) -> list[tuple[str, float]] | None:
        """``(window_id, cosine)`` best first, or None to let the exact scan answer."""
        ...

    def replaced(self, store: SqliteHistory, keys: Sequence[int]) -> None:
        """The rows of ``keys`` (rowids) were written again (a window stored twice): their
        old embeddings must go. Called by :meth:`SqliteHistory.write` after the commit."""
        ...


# --------------------------------------------------------------------------- pure helpers


def encode_embedding(vector: Float32Array) -> tuple[bytes, float, int]:
    """``(int8 bytes, scale, dim)`` of a vector: ``q = round(127 * v / max|v|)``, scale = max|v|."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(v)):
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    if peak <= 0.0:
        return np.zeros(v.size, dtype=np.int8).tobytes(), 0.0, int(v.size)
    q = np.clip(np.rint(v * (127.0 / peak)), -127, 127).astype(np.int8)
    return q.tobytes(), peak, int(v.size)


def decode_embedding(blob: bytes, scale: float, dim: int) -> Float32Array:
    """The float32 vector stored by :func:`encode_embedding` (read-only)."""
    q = np.frombuffer(blob, dtype=np.int8, count=dim)
    v = q.astype(np.float32) * np.float32(scale / 127.0)
    v.flags.writeable = False
    return v


def _real(value: float | None) -> float | None:
    """A float column's value: a non-finite float (a state announcement's NaN score) is
    NULL, since SQLite stores NaN as NULL and a NOT NULL column would refuse it."""
    return None if value is None or not math.isfinite(value) else float(value)


def _float(value: object) -> float:
    """A nullable float column read back: NULL is NaN (see :func:`_real`)."""
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


def _word_char(ch: str) -> bool:
    # The unicode61 tokenizer's token characters: letters, numbers, private use.
    cat = unicodedata.category(ch)
    return cat[0] in "LN" or cat == "Co"


def fts_query(terms: Sequence[str]) -> str | None:
    """An FTS5 query matching any of ``terms`` as plain words, or None (nothing to match).

    Each term becomes an FTS5 string (``"..."`` with ``"`` doubled), so that operators
    (``AND OR NOT NEAR * ^ : ( ) -``) are only words or separators in it; control
    characters (NUL included) are dropped, and a term without a word character is
    left out. A term of several words matches them as a phrase.
    """
    parts: list[str] = []
    for raw in terms[:MAX_TERMS]:
        term = "".join(ch for ch in raw[:MAX_TERM_CHARS]
                       if unicodedata.category(ch)[0] != "C").strip()
        if not any(_word_char(ch) for ch in term):
            continue
        phrase = '"' + term.replace('"', '""') + '"'
        if phrase not in parts:
            parts.append(phrase)
    return " OR ".join(parts) if parts else None


def _index_batch(rows: Sequence[Any], dim: int) -> IndexBatch:
    """``(id, source, start_at, embedding)`` rows as a vector index batch."""
    from streamcap.history.vectors import IndexBatch

    return IndexBatch(
        keys=np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
        codes=np.frombuffer(b"".join(r[3] for r in rows), dtype=np.int8).reshape(len(rows), dim),
        sources=tuple(str(r[1]) for r in rows),
        starts_at=np.fromiter((r[2] for r in rows), dtype=np.float64, count=len(rows)))


def text_scan(limit: int) -> int:
    """How many of a span's newest text matches :meth:`SqliteHistory.text_search` ranks."""
    return max(TEXT_SCAN_MIN, TEXT_SCAN_PER_RESULT * limit)


def _span_sql(span: Span, time_column: str) -> tuple[str, list[Any]]:
    """``AND ...`` conditions of ``span`` on ``source`` and ``time_column``, and their values."""
    sql: list[str] = []
    args: list[Any] = []
    if span.sources:
        sql.append(f"source IN ({', '.join('?' * len(span.sources))})")
        args.extend(span.sources)
    if span.since is not None:
        sql.append(f"{time_column} >= ?")
        args.append(float(span.since))
    if span.until is not None:
        sql.append(f"{time_column} < ?")
        args.append(float(span.until))
    return "".join(f" AND {s}" for s in sql), args


def encode_cursor(at: float, kind: int, row: int, newest_first: bool) -> str:
    raw = json.dumps([at, kind, row, "d" if newest_first else "a"], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, newest_first: bool) -> tuple[float, int, int]:
    """The position a cursor of :func:`encode_cursor` holds.

    Raises:
        ValueError: not such a cursor, or one of the other order.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, kind, row, order = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ValueError("not a history cursor") from exc
    if (not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at)
            or type(kind) is not int or kind not in (_WINDOW, _EVENT)
            or type(row) is not int or not _INT64_MIN <= row <= _INT64_MAX):
        raise ValueError("not a history cursor")
    if order != ("d" if newest_first else "a"):
        raise ValueError("a cursor of the other order")
    return float(at), int(kind), int(row)


# --------------------------------------------------------------------------- the store


class SqliteHistory:
    """The :class:`~streamcap.history.store.HistoryStore` in one SQLite file.

    Args:
        path: the database file (created with its directory when missing, unless
            ``read_only``).
        keep_days: records older than this go (:meth:`enforce_retention`).
        max_bytes: then the oldest go until the database's pages in use + clips are
            under this (:meth:`size_bytes`; about the excess per run at most).
        clips_dir: where event clips are (``TriggerEvent.clip`` is relative to it);
            they go with their events, and a clip file older than ``keep_days`` goes.
        read_only: open for reading only (:meth:`reader`); nothing is created.
        check: run ``PRAGMA quick_check`` at open unless the last write handle closed
            cleanly and the file is unchanged since (:data:`CLEAN_MARK_SUFFIX`); a
            reader never checks.
        vector_index: answers large vector searches approximately; the exact scan
            answers whatever it declines (None: always exact).

    Raises:
        HistoryError: the path is a directory, under a regular file, unreadable, not
            an SQLite database, corrupt, or of a newer schema; the message names it.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_days: float = 30.0,
                 max_bytes: int = 2 * 1024 ** 3, clips_dir: str | os.PathLike[str] | None = None,
                 read_only: bool = False, check: bool = True,
                 vector_index: VectorIndex | None = None) -> None:
        self.path = Path(path)
        self.keep_days = keep_days
        self.max_bytes = max_bytes
        self.clips_dir = None if clips_dir is None else Path(clips_dir)
        self.read_only = read_only
        self.vector_index = vector_index
        self._interrupted = False  # set by interrupt(): retention stops between rounds
        if check and not read_only and self._closed_cleanly():
            check = False  # the file is as the last clean close left it
        self._conn = self._connect(check)
        if not read_only:  # from now on it is open: a kill leaves no mark, the next open checks
            with contextlib.suppress(OSError):
                self._clean_mark().unlink(missing_ok=True)

    # -- opening ----------------------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.path)

    def _fail(self, what: str, exc: BaseException | None = None) -> HistoryError:
        detail = f" ({exc})" if exc is not None and str(exc) else ""
        return HistoryError(f"history store {self.path}: {what}{detail}")

    def _check_path(self) -> None:
        """Refuse a directory, a path under a file, a special or a non-SQLite file."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self.read_only:
                raise self._fail("cannot open: no such file") from None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._fail(f"cannot create its directory {self.path.parent}",
                                 exc) from None
            return
        except NotADirectoryError:
            raise self._fail("cannot open: a part of the path is a file, not a "
                             "directory") from None
        except OSError as exc:
            raise self._fail("cannot open", exc) from None
        if stat.S_ISDIR(st.st_mode):
            raise self._fail("is a directory, not a history database file")
        if not stat.S_ISREG(st.st_mode):
            raise self._fail("is not a regular file")
        if st.st_size == 0:
            return
        try:
            with self.path.open("rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise self._fail("cannot read", exc) from None
        if head != _SQLITE_MAGIC:
            raise self._fail("is not an SQLite database (wrong file header); move it away "
                             "or set [history] path to another file")

    def _connect(self, check: bool) -> sqlite3.Connection:
        self._check_path()
        try:
            if self.read_only:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                       timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S,
                                       isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._fail("cannot open", exc) from None
        try:
            self._prepare(conn, check)
        except HistoryError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise self._fail("cannot open (corrupt or unreadable database)", exc) from None
        return conn

    def _prepare(self, conn: sqlite3.Connection, check: bool) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise self._fail(f"schema version {version} is newer than this streamcap "
                             f"reads ({SCHEMA_VERSION}); upgrade streamcap or set "
                             f"[history] path to another file")
        if check:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise self._fail("the database is corrupt: " + "; ".join(problems)
                                 + "; move it away to start a new history")
        tables = {str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table'")}
        if version == 0:
            if tables:
                raise self._fail("is an SQLite database but not a streamcap history "
                                 f"(tables: {', '.join(sorted(tables)[:5])}); set [history] "
                                 f"path to another file")
            if self.read_only:
                raise self._fail("holds no history yet")
            # auto_vacuum must be set before the first table; WAL after it.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._wal(conn)
            try:  # executescript commits first: the script is its own transaction
                conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA
                                   + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        else:
            missing = {"windows", "events", "windows_fts"} - tables
            if missing:
                raise self._fail(f"schema version {version} but the tables "
                                 f"{', '.join(sorted(missing))} are missing")
            if not self.read_only:
                self._wal(conn)

    @staticmethod
    def _wal(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 8388608")

    def reader(self) -> SqliteHistory:
        """A read-only handle on the same file for another thread (searches, pages)."""
        return SqliteHistory(self.path, keep_days=self.keep_days, max_bytes=self.max_bytes,
                             clips_dir=self.clips_dir, read_only=True, check=False,
                             vector_index=self.vector_index)

    def close(self) -> None:
        self._conn.close()
        if not self.read_only:
            self._mark_clean()

    def _clean_mark(self) -> Path:
        return self.path.with_name(self.path.name + CLEAN_MARK_SUFFIX)

    def _mark_clean(self) -> None:
        """Note that the store was closed cleanly, with the file's size and mtime."""
        try:
            st = self.path.stat()
            self._clean_mark().write_text(json.dumps(
                {"size": st.st_size, "mtime_ns": st.st_mtime_ns}), encoding="utf-8")
        except OSError:
            pass  # no mark: the next open checks the file

    def _closed_cleanly(self) -> bool:
        """Whether the last write handle closed cleanly and the file is unchanged since."""
        try:
            mark = json.loads(self._clean_mark().read_text(encoding="utf-8"))
            st = self.path.stat()
        except (OSError, ValueError):
            return False
        return (isinstance(mark, dict) and mark.get("size") == st.st_size
                and mark.get("mtime_ns") == st.st_mtime_ns)

    def interrupt(self) -> None:
        """Cut a retention run short (from any thread, on shutdown): the statement running
        is aborted and no further round starts; what was committed stays."""
        self._interrupted = True
        self._conn.interrupt()

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except sqlite3.Error as exc:
            raise self._fail(f"cannot {what}", exc) from None

    # -- writing ----------------------------------------------------------------------

    def write(self, items: Sequence[HistoryItem]) -> None:
        if not items:
            return
        windows = [self._window_row(i) for i in items if isinstance(i, WindowRecord)]
        events = [self._event_row(i) for i in items if isinstance(i, TriggerEvent)]
        index = self.vector_index

        def transaction() -> list[int]:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Windows stored before keep their rowid: the vector index must hear of them.
                again = [] if index is None or not windows else self._ids_of(
                    [row[0] for row in windows])
                if windows:
                    conn.executemany(_INSERT_WINDOW, windows)
                if events:
                    conn.executemany(_INSERT_EVENT, events)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return again

        again: list[int] = self._run("write", transaction)
        if again and index is not None:
            index.replaced(self, again)

    def _ids_of(self, window_ids: Sequence[str]) -> list[int]:
        """The rowids of those of ``window_ids`` that are stored."""
        out: list[int] = []
        for i in range(0, len(window_ids), _IN_CHUNK):
            chunk = window_ids[i:i + _IN_CHUNK]
            out.extend(int(r[0]) for r in self._conn.execute(
                f"SELECT id FROM windows WHERE window_id IN ({', '.join('?' * len(chunk))})",
                chunk))
        return out

    @staticmethod
    def _window_row(r: WindowRecord) -> tuple[Any, ...]:
        blob: bytes | None = None
        scale: float | None = None
        dim: int | None = None
        if r.embedding is not None:
            blob, scale, dim = encode_embedding(r.embedding)
        return (r.window_id, r.source_id, r.run_id, r.seq, r.start_s, r.end_s, r.start_at,
                r.end_at, r.model, r.text, _real(r.score), _real(r.confidence), int(r.abstained),
                int(r.flagged), None if r.speech is None else int(r.speech),
                json.dumps(list(r.candidates), ensure_ascii=False), blob, scale, dim)

    @staticmethod
    def _event_row(e: TriggerEvent) -> tuple[Any, ...]:
        return (e.event_id, e.trigger, e.source_id, e.state.value, _real(e.score),
                _real(e.threshold),
                e.start_s, e.end_s, e.captured_at, e.model, e.run_id, e.fired_id, e.caption,
                e.clip)

    # -- reading ----------------------------------------------------------------------

    _WINDOW_SELECT: Final = ("SELECT id, window_id, source, run_id, seq, start_s, end_s, "
                             "start_at, end_at, model, text, score, confidence, abstained, "
                             "flagged, speech, candidates")

    @staticmethod
    def _window(row: Sequence[Any], vectors: bool) -> WindowRecord:
        embedding = None
        if vectors and len(row) > 17 and row[17] is not None:
            embedding = decode_embedding(row[17], float(row[18]), int(row[19]))
        try:
            candidates = tuple(str(c) for c in json.loads(row[16]))
        except (ValueError, TypeError):
            candidates = ()
        return WindowRecord(
            window_id=row[1], source_id=row[2], run_id=row[3], seq=int(row[4]),
            start_s=float(row[5]), end_s=float(row[6]), start_at=float(row[7]),
            end_at=float(row[8]), model=row[9], text=row[10], score=_float(row[11]),
            confidence=None if row[12] is None else float(row[12]),
            abstained=bool(row[13]), flagged=bool(row[14]),
            speech=None if row[15] is None else bool(row[15]), candidates=candidates,
            embedding=embedding)

    _EVENT_SELECT: Final = ("SELECT id, event_id, trigger, source, state, score, threshold, "
                            "start_s, end_s, captured_at, model, run_id, fired_id, caption, "
                            "clip")

    @staticmethod
    def _event(row: Sequence[Any]) -> TriggerEvent:
        return TriggerEvent(
            event_id=row[1], trigger=row[2], source_id=row[3], state=TriggerState(row[4]),
            score=_float(row[5]), threshold=_float(row[6]), start_s=float(row[7]),
            end_s=float(row[8]), captured_at=float(row[9]), model=row[10], run_id=row[11],
            fired_id=row[12], caption=row[13], clip=row[14])

    def windows(self, window_ids: Sequence[str], *, vectors: bool = False
                ) -> dict[str, WindowRecord]:
        columns = self._WINDOW_SELECT + (", embedding, scale, dim" if vectors else "")
        ids = list(dict.fromkeys(window_ids))

        def read() -> dict[str, WindowRecord]:
            out: dict[str, WindowRecord] = {}
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i:i + _IN_CHUNK]
                sql = (f"{columns} FROM windows WHERE window_id IN "
                       f"({', '.join('?' * len(chunk))})")
                for row in self._conn.execute(sql, chunk):
                    out[row[1]] = self._window(row, vectors)
            return out

        found: dict[str, WindowRecord] = self._run("read windows", read)
        return found

    # -- what a vector index reads (streamcap.history.vectors.IndexRows) ---------------

    def index_rows(self, *, model: str, dim: int, after: int, limit: int) -> IndexBatch:
        """At most ``limit`` windows of ``model`` with ``dim``-wide embeddings and a rowid
        above ``after``, in rowid order (a range scan of the primary key)."""
        sql = ("SELECT id, source, start_at, embedding FROM windows WHERE id > ? AND "
               "model = ? AND dim = ? AND embedding IS NOT NULL ORDER BY id LIMIT ?")
        rows = self._run("read embeddings for the vector index", lambda: self._conn.execute(
            sql, [int(after), model, int(dim), int(limit)]).fetchall())
        return _index_batch(rows, dim)

    def index_rows_at(self, keys: Sequence[int], *, model: str, dim: int) -> IndexBatch:
        """The windows of those rowids in ``keys`` still stored with an embedding of
        ``model`` ``dim`` wide, in rowid order."""
        wanted = sorted({int(k) for k in keys})

        def read() -> list[Any]:
            rows: list[Any] = []
            for i in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[i:i + _IN_CHUNK]
                rows.extend(self._conn.execute(
                    "SELECT id, source, start_at, embedding FROM windows WHERE id IN "
                    f"({', '.join('?' * len(chunk))}) AND model = ? AND dim = ? AND "
                    "embedding IS NOT NULL ORDER BY id", [*chunk, model, int(dim)]))
            return rows

        return _index_batch(self._run("read embeddings for the vector index", read), dim)

    def window_ids(self, keys: Sequence[int]) -> dict[int, str]:
        """The window id of each rowid of ``keys`` still stored."""
        wanted = [int(k) for k in keys]

        def read() -> dict[int, str]:
            out: dict[int, str] = {}
            for i in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[i:i + _IN_CHUNK]
                out.update((int(r[0]), str(r[1])) for r in self._conn.execute(
                    f"SELECT id, window_id FROM windows WHERE id IN "
                    f"({', '.join('?' * len(chunk))})", chunk))
            return out

        found: dict[int, str] = self._run("read window ids", read)
        return found

    def text_search(self, terms: Sequence[str], *, span: Span, limit: int) -> list[str]:
        """Window ids in ``span`` matching any of ``terms``: the best ``limit`` by bm25
        (ties: the newer first) among the newest :func:`text_scan` matches of the span
        (newest by rowid, the write order). With no more matches than that in the span
        (any store of modest size) this is the best ``limit`` of all matches; on a long
        history it bounds the work (bm25 costs a lookup per row: all the matches of a
        common word over 30 days took ~200 ms) and keeps the recent matches."""
        query = fts_query(terms)
        if query is None or limit <= 0:
            return []
        where, args = _span_sql(span, "w.start_at")
        where = where.replace("source IN", "w.source IN")

        def run() -> list[Any]:
            rowids, rowid_args = self._span_rowids(span)
            sql = ("WITH recent AS (SELECT windows_fts.rowid AS id, bm25(windows_fts) AS r "
                   "FROM windows_fts JOIN windows AS w ON w.id = windows_fts.rowid "
                   f"WHERE windows_fts MATCH ?{rowids}{where} "
                   "ORDER BY windows_fts.rowid DESC LIMIT ?) "
                   "SELECT w.window_id FROM recent JOIN windows AS w ON w.id = recent.id "
                   "ORDER BY recent.r, w.start_at DESC LIMIT ?")
            return self._conn.execute(
                sql, [query, *rowid_args, *args, text_scan(limit), limit]).fetchall()

        rows = self._run("search caption text", run)
        return [str(r[0]) for r in rows]

    def _span_rowids(self, span: Span) -> tuple[str, list[Any]]:
        """``AND windows_fts.rowid BETWEEN lo AND hi`` for the rowids of ``span``'s windows
        when its times cover under half of the store's (a scan of the time index that
        spares the text search every older or newer match), else nothing."""
        if span.since is None and span.until is None:
            return "", []
        # two queries: SQLite reads one end of the time index for a lone min() or max()
        first = self._conn.execute("SELECT min(start_at) FROM windows").fetchone()[0]
        last = self._conn.execute("SELECT max(start_at) FROM windows").fetchone()[0]
        if first is None:
            return "", []
        since = first if span.since is None else max(first, span.since)
        until = last if span.until is None else min(last, span.until)
        if until - since >= 0.5 * (last - first):
            return "", []
        where, args = _span_sql(span, "start_at")
        lo, hi = self._conn.execute(f"SELECT min(id), max(id) FROM windows WHERE 1{where}",
                                    args).fetchone()
        if lo is None:
            return " AND 0", []
        return " AND windows_fts.rowid BETWEEN ? AND ?", [int(lo), int(hi)]

    def vector_rows(self, *, model: str, dim: int, span: Span,
                    chunk: int = VECTOR_CHUNK) -> Iterator[tuple[list[str], npt.NDArray[np.int8]]]:
        """The stored int8 embeddings of ``model`` (``dim`` wide) in ``span``, ``chunk``
        rows at a time: ``(window_ids, (n, dim) int8)``; for the exact scan and an index."""
        where, args = _span_sql(span, "start_at")
        sql = ("SELECT window_id, embedding FROM windows WHERE model = ? AND dim = ? "
               f"AND embedding IS NOT NULL{where}")
        try:
            cur = self._conn.execute(sql, [model, dim, *args])
            while rows := cur.fetchmany(chunk):
                ids = [str(r[0]) for r in rows]
                matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.int8)
                yield ids, matrix.reshape(len(rows), dim)
        except sqlite3.Error as exc:
            raise self._fail("read embeddings", exc) from None

    def vector_search(self, vector: Float32Array, *, model: str, span: Span,
                      limit: int) -> list[tuple[str, float]]:
        if limit <= 0:
            return []
        if self.vector_index is not None:
            answer = self.vector_index.nearest(self, vector, model=model, span=span, limit=limit)
            if answer is not None:
                return answer
        return self.exact_vector_search(vector, model=model, span=span, limit=limit)

    def exact_vector_search(self, vector: Float32Array, *, model: str, span: Span,
                            limit: int) -> list[tuple[str, float]]:
        """Exact cosine over every embedding of ``model`` in ``span``, best first."""
        query = unit_vector(vector)
        if not np.any(query):
            return []
        best: list[tuple[float, str]] = []  # a min-heap of the best ``limit``
        for ids, q in self.vector_rows(model=model, dim=int(query.size), span=span):
            decoded = q.astype(np.float32)
            norms = np.linalg.norm(decoded, axis=1)
            sims = (decoded @ query) / np.where(norms > 0, norms, 1.0)  # the scale cancels
            top = np.argsort(-sims, kind="stable")[:limit]
            for i in top:
                item = (float(sims[i]), ids[i])
                if len(best) < limit:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
        return [(wid, sim) for sim, wid in sorted(best, key=lambda x: (-x[0], x[1]))]

    def page(self, span: Span, *, cursor: str | None, limit: int,
             newest_first: bool = False) -> HistoryPage:
        after: tuple[float, int, int] | None = None
        if cursor is not None:
            try:
                after = decode_cursor(cursor, newest_first)
            except ValueError as exc:
                raise HistoryCursorError(
                    f"history store {self.path}: cannot page: {exc} (got {cursor[:40]!r}); "
                    "start again without a cursor") from None
        if limit <= 0:
            return HistoryPage(items=(), next_cursor=None)
        op, order = ("<", "DESC") if newest_first else (">", "ASC")
        parts: list[str] = []
        args: list[Any] = []
        for kind, table, column in ((_WINDOW, "windows", "start_at"),
                                    (_EVENT, "events", "captured_at")):
            where, span_args = _span_sql(span, column)
            sql = f"SELECT {column} AS at, {kind} AS kind, id FROM {table} WHERE 1{where}"
            args.extend(span_args)
            if after is not None:
                sql += f" AND ({column}, {kind}, id) {op} (?, ?, ?)"
                args.extend(after)
            parts.append(f"SELECT * FROM ({sql} ORDER BY {column} {order}, id {order} LIMIT ?)")
            args.append(limit + 1)
        sql = (" UNION ALL ".join(parts)
               + f" ORDER BY at {order}, kind {order}, id {order} LIMIT ?")
        args.append(limit + 1)

        def read() -> HistoryPage:
            keys = [(float(r[0]), int(r[1]), int(r[2]))
                    for r in self._conn.execute(sql, args)]
            more = len(keys) > limit
            keys = keys[:limit]
            items = self._items(keys)
            last = keys[-1] if more else None
            return HistoryPage(items=tuple(items), next_cursor=None if last is None
                               else encode_cursor(*last, newest_first))

        page: HistoryPage = self._run("read history", read)
        return page

    def _items(self, keys: Sequence[tuple[float, int, int]]) -> list[HistoryItem]:
        """The records of ``(time, kind, rowid)`` keys, in their order."""
        windows = [k[2] for k in keys if k[1] == _WINDOW]
        events = [k[2] for k in keys if k[1] == _EVENT]
        found: dict[tuple[int, int], HistoryItem] = {}
        for kind, ids, select, make in (
                (_WINDOW, windows, self._WINDOW_SELECT + " FROM windows",
                 lambda row: self._window(row, False)),
                (_EVENT, events, self._EVENT_SELECT + " FROM events", self._event)):
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i:i + _IN_CHUNK]
                for row in self._conn.execute(
                        f"{select} WHERE id IN ({', '.join('?' * len(chunk))})", chunk):
                    found[(kind, int(row[0]))] = make(row)
        return [found[(k[1], k[2])] for k in keys if (k[1], k[2]) in found]

    def recent(self, limit: int, *, per_source: bool) -> list[HistoryItem]:
        if limit <= 0:
            return []

        def read() -> list[HistoryItem]:
            if per_source:  # each source's newest on its (source, time) index
                wins = self._newest_per_source("windows", "start_at", limit)
                evs = self._newest_per_source("events", "captured_at", limit)
            else:
                wins = self._conn.execute(
                    "SELECT start_at, id, source FROM windows "
                    "ORDER BY start_at DESC, id DESC LIMIT ?", [limit]).fetchall()
                evs = self._conn.execute(
                    "SELECT captured_at, id, source FROM events "
                    "ORDER BY captured_at DESC, id DESC LIMIT ?", [limit]).fetchall()
            # The events of the period the windows cover (per source: of that source's).
            oldest: dict[str | None, float] = {}
            for at, _, source in wins:
                key = source if per_source else None
                oldest[key] = min(oldest.get(key, math.inf), float(at))
            kept_events = []
            for at, row, source in evs:
                start = oldest.get(source if per_source else None)
                if start is None and wins and not per_source:
                    continue
                if start is not None and float(at) < start:
                    continue
                kept_events.append((float(at), _EVENT, int(row)))
            keys = sorted([(float(at), _WINDOW, int(row)) for at, row, _ in wins]
                          + kept_events)
            return self._items(keys)

        items: list[HistoryItem] = self._run("read recent history", read)
        return items

    def _newest_per_source(self, table: str, column: str, limit: int) -> list[Any]:
        """``(time, rowid, source)`` of each source's newest ``limit`` rows of ``table``:
        the sources by a skip scan of the ``(source, time)`` index (one seek per source),
        then one ``ORDER BY time DESC LIMIT`` seek each; never a scan of the table."""
        sources = [str(r[0]) for r in self._conn.execute(
            f"WITH RECURSIVE s(x) AS (SELECT min(source) FROM {table} UNION ALL "
            f"SELECT (SELECT min(source) FROM {table} WHERE source > x) FROM s "
            "WHERE x IS NOT NULL) SELECT x FROM s WHERE x IS NOT NULL")]
        rows: list[Any] = []
        for source in sources:
            rows += self._conn.execute(
                f"SELECT {column}, id, source FROM {table} WHERE source = ? "
                f"ORDER BY {column} DESC, id DESC LIMIT ?", [source, limit]).fetchall()
        return rows

    # -- size and retention -------------------------------------------------------------

    def _clip_files(self) -> list[tuple[Path, os.stat_result]]:
        if self.clips_dir is None:
            return []
        out = []
        try:
            entries = list(os.scandir(self.clips_dir))
        except OSError:
            return []
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((Path(entry.path), st))
        return out

    def database_bytes(self) -> int:
        """The database's logical size: its pages in use, ``(page_count - freelist_count)
        * page_size``, as this handle sees them (what the WAL holds included, pages freed
        by deletes excluded). Unlike the files' sizes it shrinks at once when rows are
        deleted, even while a reader's snapshot keeps the WAL from being checkpointed."""
        conn = self._conn
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        return max(0, pages - free) * page_size

    def size_bytes(self) -> int:
        """What ``max_bytes`` limits: the database's logical size (:meth:`database_bytes`)
        and the clips. The WAL is not counted: it is checkpointed and truncated after
        every retention run that deletes (and bounded by ``journal_size_limit``)."""
        return self.database_bytes() + sum(st.st_size for _, st in self._clip_files())

    def stats(self) -> StoreStats:
        def read() -> StoreStats:
            windows = int(self._conn.execute("SELECT count(*) FROM windows").fetchone()[0])
            events = int(self._conn.execute("SELECT count(*) FROM events").fetchone()[0])
            oldest = self._conn.execute(
                "SELECT min(at) FROM (SELECT min(start_at) AS at FROM windows "
                "UNION ALL SELECT min(captured_at) FROM events)").fetchone()[0]
            return StoreStats(windows=windows, events=events, bytes=self.size_bytes(),
                              oldest_at=None if oldest is None else float(oldest))

        found: StoreStats = self._run("read statistics", read)
        return found

    def _clip_path(self, clip: str) -> Path | None:
        """The file of a stored clip name, if it is a plain name inside the clips dir."""
        if self.clips_dir is None or not clip or Path(clip).name != clip or clip in (".", ".."):
            return None
        return self.clips_dir / clip

    def _delete_until(self, cutoff: float, inclusive: bool) -> int:
        """Delete windows and events older than ``cutoff`` (or at it) and their clips."""
        op = "<=" if inclusive else "<"
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            clips = [str(r[0]) for r in conn.execute(
                f"SELECT clip FROM events WHERE captured_at {op} ? AND clip IS NOT NULL",
                [cutoff])]
            gone = conn.execute(f"DELETE FROM windows WHERE start_at {op} ?", [cutoff]).rowcount
            gone += conn.execute(f"DELETE FROM events WHERE captured_at {op} ?",
                                 [cutoff]).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for clip in clips:
            path = self._clip_path(clip)
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
        return max(0, gone)

    def _count(self) -> int:
        return int(self._conn.execute(
            "SELECT (SELECT count(*) FROM windows) + (SELECT count(*) FROM events)"
        ).fetchone()[0])

    def _reclaim(self, *, fts: bool = False) -> bool:
        """Give freed pages back to the file system and shrink the WAL; with ``fts``,
        rewrite the text index first (deleted rows stay in it as tombstones until then).

        Returns False when the checkpoint was busy (a reader holds a snapshot): the
        files keep their size until a later run; nobody waits for the reader.
        """
        if fts:
            self._conn.execute("INSERT INTO windows_fts (windows_fts) VALUES ('optimize')")
        # executescript steps the pragma to its end (execute stops after one freed page)
        self._conn.executescript("PRAGMA incremental_vacuum;")
        return self._checkpoint()

    def _checkpoint(self) -> bool:
        """Checkpoint the WAL and truncate it, without waiting for readers; True if done."""
        busy, log, done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy or log != done:  # a reader's snapshot holds frames back
            return False
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return not busy

    def _prune_unreferenced(self, now: float) -> None:
        """Delete clip files no stored event names (their event was never stored) and
        temporary files left by a killed writer, oldest first, until the store fits;
        a file younger than :data:`ORPHAN_GRACE_S` is left (its event may be queued)."""
        referenced = {str(r[0]) for r in self._conn.execute(
            "SELECT clip FROM events WHERE clip IS NOT NULL")}
        excess = self.size_bytes() - self.max_bytes
        for path, st in sorted(self._clip_files(), key=lambda f: f[1].st_mtime):
            if excess <= 0:
                break
            if path.name in referenced or now - st.st_mtime < ORPHAN_GRACE_S:
                continue
            path.unlink(missing_ok=True)
            excess -= st.st_size

    def _size_budget(self, size: int) -> int:
        """How many of the oldest records one retention run may delete for size: the
        excess over ``max_bytes`` in records of the average size, plus a margin."""
        rows = self._count()
        if not rows or size <= self.max_bytes:
            return 0
        per_row = size / rows
        return min(rows, math.ceil((size - self.max_bytes) / per_row * SIZE_MARGIN) + 1)

    def enforce_retention(self, now: float) -> int:
        if self.read_only:
            raise self._fail("cannot enforce retention on a read-only handle")

        def run() -> int:
            cutoff = now - self.keep_days * _DAY_S
            before = self._count()
            gone = self._delete_until(cutoff, inclusive=False)
            for path, st in self._clip_files():  # clips whose event never got stored
                if st.st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            if gone and not self._reclaim(fts=gone * 10 >= before):
                return gone  # a reader holds the WAL: the size waits for the next run
            if self.size_bytes() > self.max_bytes:  # garbage goes before any record
                self._prune_unreferenced(now)
            # Size: the oldest go, at most about the excess (counted once, from the
            # average record) in a few rounds; the logical size shrinks at once, so a
            # reader's snapshot cannot make a round miss what the last one freed.
            budget = self._size_budget(self.size_bytes())
            for _ in range(SIZE_ROUNDS):
                size = self.size_bytes()
                if size <= self.max_bytes or budget <= 0 or self._interrupted:
                    break
                rows = self._count()
                if not rows:
                    break
                n = min(budget, math.ceil((size - self.max_bytes) * rows / size * 1.05) + 1)
                at = self._conn.execute(
                    "SELECT at FROM (SELECT start_at AS at FROM windows UNION ALL "
                    "SELECT captured_at FROM events) ORDER BY at LIMIT 1 OFFSET ?",
                    [n - 1]).fetchone()
                if at is None:
                    break
                deleted = self._delete_until(float(at[0]), inclusive=True)
                gone += deleted
                budget -= deleted
                # the text index keeps deleted rows as tombstones until it is rewritten
                if not self._reclaim(fts=deleted * 10 >= rows):
                    break  # a reader holds the WAL: go on at the next run
            return gone

        try:
            deleted: int = run()
        except OSError as exc:
            raise self._fail("cannot delete old clips", exc) from None
        except sqlite3.Error as exc:
            raise self._fail("cannot enforce retention", exc) from None
        return deleted
