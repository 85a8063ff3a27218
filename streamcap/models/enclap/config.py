"""Configuration of the EnCLAP captioner: dimensions, special ids, loss and masking knobs.

Presets (:func:`preset`):

* ``tiny``: 2+2 layers, d_model 64, for tests; vocab_size is meant to be overridden to
  match a small tokenizer.
* ``base`` / ``large``: bart-base / bart-large dimensions over 32 DAC codebooks and a
  768-d clip embedding (CNext), windows up to 2,250 frames (30 s at 75 Hz).
* ``enclap-base`` / ``enclap-large``: the published EnCLAP models: 16 EnCodec codebooks,
  512-d CLAP embedding, 1,021 frames (1,024 encoder positions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from transformers import BartConfig

from streamcap.errors import ModelError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EnclapConfig:
    """Every size and constant of an EnCLAP model.

    Attributes:
        n_codebooks: K, codec codebooks per frame (32 for DAC 24 kHz, 16 for EnCodec 12 kbps).
        codebook_size: entries per codebook; this value is also the pad/mask id.
        seq_embed_dim: size of the clip-level embedding projected into encoder row 0.
        vocab_size: BART text vocabulary size (50265 for the BART tokenizer).
        d_model: BART hidden size.
        encoder_layers / decoder_layers: transformer layers.
        encoder_attention_heads / decoder_attention_heads: heads per attention layer.
        encoder_ffn_dim / decoder_ffn_dim: feed-forward inner sizes.
        dropout / attention_dropout / activation_dropout: dropout probabilities.
        activation_function: a transformers activation name ("gelu" for BART).
        encoder_layerdrop / decoder_layerdrop: LayerDrop probabilities.
        init_std: std of the normal initialisation of new weights.
        max_frames: most codec frames per window; the encoder has max_frames + 3 positions.
        decoder_max_positions: positions of the decoder (caption tokens).
        mcm_loss_scale: weight of the masked-codec-modelling loss in the total.
        label_smoothing: label smoothing of the caption cross-entropy.
        mcm_mask_prob / mcm_mask_span: MCM span masking (see ``streamcap.training.trainers.masking``).
        bos_token_id / pad_token_id / eos_token_id / decoder_start_token_id: BART ids.
    """

    n_codebooks: int = 32
    codebook_size: int = 1024
    seq_embed_dim: int = 768
    vocab_size: int = 50265
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    activation_function: str = "gelu"
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    init_std: float = 0.02
    max_frames: int = 2250
    decoder_max_positions: int = 1024
    mcm_loss_scale: float = 0.7
    label_smoothing: float = 0.2
    mcm_mask_prob: float = 0.15
    mcm_mask_span: int = 10
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = field.type
            if expected == "int" and (type(value) is not int):
                raise ModelError(f"enclap config: '{field.name}' must be an int, got {value!r}")
            if expected == "float" and (type(value) not in (int, float)):
                raise ModelError(f"enclap config: '{field.name}' must be a number, got {value!r}")
            if expected == "str" and not isinstance(value, str):
                raise ModelError(f"enclap config: '{field.name}' must be a string, got {value!r}")
        positive = (
            "n_codebooks codebook_size seq_embed_dim vocab_size d_model encoder_layers "
            "decoder_layers encoder_attention_heads decoder_attention_heads encoder_ffn_dim "
            "decoder_ffn_dim max_frames decoder_max_positions mcm_mask_span"
        )
        for name in positive.split():
            if getattr(self, name) < 1:
                raise ModelError(f"enclap config: '{name}' must be >= 1, got {getattr(self, name)}")
        probabilities = (
            "dropout attention_dropout activation_dropout encoder_layerdrop decoder_layerdrop "
            "label_smoothing mcm_mask_prob"
        )
        for name in probabilities.split():
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ModelError(
                    f"enclap config: '{name}' must be in [0, 1], got {getattr(self, name)}"
                )
        for name in ("mcm_loss_scale", "init_std"):
            if getattr(self, name) < 0.0:
                raise ModelError(f"enclap config: '{name}' must be >= 0, got {getattr(self, name)}")
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ModelError(
                    f"enclap config: d_model={self.d_model} is not divisible by "
                    f"'{side}_attention_heads'={heads}"
                )
        for name in ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ModelError(
                    f"enclap config: '{name}'={getattr(self, name)} outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )

    @property
    def codec_pad_id(self) -> int:
        """The codec pad/mask id, ``codebook_size``; it embeds to a zero vector."""
        return self.codebook_size

    @property
    def codec_table_rows(self) -> int:
        """Rows of each codec embedding table: codebook_size + 1 rounded up to 64."""
        return math.ceil((self.codebook_size + 1) / 64) * 64

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnclapConfig:
        """Builds a config from :meth:`to_dict` output; missing keys take defaults.

        Raises:
            ModelError: an unknown key (named in the message) or an invalid value.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ModelError(f"enclap config: unknown key '{key}'")
        return cls(**dict(data))

    def bart_config(self) -> BartConfig:
        """The transformers ``BartConfig`` of the BART body.

        ``max_position_embeddings`` is the decoder's (``decoder_max_positions``); the
        encoder table is sized from ``max_frames`` by the model. ``scale_embedding`` is
        always False and the lm_head is tied to the shared token embedding.
        """
        return BartConfig(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.decoder_max_positions,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            encoder_attention_heads=self.encoder_attention_heads,
            decoder_attention_heads=self.decoder_attention_heads,
            encoder_ffn_dim=self.encoder_ffn_dim,
            decoder_ffn_dim=self.decoder_ffn_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            activation_function=self.activation_function,
            encoder_layerdrop=self.encoder_layerdrop,
            decoder_layerdrop=self.decoder_layerdrop,
            init_std=self.init_std,
            scale_embedding=False,
            use_cache=True,
            tie_word_embeddings=True,
            is_encoder_decoder=True,
            bos_token_id=self.bos_token_id,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
            forced_eos_token_id=self.eos_token_id,
        )


_BASE: dict[str, Any] = {}
_LARGE: dict[str, Any] = {
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
}
_REFERENCE: dict[str, Any] = {"n_codebooks": 16, "seq_embed_dim": 512, "max_frames": 1021}
_TINY: dict[str, Any] = {
    "n_codebooks": 4,
    "seq_embed_dim": 32,
    "vocab_size": 1000,
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_frames": 256,
    "decoder_max_positions": 128,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "base": _BASE,
    "large": _LARGE,
    "enclap-base": {**_BASE, **_REFERENCE},
    "enclap-large": {**_LARGE, **_REFERENCE},
}
"""Preset name -> the fields it sets (others keep the dataclass defaults)."""


def preset(name: str, **overrides: Any) -> EnclapConfig:
    """A named preset, optionally with some fields overridden.

    Args:
        name: one of ``PRESETS`` (tiny, base, large, enclap-base, enclap-large).
        **overrides: field values replacing the preset's.

    Raises:
        ModelError: unknown preset name, unknown field or invalid value.
    """
    if name not in PRESETS:
        raise ModelError(
            f"enclap config: unknown preset '{name}'; expected one of {sorted(PRESETS)}"
        )
    return EnclapConfig.from_dict({**PRESETS[name], **overrides})
