"""The training loop both trainers share: data order, checkpoints, exact resume, progress.

Exact resume: a checkpoint holds the weights, the optimiser and scheduler
states, every random state (torch CPU (and CUDA when present), numpy's global
state, Python's ``random`` and the loop's own ``numpy.random.Generator`` that
trainers use for masking and caption choice) and the position in the data:
epoch, step within the epoch and global step. The data order of an epoch is a
pure function of ``(seed, epoch)``, so the position is enough to rebuild it.
Training N steps, or N/2 steps + resume + N/2 steps, gives bit-identical
parameters on CPU with deterministic algorithms.

Checkpoints are written atomically (temporary file + rename): ``epoch-EEE.pt``
after every epoch, ``step-SSSSSSS.pt`` when a run stops at ``max_steps``, and
``latest.json`` naming the newest one.

Precision: on CUDA the forward pass runs under bf16 autocast (weights,
optimiser state and losses stay float32); on CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import torch
from torch import nn

from streamcap.errors import ConfigError, ModelError
from streamcap.models.bundle.weights import read_checkpoint
from streamcap.training.trainers.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    clip_gradients,
)

LATEST = "latest.json"
CHECKPOINT_FORMAT = "streamcap-train-checkpoint"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopConfig:
    """How long and how a model trains.

    Attributes:
        epochs: passes over the data.
        batch_size: examples per optimiser step (the global batch).
        seed: seeds the data order and every random state at the start.
        drop_last: drop an epoch's last incomplete batch.
        min_batch: batches smaller than this are dropped (the m-LTM loss needs 2).
        max_steps: stop after this many optimiser steps in total (a checkpoint
            is written); None runs every epoch.
        max_seconds: stop (with a checkpoint) once this much wall time has passed.
        checkpoint_dir: where checkpoints go; None keeps none.
        keep_checkpoints: epoch checkpoints kept (older ones are deleted); 0 keeps all.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        bf16: bf16 autocast for the forward pass; None means "on CUDA only".
        progress: show a progress bar (only drawn when the stream is a terminal).
    """

    epochs: int = 15
    batch_size: int = 16
    seed: int = 1115
    drop_last: bool = False
    min_batch: int = 1
    max_steps: int | None = None
    max_seconds: float | None = None
    checkpoint_dir: Path | None = None
    keep_checkpoints: int = 0
    device: str = "cpu"
    bf16: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.epochs < 1:
            problems.append(f"train.epochs: expected >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"train.batch_size: expected >= 1, got {self.batch_size}")
        if self.min_batch < 1:
            problems.append(f"train.min_batch: expected >= 1, got {self.min_batch}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"train.max_steps: expected >= 1, got {self.max_steps}")
        if self.keep_checkpoints < 0:
            problems.append(f"train.keep_checkpoints: expected >= 0, got {self.keep_checkpoints}")
        if problems:
            raise ConfigError(problems)

    @property
    def autocast_bf16(self) -> bool:
        """Whether the forward pass runs under bf16 autocast."""
        if self.bf16 is not None:
            return self.bf16
        return torch.device(self.device).type == "cuda"


@dataclass(slots=True)
class Position:
    """Where a run stands: epoch (0-based), step within it, optimiser steps in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass(slots=True)
class TrainHistory:
    """What a run measured: loss per step and mean loss (and extra terms) per epoch."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    epoch_terms: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"step_losses": self.step_losses, "epoch_losses": self.epoch_losses,
                "epoch_terms": self.epoch_terms, "seconds": self.seconds,
                "stopped_early": self.stopped_early}


StepResult = tuple[torch.Tensor, Mapping[str, float]]
StepFn = Callable[[Sequence[int], np.random.Generator], StepResult]
"""``(example indices, loop rng) -> (loss to minimise, extra float terms to log)``."""


def epoch_order(seed: int, epoch: int, n_examples: int) -> np.ndarray:
    """int64 (n_examples,) the shuffled example order of ``epoch``; depends only on its args."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def epoch_batches(config: LoopConfig, epoch: int, n_examples: int) -> list[list[int]]:
    """The batches (lists of example indices) of ``epoch``, in order."""
    order = epoch_order(config.seed, epoch, n_examples).tolist()
    batches = [order[i : i + config.batch_size] for i in range(0, n_examples, config.batch_size)]
    if batches and config.drop_last and len(batches[-1]) < config.batch_size:
        batches.pop()
    return [b for b in batches if len(b) >= config.min_batch]


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy's global state and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng(loop_rng: np.random.Generator) -> dict[str, Any]:
    """Every random state, in a form ``torch.load(weights_only=True)`` accepts."""
    legacy = cast(tuple[Any, ...], np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps([legacy[0], legacy[1].tolist(), *legacy[2:]]),
        "python": json.dumps(random.getstate()),
        "loop": json.dumps(loop_rng.bit_generator.state),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], loop_rng: np.random.Generator) -> None:
    """Puts back what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    loop_rng.bit_generator.state = json.loads(state["loop"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(payload: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint named by ``directory/latest.json``, or None."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text("utf-8"))["checkpoint"]
    path = directory / str(name)
    return path if path.is_file() else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or the newest one of a checkpoint directory.

    Raises:
        ModelError: nothing to resume from at ``path``.
    """
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ModelError(f"{path}: no {LATEST}; not a checkpoint directory")
        return found
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint written by :class:`Trainer` (weights-only unpickling).

    Raises:
        ModelError: nothing to resume from, or not a streamcap training checkpoint.
        WeightsError: the file is unreadable or refused (a pickle with code), named.
    """
    data = read_checkpoint(resolve_checkpoint(path))
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a streamcap training checkpoint")
    return data


class Progress:
    """A one-line progress bar on a terminal stream; silent elsewhere."""

    def __init__(self, total: int, label: str, *, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.start = time.monotonic()

    def update(self, n: int = 1, **values: float) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 24)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        extra = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.stream.write(f"\r{self.label} [{bar:<24}] {self.done}/{self.total} "
                          f"{elapsed:5.0f}s eta {eta:4.0f}s {extra}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class Trainer:
    """Runs :data:`StepFn` over shuffled batches with the reference optimiser.

    Args:
        kind: what is trained (``"captioner"``, ``"retriever"``); stored and checked
            on resume.
        modules: ``(prefix, module)`` pairs holding every trained parameter; their
            state dicts make up the checkpoint's weights.
        n_examples: dataset size; examples are addressed by index.
        step_fn: computes the loss of a batch.
        optim: optimiser and schedule settings.
        loop: loop settings.
        metadata: JSON-ready facts stored in each checkpoint (configs, stage ...).
    """

    def __init__(self, kind: str, modules: Sequence[tuple[str, nn.Module]], n_examples: int,
                 step_fn: StepFn, optim: OptimConfig, loop: LoopConfig,
                 metadata: Mapping[str, Any] | None = None) -> None:
        if n_examples < loop.min_batch:
            raise ConfigError(f"train: {n_examples} examples, fewer than one batch "
                              f"(min_batch {loop.min_batch})")
        self.kind = kind
        self.modules = list(modules)
        self.n_examples = n_examples
        self.step_fn = step_fn
        self.optim_config = optim
        self.config = loop
        self.metadata = dict(metadata or {})
        self.device = torch.device(loop.device)
        for _, module in self.modules:
            module.to(self.device)
        seed_everything(loop.seed)
        self.rng = np.random.default_rng(loop.seed)
        self.optimizer = build_optimizer(self.modules, optim)
        self.scheduler = build_scheduler(self.optimizer, optim)
        self.position = Position()
        self.history = TrainHistory()
        if self.steps_per_epoch() == 0:
            raise ConfigError(f"train: {n_examples} examples make no batch of "
                              f"{loop.batch_size} (drop_last={loop.drop_last}, "
                              f"min_batch={loop.min_batch})")

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, module in self.modules:
            yield from module.parameters()

    def steps_per_epoch(self) -> int:
        return len(epoch_batches(self.config, 0, self.n_examples))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on CUDA (see :attr:`LoopConfig.autocast_bf16`), else nothing."""
        if not self.config.autocast_bf16:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            yield

    # ---------------------------------------------------------------- checkpoints
    def model_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, keys prefixed with the module prefix."""
        state: dict[str, torch.Tensor] = {}
        for prefix, module in self.modules:
            for key, value in module.state_dict().items():
                state[f"{prefix}.{key}"] = value.detach().cpu().clone()
        return state

    def load_model_state(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        for prefix, module in self.modules:
            part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            result = module.load_state_dict(part, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ModelError(f"{where}: checkpoint weights do not fit '{prefix}' (missing "
                                 f"{result.missing_keys[:5]}, unexpected "
                                 f"{result.unexpected_keys[:5]})")

    def save(self, name: str) -> Path | None:
        directory = self.config.checkpoint_dir
        if directory is None:
            return None
        p = self.position
        payload = {
            "format": CHECKPOINT_FORMAT, "kind": self.kind,
            "model": self.model_state(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": capture_rng(self.rng),
            "position": [p.epoch, p.step_in_epoch, p.global_step],
            "history": json.dumps(self.history.to_dict()),
            "metadata": json.dumps(self.metadata),
        }
        path = directory / name
        _atomic_save(payload, path)
        tmp = directory / (LATEST + ".tmp")
        tmp.write_text(json.dumps({"checkpoint": name, "epoch": p.epoch, "step_in_epoch":
                                   p.step_in_epoch, "global_step": p.global_step}), "utf-8")
        os.replace(tmp, directory / LATEST)
        self._prune(directory, keep=name)
        return path

    def _prune(self, directory: Path, keep: str) -> None:
        if self.config.keep_checkpoints <= 0:
            return
        epochs = sorted(directory.glob("epoch-*.pt"))
        for old in epochs[: -self.config.keep_checkpoints]:
            if old.name != keep:
                old.unlink()

    def resume(self, path: Path) -> None:
        """Restores weights, optimiser, scheduler, random states and position."""
        data = load_checkpoint(path)
        if data["kind"] != self.kind:
            raise ModelError(f"{path}: a {data['kind']} checkpoint, not a {self.kind} one")
        self.load_model_state(data["model"], str(path))
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        restore_rng(data["rng"], self.rng)
        epoch, step_in_epoch, global_step = (int(v) for v in data["position"])
        self.position = Position(epoch=epoch, step_in_epoch=step_in_epoch,
                                 global_step=global_step)
        h = json.loads(data["history"])
        self.history = TrainHistory(step_losses=list(h["step_losses"]),
                                    epoch_losses=list(h["epoch_losses"]),
                                    epoch_terms=list(h["epoch_terms"]), seconds=h["seconds"])

    # ---------------------------------------------------------------- training
    def step(self, batch: Sequence[int]) -> tuple[float, Mapping[str, float]]:
        """One optimiser step on ``batch``; returns the loss and extra terms."""
        for _, module in self.modules:
            module.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, terms = self.step_fn(batch, self.rng)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ModelError(f"{self.kind} training: the loss became {value} at step "
                             f"{self.position.global_step}")
        loss.backward()  # type: ignore[no-untyped-call]
        clip_gradients(self.parameters(), self.optim_config.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return value, terms

    def run(self) -> TrainHistory:
        """Trains until the last epoch, ``max_steps`` or ``max_seconds``; checkpoints each epoch."""
        cfg = self.config
        started = time.monotonic()
        spent_before = self.history.seconds
        per_epoch = self.steps_per_epoch()
        total = per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        bar = Progress(total, self.kind, enabled=cfg.progress)
        bar.done = self.position.global_step
        self.history.stopped_early = False
        try:
            while self.position.epoch < cfg.epochs:
                batches = epoch_batches(cfg, self.position.epoch, self.n_examples)
                sums: dict[str, float] = {}
                for batch in batches[self.position.step_in_epoch:]:
                    if self._must_stop(started):
                        self.history.stopped_early = True
                        self.history.seconds = spent_before + time.monotonic() - started
                        self.save(f"step-{self.position.global_step:07d}.pt")
                        return self.history
                    loss, terms = self.step(batch)
                    self.history.step_losses.append(loss)
                    self.position.step_in_epoch += 1
                    self.position.global_step += 1
                    for key, value in terms.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    bar.update(loss=loss)
                n = len(batches)
                recent = self.history.step_losses[-n:] if n else [float("nan")]
                self.history.epoch_losses.append(float(np.mean(recent)))
                done_here = max(n, 1)
                self.history.epoch_terms.append({k: v / done_here for k, v in sums.items()})
                self.position.epoch += 1
                self.position.step_in_epoch = 0
                self.history.seconds = spent_before + time.monotonic() - started
                self.save(f"epoch-{self.position.epoch:03d}.pt")
        finally:
            bar.close()
        self.history.seconds = spent_before + time.monotonic() - started
        return self.history

    def _must_stop(self, started: float) -> bool:
        cfg = self.config
        if cfg.max_steps is not None and self.position.global_step >= cfg.max_steps:
            return True
        return cfg.max_seconds is not None and time.monotonic() - started >= cfg.max_seconds
