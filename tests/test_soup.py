"""Model soups: uniform weight averages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamcap.errors import ModelError
from streamcap.models.bundle.components import load_components, save_components
from streamcap.models.bundle.manifest import load_bundle
from streamcap.training.demo import init_components
from streamcap.training.trainers.loop import LoopConfig, Trainer
from streamcap.training.trainers.optim import OptimConfig
from streamcap.training.trainers.soup import soup_bundles, soup_checkpoints, uniform_soup

CAPTIONS = ["a dog barks", "rain falls on a roof", "a bell rings twice"] * 10


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net(torch.randn(5, 3))  # updates running stats and num_batches_tracked
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_soup_of_identical_states_is_the_state() -> None:
    state = _state(0)
    soup = uniform_soup([state, state, state])
    assert soup.keys() == state.keys()
    for key, value in state.items():
        assert soup[key].dtype == value.dtype
        assert torch.equal(soup[key], value), key


def test_soup_is_the_mean() -> None:
    a, b = _state(0), _state(1)
    soup = uniform_soup([a, b])
    w = "0.weight"
    assert torch.allclose(soup[w], (a[w] + b[w]) / 2, atol=0, rtol=1e-6)
    assert torch.equal(soup["1.num_batches_tracked"], a["1.num_batches_tracked"])


def test_mismatched_states_are_refused_by_name() -> None:
    a = _state(0)
    b = dict(a)
    del b["0.bias"]
    with pytest.raises(ModelError, match=r"#1 does not match #0 \(missing \['0.bias'\]"):
        uniform_soup([a, b])
    c = dict(a)
    c["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ModelError, match="0.weight"):
        uniform_soup([a, c])
    with pytest.raises(ModelError, match="no models"):
        uniform_soup([])


def test_soup_of_identical_checkpoints_equals_the_checkpoint(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)

    def step(batch: object, rng: object) -> tuple[torch.Tensor, dict[str, float]]:
        return net(torch.ones(2, 3)).pow(2).mean(), {}

    trainer = Trainer("toy", [("net", net)], 4, step, OptimConfig(warmup_steps=0),
                      LoopConfig(epochs=1, batch_size=2, checkpoint_dir=tmp_path, progress=False))
    trainer.run()
    path = tmp_path / "epoch-001.pt"
    soup = soup_checkpoints([path, path])
    for key, value in trainer.model_state().items():
        assert torch.equal(soup[key], value)


def test_soup_of_identical_bundles_equals_the_bundle(tmp_path: Path) -> None:
    components = init_components("demo", CAPTIONS, vocab_size=300, seed=0)
    first = save_components(components, tmp_path / "a")
    out = soup_bundles([first, first], tmp_path / "soup", components=("captioner", "retriever"))
    original = load_components(load_bundle(first))
    souped = load_components(load_bundle(out))
    for name in ("captioner", "retriever"):
        a = getattr(original, name).state_dict()
        b = getattr(souped, name).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert souped.model_id.endswith("-soup2")
