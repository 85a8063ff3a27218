"""Audio-text retriever: shapes, normalisation, pooling, config and loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from streamcap.errors import ConfigError, WeightsError
from streamcap.models.retrieval.cnext import CNEXT_TOY, CNext
from streamcap.models.retrieval.retriever import AudioTextRetriever, RetrieverConfig
from streamcap.training.trainers.mltm import MLTMLoss, MLTMOptions

torch.set_num_threads(1)

from wordpiece import CAPTIONS, wordpiece_tokenizer


def _tokenizer() -> PreTrainedTokenizerFast:
    return wordpiece_tokenizer()


def _text_config(vocab: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }


def _config(vocab: int, **overrides: Any) -> RetrieverConfig:
    base: dict[str, Any] = {
        "audio": CNEXT_TOY,
        "text_model_type": "bert",
        "text_config": _text_config(vocab),
        "joint_dim": 16,
        "audio_hidden": 32,
        "text_hidden": 32,
    }
    base.update(overrides)
    return RetrieverConfig(**base)


def _model(vocab: int, **overrides: Any) -> AudioTextRetriever:
    torch.manual_seed(0)
    return AudioTextRetriever(_config(vocab, **overrides)).eval()


def _encode(tok: PreTrainedTokenizerFast, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tok(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def test_embed_audio_shapes_and_norm() -> None:
    tok = _tokenizer()
    model = _model(len(tok))
    wave = torch.randn(3, 32_000) * 0.1
    with torch.no_grad():
        clip, joint = model.embed_audio(wave)
        raw = model.audio_encoder(wave).clip
    assert clip.shape == (3, 64) and joint.shape == (3, 16)
    torch.testing.assert_close(clip, raw)
    torch.testing.assert_close(joint.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embed_text_norm_and_padding_invariance(pooling: str) -> None:
    tok = _tokenizer()
    model = _model(len(tok), text_pooling=pooling)
    ids, mask = _encode(tok, CAPTIONS)
    assert int(mask.sum(dim=1).min()) < ids.shape[1]  # the batch really is padded
    with torch.no_grad():
        batch = model.embed_text(ids, mask)
        alone = model.embed_text(*_encode(tok, [CAPTIONS[1]]))
    assert batch.shape == (4, 16)
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_cls_and_mean_pooling_differ() -> None:
    tok = _tokenizer()
    ids, mask = _encode(tok, CAPTIONS[:2])
    with torch.no_grad():
        cls = _model(len(tok), text_pooling="cls").embed_text(ids, mask)
        mean = _model(len(tok), text_pooling="mean").embed_text(ids, mask)
    assert not torch.allclose(cls, mean)


def test_similarity_is_cosine() -> None:
    gen = torch.Generator().manual_seed(0)
    a, t = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen)
    sim = AudioTextRetriever.similarity(a, t)
    assert sim.shape == (3, 5)
    expected = torch.nn.functional.cosine_similarity(a[:, None, :], t[None, :, :], dim=-1)
    torch.testing.assert_close(sim, expected)
    torch.testing.assert_close(AudioTextRetriever.similarity(a, 2 * a).diagonal(), torch.ones(3))


def test_mltm_training_step_reaches_both_encoders() -> None:
    tok = _tokenizer()
    model = _model(len(tok)).train()
    ids, mask = _encode(tok, CAPTIONS)
    audio, text = model(torch.randn(4, 16_000) * 0.1, ids, mask)
    loss = MLTMLoss(16, MLTMOptions(max_iter=50))(audio, text)
    loss.backward()
    stem_block = model.audio_encoder.downsample_layers[0]
    assert isinstance(stem_block, torch.nn.Sequential)
    stem = stem_block[0]
    assert isinstance(stem, torch.nn.Conv2d) and stem.weight.grad is not None
    word = model.text_encoder.get_input_embeddings()
    assert isinstance(word, torch.nn.Embedding) and word.weight.grad is not None
    assert float(word.weight.grad.abs().sum()) > 0.0


def test_frames_mean_source() -> None:
    tok = _tokenizer()
    model = _model(len(tok), audio_source="frames_mean")
    wave = torch.randn(1, 16_000)
    with torch.no_grad():
        _, joint = model.embed_audio(wave)
        frames = model.audio_encoder(wave).frames
        expected = torch.nn.functional.normalize(model.audio_proj(frames.mean(dim=2)), dim=-1)
    torch.testing.assert_close(joint, expected)


def test_config_roundtrip_and_unknown_keys() -> None:
    config = _config(100, text_pooling="mean")
    data = json.loads(json.dumps(config.to_dict()))
    assert RetrieverConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="retriever.joint: unknown key"):
        RetrieverConfig.from_dict({"joint": 3})
    with pytest.raises(ConfigError, match=r"retriever.audio.mel.nmels: unknown key"):
        RetrieverConfig.from_dict({"audio": {"mel": {"nmels": 3}}})
    with pytest.raises(ConfigError, match="text_pooling"):
        RetrieverConfig(text_pooling="max")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match="retriever.text_config.hiden_size: not a BertConfig field"
    ):
        AudioTextRetriever(_config(100, text_config={"hiden_size": 8}))
    with pytest.raises(ConfigError, match="unknown transformers model type"):
        AudioTextRetriever(_config(100, text_model_type="no-such-model"))


def test_roberta_text_encoder() -> None:
    cfg = _text_config(120) | {"pad_token_id": 1}
    model = _model(120, text_model_type="roberta", text_config=cfg, text_pooling="mean")
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 8, 9, 10, 2]])
    with torch.no_grad():
        out = model.embed_text(ids, (ids != 1).long())
    assert out.shape == (2, 16)


def test_text_encoder_from_local_directory(tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = AutoConfig.for_model("bert", **_text_config(90))
    pretrained = AutoModel.from_config(config)  # type: ignore[no-untyped-call]
    pretrained.save_pretrained(tmp_path / "bert")
    model = AudioTextRetriever(_config(90, text_config={}), text_encoder_dir=tmp_path / "bert")
    loaded_words = model.text_encoder.get_input_embeddings()
    assert isinstance(loaded_words, torch.nn.Embedding)
    torch.testing.assert_close(loaded_words.weight, pretrained.get_input_embeddings().weight)
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        AudioTextRetriever(
            _config(90, text_model_type="roberta"), text_encoder_dir=tmp_path / "bert"
        )
    with pytest.raises(WeightsError, match="no config.json"):
        AudioTextRetriever(_config(90), text_encoder_dir=tmp_path / "absent")


def test_load_audio_encoder_published_format() -> None:
    torch.manual_seed(5)
    source = CNext(CNEXT_TOY)
    model = _model(50)
    model.load_audio_encoder({"model": source.state_dict()})
    torch.testing.assert_close(model.audio_encoder.norm.weight, source.norm.weight)
    wrong = dict(source.state_dict())
    del wrong["bn0.weight"]
    with pytest.raises(WeightsError, match=r"missing keys \(1\): bn0.weight"):
        model.load_audio_encoder(wrong)
