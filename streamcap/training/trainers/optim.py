"""The reference optimiser: AdamW with decay exemptions, inverse-sqrt schedule, clipping.

EnCLAP's recipe (weight decay 0.01 except on parameters whose name contains
``bias``, ``LayerNorm.weight`` or ``layer_norm.weight``; BART's
``layernorm_embedding.weight`` matches none of them and *is* decayed), the
transformers ``inverse_sqrt`` schedule (linear warmup, then
``1 / sqrt((step + timescale - warmup) / timescale)``) and gradient clipping at
norm 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from streamcap.errors import ConfigError

NO_DECAY_PATTERNS: tuple[str, ...] = ("bias", "LayerNorm.weight", "layer_norm.weight")
"""A parameter whose name contains one of these gets no weight decay."""

_DEFAULT_TIMESCALE = 10_000  # transformers' value when there is no warmup


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """Optimiser and schedule settings (defaults: EnCLAP AudioCaps base).

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay on non-exempt parameters.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup steps (0: none).
        timescale: inverse-sqrt timescale; None means ``warmup_steps`` (or 10,000
            without warmup, as in transformers).
        schedule: ``"inverse_sqrt"`` or ``"constant"`` (after warmup).
        clip_norm: gradient clipping max norm; 0 disables clipping.
    """

    lr: float = 6.5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 2000
    timescale: int | None = None
    schedule: Literal["inverse_sqrt", "constant"] = "inverse_sqrt"
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.lr > 0.0:
            problems.append(f"optim.lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0.0:
            problems.append(f"optim.weight_decay: expected >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            problems.append(f"optim.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.timescale is not None and self.timescale < 1:
            problems.append(f"optim.timescale: expected >= 1, got {self.timescale}")
        if self.schedule not in ("inverse_sqrt", "constant"):
            problems.append(
                f"optim.schedule: expected 'inverse_sqrt' or 'constant', got {self.schedule!r}")
        if self.clip_norm < 0.0:
            problems.append(f"optim.clip_norm: expected >= 0, got {self.clip_norm}")
        if problems:
            raise ConfigError(problems)

    @property
    def effective_timescale(self) -> int:
        """The timescale actually used by the inverse-sqrt decay."""
        if self.timescale is not None:
            return self.timescale
        return self.warmup_steps if self.warmup_steps > 0 else _DEFAULT_TIMESCALE


def decays(name: str) -> bool:
    """Whether the parameter called ``name`` gets weight decay."""
    return not any(pattern in name for pattern in NO_DECAY_PATTERNS)


def parameter_groups(
    modules: Iterable[tuple[str, nn.Module]], weight_decay: float
) -> list[dict[str, Any]]:
    """Splits trainable parameters into a decayed and an exempt group.

    Args:
        modules: ``(prefix, module)`` pairs; a parameter shared between modules
            is listed once.
        weight_decay: decay of the first group.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay},
        {"params": exempt, "weight_decay": 0.0}]`` (parameter order is stable).
    """
    seen: set[int] = set()
    decayed: list[nn.Parameter] = []
    exempt: list[nn.Parameter] = []
    for prefix, module in modules:
        for name, param in module.named_parameters(prefix=prefix):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decayed if decays(name) else exempt).append(param)
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": exempt, "weight_decay": 0.0}]


def build_optimizer(
    modules: Iterable[tuple[str, nn.Module]], config: OptimConfig
) -> torch.optim.AdamW:
    """AdamW over ``modules`` with the decay exemptions of :data:`NO_DECAY_PATTERNS`."""
    groups = parameter_groups(modules, config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def lr_factor(config: OptimConfig) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the step (0-based).

    Warmup: ``step / warmup``; then ``1 / sqrt((step + timescale - warmup) / timescale)``
    (``inverse_sqrt``) or 1 (``constant``).
    """
    warmup = config.warmup_steps
    timescale = config.effective_timescale
    constant = config.schedule == "constant"

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if constant:
            return 1.0
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> LambdaLR:
    """The per-step schedule of :func:`lr_factor` (call ``step()`` after each update)."""
    return LambdaLR(optimizer, lr_factor(config))


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clips the global gradient norm to ``max_norm`` (0: no clipping); returns the norm before."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm <= 0.0:
        norms = torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
