"""Tests of the offline caption tokenizer: build, determinism, save/load, both bundle layouts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from streamcap.errors import WeightsError
from streamcap.models.enclap.tokenizer import (
    build_caption_tokenizer,
    caption_corpus,
    clean_caption_text,
    decode_caption,
    load_tokenizer,
    save_tokenizer,
)

CAPTION = "A dog barks while rain falls on a tin roof."


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_caption_tokenizer(600)


def test_corpus_is_substantial() -> None:
    lines = caption_corpus()
    assert len(lines) >= 300
    assert len({line.lower() for line in lines}) == len(lines)


def test_special_token_layout(tok: PreTrainedTokenizerFast) -> None:
    assert len(tok) == 600
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 599]) == [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        "<mask>",
    ]
    assert (
        tok.bos_token_id,
        tok.pad_token_id,
        tok.eos_token_id,
        tok.unk_token_id,
        tok.mask_token_id,
    ) == (0, 1, 2, 3, 599)


def test_encode_decode_round_trip(tok: PreTrainedTokenizerFast) -> None:
    ids = tok(CAPTION)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert len(ids) < len(CAPTION) // 2  # merges learned from the corpus compress captions
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    odd = "Zebra café 日本 🙂"  # never seen: byte-level BPE still covers it
    assert tok.decode(tok(odd)["input_ids"], skip_special_tokens=True) == odd


def test_vocab_size_is_an_upper_bound() -> None:
    assert len(build_caption_tokenizer(100_000)) < 100_000  # the corpus runs out of pairs
    with pytest.raises(ValueError, match="vocab_size must be >= 261"):
        build_caption_tokenizer(200)


def test_building_twice_is_identical(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    again = build_caption_tokenizer(600)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    save_tokenizer(tok, tmp_path / "a")
    digest = hashlib.sha256((tmp_path / "a" / "tokenizer.json").read_bytes()).hexdigest()
    # a fresh interpreter (fresh hash seeds) writes the same file
    code = (
        "import sys; from streamcap.models.enclap.tokenizer import build_caption_tokenizer, save_tokenizer; "
        "save_tokenizer(build_caption_tokenizer(600), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, timeout=120)
    assert hashlib.sha256((tmp_path / "b" / "tokenizer.json").read_bytes()).hexdigest() == digest


def test_save_and_load_tokenizer_json(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    paths = save_tokenizer(tok, tmp_path / "bundle")
    assert (tmp_path / "bundle" / "tokenizer.json") in paths
    loaded = load_tokenizer(tmp_path / "bundle")
    assert loaded(CAPTION)["input_ids"] == tok(CAPTION)["input_ids"]
    assert len(loaded) == len(tok) and loaded.mask_token_id == 599


def test_load_vocab_and_merges(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tok.backend_tokenizer.model.save(str(tmp_path))  # BART-style vocab.json + merges.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    loaded = load_tokenizer(tmp_path)
    ids = loaded(CAPTION)["input_ids"]
    assert ids == tok(CAPTION)["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == CAPTION


def test_missing_or_broken_bundle_raises(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="expected tokenizer.json, or vocab.json and merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- caption text


@pytest.mark.parametrize(("raw", "clean"), [
    ("a dog barks", "a dog barks"),
    ("  a\tdog\nbarks\r\n ", "a dog barks"),
    ("a dog\x00 barks\x07", "a dog barks"),
    ("rain\ufffd\ufffd falls", "rain falls"),
    ("cafe\u0301 noise", "caf\u00e9 noise"),  # NFC
    ("bell\u200b rings\u202e", "bell rings"),  # format characters
    ("line\u2028break\x85here", "line break here"),
    ("\ufffd\x00\x1f", ""),
    ("日本語 の 音", "日本語 の 音"),
])
def test_clean_caption_text(raw: str, clean: str) -> None:
    assert clean_caption_text(raw) == clean
    assert clean_caption_text(clean) == clean


def test_decode_caption_drops_broken_byte_fragments(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("a dog \u00e9\x00 barks")["input_ids"]
    raw = tok.decode(ids[:-1], skip_special_tokens=True)
    assert "\x00" in raw
    assert decode_caption(tok, ids) == "a dog \u00e9 barks"
    # cut inside the two bytes of "é": the raw text holds U+FFFD, the caption does not
    for end in range(len(ids)):
        text = decode_caption(tok, ids[:end])
        assert "\ufffd" not in text and all(ch.isprintable() for ch in text)
