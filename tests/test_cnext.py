"""CNext audio encoder: shapes, pooling, key layout, checkpoint loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamcap.errors import ConfigError, ModelError, WeightsError
from streamcap.models.retrieval.cnext import (
    CNEXT_TINY,
    CNEXT_TOY,
    CNext,
    CNextConfig,
    load_cnext_checkpoint,
)

torch.set_num_threads(1)

# Published ConvNeXt-Tiny audio encoder, trainable parameters incl. bn0 affine
# and the 527-class head (topel/audioset-convnext-inf checkpoints/config.yaml).
PUBLISHED_TINY_PARAMS = 28_222_767


def _toy(seed: int = 0) -> CNext:
    torch.manual_seed(seed)
    return CNext(CNEXT_TOY).eval()


def _published_layout(depths: tuple[int, ...], with_head: bool) -> set[str]:
    keys = {
        f"bn0.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    keys |= {"downsample_layers.0.0.weight", "downsample_layers.0.0.bias"}
    keys |= {"downsample_layers.0.1.weight", "downsample_layers.0.1.bias"}
    for i in (1, 2, 3):
        keys |= {f"downsample_layers.{i}.{j}.{p}" for j in (0, 1) for p in ("weight", "bias")}
    for i, depth in enumerate(depths):
        for j in range(depth):
            for part in ("dwconv", "norm", "pwconv1", "pwconv2"):
                keys |= {f"stages.{i}.{j}.{part}.weight", f"stages.{i}.{j}.{part}.bias"}
            keys.add(f"stages.{i}.{j}.gamma")
    keys |= {"norm.weight", "norm.bias"}
    if with_head:
        keys |= {"head_audioset.weight", "head_audioset.bias"}
    return keys


def _frontend_entries(model: CNext) -> dict[str, torch.Tensor]:
    cfg = model.config.mel
    n = torch.arange(cfg.n_fft, dtype=torch.float64)
    k = torch.arange(cfg.n_freqs, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / cfg.n_fft)
    angle = 2 * math.pi * torch.outer(k, n) / cfg.n_fft
    return {
        "spectrogram_extractor.stft.conv_real.weight": (torch.cos(angle) * window)[
            :, None, :
        ].float(),
        "spectrogram_extractor.stft.conv_imag.weight": (-torch.sin(angle) * window)[
            :, None, :
        ].float(),
        "logmel_extractor.melW": model.frontend.mel_basis.clone(),
    }


def test_published_tiny_param_count_and_layout() -> None:
    model = CNext(CNEXT_TINY)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_TINY_PARAMS
    assert set(model.state_dict()) == _published_layout((3, 3, 9, 3), with_head=True)
    stem_block = model.downsample_layers[0]
    assert isinstance(stem_block, torch.nn.Sequential)
    stem = stem_block[0]
    assert isinstance(stem, torch.nn.Conv2d)
    assert stem.weight.shape == (96, 1, 4, 4)
    assert stem.padding == (4, 0)
    headless = CNext(CNextConfig(num_classes=0))
    assert sum(p.numel() for p in headless.parameters()) == PUBLISHED_TINY_PARAMS - (
        768 * 527 + 527
    )


def test_toy_shapes_and_pooling() -> None:
    model = _toy()
    wave = torch.randn(2, 32_000) * 0.1
    with torch.no_grad():
        out = model(wave)
        # 101 frames -> stem (101 + 8 - 4) // 4 + 1 = 27 -> 13 -> 6 -> 3
        assert out.frames.shape == (2, 64, 3)
        assert out.clip.shape == (2, 64)
        assert out.logits is not None and out.logits.shape == (2, 10)
        fmap = model.feature_map(model.normalise(model.frontend(wave)))
        assert fmap.shape == (2, 64, 3, 2)  # 64 mels -> 16 -> 8 -> 4 -> 2
        frames = fmap.mean(dim=3)
        torch.testing.assert_close(out.frames, frames)
        pooled = frames.max(dim=2).values + frames.mean(dim=2)
        expected = torch.nn.functional.layer_norm(
            pooled, (64,), model.norm.weight, model.norm.bias, eps=1e-6
        )
        torch.testing.assert_close(out.clip, expected)
    # batch items are independent in eval mode
    with torch.no_grad():
        single = model(wave[1:]).clip
    torch.testing.assert_close(single[0], out.clip[1], atol=1e-5, rtol=1e-5)


def test_batchnorm_acts_per_mel_bin() -> None:
    model = _toy()
    assert model.bn0.running_mean is not None and model.bn0.running_var is not None
    with torch.no_grad():
        model.bn0.running_mean.copy_(torch.arange(64, dtype=torch.float32))
        model.bn0.running_var.fill_(1.0)
        x = torch.zeros(1, 1, 5, 64)
        y = model.normalise(x)
    expected = -torch.arange(64, dtype=torch.float32) / math.sqrt(1.0 + model.bn0.eps)
    torch.testing.assert_close(y[0, 0, 3], expected)


def test_too_short_input() -> None:
    model = _toy()
    n = model.min_samples()
    with torch.no_grad():
        model(torch.zeros(1, n))
    with pytest.raises(ModelError, match="too short"):
        model(torch.zeros(1, n - 320))


def test_load_published_format_roundtrip(tmp_path: Path) -> None:
    source = _toy(seed=1)
    sd = dict(source.state_dict()) | _frontend_entries(source)
    path = tmp_path / "cnext.pth"
    torch.save({"model": sd, "optimizer": {}}, path)
    loaded = load_cnext_checkpoint(path, config=CNEXT_TOY)
    assert not loaded.training
    wave = torch.randn(1, 16_000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave).clip, source(wave).clip)
    st_path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st_path))
    from_st = load_cnext_checkpoint(st_path, config=CNEXT_TOY)
    torch.testing.assert_close(from_st.norm.weight, source.norm.weight)


def test_missing_unexpected_and_shape_errors_name_keys() -> None:
    sd = dict(_toy().state_dict())
    del sd["stages.2.0.gamma"]
    sd["stages.9.0.gamma"] = torch.zeros(3)
    sd["norm.weight"] = torch.zeros(7)
    with pytest.raises(WeightsError) as info:
        load_cnext_checkpoint({"model": sd}, config=CNEXT_TOY)
    message = str(info.value)
    assert message.startswith("state dict: CNext checkpoint does not match the model: ")
    assert "missing keys (1): stages.2.0.gamma;" in message
    assert "unexpected keys (1): stages.9.0.gamma;" in message
    assert f"norm.weight: expected ({CNEXT_TOY.embed_dim},), got (7,)" in message


def test_frontend_mismatch_detected() -> None:
    model = _toy()
    sd = dict(model.state_dict()) | _frontend_entries(model)
    sd["logmel_extractor.melW"] = sd["logmel_extractor.melW"] * 1.05
    with pytest.raises(WeightsError, match="logmel_extractor.melW"):
        load_cnext_checkpoint(sd, config=CNEXT_TOY)
    load_cnext_checkpoint(sd, config=CNEXT_TOY, check_frontend=False)
    sd = dict(model.state_dict()) | _frontend_entries(model)
    sd["spectrogram_extractor.stft.conv_imag.weight"] = -sd[
        "spectrogram_extractor.stft.conv_imag.weight"
    ]
    with pytest.raises(WeightsError, match="conv_imag"):
        load_cnext_checkpoint(sd, config=CNEXT_TOY)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="absent.pth: no such file"):
        load_cnext_checkpoint(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth: not a readable torch checkpoint"):
        load_cnext_checkpoint(junk)
    text = tmp_path / "text.pth"
    text.write_bytes(b"hello, not a weight file\n")
    with pytest.raises(WeightsError, match="text.pth: not a readable torch checkpoint"):
        load_cnext_checkpoint(text)
    cut = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="cut.safetensors: not a readable safetensors file"):
        load_cnext_checkpoint(cut)


def test_config_dict_roundtrip_and_validation() -> None:
    assert CNextConfig.from_dict(CNEXT_TOY.to_dict()) == CNEXT_TOY
    with pytest.raises(ConfigError, match="audio.widths: unknown key"):
        CNextConfig.from_dict({"widths": [1, 2, 3, 4]})
    with pytest.raises(ConfigError, match="audio.mel.hop: unknown key"):
        CNextConfig.from_dict({"mel": {"hop": 1}})
    with pytest.raises(ConfigError, match="audio.dims"):
        CNextConfig(dims=(8, 16, 32))  # type: ignore[arg-type]
