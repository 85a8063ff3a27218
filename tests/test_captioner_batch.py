"""Captioning windows of several sources as one batch gives each window its solo result.

The demo bundle (trained, no fluency filter) captions held-out scenes of the bench's
independent scene list; the tiny preset (random weights, with a fluency filter) covers
that filter. A fixed decoding seed and one torch thread make runs repeatable. Each
comparison starts from empty codec caches, so that solo and batched runs see the same
codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from bench.scenes.generate import SAMPLE_RATE_HZ, render, scene_list
from streamcap.audio.windowing import Windower
from streamcap.messages import CaptionResult, Window, make_block
from streamcap.models.captioner import Captioner, build_captioner
from streamcap.models.decoding.options import DecodingOptions

torch.set_num_threads(1)

SCENES = ("siren-snr20-00", "dog-snr10-00", "rain-snr20-00", "silence-click-00")


def captioner_of(spec: str, mode: str = "sample") -> Captioner:
    decoding = DecodingOptions(mode=mode, n_candidates=8, max_new_tokens=12, num_beams=2,
                               beam_max_length=12, seed=7, explicit=frozenset({"mode"}))
    return build_captioner(spec, decoding, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def demo() -> Captioner:
    return captioner_of("demo")


@functools.cache
def scene_audio(name: str) -> np.ndarray:
    """A held-out scene, then a second of silence (the windower's resamplers flush its end)."""
    scene = {s.scene_id: s for s in scene_list(per_cell=1)}[name]
    return np.concatenate([render(scene).astype(np.float32), np.zeros(SAMPLE_RATE_HZ, np.float32)])


def scene_windows(captioner: Captioner, names: Sequence[str] = SCENES,
                  window_s: Sequence[float] | None = None) -> list[Window]:
    """The first window of each named scene, each scene its own source."""
    windows = []
    for i, name in enumerate(names):
        block = make_block(source_id=name, start_sample=0, sample_rate_hz=SAMPLE_RATE_HZ,
                           samples=scene_audio(name), captured_at=0.0)
        size = 10.0 if window_s is None else window_s[i]
        windows.append(Windower(name, size, 5.0, captioner.sample_rates_hz).feed(block).windows[0])
    return windows


Decoded = list[list[tuple[int, ...]]]


def recording(monkeypatch: pytest.MonkeyPatch, captioner: Captioner) -> list[Decoded]:
    """Record the token ids of every decoding pass, one list per window."""
    passes: list[Decoded] = []
    decode_batch = captioner.task.decode_batch

    def spy(*args: Any, **kwargs: Any) -> Any:
        decoded = decode_batch(*args, **kwargs)
        passes.append([[c.token_ids for c in window] for window in decoded])
        return decoded

    monkeypatch.setattr(captioner.task, "decode_batch", spy)
    return passes


def fresh(captioner: Captioner, run: Callable[[], list[CaptionResult]]) -> list[CaptionResult]:
    captioner._stream.reset()  # every window's codes from a whole-window encode
    return run()


def alone(captioner: Captioner, windows: Sequence[Window]) -> list[CaptionResult]:
    return [fresh(captioner, lambda w=w: [captioner.caption(w)])[0] for w in windows]


def assert_same(got: CaptionResult, want: CaptionResult) -> None:
    a, b = got.caption, want.caption
    assert (a.window_id, a.text, a.abstained, a.flagged) == (b.window_id, b.text, b.abstained,
                                                              b.flagged)
    assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
    assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates],
                                                            abs=1e-5)
    assert a.score == pytest.approx(b.score, abs=1e-5)
    assert (a.confidence is None) == (b.confidence is None)
    if a.confidence is not None:
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)
    assert got.embedding is not None and want.embedding is not None
    np.testing.assert_allclose(got.embedding.vector, want.embedding.vector, atol=1e-5)


def test_a_batch_gives_every_window_its_solo_caption_and_tokens(
        monkeypatch: pytest.MonkeyPatch, demo: Captioner) -> None:
    windows = scene_windows(demo)
    passes = recording(monkeypatch, demo)
    solo = alone(demo, windows)
    solo_tokens = [p[0] for p in passes]
    batch = fresh(demo, lambda: demo.caption_batch(windows))
    assert passes[-1] == solo_tokens  # one pass; each window's rows as when alone
    for got, want in zip(batch, solo, strict=True):
        assert_same(got, want)
        assert (got.batch_size, want.batch_size) == (4, 1)
        assert got.stage_seconds == batch[0].stage_seconds  # the batch's seconds
    assert len({r.caption.text for r in batch}) > 1  # different audio, different captions
    assert list(batch[0].stage_seconds) == ["codec", "retriever_audio", "encoder", "sampling",
                                            "text_encoder", "fluency", "abstention"]


def test_the_order_of_a_batch_does_not_change_a_windows_caption(demo: Captioner) -> None:
    windows = scene_windows(demo)
    forward = fresh(demo, lambda: demo.caption_batch(windows))
    backward = fresh(demo, lambda: demo.caption_batch(windows[::-1]))[::-1]
    for got, want in zip(backward, forward, strict=True):
        assert_same(got, want)


def test_windows_of_different_lengths_batch_together(
        monkeypatch: pytest.MonkeyPatch, demo: Captioner) -> None:
    windows = scene_windows(demo, SCENES[:3], window_s=[10.0, 7.0, 10.0])
    assert len({w.end_s - w.start_s for w in windows}) == 2
    passes = recording(monkeypatch, demo)
    solo = alone(demo, windows)
    batch = fresh(demo, lambda: demo.caption_batch(windows))
    assert passes[-1] == [p[0] for p in passes[:3]]
    for got, want in zip(batch, solo, strict=True):
        assert_same(got, want)


def test_two_windows_of_one_source_are_refused(demo: Captioner) -> None:
    [window] = scene_windows(demo, SCENES[:1])
    with pytest.raises(ValueError, match="two windows of one source"):
        demo.caption_batch([window, window])
    assert demo.caption_batch([]) == []


def test_a_seeded_window_does_not_depend_on_what_was_captioned_before(demo: Captioner) -> None:
    first, *others = scene_windows(demo)
    before = fresh(demo, lambda: [demo.caption(first)])[0]
    for window in others:
        demo.caption(window)
    demo.caption_batch(others)
    after = fresh(demo, lambda: [demo.caption(first)])[0]
    assert after.caption.text == before.caption.text
    assert [c.text for c in after.caption.candidates] == [c.text for c in before.caption.candidates]
    assert after.caption.score == before.caption.score


def test_beam_search_batches_window_by_window() -> None:
    captioner = captioner_of("demo", mode="beam")
    windows = scene_windows(captioner, SCENES[:3])
    solo = alone(captioner, windows)
    batch = fresh(captioner, lambda: captioner.caption_batch(windows))
    for got, want in zip(batch, solo, strict=True):
        assert_same(got, want)
    assert "beam" in batch[0].stage_seconds


def test_the_fluency_filter_scores_every_windows_texts_in_the_batch() -> None:
    captioner = captioner_of("tiny")
    assert captioner.components.fluency is not None
    windows = scene_windows(captioner, SCENES[:3])
    solo = alone(captioner, windows)
    batch = fresh(captioner, lambda: captioner.caption_batch(windows))
    for got, want in zip(batch, solo, strict=True):
        assert_same(got, want)
        assert [c.error_prob for c in got.caption.candidates] == pytest.approx(
            [c.error_prob for c in want.caption.candidates], abs=1e-5)
        assert all(c.error_prob is not None for c in got.caption.candidates)


def test_an_int8_text_encoder_keeps_every_windows_texts_but_not_its_exact_scores() -> None:
    """What holds with ``precision = "int8"`` on the text encoder (opt-in, never ``auto``).

    Dynamic int8 quantizes each call's activations with one scale for the whole tensor,
    so a window's text embeddings are quantized with a scale the other windows' texts
    help set. The decoder stays float32, so every window samples the same candidates as
    alone; their scores (0.7 x cosine) may move by the quantization noise, and the chosen
    caption can change only where two candidates were that close. An int8 decoder gives
    no such guarantee (its sampled tokens can change): docs/precision.md.
    """
    decoding = DecodingOptions(mode="sample", n_candidates=8, max_new_tokens=12, seed=7,
                               explicit=frozenset({"mode"}))
    captioner = build_captioner("tiny", decoding, device=torch.device("cpu"),
                                dtype=torch.float32, int8=("text_encoder",))
    windows = scene_windows(captioner)
    solo = alone(captioner, windows)
    batch = fresh(captioner, lambda: captioner.caption_batch(windows))
    for got, want in zip(batch, solo, strict=True):
        a, b = got.caption, want.caption
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        drift = max(abs(x.score - y.score) for x, y in zip(a.candidates, b.candidates,
                                                           strict=True))
        assert drift < 0.01  # quantization noise, not a different ranking signal
        assert a.abstained == b.abstained
        if a.text != b.text:  # only a near-tie between two candidates can flip
            solo_score = {c.text: c.score for c in b.candidates}
            assert solo_score[b.text] - solo_score[a.text] <= 2 * drift
        np.testing.assert_allclose(got.embedding.vector, want.embedding.vector, atol=1e-5)
