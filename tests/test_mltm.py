"""m-LTM loss: Sinkhorn correctness against numpy, behaviour and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamcap.errors import ConfigError, ModelError
from streamcap.training.trainers.mltm import MLTMLoss, MLTMOptions, metric_cost, sinkhorn_log

torch.set_num_threads(1)


def _numpy_sinkhorn(cost: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Plain (non-log) Sinkhorn-Knopp with uniform marginals, float64."""
    n, m = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    kernel = np.exp(-cost / eps)
    u, v = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    for _ in range(iters):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    plan: np.ndarray = u[:, None] * kernel * v[None, :]
    return plan


def _pairs(batch: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    audio = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(
        audio + noise * torch.randn(batch, dim, generator=gen), dim=-1
    )
    return audio, text


def test_metric_cost_matches_direct_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    text, audio = torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen)
    w = torch.rand(5, generator=gen) + 0.5
    cost = metric_cost(text, audio, w)
    for i in range(3):
        for j in range(4):
            expected = math.sqrt(float(((audio[j] - text[i]) ** 2 * w).sum()))
            assert float(cost[i, j]) == pytest.approx(expected, rel=1e-5)


def test_diagonal_of_full_metric_matrix_is_what_counts() -> None:
    # The published einsum "ijk,ikj,kk->ij" only reads diag(M); check our vector form equals it.
    gen = torch.Generator().manual_seed(1)
    text, audio = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    full = torch.rand(4, 4, generator=gen)
    diff = audio[None, :, :] - text[:, None, :]  # (i, j, k)
    einsum = torch.einsum("ijk,ijk,kk->ij", diff, diff, full)
    loss = MLTMLoss(4)
    loss.load_metric_matrix(full)
    torch.testing.assert_close(loss.weights.detach(), torch.diagonal(full))
    torch.testing.assert_close(metric_cost(text, audio, loss.weights.detach()) ** 2, einsum)


@pytest.mark.parametrize("shape", [(6, 6), (5, 7)])
def test_sinkhorn_matches_numpy_and_marginals(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    cost = rng.random(shape)
    cost /= cost.max()
    eps = 0.1
    result = sinkhorn_log(torch.from_numpy(cost), epsilon=eps, max_iter=2000, tol=1e-13)
    ref = _numpy_sinkhorn(cost, eps, 5000)
    np.testing.assert_allclose(result.plan.numpy(), ref, rtol=1e-6, atol=1e-12)
    plan = result.plan
    torch.testing.assert_close(
        plan.sum(dim=1), torch.full((shape[0],), 1 / shape[0], dtype=plan.dtype)
    )
    torch.testing.assert_close(
        plan.sum(dim=0), torch.full((shape[1],), 1 / shape[1], dtype=plan.dtype)
    )
    assert result.iterations < 2000


def test_small_epsilon_float32_is_finite_with_exact_marginals() -> None:
    audio, text = _pairs(64, 32, 0.5, seed=3)
    loss = MLTMLoss(32)
    with torch.no_grad():
        result = loss.plan(audio, text)
    assert torch.isfinite(result.log_plan).all()
    plan = result.plan
    assert float((plan.sum(dim=1) - 1 / 64).abs().max()) < 1e-6
    assert float((plan.sum(dim=0) - 1 / 64).abs().max()) < 1e-4
    value = loss(audio, text)
    assert torch.isfinite(value)
    assert float(value) >= math.log(64) - 1e-4  # pi_ii <= 1/B


def test_numpy_reference_loss_at_epsilon_003() -> None:
    audio, text = _pairs(8, 16, 0.8, seed=4)
    loss = MLTMLoss(16, MLTMOptions(max_iter=5000, tol=1e-12))
    a64, t64 = audio.double(), text.double()
    with torch.no_grad():
        value = float(loss.double()(a64, t64))
    w = loss.weights.detach().numpy()
    an, tn = a64.numpy(), t64.numpy()
    cost = np.sqrt((((an[None, :, :] - tn[:, None, :]) ** 2) * w).sum(-1))
    cost /= cost.max()
    ref_plan = _numpy_sinkhorn(cost, 0.03, 20_000)
    ref = -np.mean(np.log(np.diag(ref_plan)))
    assert value == pytest.approx(ref, rel=1e-6)


def test_aligned_pairs_have_lower_loss_than_shuffled() -> None:
    audio, text = _pairs(16, 32, 0.3, seed=5)
    loss = MLTMLoss(32, MLTMOptions(metric_init="ones"))
    aligned = float(loss(audio, text))
    shuffled = float(loss(audio, text[torch.roll(torch.arange(16), 1)]))
    assert aligned < shuffled
    assert aligned == pytest.approx(math.log(16), abs=0.5)


def test_gradients_reach_embeddings_and_weights() -> None:
    audio, text = _pairs(8, 16, 0.5, seed=6)
    audio.requires_grad_(True)
    text.requires_grad_(True)
    loss = MLTMLoss(16, MLTMOptions(max_iter=200))
    loss(audio, text).backward()
    for grad in (audio.grad, text.grad, loss.weights.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert float(grad.abs().sum()) > 0.0


def test_identical_embeddings_do_not_give_nan_gradients() -> None:
    audio, _ = _pairs(4, 8, 0.0, seed=7)
    audio.requires_grad_(True)
    loss = MLTMLoss(8, MLTMOptions(max_iter=100))
    loss(audio, audio).backward()
    assert audio.grad is not None and torch.isfinite(audio.grad).all()


def test_training_steps_reduce_loss() -> None:
    audio, text = _pairs(8, 16, 1.0, seed=8)
    audio = audio.clone().requires_grad_(True)
    loss = MLTMLoss(16, MLTMOptions(max_iter=100))
    opt = torch.optim.SGD([audio, *loss.parameters()], lr=0.5)
    first = float(loss(torch.nn.functional.normalize(audio, dim=-1), text))
    for _ in range(20):
        opt.zero_grad()
        loss(torch.nn.functional.normalize(audio, dim=-1), text).backward()
        opt.step()
    assert float(loss(torch.nn.functional.normalize(audio, dim=-1), text)) < first


def test_validation() -> None:
    with pytest.raises(ConfigError, match="mltm.epsilon"):
        MLTMOptions(epsilon=0.0)
    loss = MLTMLoss(4)
    with pytest.raises(ModelError, match="at least 2"):
        loss(torch.ones(1, 4), torch.ones(1, 4))
    with pytest.raises(ModelError, match="equal"):
        loss(torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(ModelError, match="metric matrix"):
        loss.load_metric_matrix(torch.ones(3, 3))
    w = MLTMLoss(1000).weights.detach()
    assert float(w.min()) >= 1.0 and float(w.max()) < 2.0
