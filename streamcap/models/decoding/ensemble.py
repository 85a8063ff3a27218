"""Output ensembles: several captioners decode together by averaging token log-probabilities.

At every decoding step each model scores the next token given the shared prefix
(teacher-forced over its own encoder output); the ensemble's distribution is the
mean of the models' ``log_softmax`` vectors, renormalised (a normalised geometric
mean of the models' distributions). :class:`EnsembleInference` serves that
distribution to the same decoders a single model uses (beam search, nucleus
sampling), so an ensemble of one model decodes like that model.

Each step re-runs each decoder over the whole prefix (no key/value cache): simple
and exact, meant for evaluation, where captions are short.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamcap.errors import ModelError
from streamcap.models.enclap.model import EnclapEncoding, EnclapModel


class CaptionEnsemble:
    """Captioners that share a vocabulary, decoding as one.

    Args:
        models: one or more EnCLAP models with the same ``vocab_size``.
    """

    def __init__(self, models: Sequence[EnclapModel]) -> None:
        if not models:
            raise ModelError("ensemble: no models")
        sizes = {int(m.bart.final_logits_bias.shape[-1]) for m in models}
        if len(sizes) != 1:
            raise ModelError(f"ensemble: the models' vocabularies differ in size {sorted(sizes)}")
        self.models = list(models)

    @torch.inference_mode()
    def encode(self, codes: torch.Tensor, seq_embeds: Sequence[torch.Tensor],
               frame_mask: torch.Tensor | None = None) -> list[EnclapEncoding]:
        """Each model's encoding of one clip.

        Args:
            codes: integer (1, K, T).
            seq_embeds: float (1, D_m) per model (models may read different embeddings).
            frame_mask: optional (1, T).
        """
        if len(seq_embeds) != len(self.models):
            raise ModelError(f"ensemble: {len(seq_embeds)} clip embeddings for "
                             f"{len(self.models)} models")
        return [m.encode(codes, s, frame_mask) for m, s in zip(self.models, seq_embeds,
                                                               strict=True)]

    @torch.inference_mode()
    def next_log_probs(self, encodings: Sequence[EnclapEncoding],
                       history: torch.Tensor) -> torch.Tensor:
        """float32 (b, V) mean over models of ``log_softmax`` of the next-token logits.

        Args:
            encodings: each model's batch-1 encoding.
            history: int64 (b, s) decoder inputs so far (decoder start first).
        """
        b = history.shape[0]
        total: torch.Tensor | None = None
        for model, enc in zip(self.models, encodings, strict=True):
            expanded = EnclapEncoding(hidden_states=enc.hidden_states.expand(b, -1, -1),
                                      attention_mask=enc.attention_mask.expand(b, -1))
            logits = model.decode(history, expanded).logits
            if logits is None:
                raise ModelError("ensemble: a decoder returned no logits")
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            total = logp if total is None else total + logp
        assert total is not None  # at least one model (checked in __init__)
        mean = total / len(self.models)
        return mean - torch.logsumexp(mean, dim=-1, keepdim=True)

    def inference(self, encodings: Sequence[EnclapEncoding]) -> EnsembleInference:
        """The decoders' view of this ensemble over one clip's ``encodings``."""
        return EnsembleInference(self, encodings)


class EnsembleInference:
    """:class:`~streamcap.models.decoding.inference.Inference` of an ensemble on one clip."""

    def __init__(self, ensemble: CaptionEnsemble, encodings: Sequence[EnclapEncoding]) -> None:
        if len(encodings) != len(ensemble.models):
            raise ModelError(f"ensemble: {len(encodings)} encodings for "
                             f"{len(ensemble.models)} models")
        self.ensemble = ensemble
        self.encodings = list(encodings)

    @property
    def device(self) -> torch.device:
        return self.encodings[0].hidden_states.device

    def start(self, positions: int) -> None:
        """Nothing to prepare: every step re-reads the whole prefix."""

    def logits(self, history: torch.Tensor) -> torch.Tensor:
        return self.ensemble.next_log_probs(self.encodings, history)

    def keep(self, rows: torch.Tensor) -> None:
        """Nothing to rearrange: the decoder's prefixes are the only state."""
