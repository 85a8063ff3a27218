"""How captions are decoded: one frozen options object, validated once.

:class:`DecodingOptions` holds every choice a user can make about decoding: the
strategy (``mode``), the sampling and beam settings, the reranking weights and the
seed. Its fields are exactly the keys of the config file's ``[model.decoding]``
table; :func:`decoding_problems` is the one place their bounds live, so that the
config loader (and ``check-config``) rejects exactly what the options reject.

The special tokens follow the EnCLAP/BART convention and are not user options:
:data:`ENCLAP_TOKENS`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from streamcap.errors import ConfigError
from streamcap.options import given_keys, option

DECODING_MODES: Final = ("sample", "beam")
MAX_DECODE_TOKENS: Final = 512  # longest caption either decoder may produce
MIN_SAMPLE_TOKENS: Final = 2  # sampling: the forced BOS and EOS
MIN_BEAM_LENGTH: Final = 3  # beam search: decoder start, BOS and EOS
MIN_TEMPERATURE: Final = 0.01  # below, logits / temperature overflows to inf and NaN
MAX_TEMPERATURE: Final = 10.0  # above, sampling is uniform noise
MAX_CANDIDATES: Final = 256
MAX_BEAMS: Final = 64
MAX_SEED: Final = 2**63 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecialTokens:
    """The decoder's special token ids (EnCLAP/BART: start 2, BOS 0, EOS 2, pad 1)."""

    decoder_start: int = 2
    bos: int = 0
    eos: int = 2
    pad: int = 1


ENCLAP_TOKENS: Final = SpecialTokens()


def _field(default: Any, name: str, help: str = "") -> Any:
    """A field read by the options reader, bounded by :func:`_problem` (the one rule set)."""
    return option(default, check=lambda v: _problem(name, v), help=help)


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodingOptions:
    """Every decoding choice; invalid values raise :class:`ConfigError` naming the field.

    Token counts follow the sampler's convention: generated tokens after the decoder
    start, the forced BOS and the final EOS included. ``beam_max_length`` counts
    HF-style, the decoder start included.
    """

    mode: str = _field("sample", "mode",
                       "sample: nucleus sampling + reranking; beam: beam search")
    n_candidates: int = _field(30, "n_candidates")
    top_p: float = _field(0.95, "top_p", "nucleus mass, in (0, 1]")
    temperature: float = _field(0.5, "temperature",
                                "divides the logits before top-p; scores stay untempered")
    max_new_tokens: int = _field(30, "max_new_tokens")
    min_new_tokens: int = _field(4, "min_new_tokens",
                                 "EOS is blocked until this many tokens (forced BOS included) "
                                 "exist, capped at max_new_tokens - 1; sampling only")
    no_repeat_ngram_size: int = _field(0, "no_repeat_ngram_size",
                                       "both decoders; 0 turns the block off")
    encoder_weight: float = _field(0.7, "encoder_weight")
    decoder_weight: float = _field(0.3, "decoder_weight")
    fluency_threshold: float = _field(0.9, "fluency_threshold",
                                      "error_prob > threshold flags a candidate")
    num_beams: int = _field(4, "num_beams")
    beam_max_length: int = _field(50, "beam_max_length")
    seed: int | None = option(None, null=-1, null_means="a fresh random stream",
                              check=lambda v: _problem("seed", v),
                              help="each window samples from its own stream, seeded from "
                                   "(seed, source id, window seq); -1 (or unset): a fresh "
                                   "random stream per window")
    # The fields the user set; a bundle's own decoding defaults fill the others.
    explicit: frozenset[str] = given_keys()

    def __post_init__(self) -> None:
        problems = [(f.name, f"{why} (got {getattr(self, f.name)!r})") for f in fields(self)
                    if (why := _problem(f.name, getattr(self, f.name))) is not None]
        if problems:
            raise ConfigError("; ".join(f"decoding.{key}: {why}" for key, why in problems))

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """The rules between fields (each field's own bounds are checked as it is read)."""
        return [(key, why) for key, why in _related(self) if key not in refused]

    def check(self) -> DecodingOptions:
        """These options, or :class:`ConfigError` if a rule between fields is broken."""
        problems = list(self.related_problems(()))
        if problems:
            raise ConfigError("; ".join(f"decoding.{key}: {why}" for key, why in problems))
        return self

    @property
    def min_tokens(self) -> int:
        """The minimum length the sampler enforces (``min_new_tokens``, capped)."""
        return min(self.min_new_tokens, self.max_new_tokens - 1)

    def with_defaults(self, defaults: Mapping[str, Any]) -> DecodingOptions:
        """These options with ``defaults`` (a bundle's) applied to every field not explicit.

        Unknown keys are ignored (a newer bundle may know more); a value of the wrong
        type or out of bounds raises :class:`ConfigError` naming it.
        """
        kinds = {key: type(value) for key, value in _defaults().items()
                 if key != "explicit" and value is not None}
        try:
            chosen = {key: kinds[key](value) for key, value in defaults.items()
                      if key in kinds and key not in self.explicit}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the bundle's decoding defaults: {exc}") from exc
        return replace(self, **chosen).check()


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(DecodingOptions)}


def _between(lo: float, hi: float, why: str = "") -> str:
    shown = [str(x) if isinstance(x, int) else f"{x:g}" for x in (lo, hi)]
    if why:
        return f"must be between {shown[0]} ({why}) and {shown[1]}"
    return f"must be between {shown[0]} and {shown[1]}"


_INT_RANGES: Final[Mapping[str, tuple[int, int, str]]] = {
    "n_candidates": (1, MAX_CANDIDATES, ""),
    "max_new_tokens": (MIN_SAMPLE_TOKENS, MAX_DECODE_TOKENS, "the forced BOS and EOS"),
    "min_new_tokens": (0, MAX_DECODE_TOKENS, ""),
    "no_repeat_ngram_size": (0, MAX_DECODE_TOKENS, ""),
    "num_beams": (1, MAX_BEAMS, ""),
    "beam_max_length": (MIN_BEAM_LENGTH, MAX_DECODE_TOKENS, "decoder start, BOS and EOS"),
}
_FLOAT_RANGES: Final[Mapping[str, tuple[float, float]]] = {
    "temperature": (MIN_TEMPERATURE, MAX_TEMPERATURE),
    "encoder_weight": (0.0, 1.0),
    "decoder_weight": (0.0, 1.0),
    "fluency_threshold": (0.0, 1.0),
}


def _problem(key: str, value: Any) -> str | None:
    """What is wrong with one field on its own, or None."""
    if key == "mode":
        return None if value in DECODING_MODES else f"must be one of {', '.join(DECODING_MODES)}"
    if key == "seed":
        return None if value is None or 0 <= value <= MAX_SEED else \
            f"must be >= 0 and <= {MAX_SEED}, or -1 for a fresh random stream"
    if key in _INT_RANGES:
        lo, hi, why = _INT_RANGES[key]
        return None if lo <= value <= hi else _between(lo, hi, why)
    if key == "top_p":
        return None if 0 < value <= 1 else "must be > 0 and <= 1"
    if key in _FLOAT_RANGES:
        lo_f, hi_f = _FLOAT_RANGES[key]
        return None if math.isfinite(value) and lo_f <= value <= hi_f else _between(lo_f, hi_f)
    return None


def _related(options: DecodingOptions) -> list[tuple[str, str]]:
    problems = []
    max_new, no_repeat = options.max_new_tokens, options.no_repeat_ngram_size
    if no_repeat > max_new:
        # An n-gram longer than the longest caption can never repeat.
        problems.append(("no_repeat_ngram_size",
                         f"must be 0 (off) or <= max_new_tokens (got {no_repeat} > {max_new})"))
    if options.encoder_weight == 0.0 and options.decoder_weight == 0.0:
        problems.append(("decoder_weight", "encoder_weight and decoder_weight cannot both be 0"))
    return problems


def decoding_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, message)`` for every bad value among ``values`` (missing keys take defaults),
    each field's own bounds and then the rules between fields.

    The message ends with the offending value, e.g. ``must be > 0 and <= 1 (got 1.5)``.
    """
    problems = [(key, f"{why} (got {value!r})") for key, value in values.items()
                if (why := _problem(key, value)) is not None]
    bad = {key for key, _ in problems}
    merged = {**_defaults(), **{k: v for k, v in values.items() if k not in bad}}
    merged.pop("explicit", None)
    problems += [(key, why) for key, why in _related(DecodingOptions(**merged))
                 if key not in bad]
    return problems
