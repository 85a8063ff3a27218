"""The captioner: every model component composed into Window -> Caption.

:meth:`Captioner.caption_batch` captions W windows of distinct sources together
(:meth:`Captioner.caption` is a batch of one: one code path), on the inference thread:

1. **codec**: DAC codes of each window at 24 kHz, from its source's streaming
   cache (each hop of new audio is encoded once), through the streaming codec's
   batched path (:meth:`~streamcap.models.codecs.streaming.StreamingCodec.codes_for_batch`):
   on a GPU the windows' chunks of equal length go through the encoder in one call, at
   most :data:`~streamcap.models.codecs.base.MAX_CODEC_BATCH` (32) clips per call; on a
   CPU each chunk is encoded alone (batching there was slower);
2. **retriever audio**: CNext clip embedding (EnCLAP's row 0) and the joint
   audio embedding (published as the window's ``Embedding``), at 32 kHz, one
   CNext batch per window length (padding would change an embedding);
3. **encoder**: EnCLAP's BART encoder over ``[clip, BOS, codes, EOS]`` of all W
   windows at once, padded to the longest with a frame mask;
4. **decoding** (:class:`~streamcap.models.decoding.task.DecodingTask`): the
   options' token decoder over those encoder outputs (``sampling``:
   ``n_candidates`` nucleus samples per window, all ``W x n_candidates`` rows in
   one batched pass, each window's rows attending only to its own encoder output;
   ``beam``: beam search, window by window), then, for samples, **text encoder**
   (the retriever's text embedding of each distinct candidate of all windows, once)
   and **fluency** (its error probability, once over the same texts), and per window
   the rerank ``0.7 * cosine + 0.3 * log-probability``, best unflagged wins;
5. **abstention** (:mod:`~streamcap.models.decoding.abstain`): the chosen
   caption's *confidence* is the retriever's cosine of its text with the
   window's audio (the rerank's encoder score, or computed for beam search's
   caption); the bundle's rule (if any) replaces the text by "quiet" or "an
   unfamiliar sound" and marks the caption ``abstained``.

Each window samples from its own random stream
(:meth:`~streamcap.models.decoding.task.DecodingTask.stream_for`): with a decoding seed,
seeded from ``(seed, source_id, seq)``, so with float components a window's caption is
the same alone or in any batch, in any order, whatever was captioned before (scores up
to float rounding). Components in dynamic int8 (``int8``, opt-in) quantize each call's
activations with one scale for the whole batch: a window's scores (and, through an int8
decoder, rarely its caption) can then depend on the windows batched with it.
A batch's results carry ``batch_size`` and the whole batch's seconds per stage.

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
import time
from collections.abc import Collection, Iterator, Sequence

import numpy as np
import torch

from streamcap.errors import ModelError
from streamcap.messages import Caption, CaptionResult, Embedding, Window
from streamcap.models.bundle.components import Components, open_components
from streamcap.models.codecs.base import CodecTokens
from streamcap.models.codecs.dac import AudioTokenizer, CodecTokenizer, Precision
from streamcap.models.codecs.encodec import EncodecTokenizer
from streamcap.models.codecs.streaming import StreamingCodec, StreamingOptions
from streamcap.models.decoding.abstain import AbstentionOptions, AbstentionRule, Verdict, decide
from streamcap.models.decoding.inference import SharedCrossInference
from streamcap.models.decoding.options import DecodingOptions
from streamcap.models.decoding.rerank import BatchTextScorer, RerankResult, TextScorer
from streamcap.models.decoding.task import DecodingTask
from streamcap.models.enclap.tokenizer import NO_CAPTION_TEXT

TEXT_MAX_LENGTH = 64
TEXT_BATCH = 256
"""Most texts the text encoder embeds in one pass (a batch of windows may hold thousands)."""


def pad_codes(tokens: Sequence[CodecTokens], *, pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windows' codes as one batch: int64 (W, K, T_max) padded with ``pad_id``, and the
    frame mask (W, T_max) (True = real frame), or None when every window has T_max frames."""
    longest = max(t.n_frames for t in tokens)
    if all(t.n_frames == longest for t in tokens):
        return torch.stack([t.codes for t in tokens]), None
    first = tokens[0].codes
    codes = first.new_full((len(tokens), first.shape[0], longest), pad_id)
    mask = torch.zeros((len(tokens), longest), dtype=torch.bool, device=first.device)
    for i, t in enumerate(tokens):
        codes[i, :, : t.n_frames] = t.codes
        mask[i, : t.n_frames] = True
    return codes, mask


class Captioner:
    """Window -> caption and embedding; call only from the inference thread.

    Args:
        components: the loaded models.
        decoding: every decoding choice (strategy, its settings, reranking, seed).
        device: where the models run.
        dtype: compute precision of BART, CNext and the text encoders;
            log-mel features and all scores stay in float32.
        codec_dtype: precision of the DAC encoder (its quantizer is always
            float32); float32 by default because lower precision changes codes.
        int8: components whose linear layers run dynamic int8 (CPU, float32 only; see
            :func:`streamcap.models.quantize.quantize_components`); they break the exact
            independence of batched windows (see the module docstring).
    """

    def __init__(self, components: Components, decoding: DecodingOptions,
                 *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 codec_dtype: torch.dtype = torch.float32,
                 int8: Collection[str] = ()) -> None:
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
        if int8:
            from streamcap.models.quantize import quantize_components

            if dtype != torch.float32:
                raise ModelError("int8 components need float32 for the rest of the model")
            quantize_components(c, int8)
        self._stream = StreamingCodec(c.codec, streaming_options(c.codec))
        self._vocab_limit = len(c.tokenizer)
        self.task = DecodingTask(decoding, c.tokenizer, device=self.device)
        self.abstention: AbstentionRule | None = c.abstention
        self._quiet_joint: torch.Tensor | None = None  # text embeddings of the quiet texts
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

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The compute precision's autocast (none in float32), for other users of the models."""
        return self._autocast()

    def caption(self, window: Window) -> CaptionResult:
        """Caption one window: :meth:`caption_batch` of it alone.

        Returns:
            The caption (``latency_ms``/``lag_s`` are the caller's) and the
            retriever's L2-normalised audio embedding, with seconds per stage.
        """
        return self.caption_batch([window])[0]

    @torch.inference_mode()
    def caption_batch(self, windows: Sequence[Window]) -> list[CaptionResult]:
        """Caption windows of distinct sources together (see the module docstring).

        Each result equals :meth:`caption` of its window alone (with a decoding seed:
        the same tokens and texts; scores equal up to float rounding), carries
        ``batch_size = len(windows)`` and the whole batch's seconds per stage.

        Raises:
            ValueError: two windows of one source.
            ModelError: a window longer than the model's ``max_frames``.
        """
        if len({w.source_id for w in windows}) < len(windows):
            raise ValueError("caption_batch: two windows of one source in one batch")
        if not windows:
            return []
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

        tokens = self._stream.codes_for_batch(windows)
        lap("codec")
        max_frames = c.captioner.config.max_frames
        for window, codes in zip(windows, tokens, strict=True):
            if codes.n_frames > max_frames:
                raise ModelError(f"window {window.window_id}: {codes.n_frames} codec frames > "
                                 f"the model's max_frames {max_frames}; shorten window_s")
        audio_joint: torch.Tensor | None = None
        clip: torch.Tensor | None = None
        if c.retriever is not None:
            clip, audio_joint = self._retriever_audio(windows)
            lap("retriever_audio")
        if c.seq_embedder is not None:
            embedder = c.seq_embedder
            clip = torch.cat([embedder.embed_tensor(w.samples(embedder.sample_rate_hz))
                              for w in windows])
            lap("clap")
            if audio_joint is None:
                audio_joint = clip.float()
        if clip is None or audio_joint is None:
            raise ModelError("captioner: neither a retriever nor a sequence embedder")
        batch, frame_mask = pad_codes(tokens, pad_id=c.captioner.config.codec_pad_id)
        hidden, mask = c.captioner.encode(batch, clip.to(self.dtype), frame_mask)
        lap("encoder")
        streams = [self.task.stream_for(w.source_id, w.seq) for w in windows]
        ranked = self.task.run_batch(SharedCrossInference(c.captioner.bart, hidden, mask),
                                     streams, similarity=self._similarity(audio_joint),
                                     fluency=self._fluency(), lap=lap)
        judged = self._judge(ranked, audio_joint, [w.level_dbfs for w in windows])
        lap("abstention")
        results = []
        for w, (window, rank, (confidence, verdict)) in enumerate(
                zip(windows, ranked, judged, strict=True)):
            best = rank.best
            caption = Caption(
                window_id=window.window_id, source_id=window.source_id, seq=window.seq,
                start_s=window.start_s, end_s=window.end_s, captured_at=window.captured_at,
                text=best.text if verdict.text is None else verdict.text,
                score=float(best.score), flagged=rank.flagged and not verdict.abstained,
                candidates=rank.candidates, confidence=confidence,
                abstained=verdict.abstained, model=self.model_id, run_id=window.run_id)
            vector = audio_joint[w].cpu().numpy().astype(np.float32)
            vector.flags.writeable = False
            embedding = Embedding(window_id=window.window_id, source_id=window.source_id,
                                  seq=window.seq, start_s=window.start_s, end_s=window.end_s,
                                  model=self.model_id, vector=vector, run_id=window.run_id)
            results.append(CaptionResult(caption=caption, embedding=embedding,
                                         stage_seconds=dict(seconds), batch_size=len(windows)))
        return results

    def _retriever_audio(self, windows: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor]:
        """CNext clip embeddings (W, C) and L2-normalised joint embeddings (W, d), float32.

        Windows of equal length run as one batch; windows of different lengths in
        separate batches (padding would change a clip's embedding).
        """
        retriever = self.components.retriever
        assert retriever is not None
        rate = retriever.config.audio.mel.sample_rate
        waves = [w.samples(rate) for w in windows]
        groups: dict[int, list[int]] = {}
        for i, wave in enumerate(waves):
            groups.setdefault(len(wave), []).append(i)
        clips: list[torch.Tensor] = [torch.empty(0)] * len(windows)
        joints: list[torch.Tensor] = [torch.empty(0)] * len(windows)
        for members in groups.values():
            batch = torch.from_numpy(np.stack([waves[i] for i in members])).to(self.device)
            with self._autocast():
                clip, joint = retriever.embed_audio(batch)
            joint = torch.nn.functional.normalize(joint.float(), dim=-1)
            for row, i in enumerate(members):
                clips[i], joints[i] = clip[row], joint[row]
        return torch.stack(clips), torch.stack(joints)

    def _judge(self, ranked: Sequence[RerankResult], audio_joint: torch.Tensor,
               levels_dbfs: Sequence[float]) -> list[tuple[float | None, Verdict]]:
        """Each window's confidence in its chosen caption and the abstention verdict on it.

        The confidence is the rerank's encoder score, or (beam search) the retriever's
        cosine of the caption, computed for every window needing it in one batch.
        """
        confidences: list[float | None] = [None] * len(ranked)
        if self.components.retriever is not None:
            missing = []
            for w, rank in enumerate(ranked):
                if rank.best.text == NO_CAPTION_TEXT:
                    continue
                if rank.best.encoder_score is not None:
                    confidences[w] = float(rank.best.encoder_score)
                else:
                    missing.append(w)
            if missing:
                embedded = self.text_embeddings([ranked[w].best.text for w in missing])
                cosines = (embedded * audio_joint[missing]).sum(dim=-1).tolist()
                for w, cosine in zip(missing, cosines, strict=True):
                    confidences[w] = float(cosine)
        rule = self.abstention
        quiet: list[float | None] = [None] * len(ranked)
        if rule is not None and rule.quiet_texts and any(x is not None for x in confidences):
            if self._quiet_joint is None:
                self._quiet_joint = self.text_embeddings(rule.quiet_texts)
            best_quiet = (audio_joint @ self._quiet_joint.T).max(dim=1).values.tolist()
            quiet = [None if confidence is None else float(q)
                     for confidence, q in zip(confidences, best_quiet, strict=True)]
        return [(confidence, decide(rule, level_dbfs=level, confidence=confidence,
                                    quiet_confidence=q))
                for confidence, q, level in zip(confidences, quiet, levels_dbfs, strict=True)]

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """The retriever's L2-normalised joint text embeddings, float32 (n, d).

        At most :data:`TEXT_BATCH` texts go through the text encoder at once.
        """
        retriever = self.components.retriever
        if retriever is None:
            raise ModelError("captioner: text embeddings need a retriever")
        texts = list(texts)
        parts = [torch.zeros((0, retriever.config.joint_dim), device=self.device)]
        for start in range(0, len(texts), TEXT_BATCH):
            enc = self.components.text_tokenizer(
                texts[start:start + TEXT_BATCH], padding=True, truncation=True,
                max_length=TEXT_MAX_LENGTH, return_tensors="pt")
            with self._autocast():
                text_joint = retriever.embed_text(enc["input_ids"].to(self.device),
                                                  enc["attention_mask"].to(self.device))
            parts.append(torch.nn.functional.normalize(text_joint.float(), dim=-1))
        return torch.cat(parts)

    def _similarity(self, audio_joint: torch.Tensor) -> BatchTextScorer | None:
        """The retriever's cosine of texts with each window's audio (W, d), or None without one."""
        if self.components.retriever is None:
            return None

        def cosines(texts: Sequence[str]) -> list[list[float]]:
            scores: list[list[float]] = (audio_joint @ self.text_embeddings(texts).T).tolist()
            return scores

        return cosines

    def _fluency(self) -> TextScorer | None:
        """The fluency filter's error probability of texts, or None without one."""
        fluency = self.components.fluency
        if fluency is None:
            return None

        def error_probs(texts: Sequence[str]) -> list[float]:
            with self._autocast():
                probs: list[float] = fluency.error_probs(list(texts)).tolist()
            return probs

        return error_probs


ENCODEC_STREAMING = StreamingOptions(context_frames_left=75, context_frames_right=0,
                                     exact_edges=True)
"""EnCodec is causal (no look-ahead: right context 0) with an LSTM whose state reaches
back further than any convolution: 75 frames (1 s) of left context, see
``bench/results/encodec_streaming.json``."""


def streaming_options(codec: AudioTokenizer) -> StreamingOptions:
    """The streaming-cache settings for a codec (DAC: the defaults)."""
    return ENCODEC_STREAMING if isinstance(codec, EncodecTokenizer) else StreamingOptions()


def build_captioner(spec: str, decoding: DecodingOptions, *, device: torch.device,
                    dtype: torch.dtype, codec_follows_dtype: bool = False,
                    abstention: AbstentionOptions | None = None,
                    int8: Collection[str] = ()) -> Captioner:
    """The captioner ``streamcap run`` and ``streamcap caption`` use.

    Args:
        spec: a bundle directory, ``"demo"`` or a preset name.
        decoding: the decoding options; the bundle's own decoding defaults fill every
            field they do not mark explicit.
        device: where the models run.
        dtype: compute precision.
        codec_follows_dtype: run the codec encoder in ``dtype`` too (else float32,
            which keeps its codes exact).
        abstention: the config's changes to the bundle's abstention rule.
        int8: components run in dynamic int8 (a :class:`~streamcap.models.runtime.PrecisionPlan`'s
            ``int8``).
    """
    components = open_components(spec)
    if abstention is not None:
        components.abstention = abstention.apply(components.abstention)
    decoding = decoding.with_defaults(components.decoding)
    codec_dtype = dtype if codec_follows_dtype else torch.float32
    return Captioner(components, decoding, device=device, dtype=dtype, codec_dtype=codec_dtype,
                     int8=int8)
