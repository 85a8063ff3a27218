"""Caption tokenizers that work offline.

Two ways to get one:

- :func:`build_caption_tokenizer` trains a small byte-level BPE (the same
  scheme as BART's) on the caption corpus shipped in
  ``streamcap/data/caption_corpus.txt``. Nothing is downloaded; training is
  deterministic, so building twice gives byte-identical ``tokenizer.json``.
  It is meant for models trained from scratch and for tests.
- :func:`load_tokenizer` loads the tokenizer a model bundle carries: either a
  ``tokenizer.json`` or BART's ``vocab.json`` + ``merges.txt``.

Every tokenizer has BART's special tokens: ``<s>`` = 0, ``<pad>`` = 1,
``</s>`` = 2, ``<unk>`` = 3, ``<mask>`` = the last id; encoding wraps the
text as ``<s> ... </s>``, and captions are decoded with
``skip_special_tokens=True``.

Caption text is made in one place, :func:`decode_caption`, and cleaned there
by :func:`clean_caption_text`: a byte-level BPE model can emit fragments of a
multi-byte character (decoded as U+FFFD) and control bytes, which must not
reach logs, WebSocket frames or Home Assistant states.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, RobertaTokenizer

from streamcap.errors import WeightsError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
"""BART's first four ids, in order; ``<mask>`` is added last."""
MASK_TOKEN = "<mask>"
DEFAULT_VOCAB_SIZE = 1000
_MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet + specials + <mask>
NO_CAPTION_TEXT = "(no readable caption)"
"""Published instead of a caption whose text is empty once cleaned; such a caption is flagged."""

_SPECIAL_KWARGS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "cls_token": "<s>",
    "sep_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": MASK_TOKEN,
}


class CaptionDecoder(Protocol):
    """The part of a tokenizer that turns token ids into text."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


def clean_caption_text(text: str) -> str:
    """``text`` fit to publish: printable, one line, NFC.

    Drops U+FFFD (a broken UTF-8 fragment) and every control, format,
    surrogate, private-use and unassigned character; turns each run of
    whitespace (newlines and tabs included) into one space and trims the ends;
    normalises to NFC. May return ``""``.
    """
    kept = []
    for ch in text:
        if ch.isspace():
            kept.append(" ")
        elif ch != "\ufffd" and not unicodedata.category(ch).startswith("C"):
            kept.append(ch)
    return " ".join(unicodedata.normalize("NFC", "".join(kept)).split())


def decode_caption(tokenizer: CaptionDecoder, token_ids: Iterable[int]) -> str:
    """The clean caption text of ``token_ids`` (special tokens skipped); may be ``""``."""
    return clean_caption_text(tokenizer.decode(list(token_ids), skip_special_tokens=True))


def caption_corpus() -> list[str]:
    """The built-in caption corpus: one caption per line, blank lines dropped."""
    text = resources.files("streamcap").joinpath("data/caption_corpus.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_caption_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE caption tokenizer, deterministically.

    Args:
        vocab_size: the largest vocabulary wanted, ``<mask>`` included; the
            result is smaller when the corpus runs out of pairs seen twice.
        corpus: training lines; the built-in caption corpus by default.

    Returns:
        A fast tokenizer with BART's special-token layout (see module doc).
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"build_caption_tokenizer: vocab_size must be >= {_MIN_VOCAB_SIZE} "
            f"(256 bytes + 5 special tokens), got {vocab_size}"
        )
    lines = caption_corpus() if corpus is None else corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # room for <mask>
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens([MASK_TOKEN])
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, **_SPECIAL_KWARGS
    )
    _check_specials(wrapped, "built caption tokenizer")
    return wrapped


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> list[Path]:
    """Write ``tokenizer.json`` and its config files into ``directory``; return the paths."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in tokenizer.save_pretrained(str(directory))]


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a bundle's tokenizer: ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``.

    Raises:
        WeightsError: the directory holds neither layout, the files cannot be
            parsed, or the special tokens are not at BART's ids.
    """
    root = Path(directory)
    tokenizer_json = root / "tokenizer.json"
    vocab, merges = root / "vocab.json", root / "merges.txt"
    tokenizer: PreTrainedTokenizerFast
    try:
        if tokenizer_json.is_file():
            tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
                tokenizer_file=str(tokenizer_json), **_SPECIAL_KWARGS
            )
            source = tokenizer_json
        elif vocab.is_file() and merges.is_file():
            # vocab=/merges= take paths; vocab_file=/merges_file= would silently
            # build an empty vocabulary on transformers 5.
            tokenizer = RobertaTokenizer(
                vocab=str(vocab),
                merges=str(merges),
                bos_token="<s>",
                eos_token="</s>",
                sep_token="</s>",
                cls_token="<s>",
                unk_token="<unk>",
                pad_token="<pad>",
                mask_token=MASK_TOKEN,
            )
            source = vocab
        else:
            raise WeightsError(
                f"{root}: no tokenizer found; expected tokenizer.json, or vocab.json and merges.txt"
            )
    except WeightsError:
        raise
    except Exception as exc:  # the tokenizers library raises bare Exceptions on bad files
        raise WeightsError(f"{root}: cannot load the tokenizer: {exc}") from exc
    _check_specials(tokenizer, str(source))
    return tokenizer


def _check_specials(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Check BART's special-token ids; raise ``WeightsError`` naming ``where``."""
    expected = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    expected[MASK_TOKEN] = len(tokenizer) - 1
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in expected}
    if got != expected:
        raise WeightsError(f"{where}: special token ids are {got}, expected {expected}")
