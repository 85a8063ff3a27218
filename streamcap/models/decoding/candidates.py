"""Decoded captions: their tokens and scores, their text, and deduplication by text."""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from streamcap.models.enclap.tokenizer import decode_caption


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodedCaption:
    """One caption a decoder produced.

    ``token_ids`` are the generated ids after the decoder start token, forced BOS
    and the final EOS included. ``decoder_score`` is their mean raw (untempered,
    unconstrained) log-probability, ``log_likelihood / len(token_ids)``: the
    length-normalised log-likelihood of teacher forcing ``[start] + token_ids``.
    ``search_score`` is beam search's own score (None for samples and greedy).
    """

    token_ids: tuple[int, ...]
    decoder_score: float
    log_likelihood: float
    ended_by_model: bool  # False when EOS was forced at the length limit
    search_score: float | None = None
    text: str = ""


class TextDecoder(Protocol):
    """Anything that turns token ids into text, like a HF tokenizer."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


def attach_texts(
    candidates: Sequence[DecodedCaption], tokenizer: TextDecoder
) -> list[DecodedCaption]:
    """Return copies of ``candidates`` with ``text`` decoded and cleaned (:func:`decode_caption`)."""
    return [replace(c, text=decode_caption(tokenizer, c.token_ids)) for c in candidates]


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_text(text: str) -> str:
    """Lowercase, remove punctuation (ASCII and Unicode), collapse whitespace."""
    text = text.translate(_PUNCTUATION)
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.lower().split())


def dedupe(candidates: Sequence[DecodedCaption]) -> list[DecodedCaption]:
    """Keep one candidate per normalised text, the one with the best decoder score.

    Candidates whose normalised text is empty are dropped. The result keeps
    the order in which each distinct text first appeared; among equal scores
    the earlier candidate wins.
    """
    best: dict[str, DecodedCaption] = {}
    for cand in candidates:
        key = normalise_text(cand.text)
        if not key:
            continue
        held = best.get(key)
        if held is None or cand.decoder_score > held.decoder_score:
            best[key] = cand
    return list(best.values())
