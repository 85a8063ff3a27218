"""DAC codec tokenizer: 24 kHz mono audio -> integer codes, encoder and quantizer only.

The network is the Descript Audio Codec (DAC) as ported in ``transformers``
(``DacEncoder`` + ``DacResidualVectorQuantizer``, the same layer layout and
parameter names as ``DacModel``). Tokenizing needs only the encoder and the
residual vector quantizer, so the decoder (about 70 % of the 24 kHz model's
parameters) is never built: :class:`CodecTokenizer` holds a small
:class:`DacEncoderQuantizer` module whose state-dict keys are ``DacModel``'s
``encoder.*`` and ``quantizer.*`` keys. A ``DacModel`` handed in is stripped
the same way (its decoder is not referenced).

Precision: the encoder may run in bf16 or fp16; the quantizer (the in-projections
and the nearest-codebook search) always runs in fp32. Measured on the dac24k
architecture with random weights (``bench/results/codec_precision.json``): an
all-bf16 encode changes about 32 % of the codes vs fp32 (codebook 0: 6 %),
the bf16-encoder/fp32-quantizer split about 18 % (codebook 0: 2-4 %) at the
same 3.4x speed-up on CPU; an fp16 encoder changes about 3 % but fp16
convolutions are slow on CPU. ``fp32`` is therefore the default; ``bf16``
trades exactness for speed.

No I/O happens here; weights come in as state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from transformers import DacConfig
from transformers.models.dac.modeling_dac import (
    DacEncoder,
    DacResidualVectorQuantizer,
    Snake1d,
)

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.weights import check_state
from streamcap.models.codecs.base import (
    AudioTokenizerConfig,
    CodecTokens,
    CodesArray,
    EncoderQuantizerTokenizer,
    Float32Array,
    Precision,
)

__all__ = [
    "PRESETS",
    "AudioTokenizer",
    "AudioTokenizerConfig",
    "CodecConfig",
    "CodecTokenizer",
    "CodecTokens",
    "CodesArray",
    "DacEncoderQuantizer",
    "Float32Array",
    "Precision",
    "codec_preset",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecConfig:
    """Dimensions of a DAC codec, as far as tokenizing needs them.

    Derived values (``hop_length``, ``latent_size``, ``frame_rate_hz``,
    ``pad_id``) are properties, not fields, so they cannot disagree with the
    fields.
    """

    sample_rate_hz: int = 24000
    encoder_hidden_size: int = 64  # channels after the first conv; doubles per block
    downsampling_ratios: tuple[int, ...] = (2, 4, 5, 8)  # strides; product = hop in samples
    n_codebooks: int = 32  # codebooks kept and emitted (the first k of the checkpoint's RVQ)
    codebook_size: int = 1024  # entries per codebook; also the pad/mask id downstream
    codebook_dim: int = 8  # factorised lookup dimension of every codebook

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("sample_rate_hz", "encoder_hidden_size", "n_codebooks", "codebook_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"codec.{name}: expected a positive integer, got {value!r}")
        ratios = self.downsampling_ratios
        if (
            not isinstance(ratios, tuple)
            or not ratios
            or any(not isinstance(r, int) or isinstance(r, bool) or r <= 0 for r in ratios)
        ):
            problems.append(
                f"codec.downsampling_ratios: expected a non-empty tuple of positive integers, "
                f"got {ratios!r}"
            )
        size = self.codebook_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 2 or size & (size - 1):
            problems.append(f"codec.codebook_size: expected a power of two >= 2, got {size!r}")
        elif size > np.iinfo(np.int16).max:
            problems.append(f"codec.codebook_size: codes are int16, so at most 32767, got {size}")
        if problems:
            raise ConfigError(problems)

    @property
    def hop_length(self) -> int:
        """Samples per code frame (320 for the 24 kHz model)."""
        return int(math.prod(self.downsampling_ratios))

    @property
    def latent_size(self) -> int:
        """Channels of the encoder output fed to the quantizer (1024 for the 24 kHz model)."""
        return int(self.encoder_hidden_size * 2 ** len(self.downsampling_ratios))

    @property
    def frame_rate_hz(self) -> float:
        """Code frames per second (75.0 for the 24 kHz model)."""
        return self.sample_rate_hz / self.hop_length

    @property
    def pad_id(self) -> int:
        """The id one past the last code; EnCLAP uses it for padding and masking."""
        return self.codebook_size

    @property
    def codec_id(self) -> str:
        """A stable name of the code space, e.g. ``dac-24000hz-e64-r2.4.5.8-q32x1024d8``."""
        ratios = ".".join(str(r) for r in self.downsampling_ratios)
        return (
            f"dac-{self.sample_rate_hz}hz-e{self.encoder_hidden_size}-r{ratios}"
            f"-q{self.n_codebooks}x{self.codebook_size}d{self.codebook_dim}"
        )

    def n_frames(self, n_samples: int) -> int:
        """Code frames for ``n_samples`` samples: ``ceil(n_samples / hop_length)``."""
        return -(-n_samples // self.hop_length)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists)."""
        out = asdict(self)
        out["downsampling_ratios"] = list(self.downsampling_ratios)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodecConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                [f"codec.{key}: unknown key (expected one of {sorted(known)})" for key in unknown]
            )
        values = dict(data)
        if "downsampling_ratios" in values and isinstance(values["downsampling_ratios"], list):
            values["downsampling_ratios"] = tuple(values["downsampling_ratios"])
        return cls(**values)

    def to_dac_config(self) -> DacConfig:
        """The ``transformers`` config of the same encoder and quantizer (decoder dims unused)."""
        return DacConfig(
            encoder_hidden_size=self.encoder_hidden_size,
            downsampling_ratios=list(self.downsampling_ratios),
            n_codebooks=self.n_codebooks,
            codebook_size=self.codebook_size,
            codebook_dim=self.codebook_dim,
            sampling_rate=self.sample_rate_hz,
        )


class AudioTokenizer(Protocol):
    """A codec front end: mono audio at ``config.sample_rate_hz`` -> :class:`CodecTokens`.

    Implemented by :class:`CodecTokenizer` (DAC) and
    :class:`streamcap.models.codecs.encodec.EncodecTokenizer` (EnCodec).
    """

    @property
    def config(self) -> AudioTokenizerConfig: ...

    @property
    def codec_id(self) -> str: ...

    @property
    def frame_rate_hz(self) -> float: ...

    @property
    def device(self) -> torch.device: ...

    def tokens(self, audio: Float32Array, *, start_frame: int | None = 0) -> CodecTokens: ...

    def codes_batch(self, clips: Sequence[Float32Array]) -> list[torch.Tensor]: ...

    def encode(self, audio: Float32Array) -> CodesArray: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...


PRESETS: Mapping[str, CodecConfig] = {
    # Test-sized: same strides and code space (hop 320, 1024 entries, pad id 1024), 0.1 M params.
    "tiny": CodecConfig(encoder_hidden_size=8, n_codebooks=4),
    # The real DAC 24 kHz model (descript weights_24khz.pth): 21.5 M encoder, 0.85 M RVQ params.
    "dac24k": CodecConfig(),
}


def codec_preset(name: str) -> CodecConfig:
    """The preset ``name`` (``tiny`` or ``dac24k``); :class:`ConfigError` names the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"codec.preset: unknown preset {name!r} (expected one of {sorted(PRESETS)})") from None


class DacEncoderQuantizer(nn.Module):
    """DAC encoder + residual vector quantizer; the state-dict keys are ``DacModel``'s.

    Built with ``transformers``' default initialisation (conv weights
    truncated-normal std 0.02, zero biases, snake alpha 1, codebooks normal
    std 0.02), so random models match a random ``DacModel``'s statistics.
    """

    encoder: DacEncoder
    quantizer: DacResidualVectorQuantizer

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        dac_config = config.to_dac_config()
        self.encoder = DacEncoder(dac_config)
        self.quantizer = DacResidualVectorQuantizer(dac_config)
        self.apply(_init_like_transformers)
        self.eval()


@torch.no_grad()
def _init_like_transformers(module: nn.Module) -> None:
    if isinstance(module, nn.Conv1d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, Snake1d):
        nn.init.ones_(module.alpha)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def _expected_shapes(config: CodecConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        reference = DacEncoderQuantizer.__new__(DacEncoderQuantizer)
        nn.Module.__init__(reference)
        dac_config = config.to_dac_config()
        reference.encoder = DacEncoder(dac_config)
        reference.quantizer = DacResidualVectorQuantizer(dac_config)
    return {key: tuple(value.shape) for key, value in reference.state_dict().items()}


class CodecTokenizer(EncoderQuantizerTokenizer[CodecConfig, DacEncoderQuantizer]):
    """Turns 24 kHz mono audio into DAC codes of shape (n_codebooks, n_frames).

    :meth:`encode` right-pads the clip with zeros to a multiple of the hop.

    Args:
        config: the codec dimensions.
        model: a ``DacModel`` or :class:`DacEncoderQuantizer` of matching dims to
            use (its ``encoder`` and ``quantizer`` are taken; a ``DacModel``'s
            decoder is ignored and quantizers past ``config.n_codebooks`` are
            dropped). ``None`` builds a randomly initialised one; load weights
            with :meth:`load_state_dict`.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
        precision: dtype of the encoder: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
            The quantizer always runs in fp32.

    Raises:
        ModelError: ``model`` does not match ``config`` or ``precision`` is unknown.
    """

    def __init__(
        self,
        config: CodecConfig,
        model: nn.Module | None = None,
        device: str = "cpu",
        precision: Precision = "fp32",
    ) -> None:
        super().__init__(config, device, precision)
        self._expected = _expected_shapes(config)
        self._set_module(DacEncoderQuantizer(config) if model is None else self._adopt(model))

    def _adopt(self, model: nn.Module) -> DacEncoderQuantizer:
        encoder = getattr(model, "encoder", None)
        quantizer = getattr(model, "quantizer", None)
        if not isinstance(encoder, DacEncoder) or not isinstance(quantizer, DacResidualVectorQuantizer):
            raise ModelError(
                f"codec model: expected a DacModel or DacEncoderQuantizer, got {type(model).__name__} "
                "without DacEncoder 'encoder' and DacResidualVectorQuantizer 'quantizer'"
            )
        have = len(quantizer.quantizers)
        if have < self.config.n_codebooks:
            raise ModelError(
                f"codec model: has {have} codebooks, config asks for {self.config.n_codebooks}"
            )
        module = DacEncoderQuantizer.__new__(DacEncoderQuantizer)
        nn.Module.__init__(module)
        module.encoder = encoder
        kept = DacResidualVectorQuantizer.__new__(DacResidualVectorQuantizer)
        nn.Module.__init__(kept)
        kept.quantizers = nn.ModuleList(list(quantizer.quantizers)[: self.config.n_codebooks])
        kept.n_codebooks = self.config.n_codebooks
        kept.quantizer_dropout = 0.0
        module.quantizer = kept
        check_state(
            self._expected,
            module.state_dict(),
            f"codec model does not match {self.config.codec_id}",
            error=ModelError,
        )
        return module

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load ``DacModel``-layout weights (strict).

        ``decoder.*`` keys and quantizers past ``config.n_codebooks`` are ignored;
        weight-norm pairs (``weight_g``/``weight_v`` or ``parametrizations.weight.
        original0/1``) are folded first.

        Raises:
            WeightsError: missing or unexpected keys, or shape mismatches, all named.
        """
        from streamcap.models.codecs.descript import fold_weight_norm

        folded = fold_weight_norm(state_dict)
        kept: dict[str, torch.Tensor] = {}
        for key, value in folded.items():
            if key.startswith("decoder."):
                continue
            if key.startswith("quantizer.quantizers."):
                index = int(key.split(".")[2])
                if index >= self.config.n_codebooks:
                    continue
            kept[key] = value
        self._load_checked(kept, f"codec state dict does not match {self.config.codec_id}")

    def _encode_clips(self, samples: npt.NDArray[Any], n_frames: int) -> torch.Tensor:
        padded = np.zeros((samples.shape[0], n_frames * self.config.hop_length), dtype=np.float32)
        padded[:, : samples.shape[1]] = samples
        x = torch.from_numpy(padded).to(self.device)[:, None, :]
        return self.encode_tensor(x)

    @torch.inference_mode()
    def encode_tensor(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode a batch already padded to a multiple of the hop.

        Args:
            audio: float (batch, 1, n_frames * hop_length) on this tokenizer's device.

        Returns:
            int64 (batch, n_codebooks, n_frames) codes.
        """
        latents = self._encoder_run(audio.to(self._dtype)).float()
        quantized = self._model.quantizer(latents, self.config.n_codebooks)
        codes: torch.Tensor = quantized[1]
        return codes
