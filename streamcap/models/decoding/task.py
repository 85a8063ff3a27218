"""One decoding task: a token decoder, the captions' texts and a ranker, from one options object.

``DecodingOptions.mode`` names the token decoder (:data:`DECODERS`); the decoder says
whether its captions are reranked. The task runs over any
:class:`~streamcap.models.decoding.inference.Inference` (a single model or an
output ensemble) and returns the ranking the captioner publishes; :meth:`DecodingTask.run_batch`
runs it over several windows at once (a
:class:`~streamcap.models.decoding.inference.BatchInference`).

Random streams: :meth:`DecodingTask.stream_for` gives each window its own
``torch.Generator``. With ``DecodingOptions.seed`` set it is seeded from a stable hash of
``(seed, source_id, seq)`` (:func:`window_seed`, BLAKE2b, the same in every process and
run), so a window's candidates depend neither on which windows were decoded before it nor
on which share its batch; without a seed each window gets a fresh random stream.
:meth:`DecodingTask.decode` (one input, no window: evaluation) keeps one stream for the
task, seeded once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Final, Protocol

import torch

from streamcap.models.decoding.beam import BeamSearch
from streamcap.models.decoding.candidates import DecodedCaption, TextDecoder, attach_texts
from streamcap.models.decoding.inference import BatchInference, Inference
from streamcap.models.decoding.options import ENCLAP_TOKENS, DecodingOptions, SpecialTokens
from streamcap.models.decoding.rerank import BatchTextScorer, Ranker, RerankResult, TextScorer
from streamcap.models.decoding.sampling import NucleusSampler, Streams


class TokenDecoder(Protocol):
    """Turns an inference into captions (token ids and decoder scores)."""

    @property
    def stage(self) -> str:
        """The name its time is booked under."""

    @property
    def reranks(self) -> bool:
        """Whether its captions go through the retriever and the fluency filter."""

    def decode(self, inference: Inference, generator: torch.Generator | None
               ) -> list[DecodedCaption]: ...


def window_seed(seed: int, source_id: str, seq: int) -> int:
    """The seed of window ``seq`` of ``source_id``'s random stream: 63 bits of BLAKE2b.

    Stable across processes and runs (unlike Python's salted ``hash``).
    """
    key = f"{seed}\x00{source_id}\x00{seq}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


DECODERS: Final[Mapping[str, Callable[[DecodingOptions, SpecialTokens], TokenDecoder]]] = {
    "sample": NucleusSampler,
    "beam": BeamSearch,
}


def _no_lap(stage: str) -> None:
    """Time is not booked."""


class DecodingTask:
    """Decode, spell and rank the captions of one input.

    Args:
        options: every decoding choice.
        tokenizer: spells token ids.
        device: where the random stream lives (that of the inference's prefixes).
        tokens: the special token ids.
    """

    def __init__(self, options: DecodingOptions, tokenizer: TextDecoder, *,
                 device: torch.device | str = "cpu",
                 tokens: SpecialTokens = ENCLAP_TOKENS) -> None:
        self.options = options.check()
        self.tokenizer = tokenizer
        self.decoder = DECODERS[options.mode](options, tokens)
        self.ranker = Ranker(options, blend=self.decoder.reranks)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if options.seed is not None:
            self.generator.manual_seed(options.seed)
        else:
            self.generator.seed()

    def stream_for(self, source_id: str, seq: int) -> torch.Generator:
        """Window ``seq`` of ``source_id``'s own random stream (see the module docstring)."""
        generator = torch.Generator(device=self.device)
        if self.options.seed is None:
            generator.seed()
        else:
            generator.manual_seed(window_seed(self.options.seed, source_id, seq))
        return generator

    def decode(self, inference: Inference) -> list[DecodedCaption]:
        """The decoder's captions, texts attached, in decoder order."""
        return attach_texts(self.decoder.decode(inference, self.generator), self.tokenizer)

    def decode_batch(self, inference: BatchInference, streams: Streams
                     ) -> list[list[DecodedCaption]]:
        """Each window's captions, texts attached; window ``w`` draws from ``streams[w]``.

        Sampling decodes every window in one pass; beam search (which does not batch)
        decodes them one after another.
        """
        if len(streams) != inference.windows:
            raise ValueError(f"decode_batch: {len(streams)} random streams for "
                             f"{inference.windows} windows")
        decoder = self.decoder
        if isinstance(decoder, NucleusSampler):
            decoded = decoder.decode_batch(inference, streams)
        else:
            decoded = [decoder.decode(inference.window(i), g) for i, g in enumerate(streams)]
        return [attach_texts(d, self.tokenizer) for d in decoded]

    def run(self, inference: Inference, *, similarity: TextScorer | None = None,
            fluency: TextScorer | None = None,
            lap: Callable[[str], None] = _no_lap) -> RerankResult:
        """Decode and rank; ``lap`` is called after the decoder's stage and each scorer's."""
        decoded = self.decode(inference)
        lap(self.decoder.stage)
        return self.ranker.rank(decoded, similarity=similarity, fluency=fluency, lap=lap)

    def run_batch(self, inference: BatchInference, streams: Streams, *,
                  similarity: BatchTextScorer | None = None, fluency: TextScorer | None = None,
                  lap: Callable[[str], None] = _no_lap) -> list[RerankResult]:
        """:meth:`run` of several windows: one decoding pass, each scorer once over the
        distinct texts of every window, then each window ranked on its own."""
        decoded = self.decode_batch(inference, streams)
        lap(self.decoder.stage)
        return self.ranker.rank_batch(decoded, similarity=similarity, fluency=fluency, lap=lap)
