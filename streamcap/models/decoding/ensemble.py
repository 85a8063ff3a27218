"""Output ensembles: several captioners decode together by averaging token log-probabilities.

At every decoding step each model scores the next token given the shared
prefix (teacher-forced over its own encoder output); the ensemble's
distribution is the mean of the models' ``log_softmax`` vectors,
renormalised (a normalised geometric mean of the models' distributions).
Greedy/beam search and nucleus sampling run on that distribution with the
same rules as :mod:`streamcap.models.decoding.beam` and :mod:`streamcap.models.decoding.sampling`
(forced BOS first, forced EOS at the length limit, no repeated n-grams). An
ensemble of one model decodes exactly like that model.

Decoding re-runs each decoder over the whole prefix at every step (no key/value
cache): simple and exact, meant for evaluation, where captions are short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamcap.errors import ModelError
from streamcap.models.decoding.beam import BeamOptions
from streamcap.models.decoding.sampling import (
    CandidateRecorder,
    SampledCaption,
    SamplingOptions,
    choose_next_tokens,
)
from streamcap.models.enclap.model import EnclapEncoding, EnclapModel


@dataclass(frozen=True, slots=True, kw_only=True)
class EnsembleCaption:
    """A decoded caption.

    Attributes:
        token_ids: generated ids after the decoder start (BOS ... EOS).
        decoder_score: mean ensemble log-probability of those tokens.
        search_score: beam score (forced tokens count 0, divided by
            length ** length_penalty).
    """

    token_ids: tuple[int, ...]
    decoder_score: float
    search_score: float


class CaptionEnsemble:
    """Captioners that share a vocabulary, decoding as one.

    Args:
        models: one or more EnCLAP models with the same ``vocab_size``.
    """

    def __init__(self, models: Sequence[EnclapModel]) -> None:
        if not models:
            raise ModelError("ensemble: no models")
        sizes = {int(m.bart.final_logits_bias.shape[-1]) for m in models}
        if len(sizes) != 1:
            raise ModelError(f"ensemble: the models' vocabularies differ in size {sorted(sizes)}")
        self.models = list(models)

    @torch.inference_mode()
    def encode(self, codes: torch.Tensor, seq_embeds: Sequence[torch.Tensor],
               frame_mask: torch.Tensor | None = None) -> list[EnclapEncoding]:
        """Each model's encoding of one clip.

        Args:
            codes: integer (1, K, T).
            seq_embeds: float (1, D_m) per model (models may read different embeddings).
            frame_mask: optional (1, T).
        """
        if len(seq_embeds) != len(self.models):
            raise ModelError(f"ensemble: {len(seq_embeds)} clip embeddings for "
                             f"{len(self.models)} models")
        return [m.encode(codes, s, frame_mask) for m, s in zip(self.models, seq_embeds,
                                                               strict=True)]

    @torch.inference_mode()
    def next_log_probs(self, encodings: Sequence[EnclapEncoding],
                       history: torch.Tensor) -> torch.Tensor:
        """float32 (b, V) mean over models of ``log_softmax`` of the next-token logits.

        Args:
            encodings: each model's batch-1 encoding.
            history: int64 (b, s) decoder inputs so far (decoder start first).
        """
        b = history.shape[0]
        total: torch.Tensor | None = None
        for model, enc in zip(self.models, encodings, strict=True):
            expanded = EnclapEncoding(hidden_states=enc.hidden_states.expand(b, -1, -1),
                                      attention_mask=enc.attention_mask.expand(b, -1))
            logits = model.decode(history, expanded).logits
            if logits is None:
                raise ModelError("ensemble: a decoder returned no logits")
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            total = logp if total is None else total + logp
        assert total is not None  # at least one model (checked in __init__)
        mean = total / len(self.models)
        return mean - torch.logsumexp(mean, dim=-1, keepdim=True)

    @torch.inference_mode()
    def beam_search(self, encodings: Sequence[EnclapEncoding],
                    options: BeamOptions) -> EnsembleCaption:
        """Beam search (``num_beams == 1`` is greedy) on the ensemble distribution."""
        device = encodings[0].hidden_states.device
        start = options.decoder_start_token_id
        beams: list[tuple[list[int], float, float]] = [([start], 0.0, 0.0)]  # ids, search, raw
        finished: list[tuple[float, list[int], float]] = []
        max_new = options.max_length - 1
        k = options.num_beams
        for step in range(max_new):
            history = torch.tensor([ids for ids, _, _ in beams], dtype=torch.long, device=device)
            raw = self.next_log_probs(encodings, history)
            z = raw.clone()
            if step == 0:
                z = _forced(z, options.bos_token_id)
            elif step == max_new - 1:
                z = _forced(z, options.eos_token_id)
            _block_ngrams(z, history, options.no_repeat_ngram_size)
            scores = z + torch.tensor([s for _, s, _ in beams], device=device)[:, None]
            flat = scores.view(-1)
            top = torch.topk(flat, min(2 * k, flat.numel()))
            vocab = z.shape[1]
            new_beams: list[tuple[list[int], float, float]] = []
            for value, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if value == float("-inf"):
                    break
                row, token = divmod(index, vocab)
                ids, _, raw_sum = beams[row]
                new_raw = raw_sum + float(raw[row, token])
                if token == options.eos_token_id:
                    length = len(ids)  # generated tokens incl. this EOS (start excluded)
                    finished.append((value / length ** options.length_penalty, ids + [token],
                                     new_raw))
                else:
                    new_beams.append((ids + [token], value, new_raw))
                if len(new_beams) == k:
                    break
            beams = new_beams
            finished.sort(key=lambda f: -f[0])
            finished = finished[:k]
            if not beams or (len(finished) >= k and (options.early_stopping or k == 1)):
                break
        if not finished:
            best_ids, best_search, best_raw = max(beams, key=lambda b: b[1])
            finished = [(best_search, best_ids, best_raw)]
        score, ids, raw_sum = finished[0]
        generated = tuple(ids[1:])
        return EnsembleCaption(token_ids=generated, decoder_score=raw_sum / len(generated),
                               search_score=score)

    @torch.inference_mode()
    def sample(self, encodings: Sequence[EnclapEncoding], options: SamplingOptions,
               generator: torch.Generator | None = None) -> list[SampledCaption]:
        """Nucleus samples drawn from the ensemble distribution.

        The random stream is used exactly as :func:`streamcap.models.decoding.sampling.sample_candidates`
        uses it, so an ensemble of one model draws the same candidates from the same seed
        (up to float differences between the two decoder implementations).
        """
        device = encodings[0].hidden_states.device
        if generator is None and options.seed is not None:
            generator = torch.Generator(device=device).manual_seed(options.seed)
        n = options.n_candidates
        history = torch.full((n, 1), options.decoder_start_token_id, dtype=torch.long,
                             device=device)
        recorder = CandidateRecorder(n, options)
        for position in range(options.max_new_tokens):
            logits = self.next_log_probs(encodings, history)
            tokens, logp = choose_next_tokens(logits, history, options, generator)
            rows_before = len(recorder.rows)
            live = recorder.record(tokens, logp, position)
            if live is None:
                break
            if live.numel() < rows_before:
                history, tokens = history[live], tokens[live]
            history = torch.cat([history, tokens[:, None]], dim=1)
        return recorder.results()


def _forced(z: torch.Tensor, token: int) -> torch.Tensor:
    out = torch.full_like(z, float("-inf"))
    out[:, token] = 0.0
    return out


def _block_ngrams(z: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """-inf, in place, on tokens that would repeat an n-gram of ``history`` (b, s)."""
    if n <= 0 or history.shape[1] < n:
        return
    grams = history.unfold(1, n, 1)
    tail = history[:, history.shape[1] - n + 1:]
    match = (grams[:, :, : n - 1] == tail[:, None, :]).all(dim=-1)
    rows, cols = match.nonzero(as_tuple=True)
    if rows.numel():
        z[rows, grams[rows, cols, n - 1]] = float("-inf")
