"""Dynamic int8: which layers it replaces, and a tiny captioner that still captions with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from streamcap.audio.windowing import Windower
from streamcap.errors import ModelError
from streamcap.messages import make_block
from streamcap.models.captioner import Captioner, build_captioner
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.quantize import (
    INT8_COMPONENTS,
    is_int8,
    quantize_components,
    quantize_linears,
)
from streamcap.models.runtime import INT8_EXPLICIT

DYNAMIC = torch.ao.nn.quantized.dynamic.Linear
DECODING = DecodingOptions(n_candidates=3, max_new_tokens=4, seed=0)
RATE = 16000
STREAMCAP = Path(sys.executable).parent / "streamcap"


def tiny(int8: tuple[str, ...] = ()) -> Captioner:
    return build_captioner("tiny", DECODING, device=torch.device("cpu"), dtype=torch.float32,
                           int8=int8)


@pytest.fixture(scope="module")
def int8_captioner() -> Captioner:
    return tiny(INT8_EXPLICIT)


def test_int8_replaces_the_decoder_head_and_text_encoders_only(int8_captioner: Captioner) -> None:
    c = int8_captioner.components
    bart = c.captioner.bart
    layer = bart.model.decoder.layers[0]
    for module in (layer.fc1, layer.fc2, layer.self_attn.q_proj, layer.encoder_attn.k_proj,
                   bart.lm_head):
        assert isinstance(module, DYNAMIC)
    assert not is_int8(bart.model.encoder)  # the encoder stays float32
    assert c.retriever is not None and is_int8(c.retriever.text_encoder)
    assert not is_int8(c.retriever.audio_encoder)
    assert c.fluency is not None and is_int8(c.fluency.model.encoder)
    assert type(c.fluency.model.clf) is nn.Linear  # the filter reads clf.weight
    # the token embedding the head was tied to stays a float tensor
    assert bart.model.shared.weight.dtype == torch.float32


def test_a_tiny_int8_captioner_still_captions(int8_captioner: Captioner) -> None:
    audio = 0.1 * np.random.default_rng(0).standard_normal(11 * RATE).astype(np.float32)
    block = make_block(source_id="s", start_sample=0, sample_rate_hz=RATE, samples=audio,
                       captured_at=0.0)
    [window] = Windower("s", 10.0, 10.0, int8_captioner.sample_rates_hz).feed(block).windows
    result = int8_captioner.caption(window)
    assert result.caption.text and np.isfinite(result.caption.score)
    assert result.caption.candidates
    assert {"sampling", "text_encoder", "fluency"} <= set(result.stage_seconds)
    assert result.embedding.vector.shape[0] > 0


def test_every_component_can_be_made_int8() -> None:
    captioner = tiny()
    counts = quantize_components(captioner.components, INT8_COMPONENTS)
    assert set(counts) == set(INT8_COMPONENTS) and all(n > 0 for n in counts.values())
    retriever = captioner.components.retriever
    assert retriever is not None and is_int8(retriever.audio_encoder)
    assert is_int8(captioner.components.captioner.bart.model.encoder)
    # a second pass finds nothing left to replace
    assert quantize_components(captioner.components, ["encoder"]) == {"encoder": 0}


def test_bad_requests_are_model_errors() -> None:
    captioner = tiny()
    with pytest.raises(ModelError, match="unknown component.*lm_head"):
        quantize_components(captioner.components, ["lm_head"])
    with pytest.raises(ModelError, match="int8 components need float32"):
        build_captioner("tiny", DECODING, device=torch.device("cpu"), dtype=torch.bfloat16,
                        int8=["decoder"])


def test_a_bf16_linear_is_refused_not_converted() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).to(torch.bfloat16)
    with pytest.raises(ModelError, match=r"needs float32 layers; layer '0' is torch\.bfloat16"):
        quantize_linears(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.bfloat16  # untouched
    model.float()
    assert quantize_linears(model) == 1
    assert isinstance(model[0], DYNAMIC)
    out = model(torch.ones(2, 8))
    assert out.dtype == torch.float32 and out.shape == (2, 4)


@pytest.mark.slow
def test_streamcap_caption_with_precision_int8(tmp_path: Path) -> None:
    if not STREAMCAP.exists():
        pytest.skip(f"{STREAMCAP} is missing: pip install -e . in the venv")
    audio = 0.1 * np.random.default_rng(1).standard_normal(12 * RATE).astype(np.float32)
    sf.write(tmp_path / "noise.wav", audio, RATE, subtype="FLOAT")
    config = tmp_path / "int8.toml"
    config.write_text('[model]\nprecision = "int8"\nthreads = 1\n\n[model.decoding]\n'
                      "n_candidates = 2\nmax_new_tokens = 4\nseed = 0\n")
    done = subprocess.run([str(STREAMCAP), "caption", "--model", "tiny", "--config", str(config),
                           "--json", str(tmp_path / "noise.wav")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows and all(isinstance(r["text"], str) and r["text"] for r in rows)
    assert "decoder=int8" in done.stderr and "text_encoder=int8" in done.stderr
