"""The inference interface the decoders drive, and its single-model implementation.

A decoder asks an :class:`Inference` for next-token logits of a batch of prefixes
and tells it which rows live on (finished samples leave, beams are reordered). A
single BART model implements it with :class:`SharedCrossInference`; an output
ensemble with :class:`streamcap.models.decoding.ensemble.EnsembleInference`.

:class:`SharedCrossInference` is the fast path. The encoder ran once over ``W``
inputs (windows of distinct sources; ``W = 1`` for one window):

- the cross-attention keys and values are projected once, shaped ``(W, H, L, hd)``,
  and every row attends only to those of its own window: the rows of a step are
  grouped by window (a :class:`BatchInference` keeps them in window order), and
  their single-token queries are laid out as ``W`` query blocks, one per window,
  padded to the largest block, so one attention call serves every row. Neither
  the encoder output nor its keys/values are ever copied per row. With ``W > 1``
  and inputs of different lengths a key-padding mask hides each window's padding;
  with one window masked positions are simply dropped;
- self-attention keys/values live in a preallocated per-layer cache, whose rows
  follow the decoder's :meth:`~SharedCrossInference.keep`.

When every row of a window has left (its samples all ended), the window's
cross keys/values are dropped from the attention (one copy per such event), so
finished windows cost nothing more.
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


class BatchInference(Inference, Protocol):
    """An :class:`Inference` over the encoder outputs of ``windows`` inputs at once.

    :meth:`start` begins at batch ``windows``: row ``i`` belongs to window ``i``.
    :meth:`keep` must keep the rows grouped by window, in window order (rows of
    window 0 first, then window 1, ...); a window may lose all its rows.
    """

    @property
    def windows(self) -> int:
        """How many encoder outputs (windows) this inference serves."""

    def window(self, index: int) -> Inference:
        """An inference over window ``index`` alone (for decoders that do not batch)."""


def require_one_window(inference: Inference, who: str) -> None:
    """Raise ValueError when ``inference`` serves several encoder outputs (a batch)."""
    windows = getattr(inference, "windows", 1)
    if windows != 1:
        raise ValueError(f"{who} decodes one encoder output of shape (1, L, d_model); this "
                         f"inference holds {windows} (use decode_batch)")


def check_encoder_output(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validate a batch-1 encoder output and return its unmasked rows, (L', d)."""
    if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != 1:
        raise ValueError(
            "encoder_hidden_states must have shape (1, L, d_model), "
            f"got {tuple(encoder_hidden_states.shape)}"
        )
    memory, mask = check_encoder_outputs(bart, encoder_hidden_states, encoder_attention_mask)
    assert mask is None  # one window: masked positions are dropped
    return memory[0]


def check_encoder_outputs(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a batch of W encoder outputs; return them trimmed, with a key mask if needed.

    Returns:
        ``(memory, key_mask)``: float (W, L', d) and bool (W, L') (True = attend) or
        None when every kept position is attended. With ``W = 1`` masked positions
        are dropped (attention to them has weight zero either way, so the result is
        identical); with ``W > 1`` positions masked in every window are dropped from
        the end and the mask hides the rest.

    Raises:
        ValueError: bad shapes, or an input whose mask hides every position.
    """
    d_model = bart.config.d_model
    if not isinstance(d_model, int):
        raise ModelError(f"the model config has no integer d_model (got {d_model!r})")
    if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] < 1:
        raise ValueError(
            "encoder_hidden_states must have shape (W, L, d_model), "
            f"got {tuple(encoder_hidden_states.shape)}"
        )
    if encoder_hidden_states.shape[2] != d_model:
        raise ValueError(
            f"encoder_hidden_states last dim is {encoder_hidden_states.shape[2]}, "
            f"the model's d_model is {d_model}"
        )
    states = encoder_hidden_states
    if encoder_attention_mask is None:
        return states, None
    if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
        raise ValueError(
            f"encoder_attention_mask must have shape {tuple(encoder_hidden_states.shape[:2])}, "
            f"got {tuple(encoder_attention_mask.shape)}"
        )
    keep = encoder_attention_mask.bool()
    if not bool(keep.any(dim=1).all()):
        raise ValueError("encoder_attention_mask masks out every encoder position")
    if bool(keep.all()):
        return states, None
    if states.shape[0] == 1:
        return states[:, keep[0]], None
    used = keep.any(dim=0).nonzero(as_tuple=True)[0]
    end = int(used[-1]) + 1
    states, keep = states[:, :end], keep[:, :end]
    return states, None if bool(keep.all()) else keep


class SharedCrossInference:
    """Incremental BART decoder over W encoder outputs: cross K/V shared by each window's rows.

    Implements :class:`BatchInference` (and, with one window, :class:`Inference`).

    Args:
        bart: a post-LayerNorm BART captioner (any dtype; logits come in its dtype).
        encoder_hidden_states: float (W, L, d_model), the encoder outputs (W = 1: one).
        encoder_attention_mask: int (W, L), 1 = attend, or None for all.
    """

    def __init__(self, bart: BartForConditionalGeneration, encoder_hidden_states: torch.Tensor,
                 encoder_attention_mask: torch.Tensor | None) -> None:
        memory, key_mask = check_encoder_outputs(bart, encoder_hidden_states,
                                                 encoder_attention_mask)
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
        self.key_mask = key_mask
        self._inputs = (encoder_hidden_states, encoder_attention_mask)
        self.device = memory.device
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._attend: torch.Tensor | None = None  # (W', 1, 1, L) key mask of the live windows
        self._row_window = torch.zeros(0, dtype=torch.long, device=self.device)
        self._slots: torch.Tensor | None = None  # flat query slot of each row; None: a reshape
        self._block = 0  # query slots per window

    @property
    def windows(self) -> int:
        return int(self.memory.shape[0])

    def window(self, index: int) -> SharedCrossInference:
        """An inference over window ``index`` alone."""
        states, mask = self._inputs
        return SharedCrossInference(self.bart, states[index : index + 1],
                                    None if mask is None else mask[index : index + 1])

    def start(self, positions: int) -> None:
        """Begin at batch ``windows``, row ``i`` in window ``i``."""
        memory = self.memory
        w = self.windows
        self.cross = []
        for layer in self.layers:
            attn = layer.encoder_attn
            k = attn.k_proj(memory).view(w, -1, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(memory).view(w, -1, self.heads, self.head_dim).transpose(1, 2)
            self.cross.append((k, v))  # (W, H, L, hd) each
        shape = (w, self.heads, positions, self.head_dim)
        self.self_kv = [(memory.new_empty(shape), memory.new_empty(shape)) for _ in self.layers]
        self._attend = None if self.key_mask is None else self.key_mask[:, None, None, :]
        self._layout(torch.arange(w, device=self.device))

    def keep(self, rows: torch.Tensor) -> None:
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]
        self._layout(self._row_window[rows])

    def _layout(self, row_window: torch.Tensor) -> None:
        """Place each row's query in its window's block; drop windows that have no row left."""
        n_windows = len(self.cross[0][0]) if self.cross else self.windows
        counts = torch.bincount(row_window, minlength=n_windows)
        if row_window.numel() > 1 and bool((row_window[1:] < row_window[:-1]).any()):
            raise ValueError("SharedCrossInference.keep: rows must stay grouped by window, "
                             "in window order")
        if row_window.numel() and bool((counts == 0).any()):
            live = (counts > 0).nonzero(as_tuple=True)[0]
            self.cross = [(k[live], v[live]) for k, v in self.cross]
            if self._attend is not None:
                self._attend = self._attend[live]
            remap = torch.cumsum(counts > 0, dim=0) - 1
            row_window, counts = remap[row_window], counts[live]
        self._row_window = row_window
        self._block = int(counts.max()) if counts.numel() else 0
        if bool((counts == self._block).all()):
            self._slots = None  # equal blocks: the rows are the blocks, a reshape suffices
        else:
            starts = torch.cumsum(counts, dim=0) - counts
            slot = torch.arange(row_window.numel(), device=self.device) - starts[row_window]
            self._slots = row_window * self._block + slot

    def _cross_attend(self, q: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """Attention of each row's query (b, H * hd) to its own window's keys/values."""
        w, block, heads, hd = cross_k.shape[0], self._block, self.heads, self.head_dim
        if self._slots is None:
            blocks = q.view(w, block, heads, hd)
        else:
            blocks = q.new_zeros(w * block, heads * hd)
            blocks[self._slots] = q
            blocks = blocks.view(w, block, heads, hd)
        a = F.scaled_dot_product_attention(blocks.transpose(1, 2), cross_k, cross_v,
                                           attn_mask=self._attend, scale=scale)
        a = a.transpose(1, 2).reshape(w * block, heads * hd)
        return a if self._slots is None else a[self._slots]

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
            a = self._cross_attend(ca.q_proj(x), cross_k, cross_v, ca.scaling)
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
