"""The artefact registry: one home for every URL, size and licence."""

from __future__ import annotations

import dataclasses

import pytest

from streamcap.errors import ModelError
from streamcap.models.artefacts import ENCLAP_BASE, RECIPES, Artefact, recipe


def test_hub_urls_follow_the_repo_type() -> None:
    weights = ENCLAP_BASE.parts["checkpoint"][1]
    assert weights.url() == ("https://huggingface.co/spaces/enclap-team/enclap/resolve/"
                             "73baeaed68b54f79abff2b05b37eb2ba7b51d382/ckpt/pytorch_model.bin")
    clap = ENCLAP_BASE.parts["clap"][0]
    assert clap.url("http://h:1/") == \
        "http://h:1/lukewys/laion_clap/resolve/main/630k-audioset-fusion-best.pt"
    assert weights.local_name == "pytorch_model.bin"


def test_every_artefact_names_a_licence_and_a_size() -> None:
    for item in RECIPES.values():
        for a in item.artefacts:
            assert a.licence and a.licence_url.startswith("https://") and a.size > 0
    assert {r for r in ENCLAP_BASE.parts} == {"checkpoint", "encodec", "clap", "tokenizer"}


def test_bad_entries_and_names_are_refused() -> None:
    a = ENCLAP_BASE.artefacts[0]
    with pytest.raises(ModelError, match="sha256"):
        dataclasses.replace(a, sha256="ABC")
    with pytest.raises(ModelError, match="size"):
        Artefact(name="x", kind="url", repo="https://e.invalid/x", filename="x", size=0,
                 sha256=None, licence="MIT", licence_url="https://e.invalid")
    with pytest.raises(ModelError, match="enclap-base"):
        recipe("enclap-hugeee")


def test_dcase2024_components_are_registered_with_their_published_hashes() -> None:
    from streamcap.models.artefacts import COMPONENTS, GROUPS, recipes_for

    by_name = {c.name: c for c in COMPONENTS}
    fense = by_name["fense-echecker"].artefacts[0]
    assert fense.sha256 == "1a719f090af70614bbdb9f9437530b7e133c48cfa4a58d964de0d47fc974a2fa"
    assert fense.url().startswith("https://github.com/") and fense.url().endswith(
        "/echecker_clotho_audiocaps_base.ckpt")
    dac = by_name["dac-24khz"]
    assert dac.builder == "dac" and dac.artefacts[0].url().endswith("/0.0.4/weights_24khz.pth")
    for name, record in (("cnext-audioset", "8020843"), ("cnext-audioset-bl", "10987498")):
        cnext = by_name[name].artefacts[0]
        assert f"zenodo.org/records/{record}/files/convnext_tiny_" in cnext.url()
        assert cnext.md5 is not None and len(cnext.md5) == 32
    for name in ("bart-base", "bart-large", "bge-base-en-v1.5", "bge-large-en-v1.5",
                 "bert-base-uncased", "bert-large-uncased", "roberta-base", "roberta-large"):
        files = {a.filename for a in by_name[name].artefacts}
        assert {"config.json", "model.safetensors"} <= files
    assert {r.name for r in recipes_for("dcase2024-components")} == set(by_name)
    assert set(GROUPS["dcase2024-components"]) == set(by_name)
    assert all(c.is_component for c in COMPONENTS) and not ENCLAP_BASE.is_component
    with pytest.raises(ModelError, match="md5"):
        dataclasses.replace(fense, md5="xyz")
