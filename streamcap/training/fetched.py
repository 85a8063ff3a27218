"""``streamcap train init --from-fetched``: an initial bundle from fetched components.

``streamcap models fetch dcase2024-components`` (or one component at a time) puts the
published parts of the DCASE2024 recipe in the component directory; this module turns
them into a bundle ready for ``streamcap train retriever|captioner``:

- codec: ``dac-24khz``, the descript checkpoint converted at fetch time
  (``codec.safetensors``; encoder and the 32 quantizers, the decoder is not kept);
- captioner: EnCLAP sized by the fetched BART's ``config.json`` (``bart-base`` or
  ``bart-large``) over the codec's codebooks and the CNext embedding; every BART weight
  is loaded (the encoder position table then grown to the longest window by tiling), the
  parts BART lacks (codebook embeddings, the CNext projection, the masked-codec heads)
  start random;
- caption tokenizer: BART's ``vocab.json`` + ``merges.txt``;
- retriever: the CNext audio encoder from a Zenodo checkpoint (``cnext-audioset-bl`` by
  default) and a pretrained text encoder with its own tokenizer (``roberta-base`` or
  ``roberta-large``); the two projections start random.

Not used, and why:

- the BERT-family text encoders (``bge-*``, ``bert-*``): their WordPiece tokenizers have
  other special-token ids than the byte-level BPE layout every bundle tokenizer must
  have (:func:`streamcap.models.enclap.tokenizer.load_tokenizer`), so a bundle cannot
  hold them; they are fetched and verified, not built in;
- the FENSE error detector (``fense-echecker``): it needs ``bert-base-uncased``'s
  WordPiece tokenizer, which a bundle cannot hold for the same reason; the bundle gets no
  fluency checker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamcap.errors import ConfigError, WeightsError
from streamcap.models.bundle.components import Components
from streamcap.models.bundle.weights import read_state_dict
from streamcap.models.codecs.dac import CodecConfig, CodecTokenizer
from streamcap.models.enclap.model import EnclapModel, extend_positions
from streamcap.models.enclap.published import config_from_reference
from streamcap.models.enclap.tokenizer import load_tokenizer
from streamcap.models.fetch import COMPONENT_NAME, DAC_CONVERTED, find_component
from streamcap.models.retrieval.cnext import CNEXT_TINY, CNextConfig
from streamcap.models.retrieval.retriever import AudioTextRetriever, RetrieverConfig

BART_NAMES = ("bart-base", "bart-large")
TEXT_ENCODERS = ("roberta-base", "roberta-large")
WORDPIECE_TEXT_ENCODERS = ("bge-base-en-v1.5", "bge-large-en-v1.5", "bert-base-uncased",
                           "bert-large-uncased")
CNEXT_NAMES = ("cnext-audioset-bl", "cnext-audioset")
CODEC_NAME = "dac-24khz"

FETCHED_CNEXT: CNextConfig = CNEXT_TINY
"""The architecture of the published CNext checkpoints (tests use a toy one)."""

# config.json keys that describe a file, not the architecture
_NOT_ARCHITECTURE = frozenset({"architectures", "_name_or_path", "transformers_version",
                               "torch_dtype", "dtype", "model_type", "auto_map"})


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchedChoice:
    """Which fetched components make the bundle."""

    bart: str = "bart-base"
    text_encoder: str = "roberta-base"
    cnext: str = "cnext-audioset-bl"
    max_window_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bart not in BART_NAMES:
            raise ConfigError(f"--bart: expected one of {', '.join(BART_NAMES)}, "
                              f"got {self.bart!r}")
        if self.text_encoder in WORDPIECE_TEXT_ENCODERS:
            raise ConfigError(
                f"--text-encoder {self.text_encoder}: its WordPiece tokenizer cannot be stored "
                "in a bundle (bundle tokenizers are byte-level BPE with BART's special-token "
                f"ids); use one of {', '.join(TEXT_ENCODERS)}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"--text-encoder: expected one of {', '.join(TEXT_ENCODERS)}, "
                              f"got {self.text_encoder!r}")
        if self.cnext not in CNEXT_NAMES:
            raise ConfigError(f"--cnext: expected one of {', '.join(CNEXT_NAMES)}, "
                              f"got {self.cnext!r}")
        if not self.max_window_s > 0:
            raise ConfigError(f"--max-window-s: expected a positive number of seconds, "
                              f"got {self.max_window_s}")


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchedInit:
    """The built components and what went into them (one line per part)."""

    components: Components
    used: tuple[str, ...]
    not_used: tuple[str, ...]


def locate(name: str, directories: Sequence[Path]) -> Path:
    """The directory of the fetched component ``name``.

    Raises:
        ConfigError: not fetched (the message names where it was looked for and the
            command that fetches it).
    """
    found = find_component(name, tuple(directories))
    if found is None:
        raise ConfigError(f"train init --from-fetched: component {name} not found in "
                          f"{', '.join(str(d) for d in directories)}; fetch it with "
                          f"`streamcap models fetch {name}` (or pass --components-dir DIR)")
    return found


def _file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise ConfigError(f"{directory}: {name} is missing; fetch the component again with "
                          f"`streamcap models fetch {directory.name} --overwrite`")
    return path


def _single_file(directory: Path) -> Path:
    record = json.loads(_file(directory, COMPONENT_NAME).read_text(encoding="utf-8"))
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or len(files) != 1:
        raise ConfigError(f"{directory / COMPONENT_NAME}: expected one fetched file")
    return _file(directory, str(next(iter(files.values()))))


def load_fetched_codec(directory: Path) -> CodecTokenizer:
    """The DAC codec from ``dac-24khz``'s converted weights."""
    from safetensors import safe_open

    path = _file(directory, DAC_CONVERTED)
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("codec_config")
    if raw is None:
        raise WeightsError(f"{path}: no codec_config in its metadata (written by "
                           "`streamcap models convert-dac`)")
    codec = CodecTokenizer(CodecConfig.from_dict(json.loads(raw)))
    codec.load_state_dict(read_state_dict(path))
    return codec


def bart_state_for(model: EnclapModel, state: Mapping[str, torch.Tensor], where: str
                   ) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    """Map a BART checkpoint (``BartModel`` or ``BartForConditionalGeneration`` keys) onto
    ``model``'s keys.

    Returns:
        ``(state to load, model keys BART does not provide, BART keys not used)``.

    Raises:
        WeightsError: a shape differs (every such key named).
    """
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    problems: list[str] = []
    for key, value in state.items():
        name = key if key.startswith(("model.", "final_logits_bias", "lm_head.")) \
            else f"model.{key}"
        target = f"bart.{name}"
        if target not in own:
            unused.append(key)
        elif tuple(own[target].shape) != tuple(value.shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, expected "
                            f"{tuple(own[target].shape)}")
        else:
            mapped[target] = value
    shared = mapped.get("bart.model.shared.weight")
    if shared is not None:  # tied copies may be absent from the file
        for tied in ("bart.lm_head.weight", "bart.model.encoder.embed_tokens.weight",
                     "bart.model.decoder.embed_tokens.weight"):
            if tied in own:
                mapped.setdefault(tied, shared)
    if problems:
        raise WeightsError(f"{where}: does not fit the captioner built from its config.json: "
                           + "; ".join(problems))
    missing = tuple(k for k in own if k not in mapped)
    return mapped, missing, tuple(unused)


def _text_config(config_json: Path) -> tuple[str, dict[str, Any]]:
    from transformers import AutoConfig

    raw = json.loads(config_json.read_text(encoding="utf-8"))
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str):
        raise ConfigError(f"{config_json}: no model_type")
    defaults = AutoConfig.for_model(model_type)
    values = {k: v for k, v in raw.items() if k not in _NOT_ARCHITECTURE
              and hasattr(defaults, k) and getattr(defaults, k) != v}
    return model_type, values


def init_from_fetched(choice: FetchedChoice, directories: Sequence[Path]) -> FetchedInit:
    """Build the initial components from fetched components in ``directories``.

    Raises:
        ConfigError: a component not fetched, or a bad choice.
        WeightsError: a file that does not fit (named).
    """
    codec_dir = locate(CODEC_NAME, directories)
    bart_dir = locate(choice.bart, directories)
    text_dir = locate(choice.text_encoder, directories)
    cnext_dir = locate(choice.cnext, directories)
    torch.manual_seed(choice.seed)

    codec = load_fetched_codec(codec_dir)
    audio = FETCHED_CNEXT
    raw = json.loads(_file(bart_dir, "config.json").read_text(encoding="utf-8"))
    raw.update(num_rvq=codec.config.n_codebooks, encodec_vocab_size=codec.config.codebook_size,
               encodec_pad_token_id=codec.config.codebook_size, d_clap=audio.embed_dim)
    config = config_from_reference(raw, str(bart_dir / "config.json"))
    captioner = EnclapModel(config)
    weights = _file(bart_dir, "model.safetensors")
    state, missing, unused = bart_state_for(captioner, read_state_dict(weights), str(weights))
    captioner.load_state_dict(state, strict=False)
    frames = round(choice.max_window_s * codec.config.frame_rate_hz)
    if frames > captioner.config.max_frames:
        extend_positions(captioner, frames)
    tokenizer = load_tokenizer(bart_dir)
    if len(tokenizer) != config.vocab_size:
        raise WeightsError(f"{bart_dir}: the tokenizer has {len(tokenizer)} tokens, "
                           f"config.json vocab_size {config.vocab_size}")

    model_type, text_config = _text_config(_file(text_dir, "config.json"))
    retriever_config = RetrieverConfig(audio=audio, text_model_type=model_type,
                                       text_config=text_config)
    retriever = AudioTextRetriever(retriever_config, text_encoder_dir=text_dir)
    retriever.load_audio_encoder(_single_file(cnext_dir))
    text_tokenizer = load_tokenizer(text_dir)

    digest = hashlib.sha256(
        f"{choice.bart}:{choice.text_encoder}:{choice.cnext}:{choice.seed}".encode()
    ).hexdigest()[:8]
    components = Components(
        model_id=f"streamcap-fetched-{choice.bart}-{digest}", preset=None, codec=codec,
        captioner=captioner.eval(), retriever=retriever.eval(), fluency=None,
        tokenizer=tokenizer, text_tokenizer=text_tokenizer, decoding={})
    # the modules BART does not provide, without parameter names and layer indices
    new_parts = list(dict.fromkeys(
        ".".join(p for p in k.split(".")[:-1] if not p.isdigit()) for k in missing))
    used = (
        (f"codec: {CODEC_NAME} ({codec.config.n_codebooks} codebooks, "
         f"{codec.config.frame_rate_hz:g} frames/s), {codec_dir}"),
        (f"captioner: {choice.bart} weights ({len(state)} tensors; windows up to "
         f"{captioner.config.max_frames} frames); random: {', '.join(new_parts) or 'none'}"),
        f"caption tokenizer: {choice.bart} ({len(tokenizer)} tokens)",
        (f"retriever audio: {choice.cnext} ({_single_file(cnext_dir).name}); text: "
         f"{choice.text_encoder} with its tokenizer; projections random"),
    )
    not_used = (
        ("fluency checker: fense-echecker is not built in (its bert-base-uncased WordPiece "
         "tokenizer cannot be stored in a bundle)"),
        *((f"BART keys not used: {', '.join(unused)}",) if unused else ()),
    )
    return FetchedInit(components=components, used=used, not_used=not_used)


__all__ = ["BART_NAMES", "CNEXT_NAMES", "FETCHED_CNEXT", "TEXT_ENCODERS",
           "WORDPIECE_TEXT_ENCODERS", "FetchedChoice", "FetchedInit", "bart_state_for",
           "init_from_fetched", "load_fetched_codec", "locate"]
