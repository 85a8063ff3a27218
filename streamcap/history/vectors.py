"""Text-to-audio search over the history's window embeddings: a derived, rebuildable cache.

The history store (SQLite) is the source of truth; this index keeps, in memory, the
int8 code of every window's embedding of one model (the store's own quantisation,
``q = round(127 * v / max|v|)``; the per-row scale does not matter for cosine), its
key (the store's rowid), source and ``start_at``, so that a search filters by
:class:`~streamcap.history.records.Span` without asking the store. How it searches
was chosen by measurement (``bench/history_vectors.py``, docs/history-vectors.md):

- a span of at most ``exact_max_rows`` rows is scanned exactly (usearch's SIMD
  int8 cosine over just the span's rows): exact, and fast enough for two weeks of one
  source or a week of ten sources' one source;
- a wider span goes to an HNSW graph (usearch, int8) over the older rows, asking for
  ``k`` times an over-fetch factor that grows as the span's share of the rows shrinks,
  keeping the span's rows, plus an exact scan of the newest rows the graph does not hold
  yet; if the filter leaves fewer than ``k`` rows the search falls back to exact.

The graph is grown in steps by :meth:`VectorIndex.maintain` (the store's writer calls it
when idle), never inside :meth:`VectorIndex.add`, so that a large catch-up never blocks a
write. :meth:`VectorIndex.save` writes one file atomically, with its ``watermark`` (the
highest key added); :meth:`VectorIndex.open` gives an empty index (watermark 0) with the
reason when the file is missing, unreadable, corrupt, or of another model or dimension,
and the store re-adds the rows after the watermark.

A store plugs it in through :class:`HistoryVectorIndex`, which answers the store's
vector-search seam (``nearest``) and needs from the store only :class:`IndexRows` (the
rows after a key; the window ids of keys).

Thread safety: one lock guards every method, so the writer and searching readers may
share one instance.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from usearch.compiled import MetricKind
from usearch.index import Index
from usearch.index import search as usearch_search

from streamcap.atomic import replacing
from streamcap.errors import HistoryError
from streamcap.history.records import Span

MAGIC = b"SCVEC\x00\x01\n"
FORMAT = 1
EXACT_MAX_ROWS = 300_000
"""Spans of at most this many rows are scanned exactly (see the bench: about 80 ms p50 and
120 ms p95 for 259,200 rows of 1024 dimensions on 2 busy cores; the cost per row hardly
depends on the dimension)."""
HNSW_CONNECTIVITY = 16
HNSW_EXPANSION_ADD = 40
HNSW_EXPANSION_SEARCH = 512
OVERFETCH_MARGIN = 2.0
"""Ask the graph for ``k * margin / share`` rows, where share is the span's share of them."""
MAX_OVERFETCH = 16
"""Beyond this factor an exact scan of the span is cheaper than the graph (a narrow span)."""

Int64Array = NDArray[np.int64]


def quantise(vectors: NDArray[Any]) -> NDArray[np.int8]:
    """The store's int8 code of each row of ``vectors`` (n, dim): round(127 * v / max|v|).

    int8 input is taken as codes already. A zero row stays zero.
    """
    v = np.asarray(vectors)
    if v.dtype == np.int8:
        return np.ascontiguousarray(v)
    v = v.astype(np.float32, copy=False)
    peak = np.abs(v).max(axis=-1, keepdims=True)
    peak[peak == 0] = 1.0
    return np.ascontiguousarray(np.round(127.0 * v / peak).astype(np.int8))


def exact_search(codes: NDArray[np.int8], vector: NDArray[Any], k: int, *,
                 threads: int = 0) -> list[tuple[int, float]]:
    """Exact cosine top-``k`` of ``vector`` among the int8 rows ``codes``: (row, cosine)."""
    if len(codes) == 0 or k <= 0:
        return []
    q = quantise(np.asarray(vector).reshape(1, -1))[0]
    # The scan compares int8 codes with the int8 query; near-ties may swap against the
    # float query, so take a margin and rank the survivors by the float cosine.
    found = usearch_search(codes, q, min(2 * k + 8, len(codes)), MetricKind.Cos, exact=True,
                           threads=threads)
    rows = np.asarray(found.keys, dtype=np.int64)
    return _rescore(codes, rows, vector)[:k]


def _rescore(codes: NDArray[np.int8], rows: Int64Array, vector: NDArray[Any]
             ) -> list[tuple[int, float]]:
    """The float cosine of ``vector`` with each of ``rows``, best first (what the store's
    exact scan gives: the query is not quantised)."""
    if len(rows) == 0:
        return []
    q = np.asarray(vector, dtype=np.float32).reshape(-1)
    qn = float(np.linalg.norm(q))
    block = codes[rows].astype(np.float32)
    norms = np.linalg.norm(block, axis=1) * (qn if qn > 0 else 1.0)
    norms[norms == 0] = 1.0
    cos = (block @ q) / norms
    order = np.argsort(-cos, kind="stable")
    return [(int(rows[i]), float(cos[i])) for i in order]


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexStats:
    rows: int  # live rows
    graph_rows: int  # rows the HNSW graph holds
    watermark: int
    memory_bytes: int
    exact_searches: int  # searches answered by an exact scan of the span
    graph_searches: int  # by the HNSW graph (over-fetch, filtered)
    graph_fallbacks: int  # graph searches the filter left short, redone exactly


class VectorIndex:
    """The embeddings of one model's windows, searchable by cosine within a span.

    Keys are the store's rowids (positive int64), added in increasing order as a rule
    (a smaller key is accepted, at the cost of a scan).
    """

    def __init__(self, path: Path, dim: int, model: str, *,
                 exact_max_rows: int = EXACT_MAX_ROWS, threads: int = 0) -> None:
        if dim <= 0:
            raise ValueError(f"vector index dimension must be positive, not {dim}")
        self.path = Path(path)
        self.dim = dim
        self.model = model
        self.exact_max_rows = exact_max_rows
        self.threads = threads
        self.reset_reason: str | None = None
        """Why :meth:`open` started empty (None: it loaded the file)."""
        self._lock = threading.RLock()
        self._n = 0  # rows used (live and removed)
        self._codes = np.zeros((0, dim), dtype=np.int8)
        self._keys = np.zeros(0, dtype=np.int64)
        self._source = np.zeros(0, dtype=np.int32)
        self._at = np.zeros(0, dtype=np.float64)
        self._alive = np.zeros(0, dtype=bool)
        self._sources: list[str] = []
        self._source_code: dict[str, int] = {}
        self._sorted = True  # keys increase with position
        self._order: Int64Array | None = None  # the key order when not sorted (cached)
        self._watermark = 0
        self._graph: Index | None = None
        self._graph_upto = 0  # rows [0, upto) were offered to the graph
        self._unsaved = 0
        self._counts = {"exact": 0, "graph": 0, "fallback": 0}

    # ---------------------------------------------------------------- opening and saving

    @classmethod
    def open(cls, path: Path, dim: int, model: str, **kwargs: Any) -> VectorIndex:
        """The index saved at ``path``, or an empty one (see :attr:`reset_reason`) when the
        file is missing, unreadable, corrupt, or of another model or dimension."""
        index = cls(path, dim, model, **kwargs)
        try:
            index._load()
        except _Unusable as e:
            index = cls(path, dim, model, **kwargs)
            index.reset_reason = str(e)
        return index

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                blob = fh.read()
        except FileNotFoundError:
            raise _Unusable(f"{self.path} does not exist") from None
        except OSError as e:
            raise _Unusable(f"{self.path} cannot be read: {e.strerror or e}") from None
        if len(blob) < len(MAGIC) + 12 or not blob.startswith(MAGIC):
            raise _Unusable(f"{self.path} is not a streamcap vector index")
        (head_len,) = struct.unpack_from("<Q", blob, len(MAGIC))
        body = memoryview(blob)[:-4]
        (crc,) = struct.unpack_from("<I", blob, len(blob) - 4)
        if zlib.crc32(body) != crc:
            raise _Unusable(f"{self.path} is corrupt (checksum mismatch)")
        at = len(MAGIC) + 8
        try:
            head = json.loads(bytes(blob[at:at + head_len]))
            at += head_len
            if head.get("format") != FORMAT:
                raise _Unusable(f"{self.path} has format {head.get('format')}, not {FORMAT}")
            if head["dim"] != self.dim or head["model"] != self.model:
                raise _Unusable(f"{self.path} holds {head['model']!r} at {head['dim']} "
                                f"dimensions, not {self.model!r} at {self.dim}")
            n = int(head["rows"])
            parts: dict[str, NDArray[Any]] = {}
            for name, dtype, shape in (("keys", np.int64, (n,)), ("source", np.int32, (n,)),
                                       ("at", np.float64, (n,)),
                                       ("codes", np.int8, (n, self.dim))):
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                parts[name] = np.frombuffer(blob, dtype=dtype, count=int(np.prod(shape)),
                                            offset=at).reshape(shape).copy()
                at += size
            graph_len = int(head["graph_bytes"])
            graph = Index.restore(bytes(blob[at:at + graph_len])) if graph_len else None
        except _Unusable:
            raise
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise _Unusable(f"{self.path} is corrupt ({e})") from None
        self._n = n
        self._codes, self._keys = parts["codes"], parts["keys"]
        self._source, self._at = parts["source"], parts["at"]
        self._alive = np.ones(n, dtype=bool)
        self._sources = [str(s) for s in head["sources"]]
        self._source_code = {s: i for i, s in enumerate(self._sources)}
        self._sorted = bool(n < 2 or np.all(np.diff(self._keys) > 0))
        self._order = None
        self._watermark = int(head["watermark"])
        if graph is not None:  # a search setting: not kept in the file
            graph.expansion_search = HNSW_EXPANSION_SEARCH  # type: ignore[misc]
        self._graph = graph
        self._graph_upto = int(head["graph_upto"]) if graph is not None else 0

    def save(self) -> None:
        """Write the index to :attr:`path` atomically (a crash leaves the old file or the
        new one, never a part).

        Raises:
            HistoryError: the file cannot be written (the in-memory index is unchanged).
        """
        with self._lock:
            self._compact()
            n = self._n
            graph_blob = (self._graph.save() or b"") if self._graph is not None else b""
            head = json.dumps({
                "format": FORMAT, "dim": self.dim, "model": self.model, "rows": n,
                "watermark": self._watermark, "sources": self._sources,
                "graph_upto": self._graph_upto, "graph_bytes": len(graph_blob),
            }).encode()
            pieces: list[bytes | memoryview] = [
                MAGIC, struct.pack("<Q", len(head)), head,
                np.ascontiguousarray(self._keys[:n]).data.cast("B"),
                np.ascontiguousarray(self._source[:n]).data.cast("B"),
                np.ascontiguousarray(self._at[:n]).data.cast("B"),
                np.ascontiguousarray(self._codes[:n]).data.cast("B"),
                memoryview(graph_blob).cast("B") if graph_blob else b"",
            ]
            try:
                _replace_bytes(self.path, pieces)
            except OSError as e:
                raise HistoryError(f"vector index {self.path}: cannot be written: "
                                   f"{e.strerror or e}") from None
            self._unsaved = 0

    # ------------------------------------------------------------------------- changes

    @property
    def watermark(self) -> int:
        """The highest key ever added (0: none): the store re-adds the rows after it."""
        return self._watermark

    @property
    def unsaved(self) -> int:
        """Rows added or removed since the last :meth:`save` or :meth:`open`."""
        return self._unsaved

    def __len__(self) -> int:
        with self._lock:
            return int(self._alive[:self._n].sum())

    def add(self, keys: Sequence[int] | Int64Array, vectors: NDArray[Any],
            sources: Sequence[str], starts_at: Sequence[float] | NDArray[np.float64]) -> None:
        """Add (or replace) rows: their keys, embeddings (float, or the store's int8 codes),
        source ids and ``start_at`` times."""
        k = np.asarray(keys, dtype=np.int64).reshape(-1)
        codes = quantise(np.asarray(vectors).reshape(len(k), -1) if len(k) else
                         np.zeros((0, self.dim), dtype=np.int8))
        if codes.shape != (len(k), self.dim):
            raise ValueError(f"vector index {self.path}: {codes.shape[1]}-d vectors given to a "
                             f"{self.dim}-d index")
        if len(sources) != len(k) or len(starts_at) != len(k):
            raise ValueError("vector index: keys, vectors, sources and starts_at differ in length")
        if len(k) == 0:
            return
        if len(np.unique(k)) != len(k):
            raise ValueError("vector index: a key is given twice in one add")
        with self._lock:
            n = self._n
            if k.min() <= self._watermark and self._remove_locked(k):
                self._compact()  # replaced: no dead row keeps a live key's place
                n = self._n
            order = np.argsort(k, kind="stable")
            k, codes = k[order], codes[order]
            src = np.fromiter((self._code_of(sources[i]) for i in order), dtype=np.int32,
                              count=len(k))
            at = np.asarray(starts_at, dtype=np.float64)[order]
            self._reserve(n + len(k))
            if n and k[0] <= self._keys[n - 1]:
                self._sorted = False
            self._order = None
            self._codes[n:n + len(k)] = codes
            self._keys[n:n + len(k)] = k
            self._source[n:n + len(k)] = src
            self._at[n:n + len(k)] = at
            self._alive[n:n + len(k)] = True
            self._n = n + len(k)
            self._watermark = max(self._watermark, int(k[-1]))
            self._unsaved += len(k)

    def remove(self, keys: Sequence[int] | Int64Array) -> int:
        """Remove the rows of ``keys`` that are here; returns how many went."""
        with self._lock:
            gone = self._remove_locked(np.asarray(keys, dtype=np.int64).reshape(-1))
            self._unsaved += gone
            return gone

    def remove_before(self, at: float) -> int:
        """Remove the rows whose ``start_at`` is before ``at`` (what retention deleted)."""
        with self._lock:
            n = self._n
            old = self._keys[:n][self._alive[:n] & (self._at[:n] < at)]
            gone = self._remove_locked(old)
            self._unsaved += gone
            return gone

    def clear(self) -> None:
        """Remove every row and forget the watermark (the store was emptied: its next
        rowids start again from 1)."""
        with self._lock:
            gone = int(self._alive[:self._n].sum())
            self._n = 0
            self._alive[:] = False
            self._graph = None
            self._graph_upto = 0
            self._sorted, self._order = True, None
            self._watermark = 0
            self._unsaved += max(1, gone)

    def maintain(self, budget: int = 4096) -> bool:
        """Move the HNSW graph forward by at most ``budget`` rows; True while there is more.

        The graph exists only once there are more than ``exact_max_rows`` rows
        (below that every search is exact). The store's writer calls this when idle.
        """
        with self._lock:
            if self._graph is None:
                if self._n <= self.exact_max_rows:
                    return False
                self._graph = Index(ndim=self.dim, metric=MetricKind.Cos, dtype="i8",
                                    connectivity=HNSW_CONNECTIVITY,
                                    expansion_add=HNSW_EXPANSION_ADD,
                                    expansion_search=HNSW_EXPANSION_SEARCH)
                self._graph_upto = 0
            hi = min(self._n, self._graph_upto + budget)
            lo = self._graph_upto
            live = lo + np.flatnonzero(self._alive[lo:hi])
            if len(live):
                self._graph.add(self._keys[live], self._codes[live], threads=self.threads)
                self._unsaved += len(live)
            self._graph_upto = hi
            return hi < self._n

    # ------------------------------------------------------------------------- search

    def search(self, vector: NDArray[Any], k: int, span: Span | None = None
               ) -> list[tuple[int, float]]:
        """The ``k`` rows nearest ``vector`` by cosine among those in ``span``:
        ``(key, cosine)``, best first. The cosine is the store's (float query against the
        int8 row)."""
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape != (self.dim,):
            raise ValueError(f"vector index {self.path}: a {q.shape[0]}-d query for a "
                             f"{self.dim}-d index")
        if k <= 0:
            return []
        with self._lock:
            rows = self._rows_in(span)
            if len(rows) == 0:
                return []
            share = len(rows) / max(1, int(self._alive[:self._n].sum()))
            factor = OVERFETCH_MARGIN / share
            graph_rows = rows[rows < self._graph_upto]
            if (self._graph is None or len(rows) <= self.exact_max_rows
                    or factor > MAX_OVERFETCH or len(graph_rows) < k):
                self._counts["exact"] += 1
                return self._exact(rows, q, k)
            self._counts["graph"] += 1
            eligible = np.zeros(self._n, dtype=bool)
            eligible[rows] = True
            fetch = min(len(self._graph), math.ceil((k + 8) * factor))
            found = self._graph.search(quantise(q.reshape(1, -1))[0], fetch,
                                       threads=self.threads)
            pos = self._positions(np.asarray(found.keys, dtype=np.int64))
            pos = pos[pos >= 0]
            pos = pos[eligible[pos]][:2 * k + 8]
            if len(pos) < min(k, len(graph_rows)):
                self._counts["fallback"] += 1
                return self._exact(rows, q, k)  # the filter left too few: be exact
            tail = rows[rows >= self._graph_upto]  # rows the graph does not hold yet
            if len(tail):
                near = [r for r, _ in exact_search(self._codes[tail], q, k, threads=self.threads)]
                pos = np.concatenate([pos, tail[np.asarray(near, dtype=np.int64)]])
            best = _rescore(self._codes, pos, q)[:k]
            return [(int(self._keys[p]), c) for p, c in best]

    def stats(self) -> IndexStats:
        with self._lock:
            n = self._n
            memory = (self._codes.nbytes + self._keys.nbytes + self._source.nbytes
                      + self._at.nbytes + self._alive.nbytes
                      + (int(self._graph.memory_usage) if self._graph is not None else 0))
            return IndexStats(rows=int(self._alive[:n].sum()),
                              graph_rows=len(self._graph) if self._graph is not None else 0,
                              watermark=self._watermark, memory_bytes=memory,
                              exact_searches=self._counts["exact"],
                              graph_searches=self._counts["graph"],
                              graph_fallbacks=self._counts["fallback"])

    # ------------------------------------------------------------------------- inside

    def _exact(self, rows: Int64Array, q: NDArray[np.float32], k: int
               ) -> list[tuple[int, float]]:
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        codes = self._codes[rows[0]:rows[-1] + 1] if contiguous else self._codes[rows]
        return [(int(self._keys[rows[r]]), c)
                for r, c in exact_search(codes, q, k, threads=self.threads)]

    def _rows_in(self, span: Span | None) -> Int64Array:
        n = self._n
        mask = self._alive[:n].copy()
        if span is not None:
            if span.sources:
                codes = [self._source_code[s] for s in span.sources if s in self._source_code]
                mask &= np.isin(self._source[:n], np.asarray(codes, dtype=np.int32))
            if span.since is not None:
                mask &= self._at[:n] >= span.since
            if span.until is not None:
                mask &= self._at[:n] < span.until
        return np.flatnonzero(mask).astype(np.int64)

    def _positions(self, keys: Int64Array) -> Int64Array:
        """The row of each key (-1: not here)."""
        n = self._n
        if n == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        if self._sorted:
            pos = np.minimum(np.searchsorted(self._keys[:n], keys), n - 1)
        else:
            if self._order is None:  # a replaced row went to the end: sort once per change
                self._order = np.argsort(self._keys[:n], kind="stable").astype(np.int64)
            order = self._order
            i = np.minimum(np.searchsorted(self._keys[:n], keys, sorter=order), n - 1)
            pos = order[i]
        pos = pos.astype(np.int64)
        hit = (self._keys[pos] == keys) & self._alive[pos]
        return np.where(hit, pos, -1)

    def _remove_locked(self, keys: Int64Array) -> int:
        if self._n == 0 or len(keys) == 0:
            return 0
        pos = self._positions(keys)
        pos = pos[pos >= 0]
        if len(pos) == 0:
            return 0
        self._alive[pos] = False
        if self._graph is not None:
            in_graph = pos[pos < self._graph_upto]
            if len(in_graph):
                self._graph.remove(self._keys[in_graph])
        if (self._n - int(self._alive[:self._n].sum())) * 4 > self._n:
            self._compact()
        return len(pos)

    def _compact(self) -> None:
        n = self._n
        live = np.flatnonzero(self._alive[:n])
        if len(live) == n:
            return
        self._graph_upto = int(np.searchsorted(live, self._graph_upto))
        self._codes = self._codes[live]
        self._keys = self._keys[live]
        self._source = self._source[live]
        self._at = self._at[live]
        self._alive = np.ones(len(live), dtype=bool)
        self._n = len(live)
        self._order = None

    def _reserve(self, rows: int) -> None:
        if rows <= len(self._keys):
            return
        size = max(rows, int(len(self._keys) * 1.5), 1024)
        n = self._n
        for name in ("_codes", "_keys", "_source", "_at", "_alive"):
            old = getattr(self, name)
            new = np.zeros((size, *old.shape[1:]), dtype=old.dtype)
            new[:n] = old[:n]
            setattr(self, name, new)

    def _code_of(self, source: str) -> int:
        code = self._source_code.get(source)
        if code is None:
            code = self._source_code[source] = len(self._sources)
            self._sources.append(source)
        return code


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexBatch:
    """Stored rows for the index, in key order: keys (rowids), int8 codes (n, dim), source
    ids and ``start_at`` times."""

    keys: Int64Array
    codes: NDArray[np.int8]
    sources: tuple[str, ...]
    starts_at: NDArray[np.float64]


class IndexRows(Protocol):
    """What a store gives :class:`HistoryVectorIndex` (SQLite: two small queries)."""

    def index_rows(self, *, model: str, dim: int, after: int, limit: int) -> IndexBatch:
        """At most ``limit`` rows of ``model`` with ``dim``-wide embeddings and a key above
        ``after``, in key order (none: the index has them all)."""
        ...

    def index_rows_at(self, keys: Sequence[int], *, model: str, dim: int) -> IndexBatch:
        """The rows of those of ``keys`` still stored (with a ``dim``-wide embedding of
        ``model``), in key order."""
        ...

    def window_ids(self, keys: Sequence[int]) -> dict[int, str]:
        """The window id of each of ``keys`` still stored (deleted ones are left out)."""
        ...


class HistoryVectorIndex:
    """A :class:`VectorIndex` kept in step with a store: the store's vector-search seam.

    The store asks :meth:`nearest` first and scans exactly when it answers None (another
    model, or the index still catching up). The store's writer calls :meth:`step` when
    idle (catch-up after the watermark, the graph grown, a save now and then) and
    :meth:`close` at the end, and :meth:`forget_before` after retention. Rows deleted
    from the store otherwise (a replaced window) are dropped when a search meets them.
    """

    def __init__(self, path: Path, dim: int, model: str, *, search_catch_up: int = 4096,
                 step_rows: int = 4096, graph_rows: int = 512, save_every: int = 20_000,
                 **index_options: Any) -> None:
        _remove_stale_temp_files(Path(path))
        self.index = VectorIndex.open(path, dim, model, **index_options)
        self.search_catch_up = search_catch_up
        self.step_rows = step_rows
        self.graph_rows = graph_rows
        self.save_every = save_every
        self._catching = threading.Lock()

    @property
    def reset_reason(self) -> str | None:
        """Why the saved index was not used (to log once), None when it was."""
        return self.index.reset_reason

    def catch_up(self, store: IndexRows, budget: int) -> bool:
        """Add at most ``budget`` of the store's rows after the watermark; True while more
        remain."""
        with self._catching:
            added = 0
            while added < budget:
                batch = store.index_rows(model=self.index.model, dim=self.index.dim,
                                         after=self.index.watermark,
                                         limit=min(4096, budget - added))
                if len(batch.keys) == 0:
                    return False
                self.index.add(batch.keys, batch.codes, batch.sources, batch.starts_at)
                added += len(batch.keys)
            return len(store.index_rows(model=self.index.model, dim=self.index.dim,
                                        after=self.index.watermark, limit=1).keys) > 0

    def nearest(self, store: IndexRows, vector: NDArray[Any], *, model: str, span: Span,
                limit: int) -> list[tuple[str, float]] | None:
        """``(window_id, cosine)`` best first, or None: let the exact scan answer."""
        if model != self.index.model or np.asarray(vector).size != self.index.dim:
            return None
        if self.catch_up(store, self.search_catch_up):
            return None  # far behind (a rebuild): exact until the writer's steps catch up
        for _ in range(3):
            hits = self.index.search(vector, limit, span)
            ids = store.window_ids([k for k, _ in hits])
            gone = [k for k, _ in hits if k not in ids]
            if not gone:
                break
            self.index.remove(gone)  # deleted from the store since: search again
        return [(ids[k], c) for k, c in hits if k in ids]

    def replaced(self, store: IndexRows, keys: Sequence[int]) -> None:
        """The store wrote the rows of ``keys`` again (same keys, new contents): their old
        embeddings go now and the new ones come in (those after the watermark come with
        the next catch-up)."""
        with self._catching:
            self.index.remove(keys)
            old = [int(k) for k in keys if int(k) <= self.index.watermark]
            if old:
                batch = store.index_rows_at(old, model=self.index.model, dim=self.index.dim)
                self.index.add(batch.keys, batch.codes, batch.sources, batch.starts_at)

    def forget_before(self, at: float | None) -> int:
        """After retention: drop the rows older than the oldest the store kept (``at``;
        None: the store is empty, drop all and start the watermark again)."""
        if at is None:
            with self._catching:
                gone = len(self.index)
                self.index.clear()
                return gone
        return self.index.remove_before(at)

    def step(self, store: IndexRows) -> bool:
        """The writer's idle work; True while there is more (call again soon).

        Raises:
            HistoryError: a save failed (the index goes on in memory).
        """
        more = self.catch_up(store, self.step_rows)
        more = self.index.maintain(self.graph_rows) or more
        if self.index.unsaved >= self.save_every:
            self.index.save()
        return more

    def close(self) -> None:
        """Save what is unsaved.

        Raises:
            HistoryError: the save failed.
        """
        if self.index.unsaved:
            self.index.save()


class _Unusable(Exception):
    """The saved index cannot be used; the message says why and names the file."""


def _remove_stale_temp_files(path: Path) -> None:
    """Remove what a save cut short left (a process killed mid-save: the temporary file of
    :func:`_replace_bytes`, as large as the index)."""
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


def _replace_bytes(path: Path, pieces: Sequence[bytes | memoryview]) -> None:
    """Write ``pieces`` and their CRC-32 to ``path`` atomically (temp file, fsync, rename)."""
    crc = 0
    with replacing(path) as fh:
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
            fh.write(piece)
        fh.write(struct.pack("<I", crc))
