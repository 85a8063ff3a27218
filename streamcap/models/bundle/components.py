"""A captioner's models, built from a preset or loaded from a bundle, and saved as one.

:class:`Components` holds every model of a captioner on one device: codec,
EnCLAP, retriever, fluency filter, tokenizers, the bundle's default decoding.
``--model`` names a bundle directory, ``demo`` (the bundle inside the package)
or a preset (random weights), and :func:`open_components` opens any of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamcap.errors import ModelError
from streamcap.logs import get_logger
from streamcap.models.bundle.manifest import Bundle, load_bundle, resolve_model, save_bundle
from streamcap.models.bundle.presets import FluencyConfig, PresetSpec, preset_spec
from streamcap.models.bundle.weights import check_state
from streamcap.models.codecs.dac import AudioTokenizer, CodecConfig, CodecTokenizer
from streamcap.models.codecs.encodec import EncodecCodecConfig, EncodecTokenizer
from streamcap.models.decoding.abstain import AbstentionRule
from streamcap.models.decoding.fluency import (
    FenseClassifier,
    FluencyFilter,
    FluencyOptions,
    bert_config_for,
)
from streamcap.models.enclap.model import EnclapConfig, EnclapModel
from streamcap.models.enclap.tokenizer import (
    build_caption_tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from streamcap.models.retrieval.clap import ClapEmbedder, ClapEmbedderConfig
from streamcap.models.retrieval.retriever import AudioTextRetriever, RetrieverConfig

_log = get_logger(__name__)


@dataclass(slots=True)
class Components:
    """The loaded models of one captioner, on one device."""

    model_id: str
    preset: str | None
    codec: AudioTokenizer  # CodecTokenizer (DAC) or EncodecTokenizer
    captioner: EnclapModel
    retriever: AudioTextRetriever | None
    fluency: FluencyFilter | None
    tokenizer: Any  # PreTrainedTokenizerFast of the caption decoder
    text_tokenizer: Any  # tokenizer of the retriever's text encoder (None without retriever)
    decoding: Mapping[str, Any]
    seq_embedder: ClapEmbedder | None = None  # row 0 when present (else the retriever's clip)
    notes: Mapping[str, str] | None = None  # component -> warning recorded in the manifest
    # When captions are replaced by "quiet" / "an unfamiliar sound"; None: never. Calibrated
    # for these weights: training that changes them drops it (streamcap train calibrate).
    abstention: AbstentionRule | None = None


CODEC_KINDS = ("dac", "encodec")


def codec_kind(codec: AudioTokenizer) -> str:
    """``"dac"`` or ``"encodec"``: the ``kind`` recorded in a bundle's codec config."""
    return "encodec" if isinstance(codec, EncodecTokenizer) else "dac"


def make_codec(config: Mapping[str, Any]) -> AudioTokenizer:
    """A random-weight codec from a bundle's codec config (``kind`` absent = dac)."""
    values = dict(config)
    kind = values.pop("kind", "dac")
    values.pop("random_weights", None)
    values.pop("note", None)
    if kind == "dac":
        return CodecTokenizer(CodecConfig.from_dict(values))
    if kind == "encodec":
        return EncodecTokenizer(EncodecCodecConfig.from_dict(values))
    raise ModelError(f"codec config: kind {kind!r} is unknown (expected one of {CODEC_KINDS})")


def _bert_config(fluency: FluencyConfig) -> Any:
    config = bert_config_for("bert-base-uncased")
    for key, value in fluency.bert.items():
        setattr(config, key, value)
    return config


def build_components(spec: PresetSpec, *, seed: int = 0) -> Components:
    """Randomly initialised components of a preset (deterministic for a seed)."""
    torch.manual_seed(seed)
    tokenizer = build_caption_tokenizer(spec.tokenizer_vocab_size)
    codec: AudioTokenizer = (EncodecTokenizer(spec.codec)
                             if isinstance(spec.codec, EncodecCodecConfig)
                             else CodecTokenizer(spec.codec))
    captioner = EnclapModel(spec.captioner).eval()
    retriever = None if spec.retriever is None else AudioTextRetriever(spec.retriever).eval()
    fluency = None
    if spec.fluency is not None:
        fluency = FluencyFilter(FenseClassifier(_bert_config(spec.fluency),
                                                spec.fluency.num_classes),
                                tokenizer, FluencyOptions(threshold=spec.fluency.threshold))
    seq_embedder = None if spec.seq_embedder is None else ClapEmbedder(spec.seq_embedder)
    digest = hashlib.sha256(f"{spec.name}:{seed}".encode()).hexdigest()[:8]
    return Components(model_id=f"streamcap-{spec.name}-random-{digest}", preset=spec.name,
                      codec=codec, captioner=captioner, retriever=retriever, fluency=fluency,
                      tokenizer=tokenizer, text_tokenizer=tokenizer if retriever else None,
                      decoding=dict(spec.decoding), seq_embedder=seq_embedder)


def save_components(components: Components, directory: Path, *, overwrite: bool = False,
                    scratch: Path | None = None, caption_tokenizer_dir: Path | None = None) -> Path:
    """Write ``components`` as a model bundle (manifest with sha256 of every file).

    ``caption_tokenizer_dir``: copy these tokenizer files verbatim (e.g. BART's
    ``vocab.json`` + ``merges.txt``) instead of saving ``components.tokenizer``.
    A component listed in ``components.notes`` gets ``random_weights: true`` and
    the note under ``note`` in its manifest config.
    """
    import tempfile

    notes = dict(components.notes or {})

    def config_of(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(config)
        if name in notes:
            out.update(random_weights=True, note=notes[name])
        return out

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        tok_dirs: dict[str, Path] = {}
        if caption_tokenizer_dir is not None:
            tok_dirs["caption"] = caption_tokenizer_dir
        else:
            save_tokenizer(components.tokenizer, Path(tmp) / "caption")
            tok_dirs["caption"] = Path(tmp) / "caption"
        if components.text_tokenizer is not None:
            save_tokenizer(components.text_tokenizer, Path(tmp) / "text")
            tok_dirs["text"] = Path(tmp) / "text"
        codec = components.codec
        parts: dict[str, tuple[Mapping[str, object], Mapping[str, torch.Tensor]]] = {
            "codec": (config_of("codec", {"kind": codec_kind(codec), **codec.config.to_dict()}),
                      codec.state_dict()),
            "captioner": (config_of("captioner", components.captioner.config.to_dict()),
                          components.captioner.state_dict()),
        }
        if components.retriever is not None:
            parts["retriever"] = (components.retriever.config.to_dict(),
                                  components.retriever.state_dict())
        if components.seq_embedder is not None:
            parts["seq_embedder"] = (
                config_of("seq_embedder",
                          {"kind": "clap", **components.seq_embedder.config.to_dict()}),
                components.seq_embedder.state_dict())
        if components.fluency is not None:
            model = components.fluency.model
            fconf = FluencyConfig(bert=_bert_diff(model.bert_config),
                                  num_classes=int(model.clf.out_features),
                                  threshold=components.fluency.options.threshold)
            parts["fluency"] = (fconf.to_dict(), model.state_dict())
        return save_bundle(directory, components=parts, tokenizers=tok_dirs,
                           preset=components.preset, decoding=dict(components.decoding),
                           model_id=components.model_id, overwrite=overwrite,
                           abstention=components.abstention)


def _bert_diff(config: Any) -> dict[str, Any]:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "vocab_size", "type_vocab_size")
    return {k: getattr(config, k) for k in keys}


def load_components(bundle: Bundle) -> Components:
    """Build every component from a verified bundle (entirely offline)."""
    configs = bundle.component_configs
    for needed in ("codec", "captioner"):
        if needed not in configs:
            raise ModelError(f"{bundle.path / 'manifest.json'}: no '{needed}' component")
    if "retriever" not in configs and "seq_embedder" not in configs:
        raise ModelError(f"{bundle.path / 'manifest.json'}: neither a 'retriever' nor a "
                         "'seq_embedder' component; one of them must make encoder row 0")
    for name, config in configs.items():
        if config.get("random_weights"):
            _log.warning("bundle component has RANDOM weights", bundle=str(bundle.path),
                         component=name, note=config.get("note", "captions are meaningless"))
    try:
        codec = make_codec(configs["codec"])
        codec.load_state_dict(bundle.load_weights("codec"))
        captioner_config = {k: v for k, v in configs["captioner"].items()
                            if k not in ("random_weights", "note")}
        captioner = EnclapModel(EnclapConfig.from_dict(captioner_config))
        _load_strict(captioner, bundle.load_weights("captioner"), bundle, "captioner")
        retriever = None
        if "retriever" in configs:
            retriever = AudioTextRetriever(RetrieverConfig.from_dict(configs["retriever"]))
            _load_strict(retriever, bundle.load_weights("retriever"), bundle, "retriever")
        seq_embedder = None
        if "seq_embedder" in configs:
            clap_config = {k: v for k, v in configs["seq_embedder"].items()
                           if k not in ("kind", "random_weights", "note")}
            if configs["seq_embedder"].get("kind", "clap") != "clap":
                raise ModelError(f"{bundle.path / 'manifest.json'}: seq_embedder kind "
                                 f"{configs['seq_embedder'].get('kind')!r} is unknown "
                                 "(expected 'clap')")
            seq_embedder = ClapEmbedder(ClapEmbedderConfig.from_dict(clap_config))
            seq_embedder.load_state_dict(bundle.load_weights("seq_embedder"))
        tokenizer = load_tokenizer(bundle.tokenizer_dirs["caption"])
        text_dir = bundle.tokenizer_dirs.get("text", bundle.tokenizer_dirs["caption"])
        text_tokenizer = load_tokenizer(text_dir) if retriever is not None else None
        fluency = None
        if "fluency" in configs:
            fconf = FluencyConfig.from_dict(configs["fluency"])
            model = FenseClassifier(_bert_config(fconf), fconf.num_classes)
            _load_strict(model, bundle.load_weights("fluency"), bundle, "fluency")
            fluency_dir = bundle.tokenizer_dirs.get("fluency", text_dir)
            fluency = FluencyFilter(model, load_tokenizer(fluency_dir),
                                    FluencyOptions(threshold=fconf.threshold))
    except KeyError as exc:
        raise ModelError(f"{bundle.path}: bundle lacks {exc}") from None
    return Components(model_id=bundle.model_id, preset=bundle.preset, codec=codec,
                      captioner=captioner.eval(),
                      retriever=None if retriever is None else retriever.eval(),
                      fluency=fluency, tokenizer=tokenizer, text_tokenizer=text_tokenizer,
                      decoding=dict(bundle.decoding), seq_embedder=seq_embedder,
                      abstention=bundle.abstention)


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], bundle: Bundle,
                 name: str) -> None:
    check_state(module.state_dict(), state,
                f"{bundle.weights_path(name)}: weights do not fit the '{name}' configuration")
    module.load_state_dict(dict(state))


DEMO_MODEL = "demo"
DEMO_WARNING = (
    "model 'demo' is streamcap's built-in demo bundle: a small model trained on one CPU on "
    "synthesized everyday sounds (sirens, alarms, phones, rain, wind, dogs, engines, ...) "
    "with a codec of fixed random weights. It captions those sounds and little else. For "
    "real captions, train a model on Clotho/AudioCaps/WavCaps with `streamcap train` or "
    "import a published EnCLAP checkpoint with `streamcap models import-enclap`, then pass "
    "its bundle directory as [model] bundle or --model")


def demo_bundle_path() -> Path:
    """The demo bundle shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("streamcap") / "data" / "demo-bundle"))


def open_components(spec: str, *, seed: int = 0) -> Components:
    """Components for ``--model``: a bundle directory, ``demo`` or a preset name."""
    if spec == DEMO_MODEL:
        _log.warning(DEMO_WARNING)
        return load_components(load_bundle(demo_bundle_path()))
    resolved = resolve_model(spec)
    if resolved.kind == "bundle":
        assert resolved.bundle_path is not None  # resolve_model sets it for bundles
        return load_components(load_bundle(resolved.bundle_path))
    if resolved.warning:
        _log.warning(resolved.warning, model=spec)
    assert resolved.preset is not None  # resolve_model sets it for presets
    return build_components(preset_spec(resolved.preset), seed=seed)
