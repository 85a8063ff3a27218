"""Tests of the shared-KV nucleus sampler, its scores, and candidate dedupe."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest
import torch
from transformers import BartForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from streamcap.errors import ConfigError
from streamcap.models.decoding.candidates import (
    DecodedCaption,
    attach_texts,
    dedupe,
    normalise_text,
)
from streamcap.models.decoding.filters import TopP
from streamcap.models.decoding.inference import SharedCrossInference, score_captions
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.decoding.sampling import NucleusSampler
from streamcap.models.decoding.task import DecodingTask

torch.set_num_threads(1)

from torch_helpers import tiny_bart_config

VOCAB, D_MODEL, EOS = 300, 32, 2


def sampling_options(**fields: Any) -> DecodingOptions:
    """Sampling options; no repeated 3-grams unless said otherwise."""
    return DecodingOptions(**{"no_repeat_ngram_size": 3, **fields})


def sample_candidates(bart: BartForConditionalGeneration, states: torch.Tensor,
                      mask: torch.Tensor | None, options: DecodingOptions,
                      generator: torch.Generator | None = None) -> list[DecodedCaption]:
    return NucleusSampler(options).decode(SharedCrossInference(bart, states, mask), generator)


def _tiny_bart(bias_std: float, eos_bias: float, seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = tiny_bart_config(VOCAB, D_MODEL)
    bart: BartForConditionalGeneration = BartForConditionalGeneration(cfg).train(False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        bias = bias_std * torch.randn(1, VOCAB, generator=g)
        bias[0, EOS] = eos_bias
        bart.final_logits_bias.copy_(bias)
    return bart


@pytest.fixture(scope="module")
def flat_bart() -> BartForConditionalGeneration:
    """Near-uniform next-token distributions: the nucleus is most of the vocabulary."""
    return _tiny_bart(bias_std=0.0, eos_bias=2.5)


@pytest.fixture(scope="module")
def peaked_bart() -> BartForConditionalGeneration:
    """Peaked distributions, like a trained model's: the top-64 slice holds the nucleus."""
    return _tiny_bart(bias_std=3.0, eos_bias=8.5, seed=5)


@pytest.fixture(scope="module")
def encoder_out() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    states = torch.randn(1, 12, D_MODEL, generator=g)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 9:] = 0  # padded tail
    return states, mask


def _teacher_forced(
    bart: BartForConditionalGeneration,
    states: torch.Tensor,
    mask: torch.Tensor,
    ids: tuple[int, ...],
) -> float:
    """Mean raw log-prob of ids, one plain bart(...) call with decoder inputs [2] + ids[:-1]."""
    inputs = torch.tensor([[2, *ids[:-1]]])
    with torch.no_grad():
        out = bart(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            decoder_input_ids=inputs,
        )
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)
    return float(logp[torch.arange(len(ids)), torch.tensor(ids)].mean())


def _plain_sampler(
    bart: BartForConditionalGeneration,
    states: torch.Tensor,
    mask: torch.Tensor,
    options: DecodingOptions,
    generator: torch.Generator,
) -> list[tuple[tuple[int, ...], float]]:
    """Reference: encoder output repeated N times, full recompute per step, no cache."""
    n = options.n_candidates
    sampler = NucleusSampler(options)
    history = torch.full((n, 1), 2, dtype=torch.long)
    rows = list(range(n))
    logps: list[list[float]] = [[] for _ in range(n)]
    seqs: list[list[int]] = [[] for _ in range(n)]
    for _ in range(options.max_new_tokens):
        k = len(rows)
        with torch.no_grad():
            out = bart(
                encoder_outputs=BaseModelOutput(last_hidden_state=states.repeat(k, 1, 1)),
                attention_mask=mask.repeat(k, 1),
                decoder_input_ids=history,
            )
        tokens, logp = sampler.choose(out.logits[:, -1], history, [generator], [k])
        for r, t, lp in zip(rows, tokens.tolist(), logp.tolist(), strict=True):
            seqs[r].append(t)
            logps[r].append(lp)
        live = [i for i, t in enumerate(tokens.tolist()) if t != EOS]
        if not live:
            break
        history = torch.cat([history, tokens[:, None]], dim=1)[live]
        rows = [rows[i] for i in live]
    return [(tuple(s), sum(lp) / len(lp)) for s, lp in zip(seqs, logps, strict=True)]


@pytest.mark.parametrize("model", ["flat_bart", "peaked_bart"])
def test_scores_equal_teacher_forcing(
    model: str, request: pytest.FixtureRequest, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    bart = request.getfixturevalue(model)
    states, mask = encoder_out
    opts = sampling_options(n_candidates=12, max_new_tokens=16, temperature=0.7, min_new_tokens=2)
    cands = sample_candidates(bart, states, mask, opts, torch.Generator().manual_seed(3))
    lengths = {len(c.token_ids) for c in cands}
    assert len(lengths) >= 3, f"want candidates of different lengths, got {lengths}"
    for c in cands:
        assert c.token_ids[0] == 0 and c.token_ids[-1] == EOS
        assert EOS not in c.token_ids[1:-1]
        assert c.decoder_score == pytest.approx(
            _teacher_forced(bart, states, mask, c.token_ids), abs=1e-4
        )
        assert c.log_likelihood == pytest.approx(c.decoder_score * len(c.token_ids), abs=1e-9)
    batched = score_captions(bart, states, mask, [c.token_ids for c in cands])
    assert batched == pytest.approx([c.decoder_score for c in cands], abs=1e-4)


def test_same_as_plain_unshared_sampler(
    flat_bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    opts = sampling_options(n_candidates=6, max_new_tokens=10, min_new_tokens=2)
    shared = sample_candidates(flat_bart, states, mask, opts, torch.Generator().manual_seed(11))
    plain = _plain_sampler(flat_bart, states, mask, opts, torch.Generator().manual_seed(11))
    assert [c.token_ids for c in shared] == [ids for ids, _ in plain]
    assert [c.decoder_score for c in shared] == pytest.approx([s for _, s in plain], abs=1e-5)


def test_seeded_generator_is_deterministic(
    peaked_bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    opts = sampling_options(n_candidates=8, max_new_tokens=12)
    a = sample_candidates(peaked_bart, states, mask, opts, torch.Generator().manual_seed(7))
    b = sample_candidates(peaked_bart, states, mask, opts, torch.Generator().manual_seed(7))
    c = sample_candidates(peaked_bart, states, mask, opts, torch.Generator().manual_seed(8))
    assert a == b
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    seeded = DecodingTask(sampling_options(n_candidates=8, max_new_tokens=12, seed=7),
                          _FakeTokenizer())
    decoded = seeded.decode(SharedCrossInference(peaked_bart, states, mask))
    assert [x.token_ids for x in decoded] == [x.token_ids for x in a]


def test_length_limits_and_forced_tokens(
    flat_bart: BartForConditionalGeneration, encoder_out: tuple[torch.Tensor, torch.Tensor]
) -> None:
    states, mask = encoder_out
    opts = sampling_options(n_candidates=16, max_new_tokens=9, min_new_tokens=4)
    cands = sample_candidates(flat_bart, states, mask, opts, torch.Generator().manual_seed(1))
    assert all(5 <= len(c.token_ids) <= 9 for c in cands)
    assert all(c.token_ids[0] == 0 and c.token_ids[-1] == EOS for c in cands)
    assert all(c.ended_by_model == (len(c.token_ids) < 9) for c in cands)
    assert any(len(c.token_ids) == 5 for c in cands)  # EOS is likely: the bound binds


def _has_repeat(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram(encoder_out: tuple[torch.Tensor, torch.Tensor]) -> None:
    bart = _tiny_bart(bias_std=0.0, eos_bias=-20.0)
    with torch.no_grad():  # two tokens hold the nucleus: 18 trigrams over 2 symbols must repeat
        bart.final_logits_bias[0, 10:12] += 10.0
    states, mask = encoder_out
    free_opts = sampling_options(
        n_candidates=6, max_new_tokens=20, temperature=1.0, no_repeat_ngram_size=0
    )
    blocked_opts = replace(free_opts, no_repeat_ngram_size=3)
    free = sample_candidates(bart, states, mask, free_opts, torch.Generator().manual_seed(0))
    blocked = sample_candidates(bart, states, mask, blocked_opts, torch.Generator().manual_seed(0))
    assert all(_has_repeat([2, *c.token_ids], 3) for c in free)
    assert not any(_has_repeat([2, *c.token_ids], 3) for c in blocked)


@pytest.mark.parametrize("vocab", [4, 200])
def test_top_p_samples_only_from_nucleus(vocab: int) -> None:
    if vocab == 4:
        probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
        top_p, nucleus = 0.75, {0, 1}
    else:  # slowly decaying: the top-64 slice is short of top_p, the full sort runs
        probs = torch.softmax(-torch.arange(vocab, dtype=torch.float32) / 100.0, dim=0)
        top_p = 0.9
        before = torch.cumsum(probs, 0) - probs
        nucleus = set((before < top_p).nonzero().flatten().tolist())
        assert 64 < len(nucleus) < vocab
    z = torch.log(probs).repeat(4000, 1)
    drawn = TopP(top_p).draw(z, torch.Generator().manual_seed(0))
    seen = set(drawn.tolist())
    assert seen <= nucleus
    if vocab == 4:
        share = float((drawn == 0).float().mean())
        assert share == pytest.approx(0.5 / 0.8, abs=0.03)
    else:
        assert max(seen) > 64  # the slow path reached beyond the slice


def test_bf16_model_runs(encoder_out: tuple[torch.Tensor, torch.Tensor]) -> None:
    bart = _tiny_bart(bias_std=3.0, eos_bias=8.5).bfloat16()
    states, mask = encoder_out
    opts = sampling_options(n_candidates=4, max_new_tokens=8)
    cands = sample_candidates(bart, states, mask, opts, torch.Generator().manual_seed(0))
    assert len(cands) == 4
    assert all(c.decoder_score < 0.0 and c.token_ids[-1] == EOS for c in cands)


def test_bad_inputs(flat_bart: BartForConditionalGeneration) -> None:
    opts = sampling_options(n_candidates=2, max_new_tokens=4, min_new_tokens=0)
    with pytest.raises(ValueError, match=r"\(1, L, d_model\).*decode_batch"):
        sample_candidates(flat_bart, torch.zeros(2, 5, D_MODEL), None, opts)
    with pytest.raises(ValueError, match=r"\(W, L, d_model\)"):
        sample_candidates(flat_bart, torch.zeros(5, D_MODEL), None, opts)
    with pytest.raises(ValueError, match="d_model is 32"):
        sample_candidates(flat_bart, torch.zeros(1, 5, 16), None, opts)
    with pytest.raises(ValueError, match="masks out every"):
        sample_candidates(
            flat_bart, torch.zeros(1, 5, D_MODEL), torch.zeros(1, 5, dtype=torch.long), opts
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_candidates", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("temperature", 0.0),
        ("max_new_tokens", 1),
        ("min_new_tokens", -1),
        ("no_repeat_ngram_size", -1),
        ("mode", "greedy"),
    ],
)
def test_options_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"decoding.{field}: must be"):
        DecodingOptions(**{field: value})  # type: ignore[arg-type]


def test_min_new_tokens_is_capped_below_the_maximum() -> None:
    assert DecodingOptions(max_new_tokens=4).min_tokens == 3
    assert DecodingOptions(max_new_tokens=30).min_tokens == 4
    assert DecodingOptions(max_new_tokens=30, min_new_tokens=9).min_tokens == 9


def _cand(text: str, score: float) -> DecodedCaption:
    return DecodedCaption(
        token_ids=(0, 2),
        decoder_score=score,
        log_likelihood=2 * score,
        ended_by_model=True,
        text=text,
    )


def test_normalise_text() -> None:
    assert (
        normalise_text("  A dog, barking!  In the   distance… ") == "a dog barking in the distance"
    )
    assert normalise_text("It's RAINING.") == "its raining"


def test_dedupe_keeps_best_scoring_instance_in_first_seen_order() -> None:
    cands = [
        _cand("A dog barks.", -2.0),
        _cand("rain falls", -1.5),
        _cand("a dog barks", -1.0),
        _cand("A DOG  barks!", -3.0),
        _cand("...", -0.1),
        _cand("Rain falls.", -1.5),
    ]
    out = dedupe(cands)
    assert [c.text for c in out] == ["a dog barks", "rain falls"]
    assert [c.decoder_score for c in out] == [-1.0, -1.5]


class _FakeTokenizer:
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = False) -> str:
        kept = [t for t in token_ids if not (skip_special_tokens and t in (0, 1, 2))]
        return " " + " ".join(f"w{t}" for t in kept) + " "


def test_attach_texts() -> None:
    c = DecodedCaption(
        token_ids=(0, 7, 9, 2), decoder_score=-1.0, log_likelihood=-4.0, ended_by_model=True
    )
    (out,) = attach_texts([c], _FakeTokenizer())
    assert out.text == "w7 w9" and out.token_ids == c.token_ids


def _windows_of(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs of len(lengths) windows, padded to the longest, and their mask."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    states = torch.randn(len(lengths), longest, D_MODEL, generator=g)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return states, mask


@pytest.mark.parametrize("model", ["flat_bart", "peaked_bart"])
def test_a_batch_of_windows_samples_each_as_alone(
    model: str, request: pytest.FixtureRequest
) -> None:
    bart = request.getfixturevalue(model)
    states, mask = _windows_of([7, 12, 4, 12])
    opts = sampling_options(n_candidates=6, max_new_tokens=14, temperature=0.8)
    sampler = NucleusSampler(opts)
    alone = [sampler.decode(SharedCrossInference(bart, states[i:i + 1, :n], None),
                            torch.Generator().manual_seed(100 + i))
             for i, n in enumerate([7, 12, 4, 12])]
    batch = sampler.decode_batch(SharedCrossInference(bart, states, mask),
                                 [torch.Generator().manual_seed(100 + i) for i in range(4)])
    assert [[c.token_ids for c in w] for w in batch] == [[c.token_ids for c in w] for w in alone]
    for got, want in zip(batch, alone, strict=True):
        assert [c.decoder_score for c in got] == pytest.approx(
            [c.decoder_score for c in want], abs=1e-5)
        assert [c.ended_by_model for c in got] == [c.ended_by_model for c in want]
    lengths = {len(c.token_ids) for w in batch for c in w}
    assert len(lengths) > 1  # rows left the batch at different steps


def test_window_streams_are_stable_and_distinct() -> None:
    task = DecodingTask(sampling_options(seed=7), _FakeTokenizer())
    draws = {key: torch.rand(4, generator=task.stream_for(*key)).tolist()
             for key in [("a", 0), ("a", 1), ("b", 0)]}
    assert draws[("a", 0)] == torch.rand(4, generator=task.stream_for("a", 0)).tolist()
    assert len({tuple(v) for v in draws.values()}) == 3
    other_seed = DecodingTask(sampling_options(seed=8), _FakeTokenizer())
    assert torch.rand(4, generator=other_seed.stream_for("a", 0)).tolist() != draws[("a", 0)]
    unseeded = DecodingTask(sampling_options(), _FakeTokenizer())
    assert (torch.rand(4, generator=unseeded.stream_for("a", 0)).tolist()
            != torch.rand(4, generator=unseeded.stream_for("a", 0)).tolist())


def test_a_batch_needs_one_stream_per_window_and_rows_in_window_order(
    flat_bart: BartForConditionalGeneration
) -> None:
    states, mask = _windows_of([5, 9])
    sampler = NucleusSampler(sampling_options(n_candidates=2, max_new_tokens=4))
    with pytest.raises(ValueError, match="1 random streams for 2 windows"):
        sampler.decode_batch(SharedCrossInference(flat_bart, states, mask), [None])
    inference = SharedCrossInference(flat_bart, states, mask)
    inference.start(4)
    with pytest.raises(ValueError, match="grouped by window"):
        inference.keep(torch.tensor([1, 0]))


def test_window_seeds_do_not_depend_on_the_process() -> None:
    import subprocess
    import sys

    from streamcap.models.decoding.task import window_seed

    code = ("from streamcap.models.decoding.task import window_seed; "
            "print(window_seed(7, 'kitchen', 12))")
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONHASHSEED": salt}).stdout.strip()
             for salt in ("1", "2")}
    assert seeds == {str(window_seed(7, "kitchen", 12))}
    assert 0 <= window_seed(7, "kitchen", 12) < 2**63
    assert window_seed(7, "kitchen", 12) != window_seed(7, "kitchen", 13)
