"""Import a published EnCLAP checkpoint directory into a streamcap bundle.

An EnCLAP checkpoint directory holds ``config.json`` (a BART config, optionally with
the EnCLAP extras ``num_rvq``, ``encodec_vocab_size``, ``encodec_pad_token_id``,
``d_clap``, ``mcm_loss_scale``, ``label_smoothing``; absent extras take the
reference defaults 16, 1024, 1024, 512, 0.7, 0.2) and ``pytorch_model.bin`` (or
``model.safetensors``) in the key layout of the reference
``EnClapBartForConditionalGeneration``: ``model.shared``, ``model.encoder.{embed_tokens,
embed_positions, embed_encodec.{i}, clap_projection, layernorm_embedding, layers...}``,
``model.decoder...``, ``lm_head``, ``final_logits_bias``, ``mcm_heads.{i}``.

The tied copies of the token table (``lm_head.weight``,
``model.{encoder,decoder}.embed_tokens.weight``) may be absent (they are rebuilt from
``model.shared.weight``); if present they must equal it. Every other key must be
present with its exact shape, and no other key may exist: problems are reported by
name.

The bundle gets the EnCodec codec and the CLAP embedder (real weights when given,
else random ones with a warning recorded in the manifest), the BART tokenizer files,
no retriever and no fluency filter, and the reference's beam search as its default
decoding. Windows longer than the reference's 1,021 frames use a grown encoder
position table (:func:`streamcap.models.enclap.model.extend_positions`); see
``docs/enclap-import.md``.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamcap.errors import ModelError, WeightsError
from streamcap.logs import get_logger
from streamcap.models.bundle.manifest import read_json_object
from streamcap.models.bundle.weights import check_state, naming_file, read_state_dict
from streamcap.models.codecs.encodec import EncodecCodecConfig, EncodecTokenizer, encodec_preset
from streamcap.models.enclap.model import EnclapConfig, EnclapModel, extend_positions, streamcap_key
from streamcap.models.enclap.tokenizer import load_tokenizer
from streamcap.models.retrieval.clap import (
    CLAP_MODEL_ID,
    ClapEmbedder,
    ClapEmbedderConfig,
    audio_state_from_clap_model,
    clap_preset,
    convert_laion_state_dict,
)

_log = get_logger(__name__)

ACCEPTED_ARCHITECTURES = frozenset(
    {"EnClapBartForConditionalGeneration", "BartForConditionalGeneration", "BartModel"})
_TIED = ("lm_head.weight", "model.encoder.embed_tokens.weight",
         "model.decoder.embed_tokens.weight")
_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
RANDOM_CODEC_NOTE = ("EnCodec weights were not given (--encodec): the codec is RANDOM, "
                     "captions are meaningless; re-import with --encodec DIR "
                     "(facebook/encodec_24khz)")
RANDOM_CLAP_NOTE = (f"CLAP weights were not given (--clap): the row-0 embedder is RANDOM, "
                    f"captions are meaningless; re-import with --clap ({CLAP_MODEL_ID} or "
                    f"630k-audioset-fusion-best.pt)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportOptions:
    """Options of :func:`import_enclap`.

    Attributes:
        max_window_s: longest window the bundle must caption; beyond the checkpoint's
            frames the encoder position table is grown (never shrunk).
        encodec: a ``facebook/encodec_24khz``-style directory (config.json + weights).
        clap: ``630k-audioset-fusion-best.pt`` or a ``laion/clap-htsat-fused`` directory.
        tokenizer: a directory with ``vocab.json`` + ``merges.txt`` (default: the checkpoint's).
        codec_preset / clap_preset: sizes of random codec/CLAP when no weights are given
            (defaults ``encodec24k`` / ``clap-htsat-fused``; tiny ones are for tests);
            ``clap_preset`` also gives the shapes of a LAION ``.pt`` checkpoint.
        decoding_mode: the bundle's default decoding, ``beam`` (the reference) or ``sample``.
    """

    max_window_s: float = 30.0
    encodec: Path | None = None
    clap: Path | None = None
    tokenizer: Path | None = None
    codec_preset: str | None = None
    clap_preset: str | None = None
    decoding_mode: str = "beam"

    def __post_init__(self) -> None:
        if not (isinstance(self.max_window_s, (int, float)) and 0 < self.max_window_s <= 600):
            raise ModelError(f"--max-window-s: expected seconds in (0, 600], "
                             f"got {self.max_window_s!r}")
        if self.decoding_mode not in ("beam", "sample"):
            raise ModelError(f"--decoding: expected 'beam' or 'sample', got {self.decoding_mode!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportReport:
    """What :func:`import_enclap` wrote."""

    path: Path
    model_id: str
    config: EnclapConfig
    warnings: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- config


def config_from_reference(raw: Mapping[str, Any], where: str = "config.json") -> EnclapConfig:
    """The :class:`EnclapConfig` of a reference ``config.json`` dict.

    Raises:
        ModelError: not a BART/EnCLAP config (``model_type``/``architectures`` named),
            an unsupported setting (``scale_embedding`` true, pad id != vocab size), or
            an invalid value.
    """
    model_type = raw.get("model_type")
    if model_type not in ("bart", "enclap_bart", None):
        raise ModelError(f"{where}: model_type is {model_type!r}; expected 'bart' (an EnCLAP "
                         "checkpoint is a BART encoder-decoder)")
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or any(a not in ACCEPTED_ARCHITECTURES
                                                  for a in architectures):
        raise ModelError(f"{where}: architectures {architectures!r} is not an EnCLAP model; "
                         f"expected one of {sorted(ACCEPTED_ARCHITECTURES)}")
    if raw.get("scale_embedding", False):
        raise ModelError(f"{where}: scale_embedding is true; EnCLAP checkpoints (bart-base/"
                         "-large) have false and streamcap supports only that")
    codebook_size = int(raw.get("encodec_vocab_size", 1024))
    pad = int(raw.get("encodec_pad_token_id", codebook_size))
    if pad != codebook_size:
        raise ModelError(f"{where}: encodec_pad_token_id {pad} != encodec_vocab_size "
                         f"{codebook_size}; streamcap uses the id after the last code as pad")
    positions = int(raw.get("max_position_embeddings", 1024))
    keys = ("vocab_size", "d_model", "encoder_layers", "decoder_layers",
            "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
            "decoder_ffn_dim", "dropout", "attention_dropout", "activation_dropout",
            "activation_function", "encoder_layerdrop", "decoder_layerdrop", "init_std",
            "mcm_loss_scale", "label_smoothing", "bos_token_id", "pad_token_id",
            "eos_token_id", "decoder_start_token_id")
    values: dict[str, Any] = {k: raw[k] for k in keys if raw.get(k) is not None}
    for k in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
              "decoder_layerdrop", "init_std", "mcm_loss_scale", "label_smoothing"):
        if k in values:
            values[k] = float(values[k])
    values.update(n_codebooks=int(raw.get("num_rvq", 16)), codebook_size=codebook_size,
                  seq_embed_dim=int(raw.get("d_clap", 512)), max_frames=positions - 3,
                  decoder_max_positions=positions)
    try:
        return EnclapConfig(**values)
    except (ModelError, TypeError) as exc:
        raise ModelError(f"{where}: {exc}") from exc


def expected_reference_shapes(config: EnclapConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the reference layout and its shape (tied copies and the buffer included)."""
    with torch.device("meta"):
        model = EnclapModel(config)
    shapes = {}
    for key, value in model.state_dict(keep_vars=True).items():
        shapes[key.removeprefix("bart.")] = tuple(value.shape)
    return shapes


# --------------------------------------------------------------------------- weights


def convert_reference_state_dict(state: Mapping[str, torch.Tensor], config: EnclapConfig,
                                 where: str = "pytorch_model.bin") -> dict[str, torch.Tensor]:
    """Check a reference-layout state dict and return it in the streamcap layout.

    Raises:
        WeightsError: missing keys, unexpected keys, wrong shapes, or a tied copy that
            differs from ``model.shared.weight``, each named.
    """
    expected = expected_reference_shapes(config)
    got = dict(state)
    shared = got.get("model.shared.weight")
    problems: list[str] = []
    if shared is not None:
        for key in _TIED:
            if key in got and (tuple(got[key].shape) != tuple(shared.shape)
                               or not torch.equal(got[key], shared)):
                problems.append(f"{key}: tied to model.shared.weight but holds other values")
            got.setdefault(key, shared)
    check_state(expected, got, f"{where}: does not match the EnCLAP layout of its config.json",
                extra=problems)
    return {streamcap_key(k): v for k, v in got.items()}


def _weights_file(directory: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise WeightsError(f"{directory}: no weights; expected one of {', '.join(_WEIGHT_FILES)}")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing; an EnCLAP checkpoint directory holds config.json "
                         "and pytorch_model.bin")
    return read_json_object(path)


def load_reference_checkpoint(directory: Path) -> tuple[EnclapConfig, dict[str, torch.Tensor]]:
    """Read and check a reference checkpoint directory.

    Returns:
        The config and the state dict in the streamcap layout (``bart.`` prefix).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a directory; expected an EnCLAP checkpoint "
                         "directory (config.json + pytorch_model.bin)")
    config = config_from_reference(_read_config(directory), str(directory / "config.json"))
    weights = _weights_file(directory)
    return config, convert_reference_state_dict(read_state_dict(weights), config, str(weights))


# --------------------------------------------------------------------------- codec and CLAP


def load_encodec(path: Path) -> EncodecTokenizer:
    """An EnCodec tokenizer at 12 kbps from a ``facebook/encodec_24khz``-style directory."""
    config = EncodecCodecConfig.from_hf_config(_read_config(path), where=str(path / "config.json"))
    tokenizer = EncodecTokenizer(config)
    weights = _weights_file(path)
    with naming_file(weights):
        tokenizer.load_state_dict(read_state_dict(weights))
    return tokenizer


def load_clap(path: Path, laion_preset: str = "clap-htsat-fused") -> ClapEmbedder:
    """The CLAP audio embedder from ``630k-audioset-fusion-best.pt`` (shapes of
    ``laion_preset``) or an HF ``ClapModel`` dir (shapes from its config.json)."""
    if path.is_dir():
        config = ClapEmbedderConfig.from_hf_config(_read_config(path),
                                                   str(path / "config.json"))
        weights = _weights_file(path)
        state = audio_state_from_clap_model(read_state_dict(weights))
    else:
        config = clap_preset(laion_preset)
        weights = path
        state = convert_laion_state_dict(read_state_dict(path))
    embedder = ClapEmbedder(config)
    with naming_file(weights):
        embedder.load_state_dict(state)
    return embedder


def _tokenizer_dir(directory: Path, override: Path | None) -> Path:
    for candidate in ([override] if override is not None else [directory]):
        if all((candidate / name).is_file() for name in _TOKENIZER_FILES):
            return candidate
    where = f"--tokenizer {override}" if override is not None else str(directory)
    raise ModelError(f"{where}: no BART tokenizer; EnCLAP needs vocab.json and merges.txt "
                     "(from facebook/bart-base, identical for bart-large): put them into the "
                     "checkpoint directory or pass --tokenizer DIR")


# --------------------------------------------------------------------------- import


def import_enclap(directory: Path, output: Path, options: ImportOptions = ImportOptions(),
                  *, overwrite: bool = False) -> ImportReport:
    """Convert an EnCLAP checkpoint directory into a bundle at ``output``.

    Raises:
        ModelError: bad directory, config or tokenizer (named).
        WeightsError: weights that do not fit (keys and shapes named).
    """
    from streamcap.models.bundle.components import Components, save_components
    from streamcap.models.bundle.presets import REFERENCE_DECODING

    directory = Path(directory)
    config, state = load_reference_checkpoint(directory)
    tok_dir = _tokenizer_dir(directory, options.tokenizer)
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > config.vocab_size:
        raise ModelError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens, more than "
                         f"the checkpoint's vocab_size {config.vocab_size}")
    notes: dict[str, str] = {}
    if options.encodec is not None:
        codec = load_encodec(options.encodec)
    else:
        codec = EncodecTokenizer(encodec_preset(options.codec_preset or "encodec24k"))
        notes["codec"] = RANDOM_CODEC_NOTE
    if codec.config.n_codebooks != config.n_codebooks or codec.config.codebook_size != \
            config.codebook_size:
        raise ModelError(f"codec {codec.codec_id} has {codec.config.n_codebooks} codebooks of "
                         f"{codec.config.codebook_size}; the checkpoint expects num_rvq="
                         f"{config.n_codebooks} of {config.codebook_size}")
    if options.clap is not None:
        clap = load_clap(options.clap, options.clap_preset or "clap-htsat-fused")
    else:
        clap = ClapEmbedder(clap_preset(options.clap_preset or "clap-htsat-fused"))
        notes["seq_embedder"] = RANDOM_CLAP_NOTE
    if clap.embed_dim != config.seq_embed_dim:
        raise ModelError(f"CLAP embedding has {clap.embed_dim} dims; the checkpoint's d_clap is "
                         f"{config.seq_embed_dim}")
    frames = math.ceil(options.max_window_s * codec.frame_rate_hz - 1e-9)
    if frames > config.max_frames:
        state = extend_positions(state, frames)
        config = EnclapConfig.from_dict({**config.to_dict(), "max_frames": frames})
    model = EnclapModel(config)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:  # convert_reference_state_dict checked
        raise WeightsError(f"{directory}: internal key mismatch {result}")
    model.eval()
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.name in
                       ("config.json", *_WEIGHT_FILES)):
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
    size = "large" if config.d_model >= 1024 else "base"
    model_id = f"enclap-{size}-{directory.name}-{digest.hexdigest()[:8]}"
    decoding = {**REFERENCE_DECODING, "mode": options.decoding_mode}
    components = Components(model_id=model_id, preset=None, codec=codec, captioner=model,
                            retriever=None, fluency=None, tokenizer=tokenizer,
                            text_tokenizer=None, decoding=decoding, seq_embedder=clap,
                            notes=notes)
    with tempfile.TemporaryDirectory() as tmp:
        tok_copy = Path(tmp) / "caption"
        tok_copy.mkdir()
        for name in _TOKENIZER_FILES:
            shutil.copyfile(tok_dir / name, tok_copy / name)
        path = save_components(components, output, overwrite=overwrite,
                               caption_tokenizer_dir=tok_copy)
    for note in notes.values():
        _log.warning("import-enclap note", note=note)
    return ImportReport(path=path, model_id=model_id, config=config,
                        warnings=tuple(notes.values()))
