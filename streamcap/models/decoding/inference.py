"""The inference interface the decoders drive, and its single-model implementation.

A decoder asks an :class:`Inference` for next-token logits of a batch of prefixes
and tells it which rows live on (finished samples leave, beams are reordered). A
single BART model implements it with :class:`SharedCrossInference`; an output
ensemble with :class:`streamcap.models.decoding.ensemble.EnsembleInference`.

:class:`SharedCrossInference` is the fast path. The encoder ran once (batch 1):

- the cross-attention keys and values are projected once, at batch 1, and every
  row attends to them: the b single-token queries of a step are folded into one
  batch-1 attention call (b query positions), so neither the encoder output nor
  its keys/values are ever copied b times;
- self-attention keys/values live in a preallocated per-layer cache, whose rows
  follow the decoder's :meth:`~SharedCrossInference.keep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import BartForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from streamcap.errors import ModelError
from streamcap.models.decoding.options import ENCLAP_TOKENS, SpecialTokens


class Inference(Protocol):
    """Next-token logits for a batch of prefixes; a decoder starts it at batch 1."""

    @property
    def device(self) -> torch.device:
        """Where the prefixes live."""

    def start(self, positions: int) -> None:
        """Begin a decoding of at most ``positions`` decoder inputs, at batch 1."""

    def logits(self, history: torch.Tensor) -> torch.Tensor:
        """float (b, V) next-token logits of int64 (b, s) prefixes (decoder start first).

        Consecutive calls extend the same rows by one token (after :meth:`keep`).
        The scores are taken as ``log_softmax`` of these logits.
        """

    def keep(self, rows: torch.Tensor) -> None:
        """Make the batch int64 ``rows`` of the current one (drop, reorder or repeat)."""


def check_encoder_output(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validate a batch-1 encoder output and return its unmasked rows, (L', d)."""
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


class SharedCrossInference:
    """Incremental BART decoder over one encoder output: cross K/V shared at batch 1.

    Args:
        bart: a post-LayerNorm BART captioner (any dtype; logits come in its dtype).
        encoder_hidden_states: float (1, L, d_model), the encoder output.
        encoder_attention_mask: int (1, L), 1 = attend, or None for all.
    """

    def __init__(self, bart: BartForConditionalGeneration, encoder_hidden_states: torch.Tensor,
                 encoder_attention_mask: torch.Tensor | None) -> None:
        memory = check_encoder_output(bart, encoder_hidden_states, encoder_attention_mask)
        decoder = bart.model.decoder
        if getattr(decoder, "layer_norm", None) is not None:
            raise ModelError(
                "decoding expects a post-LayerNorm BART decoder; this decoder has a final "
                "layer_norm (mBART-style), which the shared-KV decoder does not implement"
            )
        self.bart = bart
        self.decoder = decoder
        self.layers = list(decoder.layers)
        first = self.layers[0].self_attn
        self.heads = int(first.num_heads)
        self.head_dim = int(first.head_dim)
        self.memory = memory.to(decoder.embed_tokens.weight.dtype)
        self.device = memory.device
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self, positions: int) -> None:
        memory = self.memory
        self.cross = []
        for layer in self.layers:
            attn = layer.encoder_attn
            k = attn.k_proj(memory).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(memory).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
            self.cross.append((k, v))  # (1, H, L, hd) each
        shape = (1, self.heads, positions, self.head_dim)
        self.self_kv = [(memory.new_empty(shape), memory.new_empty(shape)) for _ in self.layers]

    def keep(self, rows: torch.Tensor) -> None:
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]

    def logits(self, history: torch.Tensor) -> torch.Tensor:
        token_ids = history[:, -1]
        position = history.shape[1] - 1
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


@torch.inference_mode()
def score_captions(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    token_ids: Sequence[Sequence[int]],
    *,
    tokens: SpecialTokens = ENCLAP_TOKENS,
) -> list[float]:
    """Teacher-forced mean log-probability of each token sequence.

    The reference decoder score: ``[start] + ids`` is fed to ``bart`` and the
    raw ``log_softmax`` at every token of ``ids`` is averaged. Used to score
    captions that no decoder here produced and to check the decoders' scores.

    Args:
        bart: the captioner.
        encoder_hidden_states: float (1, L, d_model).
        encoder_attention_mask: int (1, L) or None.
        token_ids: one non-empty id sequence per caption (BOS ... EOS).
        tokens: the decoder start (first input) and pad (filler, never scored).

    Returns:
        One float per sequence, in input order.
    """
    check_encoder_output(bart, encoder_hidden_states, encoder_attention_mask)
    if not token_ids:
        return []
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("score_captions: every token_ids sequence must be non-empty")
    n = len(token_ids)
    width = max(len(ids) for ids in token_ids)
    device = encoder_hidden_states.device
    labels = torch.full((n, width), tokens.pad, dtype=torch.long, device=device)
    valid = torch.zeros((n, width), dtype=torch.bool, device=device)
    for i, ids in enumerate(token_ids):
        labels[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        valid[i, : len(ids)] = True
    start = torch.full((n, 1), tokens.decoder_start, dtype=torch.long, device=device)
    inputs = torch.cat([start, labels[:, :-1]], dim=1)
    encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden_states.expand(n, -1, -1))
    mask = None if encoder_attention_mask is None else encoder_attention_mask.expand(n, -1)
    out = bart(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=inputs)
    logp = torch.log_softmax(out.logits.float(), dim=-1).gather(2, labels[:, :, None])[:, :, 0]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    return (logp.sum(dim=1) / valid.sum(dim=1)).tolist()
