"""Nucleus sampling of N caption candidates in one batched pass.

Token bookkeeping follows the EnCLAP/BART convention: the decoder starts from
the decoder start token (2), the first generated token is forced to BOS (0),
and EOS (2) is forced at ``max_new_tokens``. A candidate's ``token_ids`` are
the generated tokens *after* the decoder start, BOS and EOS included:
``(0, w1, ..., wk, 2)``.

The first two steps (the decoder start in, the forced BOS in) are the same for
every candidate, so they run at batch 1 and the rows split at the first sampled
token. Rows stop at EOS and leave the batch, so later steps cost less.

Decoder score: the mean, over every generated token (forced BOS and the final
EOS included), of ``log_softmax(raw logits)`` at that token, computed while
sampling. This equals the length-normalised log-likelihood of teacher forcing
``[start] + token_ids``, which is how the reference reranker scores candidates.
Temperature, top-p, min-length, no-repeat-n-gram and the forced tokens shape
the *choice* of tokens only, never the score.
"""

from __future__ import annotations

import torch

from streamcap.models.decoding.candidates import DecodedCaption
from streamcap.models.decoding.filters import ForcedTokens, MinLength, NoRepeatNgram, TopP
from streamcap.models.decoding.inference import Inference
from streamcap.models.decoding.options import ENCLAP_TOKENS, DecodingOptions, SpecialTokens


class _Recorder:
    """The tokens and log-likelihood of each candidate while finished rows leave the batch.

    Row ``i`` of the live batch belongs to candidate ``rows[i]``.
    """

    def __init__(self, n: int, eos: int, last_step: int, first_token: int,
                 first_logp: float) -> None:
        self.eos, self.last_step = eos, last_step
        self.tokens = [[first_token] for _ in range(n)]
        self.log_lik = [first_logp] * n
        self.by_model = [False] * n
        self.rows = list(range(n))

    def record(self, tokens: torch.Tensor, logp: torch.Tensor, step: int) -> torch.Tensor | None:
        """Append one step; return the indices of the rows still live, None when none is."""
        ended = tokens == self.eos
        for c, t, lp, end in zip(self.rows, tokens.tolist(), logp.tolist(), ended.tolist(),
                                 strict=True):
            self.tokens[c].append(t)
            self.log_lik[c] += lp
            self.by_model[c] = end and step < self.last_step
        live = (~ended).nonzero(as_tuple=True)[0]
        if live.numel() == 0:
            return None
        if live.numel() < len(self.rows):
            self.rows = [self.rows[i] for i in live.tolist()]
        return live

    def results(self) -> list[DecodedCaption]:
        return [DecodedCaption(token_ids=tuple(ids), decoder_score=self.log_lik[c] / len(ids),
                               log_likelihood=self.log_lik[c], ended_by_model=self.by_model[c])
                for c, ids in enumerate(self.tokens)]


class NucleusSampler:
    """``n_candidates`` nucleus samples, each with its untempered mean log-probability."""

    stage = "sampling"
    reranks = True  # its candidates are reranked by the retriever and the fluency filter

    def __init__(self, options: DecodingOptions, tokens: SpecialTokens = ENCLAP_TOKENS) -> None:
        self.options, self.tokens = options, tokens
        self.forced = ForcedTokens(bos=tokens.bos, eos=tokens.eos,
                                   last_step=options.max_new_tokens - 1)
        self.filters = (MinLength(eos=tokens.eos, min_tokens=options.min_tokens),
                        NoRepeatNgram(options.no_repeat_ngram_size))
        self.nucleus = TopP(options.top_p)

    def choose(self, logits: torch.Tensor, history: torch.Tensor,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next token and its raw log-probability, int64 (b,) and float32 (b,).

        One uniform per row is drawn, and only on steps whose token is not forced.
        """
        raw = logits.float()
        forced = self.forced.token_at(history.shape[1] - 1)
        if forced is not None:
            tokens = torch.full((raw.shape[0],), forced, dtype=torch.long, device=raw.device)
        else:
            z = raw / self.options.temperature
            for rule in self.filters:
                rule.apply(z, history)
            tokens = self.nucleus.draw(z, generator)
        chosen = raw.gather(1, tokens[:, None])[:, 0]
        return tokens, chosen - torch.logsumexp(raw, dim=-1)

    @torch.inference_mode()
    def decode(self, inference: Inference, generator: torch.Generator | None
               ) -> list[DecodedCaption]:
        """One candidate per row, in row order (``text`` empty)."""
        n, steps = self.options.n_candidates, self.options.max_new_tokens
        inference.start(steps)
        history = torch.full((1, 1), self.tokens.decoder_start, dtype=torch.long,
                             device=inference.device)
        bos, bos_logp = self.choose(inference.logits(history), history, generator)
        history = torch.cat([history, bos[:, None]], dim=1)
        recorder = _Recorder(n, self.tokens.eos, steps - 1, int(bos[0]), float(bos_logp[0]))
        for step in range(1, steps):
            logits = inference.logits(history)
            if step == 1:
                logits, history = logits.expand(n, -1), history.expand(n, -1)
                inference.keep(torch.zeros(n, dtype=torch.long, device=history.device))
            tokens, logp = self.choose(logits, history, generator)
            rows_before = len(recorder.rows)
            live = recorder.record(tokens, logp, step)
            if live is None:
                break
            if live.numel() < rows_before:
                history, tokens = history[live], tokens[live]
                inference.keep(live)
            history = torch.cat([history, tokens[:, None]], dim=1)
        return recorder.results()
