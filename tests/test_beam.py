"""Tests of EnCLAP-style beam search over HF generate."""

from __future__ import annotations

import pytest
import torch
from transformers import BartForConditionalGeneration, GenerationConfig
from transformers.modeling_outputs import BaseModelOutput

from streamcap.errors import ConfigError
from streamcap.models.decoding.beam import BeamSearch
from streamcap.models.decoding.candidates import DecodedCaption
from streamcap.models.decoding.inference import SharedCrossInference, score_captions
from streamcap.models.decoding.options import DecodingOptions

torch.set_num_threads(1)

from torch_helpers import tiny_bart_config

VOCAB, D_MODEL, EOS = 200, 32, 2


@pytest.fixture(scope="module")
def bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    cfg = tiny_bart_config(VOCAB, D_MODEL)
    model: BartForConditionalGeneration = BartForConditionalGeneration(cfg).train(False)
    with torch.no_grad():  # a few favoured tokens, so that greedy paths would repeat
        model.final_logits_bias[0, 10:13] += 3.0
    return model


@pytest.fixture(scope="module")
def encoder_out() -> tuple[torch.Tensor, torch.Tensor]:
    states = torch.randn(1, 10, D_MODEL, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 8:] = 0
    return states, mask


def _greedy(
    bart: BartForConditionalGeneration, states: torch.Tensor, mask: torch.Tensor, max_length: int
) -> tuple[int, ...]:
    """Reference greedy decoding: forced BOS first, forced EOS at max_length, argmax otherwise."""
    ids = [2]
    while True:
        if len(ids) == 1:
            nxt = 0
        elif len(ids) == max_length - 1:
            nxt = EOS
        else:
            with torch.no_grad():
                out = bart(
                    encoder_outputs=BaseModelOutput(last_hidden_state=states),
                    attention_mask=mask,
                    decoder_input_ids=torch.tensor([ids]),
                )
            nxt = int(out.logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == EOS:
            return tuple(ids[1:])


def beam_search(bart: BartForConditionalGeneration, states: torch.Tensor, mask: torch.Tensor,
                num_beams: int = 4, max_length: int = 50, ngram: int = 3) -> DecodedCaption:
    options = DecodingOptions(mode="beam", num_beams=num_beams, beam_max_length=max_length,
                              no_repeat_ngram_size=ngram)
    [caption] = BeamSearch(options).decode(SharedCrossInference(bart, states, mask), None)
    return caption


def _hf_beam(bart: BartForConditionalGeneration, states: torch.Tensor, mask: torch.Tensor,
             num_beams: int, max_length: int, ngram: int) -> tuple[tuple[int, ...], float]:
    """Reference: HF generate with EnCLAP's published beam settings."""
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False, num_beams=num_beams, num_return_sequences=1, early_stopping=True,
        no_repeat_ngram_size=ngram, max_length=max_length, min_length=0, length_penalty=1.0,
        decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        forced_bos_token_id=0, forced_eos_token_id=2, use_cache=True, output_scores=True,
        return_dict_in_generate=True)
    out = bart.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                        attention_mask=mask, generation_config=config)
    ids = out.sequences[0].tolist()[1:]
    ids = ids[: ids.index(EOS) + 1] if EOS in ids else ids
    return tuple(ids), float(out.sequences_scores[0])


@pytest.mark.parametrize(("seed", "num_beams", "max_length", "ngram"), [
    (0, 4, 50, 3), (1, 4, 30, 3), (2, 2, 20, 0), (3, 3, 12, 2), (4, 5, 40, 3), (5, 4, 8, 0)])
def test_same_beams_as_hf_generate(seed: int, num_beams: int, max_length: int,
                                   ngram: int) -> None:
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(tiny_bart_config(VOCAB, D_MODEL)).train(False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.final_logits_bias.copy_(2.0 * torch.randn(1, VOCAB, generator=g))
        model.final_logits_bias[0, EOS] += 4.0
    states = torch.randn(1, 10, D_MODEL, generator=g)
    mask = torch.ones(1, 10, dtype=torch.long)
    ids, score = _hf_beam(model, states, mask, num_beams, max_length, ngram)
    mine = beam_search(model, states, mask, num_beams, max_length, ngram)
    assert mine.token_ids == ids
    assert mine.search_score == pytest.approx(score, abs=1e-4)


def test_one_beam_is_greedy(
    bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    result = beam_search(bart, states, mask, num_beams=1, max_length=12, ngram=0)
    assert result.token_ids == _greedy(bart, states, mask, 12)
    assert result.search_score is None


def test_enclap_defaults(
    bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    before = states.clone()
    first = beam_search(bart, states, mask)
    second = beam_search(bart, states, mask)
    assert torch.equal(states, before)
    assert first == second
    ids = first.token_ids
    assert ids[0] == 0 and ids[-1] == EOS and EOS not in ids[1:-1]
    assert len(ids) <= 50 - 1
    seq = [2, *ids]
    grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
    assert len(grams) == len(set(grams))
    (expected,) = score_captions(bart, states, mask, [ids])
    assert first.decoder_score == pytest.approx(expected, abs=1e-5)
    assert first.search_score is not None and first.search_score < 0.0


def test_ngram_block_changes_the_output(
    bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    free = beam_search(bart, states, mask, max_length=30, ngram=0)
    seq = [2, *free.token_ids]
    grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
    assert len(grams) != len(set(grams))  # without the block this model repeats itself


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_beams", 0), ("num_beams", 65), ("beam_max_length", 2), ("no_repeat_ngram_size", -1)],
)
def test_options_name_the_field(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"decoding.{field}: must be"):
        DecodingOptions(**{field: value})  # type: ignore[arg-type]
