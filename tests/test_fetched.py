"""Training components: ``models fetch`` of the DCASE2024 parts and ``train init --from-fetched``.

The stand-in host of ``test_fetch`` serves tiny files in the published layouts under the
real hosts' paths: a descript DAC ``.pth`` (GitHub release path), a CNext ``{"model": ...}``
checkpoint (Zenodo path, md5 checked), BART and RoBERTa directories (hub paths). Nothing
here touches the internet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from test_cnext import _frontend_entries
from test_dac_convert import KWARGS, descript_state_dict
from test_enclap_import import _bart_config
from test_fetch import Host, serving
from transformers import BartForConditionalGeneration, RobertaConfig, RobertaModel

from streamcap.cli import main
from streamcap.errors import ConfigError, WeightsError
from streamcap.models.artefacts import RECIPES, BundleRecipe
from streamcap.models.bundle.components import load_components
from streamcap.models.bundle.manifest import load_bundle
from streamcap.models.codecs.descript import read_descript_checkpoint
from streamcap.models.enclap.tokenizer import build_caption_tokenizer
from streamcap.models.fetch import COMPONENT_NAME, fetch_bundle
from streamcap.models.retrieval.cnext import CNEXT_TOY, CNext
from streamcap.training.fetched import FetchedChoice, init_from_fetched

torch.set_num_threads(1)

USED = ("dac-24khz", "bart-base", "roberta-base", "cnext-audioset-bl")


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Artefact name -> the stand-in bytes served for it."""
    tmp = tmp_path_factory.mktemp("standins")
    build_caption_tokenizer(300).backend_tokenizer.model.save(str(tmp))
    vocab, merges = (tmp / "vocab.json").read_bytes(), (tmp / "merges.txt").read_bytes()
    n_tokens = len(build_caption_tokenizer(300))
    torch.manual_seed(0)
    BartForConditionalGeneration(_bart_config(n_tokens)).save_pretrained(tmp / "bart")
    RobertaModel(RobertaConfig(vocab_size=n_tokens, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=130, type_vocab_size=1,
                               pad_token_id=1)).save_pretrained(tmp / "roberta")
    dac = io.BytesIO()
    torch.save({"state_dict": descript_state_dict(), "metadata": {"kwargs": KWARGS}}, dac)
    cnext = CNext(CNEXT_TOY)
    ckpt = io.BytesIO()
    torch.save({"model": dict(cnext.state_dict()) | _frontend_entries(cnext)}, ckpt)
    files = {"dac-24khz/weights": dac.getvalue(), "cnext-audioset-bl/checkpoint": ckpt.getvalue()}
    for name, folder in (("bart-base", "bart"), ("roberta-base", "roberta")):
        files[f"{name}/config.json"] = (tmp / folder / "config.json").read_bytes()
        files[f"{name}/model.safetensors"] = (tmp / folder / "model.safetensors").read_bytes()
        files[f"{name}/vocab.json"] = vocab
        files[f"{name}/merges.txt"] = merges
    return files


def _local(item: BundleRecipe, host: Host, files: dict[str, bytes]) -> BundleRecipe:
    """The real recipe served by ``host``: same paths; the stand-ins' sizes and hashes."""
    parts = {}
    for role, group in item.parts.items():
        changed = []
        for a in group:
            data = files[a.name]
            b = dataclasses.replace(a, size=len(data))
            if a.kind == "url":  # the GitHub/Zenodo path, on the local host
                b = dataclasses.replace(b, repo=host.url + urlsplit(a.repo).path)
                if a.md5 is not None:
                    b = dataclasses.replace(b, md5=hashlib.md5(data).hexdigest())
                if a.sha256 is not None:
                    b = dataclasses.replace(b, sha256=hashlib.sha256(data).hexdigest())
            host.serve(b.url(host.url).removeprefix(host.url), data,
                       lfs=a.filename.endswith((".safetensors", ".pth")))
            changed.append(b)
        parts[role] = tuple(changed)
    return dataclasses.replace(item, parts=parts, bundle_size=1_000_000)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, standins: dict[str, bytes]) -> Iterator[Host]:
    with serving(monkeypatch) as state:
        local = {n: _local(RECIPES[n], state, standins) for n in USED}
        monkeypatch.setattr("streamcap.models.artefacts.RECIPES", {**RECIPES, **local})
        monkeypatch.setattr("streamcap.training.fetched.FETCHED_CNEXT", CNEXT_TOY)
        yield state


def test_fetch_components_then_init_a_bundle_from_them(
        host: Host, standins: dict[str, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    components = tmp_path / "components"
    for name in USED:
        assert main(["models", "fetch", name, "--dir", str(components),
                     "--accept-licences"]) == 0
    assert sorted(p.name for p in components.iterdir()) == sorted(USED)  # no downloads left
    assert (components / "dac-24khz" / "codec.safetensors").is_file()
    capsys.readouterr()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "streamcap").mkdir(parents=True)
    (tmp_path / "cache" / "streamcap" / "components").symlink_to(components)
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line for line in listing.splitlines() if line[:1].strip()}
    size = sum(p.stat().st_size for p in (components / "bart-base").iterdir())
    assert f"[fetched, {size / 1e6:.1f} MB at " in rows["bart-base"]
    assert "streamcap/components/bart-base]" in rows["bart-base"]
    assert "[not fetched]" in rows["bart-large"]
    assert f"from {host.url}/records/10987498/files/convnext_tiny_465mAP_BL_AC_75kit.pth" \
        in listing  # the source, as registered (here: the stand-in host)

    out = tmp_path / "initial"
    assert main(["train", "init", str(out), "--from-fetched", "--max-window-s", "2"]) == 0
    printed = capsys.readouterr().out
    assert "used: captioner: bart-base" in printed and "not used: fluency" in printed
    assert ("random: bart.model.encoder.embed_encodec, bart.model.encoder.clap_projection, "
            "mcm_heads\n") in printed  # what BART lacks, and nothing else
    loaded = load_components(load_bundle(out, verify=True))
    # the codec is descript's checkpoint, converted
    _, dac = read_descript_checkpoint(components / "dac-24khz" / "weights_24khz.pth")
    torch.testing.assert_close(loaded.codec.state_dict()["encoder.conv1.weight"],
                               dac["encoder.conv1.weight"])
    # the captioner carries BART's weights, the encoder positions grown for 2 s windows
    bart = BartForConditionalGeneration.from_pretrained(components / "bart-base")
    bart_state = bart.state_dict()
    captioner = loaded.captioner.state_dict()
    for key in ("model.shared.weight", "model.decoder.layers.1.fc2.weight",
                "model.encoder.layers.0.self_attn.k_proj.weight"):
        torch.testing.assert_close(captioner[f"bart.{key}"], bart_state[key])
    assert loaded.captioner.config.n_codebooks == KWARGS["n_codebooks"]
    assert loaded.captioner.config.max_frames >= 2 * loaded.codec.config.frame_rate_hz
    assert len(loaded.tokenizer) == loaded.captioner.config.vocab_size
    # the retriever: CNext from the Zenodo checkpoint, RoBERTa from the hub directory
    assert loaded.retriever is not None
    cnext = torch.load(components / "cnext-audioset-bl" /
                       "convnext_tiny_465mAP_BL_AC_75kit.pth", weights_only=True)["model"]
    torch.testing.assert_close(loaded.retriever.audio_encoder.state_dict()["norm.weight"],
                               cnext["norm.weight"])
    roberta = RobertaModel.from_pretrained(components / "roberta-base").state_dict()
    key = "encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(loaded.retriever.text_encoder.state_dict()[key], roberta[key])
    assert loaded.retriever.config.text_model_type == "roberta"
    assert loaded.fluency is None


def test_a_wrong_published_md5_is_refused(host: Host, standins: dict[str, bytes],
                                          tmp_path: Path) -> None:
    from streamcap.models import artefacts

    item = artefacts.RECIPES["cnext-audioset-bl"]
    bad = dataclasses.replace(item, parts={"checkpoint": (dataclasses.replace(
        item.artefacts[0], md5="0" * 32),)})
    with pytest.raises(WeightsError, match="expected md5 0{32}") as info:
        fetch_bundle(bad, directory=tmp_path, accept_licences=True, say=lambda line: None)
    assert item.artefacts[0].url() in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "cnext-audioset-bl").exists()
    assert not list(tmp_path.rglob("convnext_tiny_465mAP_BL_AC_75kit.pth"))


def test_group_fetch_skips_what_is_there(host: Host, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("streamcap.models.artefacts.GROUPS",
                        {"dcase2024-components": ("cnext-audioset-bl", "dac-24khz")})
    args = ["models", "fetch", "dcase2024-components", "--dir", str(tmp_path),
            "--accept-licences"]
    assert main(args) == 0
    assert (tmp_path / "cnext-audioset-bl" / COMPONENT_NAME).is_file()
    capsys.readouterr()
    assert main(args) == 0
    assert "dac-24khz: already fetched" in capsys.readouterr().out


def test_a_missing_component_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="streamcap models fetch dac-24khz") as info:
        init_from_fetched(FetchedChoice(), [tmp_path])
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("name", ["bge-base-en-v1.5", "bert-large-uncased"])
def test_wordpiece_text_encoders_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ConfigError, match="WordPiece.*roberta-base"):
        FetchedChoice(text_encoder=name)
    with pytest.raises(ConfigError, match="--bart"):
        FetchedChoice(bart="bart-huge")


def test_init_without_manifest_or_fetched_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "init", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--manifest" in err[0] and "--from-fetched" in err[0]
