"""The captioner: every model component composed into Window -> Caption.

Per window, on the inference thread:

1. **codec**: DAC codes of the window at 24 kHz, from the per-source
   streaming cache (each hop of new audio is encoded once);
2. **retriever audio**: CNext clip embedding (EnCLAP's row 0) and the joint
   audio embedding (published as the window's ``Embedding``), at 32 kHz;
3. **encoder**: EnCLAP's BART encoder over ``[clip, BOS, codes, EOS]``, once;
4. **sampling**: ``n_candidates`` nucleus samples in one batched pass over
   that one encoder output, each with its untempered mean log-probability;
5. **text encoder**: the retriever's text embedding of each distinct candidate;
6. **fluency**: the error probability of each distinct candidate;
7. **rerank**: ``0.7 * cosine + 0.3 * log-probability``, best unflagged wins.

``mode = "beam"`` replaces 4-7 by beam search.

Two compositions exist (the bundle manifest names them: component ``codec`` has
``config.kind`` ``"dac"`` (the default when absent) or ``"encodec"``; an optional
component ``seq_embedder`` has ``config.kind`` ``"clap"``):

* DAC + retriever: row 0 is the retriever's CNext clip embedding;
* EnCodec + CLAP (the published EnCLAP models, see ``docs/enclap-import.md``): row 0
  is the CLAP embedding (48 kHz). An imported EnCLAP bundle has no retriever and no
  fluency filter: sampling then reranks by decoder score alone.

The ``Embedding`` message of a window carries the retriever's joint audio embedding
when a retriever exists, else the CLAP embedding.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcap.config import DecodingConfig, ModelConfig
from streamcap.errors import ModelError
from streamcap.messages import Caption, CaptionCandidate, Embedding, Window
from streamcap.models.beam import BeamOptions, beam_search
from streamcap.models.bundle import Bundle, load_bundle, resolve_model, save_bundle
from streamcap.models.clap import ClapEmbedder, ClapEmbedderConfig
from streamcap.models.codec import AudioTokenizer, CodecConfig, CodecTokenizer, Precision
from streamcap.models.codec_stream import StreamingCodec, StreamingOptions
from streamcap.models.enclap import EnclapConfig, EnclapModel
from streamcap.models.encodec import EncodecCodecConfig, EncodecTokenizer
from streamcap.models.fluency import FenseClassifier, FluencyFilter, FluencyOptions, bert_config_for
from streamcap.models.presets import FluencyConfig, PresetSpec, preset_spec
from streamcap.models.rerank import RerankOptions, rerank
from streamcap.models.retriever import AudioTextRetriever, RetrieverConfig
from streamcap.models.sampling import (
    SampledCaption,
    SamplingOptions,
    attach_texts,
    dedupe,
    sample_candidates,
)
from streamcap.models.tokenizer import (
    NO_CAPTION_TEXT,
    build_caption_tokenizer,
    decode_caption,
    load_tokenizer,
    save_tokenizer,
)
from streamcap.pipeline import CaptionResult

_LOGGER = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 64


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
                           model_id=components.model_id, overwrite=overwrite)


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
            _LOGGER.warning("bundle %s: component %r has RANDOM weights: %s", bundle.path, name,
                            config.get("note", "captions are meaningless"))
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
                      decoding=dict(bundle.decoding), seq_embedder=seq_embedder)


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], bundle: Bundle,
                 name: str) -> None:
    result = module.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:8])
        unexpected = ", ".join(result.unexpected_keys[:8])
        raise ModelError(f"{bundle.weights_path(name)}: weights do not fit the '{name}' "
                         f"configuration (missing: {missing or 'none'}; "
                         f"unexpected: {unexpected or 'none'})")


class Captioner:
    """Window -> caption and embedding; call only from the inference thread.

    Args:
        components: the loaded models.
        decoding: sampling, reranking and beam settings.
        device: where the models run.
        dtype: compute precision of BART, CNext and the text encoders;
            log-mel features and all scores stay in float32.
        codec_dtype: precision of the DAC encoder (its quantizer is always
            float32); float32 by default because lower precision changes codes.
    """

    def __init__(self, components: Components, decoding: DecodingConfig,
                 *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 codec_dtype: torch.dtype = torch.float32) -> None:
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.decoding = decoding
        precisions: dict[torch.dtype, Precision] = {
            torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        precision = precisions[codec_dtype]
        c = components
        if isinstance(c.codec, CodecTokenizer):
            c.codec = CodecTokenizer(c.codec.config, device=str(self.device),
                                     precision=precision, model=c.codec.module)
        elif isinstance(c.codec, EncodecTokenizer):
            c.codec = EncodecTokenizer(c.codec.config, device=str(self.device),
                                       precision=precision, model=c.codec.module)
        c.captioner.to(self.device, dtype)
        # The BERT-style text encoders hold their weights in the compute dtype (autocast
        # would cast ~250 M parameters again on every window); CNext keeps fp32 weights
        # under autocast because its log-mel front end must stay fp32.
        if c.retriever is not None:
            c.retriever.to(self.device)
            torch.nn.Module.to(c.retriever.text_encoder, dtype)
        if c.seq_embedder is not None:
            c.seq_embedder.to(self.device)
        if c.fluency is not None:
            c.fluency.model.to(self.device, dtype)
        self._stream = StreamingCodec(c.codec, streaming_options(c.codec))
        self._vocab_limit = len(c.tokenizer)
        self._sampling = SamplingOptions(
            n_candidates=decoding.n_candidates, top_p=decoding.top_p,
            temperature=decoding.temperature, max_new_tokens=decoding.max_new_tokens,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size, seed=None,
            min_new_tokens=min(4, decoding.max_new_tokens - 1))
        self._beam = BeamOptions(num_beams=decoding.num_beams, max_length=decoding.beam_max_length)
        self._rerank = RerankOptions(encoder_weight=decoding.encoder_weight,
                                     decoder_weight=decoding.decoder_weight,
                                     fluency_threshold=decoding.fluency_threshold)
        self._generator = torch.Generator(device=self.device)
        if decoding.seed is not None:
            self._generator.manual_seed(decoding.seed)
        else:
            self._generator.seed()
        self._mask_extra_vocab()

    def _mask_extra_vocab(self) -> None:
        """Never sample ids the tokenizer cannot spell (a preset's vocabulary may be larger)."""
        bart = self.components.captioner.bart
        n_model = bart.final_logits_bias.shape[-1]
        if self._vocab_limit < n_model:
            with torch.no_grad():
                bart.final_logits_bias[..., self._vocab_limit:] = float("-inf")

    @property
    def model_id(self) -> str:
        return self.components.model_id

    @property
    def sample_rates_hz(self) -> tuple[int, ...]:
        """Codec rate, then the rate of the row-0 / embedding model (retriever, then CLAP)."""
        c = self.components
        rates = [c.codec.config.sample_rate_hz]
        if c.retriever is not None:
            rates.append(c.retriever.config.audio.mel.sample_rate)
        if c.seq_embedder is not None:
            rates.append(c.seq_embedder.sample_rate_hz)
        return tuple(dict.fromkeys(rates))

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    @torch.inference_mode()
    def caption(self, window: Window) -> CaptionResult:
        """Caption one window.

        Returns:
            The caption (``latency_ms``/``lag_s`` are the caller's) and the
            retriever's L2-normalised audio embedding, with seconds per stage.
        """
        c = self.components
        seconds: dict[str, float] = {}
        t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # book GPU work to the stage that queued it
            now = time.perf_counter()
            seconds[stage] = now - t
            t = now

        codes = self._stream.codes_for(window)
        lap("codec")
        audio_joint: torch.Tensor | None = None
        clip: torch.Tensor | None = None
        if c.retriever is not None:
            rate = c.retriever.config.audio.mel.sample_rate
            wave = torch.tensor(window.samples(rate)).to(self.device)[None, :]
            with self._autocast():
                clip, audio_joint = c.retriever.embed_audio(wave)
            audio_joint = torch.nn.functional.normalize(audio_joint.float(), dim=-1)
            lap("retriever_audio")
        if c.seq_embedder is not None:
            clip = c.seq_embedder.embed_tensor(window.samples(c.seq_embedder.sample_rate_hz))
            lap("clap")
            if audio_joint is None:
                audio_joint = clip.float()
        if clip is None or audio_joint is None:
            raise ModelError("captioner: neither a retriever nor a sequence embedder")
        codes_t = torch.from_numpy(codes.astype(np.int64))[None].to(self.device)
        max_frames = c.captioner.config.max_frames
        if codes_t.shape[-1] > max_frames:
            raise ModelError(f"window {window.window_id}: {codes_t.shape[-1]} codec frames > "
                             f"the model's max_frames {max_frames}; shorten window_s")
        hidden, mask = c.captioner.encode(codes_t, clip.to(self.dtype))
        lap("encoder")
        if self.decoding.mode == "beam":
            beam = beam_search(c.captioner.bart, hidden, mask, self._beam)
            text = decode_caption(c.tokenizer, beam.token_ids)
            lap("beam")
            best = (CaptionCandidate(text=text, decoder_score=beam.decoder_score,
                                     score=beam.decoder_score) if text
                    else no_caption(beam.decoder_score))
            candidates: tuple[CaptionCandidate, ...] = (best,)
            flagged = best.flagged
        else:
            sampled = sample_candidates(c.captioner.bart, hidden, mask, self._sampling,
                                        self._generator)
            # dedupe drops the candidates whose text is empty once cleaned
            unique = dedupe(attach_texts(sampled, c.tokenizer))
            lap("sampling")
            if unique:
                best, candidates, flagged = self._rank(unique, audio_joint, lap)
            else:
                best = no_caption(max(s.decoder_score for s in sampled))
                candidates, flagged = (best,), True
        caption = Caption(
            window_id=window.window_id, source_id=window.source_id, seq=window.seq,
            start_s=window.start_s, end_s=window.end_s, captured_at=window.captured_at,
            text=best.text, score=float(best.score), flagged=flagged, candidates=candidates,
            model=self.model_id, run_id=window.run_id)
        vector = audio_joint[0].cpu().numpy().astype(np.float32)
        vector.flags.writeable = False
        embedding = Embedding(window_id=window.window_id, source_id=window.source_id,
                              seq=window.seq, start_s=window.start_s, end_s=window.end_s,
                              model=self.model_id, vector=vector, run_id=window.run_id)
        return CaptionResult(caption=caption, embedding=embedding, stage_seconds=seconds)

    def _rank(self, unique: list[SampledCaption], audio_joint: torch.Tensor,
              lap: Callable[[str], None]) -> tuple[CaptionCandidate,
                                                   tuple[CaptionCandidate, ...], bool]:
        """Score the distinct sampled captions and pick one: ``(best, candidates, flagged)``."""
        c = self.components
        texts = [s.text for s in unique]
        encoder_scores = None
        if c.retriever is not None:
            enc = c.text_tokenizer(texts, padding=True, truncation=True,
                                   max_length=TEXT_MAX_LENGTH, return_tensors="pt")
            with self._autocast():
                text_joint = c.retriever.embed_text(enc["input_ids"].to(self.device),
                                                    enc["attention_mask"].to(self.device))
            text_joint = torch.nn.functional.normalize(text_joint.float(), dim=-1)
            encoder_scores = (text_joint @ audio_joint[0]).tolist()
            lap("text_encoder")
        error_probs = None
        if c.fluency is not None:
            with self._autocast():
                error_probs = c.fluency.error_probs(texts).tolist()
        lap("fluency")
        ranked = rerank(texts, [s.decoder_score for s in unique], encoder_scores,
                        error_probs, self._rerank)
        return ranked.best, ranked.candidates, ranked.flagged


def no_caption(decoder_score: float) -> CaptionCandidate:
    """What is published when the model wrote nothing readable: a placeholder, flagged.

    Its score stays the decoder's, so that it is honest; being flagged, it is
    never preferred to a readable candidate.
    """
    return CaptionCandidate(text=NO_CAPTION_TEXT, decoder_score=decoder_score,
                            score=decoder_score, flagged=True)


ENCODEC_STREAMING = StreamingOptions(context_frames_left=75, context_frames_right=0,
                                     exact_edges=True)
"""EnCodec is causal (no look-ahead: right context 0) with an LSTM whose state reaches
back further than any convolution: 75 frames (1 s) of left context, see
``bench/results/encodec_streaming.json``."""


def streaming_options(codec: AudioTokenizer) -> StreamingOptions:
    """The streaming-cache settings for a codec (DAC: the defaults)."""
    return ENCODEC_STREAMING if isinstance(codec, EncodecTokenizer) else StreamingOptions()


_BUNDLE_DECODING_KEYS = {"mode": str, "num_beams": int, "beam_max_length": int}


DEMO_MODEL = "demo"
DEMO_WARNING = (
    "model 'demo' is streamcap's built-in demo bundle: a small model trained in minutes on "
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
        _LOGGER.warning(DEMO_WARNING)
        return load_components(load_bundle(demo_bundle_path()))
    resolved = resolve_model(spec)
    if resolved.kind == "bundle":
        assert resolved.bundle_path is not None  # resolve_model sets it for bundles
        return load_components(load_bundle(resolved.bundle_path))
    if resolved.warning:
        _LOGGER.warning(resolved.warning)
    assert resolved.preset is not None  # resolve_model sets it for presets
    return build_components(preset_spec(resolved.preset), seed=seed)


def build_captioner(spec: str, model: ModelConfig, *, device: torch.device,
                    dtype: torch.dtype) -> Captioner:
    """The captioner ``streamcap run`` and ``streamcap caption`` use."""
    components = open_components(spec)
    decoding = model.decoding
    if components.decoding:
        # The bundle's own default decoding (mode, beam size and length) applies to
        # every key the config file did not set.
        from dataclasses import replace

        chosen = {key: kind(components.decoding[key])
                  for key, kind in _BUNDLE_DECODING_KEYS.items()
                  if key in components.decoding and key not in decoding.explicit}
        decoding = replace(decoding, **chosen)
    codec_dtype = dtype if model.codec_precision == "model" else torch.float32
    return Captioner(components, decoding, device=device, dtype=dtype, codec_dtype=codec_dtype)
