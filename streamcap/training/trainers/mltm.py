"""m-LTM: the optimal-transport contrastive loss used to train the retriever.

For a batch of B matched (text, audio) pairs with L2-normalised joint
embeddings, the loss builds a cost matrix between every text ``i`` (rows) and
every audio ``j`` (columns), solves an entropic optimal-transport problem
between two uniform distributions over the batch, and asks the transport
plan to put its mass on the diagonal (the true pairs):

1. ``C_ij = sqrt(sum_k w_k (a_jk - t_ik)^2)``, then ``C <- C / max(C)``;
2. ``pi = argmin_{pi in U(1/B, 1/B)} <pi, C> - eps H(pi)`` (Sinkhorn, eps 0.03);
3. ``L = -(1/B) sum_i log pi_ii``.

``pi`` is a coupling of the uniform marginals: every row and every column sums
to ``1/B`` and the whole plan to 1, so a perfect plan gives ``pi_ii = 1/B``
and the smallest possible loss is ``log B`` (not 0). This scale is kept on
purpose to match the published training recipe; multiply by B for a plan
whose rows sum to 1 if you need a per-row distribution.

The metric weights ``w`` are a vector: the published recipe declares a full
learnable matrix M but its einsum only ever reads ``diag(M)``, so the
off-diagonal entries receive no gradient and have no effect. A vector of
per-dimension weights is the same function with D instead of D^2 parameters.
:meth:`MLTMLoss.load_metric_matrix` takes such a matrix and keeps its diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from streamcap.errors import ConfigError, ModelError

__all__ = [
    "MLTMLoss",
    "MLTMOptions",
    "SinkhornResult",
    "metric_cost",
    "sinkhorn_log",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class MLTMOptions:
    """Hyper-parameters of the m-LTM loss (defaults: the published recipe).

    Attributes:
        epsilon: Entropic regularisation of the OT problem (0.03).
        max_iter: Maximum Sinkhorn iterations (1000).
        tol: Stop once the largest column-marginal error is below this (1e-9);
            checked every ``check_every`` iterations.
        check_every: Iterations between convergence checks (each one syncs).
        metric_init: ``"reference"``: weights drawn from U[1, 2), the diagonal
            of the published ``0.5 (A + A^T) + I`` initialisation;
            ``"ones"``: all weights 1 (plain Euclidean distance).
        sqrt_floor: Floor under the squared distance before ``sqrt`` so that
            identical embeddings do not produce an infinite gradient.
    """

    epsilon: float = 0.03
    max_iter: int = 1000
    tol: float = 1e-9
    check_every: int = 10
    metric_init: Literal["reference", "ones"] = "reference"
    sqrt_floor: float = 1e-12

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.epsilon <= 0.0:
            problems.append(f"mltm.epsilon: expected > 0, got {self.epsilon}")
        if self.max_iter <= 0:
            problems.append(f"mltm.max_iter: expected > 0, got {self.max_iter}")
        if self.tol < 0.0:
            problems.append(f"mltm.tol: expected >= 0, got {self.tol}")
        if self.check_every <= 0:
            problems.append(f"mltm.check_every: expected > 0, got {self.check_every}")
        if self.metric_init not in ("reference", "ones"):
            problems.append(
                f"mltm.metric_init: expected 'reference' or 'ones', got {self.metric_init!r}"
            )
        if self.sqrt_floor < 0.0:
            problems.append(f"mltm.sqrt_floor: expected >= 0, got {self.sqrt_floor}")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkhornResult:
    """A solved entropic OT problem.

    Attributes:
        log_plan: (N, M) log of the transport plan, same dtype as the cost.
        iterations: Iterations run.
        marginal_error: Largest absolute column-marginal error at the end.
    """

    log_plan: Tensor
    iterations: int
    marginal_error: float

    @property
    def plan(self) -> Tensor:
        """(N, M) transport plan ``exp(log_plan)``."""
        return self.log_plan.exp()


def metric_cost(
    text: Tensor, audio: Tensor, weights: Tensor, *, sqrt_floor: float = 1e-12
) -> Tensor:
    """Weighted Euclidean cost between every text and every audio embedding.

    Args:
        text: (N, D) text embeddings (rows of the cost).
        audio: (M, D) audio embeddings (columns of the cost).
        weights: (D,) per-dimension metric weights.
        sqrt_floor: Floor under the weighted squared distance before ``sqrt``.

    Returns:
        (N, M) ``C_ij = sqrt(max(floor, sum_k w_k (audio_jk - text_ik)^2))``,
        not normalised.
    """
    if text.ndim != 2 or audio.ndim != 2 or text.shape[1] != audio.shape[1]:
        raise ModelError(
            f"metric_cost: expected (N, D) text and (M, D) audio, got {tuple(text.shape)} "
            f"and {tuple(audio.shape)}"
        )
    if weights.shape != (text.shape[1],):
        raise ModelError(
            f"metric_cost: expected ({text.shape[1]},) weights, got {tuple(weights.shape)}"
        )
    diff = text[:, None, :] - audio[None, :, :]
    squared = (diff.square() * weights).sum(dim=-1)
    return torch.sqrt(squared.clamp_min(sqrt_floor))


def sinkhorn_log(
    cost: Tensor,
    *,
    epsilon: float,
    max_iter: int = 1000,
    tol: float = 1e-9,
    check_every: int = 10,
) -> SinkhornResult:
    """Entropic OT between uniform marginals, in the log domain (differentiable).

    Alternates the dual potential updates ``g <- eps (log b - LSE_i((f_i - C_ij) / eps))``
    and ``f <- eps (log a - LSE_j((g_j - C_ij) / eps))`` from ``f = g = 0``;
    after each pair of updates the rows sum exactly to ``a`` and the column
    error is measured every ``check_every`` iterations. Gradients flow through
    every iteration run.

    Args:
        cost: (N, M) cost matrix, float32 or float64.
        epsilon: Entropic regularisation (> 0).
        max_iter: Maximum number of iterations.
        tol: Stop when the largest column-marginal error is at most this.
        check_every: Iterations between checks.

    Returns:
        :class:`SinkhornResult` whose plan has rows summing to 1/N and
        columns to 1/M (within ``tol`` if it converged).
    """
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ModelError(f"sinkhorn_log: expected a non-empty (N, M) cost, got {tuple(cost.shape)}")
    n, m = cost.shape
    log_a = -math.log(n)
    log_b = -math.log(m)
    scaled = cost / epsilon
    f = cost.new_zeros(n)  # potentials divided by epsilon
    g = cost.new_zeros(m)
    iterations = 0
    error = float("inf")
    for iterations in range(1, max_iter + 1):
        g = log_b - torch.logsumexp(f[:, None] - scaled, dim=0)
        f = log_a - torch.logsumexp(g[None, :] - scaled, dim=1)
        if iterations % check_every == 0 or iterations == max_iter:
            with torch.no_grad():
                columns = torch.logsumexp(f[:, None] + g[None, :] - scaled, dim=0).exp()
                error = float((columns - math.exp(log_b)).abs().max())
            if error <= tol:
                break
    log_plan = f[:, None] + g[None, :] - scaled
    return SinkhornResult(log_plan=log_plan, iterations=iterations, marginal_error=error)


class MLTMLoss(nn.Module):
    """m-LTM loss with learnable per-dimension metric weights (see module docstring)."""

    def __init__(self, dim: int, options: MLTMOptions | None = None) -> None:
        super().__init__()
        if dim <= 0:
            raise ConfigError(f"mltm.dim: expected > 0, got {dim}")
        self.options = options if options is not None else MLTMOptions()
        if self.options.metric_init == "reference":
            init = 1.0 + torch.rand(dim)
        else:
            init = torch.ones(dim)
        self.weights = nn.Parameter(init)

    def load_metric_matrix(self, matrix: Tensor) -> None:
        """Set the weights from a (D, D) metric matrix; only its diagonal is used.

        Args:
            matrix: (D, D) matrix, e.g. the ``M`` of a published m-LTM checkpoint.
        """
        dim = self.weights.shape[0]
        if matrix.shape != (dim, dim):
            raise ModelError(
                f"MLTMLoss: expected a ({dim}, {dim}) metric matrix, got {tuple(matrix.shape)}"
            )
        with torch.no_grad():
            self.weights.copy_(torch.diagonal(matrix).to(self.weights))

    def cost(self, audio: Tensor, text: Tensor) -> Tensor:
        """Normalised cost matrix.

        Args:
            audio: (B, D) L2-normalised audio embeddings (columns).
            text: (B, D) L2-normalised text embeddings (rows).

        Returns:
            (B, B) ``C / max(C)``, rows = texts, columns = audios.
        """
        raw = metric_cost(
            text, audio, self.weights.to(text.dtype), sqrt_floor=self.options.sqrt_floor
        )
        return raw / raw.max()

    def plan(self, audio: Tensor, text: Tensor) -> SinkhornResult:
        """Entropic transport plan between the batch's texts (rows) and audios (columns)."""
        opts = self.options
        return sinkhorn_log(
            self.cost(audio, text),
            epsilon=opts.epsilon,
            max_iter=opts.max_iter,
            tol=opts.tol,
            check_every=opts.check_every,
        )

    def forward(self, audio: Tensor, text: Tensor) -> Tensor:
        """Loss of a batch of matched pairs ``(audio[i], text[i])``.

        Args:
            audio: (B, D) L2-normalised audio embeddings, B >= 2.
            text: (B, D) L2-normalised text embeddings.

        Returns:
            Scalar ``-(1/B) sum_i log pi_ii`` with ``pi`` a coupling of uniform
            marginals (rows and columns sum to 1/B); at least ``log B``.
        """
        if audio.shape != text.shape or audio.ndim != 2:
            raise ModelError(
                f"MLTMLoss: expected equal (B, D) audio and text, got {tuple(audio.shape)} "
                f"and {tuple(text.shape)}"
            )
        if audio.shape[0] < 2:
            raise ModelError(f"MLTMLoss: need a batch of at least 2 pairs, got {audio.shape[0]}")
        log_plan = self.plan(audio, text).log_plan
        return -torch.diagonal(log_plan).mean()
