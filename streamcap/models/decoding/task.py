"""One decoding task: a token decoder, the captions' texts and a ranker, from one options object.

``DecodingOptions.mode`` names the token decoder (:data:`DECODERS`); the decoder says
whether its captions are reranked. The task runs over any
:class:`~streamcap.models.decoding.inference.Inference` (a single model or an
output ensemble) and returns the ranking the captioner publishes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, Protocol

import torch

from streamcap.models.decoding.beam import BeamSearch
from streamcap.models.decoding.candidates import DecodedCaption, TextDecoder, attach_texts
from streamcap.models.decoding.inference import Inference
from streamcap.models.decoding.options import ENCLAP_TOKENS, DecodingOptions, SpecialTokens
from streamcap.models.decoding.rerank import Ranker, RerankResult, TextScorer
from streamcap.models.decoding.sampling import NucleusSampler


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
        self.generator = torch.Generator(device=torch.device(device))
        if options.seed is not None:
            self.generator.manual_seed(options.seed)
        else:
            self.generator.seed()

    def decode(self, inference: Inference) -> list[DecodedCaption]:
        """The decoder's captions, texts attached, in decoder order."""
        return attach_texts(self.decoder.decode(inference, self.generator), self.tokenizer)

    def run(self, inference: Inference, *, similarity: TextScorer | None = None,
            fluency: TextScorer | None = None,
            lap: Callable[[str], None] = _no_lap) -> RerankResult:
        """Decode and rank; ``lap`` is called after the decoder's stage and each scorer's."""
        decoded = self.decode(inference)
        lap(self.decoder.stage)
        return self.ranker.rank(decoded, similarity=similarity, fluency=fluency, lap=lap)
