"""EnCLAP's original decoding: beam search through HF ``generate``.

Settings default to the published EnCLAP inference: 4 beams, no repeated
3-grams, ``max_length`` 50 (HF convention: the decoder start token counts),
early stopping, decoder start 2, forced BOS 0 as the first generated token,
forced EOS 2 at the maximum length. Beam search is deterministic and gives
one caption; it is the fallback to sampling + reranking, or a baseline.

``generate`` expands the ``encoder_outputs`` object it is given in place, so
a fresh ``BaseModelOutput`` is built on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BartForConditionalGeneration, GenerationConfig
from transformers.modeling_outputs import BaseModelOutput

from streamcap.models.decoding.sampling import score_captions


@dataclass(frozen=True, slots=True, kw_only=True)
class BeamOptions:
    """Beam-search settings (EnCLAP's defaults)."""

    num_beams: int = 4
    no_repeat_ngram_size: int = 3  # 0 turns the block off
    max_length: int = 50  # decoder length including the start token (HF max_length)
    early_stopping: bool = True
    length_penalty: float = 1.0  # HF: beam score = sum log-prob / length ** length_penalty
    decoder_start_token_id: int = 2
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        self._verify()

    def _verify(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if self.num_beams < 1:
            raise ValueError(f"BeamOptions.num_beams must be >= 1, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"BeamOptions.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"
            )
        if self.max_length < 3:
            raise ValueError(
                f"BeamOptions.max_length must be >= 3 (start, BOS, EOS), got {self.max_length}"
            )
        for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"BeamOptions.{name} must be >= 0, got {getattr(self, name)}")

    def generation_config(self) -> GenerationConfig:
        """The complete HF generation config for these options (no sampling, scores returned)."""
        beam_only = {"early_stopping": self.early_stopping} if self.num_beams > 1 else {}
        return GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False,
            num_beams=self.num_beams,
            num_return_sequences=1,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            max_length=self.max_length,
            min_length=0,
            length_penalty=self.length_penalty,
            decoder_start_token_id=self.decoder_start_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            forced_bos_token_id=self.bos_token_id,
            forced_eos_token_id=self.eos_token_id,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
            **beam_only,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BeamCaption:
    """The beam-search caption.

    ``token_ids`` are the generated ids after the decoder start (BOS ... EOS,
    padding removed). ``decoder_score`` is their mean raw log-probability
    (teacher-forced, comparable with ``SampledCaption.decoder_score``);
    ``beam_score`` is HF's ``sequences_scores`` (processed log-probs, forced
    tokens at 0, divided by length ** length_penalty).
    """

    token_ids: tuple[int, ...]
    decoder_score: float
    beam_score: float | None  # None for num_beams == 1 (greedy has no beam score)
    text: str = ""


def _strip(ids: list[int], options: BeamOptions) -> tuple[int, ...]:
    """Drop the decoder start and anything after the first EOS of the generated part."""
    out = ids[1:]
    if options.eos_token_id in out:
        out = out[: out.index(options.eos_token_id) + 1]
    return tuple(out)


@torch.inference_mode()
def beam_search(
    bart: BartForConditionalGeneration,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    options: BeamOptions,
) -> BeamCaption:
    """Decode one caption with beam search.

    Args:
        bart: the captioner (its ``generate`` is used).
        encoder_hidden_states: float (1, L, d_model), the encoder output; not
            modified.
        encoder_attention_mask: int (1, L), 1 = attend, or None for all.
        options: the beam settings.

    Returns:
        The best beam, with its scores.
    """
    if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != 1:
        raise ValueError(
            "encoder_hidden_states must have shape (1, L, d_model), "
            f"got {tuple(encoder_hidden_states.shape)}"
        )
    mask = encoder_attention_mask
    if mask is None:
        mask = torch.ones(
            encoder_hidden_states.shape[:2], dtype=torch.long, device=encoder_hidden_states.device
        )
    out = bart.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
        attention_mask=mask,
        generation_config=options.generation_config(),
    )
    ids = _strip([int(t) for t in out.sequences[0].tolist()], options)
    beam_score = float(out.sequences_scores[0]) if options.num_beams > 1 else None
    (decoder_score,) = score_captions(
        bart,
        encoder_hidden_states,
        encoder_attention_mask,
        [ids],
        decoder_start_token_id=options.decoder_start_token_id,
        pad_token_id=options.pad_token_id,
    )
    return BeamCaption(token_ids=ids, decoder_score=decoder_score, beam_score=beam_score)
