"""Precomputed training features: codec codes and clip embeddings, written once.

:func:`precompute_features` reads every manifest row's audio, encodes it with
the codec (DAC or EnCodec, at the codec's rate) and embeds it with what makes
EnCLAP's encoder row 0 (the CLAP sequence embedder when the components have
one, else the retriever's CNext clip embedding at 32 kHz), and writes
sharded ``.npz`` files::

    features.json            what produced the features (model fingerprint, rates, shard size)
    <split>-<nnnnn>.npz      one shard: codes, offsets, clip embeddings and row metadata

Shard ``n`` of a split holds that split's rows ``n*shard_size ..`` in manifest
order. Every shard is written to a temporary file and renamed, so an
interrupted run leaves only whole shards; a rerun skips every shard whose
file exists and lists the expected clips (resumable). Features made by other
model weights are refused unless ``overwrite`` is set.

:class:`FeatureStore` reads them back as :class:`FeatureItem` per split.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.components import Components
from streamcap.models.codecs.dac import CodecTokenizer
from streamcap.models.codecs.encodec import EncodecTokenizer
from streamcap.training.data.audio_io import load_audio
from streamcap.training.data.manifest import SPLITS, ManifestRow

FORMAT_VERSION: Final = 1
META_NAME: Final = "features.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureOptions:
    """How :func:`precompute_features` runs.

    Attributes:
        shard_size: Rows per shard file.
        device: Where the codec and retriever run.
        max_s: Use at most this many seconds from the start of each clip (None: all).
        overwrite: Replace features made by other weights or options instead of refusing.
    """

    shard_size: int = 256
    device: str = "cpu"
    max_s: float | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"features.shard_size: expected at least 1, got {self.shard_size}")
        if self.max_s is not None and self.max_s <= 0:
            raise ConfigError(f"features.max_s: expected a positive number, got {self.max_s}")


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureItem:
    """The precomputed features of one clip.

    Attributes:
        clip_id: The manifest's clip id.
        codes: int16 (K, T) codec codes.
        clip_embedding: float32 (D,) EnCLAP's row-0 embedding: the raw retriever
            clip embedding, or the CLAP embedding when the components have one.
        captions: Reference captions.
        audio: The source audio file.
        duration_s: Audio length in seconds (as in the manifest).
    """

    clip_id: str
    codes: npt.NDArray[np.int16]
    clip_embedding: npt.NDArray[np.float32]
    captions: tuple[str, ...]
    audio: Path
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureSummary:
    """What one :func:`precompute_features` run did."""

    directory: Path
    written_shards: int
    skipped_shards: int
    rows: int


def fingerprint(components: Components) -> str:
    """sha256 over the codec's and the row-0 embedder's weights (hex, 16 chars)."""
    h = hashlib.sha256()
    states: list[tuple[str, Mapping[str, torch.Tensor]]] = [
        ("codec", components.codec.state_dict())]
    if components.seq_embedder is not None:
        states.append(("clap", components.seq_embedder.state_dict()))
    elif components.retriever is not None:
        states.append(("audio", components.retriever.audio_encoder.state_dict()))
    for prefix, state in states:
        for key in sorted(state):
            tensor = state[key].detach().to("cpu").contiguous()
            h.update(f"{prefix}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                     if tensor.numel() else b"")
    return h.hexdigest()[:16]


def embedding_source(components: Components) -> tuple[str, int, int]:
    """``(name, sample_rate_hz, dim)`` of what makes EnCLAP's row 0.

    The CLAP sequence embedder when the components have one, else the
    retriever's raw clip embedding.

    Raises:
        ModelError: neither is present.
    """
    if components.seq_embedder is not None:
        return ("clap", components.seq_embedder.sample_rate_hz,
                components.seq_embedder.embed_dim)
    if components.retriever is not None:
        audio = components.retriever.config.audio
        return "retriever", audio.mel.sample_rate, audio.embed_dim
    raise ModelError("features: the components have neither a retriever nor a sequence "
                     "embedder to make the clip embedding")


def _meta(components: Components, options: FeatureOptions) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "model_id": components.model_id,
        "fingerprint": fingerprint(components),
        "codec_id": components.codec.codec_id,
        "codec_sample_rate_hz": components.codec.config.sample_rate_hz,
        "n_codebooks": components.codec.config.n_codebooks,
        "embedding_source": embedding_source(components)[0],
        "embedding_sample_rate_hz": embedding_source(components)[1],
        "clip_embedding_dim": embedding_source(components)[2],
        "shard_size": options.shard_size,
        "max_s": options.max_s,
    }


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npz"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard_clip_ids(path: Path) -> list[str] | None:
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
        return [str(r["clip_id"]) for r in meta["rows"]]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _prepare_directory(directory: Path, meta: Mapping[str, Any], overwrite: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):
        stale.unlink(missing_ok=True)
    meta_path = directory / META_NAME
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old != dict(meta):
            if not overwrite:
                raise ConfigError(
                    f"{meta_path}: these features were made by other weights or options "
                    f"(model {old.get('model_id') if isinstance(old, dict) else '?'}); use "
                    f"another directory or overwrite")
            for shard in directory.glob("*.npz"):
                shard.unlink()
    _atomic_write(meta_path, json.dumps(meta, indent=2).encode("utf-8"))


def _encode_shard(rows: Sequence[ManifestRow], components: Components, device: torch.device,
                  options: FeatureOptions) -> bytes:
    codec_rate = components.codec.config.sample_rate_hz
    source, embed_rate, _ = embedding_source(components)
    codes: list[npt.NDArray[np.int16]] = []
    embeddings: list[npt.NDArray[np.float32]] = []
    for row in rows:
        codes.append(components.codec.encode(load_audio(row.audio, codec_rate,
                                                         max_s=options.max_s)))
        wave = load_audio(row.audio, embed_rate, max_s=options.max_s)
        if components.seq_embedder is not None:
            embeddings.append(components.seq_embedder.embed(wave))
            continue
        if components.retriever is None:  # embedding_source has checked this
            raise ModelError(f"features: no embedder for {source}")
        with torch.inference_mode():
            clip, _ = components.retriever.embed_audio(torch.from_numpy(wave)[None].to(device))
        embeddings.append(clip[0].float().cpu().numpy())
    offsets = np.cumsum([0] + [c.shape[1] for c in codes]).astype(np.int64)
    meta = {"rows": [{"clip_id": r.clip_id, "captions": list(r.captions),
                      "audio": str(r.audio), "duration_s": r.duration_s} for r in rows]}
    buffer = io.BytesIO()
    np.savez(buffer, codes=np.concatenate(codes, axis=1), offsets=offsets,
             clip_embedding=np.stack(embeddings).astype(np.float32),
             meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    return buffer.getvalue()


def precompute_features(rows: Sequence[ManifestRow], components: Components, directory: Path,
                        options: FeatureOptions = FeatureOptions(), *,
                        progress: bool | None = None) -> FeatureSummary:
    """Write codes and clip embeddings of ``rows`` under ``directory`` (resumable).

    Args:
        rows: Manifest rows (any splits; order within a split defines the shards).
        components: The codec and row-0 embedder to use (moved to ``options.device``).
        directory: Output directory.
        options: Shard size, device, crop, overwrite.
        progress: Show a progress bar (default: when stderr is a terminal).

    Raises:
        ConfigError: the directory holds features of other weights/options
            (and ``overwrite`` is false).
        SourceError: an audio file cannot be read.
    """
    from tqdm import tqdm

    device = torch.device(options.device)
    embedding_source(components)
    if components.retriever is not None:
        components.retriever.to(device).eval()
    if components.seq_embedder is not None:
        components.seq_embedder.to(device)
    codec = components.codec
    if isinstance(codec, CodecTokenizer) and codec.device != device:
        components.codec = CodecTokenizer(codec.config, device=str(device), model=codec.module)
    elif isinstance(codec, EncodecTokenizer) and codec.device != device:
        components.codec = EncodecTokenizer(codec.config, device=str(device), model=codec.module)
    meta = _meta(components, options)
    _prepare_directory(directory, meta, options.overwrite)
    plan: list[tuple[Path, list[ManifestRow]]] = []
    skipped = 0
    for split in SPLITS:
        split_rows = [r for r in rows if r.split == split]
        for index, start in enumerate(range(0, len(split_rows), options.shard_size)):
            chunk = split_rows[start:start + options.shard_size]
            path = directory / shard_name(split, index)
            if path.exists() and _shard_clip_ids(path) == [r.clip_id for r in chunk]:
                skipped += 1
                continue
            plan.append((path, chunk))
    todo = sum(len(chunk) for _, chunk in plan)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=todo, unit="clip", desc="features", disable=not show) as bar:
        for path, chunk in plan:
            _atomic_write(path, _encode_shard(chunk, components, device, options))
            bar.update(len(chunk))
    return FeatureSummary(directory=directory, written_shards=len(plan), skipped_shards=skipped,
                          rows=len(rows))


class FeatureStore:
    """Reads a features directory written by :func:`precompute_features`.

    Raises:
        ConfigError: the directory has no readable ``features.json``.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_NAME
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{meta_path}: not a features directory ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise ConfigError(f"{meta_path}: unknown features format (expected format "
                              f"{FORMAT_VERSION})")
        self.meta: Mapping[str, Any] = meta

    def shards(self, split: str) -> list[Path]:
        """The shard files of ``split``, in order."""
        if split not in SPLITS:
            raise ConfigError(f"split: unknown split {split!r} (expected one of "
                              f"{', '.join(SPLITS)})")
        return sorted(self.directory.glob(f"{split}-*.npz"))

    def items(self, split: str) -> Iterator[FeatureItem]:
        """Every clip of ``split`` in manifest order, one shard in memory at a time.

        Raises:
            ModelError: a shard file is corrupt.
        """
        for path in self.shards(split):
            try:
                with np.load(path) as data:
                    codes = data["codes"]
                    offsets = data["offsets"]
                    embeddings = data["clip_embedding"]
                    meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                raise ModelError(f"{path}: corrupt feature shard ({exc}); delete it and rerun "
                                 f"the precompute step") from exc
            for i, row in enumerate(meta["rows"]):
                yield FeatureItem(
                    clip_id=str(row["clip_id"]),
                    codes=np.ascontiguousarray(codes[:, offsets[i]:offsets[i + 1]],
                                               dtype=np.int16),
                    clip_embedding=np.ascontiguousarray(embeddings[i], dtype=np.float32),
                    captions=tuple(row["captions"]), audio=Path(row["audio"]),
                    duration_s=float(row["duration_s"]))

    def count(self, split: str) -> int:
        """Number of clips of ``split``."""
        total = 0
        for path in self.shards(split):
            ids = _shard_clip_ids(path)
            total += len(ids) if ids is not None else 0
        return total
