"""A small WordPiece tokenizer trained in the test, for BERT-style encoders."""

from __future__ import annotations

from tokenizers import BertWordPieceTokenizer
from transformers import PreTrainedTokenizerFast

CAPTIONS = [
    "a dog barks loudly in the distance",
    "rain falls on a metal roof",
    "birds are chirping while a car passes by",
    "a man speaks and a door closes",
]


def wordpiece_tokenizer(captions: list[str] | None = None,
                        vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """Train a lowercase WordPiece vocabulary on ``captions`` (default: :data:`CAPTIONS`)."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(captions or CAPTIONS, vocab_size=vocab_size, min_frequency=1)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=wordpiece._tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
