"""What the codec tokenizers share: precision handling, the fp32 master module, strict loading.

:class:`streamcap.models.codecs.dac.CodecTokenizer` (DAC) and
:class:`streamcap.models.codecs.encodec.EncodecTokenizer` (EnCodec) both hold an
encoder + residual-vector-quantizer module with ``encoder.*``/``quantizer.*``
keys. :class:`EncoderQuantizerTokenizer` keeps that module in fp32 (the source
of :meth:`~EncoderQuantizerTokenizer.state_dict` and of the quantizer) plus an
encoder copy in the chosen precision, validates input audio, and loads weights
strictly through :func:`streamcap.models.bundle.weights.check_state`, the one key/shape
check for weights. No I/O happens here.

Codec output is :class:`CodecTokens`: int64 codes that stay on the codec's
device (the captioner consumes them there), with the codec id, the frame rate
and the frame index of their first frame. :meth:`EncoderQuantizerTokenizer.encode`
gives the int16 NumPy form for storage (feature shards).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from streamcap.errors import ModelError
from streamcap.models.bundle.weights import check_state

Precision = Literal["fp32", "bf16", "fp16"]
CodesArray = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]

PRECISION_DTYPES: Mapping[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecTokens:
    """Codec codes of one clip or window, as they travel from the codec to the captioner.

    ``codes`` is int64 (n_codebooks, n_frames) on the codec's device and is never
    written to (slices share its storage). ``start_frame`` is the index of
    ``codes[:, 0]`` on the stream's frame grid (0 for a clip of its own), or None
    for a window that does not start on the grid (encoded whole).
    """

    codes: torch.Tensor
    codec_id: str
    frame_rate_hz: float
    start_frame: int | None = 0

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.int64 or self.codes.dim() != 2:
            raise ModelError(
                f"codec tokens: expected int64 codes of shape (n_codebooks, n_frames), "
                f"got {self.codes.dtype} {tuple(self.codes.shape)}"
            )

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.frame_rate_hz

    def batched(self) -> torch.Tensor:
        """int64 (1, n_codebooks, n_frames): the captioner's batch of one (a view)."""
        return self.codes[None]

    def to_numpy(self) -> CodesArray:
        """int16 (n_codebooks, n_frames) on the host, the storage form."""
        return self.codes.to(torch.int16).cpu().numpy()


class AudioTokenizerConfig(Protocol):
    """What the streaming cache and the captioner read from any codec's config."""

    @property
    def sample_rate_hz(self) -> int: ...

    @property
    def n_codebooks(self) -> int: ...

    @property
    def codebook_size(self) -> int: ...

    @property
    def hop_length(self) -> int: ...

    @property
    def frame_rate_hz(self) -> float: ...

    @property
    def codec_id(self) -> str: ...

    def n_frames(self, n_samples: int) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


ConfigT = TypeVar("ConfigT", bound=AudioTokenizerConfig)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


MAX_CODEC_BATCH = 32
"""Clips per encoder call in :meth:`EncoderQuantizerTokenizer.codes_batch` on a GPU (bounds the
memory of the encoder's widest activations: 64 channels at the full sample rate per clip).
On a CPU every clip is encoded alone: there a batch of 4 five-second chunks took 1.5x the
time of 4 single calls (base preset, 2-core AVX2 CPU, ``bench/results/multisource_cpu_base.md``):
the convolutions are compute-bound already, and a batch's activations no longer fit in cache."""

CPU_CODEC_BATCH = 1
"""Clips per encoder call on a CPU (see :data:`MAX_CODEC_BATCH`)."""


class EncoderQuantizerTokenizer(ABC, Generic[ConfigT, ModuleT]):
    """Base of the codec tokenizers: mono audio -> int16 codes (n_codebooks, n_frames).

    A subclass sets ``_expected`` (key -> shape of its module), builds or adopts
    the module and hands it to :meth:`_set_module`, and implements
    :meth:`encode_tensor` and :meth:`_encode_clips`.

    Args:
        config: the codec dimensions.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
        precision: dtype of the encoder: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
            The quantizer always runs in fp32.

    Raises:
        ModelError: ``precision`` is unknown.
    """

    _input_dtype: ClassVar[type[np.float32] | None] = None  # what encode() casts audio to
    _expected: dict[str, tuple[int, ...]]
    _model: ModuleT
    _encoder_run: nn.Module

    def __init__(self, config: ConfigT, device: str, precision: Precision) -> None:
        if precision not in PRECISION_DTYPES:
            raise ModelError(
                f"codec precision: expected one of {sorted(PRECISION_DTYPES)}, got {precision!r}"
            )
        self.config = config
        self.precision: Precision = precision
        self.device = torch.device(device)
        self._dtype = PRECISION_DTYPES[precision]

    def _set_module(self, module: ModuleT) -> None:
        """Keep ``module`` as the fp32 master copy (source of state_dict() and the quantizer)."""
        self._model = module.to(device=self.device, dtype=torch.float32).eval()
        self._encoder_run = self._make_run_encoder()

    def _make_run_encoder(self) -> nn.Module:
        encoder = self._model.get_submodule("encoder")
        if self._dtype == torch.float32:
            return encoder
        return copy.deepcopy(encoder).to(dtype=self._dtype).eval()

    def _load_checked(self, kept: Mapping[str, torch.Tensor], header: str) -> None:
        """Check ``kept`` against the module (:class:`WeightsError` after ``header``), load it."""
        check_state(self._expected, kept, header)
        self._model.load_state_dict(kept, strict=True)
        self._model.eval()
        self._encoder_run = self._make_run_encoder()

    # -- public API -----------------------------------------------------------------------

    @property
    def frame_rate_hz(self) -> float:
        """Code frames per second (75.0 for the 24 kHz codecs)."""
        return self.config.frame_rate_hz

    @property
    def codec_id(self) -> str:
        """Name of the code space (see the config's ``codec_id``)."""
        return self.config.codec_id

    @property
    def module(self) -> ModuleT:
        """The fp32 encoder + quantizer module (``encoder.*``/``quantizer.*`` keys)."""
        return self._model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights of :attr:`module`, in the checkpoint's key layout."""
        return {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    def tokens(self, audio: Float32Array, *, start_frame: int | None = 0) -> CodecTokens:
        """Encode one mono clip; the codes stay on this tokenizer's device.

        Args:
            audio: float32 (n,) at ``config.sample_rate_hz`` (how the last
                partial frame is filled depends on the codec, see the subclass).
            start_frame: the clip's first frame on its stream's frame grid.

        Returns:
            int64 (n_codebooks, ceil(n / hop_length)) codes in ``[0, codebook_size)``.

        Raises:
            ModelError: ``audio`` is not 1-D or holds NaN/inf.
        """
        (codes,) = self.codes_batch([audio])
        return CodecTokens(codes=codes, codec_id=self.codec_id,
                           frame_rate_hz=self.frame_rate_hz, start_frame=start_frame)

    def codes_batch(self, clips: Sequence[Float32Array]) -> list[torch.Tensor]:
        """The codes of each mono clip; on a GPU, clips of equal length are encoded as one batch.

        Each clip's codes are :meth:`tokens`'s of that clip alone (a convolution's
        result does not depend on the other rows of its batch, up to float rounding).
        At most :data:`MAX_CODEC_BATCH` clips go through the encoder at once on a GPU,
        one at a time on a CPU.

        Returns:
            int64 (n_codebooks, ceil(n / hop_length)) codes per clip, in input order.

        Raises:
            ModelError: a clip is not 1-D or holds NaN/inf.
        """
        arrays = [np.asarray(clip, dtype=self._input_dtype) for clip in clips]
        by_length: dict[int, list[int]] = {}
        for i, samples in enumerate(arrays):
            if samples.ndim != 1:
                raise ModelError(
                    f"codec input: expected mono audio of shape (n,), got {samples.shape}")
            if not np.all(np.isfinite(samples)):
                raise ModelError("codec input: audio holds NaN or inf samples")
            by_length.setdefault(samples.shape[0], []).append(i)
        out: list[torch.Tensor] = [self._no_codes] * len(arrays)
        limit = MAX_CODEC_BATCH if self.device.type == "cuda" else CPU_CODEC_BATCH
        for length, rows in by_length.items():
            n_frames = self.config.n_frames(length)
            if n_frames == 0:
                continue
            for first in range(0, len(rows), limit):
                part = rows[first : first + limit]
                codes = self._encode_clips(np.stack([arrays[i] for i in part]), n_frames)
                for j, i in enumerate(part):
                    out[i] = codes[j]
        return out

    @property
    def _no_codes(self) -> torch.Tensor:
        return torch.zeros((self.config.n_codebooks, 0), dtype=torch.int64, device=self.device)

    def encode(self, audio: Float32Array) -> CodesArray:
        """:meth:`tokens` of one mono clip in the storage form: int16 (n_codebooks, n_frames).

        Raises:
            ModelError: ``audio`` is not 1-D or holds NaN/inf.
        """
        return self.tokens(audio).to_numpy()

    @abstractmethod
    def _encode_clips(self, samples: npt.NDArray[Any], n_frames: int) -> torch.Tensor:
        """int64 (b, n_codebooks, n_frames) codes of finite, non-empty clips, (b, n) samples."""

    @abstractmethod
    def encode_tensor(self, audio: torch.Tensor) -> torch.Tensor:
        """int64 (batch, n_codebooks, n_frames) codes of float (batch, 1, n) audio."""
