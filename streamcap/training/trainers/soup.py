"""Model soups: uniform weight averages of finetuned models of one architecture.

A soup of ``n`` state dicts averages every floating-point tensor (summed in
float64, then cast back to its dtype, so the soup of identical models is
bit-identical to the model). Integer tensors (counters such as BatchNorm's
``num_batches_tracked``) are not averaged: they must agree or the first one
is kept (``strict_integers=False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from streamcap.errors import ModelError
from streamcap.models.bundle.components import Components, load_components, save_components
from streamcap.models.bundle.manifest import load_bundle
from streamcap.training.trainers.loop import load_checkpoint

State = Mapping[str, torch.Tensor]


def uniform_soup(states: Sequence[State], *, names: Sequence[str] | None = None,
                 strict_integers: bool = False) -> dict[str, torch.Tensor]:
    """The uniform average of ``states``.

    Args:
        states: state dicts with identical keys, shapes and dtypes.
        names: what each state is (for error messages); defaults to ``#i``.
        strict_integers: raise when integer tensors differ instead of keeping the first.

    Returns:
        A new state dict (CPU tensors).

    Raises:
        ModelError: no states, or keys/shapes/dtypes that differ (named).
    """
    if not states:
        raise ModelError("soup: no models to average")
    labels = list(names) if names is not None else [f"#{i}" for i in range(len(states))]
    first = states[0]
    for label, state in zip(labels[1:], states[1:], strict=True):
        missing = sorted(set(first) - set(state))
        extra = sorted(set(state) - set(first))
        if missing or extra:
            raise ModelError(f"soup: {label} does not match {labels[0]} (missing {missing[:5]}, "
                             f"extra {extra[:5]})")
        for key, value in first.items():
            other = state[key]
            if other.shape != value.shape or other.dtype != value.dtype:
                raise ModelError(f"soup: {label} {key} is {other.dtype} {tuple(other.shape)}, "
                                 f"{labels[0]} has {value.dtype} {tuple(value.shape)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in first.items():
        if value.is_floating_point() or value.is_complex():
            total = torch.zeros(value.shape, dtype=torch.float64)
            for state in states:
                total += state[key].detach().cpu().to(torch.float64)
            out[key] = (total / len(states)).to(value.dtype)
        else:
            for label, state in zip(labels[1:], states[1:], strict=True):
                if strict_integers and not torch.equal(state[key].cpu(), value.cpu()):
                    raise ModelError(f"soup: integer tensor {key} differs in {label}")
            out[key] = value.detach().cpu().clone()
    return out


def soup_checkpoints(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The soup of the weights of training checkpoints (files or checkpoint directories)."""
    states = [load_checkpoint(p)["model"] for p in paths]
    return uniform_soup(states, names=[str(p) for p in paths])


def soup_bundles(directories: Sequence[Path], out: Path, *,
                 components: Sequence[str] = ("captioner",), overwrite: bool = False) -> Path:
    """Writes a bundle whose ``components`` are the soup of the given bundles'.

    The other components (codec, tokenizers, ...) come from the first bundle.

    Raises:
        ModelError: the bundles do not share an architecture.
    """
    if not directories:
        raise ModelError("soup: no bundles to average")
    loaded: list[Components] = [load_components(load_bundle(d)) for d in directories]
    base = loaded[0]
    names = [str(d) for d in directories]
    for name in components:
        modules = [_component(c, name) for c in loaded]
        soup = uniform_soup([m.state_dict() for m in modules], names=names)
        modules[0].load_state_dict(soup)
    base.model_id = f"{base.model_id}-soup{len(loaded)}"
    return save_components(base, out, overwrite=overwrite)


def _component(components: Components, name: str) -> torch.nn.Module:
    if name == "captioner":
        return components.captioner
    if name == "retriever" and components.retriever is not None:
        return components.retriever
    raise ModelError(f"soup: {components.model_id} has no component {name!r} to average "
                     "(captioner, retriever)")
