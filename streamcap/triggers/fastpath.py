"""The trigger path's use of the retriever: audio embeddings of short windows, phrase embeddings.

Runs on the inference thread only (like every model call). ``streamcap triggers
calibrate`` and ``bench/triggers.py`` embed windows and examples with this same code,
so that they score exactly what the daemon scores.

**What is incremental.** Trigger windows overlap (5 s every 1 s by default),
so most of a window's log-mel frames were already computed for the window
before. :class:`MelCache` keeps, per source, the log-mel frames of the
source's stream: frame ``g`` of an epoch is centred on stream sample ``g *
hop_length`` (at the retriever's rate) and depends only on the 1024 samples
around it, so the frames *inside* a window (whose 1024 samples lie within it)
are the same for every window that holds them and are computed once, from the
first window that holds them. Only the frames at each end of a window
(``n_fft // 2 / hop_length`` of them, rounded up: two with the default
settings), which the front end builds from reflect-padded audio, are
computed per window. The result equals the front end run on the whole window (checked in
the tests). This needs window starts on the frame grid (``hop_s`` a multiple
of 10 ms at 32 kHz with a hop of 320); otherwise every window is computed in
full.

**What is not.** The ConvNeXt encoder runs on the whole window's log-mel
image each time: its 7x7 convolutions with zero padding at the window's
edges, the stride-32 downsampling (a hop of 100 frames is not a multiple of
32) and the max+mean pooling over the window make its output depend on where
the window starts, so cached activations would not give the same embedding.

**Cost, measured** on this project's 2-core build machine (one torch thread,
fp32, 5 s at 32 kHz, while other work ran): the demo bundle's small CNext
(dims 8-64, one block per stage): log-mel 5.7 ms, whole audio embedding
6.0 ms, so the front end is nearly all of it and the cache removes ~4/5 of
it; the published CNext-Tiny size (dims 96-768, depths 3-3-9-3): log-mel
4.9 ms, whole embedding 448 ms, so the encoder is ~99 % and the cache saves
~1 %. With that encoder one watched source costs ~0.45 s of inference per
second of audio at the default hop: captioning and triggers then share the
thread as described in :mod:`streamcap.triggers.engine`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from streamcap.audio.resample import resample
from streamcap.errors import ConfigError, ModelError
from streamcap.messages import Window
from streamcap.models.captioner import TEXT_MAX_LENGTH, Captioner
from streamcap.models.retrieval.melspec import LogMel
from streamcap.options import open_regular

EXAMPLE_MAX_S = 60.0
"""Only the first this many seconds of an example file are used."""


class MelCache:
    """Log-mel frames of one source's stream, each computed once (see the module doc)."""

    def __init__(self, frontend: LogMel) -> None:
        self.frontend = frontend
        cfg = frontend.config
        self.hop = cfg.hop_length
        self.half = cfg.n_fft // 2
        self.rate = cfg.sample_rate
        self._epoch: int | None = None
        self._base = 0  # stream frame index of _frames[0]
        self._frames: Tensor | None = None  # (N, n_mels) log-mel frames, in dB
        self.computed = 0
        """Frames computed so far (edge frames included), for tests and stats."""

    def _full(self, wave: Tensor) -> Tensor:
        out: Tensor = self.frontend(wave[None])[0, 0]
        self.computed += out.shape[0]
        return out

    def _span(self, wave: Tensor, first: int, last: int) -> Tensor:
        """Frames ``first..last`` (window-relative) of the window, all inside it."""
        piece = wave[first * self.hop - self.half:last * self.hop + self.half]
        power = self.frontend.power_spectrogram(piece[None], center=False)
        out: Tensor = self.frontend.power_to_db(power)[0]
        self.computed += out.shape[0]
        return out

    def logmel(self, window: Window, device: torch.device) -> Tensor:
        """The window's log-mel image (T, n_mels), as the front end makes it."""
        wave = torch.from_numpy(np.array(window.samples(self.rate))).to(device)
        start = window.start_sample(self.rate)
        n = wave.shape[0]
        count = n // self.hop + 1  # frames of the window (centred)
        first = -(-self.half // self.hop)  # first frame that needs no padding on the left
        last = (n - self.half) // self.hop  # last one that needs none on the right
        if start % self.hop or last - first < 4 or n <= 4 * self.half:
            self._frames = None
            return self._full(wave)
        g0 = start // self.hop
        if window.epoch != self._epoch or self._frames is None:
            self._epoch, self._frames, self._base = window.epoch, None, g0 + first
        frames = self._frames
        have_end = self._base + (0 if frames is None else frames.shape[0])
        want_first, want_last = g0 + first, g0 + last
        if frames is not None and (self._base > want_first or have_end < want_first):
            frames, have_end = None, want_first  # not contiguous with what is cached
        if frames is None:
            self._base = want_first
            have_end = want_first
        if have_end <= want_last:
            new = self._span(wave, have_end - g0, last)
            frames = new if frames is None else torch.cat((frames, new))
        assert frames is not None
        frames = frames[want_first - self._base:]
        self._frames, self._base = frames, want_first
        interior = frames[:want_last - want_first + 1]
        head = self._full(wave[:min(n, 2 * self.half + first * self.hop)])[:first]
        # From frame k0 on (on the frame grid), with room to the left for the frames
        # wanted: frame last + 1 is that cut's frame first + 1, which needs no padding
        # on its left, so only the right end is padded, as in the whole window.
        k0 = last - first
        tail = self._full(wave[k0 * self.hop:])[last + 1 - k0:count - k0]
        return torch.cat((head, interior, tail))


class RetrieverTriggerModel:
    """The retriever of a loaded :class:`Captioner`, as the trigger engine uses it.

    Every method but :meth:`phrase_problem` runs on the inference thread.
    """

    def __init__(self, captioner: Captioner) -> None:
        retriever = captioner.components.retriever
        if retriever is None:
            raise ConfigError("triggers: the model has no retriever (audio-text embeddings); "
                              "triggers need a bundle with one")
        self._captioner = captioner
        self._retriever = retriever
        self._tokenizer = captioner.components.text_tokenizer
        self.frontend = retriever.audio_encoder.frontend
        self.sample_rate_hz: int = retriever.config.audio.mel.sample_rate
        self._min_samples = retriever.audio_encoder.min_samples()
        self._caches: dict[str, MelCache] = {}

    @property
    def model_id(self) -> str:
        return self._captioner.model_id

    def phrase_problem(self, text: str) -> str | None:
        """Why the text tokenizer cannot represent ``text``, or None (no torch: any thread)."""
        return phrase_problem(self._tokenizer, text)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised joint text embeddings, float32 (n, d); (0, d) for none."""
        if not texts:
            return np.zeros((0, self._retriever.config.joint_dim), dtype=np.float32)
        out: np.ndarray = self._captioner.text_embeddings(texts).cpu().numpy().astype(np.float32)
        return out

    def _embed_waves(self, logmel: Tensor) -> np.ndarray:
        with self._captioner.autocast():
            _, joint = self._retriever.embed_logmel(logmel)
        out: np.ndarray = torch.nn.functional.normalize(joint.float(), dim=-1).cpu().numpy()
        return out.astype(np.float32)

    @torch.inference_mode()
    def embed_windows(self, windows: Sequence[Window]) -> np.ndarray:
        """L2-normalised joint audio embeddings of trigger windows, float32 (n, d).

        Windows of one source must come in stream order (the log-mel cache).
        """
        device = self._captioner.device
        images = [self._cache(w.source_id).logmel(w, device) for w in windows]
        out = np.zeros((len(windows), self._retriever.config.joint_dim), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for i, image in enumerate(images):
            by_length.setdefault(image.shape[0], []).append(i)
        for indices in by_length.values():
            batch = torch.stack([images[i] for i in indices])[:, None]
            out[indices] = self._embed_waves(batch)
        return out

    def _cache(self, source_id: str) -> MelCache:
        cache = self._caches.get(source_id)
        if cache is None:
            cache = self._caches[source_id] = MelCache(self.frontend)
        return cache

    def forget(self, source_id: str) -> None:
        """Drop a source's cached frames (it is no longer watched)."""
        self._caches.pop(source_id, None)

    @torch.inference_mode()
    def embed_example(self, path: Path, where: str, chunk_s: float) -> np.ndarray:
        """The normalised mean audio embedding of an example file's ``chunk_s`` chunks (d,).

        Raises:
            ConfigError: naming ``where``, when the file cannot be read or holds no audio.
        """
        samples = read_example(path, where, self.sample_rate_hz)
        chunk = max(round(chunk_s * self.sample_rate_hz), self._min_samples)
        pieces = [samples[i:i + chunk] for i in range(0, samples.size, chunk)]
        if len(pieces) > 1 and pieces[-1].size < chunk // 2:
            pieces.pop()  # a short tail would weigh as much as a whole chunk
        vectors = []
        for piece in pieces:
            if piece.size < self._min_samples:
                piece = np.pad(piece, (0, self._min_samples - piece.size))
            wave = torch.from_numpy(np.ascontiguousarray(piece))[None].to(self._captioner.device)
            vectors.append(self._embed_waves(self.frontend(wave)))
        mean = np.concatenate(vectors).mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if not norm > 0:
            raise ConfigError(f"{where}: {path}: its audio gives no embedding (silent?)")
        result: np.ndarray = (mean / norm).astype(np.float32)
        return result


def phrase_problem(tokenizer: Any, text: str) -> str | None:
    """Why ``tokenizer`` (a transformers tokenizer) cannot represent ``text``, or None.

    Nothing left after tokenization (a WordPiece tokenizer drops what it cannot
    normalise), or nothing but the unknown token. A byte-level tokenizer (the
    demo bundle's) represents every text.
    """
    # The captioner's own padding and truncation settings: a fast tokenizer changes its
    # shared state to other settings, and the caption and trigger threads use it at once.
    ids = tokenizer(text, add_special_tokens=False, padding=True, truncation=True,
                    max_length=TEXT_MAX_LENGTH)["input_ids"]
    unknown = tokenizer.unk_token_id
    if not ids:
        return "nothing is left of it after the model's text tokenizer"
    if unknown is not None and all(i == unknown for i in ids):
        return "every word of it is unknown to the model's text tokenizer"
    return None


def read_example(path: Path, where: str, rate_hz: int) -> np.ndarray:
    """An example file's first :data:`EXAMPLE_MAX_S` s, mono float32 at ``rate_hz``.

    Raises:
        ConfigError: naming ``where``: not a regular file, unreadable, not audio, empty.
    """
    try:
        fd = open_regular(path, lambda kind: ConfigError(
            f"{where}: {path} is {kind}, not a regular audio file"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as fh, sf.SoundFile(fh) as f:
            rate = f.samplerate
            data = f.read(frames=round(EXAMPLE_MAX_S * rate), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {path} is not an audio file soundfile can read "
                          f"(WAV, FLAC, OGG, ...): {exc}") from None
    mono = data.mean(axis=1) if data.size else np.zeros(0, dtype=np.float32)
    if mono.size == 0:
        raise ConfigError(f"{where}: {path} holds no audio")
    if not np.isfinite(mono).all():
        raise ConfigError(f"{where}: {path} holds NaN or infinite samples")
    out: np.ndarray = resample(mono, rate, rate_hz) if rate != rate_hz else mono
    return np.asarray(out, dtype=np.float32)


def trigger_model(captioner: object) -> RetrieverTriggerModel:
    """The trigger model of the daemon's captioner.

    Raises:
        ConfigError: it is not a :class:`Captioner` with a retriever.
    """
    if not isinstance(captioner, Captioner):
        raise ModelError(f"triggers: cannot score with a {type(captioner).__name__}")
    return RetrieverTriggerModel(captioner)
