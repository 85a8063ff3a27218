"""Importing an EnCLAP checkpoint in the reference key layout (tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from transformers import BartConfig, BartForConditionalGeneration

from streamcap.cli import main
from streamcap.errors import ModelError, WeightsError
from streamcap.models.bundle.components import load_components
from streamcap.models.bundle.manifest import load_bundle
from streamcap.models.enclap.published import ImportOptions, import_enclap
from streamcap.models.enclap.tokenizer import build_caption_tokenizer

torch.set_num_threads(1)

K, D_CLAP, POSITIONS, D = 4, 32, 64, 32
SMALL = ImportOptions(codec_preset="encodec-tiny", clap_preset="clap-tiny", max_window_s=0.5)


def _bart_config(vocab: int) -> BartConfig:
    return BartConfig(vocab_size=vocab, d_model=D, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, max_position_embeddings=POSITIONS,
                      scale_embedding=False, dropout=0.0, attention_dropout=0.0,
                      activation_dropout=0.0, tie_word_embeddings=True)


def _reference_state(vocab: int) -> dict[str, torch.Tensor]:
    """A random state dict in the exact key layout of EnClapBartForConditionalGeneration."""
    gen = torch.Generator().manual_seed(0)
    bart = BartForConditionalGeneration(_bart_config(vocab))
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in bart.state_dict().items()}
    shared = state["model.shared.weight"]
    for key in ("lm_head.weight", "model.encoder.embed_tokens.weight",
                "model.decoder.embed_tokens.weight"):
        state[key] = shared
    for i in range(K):
        table = torch.randn(1088, D, generator=gen) * 0.1
        table[1024] = 0.0
        state[f"model.encoder.embed_encodec.{i}.weight"] = table
        state[f"mcm_heads.{i}.weight"] = torch.randn(1024, D, generator=gen) * 0.1
        state[f"mcm_heads.{i}.bias"] = torch.randn(1024, generator=gen) * 0.1
    state["model.encoder.clap_projection.weight"] = torch.randn(D, D_CLAP, generator=gen) * 0.1
    state["model.encoder.clap_projection.bias"] = torch.randn(D, generator=gen) * 0.1
    return state


def _write_checkpoint(directory: Path, state: dict[str, torch.Tensor], vocab: int,
                      **config_changes: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {**_bart_config(vocab).to_dict(), "architectures": ["BartModel"],
              "num_rvq": K, "d_clap": D_CLAP, "encodec_vocab_size": 1024,
              "encodec_pad_token_id": 1024, **config_changes}
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bart_tok")
    build_caption_tokenizer(300).backend_tokenizer.model.save(str(directory))
    assert (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    vocab = 320
    directory = _write_checkpoint(tmp_path_factory.mktemp("enclap") / "ckpt",
                                  _reference_state(vocab), vocab)
    for name in ("vocab.json", "merges.txt"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


def _reference_logits(state: dict[str, torch.Tensor], vocab: int, codes: torch.Tensor,
                      clap: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
    """EnCLAP's forward computed directly from the raw reference state dict."""
    n = codes.shape[1]
    shared = state["model.encoder.embed_tokens.weight"]
    rows = [F.linear(clap, state["model.encoder.clap_projection.weight"],
                     state["model.encoder.clap_projection.bias"]), shared[0]]
    for t in range(n):
        frame = torch.zeros(D)
        for i in range(K):
            frame = frame + state[f"model.encoder.embed_encodec.{i}.weight"][codes[i, t]]
        rows.append(frame)
    rows.append(shared[2])
    x = torch.stack(rows)  # (n + 3, D): [CLAP, <s>, codes, </s>]
    table = state["model.encoder.embed_positions.weight"]
    positions = torch.cat([torch.zeros(1, D), table[2:2 + n + 2]])  # shifted right by one
    h = F.layer_norm(x + positions, (D,), state["model.encoder.layernorm_embedding.weight"],
                     state["model.encoder.layernorm_embedding.bias"])
    bart = BartForConditionalGeneration(_bart_config(vocab))
    torch.nn.Module.eval(bart)
    bart_state = {k: v for k, v in state.items()
                  if not k.startswith(("mcm_heads", "model.encoder.embed_encodec",
                                       "model.encoder.clap_projection"))}
    bart.load_state_dict(bart_state, strict=True)
    with torch.no_grad():
        hidden = h[None]
        for layer in bart.model.encoder.layers:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        logits: torch.Tensor = bart(encoder_outputs=(hidden,),
                                    decoder_input_ids=decoder_ids[None]).logits
    return logits[0]


def test_imported_logits_equal_reference_computation(checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    report = import_enclap(checkpoint, tmp_path / "bundle",
                           ImportOptions(codec_preset="encodec-tiny", clap_preset="clap-tiny",
                                         max_window_s=2.0))
    assert report.config.max_frames == 150  # grown from 61 (= 64 - 3) to 2 s at 75 Hz
    assert len(report.warnings) == 2
    bundle = load_bundle(report.path)
    assert bundle.decoding["mode"] == "beam" and bundle.decoding["num_beams"] == 4
    assert bundle.component_configs["codec"]["kind"] == "encodec"
    assert bundle.component_configs["codec"]["random_weights"] is True
    assert bundle.component_configs["seq_embedder"]["kind"] == "clap"
    assert "retriever" not in bundle.component_configs
    components = load_components(bundle)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 1024, (K, 20), generator=gen)
    clap = torch.randn(D_CLAP, generator=gen)
    decoder_ids = torch.tensor([2, 0, 57, 99, 14, 7])
    want = _reference_logits(state, 320, codes, clap, decoder_ids)
    model = components.captioner
    with torch.no_grad():
        encoding = model.encode(codes[None], clap[None])
        logits = model.decode(decoder_ids[None], encoding).logits
    assert logits is not None
    got = logits[0]
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    table = model.position_table
    assert table.shape[0] == 150 + 3 + 2
    assert torch.equal(table[: POSITIONS + 2], state["model.encoder.embed_positions.weight"])


def test_tied_copies_may_be_absent(checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    for key in ("lm_head.weight", "model.encoder.embed_tokens.weight"):
        del state[key]
    directory = _write_checkpoint(tmp_path / "ckpt", state, 320)
    report = import_enclap(directory, tmp_path / "b",
                           ImportOptions(codec_preset="encodec-tiny", clap_preset="clap-tiny",
                                         tokenizer=checkpoint))
    assert report.config.max_frames == 2250  # default 30 s


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("model.encoder.layers.1.fc1.weight"),
     r"missing keys \(1\): model.encoder.layers.1.fc1.weight"),
    (lambda s: s.update({"model.encoder.extra.weight": torch.zeros(2)}),
     r"unexpected keys \(1\): model.encoder.extra.weight"),
    (lambda s: s.update({"mcm_heads.2.bias": torch.zeros(1025)}),
     r"mcm_heads.2.bias: expected \(1024,\), got \(1025,\)"),
    (lambda s: s.update({"lm_head.weight": s["lm_head.weight"] + 1}),
     r"lm_head.weight: tied to model.shared.weight"),
])
def test_bad_weights_are_named(checkpoint: Path, tmp_path: Path, change: object,
                               message: str) -> None:
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    change(state)  # type: ignore[operator]
    directory = _write_checkpoint(tmp_path / "ckpt", state, 320)
    with pytest.raises(WeightsError, match=message):
        import_enclap(directory, tmp_path / "b",
                      ImportOptions(tokenizer=checkpoint, codec_preset="encodec-tiny",
                                    clap_preset="clap-tiny"))


def test_bad_weight_files_are_named(checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    directory = _write_checkpoint(tmp_path / "ckpt", state, 320)
    weights = directory / "pytorch_model.bin"
    weights.write_bytes(b"hello, not a weight file\n")
    with pytest.raises(WeightsError, match=f"^{weights}: not a readable torch checkpoint"):
        import_enclap(directory, tmp_path / "b", SMALL)
    weights.unlink()
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(WeightsError,
                       match=f"^{directory / 'model.safetensors'}: not a readable safetensors"):
        import_enclap(directory, tmp_path / "b", SMALL)


def test_bad_directories(checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"config.json: missing"):
        import_enclap(empty, tmp_path / "b", SMALL)
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    t5 = _write_checkpoint(tmp_path / "t5", state, 320, model_type="t5",
                           architectures=["T5ForConditionalGeneration"])
    with pytest.raises(ModelError, match=r"model_type is 't5'; expected 'bart'"):
        import_enclap(t5, tmp_path / "b", SMALL)
    arch = _write_checkpoint(tmp_path / "arch", state, 320,
                             architectures=["BertForMaskedLM"])
    with pytest.raises(ModelError, match=r"architectures \['BertForMaskedLM'\] is not an EnCLAP"):
        import_enclap(arch, tmp_path / "b", SMALL)
    no_tok = _write_checkpoint(tmp_path / "notok", state, 320)
    with pytest.raises(ModelError, match=r"vocab.json and merges.txt.*--tokenizer"):
        import_enclap(no_tok, tmp_path / "b", SMALL)
    wrong_k = _write_checkpoint(tmp_path / "k", state, 320, num_rvq=16)
    with pytest.raises(WeightsError, match=r"missing keys \(36\): mcm_heads.10.bias"):
        import_enclap(wrong_k, tmp_path / "b", ImportOptions(tokenizer=checkpoint))


def test_cli_import_then_caption(checkpoint: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    code = main(["models", "import-enclap", str(checkpoint), "--output", str(bundle),
                 "--codec-preset", "encodec-tiny", "--clap-preset", "clap-tiny",
                 "--max-window-s", "10"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "WARNING: EnCodec weights were not given" in out
    assert main(["models", "verify", str(bundle)]) == 0
    wav = tmp_path / "noise.wav"
    rng = np.random.default_rng(0)
    sf.write(wav, (0.1 * rng.standard_normal(48000 * 15)).astype(np.float32), 48000)
    capsys.readouterr()
    code = main(["caption", "--model", str(bundle), "--window-s", "10", "--hop-s", "5",
                 "--json", str(wav)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert len(rows) == 3  # 0-10 s, 5-15 s and a padded 10-20 s window
    assert all(row["model"].startswith("enclap-base-ckpt-") for row in rows)
    assert all(len(row["candidates"]) == 1 for row in rows)  # beam search: one caption
    assert set(rows[0]["stages"]) >= {"codec", "clap", "encoder", "beam"}
