"""Logit filters: each one rule on the next-token logits of a batch of prefixes.

A filter's :meth:`apply` edits float (b, V) logits in place, given the decoder
inputs so far, int64 (b, s) with the decoder start first (so ``s - 1`` tokens have
been generated). The decoders compose them: beam search applies
:class:`NoRepeatNgram` then :class:`ForcedTokens`; the sampler asks
:class:`ForcedTokens` first (a forced step draws no random number), then applies
:class:`MinLength` and :class:`NoRepeatNgram` and draws from the :class:`TopP`
nucleus.
"""

from __future__ import annotations

from typing import Final, Protocol

import torch

_FAST_NUCLEUS_K: Final = 64
"""Size of the top-k slice tried before a full sort when looking for the nucleus."""


class LogitFilter(Protocol):
    """One rule on next-token logits."""

    def apply(self, logits: torch.Tensor, history: torch.Tensor) -> None:
        """Edit float (b, V) ``logits`` in place given int64 (b, s) ``history``."""


def generated(history: torch.Tensor) -> int:
    """How many tokens ``history`` holds after the decoder start: the next step's index."""
    return int(history.shape[1]) - 1


class ForcedTokens:
    """BOS as the first generated token, EOS as the token at ``last_step``."""

    def __init__(self, *, bos: int, eos: int, last_step: int) -> None:
        self.bos, self.eos, self.last_step = bos, eos, last_step

    def token_at(self, step: int) -> int | None:
        """The token forced at generation step ``step`` (0 = first), or None."""
        if step == 0:
            return self.bos
        if step == self.last_step:
            return self.eos
        return None

    def apply(self, logits: torch.Tensor, history: torch.Tensor) -> None:
        """On a forced step, every token but the forced one becomes -inf and it becomes 0."""
        token = self.token_at(generated(history))
        if token is not None:
            logits.fill_(float("-inf"))
            logits[:, token] = 0.0


class MinLength:
    """EOS is banned until ``min_tokens`` tokens (the forced BOS included) exist."""

    def __init__(self, *, eos: int, min_tokens: int) -> None:
        self.eos, self.min_tokens = eos, min_tokens

    def apply(self, logits: torch.Tensor, history: torch.Tensor) -> None:
        if generated(history) < self.min_tokens:
            logits[:, self.eos] = float("-inf")


class NoRepeatNgram:
    """A token that would repeat an n-gram of the prefix becomes -inf (n = 0: off)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def apply(self, logits: torch.Tensor, history: torch.Tensor) -> None:
        n = self.n
        if n <= 0 or history.shape[1] < n:
            return
        grams = history.unfold(1, n, 1)  # (b, s - n + 1, n)
        tail = history[:, history.shape[1] - n + 1:]  # (b, n - 1)
        match = (grams[:, :, : n - 1] == tail[:, None, :]).all(dim=-1)
        rows, cols = match.nonzero(as_tuple=True)
        if rows.numel():
            logits[rows, grams[rows, cols, n - 1]] = float("-inf")


class TopP:
    """The nucleus of ``softmax(z)``: the last filter, which also draws the token.

    The nucleus is the shortest prefix of the tokens sorted by probability whose
    mass reaches ``top_p`` (the token crossing it is kept). It is looked for in a
    top-64 slice first and in a full sort only for rows whose slice holds less than
    ``top_p``. Drawing inverts the nucleus CDF with one uniform per row instead of
    drawing over the whole vocabulary.
    """

    def __init__(self, top_p: float) -> None:
        self.top_p = top_p

    def draw(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """int64 (b,) tokens drawn from the nucleus of float32 (b, V) ``z`` (-inf = banned)."""
        return self.pick(z, torch.rand(z.shape[0], generator=generator, device=z.device))

    def pick(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """:meth:`draw` with the rows' uniforms given: float32 (b,) in [0, 1).

        Each row's token depends only on its own logits and uniform.
        """
        rows, vocab = z.shape
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        k = min(_FAST_NUCLEUS_K, vocab)
        vals, idx = z.topk(k, dim=-1)
        probs = torch.exp(vals - lse)
        cum = probs.cumsum(dim=-1)
        covered = cum[:, -1] >= self.top_p
        if k == vocab or bool(covered.all()):
            return self._invert_cdf(probs, cum, idx, u)
        tokens = torch.empty(rows, dtype=torch.long, device=z.device)
        slow = (~covered).nonzero(as_tuple=True)[0]
        s_vals, s_idx = z[slow].sort(dim=-1, descending=True)
        s_probs = torch.exp(s_vals - lse[slow])
        tokens[slow] = self._invert_cdf(s_probs, s_probs.cumsum(dim=-1), s_idx, u[slow])
        fast = covered.nonzero(as_tuple=True)[0]
        if fast.numel():
            tokens[fast] = self._invert_cdf(probs[fast], cum[fast], idx[fast], u[fast])
        return tokens

    def _invert_cdf(self, probs: torch.Tensor, cum: torch.Tensor, ids: torch.Tensor,
                    u: torch.Tensor) -> torch.Tensor:
        """Draw from the nucleus of sorted ``probs`` (b, k) given uniforms ``u`` (b,)."""
        kept = (cum - probs) < self.top_p  # a prefix: the mass before the token is short
        count = kept.sum(dim=-1).clamp(min=1)
        mass = cum.gather(1, (count - 1)[:, None])
        pos = torch.searchsorted(cum, u[:, None] * mass, right=True)
        pos = torch.minimum(pos, (count - 1)[:, None])
        return ids.gather(1, pos)[:, 0]
