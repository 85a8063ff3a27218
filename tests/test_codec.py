"""CodecTokenizer and CodecConfig on the tiny preset (random weights)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import DacModel

from streamcap.errors import ConfigError, ModelError, WeightsError
from streamcap.models.codecs.base import CodecTokens, EncoderQuantizerTokenizer
from streamcap.models.codecs.dac import CodecConfig, CodecTokenizer, codec_preset
from streamcap.models.codecs.encodec import EncodecTokenizer, encodec_preset

torch.set_num_threads(1)


def _signal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 24000
    return (0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def tok() -> CodecTokenizer:
    torch.manual_seed(0)
    return CodecTokenizer(codec_preset("tiny"))


def test_presets_have_dac24k_dims() -> None:
    real = codec_preset("dac24k")
    assert real.hop_length == 320
    assert real.frame_rate_hz == 75.0
    assert real.latent_size == 1024
    assert (real.n_codebooks, real.codebook_size, real.codebook_dim) == (32, 1024, 8)
    tiny = codec_preset("tiny")
    assert tiny.hop_length == 320 and tiny.pad_id == 1024
    with pytest.raises(ConfigError, match="huge"):
        codec_preset("huge")


def test_config_round_trip_and_unknown_key() -> None:
    cfg = CodecConfig(encoder_hidden_size=16, n_codebooks=8)
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg
    data = cfg.to_dict() | {"hop": 320}
    with pytest.raises(ConfigError, match="codec.hop"):
        CodecConfig.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [("codebook_size", 1000), ("n_codebooks", 0), ("downsampling_ratios", ())],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"codec.{field}"):
        CodecConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 319, 320, 321, 24000, 24000 * 2 + 17])
def test_shape_dtype_and_frame_count(tok: CodecTokenizer, n: int) -> None:
    codes = tok.encode(_signal(n))
    assert codes.dtype == np.int16
    assert codes.shape == (4, -(-n // 320))
    assert codes.min() >= 0 and codes.max() < 1024



@pytest.mark.parametrize("kind", ["dac", "encodec"])
def test_tokens_are_int64_codes_with_their_codec_and_frame_rate(
    tok: CodecTokenizer, kind: str
) -> None:
    """CodecTokens, the one codec output type, from either codec (base.py's tokens())."""
    codec: EncoderQuantizerTokenizer[Any, Any] = (
        tok if kind == "dac" else EncodecTokenizer(encodec_preset("encodec-tiny")))
    x = _signal(24000 + 17)
    tokens = codec.tokens(x, start_frame=75)
    assert tokens.codes.dtype == torch.int64 and tokens.codes.device == codec.device
    assert tokens.codec_id == codec.codec_id and tokens.frame_rate_hz == 75.0
    assert (tokens.start_frame, tokens.n_codebooks, tokens.n_frames) == (75, 4, 76)
    assert tokens.batched().shape == (1, 4, 76)
    assert np.array_equal(tokens.to_numpy(), codec.encode(x))  # the int16 storage form
    assert codec.tokens(np.zeros(0, np.float32)).codes.shape == (4, 0)
    with pytest.raises(ModelError, match="int64 codes"):
        CodecTokens(codes=tokens.codes.to(torch.int16), codec_id="x", frame_rate_hz=75.0)

def test_empty_and_bad_input(tok: CodecTokenizer) -> None:
    assert tok.encode(np.zeros(0, dtype=np.float32)).shape == (4, 0)
    with pytest.raises(ModelError, match="mono"):
        tok.encode(np.zeros((2, 320), dtype=np.float32))
    bad = _signal(640)
    bad[3] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        tok.encode(bad)


def test_deterministic_and_content_dependent(tok: CodecTokenizer) -> None:
    x = _signal(24000)
    first = tok.encode(x)
    assert np.array_equal(first, tok.encode(x))
    assert not np.array_equal(first, tok.encode(_signal(24000, seed=1)))
    assert len(np.unique(first[0])) > 5  # codes are not collapsed onto one entry


def test_matches_dac_model_and_drops_decoder() -> None:
    config = codec_preset("tiny")
    torch.manual_seed(1)
    full = DacModel(config.to_dac_config())
    torch.nn.Module.eval(full)
    tok = CodecTokenizer(config, model=full)
    assert not any(key.startswith("decoder.") for key in tok.state_dict())
    x = _signal(24000 + 100)
    padded = np.pad(x, (0, 320 - len(x) % 320))
    with torch.inference_mode():
        ref = full.encode(torch.from_numpy(padded).view(1, 1, -1)).audio_codes[0].numpy()
    assert np.array_equal(tok.encode(x), ref)


def test_fewer_codebooks_are_a_prefix() -> None:
    torch.manual_seed(2)
    eight = CodecTokenizer(CodecConfig(encoder_hidden_size=8, n_codebooks=8))
    four = CodecTokenizer(CodecConfig(encoder_hidden_size=8, n_codebooks=4))
    four.load_state_dict(eight.state_dict())  # quantizers 4..7 are ignored
    x = _signal(8000)
    assert np.array_equal(four.encode(x), eight.encode(x)[:4])


def test_state_dict_round_trip_and_errors(tok: CodecTokenizer) -> None:
    other = CodecTokenizer(codec_preset("tiny"))
    x = _signal(4800)
    other.load_state_dict(tok.state_dict())
    assert np.array_equal(other.encode(x), tok.encode(x))
    sd = tok.state_dict()
    del sd["encoder.conv1.bias"]
    sd["encoder.extra"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"(?s)missing.*encoder\.conv1\.bias.*unexpected.*encoder\.extra"):
        other.load_state_dict(sd)
    sd = tok.state_dict()
    sd["encoder.conv2.weight"] = torch.zeros(3, 3, 3)
    with pytest.raises(WeightsError, match="encoder.conv2.weight"):
        other.load_state_dict(sd)


def test_bf16_precision_keeps_shape_and_mostly_codes(tok: CodecTokenizer) -> None:
    low = CodecTokenizer(tok.config, precision="bf16")
    low.load_state_dict(tok.state_dict())
    x = _signal(24000)
    ref, got = tok.encode(x), low.encode(x)
    assert got.shape == ref.shape and got.dtype == np.int16
    assert (got[0] == ref[0]).mean() > 0.9
    assert low.state_dict()["encoder.conv1.weight"].dtype == torch.float32
    with pytest.raises(ModelError, match="precision"):
        CodecTokenizer(tok.config, precision="int8")  # type: ignore[arg-type]


def test_codec_id_names_the_code_space(tok: CodecTokenizer) -> None:
    assert tok.codec_id == "dac-24000hz-e8-r2.4.5.8-q4x1024d8"
    assert tok.frame_rate_hz == 75.0
