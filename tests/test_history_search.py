"""The search's pure logic (times, words, the blend, grouping) and run_search on a fake store."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from history_fakes import MODEL, FakeHistory, window
from hypothesis import given
from hypothesis import strategies as st

from streamcap.errors import ConfigError
from streamcap.history.records import Span
from streamcap.history.search import (
    CANDIDATE_WEIGHT,
    MAX_CANDIDATES,
    MAX_TERMS,
    TEXT_WEIGHT,
    ScoredWindow,
    blend,
    check_limit,
    check_query,
    group_hits,
    parse_when,
    query_terms,
    run_search,
    score_windows,
    text_match,
)

NOW = 1_750_000_000.0


# --------------------------------------------------------------------------- parse_when


@pytest.mark.parametrize(("text", "ago"), [
    ("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 7 * 86400), ("1w", 604800),
    ("1h30m", 5400), ("1.5h", 5400), (" 2H ", 7200), ("now", 0)])
def test_parse_when_reads_times_ago(text: str, ago: float) -> None:
    assert parse_when(text, NOW) == NOW - ago


def test_parse_when_reads_iso_with_a_zone_and_unix_seconds() -> None:
    assert parse_when("2024-05-01T10:00:00Z", NOW) == datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()
    plus2 = datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=2))).timestamp()
    assert parse_when("2024-05-01T12:00+02:00", NOW) == plus2 == parse_when(
        "2024-05-01T10:00Z", NOW)
    assert parse_when("1714557600", NOW) == 1714557600.0
    assert parse_when("1714557600.25", NOW) == 1714557600.25


def test_parse_when_refuses_a_time_without_zone_naming_the_parameter() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_when("2024-05-01T10:00:00", NOW, name="until")
    message = caught.value.problems[0]
    assert message.startswith("until: ") and "time zone" in message and "2024-05-01" in message


@pytest.mark.parametrize("text", ["", "  ", "yesterday", "2x", "-2h", "h", "2h-", "1e9", "nan",
                                  "inf", "2024-13-01T00:00Z", "\x00", "2h; DROP TABLE", "9" * 400,
                                  "9" * 400 + "d"])
def test_parse_when_refuses_anything_else_saying_what_is_expected(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_when(text, NOW, name="since")
    message = caught.value.problems[0]
    assert message.startswith("since: ")
    assert "ISO 8601" in message or "time zone" in message


@given(st.text(max_size=30))
def test_parse_when_gives_a_finite_time_or_a_config_error(text: str) -> None:
    try:
        value = parse_when(text, NOW)
    except ConfigError as exc:
        assert exc.problems[0].startswith("since: ")
    else:
        assert np.isfinite(value)


# --------------------------------------------------------------------------- words


def test_query_terms_are_lowercase_words_without_stop_words_or_repeats() -> None:
    assert query_terms("The DOG is barking at the dog") == ("dog", "barking")
    assert query_terms('dog" OR "x NEAR(a b) * ^ a:b -cat') == ("dog", "x", "near", "b", "cat")
    assert query_terms("Sirène de pompiers 112") == ("sirene", "de", "pompiers", "112")
    assert query_terms("犬が吠える") == ("犬が吠える",)
    assert query_terms("snake_case") == ("snake", "case")


def test_query_terms_drop_control_characters_and_keep_at_most_16() -> None:
    assert query_terms("dog\x00bark\x1b[31m") == ("dog", "bark", "31m")
    many = " ".join(f"w{i}" for i in range(40))
    assert query_terms(many) == tuple(f"w{i}" for i in range(MAX_TERMS))
    assert query_terms("the a an of") == ()


@given(st.text(max_size=200))
def test_query_terms_are_always_plain_words(text: str) -> None:
    terms = query_terms(text)
    assert len(terms) <= MAX_TERMS and len(set(terms)) == len(terms)
    for term in terms:
        assert term and all(c.isalnum() for c in term), term


def test_check_query_and_limit_name_the_parameter() -> None:
    assert check_query("  dog\x00 ") == "dog"
    for bad in (None, "", "   ", "\x00\x01"):
        with pytest.raises(ConfigError, match=r"^q: expected the words"):
            check_query(bad)
    with pytest.raises(ConfigError, match=r"^q: expected at most 500 characters \(got 501\)"):
        check_query("x" * 501)
    assert check_limit(None) == 10 and check_limit("100") == 100 and check_limit(" 1") == 1
    for bad in ("0", "101", "-1", "1.5", "ten", "", "١"):
        with pytest.raises(ConfigError, match=r"^limit: expected an integer from 1 to 100"):
            check_limit(bad)


# --------------------------------------------------------------------------- blend


def test_text_match_counts_caption_words_and_candidates_at_half() -> None:
    assert text_match(("dog", "barking"), "A dog barks") == 0.5
    assert text_match(("dog", "barking"), "a dog barks", ["a dog is barking"]) == (
        1 + CANDIDATE_WEIGHT) / 2
    assert text_match(("dog",), "hotdog stand") == 0.0  # words, not substrings
    assert text_match((), "a dog") == 0.0


def test_blend_adds_the_weighted_text_match_to_the_similarity() -> None:
    assert blend(0.5, 1.0) == pytest.approx(0.5 + TEXT_WEIGHT)
    assert blend(None, 0.5) == pytest.approx(TEXT_WEIGHT * 0.5)
    assert blend(0.2, 0.0, weight=3.0) == 0.2


def test_score_windows_compares_only_embeddings_of_the_same_model() -> None:
    query = np.array([1.0, 0.0, 0.0], np.float32)
    same = window("a", 0, "a dog barks", vector=[1, 1, 0])
    other = window("a", 10, "a dog barks", vector=[1, 0, 0], model="other-model")
    none = window("a", 20, "rain")
    scored = {s.record.window_id: s for s in score_windows([same, other, none], query=query,
                                                           model=MODEL, terms=("dog",))}
    assert scored[same.window_id].similarity == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    assert scored[same.window_id].score == pytest.approx(1 / np.sqrt(2) + TEXT_WEIGHT, abs=1e-6)
    assert scored[other.window_id].similarity is None
    assert scored[other.window_id].score == pytest.approx(TEXT_WEIGHT)
    assert scored[none.window_id].similarity is None and scored[none.window_id].score == 0.0


# --------------------------------------------------------------------------- grouping


def _scored(source: str, start: float, score: float, text: str = "x",
            length: float = 10.0) -> ScoredWindow:
    record = window(source, start, text, length_s=length)
    return ScoredWindow(record=record, similarity=score, text_match=0.0, score=score)


def test_overlapping_and_touching_windows_of_a_source_are_one_hit() -> None:
    items = [_scored("a", 0, 0.2, "rain"), _scored("a", 5, 0.9, "dog"),  # overlap
             _scored("a", 15.5, 0.3, "dog"),  # touches within the tolerance
             _scored("a", 40, 0.5, "car"),  # a gap: another hit
             _scored("b", 5, 0.4, "dog")]  # another source
    hits = group_hits(items)
    assert [(h.source_id, h.start_at, h.end_at) for h in hits] == [
        ("a", 0, 25.5), ("a", 40, 50), ("b", 5, 15)]
    first = hits[0]
    assert first.score == 0.9 and first.best_window_id == items[1].record.window_id
    assert first.window_ids == tuple(i.record.window_id for i in items[:3])
    assert first.captions == ("rain", "dog")


@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 200), st.floats(-1, 1)),
                max_size=40, unique_by=lambda t: (t[0], t[1])))
def test_hits_partition_the_windows_and_never_overlap(
        rows: list[tuple[str, int, float]]) -> None:
    items = [_scored(src, float(start), score, length=5.0) for src, start, score in rows]
    hits = group_hits(items)
    ids = [w for h in hits for w in h.window_ids]
    assert sorted(ids) == sorted(i.record.window_id for i in items)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for source in "ab":
        spans = sorted((h.start_at, h.end_at) for h in hits if h.source_id == source)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start > end + 1.0  # further apart than the tolerance
    for hit in hits:
        assert hit.score == max(i.score for i in items if i.record.window_id in hit.window_ids)


# --------------------------------------------------------------------------- run_search


def _history() -> FakeHistory:
    store = FakeHistory()
    store.write([
        window("porch", 1000, "a dog barks", vector=[1, 0, 0]),
        window("porch", 1010, "a dog barks loudly", vector=[0.9, 0.1, 0]),
        window("porch", 5000, "rain falls", vector=[0, 1, 0]),
        window("kitchen", 2000, "a kettle whistles", vector=[0, 0, 1],
               candidates=("a kettle whistles", "a dog whines")),
        window("kitchen", 3000, "a dog barks", vector=[0, 0, 1], model="old-model"),
    ])
    return store


def test_run_search_blends_groups_and_ranks() -> None:
    store = _history()
    hits = run_search(store, lambda _q: np.array([1, 0, 0], np.float32), MODEL, "dog barking",
                      Span(), 10)
    assert hits[0].source_id == "porch" and hits[0].start_at == 1000 and hits[0].end_at == 1020
    assert hits[0].similarity == pytest.approx(1.0) and hits[0].text_match == 0.5
    assert len(hits[0].window_ids) == 2
    # the old model's window: no similarity, ranked by its text match alone
    old = next(h for h in hits if h.start_at == 3000)
    assert old.similarity is None and old.score == pytest.approx(TEXT_WEIGHT * 0.5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_run_search_respects_the_span_and_limit() -> None:
    store = _history()
    embed = lambda _q: np.array([0, 0, 1], np.float32)
    hits = run_search(store, embed, MODEL, "dog", Span(sources=("kitchen",)), 10)
    assert {h.source_id for h in hits} == {"kitchen"}
    hits = run_search(store, embed, MODEL, "dog", Span(since=1500, until=2500), 10)
    assert [h.start_at for h in hits] == [2000]
    assert hits[0].text_match == CANDIDATE_WEIGHT  # "dog" only among its candidates
    assert len(run_search(store, embed, MODEL, "dog", Span(), 1)) == 1


def test_run_search_without_an_embedder_uses_the_text_alone() -> None:
    store = _history()
    hits = run_search(store, None, MODEL, "kettle", Span(), 10)
    assert [h.captions for h in hits] == [("a kettle whistles",)]
    assert hits[0].similarity is None
    assert run_search(store, None, MODEL, "the of", Span(), 10) == []
    assert not [c for c in store.calls if c.startswith("vector_search")]


def test_run_search_asks_for_more_candidates_while_grouping_leaves_too_few_hits() -> None:
    store = FakeHistory()
    # 300 touching windows (one long hit), then 3 separate ones further away in the space
    store.write([window("a", 10.0 * i, "noise", vector=[1, 0, 0]) for i in range(300)])
    store.write([window("a", 100_000.0 + 1000 * i, "far", vector=[0.5, 1, 0]) for i in range(3)])
    hits = run_search(store, lambda _q: np.array([1, 0, 0], np.float32), MODEL, "zzz",
                      Span(), 4)
    assert len(hits) == 4
    assert len(hits[0].window_ids) == 300
    asked = [int(c.split(":")[1]) for c in store.calls if c.startswith("vector_search")]
    assert asked[0] < asked[-1] <= MAX_CANDIDATES


def test_run_search_through_the_vector_index_gives_the_exact_scans_hits(tmp_path: Path) -> None:
    """The store with the daemon's vector index plugged in ranks and groups as the store's
    own exact scan does (a small store: every row in the index's exact range)."""
    from streamcap.history.records import WindowRecord
    from streamcap.history.sqlite import SqliteHistory
    from streamcap.history.vectors import HistoryVectorIndex

    dim, t0 = 48, 1_700_000_000.0
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((6, dim)).astype(np.float32)
    texts = ("a dog barks", "a siren wails", "rain falls", "a car passes", "wind blows",
             "a bell rings")
    items = []
    for i in range(600):
        c = (i // 4) % 6  # runs of four touching windows of one sound
        items.append(WindowRecord(
            window_id=f"w{i}", source_id=("kitchen", "street")[i % 2], run_id="r", seq=i,
            start_s=5.0 * i, end_s=5.0 * i + 10, start_at=t0 + 5.0 * (i // 2),
            end_at=t0 + 5.0 * (i // 2) + 10, model=MODEL, text=texts[c], score=-1.0,
            candidates=(texts[c], texts[(c + 1) % 6]),
            embedding=centres[c] + rng.standard_normal(dim).astype(np.float32)))
    exact = SqliteHistory(tmp_path / "h.sqlite3")
    exact.write(items)
    indexed = SqliteHistory(tmp_path / "h.sqlite3", read_only=True, check=False,
                            vector_index=HistoryVectorIndex(tmp_path / "h.vectors", dim, MODEL))

    def embed(text: str) -> np.ndarray:
        nouns = ("dog", "siren", "rain", "car", "wind", "bell")
        return centres[nouns.index(text.split()[0])] + np.float32(0.05)

    try:
        for query in ("dog barking", "siren", "rain"):
            for span in (Span(), Span(sources=("street",)), Span(since=t0 + 400),
                         Span(since=t0 + 100, until=t0 + 700)):
                for limit in (1, 5, 20):
                    a = run_search(exact, embed, MODEL, query, span, limit)
                    b = run_search(indexed, embed, MODEL, query, span, limit)
                    assert [h.window_ids for h in a] == [h.window_ids for h in b]
                    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
                    assert a, (query, span, limit)
    finally:
        indexed.close()
        exact.close()
