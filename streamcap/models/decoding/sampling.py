"""Nucleus sampling of N caption candidates per window in one batched pass.

Token bookkeeping follows the EnCLAP/BART convention: the decoder starts from
the decoder start token (2), the first generated token is forced to BOS (0),
and EOS (2) is forced at ``max_new_tokens``. A candidate's ``token_ids`` are
the generated tokens *after* the decoder start, BOS and EOS included:
``(0, w1, ..., wk, 2)``.

The first two steps (the decoder start in, the forced BOS in) are the same for
every candidate of a window, so they run at one row per window and the rows split
at the first sampled token. Rows stop at EOS and leave the batch, so later steps
cost less.

Several windows (a :class:`~streamcap.models.decoding.inference.BatchInference`)
are sampled in the same pass: ``W x n_candidates`` rows, grouped by window, each
window's rows attending only to its own encoder output. Each window has its own
random stream (a ``torch.Generator``): at every step that is not forced, a window
draws one uniform per live row of its own from its own stream, exactly as when it
is sampled alone, so a window's candidates do not depend on which other windows
share the pass (up to float rounding of the logits).

Decoder score: the mean, over every generated token (forced BOS and the final
EOS included), of ``log_softmax(raw logits)`` at that token, computed while
sampling. This equals the length-normalised log-likelihood of teacher forcing
``[start] + token_ids``, which is how the reference reranker scores candidates.
Temperature, top-p, min-length, no-repeat-n-gram and the forced tokens shape
the *choice* of tokens only, never the score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamcap.models.decoding.candidates import DecodedCaption
from streamcap.models.decoding.filters import ForcedTokens, MinLength, NoRepeatNgram, TopP
from streamcap.models.decoding.inference import BatchInference, Inference, require_one_window
from streamcap.models.decoding.options import ENCLAP_TOKENS, DecodingOptions, SpecialTokens


class _Recorder:
    """The tokens and log-likelihood of each candidate while finished rows leave the batch.

    Candidate ``c`` belongs to window ``c // n``; row ``i`` of the live batch belongs to
    candidate ``rows[i]`` (rows stay in candidate order, so grouped by window).
    """

    def __init__(self, n: int, eos: int, last_step: int, first_tokens: Sequence[int],
                 first_logps: Sequence[float]) -> None:
        self.n, self.eos, self.last_step = n, eos, last_step
        self.tokens = [[t] for t in first_tokens for _ in range(n)]
        self.log_lik = [lp for lp in first_logps for _ in range(n)]
        self.by_model = [False] * len(self.tokens)
        self.rows = list(range(len(self.tokens)))

    def per_window(self, windows: int) -> list[int]:
        """How many live rows each window has, in window order."""
        counts = [0] * windows
        for c in self.rows:
            counts[c // self.n] += 1
        return counts

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

    def results(self) -> list[list[DecodedCaption]]:
        """Each window's candidates, in row order."""
        out: list[list[DecodedCaption]] = []
        for c, ids in enumerate(self.tokens):
            if c % self.n == 0:
                out.append([])
            out[-1].append(DecodedCaption(token_ids=tuple(ids),
                                          decoder_score=self.log_lik[c] / len(ids),
                                          log_likelihood=self.log_lik[c],
                                          ended_by_model=self.by_model[c]))
        return out


Streams = Sequence[torch.Generator | None]
"""One random stream per window (None: torch's global stream)."""


class NucleusSampler:
    """``n_candidates`` nucleus samples per window, each with its untempered mean log-probability."""

    stage = "sampling"
    reranks = True  # its candidates are reranked by the retriever and the fluency filter

    def __init__(self, options: DecodingOptions, tokens: SpecialTokens = ENCLAP_TOKENS) -> None:
        self.options, self.tokens = options, tokens
        self.forced = ForcedTokens(bos=tokens.bos, eos=tokens.eos,
                                   last_step=options.max_new_tokens - 1)
        self.filters = (MinLength(eos=tokens.eos, min_tokens=options.min_tokens),
                        NoRepeatNgram(options.no_repeat_ngram_size))
        self.nucleus = TopP(options.top_p)

    def choose(self, logits: torch.Tensor, history: torch.Tensor, streams: Streams,
               counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next token and its raw log-probability, int64 (b,) and float32 (b,).

        Rows are grouped by window, ``counts[w]`` rows for window ``w``. On a step whose
        token is not forced, window ``w`` draws ``counts[w]`` uniforms from ``streams[w]``
        (none when it has no row); forced steps draw nothing.
        """
        raw = logits.float()
        forced = self.forced.token_at(history.shape[1] - 1)
        if forced is not None:
            tokens = torch.full((raw.shape[0],), forced, dtype=torch.long, device=raw.device)
        else:
            z = raw / self.options.temperature
            for rule in self.filters:
                rule.apply(z, history)
            u = torch.cat([torch.rand(c, generator=g, device=raw.device)
                           for g, c in zip(streams, counts, strict=True) if c])
            tokens = self.nucleus.pick(z, u)
        chosen = raw.gather(1, tokens[:, None])[:, 0]
        return tokens, chosen - torch.logsumexp(raw, dim=-1)

    def decode(self, inference: Inference, generator: torch.Generator | None
               ) -> list[DecodedCaption]:
        """One candidate per row, in row order (``text`` empty), of one input."""
        require_one_window(inference, "NucleusSampler.decode")
        return self._decode(inference, [generator])[0]

    def decode_batch(self, inference: BatchInference, streams: Streams
                     ) -> list[list[DecodedCaption]]:
        """Each window's candidates (as :meth:`decode` of it alone), window ``w`` from ``streams[w]``."""
        if len(streams) != inference.windows:
            raise ValueError(f"decode_batch: {len(streams)} random streams for "
                             f"{inference.windows} windows")
        return self._decode(inference, streams)

    @torch.inference_mode()
    def _decode(self, inference: Inference, streams: Streams) -> list[list[DecodedCaption]]:
        w, n, steps = len(streams), self.options.n_candidates, self.options.max_new_tokens
        inference.start(steps)
        history = torch.full((w, 1), self.tokens.decoder_start, dtype=torch.long,
                             device=inference.device)
        bos, bos_logp = self.choose(inference.logits(history), history, streams, [1] * w)
        history = torch.cat([history, bos[:, None]], dim=1)
        recorder = _Recorder(n, self.tokens.eos, steps - 1, bos.tolist(), bos_logp.tolist())
        for step in range(1, steps):
            logits = inference.logits(history)
            if step == 1:  # each window's row becomes its n candidates' rows
                split = torch.arange(w, device=history.device).repeat_interleave(n)
                logits, history = logits[split], history[split]
                inference.keep(split)
            tokens, logp = self.choose(logits, history, streams, recorder.per_window(w))
            rows_before = len(recorder.rows)
            live = recorder.record(tokens, logp, step)
            if live is None:
                break
            if live.numel() < rows_before:
                history, tokens = history[live], tokens[live]
                inference.keep(live)
            history = torch.cat([history, tokens[:, None]], dim=1)
        return recorder.results()
