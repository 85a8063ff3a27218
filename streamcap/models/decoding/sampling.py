"""Nucleus sampling of N caption candidates from one shared encoder output.

The captioner's encoder runs once per window (batch 1). This module then
samples ``n_candidates`` captions in one batched pass of the BART decoder:

- the cross-attention keys and values are projected once, at batch 1, and
  every candidate attends to them: the N single-token queries of a step are
  folded into one batch-1 attention call (N query positions), so neither
  the encoder output nor its keys/values are ever copied N times;
- self-attention keys/values live in a preallocated per-layer cache;
- rows stop at EOS and are dropped from the batch, so later steps cost less;
- the decoder score of each candidate is computed during sampling from the
  raw (untempered, unconstrained) logits, so no second teacher-forced pass
  is needed.

Token bookkeeping follows the EnCLAP/BART convention: the decoder starts
from ``decoder_start_token_id`` (2), the first generated token is forced to
BOS (0), and EOS (2) is forced at ``max_new_tokens``. A candidate's
``token_ids`` are the generated tokens *after* the decoder start, BOS and EOS
included: ``(0, w1, ..., wk, 2)``.

Decoder score: the mean, over every generated token (forced BOS and the final
EOS included), of ``log_softmax(raw logits)`` at that token. This equals the
length-normalised log-likelihood of teacher forcing ``[start] + token_ids``,
which is how the reference reranker scores candidates (mean token log-prob,
no label smoothing). Temperature, top-p, min-length, no-repeat-n-gram and
the forced tokens shape the *choice* of tokens only, never the score.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import BartForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from streamcap.errors import ModelError
from streamcap.models.enclap.tokenizer import decode_caption

_FAST_NUCLEUS_K = 64
"""Size of the top-k slice tried before a full sort when looking for the nucleus."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingOptions:
    """How candidates are sampled.

    Defaults follow the DCASE2023 hybrid-reranking recipe (temperature 0.5,
    top-p 0.95, no repeated 3-grams, min length 5 / max length 30 counted
    HF-style with the decoder start token), with 30 candidates instead of 50
    to fit the CPU budget.
    """

    n_candidates: int = 30
    top_p: float = 0.95  # nucleus mass, in (0, 1]
    temperature: float = 0.5  # divides the logits before top-p; > 0
    # Generated tokens after the decoder start, forced BOS and final EOS included.
    max_new_tokens: int = 30
    # EOS is blocked until this many tokens (forced BOS included) exist, so a
    # candidate has at least min_new_tokens + 1 tokens (HF min_new_tokens).
    min_new_tokens: int = 4
    no_repeat_ngram_size: int = 3  # 0 turns the block off
    seed: int | None = None  # used when no generator is passed
    decoder_start_token_id: int = 2
    bos_token_id: int = 0
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        self._verify()

    def _verify(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if self.n_candidates < 1:
            raise ValueError(f"SamplingOptions.n_candidates must be >= 1, got {self.n_candidates}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingOptions.top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise ValueError(f"SamplingOptions.temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 2:
            raise ValueError(
                f"SamplingOptions.max_new_tokens must be >= 2 (BOS and EOS), got {self.max_new_tokens}"
            )
        if not 0 <= self.min_new_tokens < self.max_new_tokens:
            raise ValueError(
                "SamplingOptions.min_new_tokens must be in [0, max_new_tokens), "
                f"got {self.min_new_tokens} with max_new_tokens {self.max_new_tokens}"
            )
        if self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"SamplingOptions.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"
            )
        for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"SamplingOptions.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SampledCaption:
    """One sampled candidate.

    ``token_ids`` are the generated ids after the decoder start token, forced
    BOS and the final EOS included. ``decoder_score`` is their mean raw
    log-probability (``log_likelihood / len(token_ids)``).
    """

    token_ids: tuple[int, ...]
    decoder_score: float
    log_likelihood: float
    ended_by_model: bool  # False when EOS was forced at max_new_tokens
    text: str = ""


class TextDecoder(Protocol):
    """Anything that turns token ids into text, like a HF tokenizer."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


def choose_next_tokens(
    logits: torch.Tensor,
    history: torch.Tensor,
    options: SamplingOptions,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each row's next token and its raw log-probability.

    Args:
        logits: float (b, V) raw decoder logits for the next position.
        history: int64 (b, s) the decoder inputs so far, decoder start first;
            ``s - 1`` tokens have been generated.
        options: the sampling options.
        generator: the random stream; one uniform per row is drawn, and only
            on steps whose token is not forced.

    Returns:
        int64 (b,) the chosen tokens and float32 (b,) ``log_softmax(logits)``
        at them.
    """
    raw = logits.float()
    step = history.shape[1] - 1
    rows = raw.shape[0]
    if step == 0:
        tokens = torch.full((rows,), options.bos_token_id, dtype=torch.long, device=raw.device)
    elif step == options.max_new_tokens - 1:
        tokens = torch.full((rows,), options.eos_token_id, dtype=torch.long, device=raw.device)
    else:
        z = raw / options.temperature
        if step < options.min_new_tokens:
            z[:, options.eos_token_id] = float("-inf")
        _block_repeated_ngrams(z, history, options.no_repeat_ngram_size)
        tokens = _sample_top_p(z, options.top_p, generator)
    chosen = raw.gather(1, tokens[:, None])[:, 0]
    return tokens, chosen - torch.logsumexp(raw, dim=-1)


def _block_repeated_ngrams(z: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Set to -inf, in place, every token that would repeat an n-gram of ``history``."""
    if n <= 0 or history.shape[1] < n:
        return
    grams = history.unfold(1, n, 1)  # (b, s - n + 1, n)
    tail = history[:, history.shape[1] - n + 1 :]  # (b, n - 1)
    match = (grams[:, :, : n - 1] == tail[:, None, :]).all(dim=-1)
    rows, cols = match.nonzero(as_tuple=True)
    if rows.numel():
        z[rows, grams[rows, cols, n - 1]] = float("-inf")


def _sample_top_p(z: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row from the top-p nucleus of ``softmax(z)``.

    The nucleus is the shortest prefix of the tokens sorted by probability
    whose mass reaches ``top_p`` (the token crossing it is kept). It is looked
    for in a top-64 slice first and in a full sort only for rows whose slice
    holds less than ``top_p``. Sampling inverts the nucleus CDF with one
    uniform per row instead of drawing over the whole vocabulary.

    Args:
        z: float32 (b, V) tempered, constrained logits (-inf = banned).
        top_p: nucleus mass in (0, 1].
        generator: the random stream.

    Returns:
        int64 (b,) sampled token ids.
    """
    rows, vocab = z.shape
    u = torch.rand(rows, generator=generator, device=z.device)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    k = min(_FAST_NUCLEUS_K, vocab)
    vals, idx = z.topk(k, dim=-1)
    probs = torch.exp(vals - lse)
    cum = probs.cumsum(dim=-1)
    tokens = torch.empty(rows, dtype=torch.long, device=z.device)
    covered = cum[:, -1] >= top_p
    if k < vocab and not bool(covered.all()):
        slow = (~covered).nonzero(as_tuple=True)[0]
        s_vals, s_idx = z[slow].sort(dim=-1, descending=True)
        s_probs = torch.exp(s_vals - lse[slow])
        tokens[slow] = _invert_cdf(s_probs, s_probs.cumsum(dim=-1), s_idx, top_p, u[slow])
        fast = covered.nonzero(as_tuple=True)[0]
        if fast.numel():
            tokens[fast] = _invert_cdf(probs[fast], cum[fast], idx[fast], top_p, u[fast])
        return tokens
    return _invert_cdf(probs, cum, idx, top_p, u)


def _invert_cdf(
    probs: torch.Tensor, cum: torch.Tensor, ids: torch.Tensor, top_p: float, u: torch.Tensor
) -> torch.Tensor:
    """Draw from the nucleus of sorted ``probs`` (b, k) given uniforms ``u`` (b,)."""
    kept = (cum - probs) < top_p  # a prefix: the mass before the token is short of top_p
    count = kept.sum(dim=-1).clamp(min=1)
    mass = cum.gather(1, (count - 1)[:, None])
    pos = torch.searchsorted(cum, u[:, None] * mass, right=True)
    pos = torch.minimum(pos, (count - 1)[:, None])
    return ids.gather(1, pos)[:, 0]


def _check_inputs(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validate the encoder output and return its unmasked rows, (L', d)."""
    d_model = bart.config.d_model
    if not isinstance(d_model, int):
        raise ModelError(f"the model config has no integer d_model (got {d_model!r})")
    if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != 1:
        raise ValueError(
            "encoder_hidden_states must have shape (1, L, d_model), "
            f"got {tuple(encoder_hidden_states.shape)}"
        )
    if encoder_hidden_states.shape[2] != d_model:
        raise ValueError(
            f"encoder_hidden_states last dim is {encoder_hidden_states.shape[2]}, "
            f"the model's d_model is {d_model}"
        )
    states = encoder_hidden_states[0]
    if encoder_attention_mask is None:
        return states
    if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
        raise ValueError(
            f"encoder_attention_mask must have shape {tuple(encoder_hidden_states.shape[:2])}, "
            f"got {tuple(encoder_attention_mask.shape)}"
        )
    keep = encoder_attention_mask[0].bool()
    if not bool(keep.any()):
        raise ValueError("encoder_attention_mask masks out every encoder position")
    # With one sequence, masked positions can simply be dropped: attention to
    # them has weight zero either way, so the result is identical.
    return states if bool(keep.all()) else states[keep]


class _SharedCrossDecoder:
    """Incremental BART decoder: per-layer self-attention cache, cross K/V at batch 1."""

    def __init__(
        self, bart: BartForConditionalGeneration, memory: torch.Tensor, steps: int
    ) -> None:
        decoder = bart.model.decoder
        if getattr(decoder, "layer_norm", None) is not None:
            raise ModelError(
                "sampling expects a post-LayerNorm BART decoder; this decoder has a final "
                "layer_norm (mBART-style), which the shared-KV sampler does not implement"
            )
        self.bart = bart
        self.decoder = decoder
        self.layers = list(decoder.layers)
        first = self.layers[0].self_attn
        self.heads = int(first.num_heads)
        self.head_dim = int(first.head_dim)
        self.steps = steps
        dtype = decoder.embed_tokens.weight.dtype
        memory = memory.to(dtype)
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            attn = layer.encoder_attn
            k = attn.k_proj(memory).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(memory).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
            self.cross.append((k, v))  # (1, H, L, hd) each
        shape = (1, self.heads, steps, self.head_dim)
        self.self_kv = [(memory.new_empty(shape), memory.new_empty(shape)) for _ in self.layers]

    def repeat(self, n: int) -> None:
        """Turn a batch-1 self-attention cache into n identical rows."""
        self.self_kv = [(k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)) for k, v in self.self_kv]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (int64 indices) of the self-attention cache."""
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]

    def step(self, token_ids: torch.Tensor, position: int) -> torch.Tensor:
        """Feed int64 (b,) tokens at ``position``; return float (b, V) raw logits."""
        b = token_ids.shape[0]
        heads, hd = self.heads, self.head_dim
        dec = self.decoder
        pos = dec.embed_positions.weight[position + dec.embed_positions.offset]
        x = dec.layernorm_embedding(dec.embed_tokens(token_ids) + pos)  # (b, d)
        for layer, (cache_k, cache_v), (cross_k, cross_v) in zip(
            self.layers, self.self_kv, self.cross, strict=True
        ):
            sa = layer.self_attn
            q = sa.q_proj(x).view(b, heads, 1, hd)
            cache_k[:, :, position] = sa.k_proj(x).view(b, heads, hd)
            cache_v[:, :, position] = sa.v_proj(x).view(b, heads, hd)
            keys = cache_k[:, :, : position + 1]
            values = cache_v[:, :, : position + 1]
            a = F.scaled_dot_product_attention(q, keys, values, scale=sa.scaling)
            x = layer.self_attn_layer_norm(x + sa.out_proj(a.reshape(b, heads * hd)))
            ca = layer.encoder_attn
            # Fold the b single-token queries into b query positions of batch 1.
            q = ca.q_proj(x).view(b, heads, hd).transpose(0, 1).unsqueeze(0)  # (1, H, b, hd)
            a = F.scaled_dot_product_attention(q, cross_k, cross_v, scale=ca.scaling)
            a = a[0].transpose(0, 1).reshape(b, heads * hd)
            x = layer.encoder_attn_layer_norm(x + ca.out_proj(a))
            h = layer.fc2(layer.activation_fn(layer.fc1(x)))
            x = layer.final_layer_norm(x + h)
        logits: torch.Tensor = self.bart.lm_head(x) + self.bart.final_logits_bias.to(x.dtype)
        return logits


class CandidateRecorder:
    """The tokens and log-likelihood of each candidate while finished rows leave the batch.

    Row ``i`` of the live batch belongs to candidate ``rows[i]``; :meth:`record`
    appends one decoding step and drops the rows that produced EOS.
    """

    def __init__(self, n: int, options: SamplingOptions, *, first_token: int | None = None,
                 first_logp: float = 0.0) -> None:
        self.options = options
        self.tokens: list[list[int]] = [[] if first_token is None else [first_token]
                                        for _ in range(n)]
        self.log_lik = [first_logp] * n
        self.by_model = [False] * n
        self.rows = list(range(n))

    def record(self, tokens: torch.Tensor, logp: torch.Tensor,
               position: int) -> torch.Tensor | None:
        """Append one step's tokens (long (rows,)) and log-probabilities (float (rows,)).

        Returns:
            The indices of the rows still live, or None when every row has ended.
        """
        ended = tokens == self.options.eos_token_id
        last = self.options.max_new_tokens - 1
        for c, t, lp, end in zip(self.rows, tokens.tolist(), logp.tolist(), ended.tolist(),
                                 strict=True):
            self.tokens[c].append(t)
            self.log_lik[c] += lp
            self.by_model[c] = end and position < last
        live = (~ended).nonzero(as_tuple=True)[0]
        if live.numel() == 0:
            return None
        if live.numel() < len(self.rows):
            self.rows = [self.rows[i] for i in live.tolist()]
        return live

    def results(self) -> list[SampledCaption]:
        return [
            SampledCaption(
                token_ids=tuple(ids),
                decoder_score=self.log_lik[c] / len(ids),
                log_likelihood=self.log_lik[c],
                ended_by_model=self.by_model[c],
            )
            for c, ids in enumerate(self.tokens)
        ]


@torch.inference_mode()
def sample_candidates(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    options: SamplingOptions,
    generator: torch.Generator | None = None,
) -> list[SampledCaption]:
    """Sample ``options.n_candidates`` captions from one encoder output.

    Runs in inference mode whatever ``bart.training`` says (no dropout).

    Args:
        bart: the captioner; its decoder, ``lm_head`` and ``final_logits_bias``
            are used (any dtype; logits are scored in float32).
        encoder_hidden_states: float (1, L, d_model), the encoder output.
        encoder_attention_mask: int (1, L), 1 = attend, or None for all.
        options: the sampling options.
        generator: the random stream; when None, a generator seeded with
            ``options.seed`` is used, or torch's global stream if that is None.

    Returns:
        One ``SampledCaption`` per candidate, in row order (``text`` empty;
        see :func:`attach_texts`).
    """
    memory = _check_inputs(bart, encoder_hidden_states, encoder_attention_mask)
    if generator is None and options.seed is not None:
        generator = torch.Generator(device=memory.device).manual_seed(options.seed)
    n = options.n_candidates
    decoder = _SharedCrossDecoder(bart, memory, options.max_new_tokens)
    # Position 0 feeds the decoder start token; the forced BOS it yields is
    # the same for every row, and so are the logits at position 1: both steps
    # run at batch 1, and the rows split at the first sampled token.
    history = torch.full(
        (1, 1), options.decoder_start_token_id, dtype=torch.long, device=memory.device
    )
    bos, bos_logp = choose_next_tokens(decoder.step(history[:, 0], 0), history, options, generator)
    history = torch.cat([history, bos[:, None]], dim=1)
    recorder = CandidateRecorder(n, options, first_token=int(bos[0]),
                                 first_logp=float(bos_logp[0]))
    for position in range(1, options.max_new_tokens):
        logits = decoder.step(history[:, -1], position)
        if position == 1:
            logits, history = logits.expand(n, -1), history.expand(n, -1)
            decoder.repeat(n)
        tokens, logp = choose_next_tokens(logits, history, options, generator)
        rows_before = len(recorder.rows)
        live = recorder.record(tokens, logp, position)
        if live is None:
            break
        if live.numel() < rows_before:
            history, tokens = history[live], tokens[live]
            decoder.select(live)
        history = torch.cat([history, tokens[:, None]], dim=1)
    return recorder.results()


@torch.inference_mode()
def score_captions(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    token_ids: Sequence[Sequence[int]],
    *,
    decoder_start_token_id: int = 2,
    pad_token_id: int = 1,
) -> list[float]:
    """Teacher-forced mean log-probability of each token sequence.

    The reference decoder score: ``[start] + ids`` is fed to ``bart`` and the
    raw ``log_softmax`` at every token of ``ids`` is averaged. Used to score
    captions that did not come from :func:`sample_candidates` (beam output,
    external candidates) and to check the sampler's scores.

    Args:
        bart: the captioner.
        encoder_hidden_states: float (1, L, d_model).
        encoder_attention_mask: int (1, L) or None.
        token_ids: one non-empty id sequence per caption (BOS ... EOS).
        decoder_start_token_id: the decoder's first input.
        pad_token_id: filler for shorter rows (never scored).

    Returns:
        One float per sequence, in input order.
    """
    _check_inputs(bart, encoder_hidden_states, encoder_attention_mask)
    if not token_ids:
        return []
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("score_captions: every token_ids sequence must be non-empty")
    n = len(token_ids)
    width = max(len(ids) for ids in token_ids)
    device = encoder_hidden_states.device
    labels = torch.full((n, width), pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros((n, width), dtype=torch.bool, device=device)
    for i, ids in enumerate(token_ids):
        labels[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        valid[i, : len(ids)] = True
    inputs = torch.cat(
        [
            torch.full((n, 1), decoder_start_token_id, dtype=torch.long, device=device),
            labels[:, :-1],
        ],
        dim=1,
    )
    encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden_states.expand(n, -1, -1))
    mask = None if encoder_attention_mask is None else encoder_attention_mask.expand(n, -1)
    out = bart(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=inputs)
    logp = torch.log_softmax(out.logits.float(), dim=-1).gather(2, labels[:, :, None])[:, :, 0]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    return (logp.sum(dim=1) / valid.sum(dim=1)).tolist()


def attach_texts(
    candidates: Sequence[SampledCaption], tokenizer: TextDecoder
) -> list[SampledCaption]:
    """Return copies of ``candidates`` with ``text`` decoded and cleaned (:func:`decode_caption`)."""
    return [replace(c, text=decode_caption(tokenizer, c.token_ids)) for c in candidates]


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_text(text: str) -> str:
    """Lowercase, remove punctuation (ASCII and Unicode), collapse whitespace."""
    text = text.translate(_PUNCTUATION)
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.lower().split())


def dedupe(candidates: Sequence[SampledCaption]) -> list[SampledCaption]:
    """Keep one candidate per normalised text, the one with the best decoder score.

    Candidates whose normalised text is empty are dropped. The result keeps
    the order in which each distinct text first appeared; among equal scores
    the earlier candidate wins.
    """
    best: dict[str, SampledCaption] = {}
    for cand in candidates:
        key = normalise_text(cand.text)
        if not key:
            continue
        held = best.get(key)
        if held is None or cand.decoder_score > held.decoder_score:
            best[key] = cand
    return list(best.values())
