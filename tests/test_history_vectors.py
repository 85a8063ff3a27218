"""The history's vector index against exact results on small random data."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from streamcap.errors import HistoryError
from streamcap.history.records import Span
from streamcap.history.vectors import (
    HistoryVectorIndex,
    IndexBatch,
    VectorIndex,
    exact_search,
    quantise,
)

DIM = 32
SOURCES = ("kitchen", "garden", "street")


def clustered(n: int, seed: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM)).astype(np.float32) * 1.5
    return (centres[rng.integers(0, 20, n)]
            + rng.standard_normal((n, DIM)).astype(np.float32)).astype(np.float32)


def brute(vectors: NDArray[np.float32], keys: NDArray[np.int64], q: NDArray[np.float32],
          k: int, keep: NDArray[np.bool_] | None = None) -> list[tuple[int, float]]:
    """The store's exact scan: float query against the decoded int8 rows."""
    codes = quantise(vectors).astype(np.float32)
    cos = codes @ q / (np.linalg.norm(codes, axis=1) * np.linalg.norm(q))
    rows = np.arange(len(keys)) if keep is None else np.flatnonzero(keep)
    best = rows[np.argsort(-cos[rows], kind="stable")][:k]
    return [(int(keys[r]), float(cos[r])) for r in best]


def make(tmp_path: Path, n: int = 1500, seed: int = 1, **kwargs: int
         ) -> tuple[VectorIndex, NDArray[np.float32], NDArray[np.int64], list[str],
                    NDArray[np.float64]]:
    vectors = clustered(n, seed)
    keys = np.arange(1, n + 1, dtype=np.int64) * 3  # rowids with gaps
    sources = [SOURCES[i % 3] for i in range(n)]
    at = 1_700_000_000.0 + 5.0 * np.arange(n)
    index = VectorIndex(tmp_path / "vectors.idx", DIM, "base-v1", **kwargs)
    for lo in range(0, n, 400):  # in batches, as the store's writer adds
        index.add(keys[lo:lo + 400], vectors[lo:lo + 400], sources[lo:lo + 400], at[lo:lo + 400])
    return index, vectors, keys, sources, at


def query(seed: int) -> NDArray[np.float32]:
    return clustered(1, seed)[0] + np.float32(0.1)


def test_exact_search_is_the_stores_exact_scan() -> None:
    vectors = clustered(300, 5)
    q = query(6)
    got = exact_search(quantise(vectors), q, 10)
    want = brute(vectors, np.arange(300, dtype=np.int64), q, 10)
    assert [r for r, _ in got] == [r for r, _ in want]
    assert np.allclose([c for _, c in got], [c for _, c in want], atol=1e-5)


def test_exact_index_matches_brute_force_within_spans(tmp_path: Path) -> None:
    index, vectors, keys, sources, at = make(tmp_path)
    assert index.stats().graph_rows == 0  # small: every search is exact
    assert not index.maintain()
    src = np.asarray(sources)
    for seed, span, keep in (
            (10, None, None),
            (11, Span(sources=("garden",)), src == "garden"),
            (12, Span(since=float(at[200]), until=float(at[260])),
             (at >= at[200]) & (at < at[260])),
            (13, Span(sources=("kitchen", "street"), since=float(at[900])),
             ((src == "kitchen") | (src == "street")) & (at >= at[900])),
    ):
        q = query(seed)
        got = index.search(q, 25, span)
        want = brute(vectors, keys, q, 25, keep)
        assert [k for k, _ in got] == [k for k, _ in want]
        assert np.allclose([c for _, c in got], [c for _, c in want], atol=1e-5)
    assert index.search(query(14), 5, Span(sources=("attic",))) == []
    assert index.search(query(14), 5, Span(since=float(at[-1]) + 1)) == []


def test_graph_search_agrees_with_exact_and_respects_filters(tmp_path: Path) -> None:
    index, vectors, keys, sources, at = make(tmp_path, n=3000, exact_max_rows=0)
    while index.maintain(budget=700):
        pass
    assert index.stats().graph_rows == 3000
    src = np.asarray(sources)
    spans = ((None, None), (Span(sources=("kitchen", "garden")),
                            (src == "kitchen") | (src == "garden")))
    for span, keep in spans:
        recalls = []
        for seed in range(20, 30):
            q = query(seed)
            got = index.search(q, 10, span)
            want = brute(vectors, keys, q, 10, keep)
            assert len(got) == 10
            if keep is not None:  # every hit is in the span
                assert all(keep[k // 3 - 1] for k, _ in got)
            assert all(c == pytest.approx(dict(brute(vectors, keys, q, 3000))[k], abs=1e-5)
                       for k, c in got)
            recalls.append(len({k for k, _ in got} & {k for k, _ in want}) / 10)
        assert np.mean(recalls) >= 0.9
    stats = index.stats()
    assert stats.graph_searches == 20 and stats.exact_searches == 0
    # A narrow span (1% of the rows) would leave the over-fetch short: it is exact.
    narrow = Span(since=float(at[1000]), until=float(at[1030]))
    q = query(40)
    assert ([k for k, _ in index.search(q, 10, narrow)]
            == [k for k, _ in brute(vectors, keys, q, 10, (at >= at[1000]) & (at < at[1030]))])
    assert index.stats().exact_searches == 1


def test_rows_the_graph_does_not_hold_yet_are_found(tmp_path: Path) -> None:
    index, _vectors, _keys, _sources, at = make(tmp_path, n=2000, exact_max_rows=0)
    while index.maintain():
        pass
    q = query(50)
    index.add([99_999], q.reshape(1, -1), ["garden"], [float(at[-1]) + 5])
    assert index.stats().graph_rows == 2000  # not in the graph
    assert index.search(q, 5)[0][0] == 99_999
    assert index.search(q, 5)[0][1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("graph", [False, True])
def test_remove_and_replace(tmp_path: Path, graph: bool) -> None:
    index, _vectors, keys, _sources, at = make(tmp_path, n=2000,
                                             exact_max_rows=0 if graph else 10**9)
    while index.maintain():
        pass
    q = query(60)
    first = [k for k, _ in index.search(q, 5)]
    assert index.remove(first[:2] + [7]) == 2  # 7 is no key
    after = [k for k, _ in index.search(q, 5)]
    assert not set(first[:2]) & set(after)
    assert len(index) == 1998
    # Replacing a key's row: the new vector is found under the old key.
    far = -q
    index.add([first[2]], far.reshape(1, -1), ["kitchen"], [float(at[0])])
    assert first[2] not in [k for k, _ in index.search(q, 5)]
    assert index.search(far, 1)[0][0] == first[2]
    assert len(index) == 1998
    assert index.watermark == int(keys[-1])


def test_save_open_round_trip_and_catch_up_after_a_crash(tmp_path: Path) -> None:
    index, vectors, keys, _sources, at = make(tmp_path, n=1800, exact_max_rows=800)
    while index.maintain():
        pass
    index.remove(keys[:50])
    index.save()
    assert index.unsaved == 0
    saved_mark = index.watermark
    index.add(keys[-1:] + 3, vectors[:1], ["street"], at[-1:] + 5)  # then a crash: lost
    q = query(70)
    again = VectorIndex.open(tmp_path / "vectors.idx", DIM, "base-v1",
                             exact_max_rows=800)
    assert again.reset_reason is None
    assert again.watermark == saved_mark == int(keys[-1])
    assert again.stats().graph_rows == 1750
    assert len(again) == 1750
    assert again._graph is not None and again._graph.expansion_search == 512
    # The store re-adds what is after the watermark; then it answers as the original.
    again.add(keys[-1:] + 3, vectors[:1], ["street"], at[-1:] + 5)
    garden = Span(sources=("garden",))  # small enough to be scanned exactly
    assert again.search(q, 20, garden) == index.search(q, 20, garden)
    alive = np.ones(1800, dtype=bool)
    alive[:50] = False
    want = {k for k, _ in brute(vectors, keys, q, 20, alive)} - {int(keys[-1]) + 3}
    got = again.search(q, 20)  # through the restored graph
    assert again.stats().graph_searches == 1
    assert len({k for k, _ in got} & want) >= 0.9 * len(want)


def test_missing_corrupt_or_foreign_file_starts_empty_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "vectors.idx"
    fresh = VectorIndex.open(path, DIM, "base-v1")
    assert fresh.watermark == 0 and len(fresh) == 0
    assert fresh.reset_reason is not None and str(path) in fresh.reset_reason
    index, *_ = make(tmp_path, n=600)
    index.save()
    good = path.read_bytes()

    other_dim = VectorIndex.open(path, DIM * 2, "base-v1")
    assert other_dim.watermark == 0 and "dimensions" in (other_dim.reset_reason or "")
    other_model = VectorIndex.open(path, DIM, "large-v2")
    assert other_model.watermark == 0 and "'base-v1'" in (other_model.reset_reason or "")

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    for broken, why in ((bytes(flipped), "corrupt"), (good[: len(good) // 3], "corrupt"),
                        (b"", "not a streamcap vector index"),
                        (b"\x89PNG\r\n\x1a\n" + good[8:], "not a streamcap vector index")):
        path.write_bytes(broken)
        reopened = VectorIndex.open(path, DIM, "base-v1")
        assert reopened.watermark == 0 and len(reopened) == 0
        assert str(path) in (reopened.reset_reason or "") and why in (reopened.reset_reason or "")
    path.write_bytes(good)
    assert VectorIndex.open(path, DIM, "base-v1").watermark == index.watermark


def test_a_save_that_cannot_write_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    index = VectorIndex(tmp_path / "blocker" / "vectors.idx", DIM, "base-v1")
    index.add([1], clustered(1, 3), ["kitchen"], [1.0])
    with pytest.raises(HistoryError, match="blocker/vectors.idx"):
        index.save()
    assert len(index) == 1


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    index = VectorIndex(tmp_path / "v.idx", DIM, "base-v1")
    with pytest.raises(ValueError, match="16-d vectors given to a 32-d index"):
        index.add([1], np.ones((1, 16), np.float32), ["a"], [0.0])
    with pytest.raises(ValueError, match="twice"):
        index.add([1, 1], np.ones((2, DIM), np.float32), ["a", "a"], [0.0, 1.0])
    with pytest.raises(ValueError, match="16-d query"):
        index.search(np.ones(16, np.float32), 3)


class Rows:
    """A store's two queries for the index, over a real SQLite table."""

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:")
        self.db.execute("CREATE TABLE windows (id INTEGER PRIMARY KEY, window_id TEXT UNIQUE, "
                        "source TEXT, start_at REAL, model TEXT, dim INTEGER, embedding BLOB)")

    def insert(self, vectors: NDArray[np.float32], model: str = "base-v1") -> list[int]:
        keys = []
        for v in vectors:
            n = self.db.execute("SELECT count(*) FROM windows").fetchone()[0]
            cur = self.db.execute(
                "INSERT INTO windows (window_id, source, start_at, model, dim, embedding) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (f"w{n}-{model}", SOURCES[n % 3], 1e9 + 5 * n, model, len(v),
                 quantise(v.reshape(1, -1)).tobytes()))
            keys.append(int(cur.lastrowid or 0))
        return keys

    def index_rows(self, *, model: str, dim: int, after: int, limit: int) -> IndexBatch:
        rows = self.db.execute(
            "SELECT id, source, start_at, embedding FROM windows WHERE id > ? AND model = ? "
            "AND dim = ? AND embedding IS NOT NULL ORDER BY id LIMIT ?",
            (after, model, dim, limit)).fetchall()
        return IndexBatch(
            keys=np.array([r[0] for r in rows], dtype=np.int64),
            codes=np.frombuffer(b"".join(r[3] for r in rows), dtype=np.int8).reshape(-1, dim),
            sources=tuple(r[1] for r in rows),
            starts_at=np.array([r[2] for r in rows], dtype=np.float64))

    def window_ids(self, keys: Sequence[int]) -> dict[int, str]:
        marks = ",".join("?" * len(keys))
        return dict(self.db.execute(
            f"SELECT id, window_id FROM windows WHERE id IN ({marks})", list(keys)).fetchall())

    def exact(self, q: NDArray[np.float32], k: int) -> list[str]:
        rows = self.db.execute("SELECT window_id, embedding FROM windows "
                               "WHERE model = 'base-v1'").fetchall()
        codes = np.frombuffer(b"".join(r[1] for r in rows), np.int8).reshape(-1, DIM)
        return [rows[r][0] for r, _ in exact_search(codes, q, k)]


def test_the_store_seam_catches_up_answers_and_forgets_deleted_rows(tmp_path: Path) -> None:
    rows = Rows()
    rows.insert(clustered(500, 80))
    rows.insert(clustered(50, 81)[:, :16], model="tiny")  # another model: never indexed
    exact_only = HistoryVectorIndex(tmp_path / "w.idx", DIM, "base-v1", search_catch_up=0)
    assert exact_only.nearest(rows, query(82), model="base-v1", span=Span(), limit=5) is None
    assert not exact_only.catch_up(rows, 600)  # caught up in one go: nothing remains
    assert exact_only.nearest(rows, query(82), model="base-v1", span=Span(), limit=5)
    seam = HistoryVectorIndex(tmp_path / "v.idx", DIM, "base-v1", search_catch_up=500)
    q = query(82)
    assert seam.nearest(rows, q, model="tiny", span=Span(), limit=5) is None
    got = seam.nearest(rows, q, model="base-v1", span=Span(), limit=10)
    assert got is not None and [w for w, _ in got] == rows.exact(q, 10)
    assert len(seam.index) == 500
    # Retention deletes rows from the store: a search never names them again.
    best = got[0][0]
    rows.db.execute("DELETE FROM windows WHERE window_id = ?", (best,))
    again = seam.nearest(rows, q, model="base-v1", span=Span(), limit=10)
    assert again is not None and best not in [w for w, _ in again]
    assert [w for w, _ in again] == rows.exact(q, 10)
    assert len(seam.index) == 499
    # Retention by age: the writer tells the index the oldest start_at kept.
    oldest = 1e9 + 5 * 300
    old = rows.db.execute("DELETE FROM windows WHERE start_at < ? AND model = 'base-v1'",
                          (oldest,)).rowcount
    assert seam.forget_before(oldest) == old
    assert len(seam.index) == 499 - old == 200
    kept = seam.nearest(rows, q, model="base-v1", span=Span(), limit=10)
    assert kept is not None and [w for w, _ in kept] == rows.exact(q, 10)
    assert seam.forget_before(None) == 200 and len(seam.index) == 0


def test_the_store_seam_rebuilds_in_steps_and_resumes_from_its_watermark(
        tmp_path: Path) -> None:
    rows = Rows()
    rows.insert(clustered(1200, 90))
    path = tmp_path / "v.idx"
    seam = HistoryVectorIndex(path, DIM, "base-v1", search_catch_up=100, step_rows=300,
                              graph_rows=400, save_every=600, exact_max_rows=500)
    assert seam.reset_reason is not None  # no file yet: built from the store
    q = query(91)
    assert seam.nearest(rows, q, model="base-v1", span=Span(), limit=5) is None  # behind
    steps = 0
    while seam.step(rows):
        steps += 1
    assert steps >= 3 and seam.index.stats().graph_rows == 1200
    assert path.exists()  # saved on the way (every 600 rows changed)
    got = seam.nearest(rows, q, model="base-v1", span=Span(sources=("garden",)), limit=5)
    assert got is not None and len(got) == 5
    seam.close()
    # More windows, then a crash before any save: a new process resumes from the file.
    rows.insert(clustered(40, 92))
    resumed = HistoryVectorIndex(path, DIM, "base-v1", search_catch_up=100,
                                 exact_max_rows=500)
    assert resumed.reset_reason is None and resumed.index.watermark == 1200
    near = rows.insert(q.reshape(1, -1))[0]
    got = resumed.nearest(rows, q, model="base-v1", span=Span(), limit=3)
    assert got is not None and got[0][0] == rows.window_ids([near])[near]
    assert len(resumed.index) == 1241


def test_an_emptied_store_starts_the_watermark_again(tmp_path: Path) -> None:
    index, *_ = make(tmp_path, n=50)
    seam = HistoryVectorIndex(tmp_path / "other.idx", DIM, "base-v1")
    seam.index = index
    assert index.watermark == 150
    assert seam.forget_before(None) == 50
    assert len(index) == 0 and index.watermark == 0  # the store's next rowids start at 1
    vectors = clustered(3, 9)
    index.add([1, 2, 3], vectors, ["kitchen"] * 3, [1.0, 2.0, 3.0])
    assert [k for k, _ in index.search(vectors[1], 1)] == [2]


def test_a_save_cut_short_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    path = tmp_path / "history.vectors"
    stale = tmp_path / ".history.vectors.abc123.tmp"  # a process killed mid-save
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / ".other.vectors.abc123.tmp"
    other.write_bytes(b"\0")
    seam = HistoryVectorIndex(path, DIM, "base-v1")
    assert not stale.exists() and other.exists()
    assert seam.reset_reason is not None
