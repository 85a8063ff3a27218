"""CLAP audio embedder: features, LAION checkpoint conversion, tiny random HTSAT."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

from streamcap.errors import ConfigError, WeightsError
from streamcap.models.retrieval.clap import (
    ClapEmbedder,
    ClapEmbedderConfig,
    ClapFeatures,
    audio_state_from_clap_model,
    clap_preset,
    convert_laion_state_dict,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def embedder() -> ClapEmbedder:
    torch.manual_seed(0)
    return ClapEmbedder(clap_preset("clap-tiny"))


def _audio(n: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_short_clip_features_match_transformers_extractor() -> None:
    features = ClapFeatures(clap_preset("clap-tiny"))
    x = _audio(100_000)
    got, longer = features(x)
    assert got.shape == (4, 1001, 64) and not longer
    assert torch.equal(got[0], got[3])
    quantised = (np.clip(x, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32767
    extractor = ClapFeatureExtractor(frequency_min=50, frequency_max=14000)
    want = extractor(quantised, sampling_rate=48000, return_tensors="np")["input_features"][0]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3)


def test_long_clip_uses_fusion_deterministically() -> None:
    features = ClapFeatures(clap_preset("clap-tiny"))
    x = _audio(48000 * 25, 1)
    a, longer = features(x)
    b, _ = features(x)
    assert longer and a.shape == (4, 1001, 64) and torch.equal(a, b)
    mel = features.log_mel(torch.from_numpy(
        (np.clip(x, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32767))
    total = mel.shape[0]
    second_third = np.array_split(np.arange(total - 1001 + 1), 3)[1]
    middle = int(second_third[len(second_third) // 2])
    assert torch.equal(a[2], mel[middle:middle + 1001])
    exactly, longer10 = features(_audio(480_000 + 100, 2))
    assert not longer10 and torch.equal(exactly[0], exactly[1])  # 1,001 frames either way


def test_embedding_is_normalised_and_content_dependent(embedder: ClapEmbedder) -> None:
    a = embedder.embed(_audio(48000 * 2, 3))
    b = embedder.embed(_audio(48000 * 2, 4))
    assert a.shape == (32,) and a.dtype == np.float32
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert not np.allclose(a, b)
    assert embedder.embed(_audio(48000 * 12, 5)).shape == (32,)  # fusion branch


def _to_laion(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse renaming: a ClapAudioModelWithProjection state dict in LAION's layout."""
    out: dict[str, torch.Tensor] = {"module.text_branch.embeddings.word_embeddings.weight":
                                    torch.zeros(3, 2),
                                    "module.logit_scale_a": torch.zeros(()),
                                    "module.audio_branch.spectrogram_extractor.stft.conv_real"
                                    ".weight": torch.zeros(1),
                                    "module.audio_branch.layers.0.blocks.0.attn_mask":
                                    torch.zeros(1)}
    rules = [("audio_model.audio_encoder.", "audio_branch."), (".batch_norm.", ".bn0."),
             (".attention.output.dense.", ".attn.proj."), (".attention.self.", ".attn."),
             (".intermediate.dense.", ".mlp.fc1."), (".output.dense.", ".mlp.fc2."),
             (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."),
             ("audio_projection.linear1.", "audio_projection.0."),
             ("audio_projection.linear2.", "audio_projection.2.")]
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for ours, theirs in rules:
            key = key.replace(ours, theirs)
        match = re.match(r"(.*\.attn\.)(query|key|value)\.(weight|bias)$", key)
        if match:
            qkv.setdefault(f"{match[1]}qkv.{match[3]}", {})[match[2]] = value
            continue
        out["module." + key] = value
    for key, parts in qkv.items():
        out["module." + key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def test_laion_checkpoint_converts_to_the_same_model(embedder: ClapEmbedder) -> None:
    laion = _to_laion(embedder.state_dict())
    assert any(".attn.qkv.weight" in k for k in laion)
    other = ClapEmbedder(clap_preset("clap-tiny"))
    x = _audio(48000 * 3, 6)
    assert not np.allclose(other.embed(x), embedder.embed(x))
    other.load_state_dict(convert_laion_state_dict(laion))
    np.testing.assert_allclose(other.embed(x), embedder.embed(x), atol=1e-6)


def test_clap_model_audio_half_loads(embedder: ClapEmbedder) -> None:
    config = clap_preset("clap-tiny")
    model = ClapModel(ClapConfig(audio_config=dict(config.audio),
                                 text_config={"hidden_size": 16, "num_hidden_layers": 1,
                                              "num_attention_heads": 2,
                                              "intermediate_size": 16, "vocab_size": 50},
                                 projection_dim=config.embed_dim))
    state = model.state_dict()
    assert any(k.startswith("text_model.") for k in state)
    loaded = ClapEmbedder(config)
    loaded.load_state_dict(state)
    assert set(audio_state_from_clap_model(state)) <= set(loaded.state_dict())
    hf = ClapEmbedderConfig.from_hf_config(model.config.to_dict())
    assert hf.embed_dim == 32 and hf.audio["depths"] == [1, 1]


def test_bad_weights_and_config_are_named(embedder: ClapEmbedder) -> None:
    state = embedder.state_dict()
    state.pop("audio_projection.linear2.bias")
    state["audio_projection.linear1.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): audio_projection.linear2.bias"):
        embedder.load_state_dict(state)
    with pytest.raises(WeightsError, match=r"audio_projection.linear1.weight: expected"):
        embedder.load_state_dict(state)
    with pytest.raises(ConfigError, match="enable_fusion"):
        ClapEmbedderConfig(audio={"enable_fusion": False})
    with pytest.raises(ConfigError, match="seq_embedder.bogus: unknown key"):
        ClapEmbedderConfig.from_dict({"bogus": 1})
    assert ClapEmbedderConfig.from_dict(clap_preset("clap-tiny").to_dict()) == \
        clap_preset("clap-tiny")
