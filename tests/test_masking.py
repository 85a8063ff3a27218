"""Tests of MCM span masking (streamcap.training.trainers.masking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcap.errors import ModelError
from streamcap.training.trainers.masking import (
    IGNORE_INDEX,
    apply_mcm_mask,
    mask_codes,
    sample_mcm_mask,
)


def _runs(row: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [int(e - s) for s, e in zip(starts, ends, strict=True)]


def test_shape_dtype_and_seeded_determinism() -> None:
    a = sample_mcm_mask(16, 300, rng=np.random.default_rng(7))
    b = sample_mcm_mask(16, 300, rng=np.random.default_rng(7))
    c = sample_mcm_mask(16, 300, rng=np.random.default_rng(8))
    assert a.shape == (16, 300) and a.dtype == np.bool_
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_codebooks_are_masked_independently() -> None:
    mask = sample_mcm_mask(32, 1000, rng=np.random.default_rng(0))
    distinct = {row.tobytes() for row in mask}
    assert len(distinct) == 32


def test_span_count_follows_prob_and_eps() -> None:
    # T=100, prob=0.15, span=10: n = int(1.5 + eps) in {1, 2}; runs are merged spans.
    for seed in range(30):
        mask = sample_mcm_mask(8, 100, prob=0.15, span=10, rng=np.random.default_rng(seed))
        for row in mask:
            runs = _runs(row)
            assert runs, "every row gets at least one span"
            assert all(r >= 10 for r in runs)
            assert 10 <= int(row.sum()) <= 20


def test_full_prob_masks_at_most_every_frame() -> None:
    mask = sample_mcm_mask(4, 100, prob=1.0, span=10, rng=np.random.default_rng(3))
    # n = min(int(10 + eps), 100 // 10, 91) = 10 distinct starts of length 10.
    for row in mask:
        assert 10 <= int(row.sum()) <= 100


@pytest.mark.parametrize("n_frames", [0, 1, 9])
def test_short_clips_give_no_mask_and_no_error(n_frames: int) -> None:
    mask = sample_mcm_mask(4, n_frames, rng=np.random.default_rng(0))
    assert mask.shape == (4, n_frames)
    assert not mask.any()


def test_zero_span_count_does_not_crash() -> None:
    # 0.15 * 20 / 10 = 0.3, so n = int(0.3 + eps) is 0 for eps < 0.7.
    outcomes = {
        int(sample_mcm_mask(2, 20, rng=np.random.default_rng(s)).sum() > 0) for s in range(40)
    }
    assert outcomes == {0, 1}


def test_zero_prob_masks_nothing() -> None:
    assert not sample_mcm_mask(4, 500, prob=0.0, rng=np.random.default_rng(0)).any()


@pytest.mark.parametrize(("prob", "span"), [(-0.1, 10), (1.5, 10), (0.15, 0)])
def test_bad_options_raise(prob: float, span: int) -> None:
    with pytest.raises(ModelError):
        sample_mcm_mask(4, 100, prob=prob, span=span, rng=np.random.default_rng(0))


@settings(max_examples=60, deadline=None)
@given(
    n_codebooks=st.integers(1, 6),
    n_frames=st.integers(0, 400),
    prob=st.floats(0.0, 1.0),
    span=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_mask_properties(
    n_codebooks: int, n_frames: int, prob: float, span: int, seed: int
) -> None:
    mask = sample_mcm_mask(
        n_codebooks, n_frames, prob=prob, span=span, rng=np.random.default_rng(seed)
    )
    assert mask.shape == (n_codebooks, n_frames)
    max_spans = int(prob * n_frames / span + 1.0)
    for row in mask:
        assert all(r >= span for r in _runs(row))
        assert int(row.sum()) <= max_spans * span


def test_apply_mask_sets_pad_id_and_labels() -> None:
    codes = torch.arange(2 * 3 * 5).reshape(2, 3, 5)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[1, 2, 0] = True
    out = apply_mcm_mask(codes, mask, pad_id=1024)
    assert out.codes[0, 1, 2] == 1024 and out.codes[1, 2, 0] == 1024
    assert out.labels[0, 1, 2] == codes[0, 1, 2] and out.labels[1, 2, 0] == codes[1, 2, 0]
    assert int((out.labels != IGNORE_INDEX).sum()) == 2
    assert torch.equal(out.codes[~mask], codes[~mask])
    with pytest.raises(ModelError):
        apply_mcm_mask(codes, mask[:, :, :4], pad_id=1024)


def test_mask_codes_respects_padding_and_is_deterministic() -> None:
    codes = torch.randint(0, 1024, (3, 4, 120), generator=torch.Generator().manual_seed(0))
    frame_mask = torch.zeros(3, 120, dtype=torch.bool)
    frame_mask[0, :120] = True
    frame_mask[1, :60] = True
    frame_mask[2, :5] = True
    a = mask_codes(codes, pad_id=1024, rng=np.random.default_rng(1), frame_mask=frame_mask)
    b = mask_codes(codes, pad_id=1024, rng=np.random.default_rng(1), frame_mask=frame_mask)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.labels, b.labels)
    padded = ~frame_mask[:, None, :].expand_as(codes)
    assert bool((a.codes[padded] == 1024).all())
    assert bool((a.labels[padded] == IGNORE_INDEX).all())
    assert bool((a.labels[2] == IGNORE_INDEX).all())  # 5 frames < span: nothing masked
    labelled = a.labels != IGNORE_INDEX
    assert bool(labelled[0].any())
    assert torch.equal(a.labels[labelled], codes[labelled])
    assert bool((a.codes[labelled] == 1024).all())


def test_mask_codes_rejects_non_prefix_frame_mask() -> None:
    codes = torch.zeros(1, 2, 30, dtype=torch.long)
    frame_mask = torch.ones(1, 30, dtype=torch.bool)
    frame_mask[0, 3] = False
    with pytest.raises(ModelError, match="frame_mask"):
        mask_codes(codes, pad_id=1024, rng=np.random.default_rng(0), frame_mask=frame_mask)
