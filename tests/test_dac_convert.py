"""Converter from descript-audio-codec checkpoints to the DacModel layout.

The descript layout is generated here independently of the converter, from the
nesting of descript's ``DAC`` (encoder ``block`` / decoder ``model``
sequentials, weight-normed convs stored as ``weight_g``/``weight_v``/``bias``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DacConfig, DacModel

from streamcap.errors import WeightsError
from streamcap.models.codecs.dac import CodecTokenizer, codec_preset
from streamcap.models.codecs.descript import (
    config_from_descript_metadata,
    convert_descript_checkpoint,
    convert_descript_state_dict,
    fold_weight_norm,
    read_descript_checkpoint,
)

torch.set_num_threads(1)

ENC_DIM, RATES, N_CB, CB_SIZE, CB_DIM, DEC_DIM = 8, (2, 4, 5, 8), 4, 1024, 8, 32
LATENT = ENC_DIM * 2 ** len(RATES)


def _conv(sd: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], gen: torch.Generator) -> None:
    sd[f"{name}.weight_v"] = torch.randn(shape, generator=gen)
    sd[f"{name}.weight_g"] = torch.rand((shape[0], 1, 1), generator=gen) + 0.5
    bias_size = shape[1] if name.startswith("decoder") and ".block.1" in name else shape[0]
    sd[f"{name}.bias"] = torch.randn(bias_size, generator=gen) * 0.1


def _res_unit(sd: dict[str, torch.Tensor], name: str, dim: int, gen: torch.Generator) -> None:
    sd[f"{name}.block.0.alpha"] = torch.rand((1, dim, 1), generator=gen) + 0.5
    _conv(sd, f"{name}.block.1", (dim, dim, 7), gen)
    sd[f"{name}.block.2.alpha"] = torch.rand((1, dim, 1), generator=gen) + 0.5
    _conv(sd, f"{name}.block.3", (dim, dim, 1), gen)


def descript_state_dict(seed: int = 0, decoder: bool = True) -> dict[str, torch.Tensor]:
    """Random weights named and shaped like descript's DAC(encoder_dim=8, rates 2,4,5,8, 4x1024)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "encoder.block.0", (ENC_DIM, 1, 7), gen)
    dim = ENC_DIM
    for i, stride in enumerate(RATES):
        for r in range(3):
            _res_unit(sd, f"encoder.block.{i + 1}.block.{r}", dim, gen)
        sd[f"encoder.block.{i + 1}.block.3.alpha"] = torch.rand((1, dim, 1), generator=gen) + 0.5
        _conv(sd, f"encoder.block.{i + 1}.block.4", (dim * 2, dim, 2 * stride), gen)
        dim *= 2
    sd[f"encoder.block.{len(RATES) + 1}.alpha"] = torch.rand((1, dim, 1), generator=gen) + 0.5
    _conv(sd, f"encoder.block.{len(RATES) + 2}", (LATENT, dim, 3), gen)
    for q in range(N_CB):
        _conv(sd, f"quantizer.quantizers.{q}.in_proj", (CB_DIM, LATENT, 1), gen)
        _conv(sd, f"quantizer.quantizers.{q}.out_proj", (LATENT, CB_DIM, 1), gen)
        sd[f"quantizer.quantizers.{q}.codebook.weight"] = torch.randn((CB_SIZE, CB_DIM), generator=gen)
    if decoder:
        _conv(sd, "decoder.model.0", (DEC_DIM, LATENT, 7), gen)
        for i, stride in enumerate(reversed(RATES)):
            d_in, d_out = DEC_DIM // 2**i, DEC_DIM // 2 ** (i + 1)
            sd[f"decoder.model.{i + 1}.block.0.alpha"] = torch.rand((1, d_in, 1), generator=gen) + 0.5
            _conv(sd, f"decoder.model.{i + 1}.block.1", (d_in, d_out, 2 * stride), gen)
            for r in range(3):
                _res_unit(sd, f"decoder.model.{i + 1}.block.{r + 2}", d_out, gen)
        last = DEC_DIM // 2 ** len(RATES)
        sd[f"decoder.model.{len(RATES) + 1}.alpha"] = torch.rand((1, last, 1), generator=gen) + 0.5
        _conv(sd, f"decoder.model.{len(RATES) + 2}", (1, last, 7), gen)
    return sd


KWARGS = {
    "encoder_dim": ENC_DIM,
    "encoder_rates": list(RATES),
    "latent_dim": None,
    "decoder_dim": DEC_DIM,
    "decoder_rates": list(reversed(RATES)),
    "n_codebooks": N_CB,
    "codebook_size": CB_SIZE,
    "codebook_dim": CB_DIM,
    "quantizer_dropout": 0.5,
    "sample_rate": 24000,
}


def _dac_model() -> DacModel:
    cfg = DacConfig(
        encoder_hidden_size=ENC_DIM, downsampling_ratios=list(RATES), decoder_hidden_size=DEC_DIM,
        n_codebooks=N_CB, codebook_size=CB_SIZE, codebook_dim=CB_DIM, sampling_rate=24000,
    )
    model = DacModel(cfg)
    torch.nn.Module.eval(model)
    return model


def test_full_conversion_loads_strictly_into_dac_model() -> None:
    converted = convert_descript_state_dict(descript_state_dict(), keep_decoder=True)
    model = _dac_model()
    model.load_state_dict(converted, strict=True)  # every key and shape, decoder included
    assert not any(k.endswith(("weight_g", "weight_v")) for k in converted)


def test_weight_norm_folded_by_hand_and_first_conv_output() -> None:
    sd = descript_state_dict()
    converted = convert_descript_state_dict(sd)
    v = sd["encoder.block.2.block.4.weight_v"].double().numpy()
    g = sd["encoder.block.2.block.4.weight_g"].double().numpy()
    by_hand = g * v / np.sqrt((v**2).sum(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(converted["encoder.block.1.conv1.weight"].numpy(), by_hand, rtol=1e-5, atol=1e-6)
    model = _dac_model()
    model.load_state_dict(convert_descript_state_dict(sd, keep_decoder=True), strict=True)
    x = torch.randn(1, 1, 640, generator=torch.Generator().manual_seed(5))
    v0, g0 = sd["encoder.block.0.weight_v"], sd["encoder.block.0.weight_g"]
    w0 = g0 * v0 / v0.flatten(1).norm(dim=1).view(-1, 1, 1)
    expected = F.conv1d(x, w0, sd["encoder.block.0.bias"], padding=3)
    with torch.inference_mode():
        np.testing.assert_allclose(model.encoder.conv1(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_tokenizer_from_checkpoint_equals_dac_model_codes() -> None:
    sd = descript_state_dict(seed=3)
    config, weights = convert_descript_checkpoint({"state_dict": sd, "metadata": {"kwargs": KWARGS}})
    assert config == codec_preset("tiny")
    tok = CodecTokenizer(config)
    tok.load_state_dict(weights)
    model = _dac_model()
    model.load_state_dict(convert_descript_state_dict(sd, keep_decoder=True), strict=True)
    x = np.random.default_rng(0).standard_normal(3200).astype(np.float32) * 0.2
    with torch.inference_mode():
        ref = model.encode(torch.from_numpy(x).view(1, 1, -1)).audio_codes[0].numpy()
    assert np.array_equal(tok.encode(x), ref)


def test_fewer_codebooks_drop_later_quantizers() -> None:
    config = config_from_descript_metadata({"kwargs": KWARGS}, n_codebooks=2)
    weights = convert_descript_state_dict(descript_state_dict(), config=config)
    assert not any(k.startswith(("quantizer.quantizers.2.", "decoder.")) for k in weights)
    assert "quantizer.quantizers.1.codebook.weight" in weights


def test_errors_name_keys_and_shapes() -> None:
    config = codec_preset("tiny")
    sd = descript_state_dict(decoder=False)
    with pytest.raises(WeightsError, match=r"encoder\.block\.9\.block\.7\.weight"):
        convert_descript_state_dict(sd | {"encoder.block.9.block.7.weight": torch.zeros(1)})
    broken = dict(sd)
    del broken["encoder.block.1.block.4.bias"]
    with pytest.raises(WeightsError, match=r"missing keys.*encoder\.block\.0\.conv1\.bias"):
        convert_descript_state_dict(broken, config=config)
    broken = dict(sd)
    broken["encoder.block.0.weight_v"] = torch.zeros(3, 1, 7)
    broken["encoder.block.0.weight_g"] = torch.ones(3, 1, 1)
    with pytest.raises(WeightsError, match=r"encoder\.conv1\.weight: expected \(\d+, 1, 7\), "
                                           r"got \(3, 1, 7\)"):
        convert_descript_state_dict(broken, config=config)
    broken = dict(sd)
    del broken["encoder.block.0.weight_g"]
    with pytest.raises(WeightsError, match=r"encoder\.conv1.*weight_g"):
        convert_descript_state_dict(broken)


def test_metadata_to_config() -> None:
    real = dict(KWARGS, encoder_dim=64, n_codebooks=32, decoder_dim=1536)
    assert config_from_descript_metadata({"kwargs": real}) == codec_preset("dac24k")
    with pytest.raises(WeightsError, match="kwargs"):
        config_from_descript_metadata({})
    with pytest.raises(WeightsError, match="unknown keys.*'bogus'"):
        config_from_descript_metadata({"kwargs": KWARGS | {"bogus": 1}})
    with pytest.raises(WeightsError, match="latent_dim"):
        config_from_descript_metadata({"kwargs": KWARGS | {"latent_dim": 77}})
    with pytest.raises(WeightsError, match="codebook_dim"):
        config_from_descript_metadata({"kwargs": KWARGS | {"codebook_dim": [8, 4, 8, 8]}})
    with pytest.raises(WeightsError, match="5 requested"):
        config_from_descript_metadata({"kwargs": KWARGS}, n_codebooks=5)


def test_parametrization_layout_folds() -> None:
    v = torch.randn(4, 2, 3)
    g = torch.rand(4, 1, 1)
    folded = fold_weight_norm({
        "a.parametrizations.weight.original0": g,
        "a.parametrizations.weight.original1": v,
        "a.bias": torch.zeros(4),
    })
    assert set(folded) == {"a.weight", "a.bias"}
    torch.testing.assert_close(folded["a.weight"], torch._weight_norm(v, g, 0))


def test_read_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "weights_24khz.pth"
    torch.save({"state_dict": descript_state_dict(), "metadata": {"kwargs": KWARGS}}, path)
    config, weights = read_descript_checkpoint(path)
    assert config.n_codebooks == N_CB and "encoder.conv2.weight" in weights
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth"):
        read_descript_checkpoint(tmp_path / "bad.pth")


def test_read_checkpoint_errors_start_with_the_file(tmp_path: Path) -> None:
    text = tmp_path / "text.pth"
    text.write_bytes(b"hello, not a weight file\n")
    with pytest.raises(WeightsError, match=f"^{text}: not a readable torch checkpoint"):
        read_descript_checkpoint(text)
    path = tmp_path / "weights_24khz.pth"
    broken = descript_state_dict()
    del broken["encoder.block.1.block.4.bias"]
    torch.save({"state_dict": broken, "metadata": {"kwargs": KWARGS}}, path)
    with pytest.raises(WeightsError) as info:
        read_descript_checkpoint(path)
    assert str(info.value).startswith(f"{path}: descript state dict does not match ")
    assert "missing keys (1): encoder.block.0.conv1.bias" in str(info.value)
    torch.save({"state_dict": {"w": "not a tensor"}, "metadata": {"kwargs": KWARGS}}, path)
    with pytest.raises(WeightsError, match=f"^{path}: descript state_dict: expected a state dict"):
        read_descript_checkpoint(path)
