"""Span masking of codec tokens for masked codec modelling (MCM), the EnCLAP auxiliary task.

Each codebook row of a clip is masked independently with spans of fixed length:

* one uniform ``eps`` in ``[0, 1)`` is drawn per clip;
* every codebook row then gets ``n = int(prob * T / span + eps)`` spans, clamped so that
  the spans fit (``n <= T // span``; no span at all when ``T < span``);
* span starts are drawn uniformly without replacement from ``[0, T - span]``,
  independently per codebook; overlapping spans merge, so at most ``prob`` of a row
  is masked (up to the ``eps`` rounding).

Masked slots are replaced by the codec pad id (``codebook_size``), which embeds to a
zero vector; the MCM labels hold the original code there and ``-100`` everywhere else.
Short clips simply get fewer or no spans: nothing here raises for ``T < span`` or
``T == 0``.

Everything is seeded by the caller's ``numpy.random.Generator`` and deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from streamcap.errors import ModelError
from streamcap.models.enclap.model import IGNORE_INDEX


class MaskedCodes(NamedTuple):
    """Codec tokens prepared for MCM training.

    Attributes:
        codes: int64 (B, K, T); masked slots and padded frames hold the pad id.
        labels: int64 (B, K, T); the original code at masked slots, ``-100`` elsewhere.
    """

    codes: torch.Tensor
    labels: torch.Tensor


def _check_options(prob: float, span: int) -> None:
    if not 0.0 <= prob <= 1.0:
        raise ModelError(f"mcm mask prob: expected a value in [0, 1], got {prob}")
    if span < 1:
        raise ModelError(f"mcm mask span: expected a positive frame count, got {span}")


def sample_mcm_mask(
    n_codebooks: int,
    n_frames: int,
    *,
    prob: float = 0.15,
    span: int = 10,
    rng: np.random.Generator,
) -> npt.NDArray[np.bool_]:
    """Samples the MCM mask of one clip.

    Args:
        n_codebooks: K, the number of codebook rows.
        n_frames: T, the number of codec frames of the clip (0 is allowed).
        prob: target fraction of each row covered by span starts times span length.
        span: span length in frames.
        rng: the random generator; the only source of randomness.

    Returns:
        bool (K, T); True where the code is masked.

    Raises:
        ModelError: ``prob`` outside [0, 1], ``span < 1`` or negative sizes.
    """
    _check_options(prob, span)
    if n_codebooks < 0 or n_frames < 0:
        raise ModelError(
            f"mcm mask: expected non-negative sizes, got n_codebooks={n_codebooks}, "
            f"n_frames={n_frames}"
        )
    mask = np.zeros((n_codebooks, n_frames), dtype=np.bool_)
    eps = float(rng.random())
    n_starts = n_frames - span + 1
    if n_starts <= 0 or n_codebooks == 0:
        return mask
    n_spans = min(int(prob * n_frames / span + eps), n_frames // span, n_starts)
    if n_spans <= 0:
        return mask
    candidates = np.tile(np.arange(n_starts), (n_codebooks, 1))
    starts = rng.permuted(candidates, axis=1)[:, :n_spans]  # (K, n_spans), distinct per row
    frames = (starts[:, :, None] + np.arange(span)[None, None, :]).reshape(n_codebooks, -1)
    rows = np.repeat(np.arange(n_codebooks), frames.shape[1])
    mask[rows, frames.reshape(-1)] = True
    return mask


def apply_mcm_mask(codes: torch.Tensor, mask: torch.Tensor, *, pad_id: int) -> MaskedCodes:
    """Replaces masked codes by the pad id and builds the MCM labels.

    Args:
        codes: int64 (B, K, T) codec tokens.
        mask: bool (B, K, T); True where masked.
        pad_id: the codec pad/mask id (``codebook_size``).

    Returns:
        The masked codes and the labels (original code where masked, -100 elsewhere).

    Raises:
        ModelError: shapes differ.
    """
    if codes.shape != mask.shape:
        raise ModelError(
            f"mcm mask: mask shape {tuple(mask.shape)} does not match codes {tuple(codes.shape)}"
        )
    mask = mask.to(device=codes.device, dtype=torch.bool)
    masked = codes.masked_fill(mask, pad_id)
    labels = torch.where(mask, codes, torch.full_like(codes, IGNORE_INDEX))
    return MaskedCodes(codes=masked, labels=labels)


def mask_codes(
    codes: torch.Tensor,
    *,
    pad_id: int,
    rng: np.random.Generator,
    frame_mask: torch.Tensor | None = None,
    prob: float = 0.15,
    span: int = 10,
) -> MaskedCodes:
    """Masks a (possibly padded) batch of codec tokens for MCM training.

    Each clip is masked over its own real length only (one ``eps`` per clip); padded
    frames are set to the pad id and never labelled.

    Args:
        codes: int64 (B, K, T) codec tokens, padded frames at the end of each row.
        pad_id: the codec pad/mask id (``codebook_size``).
        rng: the random generator.
        frame_mask: bool or 0/1 (B, T), True for real frames; None means all real.
        prob: see :func:`sample_mcm_mask`.
        span: see :func:`sample_mcm_mask`.

    Returns:
        The masked codes and their MCM labels, int64 (B, K, T) each.

    Raises:
        ModelError: wrong shapes or options.
    """
    if codes.dim() != 3:
        raise ModelError(f"mcm mask: expected codes of shape (B, K, T), got {tuple(codes.shape)}")
    batch, n_codebooks, n_frames = codes.shape
    if frame_mask is None:
        lengths = [n_frames] * batch
        valid = torch.ones(batch, n_frames, dtype=torch.bool, device=codes.device)
    else:
        if tuple(frame_mask.shape) != (batch, n_frames):
            raise ModelError(
                f"mcm mask: frame_mask shape {tuple(frame_mask.shape)} does not match "
                f"(B, T) = {(batch, n_frames)}"
            )
        valid = frame_mask.to(device=codes.device, dtype=torch.bool)
        counts = valid.sum(dim=1)
        prefix = torch.arange(n_frames, device=codes.device)[None, :] < counts[:, None]
        if not torch.equal(prefix, valid):
            raise ModelError("mcm mask: frame_mask must mark real frames first, then padding")
        lengths = [int(n) for n in counts.tolist()]
    mask = np.zeros((batch, n_codebooks, n_frames), dtype=np.bool_)
    for b, length in enumerate(lengths):
        mask[b, :, :length] = sample_mcm_mask(n_codebooks, length, prob=prob, span=span, rng=rng)
    padded = codes.masked_fill(~valid[:, None, :], pad_id)
    return apply_mcm_mask(padded, torch.from_numpy(mask), pad_id=pad_id)
