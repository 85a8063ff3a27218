"""The trigger path's model use: cached log-mel frames, phrase checks, example files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from wordpiece import wordpiece_tokenizer

from streamcap.audio.windowing import Windower
from streamcap.errors import ConfigError
from streamcap.messages import Window, make_block
from streamcap.models.captioner import TEXT_MAX_LENGTH, build_captioner
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.retrieval.melspec import LogMel, MelConfig
from streamcap.triggers.fastpath import (
    MelCache,
    RetrieverTriggerModel,
    phrase_problem,
    read_example,
)

RATE = 32000


def windows(hop_s: float, seconds: int, *, epoch: int = 0, seed: int = 0) -> list[Window]:
    windower = Windower("s", 5.0, hop_s, (RATE,), run_id="run")
    rng = np.random.default_rng(seed)
    out: list[Window] = []
    for i in range(seconds * 2):
        block = make_block(source_id="s", start_sample=i * RATE // 2, sample_rate_hz=RATE,
                           samples=0.1 * rng.standard_normal(RATE // 2), captured_at=0.0,
                           epoch=epoch)
        out += windower.feed(block).windows
    return out


def full(frontend: LogMel, window: Window) -> torch.Tensor:
    out: torch.Tensor = frontend(torch.from_numpy(np.array(window.samples(RATE)))[None])[0, 0]
    return out


def test_cached_frames_equal_the_front_end_on_each_window_and_are_computed_once() -> None:
    frontend = LogMel(MelConfig(n_mels=64))
    cache = MelCache(frontend)
    cut = windows(1.0, 12)
    assert len(cut) == 8
    for window in cut:
        torch.testing.assert_close(cache.logmel(window, torch.device("cpu")), full(frontend, window),
                                   rtol=0, atol=1e-4)
    per_window = 501
    assert cache.computed < len(cut) * per_window / 3  # ~110 new frames a window after the first


def test_a_new_epoch_or_a_hop_off_the_frame_grid_still_gives_the_front_end_output() -> None:
    frontend = LogMel(MelConfig(n_mels=64))
    cache = MelCache(frontend)
    for window in windows(1.0, 7) + windows(1.0, 7, epoch=1, seed=1) + windows(0.255, 6):
        torch.testing.assert_close(cache.logmel(window, torch.device("cpu")), full(frontend, window),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("cfg", [MelConfig(n_mels=64, hop_length=160),
                                 MelConfig(n_mels=64, n_fft=2048, win_length=2048)],
                         ids=["hop160", "nfft2048"])
def test_cached_frames_equal_the_front_end_for_other_mel_settings(cfg: MelConfig) -> None:
    """More edge frames than two (n_fft // 2 > 2 * hop): each still as the front end makes it."""
    frontend = LogMel(cfg)
    cache = MelCache(frontend)
    cut = windows(1.0, 12)
    for window in cut:
        torch.testing.assert_close(cache.logmel(window, torch.device("cpu")), full(frontend, window),
                                   rtol=0, atol=1e-4)
    assert cache.computed < len(cut) * cfg.n_frames(5 * RATE) / 2  # still incremental


def test_a_phrase_of_unknown_words_only_is_named_as_such() -> None:
    tokenizer = wordpiece_tokenizer()
    assert phrase_problem(tokenizer, "a dog barks") is None
    assert "unknown" in (phrase_problem(tokenizer, "ξψζ") or "")
    assert "nothing is left" in (phrase_problem(tokenizer, "\u0301") or "")


def test_the_phrase_check_leaves_the_shared_tokenizers_settings_as_the_captioner_set_them(
        ) -> None:
    """The event loop checks phrasings while the caption and trigger threads encode texts
    with the same tokenizer: changing its padding or truncation there would race them."""
    tokenizer = wordpiece_tokenizer()
    tokenizer(["a dog barks", "rain"], padding=True, truncation=True,
              max_length=TEXT_MAX_LENGTH)  # as Captioner.text_embeddings does
    backend = tokenizer.backend_tokenizer
    before = (backend.truncation, backend.padding)
    assert before[0] is not None and before[1] is not None
    assert phrase_problem(tokenizer, "a dog barks loudly") is None
    assert (backend.truncation, backend.padding) == before


def test_examples_are_read_resampled_and_bad_ones_named(tmp_path: Path) -> None:
    good = tmp_path / "bark.wav"
    sf.write(good, np.stack([np.ones(16000), np.zeros(16000)], axis=1) * 0.5, 16000)
    audio = read_example(good, "triggers.dog.examples[0]", RATE)
    assert audio.dtype == np.float32 and abs(audio.size - RATE) <= 2
    assert np.allclose(audio[1000:-1000], 0.25, atol=0.02)  # channels averaged
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "text.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    for name, says in (("dir", "a directory"), ("fifo", "FIFO"), ("text.wav", "not an audio"),
                       ("empty.wav", "no audio"), ("missing.wav", "cannot open")):
        with pytest.raises(ConfigError, match=says) as err:
            read_example(tmp_path / name, "triggers.dog.examples[3]", RATE)
        assert str(err.value).startswith("triggers.dog.examples[3]: ")


def test_window_embeddings_from_cached_frames_equal_the_retrievers_own() -> None:
    captioner = build_captioner("demo", DecodingOptions(), device=torch.device("cpu"),
                                dtype=torch.float32)
    model = RetrieverTriggerModel(captioner)
    retriever = captioner.components.retriever
    assert retriever is not None
    cut = windows(1.0, 8)
    got = np.concatenate([model.embed_windows(cut[:2]), model.embed_windows(cut[2:])])
    with torch.inference_mode():
        _, joint = retriever.embed_audio(torch.from_numpy(np.stack([w.samples(RATE)
                                                                    for w in cut])))
    np.testing.assert_allclose(got, joint.numpy(), atol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    texts = model.embed_texts(["a siren wails", "rain falls"])
    assert texts.shape == (2, got.shape[1]) and model.embed_texts([]).shape == (0, got.shape[1])
