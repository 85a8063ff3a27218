"""Each logit filter on its own: one rule on a batch of next-token logits."""

from __future__ import annotations

import torch

from streamcap.models.decoding.filters import ForcedTokens, MinLength, NoRepeatNgram, TopP

INF = float("inf")


def test_forced_tokens_force_bos_first_and_eos_last() -> None:
    forced = ForcedTokens(bos=0, eos=2, last_step=4)
    assert [forced.token_at(s) for s in range(5)] == [0, None, None, None, 2]
    z = torch.randn(2, 6)
    forced.apply(z, torch.tensor([[2], [2]]))  # step 0
    assert z[:, 0].tolist() == [0.0, 0.0] and bool(torch.isinf(z[:, 1:]).all())
    free = torch.randn(2, 6)
    before = free.clone()
    forced.apply(free, torch.tensor([[2, 0, 7], [2, 0, 8]]))  # step 2: nothing forced
    assert torch.equal(free, before)


def test_min_length_bans_eos_until_enough_tokens() -> None:
    rule = MinLength(eos=2, min_tokens=3)
    short, long = torch.zeros(1, 5), torch.zeros(1, 5)
    rule.apply(short, torch.tensor([[2, 0, 7]]))  # 2 generated
    rule.apply(long, torch.tensor([[2, 0, 7, 9]]))  # 3 generated
    assert short[0].tolist() == [0.0, 0.0, -INF, 0.0, 0.0]
    assert not bool(torch.isinf(long).any())


def test_no_repeat_ngram_bans_only_completing_tokens() -> None:
    z = torch.zeros(2, 10)
    history = torch.tensor([[2, 0, 5, 6, 7, 5, 6], [2, 0, 5, 6, 7, 8, 9]])
    NoRepeatNgram(3).apply(z, history)
    assert torch.isinf(z[0]).nonzero().flatten().tolist() == [7]
    assert not torch.isinf(z[1]).any()
    off = torch.zeros(2, 10)
    NoRepeatNgram(0).apply(off, history)
    assert not torch.isinf(off).any()


def test_top_p_draws_only_from_the_nucleus_and_never_a_banned_token() -> None:
    z = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(2000, 1)
    z[:, 1] = -INF  # banned by an earlier filter: the nucleus is {0, 2}
    drawn = TopP(0.75).draw(z, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 2}
