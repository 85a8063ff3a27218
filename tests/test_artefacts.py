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
