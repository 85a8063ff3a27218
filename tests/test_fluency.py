"""Fluency filter: published checkpoint format, probabilities, thresholds, preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from streamcap.errors import ConfigError, WeightsError
from streamcap.models.decoding.fluency import (
    ERROR_CLASSES,
    FenseClassifier,
    FluencyFilter,
    FluencyOptions,
    bert_config_for,
    load_fense_checkpoint,
    preprocess,
)

torch.set_num_threads(1)

from wordpiece import CAPTIONS, wordpiece_tokenizer


def _tokenizer() -> PreTrainedTokenizerFast:
    return wordpiece_tokenizer()


def _write_tiny_checkpoint(path: Path, *, position_ids: bool = True) -> FenseClassifier:
    """A random ``prajjwal1/bert-tiny`` detector, saved in the published dict format."""
    torch.manual_seed(0)
    model = FenseClassifier(bert_config_for("prajjwal1/bert-tiny"), num_classes=6)
    state = dict(model.state_dict())
    if position_ids:  # older transformers stored this buffer; the loader must drop it
        state["encoder.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model_type": "prajjwal1/bert-tiny", "num_classes": 6, "state_dict": state}, path)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FenseClassifier]:
    path = tmp_path_factory.mktemp("fense") / "echecker_tiny.ckpt"
    return path, _write_tiny_checkpoint(path)


def test_preprocess() -> None:
    assert preprocess("A Dog's bark, then: RAIN!") == "a dogs bark then rain"
    assert preprocess("snake_case 42  spaces\tkept") == "snake_case 42  spaces\tkept"
    assert preprocess("café — naïve") == "café  naïve"


def test_published_sizes() -> None:
    base = bert_config_for("bert-base-uncased")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)
    assert (base.intermediate_size, base.vocab_size) == (3072, 30522)
    tiny = bert_config_for("prajjwal1/bert-tiny")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.intermediate_size) == (128, 2, 512)
    with pytest.raises(WeightsError, match="bert-large"):
        bert_config_for("bert-large-uncased")


def test_load_and_probabilities(checkpoint: tuple[Path, FenseClassifier]) -> None:
    path, original = checkpoint
    tok = _tokenizer()
    filt = load_fense_checkpoint(path, tok)
    texts = ["A dog barks!", "rain rain rain falls", "", "birds"]
    probs = filt.class_probs(texts)
    assert probs.shape == (4, len(ERROR_CLASSES)) and probs.dtype == np.float32
    assert np.all((probs > 0.0) & (probs < 1.0))
    errors = filt.error_probs(texts)
    np.testing.assert_array_equal(errors, probs[:, -1])
    # same numbers as the original module run on the same preprocessing
    batch = tok(
        [preprocess(t) for t in texts],
        padding="max_length",
        max_length=64,
        truncation=True,
        return_tensors="pt",
    )
    assert batch["input_ids"].shape == (4, 64)
    with torch.no_grad():
        logits = original(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    np.testing.assert_allclose(errors, torch.sigmoid(logits[:, -1]).numpy(), rtol=1e-5, atol=1e-6)
    # preprocessing is applied: punctuation and case do not change the score
    np.testing.assert_allclose(
        filt.error_probs(["A DOG, barks!!"]), filt.error_probs(["a dog barks"])
    )
    # batching does not change results
    small = FluencyFilter(filt.model, tok, FluencyOptions(batch_size=3))
    np.testing.assert_allclose(small.error_probs(texts), errors, rtol=1e-5, atol=1e-6)
    assert filt.error_probs([]).shape == (0,)


def test_threshold_logic(checkpoint: tuple[Path, FenseClassifier]) -> None:
    path, _ = checkpoint
    tok = _tokenizer()
    texts = ["a dog barks", "rain falls on a roof", "a man speaks"]
    probs = load_fense_checkpoint(path, tok).error_probs(texts)
    cut = float(np.median(probs))
    filt = load_fense_checkpoint(path, tok, options=FluencyOptions(threshold=cut))
    assert filt.flags(texts) == [bool(p > cut) for p in probs]
    assert sum(filt.flags(texts)) == 1  # strictly greater: the median itself is not flagged
    assert (
        load_fense_checkpoint(path, tok, options=FluencyOptions(threshold=1.0)).flags(texts)
        == [False] * 3
    )
    assert (
        load_fense_checkpoint(path, tok, options=FluencyOptions(threshold=0.0)).flags(texts)
        == [True] * 3
    )
    with torch.no_grad():
        filt.model.clf.bias[-1] = 50.0  # certain "error"
    assert FluencyFilter(filt.model, tok).flags(["a dog barks"]) == [True]
    with torch.no_grad():
        filt.model.clf.bias[-1] = -50.0
    assert FluencyFilter(filt.model, tok).flags(["a dog barks"]) == [False]


def test_tokenizer_from_local_directory(
    checkpoint: tuple[Path, FenseClassifier], tmp_path: Path
) -> None:
    path, _ = checkpoint
    tok = _tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    from_dir = load_fense_checkpoint(path, tmp_path / "tok")
    np.testing.assert_allclose(
        from_dir.error_probs(CAPTIONS), load_fense_checkpoint(path, tok).error_probs(CAPTIONS)
    )
    with pytest.raises(WeightsError, match="tokenizer directory not found"):
        load_fense_checkpoint(path, tmp_path / "absent")


def test_missing_key_is_named(tmp_path: Path) -> None:
    model = FenseClassifier(bert_config_for("prajjwal1/bert-tiny"))
    state = dict(model.state_dict())
    del state["encoder.encoder.layer.1.output.dense.weight"]
    state["clf.extra"] = torch.zeros(1)
    state["clf.weight"] = torch.zeros(5, 128)
    path = tmp_path / "broken.ckpt"
    torch.save({"model_type": "prajjwal1/bert-tiny", "num_classes": 6, "state_dict": state}, path)
    with pytest.raises(WeightsError) as info:
        load_fense_checkpoint(path, _tokenizer())
    message = str(info.value)
    assert message.startswith(f"{path}: fluency checkpoint does not match prajjwal1/bert-tiny: ")
    assert "missing keys (1): encoder.encoder.layer.1.output.dense.weight;" in message
    assert "unexpected keys (1): clf.extra;" in message
    assert "clf.weight: expected (6, 128), got (5, 128)" in message


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    tok = _tokenizer()
    with pytest.raises(WeightsError, match="absent.ckpt: no such file"):
        load_fense_checkpoint(tmp_path / "absent.ckpt", tok)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"hello, not a weight file\n")
    with pytest.raises(WeightsError, match="junk.ckpt: not a readable torch checkpoint"):
        load_fense_checkpoint(junk, tok)
    path = tmp_path / "fields.ckpt"
    torch.save({"model_type": "prajjwal1/bert-tiny", "state_dict": {}}, path)
    with pytest.raises(WeightsError, match="num_classes"):
        load_fense_checkpoint(path, tok)
    torch.save(
        {
            "model_type": "roberta-base",
            "num_classes": 6,
            "state_dict": {"encoder.embeddings.word_embeddings.weight": torch.zeros(10, 4)},
        },
        path,
    )
    with pytest.raises(WeightsError, match="roberta-base"):
        load_fense_checkpoint(path, tok)


def test_options_validation() -> None:
    with pytest.raises(ConfigError, match="fluency.threshold"):
        FluencyOptions(threshold=1.5)
    with pytest.raises(ConfigError, match="fluency.batch_size"):
        FluencyOptions(batch_size=0)
