"""Incremental DAC encoding of overlapping windows with a per-source code cache.

Windows overlap (e.g. 10 s every 5 s), so most of a window's code frames were
already computed for the previous one. :class:`StreamingCodec` encodes only
the frames not cached yet, with ``context_frames_left`` frames of audio before
them and everything up to the window's end after them, and assembles the
window's codes from the cache.

Why context: the DAC encoder is convolutional with a receptive field of about
±8.4 frames (±2,682 samples at 24 kHz, computed from the kernel sizes,
dilations and strides); a frame closer than that to a chunk edge sees the
zero padding there and its codes can differ from a whole-window encode.

Which frames are final: frame ``f`` of a chunk is cached only when it lies at
least ``context_frames_right`` frames before the chunk's end (and, when the
chunk had to start at the window start, ``context_frames_left`` frames after
it). The newest ``context_frames_right`` frames of each window are
provisional: they are computed with the window end as boundary, exactly as a
whole-window encode does, used for this window, and recomputed next time.

Window edges: a whole-window encode sees zeros before the window start, a
stream does not. With ``exact_edges=True`` (the default) the first
``context_frames_left`` frames of every window are recomputed from a short
chunk that starts at the window start, so the codes equal a whole-window
encode everywhere (up to float rounding), which is what models trained on
whole clips saw. With ``exact_edges=False`` they come from the cache (real
audio on the left, no zero padding) and may differ from a whole-window encode.

Requirements: window start and hop are whole numbers of hop-length frames
(320 samples = 1/75 s at 24 kHz); a window whose start is not on the frame
grid, or that does not follow its predecessor, is encoded whole and counted
in :attr:`StreamingStats.whole_encodes`.

Codes stay on the codec's device: the cache holds int64 tensors there and a
window's :class:`CodecTokens` are assembled there, never copied to the host
and back. The window's start comes from its exact integer timebase
(:meth:`Window.start_sample`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from streamcap.errors import ConfigError, ModelError
from streamcap.messages import Window
from streamcap.models.codecs.dac import AudioTokenizer, CodecTokens, Float32Array

# Receptive field of the DAC encoder with strides (2, 4, 5, 8) is ±8.4 frames; 10
# leaves a margin for the quantizer's sensitivity to tiny latent differences.
DEFAULT_CONTEXT_FRAMES = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamingOptions:
    """Knobs of :class:`StreamingCodec`."""

    context_frames_left: int = DEFAULT_CONTEXT_FRAMES  # audio frames encoded before new frames
    context_frames_right: int = DEFAULT_CONTEXT_FRAMES  # newest frames kept provisional
    exact_edges: bool = True  # recompute each window's first frames with the window start as edge

    def __post_init__(self) -> None:
        problems = [
            f"codec.streaming.{name}: expected an integer >= 0, got {getattr(self, name)!r}"
            for name in ("context_frames_left", "context_frames_right")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0
        ]
        if problems:
            raise ConfigError(problems)


@dataclass(slots=True)
class StreamingStats:
    """Counters of encoded work, for real-time-factor bookkeeping."""

    windows: int = 0
    frames_out: int = 0  # frames returned to callers
    frames_encoded: int = 0  # frames the encoder computed (new + context + recomputed edges)
    whole_encodes: int = 0  # windows encoded whole (first of an epoch excluded): off-grid or gap
    resets: int = 0  # caches dropped because of a new epoch


@dataclass(slots=True)
class _SourceCache:
    epoch: int
    first_frame: int  # absolute frame index of codes[:, 0]
    codes: torch.Tensor  # int64 (n_codebooks, m) on the codec's device: final frames from first_frame
    seen: bool = False  # a window of this epoch was already fed

    @property
    def end_frame(self) -> int:
        return self.first_frame + int(self.codes.shape[1])


@dataclass(frozen=True, slots=True, kw_only=True)
class FedAudio:
    """One window's audio handed to :meth:`StreamingCodec.feed_batch` (the arguments of
    :meth:`StreamingCodec.feed`)."""

    source_id: str
    epoch: int
    start_sample: int
    audio: Float32Array


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """What one window needs encoded: the whole window, or the uncached tail
    (window frames ``[s0, n_frames)``) and, for exact edges, its first frames again."""

    cache: _SourceCache
    samples: Float32Array
    n_frames: int
    hop: int
    whole: bool
    start_frame: int | None
    u: int = 0  # first window frame not taken from the cache
    s0: int = 0  # first window frame of the fresh chunk (u minus the left context)
    edge_frames: int = 0  # frames of the edge chunk from the window start (0: none)

    def chunks(self) -> list[Float32Array]:
        """The audio to encode, in the order :meth:`StreamingCodec._finish` takes codes."""
        if self.whole:
            return [self.samples]
        fresh = self.samples[self.s0 * self.hop : self.n_frames * self.hop]
        if not self.edge_frames:
            return [fresh]
        return [fresh, self.samples[: self.edge_frames * self.hop]]


@dataclass(slots=True)
class StreamingCodec:
    """Per-source incremental encoder of overlapping windows (sans-I/O, not thread-safe).

    Args:
        tokenizer: the codec; its hop length defines the frame grid.
        options: context sizes and edge policy.
    """

    tokenizer: AudioTokenizer
    options: StreamingOptions = field(default_factory=StreamingOptions)
    stats: StreamingStats = field(default_factory=StreamingStats)
    _caches: dict[str, _SourceCache] = field(default_factory=dict)

    def codes_for(self, window: Window) -> CodecTokens:
        """Codes of ``window``'s audio at the codec's sample rate.

        Returns:
            int64 (n_codebooks, ceil(n / hop_length)) codes, as :meth:`AudioTokenizer.tokens`.
        """
        (tokens,) = self.codes_for_batch([window])
        return tokens

    def codes_for_batch(self, windows: Sequence[Window]) -> list[CodecTokens]:
        """:meth:`codes_for` of windows of distinct sources, their encodes batched.

        In a steady stream every source's new chunk (and re-encoded edge) has the same
        length, so on a GPU W windows cost ``2 * ceil(W / 32)`` encoder calls instead of
        2W (at most :data:`~streamcap.models.codecs.base.MAX_CODEC_BATCH` clips per call);
        on a CPU each chunk is encoded alone (:data:`~streamcap.models.codecs.base.CPU_CODEC_BATCH`).

        Raises:
            ValueError: two windows of one source.
        """
        if len({w.source_id for w in windows}) < len(windows):
            raise ValueError("codes_for_batch: two windows of one source")
        rate = self.tokenizer.config.sample_rate_hz
        return self.feed_batch([
            FedAudio(source_id=w.source_id, epoch=w.epoch, start_sample=w.start_sample(rate),
                 audio=w.samples(rate)) for w in windows])

    def feed(
        self, *, source_id: str, epoch: int, start_sample: int, audio: Float32Array
    ) -> CodecTokens:
        """Codes of a window that starts ``start_sample`` samples into the source's epoch.

        Args:
            source_id: the cache key.
            epoch: the source's clock epoch; a new one drops the cache.
            start_sample: index of ``audio[0]`` on the source's stream clock at the codec rate.
            audio: float32 (n,) mono at the codec's sample rate.

        Returns:
            int64 (n_codebooks, ceil(n / hop_length)) codes on the codec's device;
            ``start_frame`` is the window's first frame (None off the frame grid).

        Raises:
            ModelError: ``audio`` is not 1-D or is not finite.
        """
        (tokens,) = self.feed_batch([FedAudio(source_id=source_id, epoch=epoch,
                                          start_sample=start_sample, audio=audio)])
        return tokens

    def feed_batch(self, fed: Sequence[FedAudio]) -> list[CodecTokens]:
        """:meth:`feed` of several windows (distinct sources): plan each, encode every
        chunk in one :meth:`AudioTokenizer.codes_batch` call, then assemble each."""
        plans = [self._plan(f) for f in fed]
        chunks = [chunk for plan in plans for chunk in plan.chunks()]
        codes = iter(self.tokenizer.codes_batch(chunks))
        return [self._finish(plan, codes) for plan in plans]

    def _plan(self, fed: FedAudio) -> _Plan:
        samples = np.asarray(fed.audio, dtype=np.float32)
        if samples.ndim != 1:
            raise ModelError(f"codec input: expected mono audio of shape (n,), got {samples.shape}")
        config = self.tokenizer.config
        hop = config.hop_length
        n_frames = config.n_frames(samples.shape[0])
        self.stats.windows += 1
        self.stats.frames_out += n_frames
        cache = self._caches.get(fed.source_id)
        if cache is None or cache.epoch != fed.epoch:
            if cache is not None:
                self.stats.resets += 1
            cache = _SourceCache(epoch=fed.epoch, first_frame=0, codes=self._empty())
            self._caches[fed.source_id] = cache
        on_grid = fed.start_sample % hop == 0
        if not on_grid or n_frames == 0:
            if cache.seen:
                self.stats.whole_encodes += 1
            cache.seen = True
            cache.codes = self._empty()
            self.stats.frames_encoded += n_frames
            return _Plan(cache=cache, samples=samples, n_frames=n_frames, hop=hop, whole=True,
                         start_frame=fed.start_sample // hop if on_grid else None)
        w0 = fed.start_sample // hop
        self._evict(cache, w0)
        if cache.seen and cache.codes.shape[1] == 0:
            self.stats.whole_encodes += 1
        cache.seen = True
        left = self.options.context_frames_left
        right = self.options.context_frames_right
        u = min(cache.codes.shape[1], max(n_frames - right, 0))  # first frame to compute now
        s0 = max(0, u - left)  # the chunk starts `left` frames earlier, or at the window start
        plan = _Plan(cache=cache, samples=samples, n_frames=n_frames, hop=hop, whole=False,
                     start_frame=w0, u=u, s0=s0,
                     edge_frames=min(n_frames, left + right)
                     if self.options.exact_edges and s0 > 0 and left > 0 else 0)
        self.stats.frames_encoded += (n_frames - s0) + plan.edge_frames
        return plan

    def _finish(self, plan: _Plan, codes: Iterator[torch.Tensor]) -> CodecTokens:
        """The window's codes from the cache and its freshly encoded chunks (frames
        relative to the window start); the cache keeps the frames that became final."""
        if plan.whole:
            return CodecTokens(codes=next(codes), codec_id=self.tokenizer.codec_id,
                               frame_rate_hz=self.tokenizer.frame_rate_hz,
                               start_frame=plan.start_frame)
        cache, u, s0, n_frames = plan.cache, plan.u, plan.s0, plan.n_frames
        left = self.options.context_frames_left
        right = self.options.context_frames_right
        cached = cache.codes.shape[1]
        fresh = next(codes)
        out = torch.cat((cache.codes[:, :u], fresh[:, u - s0 :]), dim=1)  # a new tensor
        # Frames with `left` real frames before them and `right` after them become final.
        lo = max(u, left)
        hi = n_frames - right
        if hi > lo:
            new = fresh[:, lo - s0 : hi - s0]
            if cached > 0 and lo == cached:
                cache.codes = torch.cat((cache.codes, new), dim=1)
            else:
                cache.codes = new
                cache.first_frame = cast(int, plan.start_frame) + lo
        if plan.edge_frames:
            # The window's first frames as a whole-window encode sees them: zeros before w0.
            n_edge = min(left, n_frames)
            out[:, :n_edge] = next(codes)[:, :n_edge]
        return CodecTokens(codes=out, codec_id=self.tokenizer.codec_id,
                           frame_rate_hz=self.tokenizer.frame_rate_hz,
                           start_frame=plan.start_frame)

    def reset(self, source_id: str | None = None) -> None:
        """Drop one source's cache, or every cache when ``source_id`` is None."""
        if source_id is None:
            self._caches.clear()
        else:
            self._caches.pop(source_id, None)

    def cached_frames(self, source_id: str) -> tuple[int, int]:
        """Absolute frame range ``[first, end)`` of the final codes cached for ``source_id``."""
        cache = self._caches.get(source_id)
        if cache is None:
            return (0, 0)
        return (cache.first_frame, cache.end_frame)

    # -- internals ------------------------------------------------------------------------

    def _empty(self) -> torch.Tensor:
        return torch.zeros((self.tokenizer.config.n_codebooks, 0), dtype=torch.int64,
                           device=self.tokenizer.device)

    def _evict(self, cache: _SourceCache, w0: int) -> None:
        """Keep only cached frames from ``w0`` on; drop all when ``w0`` is not inside the cache."""
        if cache.first_frame <= w0 < cache.end_frame:
            cache.codes = cache.codes[:, w0 - cache.first_frame :]
        else:
            cache.codes = self._empty()  # first window, gap, jump back, or hop < context
        cache.first_frame = w0
