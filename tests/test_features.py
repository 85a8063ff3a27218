"""Feature precompute: shards, resume, refusal of foreign features, reading back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.components import Components, build_components
from streamcap.models.bundle.presets import preset_spec
from streamcap.training.data.audio_io import load_audio
from streamcap.training.data.corpus import CorpusOptions, make_corpus
from streamcap.training.data.features import (
    FeatureOptions,
    FeatureStore,
    precompute_features,
    shard_name,
)
from streamcap.training.data.manifest import ManifestRow, read_manifest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[ManifestRow]:
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, CorpusOptions(clips=10, seed=2, clip_s=4.0, sample_rate_hz=24000,
                                   captions_per_clip=2))
    rows = read_manifest(out / "manifest.jsonl")
    return [r for r in rows if r.split != "train"] + [r for r in rows if r.split == "train"][:3]


@pytest.fixture(scope="module")
def components() -> Components:
    return build_components(preset_spec("tiny"), seed=0)


def test_precompute_writes_what_the_models_compute(tmp_path: Path, corpus: list[ManifestRow],
                                                   components: Components) -> None:
    summary = precompute_features(corpus, components, tmp_path, FeatureOptions(shard_size=2),
                                  progress=False)
    assert (summary.written_shards, summary.skipped_shards, summary.rows) == (4, 0, 5)
    store = FeatureStore(tmp_path)
    assert [store.count(s) for s in ("train", "val", "test")] == [3, 1, 1]
    items = list(store.items("train"))
    assert [i.clip_id for i in items] == [r.clip_id for r in corpus if r.split == "train"]
    row = next(r for r in corpus if r.clip_id == items[1].clip_id)
    item = items[1]
    assert item.captions == row.captions and item.audio == row.audio
    assert item.duration_s == row.duration_s
    expected = components.codec.encode(load_audio(row.audio, 24000))
    assert item.codes.dtype == np.int16 and item.codes.shape == (4, 300)
    assert np.array_equal(item.codes, expected)
    retriever = components.retriever
    assert retriever is not None and components.seq_embedder is None
    with torch.inference_mode():
        clip, _ = retriever.embed_audio(torch.from_numpy(load_audio(row.audio, 32000))[None])
    assert item.clip_embedding.dtype == np.float32
    assert item.clip_embedding.shape == (retriever.config.audio.embed_dim,)
    assert store.meta["embedding_source"] == "retriever"
    np.testing.assert_allclose(item.clip_embedding, clip[0].numpy(), rtol=1e-5, atol=1e-6)


def test_resume_skips_finished_shards_and_redoes_missing(tmp_path: Path,
                                                         corpus: list[ManifestRow],
                                                         components: Components) -> None:
    options = FeatureOptions(shard_size=2)
    precompute_features(corpus, components, tmp_path, options, progress=False)
    shard = tmp_path / shard_name("train", 1)
    before = (tmp_path / shard_name("train", 0)).stat().st_mtime_ns
    shard.unlink()
    (tmp_path / ".tmp-leftover").write_bytes(b"partial")
    summary = precompute_features(corpus, components, tmp_path, options, progress=False)
    assert (summary.written_shards, summary.skipped_shards) == (1, 3)
    assert shard.exists() and not (tmp_path / ".tmp-leftover").exists()
    assert (tmp_path / shard_name("train", 0)).stat().st_mtime_ns == before
    # A shard listing other clips (the manifest changed) is redone.
    changed = [*corpus[:2], corpus[3], corpus[2], corpus[4]]  # train rows 0 and 1 swapped
    summary = precompute_features(changed, components, tmp_path, options, progress=False)
    assert (summary.written_shards, summary.skipped_shards) == (1, 3)


def test_features_of_other_weights_are_refused(tmp_path: Path, corpus: list[ManifestRow],
                                               components: Components) -> None:
    precompute_features(corpus[:2], components, tmp_path, FeatureOptions(shard_size=2),
                        progress=False)
    other = build_components(preset_spec("tiny"), seed=1)
    with pytest.raises(ConfigError, match="other weights or options"):
        precompute_features(corpus[:2], other, tmp_path, FeatureOptions(shard_size=2),
                            progress=False)
    summary = precompute_features(corpus[:2], other, tmp_path,
                                  FeatureOptions(shard_size=2, overwrite=True), progress=False)
    assert summary.written_shards == 2


def test_store_errors(tmp_path: Path, corpus: list[ManifestRow],
                      components: Components) -> None:
    with pytest.raises(ConfigError, match="not a features directory"):
        FeatureStore(tmp_path)
    precompute_features(corpus[:1], components, tmp_path, FeatureOptions(), progress=False)
    store = FeatureStore(tmp_path)
    with pytest.raises(ConfigError, match="unknown split"):
        list(store.items("dev"))
    (tmp_path / shard_name(corpus[0].split, 0)).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="corrupt feature shard"):
        list(store.items(corpus[0].split))


def test_options_validated() -> None:
    with pytest.raises(ConfigError, match="shard_size"):
        FeatureOptions(shard_size=0)
    with pytest.raises(ConfigError, match="max_s"):
        FeatureOptions(max_s=-1.0)
