"""Model presets: the architecture of every component, by name.

A preset is a recipe, not weights: ``tiny`` is small enough for tests and
demos of the plumbing; ``base`` and ``large`` have the dimensions of a real
system (BART-base/-large over 32 DAC codebooks, fed by the 768-d CNext clip
embedding, a BERT-base text encoder and a BERT-base fluency checker).
Parameter counts come from the meta device, so listing ``large`` allocates
no weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import torch

from streamcap.errors import ModelError
from streamcap.models.cnext import CNEXT_TINY, CNEXT_TOY, CNext
from streamcap.models.codec import CodecConfig, DacEncoderQuantizer, codec_preset
from streamcap.models.enclap import EnclapConfig, count_parameters
from streamcap.models.enclap import preset as enclap_preset
from streamcap.models.retriever import AudioTextRetriever, RetrieverConfig

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
    """Every component's configuration for one preset."""

    name: str
    codec: CodecConfig
    captioner: EnclapConfig
    retriever: RetrieverConfig
    fluency: FluencyConfig
    tokenizer_vocab_size: int
    description: str


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


_BUILDERS: Final[Mapping[str, Callable[[], PresetSpec]]] = {
    "tiny": _tiny, "base": lambda: _real("base", "base"),
    "large": lambda: _real("large", "large")}
PRESET_NAMES: Final = tuple(_BUILDERS)


def preset_spec(name: str) -> PresetSpec:
    """The preset ``name``; :class:`ModelError` lists the choices."""
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise ModelError(f"unknown preset {name!r} (presets: {', '.join(PRESET_NAMES)})") from None


def _count(module_factory: Any) -> int:
    with torch.device("meta"):
        module = module_factory()
    return sum(p.numel() for p in module.parameters())


def parameter_counts(spec: PresetSpec) -> dict[str, int]:
    """Parameters per component, built on the meta device (no weights allocated).

    The codec counts the encoder and quantizer only (streamcap never decodes
    audio); the retriever counts CNext (with its AudioSet head), the text
    encoder and both projections; the fluency checker counts BERT and its
    6-way head.
    """
    from streamcap.models.fluency import FenseClassifier, bert_config_for

    enclap = count_parameters(spec.captioner)
    bert = bert_config_for("bert-base-uncased")
    for key, value in spec.fluency.bert.items():
        setattr(bert, key, value)
    counts = {
        "codec": _count(lambda: DacEncoderQuantizer(spec.codec)),
        "captioner": int(enclap["total"]),
        "retriever": _count(lambda: AudioTextRetriever(spec.retriever)),
        "retriever_audio_encoder": _count(lambda: CNext(spec.retriever.audio)),
        "fluency": _count(lambda: FenseClassifier(bert, spec.fluency.num_classes)),
    }
    counts["total"] = (counts["codec"] + counts["captioner"] + counts["retriever"]
                       + counts["fluency"])
    return counts


def with_decoder_vocab(spec: PresetSpec, vocab_size: int) -> PresetSpec:
    """The same preset with another caption vocabulary size."""
    return replace(spec, captioner=replace(spec.captioner, vocab_size=vocab_size))
