"""Small torch helpers shared by the model and training tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import BartConfig


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """One thread and deterministic algorithms, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def tiny_bart_config(vocab_size: int, d_model: int) -> BartConfig:
    """A 2+2-layer BART small enough for decoding tests."""
    return BartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
