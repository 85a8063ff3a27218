"""EnCLAP captioner: a BART encoder-decoder reading neural-codec tokens.

Codes are int64 tensors of shape (B, K, T), the layout of DAC's ``codes``. Encoder input,
for a clip of T codec frames with K codebooks (sequence length L = T + 3)::

    row 0        Linear(seq_embed_dim, d_model)(seq_embed)   no positional embedding
    row 1        BART <s> token embedding                    BART position 0
    rows 2..T+1  sum over k of embed_encodec[k](code[k, t])  BART position t + 1
    row T+2      BART </s> token embedding                   BART position T + 1

then ``layernorm_embedding``, dropout and the standard BART encoder layers. There is no
``embed_scale``: the BART dimensions used here (bart-base, bart-large) have
``scale_embedding=False``, and :class:`EnclapConfig` has no such switch, so the BART built
by :meth:`EnclapConfig.bart_config` never scales (decoder included). The codec pad/mask id
is ``codebook_size``; it is each codec table's ``padding_idx``, so it embeds to zero.

In a padded batch every clip keeps this layout over its own length n: its </s> row is
row n + 2 and the rows after it are padding (zero inputs, attention mask 0).

The encoder has its own learned position table with ``max_frames + 3`` positions (plus
BART's offset of 2 rows), so windows longer than BART's 1,024 positions fit; the decoder
keeps ``decoder_max_positions``. :func:`extend_positions` grows a pretrained table.

Parameter names follow the original EnCLAP checkpoints with a ``bart.`` prefix:
``bart.model.shared``, ``bart.model.encoder.{embed_tokens, embed_positions,
layernorm_embedding, layers.N...}``, ``bart.model.encoder.embed_encodec.{k}.weight``,
``bart.model.encoder.clap_projection.{weight,bias}`` (it projects whichever sequence-level
embedding is configured), ``bart.model.decoder...``, ``bart.lm_head.weight`` (tied to
``shared``), the buffer ``bart.final_logits_bias``, and ``mcm_heads.{k}.{weight,bias}``.
:func:`reference_key` and :func:`streamcap_key` convert between the two layouts.

The configuration lives in :mod:`streamcap.models.enclap.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple, cast, overload

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import BartEncoder, BartLearnedPositionalEmbedding

from streamcap.errors import ModelError
from streamcap.models.enclap.config import PRESETS, EnclapConfig, preset

POSITION_OFFSET = 2
"""BART's learned position tables start with two unused rows; position p is row p + 2."""

_PREFIX = "bart."

IGNORE_INDEX = -100
"""Label value ignored by the losses (PyTorch's cross-entropy default)."""

__all__ = [
    "PRESETS",
    "EnclapConfig",
    "EnclapEncoding",
    "EnclapModel",
    "EnclapOutput",
    "count_parameters",
    "extend_positions",
    "preset",
    "reference_key",
    "shift_right",
    "streamcap_key",
    "tile_positions",
]


class EnclapEncoding(NamedTuple):
    """Encoder result, ready for the BART decoder.

    Attributes:
        hidden_states: float (B, T + 3, d_model), final encoder hidden states.
        attention_mask: int64 (B, T + 3); 1 for real rows, 0 for padding.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor

    def encoder_outputs(self) -> BaseModelOutput:
        """The hidden states wrapped for ``bart(encoder_outputs=...)`` / ``bart.generate``."""
        return BaseModelOutput(last_hidden_state=self.hidden_states)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EnclapOutput:
    """Training losses and logits.

    Attributes:
        loss: float scalar, ``caption_loss + mcm_loss_scale * mcm_loss``.
        caption_loss: float scalar, label-smoothed cross-entropy over non-ignored tokens.
        mcm_loss: float scalar, ``sum_k 2**-(k+1) * CE_k`` (unscaled); 0 without MCM labels.
        mcm_per_codebook: float (K,), CE_k; 0 for a codebook with no masked position.
        logits: float (B, N, vocab_size) caption logits.
    """

    loss: torch.Tensor
    caption_loss: torch.Tensor
    mcm_loss: torch.Tensor
    mcm_per_codebook: torch.Tensor
    logits: torch.Tensor


def shift_right(labels: torch.Tensor, *, pad_id: int, start_id: int) -> torch.Tensor:
    """Builds decoder inputs from caption labels (teacher forcing).

    Args:
        labels: int64 (B, N), ``-100`` at ignored positions.
        pad_id: id written where a shifted label was ``-100``.
        start_id: the decoder start id put in column 0.

    Returns:
        int64 (B, N): ``[start_id, labels[:, :-1]]`` with ``-100`` replaced by ``pad_id``.
    """
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


class EnclapModel(nn.Module):
    """EnCLAP: codec-token BART encoder, BART decoder, MCM heads.

    Attributes:
        config: the model configuration (replaced by :func:`extend_positions`).
        bart: a ``transformers.BartForConditionalGeneration``. Its decoder side is standard:
            ``bart(encoder_outputs=(h,), attention_mask=m, decoder_input_ids=ids)`` and
            ``bart.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h),
            attention_mask=m, ...)`` work with ``h, m`` from :meth:`encode`. Its own encoder
            forward is *not* EnCLAP's; never call ``bart`` without ``encoder_outputs``.
        mcm_heads: K x ``Linear(d_model, codebook_size)``.
    """

    def __init__(self, config: EnclapConfig) -> None:
        super().__init__()
        self.config = config
        self.bart = BartForConditionalGeneration(config.bart_config())
        encoder = self._encoder
        d_model = config.d_model
        encoder.embed_positions = BartLearnedPositionalEmbedding(config.max_frames + 3, d_model)
        encoder.max_source_positions = config.max_frames + 3
        encoder.embed_encodec = nn.ModuleList(
            nn.Embedding(config.codec_table_rows, d_model, padding_idx=config.codec_pad_id)
            for _ in range(config.n_codebooks)
        )
        encoder.clap_projection = nn.Linear(config.seq_embed_dim, d_model)
        self.mcm_heads = nn.ModuleList(
            nn.Linear(d_model, config.codebook_size) for _ in range(config.n_codebooks)
        )
        self._init_new_weights()

    @property
    def _encoder(self) -> BartEncoder:
        return cast(BartEncoder, self.bart.model.encoder)

    @property
    def codec_embeddings(self) -> nn.ModuleList:
        """The K codec embedding tables, each ``(codec_table_rows, d_model)``."""
        return cast(nn.ModuleList, self._encoder.embed_encodec)

    @property
    def seq_projection(self) -> nn.Linear:
        """``Linear(seq_embed_dim, d_model)`` producing encoder row 0."""
        return cast(nn.Linear, self._encoder.clap_projection)

    @property
    def position_table(self) -> torch.Tensor:
        """float (max_frames + 3 + 2, d_model), the encoder's learned position rows."""
        return self._encoder.embed_positions.weight

    def _init_new_weights(self) -> None:
        std = self.config.init_std
        with torch.no_grad():
            nn.init.normal_(self._encoder.embed_positions.weight, std=std)
            for table in self.codec_embeddings:
                emb = cast(nn.Embedding, table)
                nn.init.normal_(emb.weight, std=std)
                emb.weight[self.config.codec_pad_id].zero_()
            for linear in [self.seq_projection, *self.mcm_heads]:
                lin = cast(nn.Linear, linear)
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    def _frame_counts(
        self, codes: torch.Tensor, seq_embed: torch.Tensor, frame_mask: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.config
        if codes.dim() != 3 or codes.shape[1] != cfg.n_codebooks:
            raise ModelError(
                f"enclap: expected codes of shape (B, {cfg.n_codebooks}, T), "
                f"got {tuple(codes.shape)}"
            )
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ModelError(f"enclap: codes must be an integer tensor, got {codes.dtype}")
        batch, _, n_frames = codes.shape
        if n_frames > cfg.max_frames:
            raise ModelError(
                f"enclap: {n_frames} codec frames exceed max_frames={cfg.max_frames}; "
                "window the input or extend the position table"
            )
        if tuple(seq_embed.shape) != (batch, cfg.seq_embed_dim):
            raise ModelError(
                f"enclap: expected seq_embed of shape ({batch}, {cfg.seq_embed_dim}), "
                f"got {tuple(seq_embed.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > cfg.codec_pad_id):
            raise ModelError(
                f"enclap: codes must lie in [0, {cfg.codec_pad_id}] "
                f"(codebook_size {cfg.codebook_size} is the pad/mask id)"
            )
        if frame_mask is None:
            return torch.full((batch,), n_frames, dtype=torch.long, device=codes.device)
        if tuple(frame_mask.shape) != (batch, n_frames):
            raise ModelError(
                f"enclap: frame_mask shape {tuple(frame_mask.shape)} does not match "
                f"(B, T) = {(batch, n_frames)}"
            )
        valid = frame_mask.to(device=codes.device, dtype=torch.bool)
        counts = valid.sum(dim=1)
        frames = torch.arange(n_frames, device=codes.device)
        if not torch.equal(frames[None, :] < counts[:, None], valid):
            raise ModelError("enclap: frame_mask must mark real frames first, then padding")
        return counts

    def embed(
        self,
        codes: torch.Tensor,
        seq_embed: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> EnclapEncoding:
        """Builds the encoder input: token/codec/projection rows plus shifted positions.

        This is the sum fed to ``layernorm_embedding`` (before it).

        Args:
            codes: integer (B, K, T) codec tokens in ``[0, codebook_size]``; the layout of
                DAC's ``codes`` tensor. ``codebook_size`` is the pad/mask id.
            seq_embed: float (B, seq_embed_dim), the clip-level audio embedding.
            frame_mask: bool or 0/1 (B, T), True for real frames, which come first in each
                row; None means every frame is real.

        Returns:
            ``(inputs, attention_mask)``: float (B, T + 3, d_model) and int64 (B, T + 3).

        Raises:
            ModelError: wrong shapes, ids out of range, T > max_frames, non-prefix mask.
        """
        counts = self._frame_counts(codes, seq_embed, frame_mask)
        cfg = self.config
        batch, _, n_frames = codes.shape
        length = n_frames + 3
        device = codes.device
        frames = torch.arange(n_frames, device=device)
        valid = frames[None, :] < counts[:, None]
        ids = codes.long().masked_fill(~valid[:, None, :], cfg.codec_pad_id)
        codec_sum: torch.Tensor | None = None
        for k, table in enumerate(self.codec_embeddings):
            part = cast(torch.Tensor, table(ids[:, k, :]))
            codec_sum = part if codec_sum is None else codec_sum + part
        shared = self.bart.model.shared
        weight = cast(torch.Tensor, shared.weight)
        if codec_sum is None:
            codec_sum = weight.new_zeros(batch, n_frames, cfg.d_model)
        first = self.seq_projection(seq_embed.to(weight.dtype))
        bos = weight[cfg.bos_token_id].expand(batch, 1, cfg.d_model)
        tail = codec_sum.new_zeros(batch, 1, cfg.d_model)
        rows = torch.cat([first[:, None, :], bos, codec_sum, tail], dim=1)
        positions = torch.arange(length, device=device)
        is_eos = positions[None, :] == (counts + 2)[:, None]
        rows = torch.where(is_eos[..., None], weight[cfg.eos_token_id], rows)
        table_rows = self.position_table[POSITION_OFFSET : POSITION_OFFSET + length - 1]
        pos = torch.cat([table_rows.new_zeros(1, cfg.d_model), table_rows], dim=0)
        attention_mask = (positions[None, :] <= (counts + 2)[:, None]).long()
        return EnclapEncoding(hidden_states=rows + pos, attention_mask=attention_mask)

    def encode(
        self,
        codes: torch.Tensor,
        seq_embed: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> EnclapEncoding:
        """Runs the EnCLAP encoder.

        Args:
            codes: integer (B, K, T), see :meth:`embed`.
            seq_embed: float (B, seq_embed_dim).
            frame_mask: bool or 0/1 (B, T), or None.

        Returns:
            Final hidden states float (B, T + 3, d_model) and the attention mask int64 (B, T + 3).

        Raises:
            ModelError: see :meth:`embed`.
        """
        inputs, attention_mask = self.embed(codes, seq_embed, frame_mask)
        encoder = self._encoder
        hidden = encoder.layernorm_embedding(inputs)
        hidden = F.dropout(hidden, p=self.config.dropout, training=self.training)
        mask = create_bidirectional_mask(
            config=self.bart.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in encoder.layers:
            drop = self.config.encoder_layerdrop
            if self.training and drop > 0.0 and float(torch.rand(())) < drop:
                continue
            hidden = layer(hidden, mask)
        return EnclapEncoding(hidden_states=hidden, attention_mask=attention_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoding: EnclapEncoding,
        *,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: object | None = None,
        use_cache: bool = False,
    ) -> Seq2SeqLMOutput:
        """Runs the BART decoder and ``lm_head`` (+ ``final_logits_bias``) on encoder states.

        Args:
            decoder_input_ids: int64 (B, N) decoder tokens (with ``cache``, only the new ones).
            encoding: the result of :meth:`encode` (batch may be repeated by the caller).
            decoder_attention_mask: optional int64 (B, N_total).
            cache: a transformers ``EncoderDecoderCache`` from a previous call, or None.
            use_cache: return the updated cache in ``.cache``.

        Returns:
            transformers' ``Seq2SeqLMOutput``; ``.logits`` is float (B, N, vocab_size).
        """
        out = self.bart(
            encoder_outputs=encoding.encoder_outputs(),
            attention_mask=encoding.attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        return cast(Seq2SeqLMOutput, out)

    def mcm_losses(
        self, hidden_states: torch.Tensor, mcm_labels: torch.Tensor, frame_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked codec modelling loss.

        Args:
            hidden_states: float (B, T + 3, d_model), final encoder states.
            mcm_labels: int64 (B, K, T); original code at masked slots, -100 elsewhere.
            frame_counts: int64 (B,), real frames per clip; labels beyond are ignored.

        Returns:
            ``(sum_k 2**-(k+1) * CE_k, CE per codebook (K,))``. CE_k is the mean over that
            codebook's masked slots in the whole batch; a codebook without any is skipped
            (weight 0, reported as 0) instead of producing NaN.
        """
        cfg = self.config
        n_frames = mcm_labels.shape[2]
        frames = torch.arange(n_frames, device=mcm_labels.device)
        valid = frames[None, :] < frame_counts[:, None]
        labels = mcm_labels.long().masked_fill(~valid[:, None, :], IGNORE_INDEX)
        by_codebook = labels.transpose(0, 1)  # (K, B, T)
        selected = by_codebook != IGNORE_INDEX
        counts = [int(c) for c in selected.sum(dim=(1, 2)).tolist()]
        _, rows, cols = selected.nonzero(as_tuple=True)
        frame_states = hidden_states[:, 2 : 2 + n_frames]
        picked = torch.split(frame_states[rows, cols], counts)
        targets = torch.split(by_codebook[selected], counts)
        zero = hidden_states.new_zeros((), dtype=torch.float32)
        values: list[torch.Tensor] = []
        total = zero
        for k, head in enumerate(self.mcm_heads):
            if counts[k] == 0:
                values.append(zero)
                continue
            if int(targets[k].min()) < 0 or int(targets[k].max()) >= cfg.codebook_size:
                raise ModelError(
                    f"enclap: mcm_labels for codebook {k} must lie in [0, {cfg.codebook_size})"
                )
            logits = cast(torch.Tensor, head(picked[k])).float()
            ce = F.cross_entropy(logits, targets[k])
            values.append(ce)
            total = total + ce * 2.0 ** -(k + 1)
        return total, torch.stack(values)

    def forward(
        self,
        codes: torch.Tensor,
        seq_embed: torch.Tensor,
        labels: torch.Tensor,
        *,
        frame_mask: torch.Tensor | None = None,
        mcm_labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> EnclapOutput:
        """Training step: caption loss plus the optional MCM loss.

        Args:
            codes: integer (B, K, T), already MCM-masked when ``mcm_labels`` is given
                (see :func:`streamcap.training.trainers.masking.mask_codes`).
            seq_embed: float (B, seq_embed_dim).
            labels: int64 (B, N) caption token ids ``[<s>, ..., </s>]``, -100 as padding.
            frame_mask: bool or 0/1 (B, T), or None.
            mcm_labels: int64 (B, K, T) or None (no MCM term).
            decoder_attention_mask: optional int64 (B, N).

        Returns:
            The losses and the caption logits.

        Raises:
            ModelError: bad shapes or ids, or ``labels`` without any target token.
        """
        cfg = self.config
        if labels.dim() != 2 or labels.shape[0] != codes.shape[0]:
            raise ModelError(
                f"enclap: expected labels of shape ({codes.shape[0]}, N), got {tuple(labels.shape)}"
            )
        if not bool((labels != IGNORE_INDEX).any()):
            raise ModelError("enclap: labels contain no target token (all -100)")
        if mcm_labels is not None and mcm_labels.shape != codes.shape:
            raise ModelError(
                f"enclap: mcm_labels shape {tuple(mcm_labels.shape)} does not match codes "
                f"{tuple(codes.shape)}"
            )
        encoding = self.encode(codes, seq_embed, frame_mask)
        decoder_input_ids = shift_right(
            labels, pad_id=cfg.pad_token_id, start_id=cfg.decoder_start_token_id
        )
        logits = self.decode(
            decoder_input_ids, encoding, decoder_attention_mask=decoder_attention_mask
        ).logits
        if logits is None:
            raise ModelError("enclap: the BART decoder returned no logits")
        caption_loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=cfg.label_smoothing,
        )
        if mcm_labels is None:
            mcm_loss = caption_loss.new_zeros(())
            per_codebook = caption_loss.new_zeros(cfg.n_codebooks)
        else:
            counts = encoding.attention_mask.sum(dim=1) - 3
            mcm_loss, per_codebook = self.mcm_losses(encoding.hidden_states, mcm_labels, counts)
        return EnclapOutput(
            loss=caption_loss + cfg.mcm_loss_scale * mcm_loss,
            caption_loss=caption_loss,
            mcm_loss=mcm_loss,
            mcm_per_codebook=per_codebook,
            logits=logits,
        )


def reference_key(name: str) -> str:
    """Maps a streamcap parameter name to the original EnCLAP checkpoint name."""
    return name.removeprefix(_PREFIX)


def streamcap_key(name: str) -> str:
    """Maps an original EnCLAP checkpoint name to the streamcap parameter name."""
    return name if name.startswith("mcm_heads.") else _PREFIX + name


_POSITIONS_SUFFIX = "model.encoder.embed_positions.weight"


def tile_positions(table: torch.Tensor, new_max_frames: int) -> torch.Tensor:
    """Grows an encoder position table to ``new_max_frames + 3`` positions by tiling.

    Rows kept: the two offset rows and every existing position, unchanged. New
    position p (p >= N, N = existing positions) copies existing position
    ``1 + (p - 1) mod (N - 1)``: the block of positions 1..N-1 is repeated.

    Why tiling: a window of codec frames is mostly read through local relations (a frame
    and its neighbours). Repeating the pretrained block keeps the geometry between
    neighbouring positions exactly as pretrained everywhere except at the seams, the
    copy-initialisation that Longformer used to extend RoBERTa's table. Linear
    interpolation would either rewrite the existing rows (a stretched table, which breaks
    the pretrained checkpoint) or place new rows on chords between trained rows, vectors
    with a smaller norm that the pretrained layers never saw. Position 0 is left out of
    the tile because it always holds the <s> row.

    Args:
        table: float (N + 2, d_model), a BART learned position table (offset 2).
        new_max_frames: codec frames per window the grown table must cover.

    Returns:
        float (new_max_frames + 3 + 2, d_model); the input itself if it is already that size.

    Raises:
        ModelError: the table would shrink (never cropped) or holds fewer than 2 positions.
    """
    old_positions = table.shape[0] - POSITION_OFFSET
    new_positions = new_max_frames + 3
    if new_positions < old_positions:
        raise ModelError(
            f"extend_positions: the table covers {old_positions - 3} frames; refusing to crop "
            f"it to new_max_frames={new_max_frames}"
        )
    if new_positions == old_positions:
        return table
    if old_positions < 2:
        raise ModelError(f"extend_positions: a table with {old_positions} positions cannot tile")
    period = old_positions - 1
    extra = torch.arange(old_positions, new_positions, device=table.device)
    source = POSITION_OFFSET + 1 + (extra - 1) % period
    return torch.cat([table, table[source]], dim=0)


@overload
def extend_positions(target: EnclapModel, new_max_frames: int) -> EnclapModel: ...


@overload
def extend_positions(
    target: Mapping[str, torch.Tensor], new_max_frames: int
) -> dict[str, torch.Tensor]: ...


def extend_positions(
    target: EnclapModel | Mapping[str, torch.Tensor], new_max_frames: int
) -> EnclapModel | dict[str, torch.Tensor]:
    """Grows the encoder position table to ``new_max_frames`` codec frames (see :func:`tile_positions`).

    Args:
        target: a model (changed in place: new table, ``config.max_frames`` updated) or a
            state dict in either key layout (streamcap ``bart.model...`` or original
            ``model...``; a new dict is returned, the input is not modified).
        new_max_frames: frames per window to support; at least the current limit.

    Returns:
        The same model, or the new state dict.

    Raises:
        ModelError: the table would shrink, or the state dict has no encoder position table.
    """
    if isinstance(target, EnclapModel):
        old = target.position_table
        with torch.no_grad():
            grown = tile_positions(old.detach(), new_max_frames)
        table = BartLearnedPositionalEmbedding(new_max_frames + 3, target.config.d_model)
        table.to(device=old.device, dtype=old.dtype)
        with torch.no_grad():
            table.weight.copy_(grown)
        encoder = target._encoder
        encoder.embed_positions = table
        encoder.max_source_positions = new_max_frames + 3
        target.config = dataclasses.replace(target.config, max_frames=new_max_frames)
        return target
    keys = [k for k in target if k == _POSITIONS_SUFFIX or k.endswith("." + _POSITIONS_SUFFIX)]
    if len(keys) != 1:
        raise ModelError(
            f"extend_positions: expected one '{_POSITIONS_SUFFIX}' entry in the state dict, "
            f"found {len(keys)}"
        )
    out = dict(target)
    out[keys[0]] = tile_positions(target[keys[0]], new_max_frames)
    return out


def count_parameters(config: EnclapConfig) -> dict[str, int]:
    """Counts parameters per part without allocating them (built on the meta device).

    Tied weights (``lm_head`` = ``shared`` = encoder/decoder ``embed_tokens``) count once;
    ``final_logits_bias`` is a buffer and does not count.

    Args:
        config: the model configuration.

    Returns:
        ``bart`` (the BART body incl. both position tables), ``codec_embeddings``,
        ``seq_projection``, ``mcm_heads`` and ``total``.
    """
    with torch.device("meta"):
        model = EnclapModel(config)
    parts = {"bart": 0, "codec_embeddings": 0, "seq_projection": 0, "mcm_heads": 0}
    for name, param in model.named_parameters():
        if name.startswith("bart.model.encoder.embed_encodec."):
            parts["codec_embeddings"] += param.numel()
        elif name.startswith("bart.model.encoder.clap_projection."):
            parts["seq_projection"] += param.numel()
        elif name.startswith("mcm_heads."):
            parts["mcm_heads"] += param.numel()
        else:
            parts["bart"] += param.numel()
    parts["total"] = sum(parts.values())
    return parts
