"""Retriever training with m-LTM: the loss falls, resume is exact, a short run beats chance."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from torch_helpers import deterministic_torch

from streamcap.errors import ConfigError
from streamcap.models.enclap.tokenizer import build_caption_tokenizer
from streamcap.models.retrieval.cnext import CNEXT_TOY
from streamcap.models.retrieval.retriever import AudioTextRetriever, RetrieverConfig
from streamcap.training.trainers.loop import LoopConfig
from streamcap.training.trainers.mltm import MLTMLoss, MLTMOptions
from streamcap.training.trainers.optim import OptimConfig
from streamcap.training.trainers.retriever import (
    RetrievalExample,
    RetrieverTrainConfig,
    WaveLoader,
    retriever_trainer,
    tokenize,
    train_retriever,
)

WORDS = ("a dog barks", "rain falls", "a bell rings", "wind blows")


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    with deterministic_torch():
        yield


def _retriever(vocab: int, seed: int = 0) -> AudioTextRetriever:
    torch.manual_seed(seed)
    config = RetrieverConfig(audio=CNEXT_TOY, text_config={
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": vocab},
        joint_dim=16, audio_hidden=32, text_hidden=32, text_dropout=0.1)
    return AudioTextRetriever(config)


def _tokenizer(lines: list[str]) -> Any:
    return build_caption_tokenizer(300, corpus=lines * 5)


def _embedded(n: int) -> list[RetrievalExample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        kind = i % len(WORDS)
        emb = rng.normal(0, 0.2, CNEXT_TOY.embed_dim).astype(np.float32)
        emb[kind * 4:(kind + 1) * 4] += 2.0
        out.append(RetrievalExample(clip_id=f"c{i}", captions=(WORDS[kind], f"{WORDS[kind]} now"),
                                    clip_embedding=emb))
    return out


def _config(tmp: Path | None, **loop: object) -> RetrieverTrainConfig:
    base = LoopConfig(epochs=4, batch_size=8, seed=3, drop_last=True, min_batch=2,
                      checkpoint_dir=tmp, progress=False)
    return RetrieverTrainConfig(audio_mode="embedding",
                                optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
                                loop=replace(base, **loop))  # type: ignore[arg-type]


def test_loss_falls_with_frozen_audio_encoder() -> None:
    tok = _tokenizer(list(WORDS))
    model = _retriever(len(tok))
    frozen = {k: v.clone() for k, v in model.audio_encoder.state_dict().items()}
    history, loss = train_retriever(model, tok, _embedded(32), _config(None, epochs=6))
    assert history.epoch_losses[-1] < history.epoch_losses[0] - 0.3
    assert history.epoch_losses[-1] >= np.log(8) - 1e-4  # m-LTM's floor is log B
    for key, value in model.audio_encoder.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert loss.weights.shape == (16,)


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    tok = _tokenizer(list(WORDS))
    examples = _embedded(20)  # 2 full batches of 8 per epoch
    straight = _retriever(len(tok))
    t1 = retriever_trainer(straight, _loss(), tok, examples, _config(tmp_path / "a", max_steps=6))
    t1.run()
    part = _retriever(len(tok))
    t2 = retriever_trainer(part, _loss(), tok, examples, _config(tmp_path / "b", max_steps=3))
    t2.run()
    resumed = _retriever(len(tok), seed=5)
    t3 = retriever_trainer(resumed, _loss(), tok, examples, _config(tmp_path / "b", max_steps=6))
    t3.resume(tmp_path / "b")
    t3.run()
    a, b = t1.model_state(), t3.model_state()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _loss() -> MLTMLoss:
    torch.manual_seed(0)
    return MLTMLoss(16, MLTMOptions(max_iter=200))


def test_wave_loader_crops_pads_and_caches(tmp_path: Path) -> None:
    path = tmp_path / "x.wav"
    sf.write(str(path), np.full(16000, 0.25, dtype=np.float32), 16000)
    loader = WaveLoader(32000, 2.0)
    wave = loader.load(path)
    assert wave.shape == (64000,)
    assert abs(float(wave[1000]) - 0.25) < 1e-2 and float(np.abs(wave[40000:]).max()) == 0.0
    path.unlink()
    assert np.array_equal(loader.load(path), wave)  # from the cache


def test_config_and_examples_are_checked() -> None:
    with pytest.raises(ConfigError, match="min_batch"):
        RetrieverTrainConfig(loop=LoopConfig(min_batch=1))
    tok = _tokenizer(list(WORDS))
    missing = [RetrievalExample(clip_id="z", captions=("a dog",)) for _ in range(8)]
    with pytest.raises(ConfigError, match="clip z: no clip embedding"):
        retriever_trainer(_retriever(len(tok)), _loss(), tok, missing, _config(None))
    with pytest.raises(ConfigError, match="make no batch"):
        retriever_trainer(_retriever(len(tok)), _loss(), tok, _embedded(4), _config(None))


def test_short_training_beats_chance_on_held_out_clips() -> None:
    """Held-out clips of known classes: text-to-audio R@1 well above chance (1 / N)."""
    tok = _tokenizer(list(WORDS) + [f"{w} now" for w in WORDS])
    model = _retriever(len(tok))
    examples = _embedded(48)
    train, test = examples[:40], examples[40:]
    train_retriever(model, tok, train, _config(None, epochs=10))
    model.eval()
    with torch.inference_mode():
        clip = torch.from_numpy(np.stack([e.clip_embedding for e in test
                                          if e.clip_embedding is not None]))
        audio = torch.nn.functional.normalize(model.audio_proj(clip), dim=-1)
        ids, mask = tokenize(tok, [e.captions[0] for e in test], 64, torch.device("cpu"))
        text = model.embed_text(ids, mask)
    # Texts of one class are identical, so each text has 2 right clips among 8.
    sim = (audio @ text.T).numpy()
    relevant = [[test[a].captions[0] == test[t].captions[0] for t in range(len(test))]
                for a in range(len(test))]
    from streamcap.training.evaluation.metrics import retrieval_metrics

    scores = retrieval_metrics(sim.T, np.asarray(relevant).T)
    assert scores.r1 > 2 * (2 / len(test)), scores


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: minutes of one CPU thread under a parallel run
def test_training_on_corpus_scenes_beats_chance_on_held_out_scenes(tmp_path: Path) -> None:
    """End to end on synthetic-corpus waveforms (CNext trained too), about a minute of CPU.

    150 scenes of 4 s (1-3 events each), 120 for training; text-to-audio retrieval over the
    30 unseen scenes with all 5 captions each as queries: R@1 and the mean rank must beat
    chance (1/30 and 15.5).
    """
    import soundfile as sf

    from streamcap.training.data.corpus import CorpusOptions, make_clip
    from streamcap.training.evaluation.metrics import audio_text_retrieval

    options = CorpusOptions(clips=1, seed=11, clip_s=4.0, sample_rate_hz=32000)
    train: list[RetrievalExample] = []
    test: list[RetrievalExample] = []
    for index in range(150):
        scene, captions, audio = make_clip(options, index)
        path = tmp_path / f"{scene.clip_id}.wav"
        sf.write(str(path), audio, 32000)
        ex = RetrievalExample(clip_id=scene.clip_id, captions=captions, audio=path)
        (test if index % 5 == 0 else train).append(ex)
    tok = build_caption_tokenizer(400, corpus=[c for e in train for c in e.captions])
    model = _retriever(len(tok))
    config = RetrieverTrainConfig(
        audio_mode="wave", clip_s=4.0,
        optim=OptimConfig(lr=2e-3, warmup_steps=10, schedule="constant"),
        loop=LoopConfig(epochs=40, batch_size=16, seed=0, drop_last=True, min_batch=2,
                        progress=False))
    history, _ = train_retriever(model, tok, train, config)
    assert history.epoch_losses[-1] < history.epoch_losses[0]
    loader = WaveLoader(32000, 4.0)
    texts: list[str] = []
    owner: list[int] = []
    for k, e in enumerate(test):
        texts += list(e.captions)
        owner += [k] * len(e.captions)
    with torch.inference_mode():
        audio_joint = model.embed_audio(loader.batch([e.audio for e in test if e.audio]))[1]
        ids, mask = tokenize(tok, texts, 64, torch.device("cpu"))
        text = model.embed_text(ids, mask)
    scores = audio_text_retrieval((audio_joint @ text.T).numpy(), owner)["text_to_audio"]
    n = len(test)
    assert scores.r1 > 1.5 / n, scores
    assert scores.mean_rank < (n + 1) / 2, scores
