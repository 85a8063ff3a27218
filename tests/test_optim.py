"""The reference optimiser: decay exemptions, inverse-sqrt schedule, clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from streamcap.errors import ConfigError
from streamcap.training.trainers.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    decays,
    lr_factor,
    parameter_groups,
)


def test_decay_exemptions_follow_the_reference_names() -> None:
    assert not decays("bart.model.encoder.layers.0.fc1.bias")
    assert not decays("text_encoder.embeddings.LayerNorm.weight")
    assert not decays("bart.model.decoder.layers.1.self_attn_layer_norm.weight")
    # BART's embedding LayerNorm matches none of the patterns: it is decayed.
    assert decays("bart.model.encoder.layernorm_embedding.weight")
    assert decays("bart.model.shared.weight")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.layer_norm = nn.LayerNorm(3)
        self.fc.weight.requires_grad_(True)


def test_parameter_groups_split_and_share_once() -> None:
    net = _Net()
    groups = parameter_groups([("a", net), ("b", net)], 0.01)
    decayed = {id(p) for p in groups[0]["params"]}
    exempt = {id(p) for p in groups[1]["params"]}
    assert decayed == {id(net.fc.weight)}
    assert exempt == {id(net.fc.bias), id(net.layer_norm.weight), id(net.layer_norm.bias)}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0


def test_inverse_sqrt_schedule_matches_the_formula() -> None:
    f = lr_factor(OptimConfig(warmup_steps=100))
    assert f(0) == 0.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(1.0)
    assert f(400) == pytest.approx(1.0 / math.sqrt(4.0))  # (400 + 100 - 100) / 100
    g = lr_factor(OptimConfig(warmup_steps=0, timescale=1000))
    assert g(0) == pytest.approx(1.0)
    assert g(3000) == pytest.approx(0.5)
    c = lr_factor(OptimConfig(warmup_steps=10, schedule="constant"))
    assert c(5) == pytest.approx(0.5) and c(10_000) == 1.0


def test_scheduler_drives_the_optimiser_learning_rate() -> None:
    net = _Net()
    config = OptimConfig(lr=1e-3, warmup_steps=4)
    opt = build_optimizer([("net", net)], config)
    sched = build_scheduler(opt, config)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[5] == pytest.approx(1e-3 / math.sqrt(5 / 4))
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_clip_gradients_caps_the_global_norm() -> None:
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    before = clip_gradients([p], 1.0)
    assert before == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    q = nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([q], 0.0) == pytest.approx(5.0)
    assert torch.equal(q.grad, torch.tensor([3.0, 4.0]))


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        OptimConfig(warmup_steps=-1)
