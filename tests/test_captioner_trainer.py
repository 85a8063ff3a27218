"""Captioner training: the loss falls, MCM is on only in pretraining, resume is exact."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch_helpers import deterministic_torch

from streamcap.errors import ConfigError, ModelError, WeightsError
from streamcap.models.enclap.model import EnclapModel
from streamcap.models.enclap.model import preset as enclap_preset
from streamcap.models.enclap.tokenizer import build_caption_tokenizer
from streamcap.training.trainers.captioner import (
    CaptionerTrainConfig,
    CaptionExample,
    caption_examples,
    captioner_trainer,
    collate,
    train_captioner,
)
from streamcap.training.trainers.loop import LoopConfig, latest_checkpoint, load_checkpoint
from streamcap.training.trainers.optim import OptimConfig

WORDS = ("a dog barks", "rain falls", "a bell rings", "wind blows")


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    with deterministic_torch():
        yield


def _tokenizer() -> Any:
    corpus = [f"{w} loudly" for w in WORDS] * 20 + [f"{w} softly" for w in WORDS] * 20
    return build_caption_tokenizer(300, corpus=corpus)


def _model(vocab: int, seed: int = 0) -> EnclapModel:
    torch.manual_seed(seed)
    config = enclap_preset("tiny", vocab_size=vocab, d_model=32, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_frames=64, seq_embed_dim=8)
    return EnclapModel(config)


class _Item:
    def __init__(self, i: int, rng: np.random.Generator) -> None:
        kind = i % len(WORDS)
        self.clip_id = f"clip-{i}"
        t = 20 + (i % 3) * 5
        self.codes = rng.integers(kind * 200, kind * 200 + 200, size=(4, t)).astype(np.int16)
        emb = rng.normal(0, 0.1, 8).astype(np.float32)
        emb[kind] += 1.0
        self.clip_embedding = emb
        self.captions = (f"{WORDS[kind]} loudly", f"{WORDS[kind]} softly", "  ")


def _items(n: int) -> list[_Item]:
    rng = np.random.default_rng(0)
    return [_Item(i, rng) for i in range(n)]


def _config(tmp: Path | None, **loop: object) -> CaptionerTrainConfig:
    base = LoopConfig(epochs=3, batch_size=4, seed=7, checkpoint_dir=tmp, progress=False)
    return CaptionerTrainConfig(stage="pretrain", captions="one",
                                optim=OptimConfig(lr=3e-3, warmup_steps=2),
                                loop=replace(base, **loop))  # type: ignore[arg-type]


def test_examples_skip_empty_captions_and_group_per_clip() -> None:
    items = _items(3)
    flat = caption_examples(items)
    assert len(flat) == 6 and all(len(e.captions) == 1 for e in flat)
    grouped = caption_examples(items, per_clip=True)
    assert [len(e.captions) for e in grouped] == [2, 2, 2]


def test_collate_pads_codes_and_labels() -> None:
    items = _items(2)
    examples = [CaptionExample(clip_id=i.clip_id, codes=i.codes, clip_embedding=i.clip_embedding,
                               captions=i.captions[:1]) for i in items]
    batch = collate(examples, [[0, 5, 2], [0, 6, 7, 2]], pad_id=1024)
    assert batch.codes.shape == (2, 4, 25)
    assert bool((batch.codes[0, :, 20:] == 1024).all())
    assert batch.frame_mask.sum(dim=1).tolist() == [20, 25]
    assert batch.labels.tolist() == [[0, 5, 2, -100], [0, 6, 7, 2]]


def test_loss_falls() -> None:
    tok = _tokenizer()
    model = _model(len(tok))
    examples = caption_examples(_items(16), per_clip=True)
    config = replace(_config(None), loop=LoopConfig(epochs=15, batch_size=8, seed=1,
                                                   progress=False))
    history = train_captioner(model, tok, examples, config)
    assert len(history.step_losses) == 30
    assert history.epoch_losses[-1] < history.epoch_losses[0]
    caption = [t["caption_loss"] for t in history.epoch_terms]
    assert caption[-1] < 0.8 * caption[0]  # label smoothing 0.2 keeps a high floor
    assert all(t["mcm_loss"] > 0 for t in history.epoch_terms)
    assert not model.training


def test_finetune_has_no_mcm_term() -> None:
    tok = _tokenizer()
    model = _model(len(tok))
    config = replace(_config(None, epochs=1), stage="finetune")
    history = train_captioner(model, tok, caption_examples(_items(8), per_clip=True), config)
    assert all(t["mcm_loss"] == 0.0 for t in history.epoch_terms)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    tok = _tokenizer()
    examples = caption_examples(_items(10), per_clip=True)  # 3 batches per epoch: 4, 4, 2
    total = 8  # ends mid-epoch 3; the interruption at 4 is mid-epoch 2

    straight = _model(len(tok))
    t1 = captioner_trainer(straight, tok, examples, _config(tmp_path / "a", max_steps=total))
    h1 = t1.run()

    first = _model(len(tok))
    t2 = captioner_trainer(first, tok, examples, _config(tmp_path / "b", max_steps=total // 2))
    h2 = t2.run()
    assert h2.stopped_early and t2.position.global_step == total // 2
    checkpoint = latest_checkpoint(tmp_path / "b")
    assert checkpoint is not None and checkpoint.name == "step-0000004.pt"

    torch.manual_seed(12345)  # a different global state: the checkpoint must restore it
    np.random.seed(3)
    resumed = _model(len(tok), seed=99)  # different initial weights: replaced by the checkpoint
    t3 = captioner_trainer(resumed, tok, examples, _config(tmp_path / "b", max_steps=total))
    t3.resume(tmp_path / "b")
    h3 = t3.run()

    assert h3.step_losses == h1.step_losses
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    s1, s3 = t1.optimizer.state_dict()["state"], t3.optimizer.state_dict()["state"]
    for key in s1:
        assert torch.equal(s1[key]["exp_avg"], s3[key]["exp_avg"])
        assert torch.equal(s1[key]["exp_avg_sq"], s3[key]["exp_avg_sq"])
    assert t1.scheduler.state_dict()["last_epoch"] == t3.scheduler.state_dict()["last_epoch"]


def test_resume_refuses_another_kind_of_checkpoint(tmp_path: Path) -> None:
    tok = _tokenizer()
    examples = caption_examples(_items(4), per_clip=True)
    trainer = captioner_trainer(_model(len(tok)), tok, examples, _config(tmp_path, epochs=1))
    trainer.run()
    trainer.kind = "retriever"
    with pytest.raises(ModelError, match="captioner checkpoint"):
        trainer.resume(tmp_path)


def test_bad_checkpoint_files_are_named_and_never_run(tmp_path: Path) -> None:
    import os

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    text = tmp_path / "text.pt"
    text.write_bytes(b"hello, not a checkpoint\n")
    with pytest.raises(WeightsError, match=f"^{text}: not a readable torch checkpoint"):
        load_checkpoint(text)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "streamcap-train", "x": RunsCode()}, evil)
    with pytest.raises(WeightsError, match=f"^{evil}: refused: the pickle holds Python objects"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_examples_that_do_not_fit_are_listed() -> None:
    tok = _tokenizer()
    bad = CaptionExample(clip_id="x", codes=np.zeros((3, 10), dtype=np.int16),
                         clip_embedding=np.zeros(8, dtype=np.float32), captions=("a dog",))
    with pytest.raises(ConfigError, match="clip x: codes of shape"):
        captioner_trainer(_model(len(tok)), tok, [bad], _config(None))
    with pytest.raises(ConfigError, match="no examples"):
        captioner_trainer(_model(len(tok)), tok, [], _config(None))
