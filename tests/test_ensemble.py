"""Output ensembles: averaged token log-probabilities; an ensemble of one is the model."""

from __future__ import annotations

import pytest
import torch

from streamcap.errors import ModelError
from streamcap.models.decoding.beam import BeamSearch
from streamcap.models.decoding.ensemble import CaptionEnsemble
from streamcap.models.decoding.inference import SharedCrossInference
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.decoding.sampling import NucleusSampler
from streamcap.models.enclap.model import EnclapModel
from streamcap.models.enclap.model import preset as enclap_preset


def _model(seed: int, vocab: int = 60) -> EnclapModel:
    torch.manual_seed(seed)
    config = enclap_preset("tiny", vocab_size=vocab, d_model=32, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_frames=32, seq_embed_dim=8, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0)
    model = EnclapModel(config).eval()
    with torch.no_grad():  # a peaked output distribution, so decoding is not all ties
        model.bart.final_logits_bias.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(seed))
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1024, (1, 4, 20), generator=g), torch.randn(1, 8, generator=g)


def test_greedy_ensemble_of_one_equals_the_model_greedy() -> None:
    model = _model(0)
    codes, seq = _inputs()
    ens = CaptionEnsemble([model])
    encodings = ens.encode(codes, [seq])
    beam = BeamSearch(DecodingOptions(mode="beam", num_beams=1, beam_max_length=12,
                                      no_repeat_ngram_size=3))
    [mine] = beam.decode(ens.inference(encodings), None)
    enc = encodings[0]
    [reference] = beam.decode(SharedCrossInference(model.bart, enc.hidden_states,
                                                   enc.attention_mask), None)
    assert mine.token_ids == reference.token_ids
    assert mine.decoder_score == pytest.approx(reference.decoder_score, abs=1e-5)


def test_ensemble_of_a_model_with_itself_is_the_model() -> None:
    model = _model(1)
    codes, seq = _inputs()
    one = CaptionEnsemble([model])
    two = CaptionEnsemble([model, model])
    beam = BeamSearch(DecodingOptions(mode="beam", num_beams=3, beam_max_length=12,
                                      no_repeat_ngram_size=3))
    [a] = beam.decode(one.inference(one.encode(codes, [seq])), None)
    [b] = beam.decode(two.inference(two.encode(codes, [seq, seq])), None)
    assert a.token_ids == b.token_ids
    assert a.decoder_score == pytest.approx(b.decoder_score, abs=1e-6)


def test_ensemble_log_probs_are_the_normalised_mean() -> None:
    m1, m2 = _model(2), _model(3)
    codes, seq = _inputs()
    ens = CaptionEnsemble([m1, m2])
    encodings = ens.encode(codes, [seq, seq])
    history = torch.tensor([[2, 0, 7]])
    got = ens.next_log_probs(encodings, history)
    parts = [CaptionEnsemble([m]).next_log_probs([e], history) for m, e in
             zip((m1, m2), encodings, strict=True)]
    mean = (parts[0] + parts[1]) / 2
    expected = mean - torch.logsumexp(mean, dim=-1, keepdim=True)
    assert torch.allclose(got, expected, atol=1e-6)
    assert float(got.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_sampling_ensemble_of_one_draws_what_the_sampler_draws() -> None:
    model = _model(4)
    codes, seq = _inputs()
    ens = CaptionEnsemble([model])
    encodings = ens.encode(codes, [seq])
    sampler = NucleusSampler(DecodingOptions(n_candidates=6, max_new_tokens=10, temperature=1.0,
                                             top_p=0.9, min_new_tokens=2,
                                             no_repeat_ngram_size=3))
    mine = sampler.decode(ens.inference(encodings), torch.Generator().manual_seed(5))
    enc = encodings[0]
    reference = sampler.decode(SharedCrossInference(model.bart, enc.hidden_states,
                                                    enc.attention_mask),
                               torch.Generator().manual_seed(5))
    assert [c.token_ids for c in mine] == [c.token_ids for c in reference]
    for a, b in zip(mine, reference, strict=True):
        assert a.decoder_score == pytest.approx(b.decoder_score, abs=1e-4)


def test_the_ensemble_decodes_differently_from_its_members() -> None:
    m1, m2 = _model(2), _model(3)
    codes, seq = _inputs()
    beam = BeamSearch(DecodingOptions(mode="beam", num_beams=2, beam_max_length=12))
    both = CaptionEnsemble([m1, m2])
    [joint] = beam.decode(both.inference(both.encode(codes, [seq, seq])), None)
    alone = [beam.decode(CaptionEnsemble([m]).inference(CaptionEnsemble([m]).encode(codes, [seq])),
                         None)[0] for m in (m1, m2)]
    assert joint.token_ids[0] == 0 and joint.token_ids[-1] == 2
    assert joint.decoder_score not in {a.decoder_score for a in alone}


def test_vocabularies_must_agree() -> None:
    with pytest.raises(ModelError, match="vocabularies differ"):
        CaptionEnsemble([_model(0, vocab=60), _model(0, vocab=61)])
    with pytest.raises(ModelError, match="no models"):
        CaptionEnsemble([])
