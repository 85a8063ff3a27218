"""Tests of the blended reranker and its fluency filter."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from streamcap.errors import ConfigError
from streamcap.models.decoding.candidates import DecodedCaption
from streamcap.models.decoding.options import DecodingOptions as RerankOptions
from streamcap.models.decoding.rerank import Ranker, TextScorer, rerank
from streamcap.models.enclap.tokenizer import NO_CAPTION_TEXT

OPTS = RerankOptions()
TEXTS = ["a dog barks", "rain falls", "a car passes"]


def test_blended_score_picks_best() -> None:
    # dog: 0.7*0.2 + 0.3*-1.0 = -0.16; rain: 0.7*0.5 + 0.3*-2.0 = -0.25; car: 0.7*0.1 + 0.3*-0.5 = -0.08
    result = rerank(TEXTS, [-1.0, -2.0, -0.5], [0.2, 0.5, 0.1], None, OPTS)
    assert result.best.text == "a car passes"
    assert result.best_index == 2
    assert [c.text for c in result.candidates] == ["a car passes", "a dog barks", "rain falls"]
    assert [c.score for c in result.candidates] == pytest.approx([-0.08, -0.16, -0.25])
    assert result.best.encoder_score == 0.1 and result.best.decoder_score == -0.5
    assert not result.flagged
    assert all(c.error_prob is None and not c.flagged for c in result.candidates)


def test_weights_change_the_choice() -> None:
    encoder_only = RerankOptions(encoder_weight=1.0, decoder_weight=0.0)
    result = rerank(TEXTS, [-1.0, -2.0, -0.5], [0.2, 0.5, 0.1], None, encoder_only)
    assert result.best.text == "rain falls"


def test_fluency_threshold_is_strict() -> None:
    # the best candidate (car) sits exactly on the threshold: not flagged
    at = rerank(TEXTS, [-1.0, -2.0, -0.5], [0.2, 0.5, 0.1], [0.0, 0.0, 0.9], OPTS)
    assert at.best.text == "a car passes" and not at.best.flagged
    # just above it: flagged, the next best wins
    above = rerank(TEXTS, [-1.0, -2.0, -0.5], [0.2, 0.5, 0.1], [0.0, 0.0, 0.9001], OPTS)
    assert above.best.text == "a dog barks" and not above.flagged
    flags = {c.text: c.flagged for c in above.candidates}
    assert flags == {"a car passes": True, "a dog barks": False, "rain falls": False}
    assert above.candidates[0].text == "a car passes"  # flagged ones keep their rank in the list
    assert above.candidates[0].error_prob == 0.9001


def test_all_flagged_falls_back_to_best_overall() -> None:
    result = rerank(TEXTS, [-1.0, -2.0, -0.5], [0.2, 0.5, 0.1], [0.95, 0.99, 0.91], OPTS)
    assert result.best.text == "a car passes"
    assert result.best.flagged and result.flagged
    assert all(c.flagged for c in result.candidates)


def test_ties_break_on_decoder_score_then_input_order() -> None:
    # exactly equal blended scores: 0.5*0.5 + 0.5*-1.0 == 0.5*0.0 + 0.5*-0.5 == -0.25
    half = RerankOptions(encoder_weight=0.5, decoder_weight=0.5)
    texts = ["first", "second", "third"]
    result = rerank(texts, [-1.0, -0.5, -0.5], [0.5, 0.0, 0.0], None, half)
    assert [c.score for c in result.candidates] == [-0.25] * 3
    assert [c.text for c in result.candidates] == ["second", "third", "first"]
    assert result.best_index == 1
    same = rerank(["x", "y"], [-1.0, -1.0], [0.5, 0.5], None, OPTS)
    assert same.best.text == "x" and same.best_index == 0


def test_no_retriever_uses_decoder_score_only() -> None:
    result = rerank(TEXTS, [-1.0, -2.0, -0.5], None, None, OPTS)
    assert result.best.text == "a car passes"
    assert [c.score for c in result.candidates] == [-0.5, -1.0, -2.0]
    assert all(c.encoder_score is None for c in result.candidates)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="texts is empty"):
        rerank([], [], None, None, OPTS)
    with pytest.raises(ValueError, match="encoder_scores has 2 values, texts has 3"):
        rerank(TEXTS, [-1.0, -2.0, -0.5], [0.1, 0.2], None, OPTS)
    with pytest.raises(ValueError, match="error_probs has 1 values"):
        rerank(TEXTS, [-1.0, -2.0, -0.5], None, [0.1], OPTS)
    with pytest.raises(ValueError, match="decoder_scores contains NaN"):
        rerank(TEXTS, [-1.0, float("nan"), -0.5], None, None, OPTS)


@pytest.mark.parametrize(
    ("field", "value"),
    [("encoder_weight", -0.1), ("decoder_weight", float("inf")), ("fluency_threshold", 1.5)],
)
def test_options_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"decoding.{field}: must be"):
        RerankOptions(**{field: value})
    with pytest.raises(ConfigError, match="both be 0"):
        RerankOptions(encoder_weight=0.0, decoder_weight=0.0).check()


def _decoded(text: str, score: float) -> DecodedCaption:
    return DecodedCaption(token_ids=(0, 5, 2), decoder_score=score, log_likelihood=3 * score,
                          ended_by_model=True, text=text)


DECODED = [_decoded("a dog barks", -1.0), _decoded("A dog barks!", -0.5),
           _decoded("rain falls", -2.0)]


def _scorer(values: dict[str, float], calls: list[str]) -> TextScorer:
    def score(texts: Sequence[str]) -> list[float]:
        calls.append(",".join(texts))
        return [values[t] for t in texts]
    return score


def test_ranker_blends_distinct_texts_and_books_each_scorer() -> None:
    calls: list[str] = []
    laps: list[str] = []
    ranked = Ranker(OPTS, blend=True).rank(
        DECODED, similarity=_scorer({"A dog barks!": 0.1, "rain falls": 0.9}, calls),
        fluency=_scorer({"A dog barks!": 0.95, "rain falls": 0.1}, calls),
        lap=laps.append)
    assert calls == ["A dog barks!,rain falls"] * 2  # deduplicated, best decoder score kept
    assert laps == ["text_encoder", "fluency"]
    assert ranked.best.text == "rain falls" and not ranked.flagged
    assert ranked.best.score == pytest.approx(0.7 * 0.9 + 0.3 * -2.0)
    assert [c.flagged for c in ranked.candidates] == [False, True]


def test_ranker_without_blend_ranks_by_decoder_score_and_calls_no_scorer() -> None:
    calls: list[str] = []
    laps: list[str] = []
    ranked = Ranker(OPTS, blend=False).rank(
        DECODED, similarity=_scorer({}, calls), fluency=_scorer({}, calls),
        lap=laps.append)
    assert calls == [] and laps == []
    assert ranked.best.text == "A dog barks!" and ranked.best.score == -0.5
    assert ranked.best.encoder_score is None and ranked.best.error_prob is None


def test_ranker_gives_a_flagged_placeholder_when_nothing_is_readable() -> None:
    ranked = Ranker(OPTS, blend=True).rank([_decoded("", -3.0), _decoded(" ", -1.0)],
                                           similarity=None, fluency=None, lap=lambda _: None)
    assert ranked.best.text == NO_CAPTION_TEXT and ranked.flagged
    assert ranked.best.score == -1.0 and len(ranked.candidates) == 1
