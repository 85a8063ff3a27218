"""StreamingCodec: incremental codes of overlapping windows vs whole-window encodes (tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamcap.errors import ConfigError, ModelError
from streamcap.messages import make_window
from streamcap.models.codecs import base as codec_base
from streamcap.models.codecs.dac import CodecConfig, CodecTokenizer, CodecTokens, codec_preset
from streamcap.models.codecs.streaming import FedAudio, StreamingCodec, StreamingOptions

torch.set_num_threads(1)
SR = 24000
WIN, HOP = 4 * SR, 2 * SR  # 4 s windows every 2 s: whole numbers of 320-sample frames


@pytest.fixture(scope="module")
def tok() -> CodecTokenizer:
    torch.manual_seed(0)
    return CodecTokenizer(codec_preset("tiny"))


@pytest.fixture(scope="module")
def stream_audio() -> np.ndarray:
    rng = np.random.default_rng(7)
    t = np.arange(14 * SR) / SR
    gate = np.sin(2 * np.pi * 0.7 * t) > 0
    return (0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 523 * t) * gate).astype(np.float32)


def _run(tok: CodecTokenizer, x: np.ndarray, options: StreamingOptions) -> list[tuple[np.ndarray, np.ndarray]]:
    codec = StreamingCodec(tok, options)
    pairs = []
    for start in range(0, len(x) - WIN + 1, HOP):
        a = x[start : start + WIN]
        got = codec.feed(source_id="s", epoch=0, start_sample=start, audio=a)
        assert got.start_frame == start // 320 and got.codec_id == tok.codec_id
        pairs.append((got.codes.numpy(), tok.tokens(a).codes.numpy()))
    return pairs


def test_streamed_codes_equal_whole_window_codes(tok: CodecTokenizer, stream_audio: np.ndarray) -> None:
    pairs = _run(tok, stream_audio, StreamingOptions())
    assert len(pairs) == 6
    for got, ref in pairs:
        assert got.shape == ref.shape == (4, WIN // 320) and got.dtype == np.int64
        assert (got[:, 12:-12] == ref[:, 12:-12]).mean() >= 0.998  # interior (at most one flip per window)
        assert (got == ref).mean() >= 0.998  # exact_edges: the window edges too


def test_without_exact_edges_only_the_left_edge_may_differ(
    tok: CodecTokenizer, stream_audio: np.ndarray
) -> None:
    pairs = _run(tok, stream_audio, StreamingOptions(exact_edges=False))
    interior = np.concatenate([(g == r)[:, 12:] for g, r in pairs], axis=1)
    assert interior.mean() >= 0.999


def test_context_matters(tok: CodecTokenizer, stream_audio: np.ndarray) -> None:
    """Without context, frames next to chunk edges see zero padding, and codes change."""
    no_ctx = _run(tok, stream_audio, StreamingOptions(context_frames_left=0, context_frames_right=0))
    agree = np.mean([(g == r).mean() for g, r in no_ctx])
    assert agree < 1.0


def test_encodes_only_new_audio(tok: CodecTokenizer, stream_audio: np.ndarray) -> None:
    codec = StreamingCodec(tok, StreamingOptions(context_frames_left=10, context_frames_right=10))
    for start in range(0, 3 * HOP + 1, HOP):
        codec.feed(source_id="s", epoch=0, start_sample=start, audio=stream_audio[start : start + WIN])
    frames_win, frames_hop = WIN // 320, HOP // 320
    # first window whole; then per window: hop + left + right context + the exact left edge
    assert codec.stats.frames_encoded == frames_win + 3 * (frames_hop + 10 + 10 + 20)
    assert codec.cached_frames("s") == (3 * frames_hop, 3 * frames_hop + frames_win - 10)


def test_epoch_reset_and_sources_apart(tok: CodecTokenizer, stream_audio: np.ndarray) -> None:
    codec = StreamingCodec(tok)
    a = stream_audio[:WIN]
    codec.feed(source_id="s", epoch=0, start_sample=0, audio=a)
    codec.feed(source_id="other", epoch=0, start_sample=0, audio=stream_audio[HOP : HOP + WIN])
    b = stream_audio[HOP : HOP + WIN]
    # Same start index, new epoch: the old epoch's cache must not leak into these codes.
    got = codec.feed(source_id="s", epoch=1, start_sample=HOP, audio=b)
    assert codec.stats.resets == 1
    assert torch.equal(got.codes, tok.tokens(b).codes)
    assert codec.cached_frames("s")[0] == HOP // 320 + 10
    assert codec.cached_frames("other")[0] == 10
    codec.reset("s")
    assert codec.cached_frames("s") == (0, 0)


def test_cache_evicts_frames_before_the_window(tok: CodecTokenizer, stream_audio: np.ndarray) -> None:
    codec = StreamingCodec(tok)
    for start in (0, HOP, 2 * HOP):
        codec.feed(source_id="s", epoch=0, start_sample=start, audio=stream_audio[start : start + WIN])
        first, end = codec.cached_frames("s")
        assert first >= start // 320 and end <= (start + WIN) // 320


def test_off_grid_and_gap_fall_back_to_whole_encode(tok: CodecTokenizer, stream_audio: np.ndarray) -> None:
    codec = StreamingCodec(tok)
    codec.feed(source_id="s", epoch=0, start_sample=0, audio=stream_audio[:WIN])
    off = stream_audio[HOP + 100 : HOP + 100 + WIN]
    got = codec.feed(source_id="s", epoch=0, start_sample=HOP + 100, audio=off)
    assert got.start_frame is None and torch.equal(got.codes, tok.tokens(off).codes)
    far = stream_audio[5 * HOP : 5 * HOP + WIN]
    got = codec.feed(source_id="s", epoch=0, start_sample=5 * HOP, audio=far)
    assert got.start_frame == 5 * HOP // 320 and torch.equal(got.codes, tok.tokens(far).codes)
    assert codec.stats.whole_encodes == 2


def test_codes_for_window_take_its_exact_start_sample(
    tok: CodecTokenizer, stream_audio: np.ndarray
) -> None:
    """A window's start at the codec rate comes from its integer timebase (milliseconds ->
    samples, no seconds in between): windows far into a stream land on the frame grid and
    continue the cache."""
    codec = StreamingCodec(tok)
    base_ms = 1_234_560  # 20 min 34.56 s: 29,629,440 samples, frame 92,592 at 24 kHz
    for i in range(3):
        start_ms = base_ms + i * HOP // 24
        a = stream_audio[i * HOP : i * HOP + WIN]
        window = make_window(
            source_id="mic", seq=i, epoch=0, start_ms=start_ms, end_ms=start_ms + WIN // 24,
            captured_at=0.0, level_dbfs=-20.0, audio={SR: a},
        )
        assert window.start_sample(SR) == start_ms * 24
        got = codec.codes_for(window)
        assert got.start_frame == start_ms * 24 // 320
        assert (got.codes.numpy() == tok.tokens(a).codes.numpy()).mean() >= 0.998
    assert codec.stats.whole_encodes == 0  # every window continued the cache


class _MetaTokenizer:
    """A codec whose codes live on the "meta" device: any copy to the host would fail."""

    def __init__(self) -> None:
        self.config: CodecConfig = codec_preset("tiny")
        self.device = torch.device("meta")
        self.codec_id = self.config.codec_id
        self.frame_rate_hz = self.config.frame_rate_hz

    def tokens(self, audio: np.ndarray, *, start_frame: int | None = 0) -> CodecTokens:
        n = self.config.n_frames(len(audio))
        return CodecTokens(codes=torch.zeros((4, n), dtype=torch.int64, device=self.device),
                           codec_id=self.codec_id, frame_rate_hz=self.frame_rate_hz,
                           start_frame=start_frame)

    def codes_batch(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        return [self.tokens(clip).codes for clip in clips]

    def encode(self, audio: np.ndarray) -> np.ndarray:
        raise AssertionError("the streaming cache must not ask for host codes")


def test_streamed_codes_never_leave_the_device(stream_audio: np.ndarray) -> None:
    codec = StreamingCodec(_MetaTokenizer())  # type: ignore[arg-type]
    for start in (0, HOP, 2 * HOP, 2 * HOP + 100):
        got = codec.feed(source_id="s", epoch=0, start_sample=start,
                         audio=stream_audio[start : start + WIN])
        assert got.codes.device.type == "meta" and got.codes.dtype == torch.int64
        assert got.batched().shape == (1, 4, WIN // 320)


def test_bad_options_and_input(tok: CodecTokenizer) -> None:
    with pytest.raises(ConfigError, match="context_frames_left"):
        StreamingOptions(context_frames_left=-1)
    with pytest.raises(ModelError, match="mono"):
        StreamingCodec(tok).feed(source_id="s", epoch=0, start_sample=0, audio=np.zeros((2, 320), np.float32))


@pytest.mark.parametrize("cpu_batch", [1, 32])
def test_a_batch_of_sources_gets_each_sources_own_codes(
        tok: CodecTokenizer, stream_audio: np.ndarray, cpu_batch: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three sources fed as batches get the codes each gets alone, window after window;
    with batching (as on a GPU) equal chunks share one encoder call, on a CPU by default
    each chunk has its own."""
    monkeypatch.setattr(codec_base, "CPU_CODEC_BATCH", cpu_batch)
    rng = np.random.default_rng(3)
    streams = {f"s{k}": (stream_audio * (0.5 + k) + 0.02 * rng.standard_normal(stream_audio.size)
                         ).astype(np.float32) for k in range(3)}
    batched, alone = StreamingCodec(tok), StreamingCodec(tok)
    calls: list[int] = []
    encode_clips = tok._encode_clips

    def counting(samples: np.ndarray, n_frames: int) -> torch.Tensor:
        calls.append(samples.shape[0])
        return encode_clips(samples, n_frames)

    tok._encode_clips = counting  # type: ignore[method-assign]
    try:
        for start in range(0, len(stream_audio) - WIN + 1, HOP):
            fed = [{"source_id": s, "epoch": 0, "start_sample": start,
                    "audio": x[start : start + WIN]} for s, x in streams.items()]
            calls.clear()
            together = batched.feed_batch([FedAudio(**f) for f in fed])
            if start > 0:  # steady state: the fresh chunks, then the edges
                assert calls == ([3, 3] if cpu_batch > 1 else [1] * 6)
            for f, got in zip(fed, together, strict=True):
                own = alone.feed(**f)
                assert got.start_frame == own.start_frame
                assert torch.equal(got.codes, own.codes)
    finally:
        del tok._encode_clips
    with pytest.raises(ValueError, match="two windows of one source"):
        StreamingCodec(tok).codes_for_batch([
            make_window(source_id="a", seq=seq, epoch=0, start_ms=seq * HOP // 24,
                        end_ms=seq * HOP // 24 + WIN // 24, captured_at=0.0, level_dbfs=-20.0,
                        audio={SR: stream_audio[seq * HOP : seq * HOP + WIN]})
            for seq in (0, 1)
        ])
