"""EnCodec 24 kHz codec tokenizer: mono audio -> integer codes, encoder and quantizer only.

The network is Meta's EnCodec as ported in ``transformers`` (``EncodecEncoder`` +
``EncodecResidualVectorQuantizer``, the parameter names of ``EncodecModel``), the
codec of the published EnCLAP checkpoints: 24 kHz, hop 320 samples (75 frames/s),
12 kbps = 16 codebooks of 1,024 entries. Only the encoder and the first
``n_codebooks`` quantizer layers are built; the decoder is never kept.

Preprocessing mirrors EnCLAP's inference: mono audio at 24 kHz straight into the
encoder, no loudness normalisation (the 24 kHz model has ``normalize=False``), one
encode of the whole clip. The clip is *not* zero-padded to a multiple of the hop
here: the encoder pads its last partial frame itself (reflect padding), exactly as
the reference encode does, and emits ``ceil(n / 320)`` frames.

Streaming: the 24 kHz encoder is causal (``use_causal_conv=True``: every convolution
pads on the left only) and ends in a 2-layer LSTM, so frame ``t`` depends on *all*
audio from the chunk start up to frame ``t`` and on nothing after it. A whole-window
encode starts the LSTM and the left (reflect) padding at the window start, so cached
frames computed with a finite left context can only approximate it; see
``docs/enclap-import.md`` and ``bench/results/encodec_streaming.json`` for the
measured agreement and the recommended :class:`StreamingOptions` (right context 0
is enough because nothing looks ahead).

Weights: the ``EncodecModel`` layout (``encoder.*``, ``quantizer.layers.{i}.*``,
``decoder.*`` ignored); weight-norm pairs are folded into plain conv weights.
No I/O happens here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import EncodecConfig
from transformers.models.encodec.modeling_encodec import (
    EncodecConv1d,
    EncodecEncoder,
    EncodecResidualVectorQuantizer,
)

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.weights import check_state
from streamcap.models.codecs.base import EncoderQuantizerTokenizer, Precision


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodecCodecConfig:
    """Dimensions of an EnCodec encoder + quantizer (defaults: the 24 kHz model at 12 kbps).

    ``n_codebooks`` follows from the bandwidth: ``floor(bandwidth * 1000 /
    (frame_rate * log2(codebook_size)))`` with EnCodec's integer frame rate
    ``ceil(sample_rate / hop)`` (12 kbps at 75 Hz and 10 bits: 16).
    """

    sample_rate_hz: int = 24000
    num_filters: int = 32
    hidden_size: int = 128  # latent (and codebook) dimension
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 2)  # the encoder uses them reversed
    num_residual_layers: int = 1
    num_lstm_layers: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    codebook_size: int = 1024
    bandwidth_kbps: float = 12.0
    causal: bool = True
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        problems: list[str] = []
        ints = ("sample_rate_hz", "num_filters", "hidden_size", "num_residual_layers",
                "num_lstm_layers", "kernel_size", "last_kernel_size", "residual_kernel_size",
                "dilation_growth_rate", "compress")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"codec.{name}: expected a positive integer, got {value!r}")
        ratios = self.upsampling_ratios
        if (not isinstance(ratios, tuple) or not ratios
                or any(not isinstance(r, int) or isinstance(r, bool) or r <= 0 for r in ratios)):
            problems.append(f"codec.upsampling_ratios: expected a non-empty tuple of positive "
                            f"integers, got {ratios!r}")
        size = self.codebook_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 2 or size & (size - 1):
            problems.append(f"codec.codebook_size: expected a power of two >= 2, got {size!r}")
        elif size > np.iinfo(np.int16).max:
            problems.append(f"codec.codebook_size: codes are int16, so at most 32767, got {size}")
        if self.pad_mode not in ("reflect", "constant", "replicate"):
            problems.append(f"codec.pad_mode: expected reflect, constant or replicate, "
                            f"got {self.pad_mode!r}")
        if not isinstance(self.bandwidth_kbps, (int, float)) or self.bandwidth_kbps <= 0:
            problems.append(f"codec.bandwidth_kbps: expected a positive number, "
                            f"got {self.bandwidth_kbps!r}")
        if problems:
            raise ConfigError(problems)
        if self.n_codebooks < 1:
            raise ConfigError(f"codec.bandwidth_kbps: {self.bandwidth_kbps} kbps gives no "
                              f"codebook at {self.frame_rate_hz:g} frames/s")

    @property
    def hop_length(self) -> int:
        """Samples per code frame (320 for the 24 kHz model)."""
        return int(math.prod(self.upsampling_ratios))

    @property
    def frame_rate_hz(self) -> float:
        """Code frames per second (75.0 for the 24 kHz model)."""
        return self.sample_rate_hz / self.hop_length

    @property
    def n_codebooks(self) -> int:
        """Codebooks at ``bandwidth_kbps`` (16 at 12 kbps for the 24 kHz model)."""
        frame_rate = math.ceil(self.sample_rate_hz / self.hop_length)
        bits = math.log2(self.codebook_size)
        return math.floor(self.bandwidth_kbps * 1000 / (frame_rate * bits) + 1e-9)

    @property
    def pad_id(self) -> int:
        """The id one past the last code; EnCLAP uses it for padding and masking."""
        return self.codebook_size

    @property
    def codec_id(self) -> str:
        """A stable name of the code space, e.g. ``encodec-24000hz-f32-r8.5.4.2-q16x1024``."""
        ratios = ".".join(str(r) for r in self.upsampling_ratios)
        return (f"encodec-{self.sample_rate_hz}hz-f{self.num_filters}-r{ratios}"
                f"-q{self.n_codebooks}x{self.codebook_size}")

    def n_frames(self, n_samples: int) -> int:
        """Code frames for ``n_samples`` samples: ``ceil(n_samples / hop_length)``."""
        return -(-n_samples // self.hop_length)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists)."""
        out = asdict(self)
        out["upsampling_ratios"] = list(self.upsampling_ratios)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncodecCodecConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"codec.{key}: unknown key (expected one of {sorted(known)})"
                               for key in unknown])
        values = dict(data)
        if isinstance(values.get("upsampling_ratios"), list):
            values["upsampling_ratios"] = tuple(values["upsampling_ratios"])
        return cls(**values)

    @classmethod
    def from_hf_config(cls, data: Mapping[str, Any], *, bandwidth_kbps: float = 12.0,
                       where: str = "config.json") -> EncodecCodecConfig:
        """The config of a ``transformers`` ``EncodecConfig`` dict (e.g. ``facebook/encodec_24khz``).

        Raises:
            ConfigError: not an EnCodec config, or a setting streamcap cannot run
                (stereo, loudness normalisation, chunked encoding, group norm), named by key.
        """
        problems: list[str] = []
        if data.get("model_type") != "encodec":
            problems.append(f"{where}: model_type: expected 'encodec', got {data.get('model_type')!r}")
        for key, want in (("audio_channels", 1), ("normalize", False), ("chunk_length_s", None),
                          ("norm_type", "weight_norm"), ("use_conv_shortcut", True)):
            if key in data and data[key] != want:
                problems.append(f"{where}: {key}: streamcap supports {want!r}, got {data[key]!r}")
        if problems:
            raise ConfigError(problems)
        names = {"sampling_rate": "sample_rate_hz", "num_filters": "num_filters",
                 "hidden_size": "hidden_size", "num_residual_layers": "num_residual_layers",
                 "num_lstm_layers": "num_lstm_layers", "kernel_size": "kernel_size",
                 "last_kernel_size": "last_kernel_size",
                 "residual_kernel_size": "residual_kernel_size",
                 "dilation_growth_rate": "dilation_growth_rate", "compress": "compress",
                 "codebook_size": "codebook_size", "use_causal_conv": "causal",
                 "pad_mode": "pad_mode"}
        values: dict[str, Any] = {ours: data[theirs] for theirs, ours in names.items()
                                  if theirs in data}
        if "upsampling_ratios" in data:
            values["upsampling_ratios"] = tuple(data["upsampling_ratios"])
        codebook_dim = data.get("codebook_dim")
        if codebook_dim is not None and codebook_dim != values.get("hidden_size", 128):
            raise ConfigError(f"{where}: codebook_dim {codebook_dim} != hidden_size; "
                              "streamcap supports codebooks of the latent size only")
        return cls(bandwidth_kbps=bandwidth_kbps, **values)

    def to_hf_config(self) -> EncodecConfig:
        """The ``transformers`` config with exactly ``n_codebooks`` quantizer layers."""
        frame_rate = math.ceil(self.sample_rate_hz / self.hop_length)
        bandwidth = self.n_codebooks * frame_rate * math.log2(self.codebook_size) / 1000
        return EncodecConfig(
            target_bandwidths=[bandwidth], sampling_rate=self.sample_rate_hz, audio_channels=1,
            normalize=False, hidden_size=self.hidden_size, num_filters=self.num_filters,
            num_residual_layers=self.num_residual_layers,
            upsampling_ratios=list(self.upsampling_ratios), norm_type="weight_norm",
            kernel_size=self.kernel_size, last_kernel_size=self.last_kernel_size,
            residual_kernel_size=self.residual_kernel_size,
            dilation_growth_rate=self.dilation_growth_rate, use_causal_conv=self.causal,
            pad_mode=self.pad_mode, compress=self.compress, num_lstm_layers=self.num_lstm_layers,
            codebook_size=self.codebook_size, codebook_dim=self.hidden_size,
        )


ENCODEC_PRESETS: Mapping[str, EncodecCodecConfig] = {
    # Test-sized: same strides, code space (1024 entries, pad id 1024) and causal layout;
    # 3 kbps = 4 codebooks.
    "encodec-tiny": EncodecCodecConfig(num_filters=4, hidden_size=16, num_lstm_layers=1,
                                       bandwidth_kbps=3.0),
    # facebook/encodec_24khz at 12 kbps, as EnCLAP uses it: 16 codebooks.
    "encodec24k": EncodecCodecConfig(),
}


def encodec_preset(name: str) -> EncodecCodecConfig:
    """The preset ``name`` (``encodec-tiny`` or ``encodec24k``)."""
    try:
        return ENCODEC_PRESETS[name]
    except KeyError:
        raise ConfigError(f"codec.preset: unknown EnCodec preset {name!r} "
                          f"(expected one of {sorted(ENCODEC_PRESETS)})") from None


class EncodecEncoderQuantizer(nn.Module):
    """EnCodec encoder + the first ``n_codebooks`` RVQ layers, with plain (folded) conv weights.

    Random initialisation: conv weights Kaiming-normal (as ``transformers``), codebooks
    normal with std ``codebook_std`` (the checkpoint's codebooks replace them; a
    zero codebook would map everything to code 0).
    """

    encoder: EncodecEncoder
    quantizer: EncodecResidualVectorQuantizer

    def __init__(self, config: EncodecCodecConfig, *, codebook_std: float = 1.0) -> None:
        super().__init__()
        hf = config.to_hf_config()
        self.encoder = EncodecEncoder(hf)
        self.quantizer = EncodecResidualVectorQuantizer(hf)
        for module in self.encoder.modules():
            if isinstance(module, EncodecConv1d) and parametrize.is_parametrized(module.conv):
                parametrize.remove_parametrizations(module.conv, "weight")
        with torch.no_grad():
            for module in self.encoder.modules():
                if isinstance(module, nn.Conv1d):
                    nn.init.kaiming_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            for layer in self.quantizer.layers:
                codebook = cast(Any, layer).codebook
                codebook.embed.normal_(0.0, codebook_std)
                codebook.embed_avg.copy_(codebook.embed)
        self.eval()


def _expected_shapes(config: EncodecCodecConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = EncodecEncoderQuantizer(config)
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


class EncodecTokenizer(EncoderQuantizerTokenizer[EncodecCodecConfig, EncodecEncoderQuantizer]):
    """Turns mono audio at ``config.sample_rate_hz`` into EnCodec codes (n_codebooks, n_frames).

    :meth:`encode` follows EnCLAP's preprocessing: no normalisation and no
    padding (the encoder pads its last partial frame itself).

    Args:
        config: the codec dimensions and bandwidth.
        model: an :class:`EncodecEncoderQuantizer` to use, or None for random weights
            (load real ones with :meth:`load_state_dict`).
        device: torch device string.
        precision: dtype of the encoder; the quantizer always runs in fp32.

    Raises:
        ModelError: unknown precision, or ``model`` of other dimensions.
    """

    _input_dtype: ClassVar[type[np.float32] | None] = np.float32

    def __init__(self, config: EncodecCodecConfig, model: EncodecEncoderQuantizer | None = None,
                 device: str = "cpu", precision: Precision = "fp32") -> None:
        super().__init__(config, device, precision)
        self._expected = _expected_shapes(config)
        module = EncodecEncoderQuantizer(config) if model is None else model
        check_state(self._expected, module.state_dict(),
                    f"codec model does not match {config.codec_id}", error=ModelError)
        self._set_module(module)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load ``EncodecModel``-layout weights (strict).

        ``decoder.*`` keys and quantizer layers past ``config.n_codebooks`` are
        ignored; weight-norm pairs are folded first.

        Raises:
            WeightsError: missing or unexpected keys or wrong shapes, all named.
        """
        from streamcap.models.codecs.descript import fold_weight_norm

        kept: dict[str, torch.Tensor] = {}
        for key, value in fold_weight_norm(state_dict).items():
            if key.startswith("decoder."):
                continue
            if key.startswith("quantizer.layers.") and int(key.split(".")[2]) >= \
                    self.config.n_codebooks:
                continue
            kept[key] = value
        self._load_checked(kept, f"EnCodec weights do not match {self.config.codec_id}")

    def _encode_clips(self, samples: npt.NDArray[Any], n_frames: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(samples)).to(self.device)[:, None, :]
        codes = self.encode_tensor(x)
        if codes.shape[-1] != n_frames:  # the encoder's own padding always gives ceil(n / hop)
            raise ModelError(f"codec: encoder returned {codes.shape[-1]} frames for "
                             f"{samples.shape[1]} samples, expected {n_frames}")
        return codes

    @torch.inference_mode()
    def encode_tensor(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode a batch of equal-length clips.

        Args:
            audio: float (batch, 1, n) on this tokenizer's device.

        Returns:
            int64 (batch, n_codebooks, ceil(n / hop_length)) codes.
        """
        latents = self._encoder_run(audio.to(self._dtype)).float()
        codes: torch.Tensor = self._model.quantizer.encode(latents, None)  # (K, B, T)
        return codes.transpose(0, 1)
