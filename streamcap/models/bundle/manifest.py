"""Model bundles: one directory holding every weight, config and tokenizer file of a model.

Layout of a bundle directory::

    manifest.json                    what is inside, with the SHA-256 of every other file
    weights/<component>.safetensors  one state dict per component (codec, enclap, retriever, ...)
    tokenizers/<name>/...            the files of one tokenizer, copied as they were

``manifest.json`` (format ``streamcap-bundle``, version 1)::

    {"format": "streamcap-bundle", "format_version": 1,
     "model_id": "streamcap-tiny-1a2b3c4d5e6f", "preset": "tiny" | null,
     "created_at": "2025-01-01T00:00:00+00:00",
     "components": {"enclap": {"config": {...}, "weights": "weights/enclap.safetensors",
                               "aliases": {"lm_head.weight": "model.shared.weight"}}},
     "tokenizers": {"text": {"files": ["tokenizers/text/tokenizer.json"]}},
     "decoding": {...},
     "abstention": {"min_confidence": 0.3, ...},   (optional)
     "files": {"weights/enclap.safetensors": "<sha256 hex>", ...}}

``abstention`` (optional) is the bundle's abstention rule
(:class:`streamcap.models.decoding.abstain.AbstentionRule`): when the captioner
replaces a caption by "quiet" or "an unfamiliar sound". A bundle without it
never abstains.

Tied weights: safetensors refuses tensors that share storage. :func:`save_bundle` stores
a tensor that is an exact alias of another key (same storage, offset, shape and stride,
e.g. a BART ``lm_head.weight`` tied to ``model.shared.weight``) once, and records it under
the component's ``aliases``; :meth:`Bundle.load_weights` puts the alias back as the
same tensor, so ``load_state_dict(strict=True)`` works. Tensors that merely overlap
(views at different offsets) are cloned and so stored twice.

Loading is entirely offline: :func:`load_bundle` sets ``HF_HUB_OFFLINE=1`` and
``TRANSFORMERS_OFFLINE=1`` in the process environment when they are unset, so that a
tokenizer or config loaded from a bundle directory can never reach the network.
Hugging Face libraries read these variables when first imported; a CLI should call
:func:`ensure_offline_env` before importing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import torch
from safetensors.torch import save_file

from streamcap.errors import ModelError, WeightsError
from streamcap.logs import get_logger
from streamcap.models.bundle.weights import read_state_dict
from streamcap.models.decoding.abstain import AbstentionRule

_log = get_logger(__name__)

BUNDLE_FORMAT: Final = "streamcap-bundle"
BUNDLE_FORMAT_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
WEIGHTS_DIR: Final = "weights"
TOKENIZERS_DIR: Final = "tokenizers"
_CHUNK_BYTES: Final = 1 << 20
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REQUIRED_KEYS: Final = (
    "format", "format_version", "model_id", "preset", "created_at",
    "components", "tokenizers", "decoding", "files",
)  # fmt: skip


def ensure_offline_env() -> None:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` unless already set."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def sha256_file(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- tensors


def _alias_key(tensor: torch.Tensor) -> tuple[object, ...]:
    return (
        tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
        tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device,
    )  # fmt: skip


def drop_tied_duplicates(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop keys whose tensor is an exact alias of an earlier key (tied weights).

    Args:
        state: A state dict; tensors of any dtype and shape.

    Returns:
        The state dict without the aliases, and ``{dropped_key: kept_key}``.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[object, ...], str] = {}
    for key, tensor in state.items():
        if tensor.numel() > 0:
            ident = _alias_key(tensor)
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        kept[key] = tensor
    return kept, aliases


def prepare_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make a state dict safetensors can write: detached, on CPU, contiguous, unshared.

    A tensor whose storage was already used by an earlier tensor is cloned.
    """
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(
                f"state dict key {key!r}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() > 0 and ptr in storages:
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        storages.add(ptr)
        out[key] = tensor
    return out


# --------------------------------------------------------------------------- saving


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ModelError(
            f"{kind} name {name!r}: expected letters, digits, '_', '.' or '-', not starting with '.'"
        )


def _to_json(where: str, value: Mapping[str, object]) -> Any:
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: not JSON-serialisable: {exc}") from exc


def _copy_tokenizer(name: str, source: Path, root: Path) -> list[str]:
    if not source.is_dir():
        raise ModelError(f"tokenizer {name!r}: {source} is not a directory")
    files: list[str] = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = Path(TOKENIZERS_DIR, name, path.relative_to(source))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / rel)
        files.append(rel.as_posix())
    if not files:
        raise ModelError(f"tokenizer {name!r}: directory {source} holds no files")
    return files


def _write_contents(
    root: Path,
    components: Mapping[str, tuple[Mapping[str, object], Mapping[str, torch.Tensor]]],
    tokenizers: Mapping[str, Path],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    comp_entries: dict[str, Any] = {}
    tok_entries: dict[str, Any] = {}
    files: dict[str, str] = {}
    (root / WEIGHTS_DIR).mkdir()
    for name, (config, state) in components.items():
        _check_name("component", name)
        kept, aliases = drop_tied_duplicates(state)
        rel = f"{WEIGHTS_DIR}/{name}.safetensors"
        save_file(prepare_state_dict(kept), root / rel)
        files[rel] = sha256_file(root / rel)
        entry: dict[str, Any] = {
            "config": _to_json(f"component {name!r} config", config),
            "weights": rel,
        }
        if aliases:
            entry["aliases"] = aliases
        comp_entries[name] = entry
    for name, source in tokenizers.items():
        _check_name("tokenizer", name)
        tok_files = _copy_tokenizer(name, Path(source), root)
        tok_entries[name] = {"files": tok_files}
        files.update({rel: sha256_file(root / rel) for rel in tok_files})
    return comp_entries, tok_entries, files


def _default_model_id(preset: str | None, files: Mapping[str, str], components: Any) -> str:
    digest = hashlib.sha256(json.dumps([files, components], sort_keys=True).encode()).hexdigest()
    return f"streamcap-{preset or 'custom'}-{digest[:12]}"


def _replace_dir(tmp: Path, target: Path) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    target.rename(trash / target.name)
    tmp.rename(target)
    shutil.rmtree(trash, ignore_errors=True)


def save_bundle(
    directory: Path,
    *,
    components: Mapping[str, tuple[Mapping[str, object], Mapping[str, torch.Tensor]]],
    tokenizers: Mapping[str, Path],
    preset: str | None,
    decoding: Mapping[str, object],
    model_id: str | None = None,
    overwrite: bool = False,
    abstention: AbstentionRule | None = None,
) -> Path:
    """Write a bundle directory.

    Everything is written into a temporary directory next to ``directory``, which is
    then renamed into place, so a crash never leaves a half-written bundle under the
    target name.

    Args:
        directory: The bundle directory to create.
        components: ``{name: (config dict, state dict)}``; configs must be JSON-serialisable
            (tuples come back as lists); tensors of any dtype, on any device.
        tokenizers: ``{name: directory}``; every file under each directory is copied.
        preset: The preset the model was built from, or None.
        decoding: Default decoding options, JSON-serialisable.
        model_id: Defaults to ``streamcap-<preset or custom>-<12 hex of the content hash>``.
        overwrite: Replace an existing non-empty directory.
        abstention: The bundle's abstention rule, or None (the bundle never abstains).

    Returns:
        ``directory``.

    Raises:
        ModelError: ``directory`` is a file or a non-empty directory (without
            ``overwrite``), a name is unsafe, a config is not JSON, or a tokenizer
            directory is missing or empty.
    """
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ModelError(f"bundle path {directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ModelError(
            f"bundle directory {directory} is not empty; pass overwrite=True to replace it"
        )
    decoding_json = _to_json("decoding", decoding)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        comp_entries, tok_entries, files = _write_contents(tmp, components, tokenizers)
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "model_id": model_id or _default_model_id(preset, files, comp_entries),
            "preset": preset,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "components": comp_entries,
            "tokenizers": tok_entries,
            "decoding": decoding_json,
            "files": files,
        }
        if abstention is not None:
            manifest["abstention"] = _to_json("abstention", abstention.to_json())
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        (tmp / MANIFEST_NAME).write_text(text, encoding="utf-8")
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.info("bundle saved", model_id=manifest["model_id"], components=list(comp_entries),
              directory=str(directory))
    return directory


# --------------------------------------------------------------------------- loading


def _bad(key: str, expected: str) -> WeightsError:
    return WeightsError(f"{MANIFEST_NAME}: key {key!r}: expected {expected}")


def _get(obj: Mapping[str, Any], key: str, dotted: str, kind: type, expected: str) -> Any:
    if key not in obj:
        raise WeightsError(f"{MANIFEST_NAME}: missing key {dotted!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(dotted, expected)
    return value


def _check_rel(dotted: str, rel: object) -> str:
    if not isinstance(rel, str) or not rel:
        raise _bad(dotted, "a relative file path")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise _bad(dotted, f"a relative path inside the bundle, got {rel!r}")
    return rel


def read_json_object(path: Path, error: type[ModelError] = ModelError) -> dict[str, Any]:
    """A JSON file holding an object (a manifest, a checkpoint's ``config.json``).

    Raises:
        ModelError: (``error``) unreadable, not valid JSON, or not an object; names the file.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object (got {type(raw).__name__})")
    return raw


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: {MANIFEST_NAME} is missing; not a streamcap bundle")
    manifest = read_json_object(path, WeightsError)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise _bad("format", f"{BUNDLE_FORMAT!r}, got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version != BUNDLE_FORMAT_VERSION:
        raise _bad(
            "format_version", f"{BUNDLE_FORMAT_VERSION}, got {manifest.get('format_version')!r}"
        )
    for key in _REQUIRED_KEYS:
        if key not in manifest:
            raise WeightsError(f"{MANIFEST_NAME}: missing key {key!r}")
    return manifest


def _validate(manifest: Mapping[str, Any]) -> None:
    _get(manifest, "model_id", "model_id", str, "a string")
    if manifest["preset"] is not None and not isinstance(manifest["preset"], str):
        raise _bad("preset", "a string or null")
    _get(manifest, "created_at", "created_at", str, "an ISO 8601 string")
    _get(manifest, "decoding", "decoding", dict, "an object")
    files = _get(manifest, "files", "files", dict, "an object {relative path: sha256 hex}")
    for rel, digest in files.items():
        _check_rel(f"files.{rel}", rel)
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _bad(f"files.{rel}", "a 64-digit lower-case sha256 hex string")
    for name, entry in _get(manifest, "components", "components", dict, "an object").items():
        where = f"components.{name}"
        if not isinstance(entry, dict):
            raise _bad(where, "an object with 'config' and 'weights'")
        _get(entry, "config", f"{where}.config", dict, "an object")
        rel = _check_rel(
            f"{where}.weights", _get(entry, "weights", f"{where}.weights", str, "a path")
        )
        if rel not in files:
            raise _bad(f"{where}.weights", f"a file listed under 'files', got {rel!r}")
        aliases = entry.get("aliases", {})
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise _bad(f"{where}.aliases", "an object {dropped key: kept key}")
    for name, entry in _get(manifest, "tokenizers", "tokenizers", dict, "an object").items():
        where = f"tokenizers.{name}.files"
        if not isinstance(entry, dict):
            raise _bad(f"tokenizers.{name}", "an object with 'files'")
        for rel in _get(entry, "files", where, list, "a list of paths"):
            _check_rel(where, rel)
            if rel not in files or not rel.startswith(f"{TOKENIZERS_DIR}/{name}/"):
                raise _bad(
                    where, f"paths under {TOKENIZERS_DIR}/{name}/ listed under 'files', got {rel!r}"
                )


def _verify_files(directory: Path, files: Mapping[str, str], *, hashes: bool) -> tuple[str, ...]:
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            raise WeightsError(f"{path}: file listed in {MANIFEST_NAME} is missing")
        if hashes:
            actual = sha256_file(path)
            if actual != expected:
                raise WeightsError(
                    f"{path}: sha256 mismatch: expected {expected}, actual {actual}; "
                    "the file is corrupt or was changed after the bundle was written"
                )
    on_disk = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    extra = sorted(rel for rel in on_disk if rel != MANIFEST_NAME and rel not in files)
    for rel in extra:
        _log.warning(f"bundle file {rel} is not listed in {MANIFEST_NAME}; ignored",
                     bundle=str(directory), file=rel)
    return tuple(extra)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """A loaded (and by default verified) bundle; weights are read on demand.

    Attributes:
        path: The bundle directory.
        manifest: The parsed ``manifest.json``.
        model_id: ``manifest["model_id"]``.
        preset: The preset the model was built from, or None.
        component_configs: ``{component: config dict}``, for the component's ``from_dict``.
        tokenizer_dirs: ``{tokenizer: directory}`` inside the bundle.
        decoding: Default decoding options.
        abstention: The abstention rule, or None when the manifest has none.
        device: Where :meth:`load_weights` puts tensors.
        extra_files: Files found in the bundle but not listed in the manifest.
    """

    path: Path
    manifest: Mapping[str, Any]
    model_id: str
    preset: str | None
    component_configs: Mapping[str, Mapping[str, Any]]
    tokenizer_dirs: Mapping[str, Path]
    decoding: Mapping[str, Any]
    abstention: AbstentionRule | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    extra_files: tuple[str, ...] = ()

    def weights_path(self, name: str) -> Path:
        """Return the weight file of component ``name``; ModelError if there is none."""
        components = self.manifest["components"]
        if name not in components:
            raise ModelError(
                f"bundle {self.path}: no component {name!r}; it has {', '.join(sorted(components)) or 'none'}"
            )
        return self.path / str(components[name]["weights"])

    def load_weights(self, name: str) -> dict[str, torch.Tensor]:
        """Read the state dict of component ``name`` onto :attr:`device`.

        The file is read by :func:`streamcap.models.bundle.weights.read_state_dict`:
        ``.safetensors`` with safetensors, any other with ``torch.load(weights_only=True)``
        (a mapping of tensors, or one under ``"state_dict"``). Tied keys recorded under
        ``aliases`` are restored as the same tensor object as the key they alias.

        Raises:
            ModelError: No such component.
            WeightsError: The file cannot be read or does not hold a state dict.
        """
        path = self.weights_path(name)
        state = read_state_dict(path, device=self.device)
        for dropped, kept in self.manifest["components"][name].get("aliases", {}).items():
            if kept not in state:
                raise WeightsError(f"{path}: alias {dropped!r} names missing key {kept!r}")
            state[dropped] = state[kept]
        return state


def load_bundle(
    directory: Path, *, verify: bool = True, device: str | torch.device = "cpu"
) -> Bundle:
    """Read and check a bundle's manifest; by default verify the SHA-256 of every file.

    Never touches the network (see the module docstring). Files present on disk but not
    listed in the manifest are logged as a warning and reported in ``extra_files``.

    Args:
        directory: The bundle directory.
        verify: Hash every listed file. Missing files are an error either way.
        device: Where :meth:`Bundle.load_weights` puts tensors.

    Raises:
        WeightsError: The manifest is missing, not JSON, of another format or version,
            lacks a key or has a wrong type (the message names ``manifest.json`` and the
            key); a listed file is missing; a hash does not match (the message names the
            file, the expected and the actual hash).
    """
    ensure_offline_env()
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise WeightsError(f"bundle directory {directory} does not exist")
    manifest = _read_manifest(directory)
    _validate(manifest)
    extra = _verify_files(directory, manifest["files"], hashes=verify)
    return Bundle(
        path=directory,
        manifest=manifest,
        model_id=manifest["model_id"],
        preset=manifest["preset"],
        component_configs={name: e["config"] for name, e in manifest["components"].items()},
        tokenizer_dirs={name: directory / TOKENIZERS_DIR / name for name in manifest["tokenizers"]},
        decoding=manifest["decoding"],
        abstention=(None if manifest.get("abstention") is None
                    else AbstentionRule.from_json(manifest["abstention"],
                                                  f"{directory / MANIFEST_NAME}: key 'abstention'")),
        device=torch.device(device),
        extra_files=extra,
    )


def write_abstention(directory: Path, rule: AbstentionRule | None) -> Path:
    """Set (or, with None, remove) the ``abstention`` object of a bundle's manifest.

    The weights and their hashes are untouched; the manifest is replaced atomically.

    Raises:
        WeightsError: the directory holds no valid manifest.
    """
    directory = Path(directory).expanduser()
    manifest = _read_manifest(directory)
    _validate(manifest)
    if rule is None:
        manifest.pop("abstention", None)
    else:
        manifest["abstention"] = _to_json("abstention", rule.to_json())
    path = directory / MANIFEST_NAME
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST_NAME}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- --model


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """What ``--model`` named: a bundle directory or a preset (random weights).

    Attributes:
        kind: ``"bundle"`` or ``"preset"``.
        bundle_path: The bundle directory, for ``kind == "bundle"``.
        preset: The preset name, for ``kind == "preset"``.
        random_weights: True for presets; the caller logs :attr:`warning`.
    """

    kind: Literal["bundle", "preset"]
    bundle_path: Path | None = None
    preset: str | None = None
    random_weights: bool = False

    @property
    def warning(self) -> str | None:
        """The warning to log for random weights, else None."""
        if not self.random_weights:
            return None
        return (
            f"preset {self.preset!r} has random weights: captions are meaningless; "
            "train or import a model and pass its bundle directory as --model PATH"
        )


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


SYSTEM_BUNDLE_DIR = Path("/var/lib/streamcap/bundles")
"""The system-wide bundle directory, searched after the user's (e.g. for the service)."""


def user_bundle_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """``$XDG_CACHE_HOME/streamcap/bundles``, else ``~/.cache/streamcap/bundles``.

    None when neither is known (no absolute ``XDG_CACHE_HOME`` and no home directory,
    as under a systemd ``DynamicUser``).
    """
    env = os.environ if env is None else env
    cache = env.get("XDG_CACHE_HOME", "")
    if cache and os.path.isabs(cache):
        return Path(cache) / "streamcap" / "bundles"
    home = env.get("HOME", "")
    if not home:
        try:
            home = str(Path.home())
        except RuntimeError:
            return None
    return Path(home) / ".cache" / "streamcap" / "bundles"


def bundle_search_path(env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """Where a bare ``--model NAME`` is looked up, in order: the user's bundle
    directory (:func:`user_bundle_dir`), then :data:`SYSTEM_BUNDLE_DIR`."""
    user = user_bundle_dir(env)
    return (SYSTEM_BUNDLE_DIR,) if user is None else (user, SYSTEM_BUNDLE_DIR)


def find_named_bundle(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The first ``DIR/name`` holding a manifest along :func:`bundle_search_path`."""
    if not name or _looks_like_path(name):
        return None
    for directory in bundle_search_path(env):
        if (directory / name / MANIFEST_NAME).is_file():
            return directory / name
    return None


def resolve_model(spec: str) -> ModelSpec:
    """Interpret a ``--model`` value as a bundle path or a preset name.

    A value that looks like a path (contains ``/``, starts with ``.`` or ``~``) must be
    a bundle directory. A bare name is a bundle if it is a directory holding
    ``manifest.json``, else a bundle of that name along :func:`bundle_search_path`
    (where ``streamcap models fetch`` writes), else a preset if it is one, else an
    error. A fetched bundle thus shadows the preset of the same name. The presets are
    exactly those of :func:`streamcap.models.bundle.presets.preset_names` (what
    ``streamcap models presets`` lists).

    Args:
        spec: The ``--model`` value.

    Raises:
        ModelError: The path does not exist, is not a directory or lacks
            ``manifest.json``; or the name is neither a bundle nor a preset (the
            message lists the presets).
    """
    from streamcap.models.bundle.presets import preset_names

    names = preset_names()
    path = Path(spec).expanduser()
    is_bundle = (path / MANIFEST_NAME).is_file()
    if is_bundle or _looks_like_path(spec) or (path.is_dir() and spec not in names):
        if not path.exists():
            raise ModelError(f"--model {spec!r}: bundle directory {path} does not exist")
        if not path.is_dir():
            raise ModelError(
                f"--model {spec!r}: {path} is not a directory; expected a bundle directory"
            )
        if not is_bundle:
            raise ModelError(
                f"--model {spec!r}: {path} has no {MANIFEST_NAME}; not a streamcap bundle"
            )
        return ModelSpec(kind="bundle", bundle_path=path)
    named = find_named_bundle(spec)
    if named is not None:
        return ModelSpec(kind="bundle", bundle_path=named)
    if spec in names:
        return ModelSpec(kind="preset", preset=spec, random_weights=True)
    searched = ", ".join(str(d) for d in bundle_search_path())
    raise ModelError(
        f"--model {spec!r}: not a preset ({', '.join(names)}) and not a bundle in {searched}; "
        "give a path to a bundle directory (e.g. ./my-model) or fetch one with "
        "`streamcap models fetch NAME` (streamcap models list)"
    )
