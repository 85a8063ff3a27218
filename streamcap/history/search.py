"""Searching the history: the query's words and times, the ranking rule, hits (docs/search.md).

Pure logic: everything but :func:`run_search` is a plain function of its
arguments; :func:`run_search` calls a :class:`~streamcap.history.store.HistoryStore`
(blocking: run it on a worker thread, never on the event loop).

**The ranking rule.** A window's score blends two signals:

* ``similarity``: the cosine of the query's text embedding with the window's
  audio embedding, both from the retriever of the model that made the window
  (None when the window was made by another model, has no embedding, or there
  is no text embedder);
* ``text_match``: the share of the query's words (:func:`query_terms`) found
  as words in the window's caption (a word found only among the other
  candidate captions counts half).

``score = similarity + TEXT_WEIGHT * text_match``, and ``TEXT_WEIGHT *
text_match`` alone for a window without a comparable embedding.
:data:`TEXT_WEIGHT` was chosen by a measurement on the demo bundle
(``bench/search_weight.py``, see docs/search.md).

**Hits.** Matching windows of one source that overlap or touch (the next
starts at most :data:`GROUP_GAP_S` after the previous ends) are one hit,
spanning the first start to the last end and scored by its best window.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Final

import numpy as np

from streamcap.errors import ConfigError
from streamcap.history.records import SearchHit, Span, WindowRecord, unit_vector
from streamcap.history.store import HistoryStore
from streamcap.messages import Float32Array

__all__ = [
    "CANDIDATE_WEIGHT", "DEFAULT_LIMIT", "GROUP_GAP_S", "MAX_LIMIT", "MAX_QUERY_CHARS",
    "MAX_TERMS", "STOP_WORDS", "TEXT_WEIGHT", "ScoredWindow", "blend", "candidate_count",
    "check_limit", "check_query", "group_hits", "parse_when", "query_terms", "run_search",
    "score_windows", "text_match", "words",
]

TEXT_WEIGHT: Final = 0.1
"""W in ``score = similarity + W * text_match`` (measured: docs/search.md)."""

CANDIDATE_WEIGHT: Final = 0.5
"""What a query word found only among a window's other candidate captions counts."""

GROUP_GAP_S: Final = 1.0
"""Windows of one source at most this far apart (start of the next after the end of the
previous, wall clock) are one hit: a tolerance for clock jitter between touching windows."""

DEFAULT_LIMIT: Final = 10
MAX_LIMIT: Final = 100
"""Hits a search returns at most."""

MAX_QUERY_CHARS: Final = 500
MAX_TERMS: Final = 16
"""Words of a query used for the text match at most (the first ones)."""

CANDIDATES_PER_HIT: Final = 5
MIN_CANDIDATES: Final = 50
MAX_CANDIDATES: Final = 2000
"""Windows asked of each index: ``max(MIN, PER_HIT * limit)``, grown fourfold while
grouping leaves fewer hits than asked and the store had more, up to MAX."""

STOP_WORDS: Final = frozenset((
    "a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "for", "from", "by",
    "with", "into", "onto", "over", "under", "is", "are", "was", "were", "be", "been",
    "being", "am", "it", "its", "this", "that", "these", "those", "there", "here", "as",
    "so", "than", "then", "some", "any", "do", "does", "did", "has", "have", "had", "i",
    "you", "he", "she", "we", "they", "me", "my", "your", "our", "their"))
"""English words too common to tell windows apart; a query of them alone matches by
similarity only."""

_WORD: Final = re.compile(r"[^\W_]+")
_LATIN_END: Final = "\u024f"  # the last letter of Latin Extended-B
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS_S: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_NUMBER: Final = re.compile(r"\d+(?:\.\d*)?|\.\d+")
WHEN_EXPECTED: Final = ("a time ago (90s, 30m, 2h, 7d, 1w, or combined: 1h30m), 'now', "
                        "ISO 8601 with a time zone (2024-05-01T10:00:00Z, "
                        "2024-05-01T12:00+02:00) or UNIX seconds")


# --------------------------------------------------------------------------- parameters


def parse_when(text: str, now: float, *, name: str = "since") -> float:
    """A point in time as UNIX seconds: ``2h`` (ago), ISO 8601 with a zone, UNIX seconds.

    A time without a zone is refused rather than guessed: the daemon and whoever
    asks may be in different zones (docs/search.md).

    Raises:
        ConfigError: ``"<name>: expected ... (got '...')"``.
    """
    value = text.strip()
    shown = repr(value[:40])

    def bad(why: str = "") -> ConfigError:
        return ConfigError(f"{name}: {why or 'expected ' + WHEN_EXPECTED} (got {shown})")

    if not value:
        return _raise(bad())
    lowered = value.lower()
    if lowered == "now":
        return now
    if _DURATION.fullmatch(lowered):
        ago = sum(float(n) * _UNITS_S[u] for n, u in _DURATION_PART.findall(lowered))
        if not math.isfinite(now - ago):
            return _raise(bad())
        return now - ago
    if _NUMBER.fullmatch(value):
        seconds = float(value)
        if not math.isfinite(seconds):
            return _raise(bad())
        return seconds
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return _raise(bad())
    if when.tzinfo is None or when.utcoffset() is None:
        return _raise(bad("has no time zone; add one, e.g. Z for UTC or +02:00"))
    return when.timestamp()


def _raise(error: ConfigError) -> float:
    raise error


def check_limit(text: str | None, *, name: str = "limit", default: int = DEFAULT_LIMIT,
                most: int = MAX_LIMIT) -> int:
    """``text`` as an integer in 1..``most`` (``default`` when None).

    Raises:
        ConfigError: ``"limit: expected an integer from 1 to 100 (got '...')"``.
    """
    if text is None:
        return default
    value = text.strip()
    if value.isascii() and value.isdigit() and 1 <= int(value) <= most:
        return int(value)
    raise ConfigError(f"{name}: expected an integer from 1 to {most} (got {value[:40]!r})")


def check_query(text: str | None, *, name: str = "q") -> str:
    """The query text, checked: present, not blank, at most :data:`MAX_QUERY_CHARS`.

    Raises:
        ConfigError: naming ``name``.
    """
    if text is None or not clean_text(text).strip():
        raise ConfigError(f"{name}: expected the words to search for (got nothing)")
    if len(text) > MAX_QUERY_CHARS:
        raise ConfigError(f"{name}: expected at most {MAX_QUERY_CHARS} characters "
                          f"(got {len(text)})")
    return clean_text(text).strip()


def clean_text(text: str) -> str:
    """``text`` without NUL and other control characters (each becomes a space)."""
    return "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in text)


def words(text: str) -> list[str]:
    """The words of ``text``: runs of letters and digits (any script), case-folded, Latin
    letters without diacritics (``Café`` -> ``cafe``), as the store's full-text index
    splits them."""
    folded = unicodedata.normalize("NFKD", clean_text(text).casefold())
    kept: list[str] = []
    base = ""
    for c in folded:
        if not unicodedata.combining(c):
            base = c
        elif base <= _LATIN_END:
            continue  # a diacritic of a Latin letter (é -> e); others (が) are kept
        kept.append(c)
    return _WORD.findall(unicodedata.normalize("NFC", "".join(kept)))


def query_terms(text: str) -> tuple[str, ...]:
    """The words of a query the text match uses: :func:`words` without stop words and
    repeats, the first :data:`MAX_TERMS`. May be empty (similarity alone then ranks)."""
    seen: dict[str, None] = {}
    for word in words(text):
        if word not in STOP_WORDS:
            seen.setdefault(word, None)
        if len(seen) == MAX_TERMS:
            break
    return tuple(seen)


# --------------------------------------------------------------------------- ranking


def text_match(terms: Sequence[str], text: str, candidates: Sequence[str] = ()) -> float:
    """The share of ``terms`` found as words of ``text`` (1 each) or, failing that, of one
    of ``candidates`` (:data:`CANDIDATE_WEIGHT` each); 0 for no terms."""
    if not terms:
        return 0.0
    own = _word_set(text)
    others = frozenset().union(*(_word_set(c) for c in candidates))
    found = sum(1.0 if t in own else CANDIDATE_WEIGHT if t in others else 0.0 for t in terms)
    return found / len(terms)


@lru_cache(maxsize=4096)
def _word_set(text: str) -> frozenset[str]:
    """:func:`words` as a set, remembered: captions repeat, and a search scores hundreds."""
    return frozenset(words(text))


def blend(similarity: float | None, match: float, *, weight: float = TEXT_WEIGHT) -> float:
    """The ranking score of a window (see the module docstring)."""
    return (0.0 if similarity is None else similarity) + weight * match


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoredWindow:
    """A candidate window and its scores."""

    record: WindowRecord
    similarity: float | None
    text_match: float
    score: float


def score_windows(records: Iterable[WindowRecord], *, query: Float32Array | None, model: str,
                  terms: Sequence[str], weight: float = TEXT_WEIGHT) -> list[ScoredWindow]:
    """Every record scored by :func:`blend`; ``query`` is the unit text embedding of
    ``model``'s retriever (None: no similarity for any window)."""
    out = []
    for record in records:
        similarity: float | None = None
        if (query is not None and record.embedding is not None and record.model == model
                and record.embedding.shape == query.shape):
            similarity = float(np.dot(unit_vector(record.embedding), query))
        match = text_match(terms, record.text, record.candidates)
        out.append(ScoredWindow(record=record, similarity=similarity, text_match=match,
                                score=blend(similarity, match, weight=weight)))
    return out


def _rank_key(item: ScoredWindow | SearchHit) -> tuple[float, float, str]:
    if isinstance(item, ScoredWindow):
        return (-item.score, -item.record.start_at, item.record.window_id)
    return (-item.score, -item.start_at, item.source_id)


def group_hits(scored: Iterable[ScoredWindow], *, gap_s: float = GROUP_GAP_S) -> list[SearchHit]:
    """Adjacent windows of a source as one hit each (see the module docstring), best first
    (ties: the newer first)."""
    by_source: dict[str, list[ScoredWindow]] = {}
    for item in scored:
        by_source.setdefault(item.record.source_id, []).append(item)
    hits: list[SearchHit] = []
    for items in by_source.values():
        items.sort(key=lambda s: (s.record.start_at, s.record.end_at, s.record.window_id))
        group: list[ScoredWindow] = []
        end = -math.inf
        for item in items:
            if group and item.record.start_at > end + gap_s:
                hits.append(_hit(group))
                group = []
            group.append(item)
            end = max(end, item.record.end_at) if len(group) > 1 else item.record.end_at
        if group:
            hits.append(_hit(group))
    hits.sort(key=_rank_key)
    return hits


def _hit(group: Sequence[ScoredWindow]) -> SearchHit:
    best = min(group, key=_rank_key)
    captions = tuple(dict.fromkeys(s.record.text for s in group))
    return SearchHit(
        source_id=best.record.source_id, start_at=group[0].record.start_at,
        end_at=max(s.record.end_at for s in group), score=best.score,
        similarity=best.similarity, text_match=best.text_match,
        best_window_id=best.record.window_id,
        window_ids=tuple(s.record.window_id for s in group), captions=captions,
        model=best.record.model)


def candidate_count(limit: int) -> int:
    """Windows first asked of each index for ``limit`` hits."""
    return min(MAX_CANDIDATES, max(MIN_CANDIDATES, CANDIDATES_PER_HIT * limit))


def run_search(store: HistoryStore, embed_text: Callable[[str], Float32Array] | None,
               model: str, query: str, span: Span, limit: int) -> list[SearchHit]:
    """The best ``limit`` hits for ``query`` in ``span`` (blocking: store calls).

    Candidates are the union of the store's nearest windows to the query's text
    embedding (of ``model``; none without ``embed_text``) and its text matches of
    the query's words; each is scored by :func:`score_windows` and grouped by
    :func:`group_hits`. While the hits are fewer than ``limit`` and an index gave
    as many windows as asked, more are asked (see :data:`MAX_CANDIDATES`).

    Raises:
        HistoryError: the store cannot be read.
    """
    terms = query_terms(query)
    vector = None if embed_text is None else unit_vector(embed_text(query))
    if vector is not None and not float(np.linalg.norm(vector)) > 0:
        vector = None
    if vector is None and not terms:
        return []
    count = candidate_count(limit)
    records: dict[str, WindowRecord] = {}  # read once, kept while the candidates widen
    scored: dict[str, ScoredWindow] = {}
    while True:
        near = ([] if vector is None
                else store.vector_search(vector, model=model, span=span, limit=count))
        matched = [] if not terms else store.text_search(terms, span=span, limit=count)
        ids = list(dict.fromkeys([window_id for window_id, _ in near] + matched))
        records.update(store.windows([i for i in ids if i not in records],
                                     vectors=vector is not None))
        kept = [records[i] for i in ids if i in records and span.holds(
            records[i].source_id, records[i].start_at)]
        fresh = [r for r in kept if r.window_id not in scored]
        scored.update((s.record.window_id, s) for s in
                      score_windows(fresh, query=vector, model=model, terms=terms))
        hits = group_hits(scored[r.window_id] for r in kept)
        more = len(near) >= count or len(matched) >= count
        if len(hits) >= limit or not more or count >= MAX_CANDIDATES:
            return hits[:limit]
        count = min(MAX_CANDIDATES, count * 4)
