"""The demo architecture and fresh (untrained) bundles for training from scratch.

``demo`` is the model shipped in ``streamcap/data/demo-bundle``: small enough
to train on a laptop CPU in minutes and to ship inside the package.

* codec: a tiny DAC encoder (hidden 4, strides 2-4-5-8-3: 960 samples per
  frame, 25 frames/s at 24 kHz, 4 codebooks of 1024) with a FIXED RANDOM
  initialisation; it is never trained, it only turns audio into tokens;
* retriever: the toy CNext (64 mels, widths 8-64) and a 2-layer BERT with
  hidden size 64, joint space of 64;
* captioner: EnCLAP with d_model 128, 2 + 2 layers, 4 heads;
* tokenizer: byte-level BPE trained on the training captions;
* no fluency checker.

:func:`init_components` builds randomly initialised components of a preset
(``tiny``, ``demo``, ``base``, ``large``) with a tokenizer trained on a
manifest's captions, ready for ``streamcap train retriever|captioner``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import torch

from streamcap.errors import ModelError
from streamcap.models.bundle.components import Components
from streamcap.models.bundle.presets import FluencyConfig, PresetSpec, preset_spec
from streamcap.models.codecs.dac import CodecConfig, CodecTokenizer
from streamcap.models.enclap.model import EnclapModel
from streamcap.models.enclap.model import preset as enclap_preset
from streamcap.models.enclap.tokenizer import build_caption_tokenizer
from streamcap.models.retrieval.cnext import CNEXT_TOY
from streamcap.models.retrieval.retriever import AudioTextRetriever, RetrieverConfig

DEMO_CODEC = CodecConfig(encoder_hidden_size=4, downsampling_ratios=(2, 4, 5, 8, 3),
                         n_codebooks=4)

_DEMO_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 128}


def demo_spec(vocab_size: int = 1000) -> PresetSpec:
    """The demo architecture for a caption vocabulary of ``vocab_size``."""
    audio = CNEXT_TOY
    return PresetSpec(
        name="demo",
        codec=DEMO_CODEC,
        captioner=enclap_preset("tiny", n_codebooks=DEMO_CODEC.n_codebooks,
                                seq_embed_dim=audio.embed_dim, vocab_size=vocab_size,
                                d_model=128, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                max_frames=2250),
        retriever=RetrieverConfig(audio=audio, text_model_type="bert",
                                  text_config={**_DEMO_BERT, "vocab_size": vocab_size},
                                  joint_dim=64, audio_hidden=128, text_hidden=128,
                                  text_dropout=0.1),
        fluency=FluencyConfig(),
        tokenizer_vocab_size=vocab_size,
        description="demo model trained on the synthetic corpus (tiny fixed random DAC)",
    )


def spec_for(name: str, vocab_size: int) -> PresetSpec:
    """A preset (``demo`` or any of :mod:`streamcap.models.bundle.presets`) sized to a vocabulary."""
    if name == "demo":
        return demo_spec(vocab_size)
    spec = preset_spec(name)
    retriever = spec.retriever
    if retriever is None or not isinstance(spec.codec, CodecConfig):
        raise ModelError(f"preset {name!r}: training from scratch needs a DAC codec and a "
                         "retriever (use demo, tiny, base or large)")
    if retriever.text_config.get("vocab_size") is not None:
        retriever = replace(retriever, text_config={**retriever.text_config,
                                                    "vocab_size": vocab_size})
    return replace(spec, captioner=replace(spec.captioner, vocab_size=vocab_size),
                   retriever=retriever, tokenizer_vocab_size=vocab_size)


def init_components(preset: str, captions: Sequence[str], *, vocab_size: int = 1000,
                    seed: int = 0) -> Components:
    """Random components of ``preset`` with a BPE tokenizer trained on ``captions``.

    The tokenizer may come out smaller than ``vocab_size`` on a small corpus; the
    models are sized to the tokenizer actually built. The caption decoder and the
    retriever's text encoder share the tokenizer; there is no fluency checker.
    """
    tokenizer = build_caption_tokenizer(vocab_size, corpus=list(captions))
    spec = spec_for(preset, len(tokenizer))
    if spec.retriever is None or not isinstance(spec.codec, CodecConfig):
        raise ModelError(f"preset {preset!r}: needs a DAC codec and a retriever")
    torch.manual_seed(seed)
    codec = CodecTokenizer(spec.codec)
    captioner = EnclapModel(spec.captioner).eval()
    retriever = AudioTextRetriever(spec.retriever).eval()
    digest = hashlib.sha256(f"{preset}:{seed}:{len(tokenizer)}".encode()).hexdigest()[:8]
    return Components(model_id=f"streamcap-{preset}-{digest}", preset=None, codec=codec,
                      captioner=captioner, retriever=retriever, fluency=None,
                      tokenizer=tokenizer, text_tokenizer=tokenizer, decoding={})
