"""Tests of EnCLAP-style beam search over HF generate."""

from __future__ import annotations

import pytest
import torch
from transformers import BartForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from streamcap.models.decoding.beam import BeamOptions, beam_search
from streamcap.models.decoding.sampling import score_captions

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


def test_one_beam_is_greedy(
    bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    opts = BeamOptions(num_beams=1, no_repeat_ngram_size=0, max_length=12)
    result = beam_search(bart, states, mask, opts)
    assert result.token_ids == _greedy(bart, states, mask, 12)
    assert result.beam_score is None


def test_enclap_defaults(
    bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    before = states.clone()
    opts = BeamOptions()
    assert (opts.num_beams, opts.no_repeat_ngram_size, opts.max_length, opts.early_stopping) == (
        4,
        3,
        50,
        True,
    )
    first = beam_search(bart, states, mask, opts)
    second = beam_search(bart, states, mask, opts)  # generate must not have grown the input
    assert torch.equal(states, before)
    assert first == second
    ids = first.token_ids
    assert ids[0] == 0 and ids[-1] == EOS and EOS not in ids[1:-1]
    assert len(ids) <= opts.max_length - 1
    seq = [2, *ids]
    grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
    assert len(grams) == len(set(grams))
    (expected,) = score_captions(bart, states, mask, [ids])
    assert first.decoder_score == pytest.approx(expected, abs=1e-6)
    assert first.beam_score is not None and first.beam_score < 0.0


def test_ngram_block_changes_the_output(
    bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    free = beam_search(bart, states, mask, BeamOptions(no_repeat_ngram_size=0, max_length=30))
    seq = [2, *free.token_ids]
    grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
    assert len(grams) != len(set(grams))  # without the block this model repeats itself


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_beams", 0), ("max_length", 2), ("no_repeat_ngram_size", -1), ("pad_token_id", -1)],
)
def test_options_verify_names_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"BeamOptions.{field}"):
        BeamOptions(**{field: value})  # type: ignore[arg-type]
