"""Model presets: the architecture of every component, by name.

A preset is a recipe, not weights: ``tiny`` is small enough for tests and
demos of the plumbing; ``base`` and ``large`` have the dimensions of a real
system (BART-base/-large over 32 DAC codebooks, fed by the 768-d CNext clip
embedding, a BERT-base text encoder and a BERT-base fluency checker).
``enclap-base`` and ``enclap-large`` describe the published EnCLAP models
(EnCodec 24 kHz at 12 kbps = 16 codebooks, the 512-d LAION-CLAP embedding in
row 0, BART-base/-large, 1,021 frames; no retriever, no fluency checker; beam
search by default); ``streamcap models import-enclap`` fills them with the
authors' weights.
Parameter counts come from the meta device, so listing ``large`` allocates
no weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from streamcap.errors import ModelError
from streamcap.models.codecs.dac import CodecConfig, DacEncoderQuantizer, codec_preset
from streamcap.models.codecs.encodec import (
    EncodecCodecConfig,
    EncodecEncoderQuantizer,
    encodec_preset,
)
from streamcap.models.enclap.model import EnclapConfig, count_parameters
from streamcap.models.enclap.model import preset as enclap_preset
from streamcap.models.retrieval.clap import ClapEmbedderConfig, clap_preset
from streamcap.models.retrieval.cnext import CNEXT_TINY, CNEXT_TOY, CNext
from streamcap.models.retrieval.retriever import AudioTextRetriever, RetrieverConfig

# BERT dimensions used by presets (uncased BERT vocabulary size for base/large).
_BERT_TINY: Final[Mapping[str, Any]] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 128,
}
_BERT_BASE: Final[Mapping[str, Any]] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 512, "vocab_size": 30522,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FluencyConfig:
    """The fluency checker's BERT dimensions and decision threshold."""

    bert: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int = 6
    threshold: float = 0.9

    def to_dict(self) -> dict[str, Any]:
        return {"bert": dict(self.bert), "num_classes": self.num_classes,
                "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FluencyConfig:
        unknown = sorted(set(data) - {"bert", "num_classes", "threshold"})
        if unknown:
            raise ModelError(f"fluency config: unknown key(s) {', '.join(unknown)}")
        return cls(bert=dict(data.get("bert", {})), num_classes=int(data.get("num_classes", 6)),
                   threshold=float(data.get("threshold", 0.9)))


@dataclass(frozen=True, slots=True, kw_only=True)
class PresetSpec:
    """Every component's configuration for one preset.

    ``retriever``/``fluency`` are None for the published EnCLAP models, whose row 0
    comes from ``seq_embedder`` (CLAP); ``decoding`` holds the preset's default
    decoding (e.g. ``{"mode": "beam"}``), applied unless the config sets its own.
    """

    name: str
    codec: CodecConfig | EncodecCodecConfig
    captioner: EnclapConfig
    retriever: RetrieverConfig | None
    fluency: FluencyConfig | None
    tokenizer_vocab_size: int
    description: str
    seq_embedder: ClapEmbedderConfig | None = None
    decoding: Mapping[str, Any] = field(default_factory=dict)

    @property
    def codec_kind(self) -> str:
        """``"dac"`` or ``"encodec"``."""
        return "encodec" if isinstance(self.codec, EncodecCodecConfig) else "dac"


def _tiny() -> PresetSpec:
    vocab = 1000
    audio = CNEXT_TOY
    return PresetSpec(
        name="tiny",
        codec=codec_preset("tiny"),
        captioner=enclap_preset("tiny", n_codebooks=codec_preset("tiny").n_codebooks,
                                seq_embed_dim=audio.embed_dim, vocab_size=vocab,
                                max_frames=2250),
        retriever=RetrieverConfig(audio=audio, text_model_type="bert",
                                  text_config={**_BERT_TINY, "vocab_size": vocab},
                                  joint_dim=32, audio_hidden=64, text_hidden=64),
        fluency=FluencyConfig(bert={**_BERT_TINY, "vocab_size": vocab}),
        tokenizer_vocab_size=vocab,
        description="tiny random model for tests and demos of the plumbing",
    )


def _real(name: str, enclap_name: str) -> PresetSpec:
    retriever = RetrieverConfig(audio=CNEXT_TINY, text_model_type="bert",
                                text_config=dict(_BERT_BASE), joint_dim=1024)
    return PresetSpec(
        name=name,
        codec=codec_preset("dac24k"),
        captioner=enclap_preset(enclap_name, n_codebooks=32, seq_embed_dim=CNEXT_TINY.embed_dim),
        retriever=retriever,
        fluency=FluencyConfig(bert=dict(_BERT_BASE)),
        tokenizer_vocab_size=8000,
        description=f"BART-{name} dimensions over 32 DAC codebooks with the 768-d CNext "
                    "embedding (random weights unless loaded from a bundle)",
    )


REFERENCE_DECODING: Final[Mapping[str, Any]] = {
    "mode": "beam", "num_beams": 4, "no_repeat_ngram_size": 3, "beam_max_length": 50}
"""EnCLAP's published inference: beam 4, no repeated 3-grams, at most 50 tokens."""


def _enclap(name: str) -> PresetSpec:
    clap = clap_preset("clap-htsat-fused")
    codec = encodec_preset("encodec24k")
    return PresetSpec(
        name=name,
        codec=codec,
        captioner=enclap_preset(name, n_codebooks=codec.n_codebooks,
                                seq_embed_dim=clap.embed_dim),
        retriever=None,
        fluency=None,
        seq_embedder=clap,
        tokenizer_vocab_size=50265,
        decoding=dict(REFERENCE_DECODING),
        description=f"the published EnCLAP-{name.split('-')[1]}: 16 EnCodec codebooks, 512-d "
                    "LAION-CLAP embedding, beam search (random weights unless imported with "
                    "'streamcap models import-enclap')",
    )


PRESETS: Final[dict[str, Callable[[], PresetSpec]]] = {
    "tiny": _tiny, "base": lambda: _real("base", "base"),
    "large": lambda: _real("large", "large"),
    "enclap-base": lambda: _enclap("enclap-base"),
    "enclap-large": lambda: _enclap("enclap-large")}
"""The one preset registry: name -> builder. ``streamcap models presets`` lists it,
``--model NAME`` and ``streamcap models build NAME`` accept exactly its names."""


def preset_names() -> tuple[str, ...]:
    """The names of :data:`PRESETS`, in registry order."""
    return tuple(PRESETS)


def preset_spec(name: str) -> PresetSpec:
    """The preset ``name``; :class:`ModelError` lists the choices."""
    builder = PRESETS.get(name)
    if builder is None:
        raise ModelError(f"unknown preset {name!r} (presets: {', '.join(preset_names())})")
    return builder()


def _count(module_factory: Any) -> int:
    with torch.device("meta"):
        module = module_factory()
    return sum(p.numel() for p in module.parameters())


def parameter_counts(spec: PresetSpec) -> dict[str, int]:
    """Parameters per component, built on the meta device (no weights allocated).

    The codec counts the encoder and quantizer only (streamcap never decodes
    audio; EnCodec's codebooks are buffers and do not count); the retriever
    counts CNext (with its AudioSet head), the text encoder and both
    projections; the fluency checker counts BERT and its 6-way head;
    ``seq_embedder`` counts the CLAP audio tower and projection. Absent
    components count 0.
    """
    from streamcap.models.decoding.fluency import FenseClassifier, bert_config_for

    enclap = count_parameters(spec.captioner)
    codec = spec.codec
    retriever = spec.retriever
    fluency = spec.fluency
    seq_embedder = spec.seq_embedder
    counts = {
        "codec": (_count(lambda: EncodecEncoderQuantizer(codec))
                  if isinstance(codec, EncodecCodecConfig)
                  else _count(lambda: DacEncoderQuantizer(codec))),
        "captioner": int(enclap["total"]),
        "retriever": 0 if retriever is None else _count(lambda: AudioTextRetriever(retriever)),
        "retriever_audio_encoder": 0 if retriever is None else _count(
            lambda: CNext(retriever.audio)),
        "fluency": 0,
        "seq_embedder": 0,
    }
    if fluency is not None:
        bert = bert_config_for("bert-base-uncased")
        for key, value in fluency.bert.items():
            setattr(bert, key, value)
        counts["fluency"] = _count(lambda: FenseClassifier(bert, fluency.num_classes))
    if seq_embedder is not None:
        from transformers import ClapAudioModelWithProjection

        counts["seq_embedder"] = _count(
            lambda: ClapAudioModelWithProjection(seq_embedder.hf_config()))
    counts["total"] = (counts["codec"] + counts["captioner"] + counts["retriever"]
                       + counts["fluency"] + counts["seq_embedder"])
    return counts
