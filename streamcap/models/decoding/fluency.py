"""Fluency filter: a FENSE-style error detector for generated captions.

A BERT encoder reads the caption; its [CLS] last hidden state goes through
dropout and ``Linear(hidden, 6)``. Each output is an independent sigmoid
(multi-label) for one synthetic corruption: ``add_tail``, ``repeat_event``,
``repeat_adv``, ``remove_conj``, ``remove_verb`` and ``error`` (any of them).
A caption is flagged as disfluent when ``sigmoid(error logit) > 0.9``.

Text is preprocessed as the published detectors were trained: every
character that is neither a word character nor whitespace is removed, the
rest lowercased, then tokenised to exactly 64 tokens (padded, truncated).

Published checkpoints are ``torch.load`` dicts ``{"model_type", "num_classes",
"state_dict"}``; ``model_type`` is a Hugging Face hub name, mapped here to
built-in BERT sizes so nothing is fetched. The tokenizer files
(``vocab.txt`` or ``tokenizer.json``) must be supplied from a local directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from streamcap.errors import ConfigError, ModelError, WeightsError
from streamcap.models.bundle.weights import check_state, read_checkpoint, state_dict_from

__all__ = [
    "ERROR_CLASSES",
    "FENSE_BERT_SIZES",
    "FenseClassifier",
    "FluencyFilter",
    "FluencyOptions",
    "bert_config_for",
    "load_fense_checkpoint",
    "preprocess",
]

#: Output classes of the published detectors, in logit order; the last is the verdict.
ERROR_CLASSES = ("add_tail", "repeat_event", "repeat_adv", "remove_conj", "remove_verb", "error")

#: BERT sizes of the published detectors' ``model_type`` names:
#: (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size).
FENSE_BERT_SIZES: Mapping[str, tuple[int, int, int, int]] = {
    "bert-base-uncased": (768, 12, 12, 3072),
    "prajjwal1/bert-tiny": (128, 2, 2, 512),
}

_STRIP = re.compile(r"[^\w\s]")
_IGNORED_KEYS = ("encoder.embeddings.position_ids",)


@dataclass(frozen=True, slots=True, kw_only=True)
class FluencyOptions:
    """How the filter scores and thresholds captions.

    Attributes:
        threshold: A caption is flagged when its error probability exceeds this (0.9).
        max_length: Token length every caption is truncated to (64).
        batch_size: Captions per forward pass.
    """

    threshold: float = 0.9
    max_length: int = 64
    batch_size: int = 32

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"fluency.threshold: expected in [0, 1], got {self.threshold}")
        if self.max_length < 2:
            problems.append(f"fluency.max_length: expected >= 2, got {self.max_length}")
        if self.batch_size <= 0:
            problems.append(f"fluency.batch_size: expected > 0, got {self.batch_size}")
        if problems:
            raise ConfigError(problems)


def preprocess(text: str) -> str:
    """Remove every non-word, non-space character and lowercase (``"A Dog's bark!"`` -> ``"a dogs bark"``)."""
    return _STRIP.sub("", text).lower()


def bert_config_for(model_type: str, *, vocab_size: int = 30522) -> Any:
    """The ``BertConfig`` of a published detector's ``model_type``, built offline.

    Raises:
        WeightsError: ``model_type`` is not one of :data:`FENSE_BERT_SIZES`.
    """
    from transformers import BertConfig

    sizes = FENSE_BERT_SIZES.get(model_type)
    if sizes is None:
        raise WeightsError(
            f"model_type {model_type!r}: unknown fluency detector; expected one of {sorted(FENSE_BERT_SIZES)}"
        )
    hidden, layers, heads, intermediate = sizes
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
    )


class FenseClassifier(nn.Module):
    """BERT encoder, [CLS] state, dropout, ``Linear(hidden, num_classes)``.

    Parameter names (``encoder.*``, ``clf.*``) are those of the published checkpoints.
    """

    def __init__(self, bert_config: Any, num_classes: int = len(ERROR_CLASSES)) -> None:
        super().__init__()
        from transformers import AutoModel

        if num_classes <= 0:
            raise ModelError(f"FenseClassifier: expected num_classes > 0, got {num_classes}")
        self.bert_config: Any = bert_config
        self.encoder: nn.Module = AutoModel.from_config(bert_config)  # type: ignore[no-untyped-call]
        self.dropout = nn.Dropout(float(bert_config.hidden_dropout_prob))
        self.clf = nn.Linear(int(bert_config.hidden_size), num_classes)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Per-class logits.

        Args:
            input_ids: int64 (B, L).
            attention_mask: int64 (B, L).
            token_type_ids: int64 (B, L) or None (all zeros).

        Returns:
            float32 (B, num_classes) logits.
        """
        hidden: Tensor = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        out: Tensor = self.clf(self.dropout(hidden[:, 0]))
        return out


class FluencyFilter:
    """Scores captions for disfluency with a :class:`FenseClassifier`.

    Args:
        model: The classifier; put in eval mode here. Its last output is the
            ``error`` class.
        tokenizer: Tokenizer matching the classifier's vocabulary.
        options: Threshold, token length and batch size.
    """

    def __init__(
        self,
        model: FenseClassifier,
        tokenizer: PreTrainedTokenizerBase,
        options: FluencyOptions | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options if options is not None else FluencyOptions()
        vocab = len(tokenizer)
        model_vocab = int(model.bert_config.vocab_size)
        if vocab > model_vocab:
            raise ModelError(
                f"FluencyFilter: tokenizer has {vocab} tokens but the model's vocabulary is {model_vocab}"
            )

    def _batch(self, texts: Sequence[str]) -> dict[str, Tensor]:
        encoded = self.tokenizer(
            [preprocess(t) for t in texts],
            # Padding to the longest caption gives the same [CLS] output as padding
            # to max_length (pad positions are masked) at a third of the cost.
            padding="longest",
            truncation=True,
            max_length=self.options.max_length,
            return_tensors="pt",
        )
        device = self.model.clf.weight.device
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if "token_type_ids" in encoded:
            batch["token_type_ids"] = encoded["token_type_ids"]
        return {k: v.to(device) for k, v in batch.items()}

    def class_probs(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Sigmoid probability of every class for every caption.

        Args:
            texts: Captions, raw (preprocessing is applied here).

        Returns:
            float32 (n, num_classes), columns in :data:`ERROR_CLASSES` order.
        """
        if isinstance(texts, str):
            raise ModelError("FluencyFilter: expected a sequence of captions, got one str")
        num_classes = self.model.clf.out_features
        if len(texts) == 0:
            return np.zeros((0, num_classes), dtype=np.float32)
        parts: list[npt.NDArray[np.float32]] = []
        step = self.options.batch_size
        with torch.inference_mode():
            for start in range(0, len(texts), step):
                logits = self.model(**self._batch(texts[start : start + step]))
                parts.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(parts, axis=0)

    def error_probs(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Probability of the ``error`` class (the last output) per caption.

        Returns:
            float32 (n,).
        """
        return np.ascontiguousarray(self.class_probs(texts)[:, -1])

    def flags(self, texts: Sequence[str]) -> list[bool]:
        """True for every caption whose error probability exceeds ``options.threshold``."""
        return [bool(p > self.options.threshold) for p in self.error_probs(texts)]


def _load_tokenizer(tokenizer: PreTrainedTokenizerBase | str | Path) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from transformers import AutoTokenizer

    directory = Path(tokenizer)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: tokenizer directory not found")
    try:
        loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{directory}: cannot load tokenizer: {exc}") from exc
    return loaded


def load_fense_checkpoint(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    *,
    options: FluencyOptions | None = None,
) -> FluencyFilter:
    """Load a published error-detector checkpoint into a :class:`FluencyFilter`.

    Args:
        path: ``torch.load`` file holding ``{"model_type", "num_classes",
            "state_dict"}`` (read with ``weights_only=True``).
        tokenizer: A tokenizer object or a local directory with its files
            (nothing is downloaded).
        options: Filter options.

    Returns:
        The filter, model on CPU in eval mode.

    Raises:
        WeightsError: unreadable file, wrong layout, unknown ``model_type``,
            missing/unexpected keys or shape mismatches (each key named).
    """
    file = Path(path)
    obj = read_checkpoint(file)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{file}: expected a dict, got {type(obj).__name__}")
    missing_fields = [k for k in ("model_type", "num_classes", "state_dict") if k not in obj]
    if missing_fields:
        raise WeightsError(
            f"{file}: missing fields {missing_fields}; expected model_type, num_classes, state_dict"
        )
    model_type, num_classes = obj["model_type"], obj["num_classes"]
    if not isinstance(model_type, str) or not isinstance(num_classes, int):
        raise WeightsError(f"{file}: model_type must be a string and num_classes an integer")
    state = state_dict_from(obj["state_dict"], f"{file}: state_dict", nested=())
    state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
    word_key = "encoder.embeddings.word_embeddings.weight"
    if word_key not in state:
        raise WeightsError(f"{file}: missing keys (1): {word_key} (it gives the vocabulary size)")
    vocab_size = int(state[word_key].shape[0])
    try:
        bert_config = bert_config_for(model_type, vocab_size=vocab_size)
    except WeightsError as exc:
        raise WeightsError(f"{file}: {exc}") from exc
    model = FenseClassifier(bert_config, num_classes)
    check_state(model.state_dict(), state, f"{file}: fluency checkpoint does not match {model_type}")
    model.load_state_dict(state, strict=True)
    return FluencyFilter(model, _load_tokenizer(tokenizer), options)
