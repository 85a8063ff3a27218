"""The captioner's text: every caption and candidate is cleaned where it is decoded.

A real tiny (random) captioner runs on a real window; its tokenizer is made to
decode to what a byte-level BPE model can emit (U+FFFD fragments, control
bytes), or to nothing readable at all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from streamcap.audio.windowing import Windower
from streamcap.messages import Window, make_block
from streamcap.models.captioner import Captioner, build_captioner
from streamcap.models.decoding.abstain import QUIET_TEXT, UNFAMILIAR_TEXT, AbstentionRule
from streamcap.models.decoding.filters import NoRepeatNgram
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.enclap.tokenizer import NO_CAPTION_TEXT

RATE = 16000


@pytest.fixture(scope="module", params=["sample", "beam"])
def captioner(request: pytest.FixtureRequest) -> Captioner:
    decoding = DecodingOptions(mode=request.param, n_candidates=3, max_new_tokens=4,
                               beam_max_length=6, num_beams=2, seed=0, no_repeat_ngram_size=2,
                               explicit=frozenset({"mode", "num_beams", "beam_max_length",
                                                   "no_repeat_ngram_size"}))
    return build_captioner("tiny", decoding, device=torch.device("cpu"), dtype=torch.float32)


def one_window(captioner: Captioner) -> Window:
    audio = 0.1 * np.random.default_rng(0).standard_normal(11 * RATE).astype(np.float32)
    windower = Windower("s", 10.0, 10.0, captioner.sample_rates_hz)
    block = make_block(source_id="s", start_sample=0, sample_rate_hz=RATE, samples=audio,
                       captured_at=0.0)
    [window] = windower.feed(block).windows
    return window


def decoding_to(monkeypatch: pytest.MonkeyPatch, captioner: Captioner,
                texts: Callable[[list[int]], str]) -> None:
    tokenizer = captioner.components.tokenizer
    monkeypatch.setattr(tokenizer, "decode",
                        lambda ids, skip_special_tokens=False: texts(list(ids)))


def test_captions_and_candidates_are_clean(monkeypatch: pytest.MonkeyPatch,
                                           captioner: Captioner) -> None:
    decoding_to(monkeypatch, captioner,
                lambda ids: f" a dog\x00 barks\ufffd\n\tnear a\u0301 car\x1b[0m {len(ids)} ")
    caption = captioner.caption(one_window(captioner)).caption
    for text in [caption.text, *(c.text for c in caption.candidates)]:
        assert text.startswith("a dog barks near \u00e1 car[0m ")
        assert "\ufffd" not in text and all(ch.isprintable() for ch in text)
    assert caption.text != NO_CAPTION_TEXT


def test_a_caption_with_nothing_readable_is_an_honest_flagged_placeholder(
        monkeypatch: pytest.MonkeyPatch, captioner: Captioner) -> None:
    decoding_to(monkeypatch, captioner, lambda ids: "\ufffd\x00 \ufffd\x07\n")
    caption = captioner.caption(one_window(captioner)).caption
    assert caption.text == NO_CAPTION_TEXT
    assert caption.flagged
    assert [c.text for c in caption.candidates] == [NO_CAPTION_TEXT]
    assert all(c.flagged for c in caption.candidates)
    assert np.isfinite(caption.score)


def test_caption_in_either_mode(captioner: Captioner) -> None:
    result = captioner.caption(one_window(captioner))
    caption = result.caption
    assert caption.text and np.isfinite(caption.score)
    assert caption.text in [c.text for c in caption.candidates]
    stages = list(result.stage_seconds)
    if captioner.task.options.mode == "beam":
        assert stages[-3:] == ["encoder", "beam", "abstention"]
        [only] = caption.candidates
        assert only.score == only.decoder_score and only.encoder_score is None
    else:
        assert stages[-5:] == ["encoder", "sampling", "text_encoder", "fluency", "abstention"]
        assert 1 <= len(caption.candidates) <= 3
        assert all(c.encoder_score is not None for c in caption.candidates)
    assert result.embedding is not None and result.embedding.window_id == caption.window_id


def with_rule(captioner: Captioner, rule: AbstentionRule | None) -> Captioner:
    captioner.abstention = rule
    captioner._quiet_joint = None
    return captioner


def silent_window(captioner: Captioner) -> Window:
    windower = Windower("quiet", 10.0, 10.0, captioner.sample_rates_hz)
    block = make_block(source_id="quiet", start_sample=0, sample_rate_hz=RATE,
                       samples=np.zeros(11 * RATE, dtype=np.float32), captured_at=0.0)
    [window] = windower.feed(block).windows
    return window


def test_confidence_is_the_retriever_cosine_of_the_chosen_caption(
        monkeypatch: pytest.MonkeyPatch, captioner: Captioner) -> None:
    decoding_to(monkeypatch, captioner, lambda ids: f"a dog barks {len(ids)} times")
    result = with_rule(captioner, None).caption(one_window(captioner))
    caption = result.caption
    assert result.embedding is not None and caption.confidence is not None
    vector = torch.from_numpy(np.array(result.embedding.vector))
    expected = float(captioner.text_embeddings([caption.text])[0] @ vector)
    assert caption.confidence == pytest.approx(expected, abs=1e-5)
    assert not caption.abstained


def test_the_bundle_rule_replaces_an_unconfident_caption(
        monkeypatch: pytest.MonkeyPatch, captioner: Captioner) -> None:
    decoding_to(monkeypatch, captioner, lambda ids: "a dog barks")
    try:
        window = one_window(captioner)
        kept = with_rule(captioner, AbstentionRule(min_confidence=-1.0)).caption(window).caption
        assert not kept.abstained and kept.text != UNFAMILIAR_TEXT
        refused = with_rule(captioner, AbstentionRule(min_confidence=1.0)).caption(window).caption
        assert refused.abstained and refused.text == UNFAMILIAR_TEXT
        assert refused.confidence == pytest.approx(kept.confidence, abs=1e-5)
        assert kept.text in [c.text for c in refused.candidates]  # the model's caption stays
        quiet_rule = AbstentionRule(min_confidence=-1.0, quiet_texts=("silence", "a quiet room"),
                                    quiet_margin=2.0)  # quiet always comes within the margin
        quiet = with_rule(captioner, quiet_rule).caption(window).caption
        assert quiet.abstained and quiet.text == QUIET_TEXT
        silent = with_rule(captioner, AbstentionRule(min_confidence=-1.0)).caption(
            silent_window(captioner)).caption
        assert silent.abstained and silent.text == QUIET_TEXT
        placeholder = AbstentionRule(min_confidence=1.0)
        decoding_to(monkeypatch, captioner, lambda ids: "\ufffd")
        unreadable = with_rule(captioner, placeholder).caption(window).caption
        assert unreadable.text == NO_CAPTION_TEXT and unreadable.flagged  # already honest
        assert unreadable.confidence is None and not unreadable.abstained
    finally:
        with_rule(captioner, None)


def test_the_configured_ngram_block_reaches_either_decoder(captioner: Captioner) -> None:
    blocks = [f.n for f in captioner.task.decoder.filters if isinstance(f, NoRepeatNgram)]
    assert blocks == [2]


def test_bundle_defaults_fill_only_what_the_user_did_not_set() -> None:
    bundle = {"mode": "beam", "no_repeat_ngram_size": 3, "num_beams": 4, "unknown": 1}
    assert DecodingOptions().with_defaults(bundle).no_repeat_ngram_size == 3
    mine = DecodingOptions(no_repeat_ngram_size=0, num_beams=2,
                           explicit=frozenset({"no_repeat_ngram_size", "num_beams"}))
    chosen = mine.with_defaults(bundle)
    assert (chosen.mode, chosen.no_repeat_ngram_size, chosen.num_beams) == ("beam", 0, 2)
