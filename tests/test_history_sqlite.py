"""The SQLite history store: records round trip, text and vector search, pages, retention,
and every way a store file can be unusable (each a HistoryError naming the path)."""

from __future__ import annotations

import dataclasses
import math
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from streamcap.errors import HistoryCursorError, HistoryError
from streamcap.history.records import HistoryItem, Span, WindowRecord
from streamcap.history.sqlite import (
    SCHEMA_VERSION,
    SqliteHistory,
    decode_embedding,
    encode_embedding,
    fts_query,
)
from streamcap.messages import TriggerEvent, TriggerState

DIM = 64
T0 = 1_700_000_000.0


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def window(i: int, *, source: str = "kitchen", text: str = "a dog barks", at: float | None = None,
           embedding: np.ndarray | None = None, model: str = "m1",
           candidates: tuple[str, ...] = ("a dog barks", "a man speaks")) -> WindowRecord:
    start = T0 + 5 * i if at is None else at
    return WindowRecord(window_id=f"{source}-{i}", source_id=source, run_id="run1", seq=i,
                        start_s=5.0 * i, end_s=5.0 * i + 10, start_at=start, end_at=start + 10,
                        model=model, text=text, score=-1.5, confidence=0.75,
                        abstained=i % 3 == 0, flagged=i % 2 == 0,
                        speech=None if i % 3 == 1 else i % 2 == 0,
                        candidates=candidates, embedding=embedding)


def event(i: int, *, at: float, source: str = "kitchen", clip: str | None = None) -> TriggerEvent:
    return TriggerEvent(event_id=f"ev-{i}", trigger="siren", source_id=source,
                        state=TriggerState.ON if i % 2 == 0 else TriggerState.OFF,
                        score=0.8, threshold=0.5, start_s=1.0, end_s=6.0, captured_at=at,
                        model="m1", run_id="run1", fired_id="" if i % 2 == 0 else f"ev-{i - 1}",
                        caption="a siren wails", clip=clip)


@pytest.fixture
def store(tmp_path: Path) -> SqliteHistory:
    s = SqliteHistory(tmp_path / "history" / "history.sqlite3", clips_dir=tmp_path / "clips")
    yield s
    s.close()


# --------------------------------------------------------------------------- round trip


def test_new_store_is_wal_incremental_vacuum_and_versioned(store: SqliteHistory) -> None:
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_windows_and_events_round_trip(store: SqliteHistory) -> None:
    records = [window(i, embedding=unit(i)) for i in range(4)]
    ev = event(0, at=T0 + 3, clip="ev-0.flac")
    store.write([*records, ev])
    got = store.windows([r.window_id for r in records] + ["missing"], vectors=True)
    assert set(got) == {r.window_id for r in records}
    for r in records:
        back = got[r.window_id]
        assert back.embedding is not None and r.embedding is not None
        cosine = float(np.dot(back.embedding, r.embedding) / np.linalg.norm(back.embedding))
        assert cosine > 0.9995
        np.testing.assert_allclose(back.embedding, r.embedding, atol=np.abs(r.embedding).max() / 127)
        # everything else is exactly what was written
        assert back == dataclasses.replace(r, embedding=back.embedding)
    plain = store.windows([records[0].window_id])[records[0].window_id]
    assert plain.embedding is None
    page = store.page(Span(), cursor=None, limit=10)
    assert ev in page.items
    stats = store.stats()
    assert (stats.windows, stats.events, stats.oldest_at) == (4, 1, T0)
    assert stats.bytes > 0


def test_non_finite_scores_are_stored_as_null_and_read_back_as_nan(
        store: SqliteHistory) -> None:
    # a trigger-state announcement: NaN score and threshold, no firing
    announcement = dataclasses.replace(event(0, at=T0 + 1), score=math.nan,
                                       threshold=math.nan, fired_id="",
                                       state=TriggerState.OFF)
    odd = dataclasses.replace(window(1), score=-math.inf, confidence=math.nan)
    store.write([window(0), announcement, odd])  # one transaction: none of it refused
    items = store.page(Span(), cursor=None, limit=10).items
    assert [type(i).__name__ for i in items] == ["WindowRecord", "TriggerEvent",
                                                 "WindowRecord"]
    got_event = items[1]
    assert isinstance(got_event, TriggerEvent)
    assert math.isnan(got_event.score) and math.isnan(got_event.threshold)
    got_odd = items[2]
    assert isinstance(got_odd, WindowRecord)
    assert math.isnan(got_odd.score) and got_odd.confidence is None
    assert store.windows(["kitchen-0"])["kitchen-0"].score == -1.5


def test_a_record_written_again_is_replaced_and_searchable_by_its_new_text(
        store: SqliteHistory) -> None:
    store.write([window(1, text="a dog barks")])
    store.write([window(1, text="rain on a roof", candidates=("rain on a roof",))])
    assert store.stats().windows == 1
    assert store.text_search(["dog"], span=Span(), limit=5) == []
    assert store.text_search(["roof"], span=Span(), limit=5) == ["kitchen-1"]


def test_int8_embedding_codec_keeps_cosine_of_small_components() -> None:
    v = unit(7, 1024)  # components around 0.03
    blob, scale, dim = encode_embedding(v)
    assert (len(blob), dim) == (1024, 1024)
    back = decode_embedding(blob, scale, dim)
    assert float(np.dot(back, v) / np.linalg.norm(back)) > 0.9995
    zero_blob, zero_scale, _ = encode_embedding(np.zeros(8, dtype=np.float32))
    assert not decode_embedding(zero_blob, zero_scale, 8).any()


# --------------------------------------------------------------------------- text search


def test_text_search_ranks_and_filters_by_span(store: SqliteHistory) -> None:
    store.write([window(0, text="a dog barks loudly"),
                 window(1, text="rain falls", candidates=("rain falls", "a dog far away")),
                 window(2, text="a car passes", candidates=("a car passes",)),
                 window(3, source="garden", text="a dog barks")])
    assert set(store.text_search(["dog"], span=Span(), limit=10)) == {
        "kitchen-0", "kitchen-1", "garden-3"}
    # the caption text matches better than a candidate only
    assert store.text_search(["dog"], span=Span(sources=("kitchen",)), limit=10) == [
        "kitchen-0", "kitchen-1"]
    assert store.text_search(["dog"], span=Span(since=T0 + 5, until=T0 + 10), limit=10) == [
        "kitchen-1"]
    assert store.text_search(["DOGS", "car"], span=Span(), limit=10) == ["kitchen-2"]
    assert store.text_search(["dog barks"], span=Span(), limit=1) in (["kitchen-0"], ["garden-3"])


INJECTIONS = ['"', "'", 'dog" OR "x', "NEAR(a b)", "*", "-", "\x00", "^", "a:b", "",
              "dog\x00 OR *", "text:dog", "(dog", "dog AND", "NOT dog", "-dog", "d*", "^dog",
              '""', "\\", "\u202edog"]


@pytest.mark.parametrize("term", INJECTIONS)
def test_query_syntax_in_terms_matches_literally_or_nothing(store: SqliteHistory,
                                                           term: str) -> None:
    store.write([window(0, text="a dog barks"), window(1, text="x marks the spot"),
                 window(2, text="text dog", candidates=())])
    got = store.text_search([term], span=Span(), limit=10)
    words = {w.lower() for w in
             "".join(c if c.isalnum() else " " for c in term.replace("\x00", "")).split()}
    for wid in got:
        record = store.windows([wid])[wid]
        haystack = " ".join([record.text, *record.candidates]).lower().split()
        assert words <= set(haystack), (term, wid)


def test_fts_query_quotes_every_term() -> None:
    assert fts_query(['dog" OR "x']) == '"dog"" OR ""x"'
    assert fts_query(["*", "-", "", "\x00"]) is None
    assert fts_query(["a\x00b", "a\x00b"]) == '"ab"'
    assert fts_query(["NEAR(a b)"]) == '"NEAR(a b)"'


def test_operator_words_are_plain_words(store: SqliteHistory) -> None:
    store.write([window(0, text="not a dog near the door"), window(1, text="a cat")])
    assert store.text_search(["NOT"], span=Span(), limit=5) == ["kitchen-0"]
    assert store.text_search(["near the"], span=Span(), limit=5) == ["kitchen-0"]
    assert store.text_search(["NEAR(dog door)"], span=Span(), limit=5) == []


# --------------------------------------------------------------------------- vector search


def test_vector_search_is_exact_cosine_per_model_and_span(store: SqliteHistory) -> None:
    rows = [window(i, embedding=unit(i), source="a" if i % 2 else "b") for i in range(300)]
    rows.append(window(999, embedding=unit(5), model="other"))
    rows.append(window(1000, embedding=None))
    store.write(rows)
    query = unit(5) + 0.3 * unit(77)
    got = store.vector_search(query, model="m1", span=Span(), limit=5)
    vectors = np.stack([unit(i) for i in range(300)])
    q = query / np.linalg.norm(query)
    expected = np.argsort(-(vectors @ q))[:5]
    assert [w for w, _ in got] == [rows[i].window_id for i in expected]
    for (_, sim), i in zip(got, expected, strict=True):
        assert sim == pytest.approx(float(vectors[i] @ q), abs=0.01)
    only_a = store.vector_search(query, model="m1", span=Span(sources=("a",)), limit=3)
    assert all(w.startswith("a-") for w, _ in only_a)
    assert store.vector_search(query, model="nope", span=Span(), limit=5) == []
    assert store.vector_search(unit(1, 8), model="m1", span=Span(), limit=5) == []


def test_vector_search_scans_in_chunks(store: SqliteHistory) -> None:
    store.write([window(i, embedding=unit(i)) for i in range(50)])
    chunks = list(store.vector_rows(model="m1", dim=DIM, span=Span(), chunk=16))
    assert [len(ids) for ids, _ in chunks] == [16, 16, 16, 2]
    assert chunks[0][1].dtype == np.int8 and chunks[0][1].shape == (16, DIM)


def test_a_vector_index_answers_or_declines(tmp_path: Path) -> None:
    calls: list[int] = []

    class Index:
        def nearest(self, store: SqliteHistory, vector: np.ndarray, *, model: str,
                    span: Span, limit: int) -> list[tuple[str, float]] | None:
            calls.append(limit)
            return [("from-index", 1.0)] if limit == 1 else None

    s = SqliteHistory(tmp_path / "h.sqlite3", vector_index=Index())
    try:
        s.write([window(0, embedding=unit(0))])
        assert s.vector_search(unit(0), model="m1", span=Span(), limit=1) == [("from-index", 1.0)]
        assert [w for w, _ in s.vector_search(unit(0), model="m1", span=Span(), limit=2)] == [
            "kitchen-0"]
        assert calls == [1, 2]
    finally:
        s.close()


# --------------------------------------------------------------------------- pages


def filled(store: SqliteHistory) -> list[str]:
    """Windows and events interleaved, with a tie; their ids in time order."""
    items = [window(i, at=T0 + 10 * i) for i in range(7)]
    events = [event(i, at=T0 + 10 * i + (0 if i == 2 else 5)) for i in range(0, 6, 2)]
    store.write([*reversed(items), *events])
    ordered = sorted([(w.start_at, 0, w.window_id) for w in items]
                     + [(e.captured_at, 1, e.event_id) for e in events])
    return [k[2] for k in ordered]


def ids(items: tuple[HistoryItem, ...]) -> list[str]:
    return [i.window_id if isinstance(i, WindowRecord) else i.event_id for i in items]


@pytest.mark.parametrize("newest_first", [False, True])
def test_pages_walk_the_whole_history_in_time_order(store: SqliteHistory,
                                                    newest_first: bool) -> None:
    expected = filled(store)
    if newest_first:
        expected.reverse()
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(20):
        page = store.page(Span(), cursor=cursor, limit=3, newest_first=newest_first)
        assert len(page.items) <= 3
        seen += ids(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == expected


def test_page_filters_by_span(store: SqliteHistory) -> None:
    filled(store)
    store.write([window(50, source="garden", at=T0 + 20)])
    page = store.page(Span(sources=("garden",)), cursor=None, limit=10)
    assert ids(page.items) == ["garden-50"] and page.next_cursor is None
    page = store.page(Span(since=T0 + 20, until=T0 + 30), cursor=None, limit=10)
    # at the same time: windows (in the order written) before events
    assert ids(page.items) == ["kitchen-2", "garden-50", "ev-2"]


@pytest.mark.parametrize("cursor", ["", "garbage!", "e30", "WzEsMiwzLCJhIl0",
                                    "W251bGwsMCwxLCJhIl0",
                                    # forged: a row beyond int64, a bool or float kind, ...
                                    *['WzEuMCwgMCwgMTAwMDAwMDAwMDAwMDAwMDAwMDAwLCAiYSJd', 'WzEuMCwgdHJ1ZSwgMSwgImEiXQ', 'WzEuMCwgMS4wLCAxLCAiYSJd', 'WzEuMCwgMCwgLTkyMjMzNzIwMzY4NTQ3NzU4MDksICJhIl0', 'W3RydWUsIDAsIDEsICJhIl0']])
def test_a_bad_cursor_is_a_history_error(store: SqliteHistory, cursor: str) -> None:
    filled(store)
    with pytest.raises(HistoryCursorError, match="cursor") as err:
        store.page(Span(), cursor=cursor, limit=3)
    assert str(store.path) in str(err.value)


def test_a_cursor_of_the_other_order_is_refused(store: SqliteHistory) -> None:
    filled(store)
    cursor = store.page(Span(), cursor=None, limit=2).next_cursor
    assert cursor is not None
    with pytest.raises(HistoryError, match="other order"):
        store.page(Span(), cursor=cursor, limit=2, newest_first=True)


def test_recent_gives_the_newest_with_their_events_oldest_first(store: SqliteHistory) -> None:
    expected = filled(store)
    store.write([window(60, source="garden", at=T0 - 100)])
    items = store.recent(2, per_source=False)
    assert ids(tuple(items)) == ["kitchen-5", "kitchen-6"]
    items = store.recent(3, per_source=False)
    assert ids(tuple(items)) == [i for i in expected if i in ("kitchen-4", "ev-4", "kitchen-5",
                                                              "kitchen-6")]
    per_source = ids(tuple(store.recent(1, per_source=True)))
    assert per_source == ["garden-60", "kitchen-6"]


def test_recent_per_source_seeks_each_source_on_its_index(store: SqliteHistory) -> None:
    store.write([window(i, source=src, at=T0 + i) for src in ("a", "b", "c") for i in range(20)]
                + [event(i, at=T0 + i + 0.5, source=src) for src in ("a", "c")
                   for i in range(0, 20, 4)])
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    try:
        items = store.recent(2, per_source=True)
    finally:
        store._conn.set_trace_callback(None)
    assert ids(tuple(items)) == ["a-18", "b-18", "c-18", "a-19", "b-19", "c-19"]
    scans = []
    for sql in statements:
        if sql.lstrip().upper().startswith(("SELECT", "WITH")):
            plan = store._conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            scans += [row[3] for row in plan
                      if str(row[3]).startswith(("SCAN windows", "SCAN events"))]
    assert scans == []  # never a pass over a whole table or index


# --------------------------------------------------------------------------- retention


def test_retention_by_age_deletes_old_records_and_their_clips(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    s = SqliteHistory(tmp_path / "h.sqlite3", keep_days=1, clips_dir=clips)
    try:
        now = T0 + 10 * 86400
        old_at, new_at = now - 2 * 86400, now - 3600
        (clips / "ev-0.flac").write_bytes(b"old")
        (clips / "ev-2.flac").write_bytes(b"new")
        (clips / "orphan.flac").write_bytes(b"never stored")
        os.utime(clips / "orphan.flac", (old_at, old_at))
        s.write([window(0, at=old_at), window(1, at=new_at),
                 event(0, at=old_at, clip="ev-0.flac"), event(2, at=new_at, clip="ev-2.flac"),
                 event(4, at=old_at, clip="../h.sqlite3")])
        assert s.enforce_retention(now) == 3
        assert ids(s.page(Span(), cursor=None, limit=10).items) == ["kitchen-1", "ev-2"]
        assert sorted(p.name for p in clips.iterdir()) == ["ev-2.flac"]
        assert (tmp_path / "h.sqlite3").exists()  # a clip name never leaves the clips dir
        assert s.enforce_retention(now) == 0
    finally:
        s.close()


def test_retention_by_size_deletes_the_oldest_until_under_the_limit(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    limit = 1024 * 1024
    s = SqliteHistory(tmp_path / "h.sqlite3", max_bytes=limit, clips_dir=clips)
    try:
        big = "x " * 2000
        rows = [window(i, text=f"window {i} {big}", embedding=unit(i, 1024), at=T0 + i)
                for i in range(600)]
        for start in range(0, 600, 100):
            s.write(rows[start:start + 100])
        s.write([event(0, at=T0 + 0.5, clip="ev-0.flac")])
        (clips / "ev-0.flac").write_bytes(os.urandom(200_000))
        assert s.size_bytes() > limit
        deleted = s.enforce_retention(T0 + 700)
        assert deleted > 0
        assert s.size_bytes() <= limit
        stats = s.stats()
        assert 0 < stats.windows < 600
        left = s.page(Span(), cursor=None, limit=600).items
        # the oldest went first: what is left is the newest, without a gap
        assert ids(left) == [f"kitchen-{i}" for i in range(600 - len(left), 600)]
        assert not (clips / "ev-0.flac").exists()
    finally:
        s.close()


def test_size_retention_deletes_about_the_excess_while_a_reader_holds_a_snapshot(
        tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    s = SqliteHistory(path, max_bytes=2 ** 40)
    try:
        big = "y " * 1000
        for start in range(0, 400, 100):
            s.write([window(i, text=f"window {i} {big}", embedding=unit(i, 256), at=T0 + i)
                     for i in range(start, start + 100)])
        size = s.size_bytes()
        s.max_bytes = int(size * 0.8)  # a fifth too much: about 80 records
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM windows").fetchone()[0] == 400
            deleted = s.enforce_retention(T0 + 500)
            assert reader.execute("SELECT count(*) FROM windows").fetchone()[0] == 400
        finally:
            reader.close()
        assert 0 < deleted <= 400 * 0.2 * 1.25 + 2  # about the excess, never most of it
        assert s.stats().windows == 400 - deleted
        s.enforce_retention(T0 + 500)  # the reader is gone: the next run finishes the job
        assert s.size_bytes() <= s.max_bytes
        assert s.stats().windows >= 400 * 0.6
    finally:
        s.close()


def test_size_retention_deletes_orphan_clips_and_stale_temp_files_before_any_record(
        tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    s = SqliteHistory(tmp_path / "h.sqlite3", max_bytes=2 ** 40, clips_dir=clips)
    try:
        now = T0 + 86400
        s.write([window(i, at=now - 600 + i) for i in range(50)]
                + [event(0, at=now - 500, clip="run1:siren:kitchen:0.flac")])
        old = now - 7200
        for name, size in (("run1:siren:kitchen:0.flac", 1000),  # its event is stored
                           ("run1:siren:kitchen:9.flac", 300_000),  # its event never was
                           (".run1:siren:kitchen:8.flac.abc.tmp", 300_000),  # a kill -9
                           ("run1:siren:kitchen:7.flac", 300_000)):  # a new orphan: queued
            (clips / name).write_bytes(os.urandom(size))
            at = now - 60 if name.endswith("7.flac") else old
            os.utime(clips / name, (at, at))
        s.max_bytes = s.size_bytes() - 500_000  # the two old orphans free 600 000
        assert s.enforce_retention(now) == 0  # no record went
        assert sorted(p.name for p in clips.iterdir()) == [
            "run1:siren:kitchen:0.flac", "run1:siren:kitchen:7.flac"]
        assert s.stats().windows == 50
    finally:
        s.close()


# --------------------------------------------------------------------------- unusable stores


def test_reader_is_read_only_and_sees_committed_writes(store: SqliteHistory) -> None:
    reader = store.reader()
    try:
        store.write([window(0)])
        assert reader.stats().windows == 1
        with pytest.raises(HistoryError, match=str(store.path)):
            reader.write([window(1)])
    finally:
        reader.close()


def test_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="is a directory") as err:
        SqliteHistory(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_a_path_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "history.sqlite3"
    with pytest.raises(HistoryError) as err:
        SqliteHistory(path)
    assert str(path) in str(err.value)


def test_a_non_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"this is a text file, not a database\n" * 100)
    with pytest.raises(HistoryError, match="not an SQLite database") as err:
        SqliteHistory(path)
    assert str(path) in str(err.value)
    assert path.read_bytes().startswith(b"this is a text file")  # left as it was


def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE accounts (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(HistoryError, match="not a streamcap history"):
        SqliteHistory(path)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    SqliteHistory(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(HistoryError, match="newer") as err:
        SqliteHistory(path)
    assert str(path) in str(err.value)


def many_rows(path: Path) -> None:
    s = SqliteHistory(path)
    s.write([window(i, text=f"caption {i} " + "word " * 200, embedding=unit(i))
             for i in range(300)])
    s.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_quick_check_runs_only_when_the_last_close_was_not_clean(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[bool] = []
    connect = SqliteHistory._connect

    def spy(self: SqliteHistory, check: bool) -> sqlite3.Connection:
        checks.append(check)
        return connect(self, check)

    monkeypatch.setattr(SqliteHistory, "_connect", spy)
    path = tmp_path / "h.sqlite3"
    first = SqliteHistory(path)
    first.write([window(0)])
    first.close()  # clean: the next open trusts the file
    second = SqliteHistory(path)
    assert checks[-1] is False
    second.write([window(1)])  # ... and is killed: never closed
    third = SqliteHistory(path)
    assert checks[-1] is True
    third.close()
    second._conn.close()  # (the "killed" handle, closed behind the store's back)
    os.utime(path, ns=(0, 0))  # changed since its clean close: checked again
    SqliteHistory(path).close()
    assert checks[-1] is True
    last = SqliteHistory(path)
    try:
        assert checks[-1] is False and last.stats().windows == 2
    finally:
        last.close()


def test_a_truncated_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    many_rows(path)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(HistoryError) as err:
        SqliteHistory(path)
    assert str(path) in str(err.value)


def test_a_database_with_garbage_pages_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    many_rows(path)
    data = bytearray(path.read_bytes())
    page = 4096
    rng = np.random.default_rng(0)
    for n in range(2, len(data) // page):  # every page but the first: the header stays
        data[n * page:n * page + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(HistoryError, match="corrupt") as err:
        SqliteHistory(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- vector index seam


def test_index_rows_page_by_rowid_and_window_ids_skip_deleted(store: SqliteHistory) -> None:
    store.write([window(i, embedding=unit(i), source="kitchen" if i % 2 else "garden")
                 for i in range(7)] + [window(7, model="m2", embedding=unit(7, 32)),
                                       window(8)])  # another model; no embedding
    first = store.index_rows(model="m1", dim=DIM, after=0, limit=4)
    assert len(first.keys) == 4 and list(first.keys) == sorted(first.keys)
    rest = store.index_rows(model="m1", dim=DIM, after=int(first.keys[-1]), limit=100)
    keys = [*first.keys, *rest.keys]
    assert len(keys) == 7 and first.codes.shape == (4, DIM)
    assert store.index_rows(model="m1", dim=DIM, after=int(keys[-1]), limit=100).keys.size == 0
    ids = store.window_ids(keys)
    assert sorted(ids.values()) == sorted(w.window_id for w in
                                          [window(i, source="kitchen" if i % 2 else "garden")
                                           for i in range(7)])
    row = keys[2]
    codes = rest.codes if row in rest.keys else first.codes
    at = list(first.keys).index(row) if row in first.keys else list(rest.keys).index(row)
    stored = encode_embedding(unit(2))[0]
    assert bytes(codes[at].tobytes()) == stored
    assert first.sources[2] == "garden" and first.starts_at[2] == T0 + 10
    store._conn.execute("DELETE FROM windows WHERE id = ?", [int(keys[0])])
    assert int(keys[0]) not in store.window_ids(keys)
    picked = store.index_rows_at([int(keys[3]), int(keys[0]), 10_000], model="m1", dim=DIM)
    assert list(picked.keys) == [keys[3]]


def test_a_window_written_again_replaces_its_embedding_in_the_index(tmp_path: Path) -> None:
    from streamcap.history.vectors import HistoryVectorIndex

    index = HistoryVectorIndex(tmp_path / "h.vectors", DIM, "m1")
    s = SqliteHistory(tmp_path / "h.sqlite3", vector_index=index)
    try:
        s.write([window(i, embedding=unit(i)) for i in range(20)])
        assert s.vector_search(unit(5), model="m1", span=Span(), limit=1)[0][0] == "kitchen-5"
        index.step(s)
        assert index.index.watermark > 0 and len(index.index) == 20
        s.write([window(5, embedding=unit(100))])  # the same window, a new embedding
        assert len(index.index) == 20
        best, cos = s.vector_search(unit(100), model="m1", span=Span(), limit=1)[0]
        assert best == "kitchen-5" and cos > 0.99
        old = dict(s.vector_search(unit(5), model="m1", span=Span(), limit=20))
        assert old["kitchen-5"] < 0.5  # the old embedding is gone from the index
        assert old == dict(s.exact_vector_search(unit(5), model="m1", span=Span(), limit=20))
    finally:
        s.close()


# --------------------------------------------------------------------------- text search bound


def straightforward_text_search(store: SqliteHistory, terms: list[str], span: Span,
                                limit: int) -> list[str]:
    """Every match ranked by bm25, the newer first on ties (the text search's definition
    when a span has no more matches than it scans)."""
    sql = ("SELECT w.window_id FROM windows_fts JOIN windows AS w ON w.id = windows_fts.rowid "
           "WHERE windows_fts MATCH ?")
    args: list[object] = [fts_query(terms)]
    if span.sources:
        sql += f" AND w.source IN ({', '.join('?' * len(span.sources))})"
        args += list(span.sources)
    if span.since is not None:
        sql += " AND w.start_at >= ?"
        args.append(span.since)
    if span.until is not None:
        sql += " AND w.start_at < ?"
        args.append(span.until)
    sql += " ORDER BY bm25(windows_fts), w.start_at DESC LIMIT ?"
    return [r[0] for r in store._conn.execute(sql, [*args, limit])]


def test_text_search_equals_ranking_every_match_on_a_small_store(store: SqliteHistory) -> None:
    texts = ("a dog barks", "a dog barks loudly at a dog", "rain falls", "a car passes")
    store.write([window(i, source=("kitchen", "garden")[i % 2], text=texts[i % 4],
                        at=T0 + 5 * ((i * 7) % 300), candidates=(texts[(i + 1) % 4],))
                 for i in range(300)])  # rowids not in time order
    spans = [Span(), Span(since=T0 + 1000), Span(since=T0 + 200, until=T0 + 400),
             Span(sources=("garden",)), Span(sources=("kitchen",), since=T0 + 1400),
             Span(since=T0 + 10_000)]
    for terms in (["dog"], ["dog", "rain"], ["car", "loudly"]):
        for span in spans:
            for limit in (1, 10, 50, 400):
                assert store.text_search(terms, span=span, limit=limit) == \
                    straightforward_text_search(store, terms, span, limit), (terms, span, limit)


def test_text_search_ranks_the_newest_matches_of_a_long_history(
        store: SqliteHistory, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamcap.history import sqlite

    monkeypatch.setattr(sqlite, "TEXT_SCAN_MIN", 20)
    monkeypatch.setattr(sqlite, "TEXT_SCAN_PER_RESULT", 2)
    store.write([window(i, text="a dog barks at a dog" if i < 10 else "a dog barks")
                 for i in range(100)])
    found = store.text_search(["dog"], span=Span(), limit=5)
    # the best bm25 (two dogs) are among the oldest, beyond the 20 newest matches scanned
    assert found == [f"kitchen-{i}" for i in range(99, 94, -1)]
    assert straightforward_text_search(store, ["dog"], Span(), 5)[0] == "kitchen-9"
