"""Beam search (EnCLAP's original decoding), over any :class:`Inference`.

The search follows the HF ``generate`` beam search EnCLAP used: at each step the
``2 * num_beams`` best continuations of all beams are looked at; a continuation
ending in EOS among the first ``num_beams`` of them is a finished hypothesis
(scored by its processed log-probability sum divided by its length, EOS included,
to the power ``LENGTH_PENALTY``), the best ``num_beams`` others run on; the search
stops once ``num_beams`` hypotheses are finished (early stopping) or at the length
limit. ``num_beams == 1`` is greedy decoding. The forced BOS and EOS add 0 to the
search score; the decoder score is the mean raw log-probability, as for samples.
"""

from __future__ import annotations

from typing import Final

import torch

from streamcap.models.decoding.candidates import DecodedCaption
from streamcap.models.decoding.filters import ForcedTokens, LogitFilter, NoRepeatNgram
from streamcap.models.decoding.inference import Inference, require_one_window
from streamcap.models.decoding.options import ENCLAP_TOKENS, DecodingOptions, SpecialTokens

LENGTH_PENALTY: Final = 1.0
EARLY_STOPPING: Final = True


class BeamSearch:
    """One caption: the best of ``num_beams`` beams, at most ``beam_max_length`` long."""

    stage = "beam"
    reranks = False  # one caption: its score is the decoder's

    def __init__(self, options: DecodingOptions, tokens: SpecialTokens = ENCLAP_TOKENS) -> None:
        self.options, self.tokens = options, tokens
        self.max_new = options.beam_max_length - 1  # HF max_length counts the decoder start
        self.filters: tuple[LogitFilter, ...] = (
            NoRepeatNgram(options.no_repeat_ngram_size),
            ForcedTokens(bos=tokens.bos, eos=tokens.eos, last_step=self.max_new - 1))

    @torch.inference_mode()
    def decode(self, inference: Inference, generator: torch.Generator | None
               ) -> list[DecodedCaption]:
        """The best finished beam (the random stream is not used), of one input."""
        require_one_window(inference, "BeamSearch.decode")
        k, eos, device = self.options.num_beams, self.tokens.eos, inference.device
        inference.start(self.max_new)
        beams: list[tuple[list[int], float, float]] = [([self.tokens.decoder_start], 0.0, 0.0)]
        finished: list[tuple[float, list[int], float]] = []  # search score, ids, raw sum
        history = torch.tensor([beams[0][0]], dtype=torch.long, device=device)
        for step in range(self.max_new):
            raw = torch.log_softmax(inference.logits(history).float(), dim=-1)
            z = raw.clone()
            for rule in self.filters:
                rule.apply(z, history)
            scores = z + torch.tensor([s for _, s, _ in beams], device=device)[:, None]
            top = torch.topk(scores.view(-1), min(2 * k, scores.numel()))
            vocab = z.shape[1]
            running: list[tuple[list[int], float, float]] = []
            parents: list[int] = []
            for rank, (value, index) in enumerate(zip(top.values.tolist(), top.indices.tolist(),
                                                      strict=True)):
                if value == float("-inf"):
                    break
                row, token = divmod(index, vocab)
                ids, _, raw_sum = beams[row]
                new_raw = raw_sum + float(raw[row, token])
                if token == eos:
                    if rank < k:  # only the top num_beams may finish
                        finished.append((value / len(ids) ** LENGTH_PENALTY, [*ids, token],
                                         new_raw))
                elif len(running) < k:
                    running.append(([*ids, token], value, new_raw))
                    parents.append(row)
            finished = sorted(finished, key=lambda f: -f[0])[:k]
            if not running or (len(finished) >= k and (EARLY_STOPPING or k == 1)):
                break
            beams = running
            inference.keep(torch.tensor(parents, dtype=torch.long, device=device))
            history = torch.tensor([ids for ids, _, _ in beams], dtype=torch.long, device=device)
        if not finished:
            best_ids, best_search, best_raw = max(beams, key=lambda b: b[1])
            finished = [(best_search, best_ids, best_raw)]
        score, ids, raw_sum = finished[0]
        generated = tuple(ids[1:])
        return [DecodedCaption(token_ids=generated, decoder_score=raw_sum / len(generated),
                               log_likelihood=raw_sum,
                               ended_by_model=len(generated) < self.max_new,
                               search_score=score if k > 1 else None)]
