"""Reading weight files and checking state dicts: the one place for both.

Every weight file streamcap reads goes through :func:`read_checkpoint`:

* ``*.safetensors`` is read with safetensors (a flat mapping of names to tensors);
* anything else (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) with
  ``torch.load(weights_only=True)``, which unpickles tensors and plain containers
  only and refuses a pickle that would import or call anything else.

A missing, truncated or foreign file, and a pickle with code, all end in one
:class:`~streamcap.errors.WeightsError` line that names the file; no exception of
torch or safetensors escapes. :func:`state_dict_from` picks the state dict out of a
loaded checkpoint, and :func:`check_state` is the one key/shape check: it names
missing, unexpected and mis-shaped keys in one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import torch

from streamcap.errors import ModelError, WeightsError

__all__ = [
    "SAFETENSORS_SUFFIX",
    "check_state",
    "naming_file",
    "read_checkpoint",
    "read_state_dict",
    "state_dict_from",
    "state_problems",
    "state_shapes",
]

SAFETENSORS_SUFFIX: Final = ".safetensors"
_MAX_LISTED: Final = 8
_REFUSED: Final = "Weights only load failed"
_GLOBAL_RE: Final = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_RE: Final = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")

Shaped = torch.Tensor | tuple[int, ...]


# --------------------------------------------------------------------------- reading


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _unreadable(path: Path, kind: str, message: str) -> WeightsError:
    """The one-line error for ``message`` of torch or safetensors about ``path``."""
    if _REFUSED in message:
        found = _GLOBAL_RE.search(message)
        if found:  # the pickle names a class or function to import: code, never run
            return WeightsError(
                f"{path}: refused: the pickle holds Python objects other than tensors "
                f"({found[1]}); streamcap reads weights with torch.load(weights_only=True) "
                "and never runs code from a weight file"
            )
        why = _UNPICKLER_RE.search(message)
        message = f"unpickling stopped: {why[1] if why else 'not a tensor pickle'}"
    return WeightsError(f"{path}: not a readable {kind} ({_one_line(message)})")


def read_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> object:
    """Read a weight file as it is stored (no layout check).

    Args:
        path: A ``.safetensors`` file, or a ``torch.save`` file of any other name.
        device: Where tensors are put.

    Returns:
        ``{name: tensor}`` for safetensors; whatever the torch file holds otherwise
        (tensors in dicts, lists, numbers and strings).

    Raises:
        WeightsError: no such file, a file of another format, truncated or corrupt,
            or a pickle with objects other than tensors (refused unread); the
            one-line message starts with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: " + ("a directory, not a weight file" if path.is_dir()
                                          else "no such file"))
    safetensors = path.suffix == SAFETENSORS_SUFFIX
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(path, device=str(device))
        return torch.load(path, map_location=device, weights_only=True)
    # torch and safetensors raise many types for bad files (KeyError, EOFError,
    # RuntimeError, UnpicklingError, SafetensorError, ...); every one means "not readable".
    except Exception as exc:
        kind = "safetensors file" if safetensors else "torch checkpoint"
        raise _unreadable(path, kind, str(exc).strip() or type(exc).__name__) from exc


def state_dict_from(
    obj: object, where: str, *, nested: Sequence[str] = ("state_dict",)
) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: ``obj`` itself, or the mapping under one of ``nested``.

    Args:
        obj: A loaded checkpoint.
        where: Names the source in messages (a path, or e.g. ``"state dict"``).
        nested: Keys under which a state dict may sit (the first present wins).

    Raises:
        WeightsError: ``obj`` is not a mapping of names to tensors (the first
            offending keys are named).
    """
    if isinstance(obj, Mapping):
        for key in nested:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    under = "".join(f" or one under {key!r}" for key in nested)
    expected = f"a state dict (a mapping of names to tensors{under})"
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{where}: expected {expected}, got {type(obj).__name__}")
    bad = sorted(
        str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    )
    if bad:
        raise WeightsError(f"{where}: expected {expected}; not tensors: {_listed(bad)}")
    return dict(obj)


def read_state_dict(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    nested: Sequence[str] = ("state_dict",),
) -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint` then :func:`state_dict_from`; every error names ``path``."""
    return state_dict_from(read_checkpoint(path, device=device), str(path), nested=nested)


@contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """Prefix a :class:`WeightsError` raised inside with ``path`` (unless it names it already).

    For checks that run on a state dict after it was read, far from the file.
    """
    try:
        yield
    except WeightsError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise WeightsError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------- checking


def _shape(value: Shaped) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _listed(items: Sequence[str], sep: str = ", ") -> str:
    more = f"{sep}... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return sep.join(items[:_MAX_LISTED]) + more


def state_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``state``, by key."""
    return {key: tuple(value.shape) for key, value in state.items()}


def state_problems(
    expected: Mapping[str, Shaped],
    got: Mapping[str, Shaped],
    *,
    optional: tuple[str, ...] = (),
) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``got`` against ``expected``; [] if none.

    Args:
        expected: What the module needs: tensors or shapes, by key.
        got: What is on offer: tensors or shapes, by key.
        optional: Key suffixes that may be missing.

    Returns:
        At most three items: ``"missing keys (N): a, b"``, ``"unexpected keys (N): ..."``,
        ``"shape mismatches (N): key: expected (..), got (..); ..."`` (the first eight
        keys of each, sorted).
    """
    missing = sorted(k for k in set(expected) - set(got) if not k.endswith(optional))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{key}: expected {_shape(expected[key])}, got {_shape(got[key])}"
        for key in sorted(set(got) & set(expected))
        if _shape(got[key]) != _shape(expected[key])
    ]
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listed(mismatched, '; ')}")
    return problems


def check_state(
    expected: Mapping[str, Shaped],
    got: Mapping[str, Shaped],
    where: str,
    *,
    optional: tuple[str, ...] = (),
    extra: Sequence[str] = (),
    error: type[ModelError] = WeightsError,
) -> None:
    """Raise ``error`` in one line naming every key/shape problem (see :func:`state_problems`).

    Args:
        expected: What the module needs: tensors or shapes, by key.
        got: What is on offer: tensors or shapes, by key.
        where: Starts the message: the file and what it was checked against, e.g.
            ``"model.safetensors: does not match the EnCLAP layout of its config.json"``.
        optional: Key suffixes that may be missing.
        extra: Problems the caller found besides keys and shapes (listed after them).
        error: The exception class raised (:class:`ModelError` for a module built in
            code rather than read from a file).

    Raises:
        ModelError: (``error``) on any problem.
    """
    problems = [*state_problems(expected, got, optional=optional), *extra]
    if problems:
        raise error(f"{where}: " + "; ".join(problems))
