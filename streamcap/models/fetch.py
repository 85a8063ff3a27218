"""``streamcap models fetch``: download published weights and build a named bundle.

What is downloaded, from where, how big and under which licence is in
:mod:`streamcap.models.artefacts`; this module does the I/O:

- hub files with ``huggingface_hub`` (which honours ``HF_ENDPOINT``, resumes a partial
  ``.incomplete`` file and retries dropped connections), plain URLs with
  ``huggingface_hub``'s resumable HTTP GET (a ``.part`` file resumed by a Range request);
  both draw tqdm progress bars;
- every file's sha256 is checked: against the registry's published hash, else the
  hub's LFS sha256, else the hash recorded at the first verified download (kept in the
  bundle manifest's ``sources`` and ``.downloads/NAME/verified.json``); a mismatch
  deletes the file and names both hashes;
- the bundle is built in a temporary directory beside its destination and renamed into
  place at the end, so an interrupted fetch leaves no half-written bundle.

Training components (``dac-24khz``, ``bart-base``, ...) and data sets (``clotho``) go
the same way but are not bundles: their verified files are moved into ``DIR/NAME``
(the DAC checkpoint also converted), with ``component.json`` recording the sources.
Published md5 sums (Zenodo's) are checked as well as the sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamcap.errors import ModelError, WeightsError
from streamcap.models.artefacts import Artefact, BundleRecipe, licences
from streamcap.models.bundle.manifest import MANIFEST_NAME, sha256_file, user_bundle_dir

DOWNLOADS_DIR = ".downloads"
VERIFIED_NAME = "verified.json"
COMPONENT_NAME = "component.json"
SYSTEM_COMPONENT_DIR = Path("/var/lib/streamcap/components")
_SHA_HEX = frozenset("0123456789abcdef")


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def user_component_dir() -> Path | None:
    """Where training components are fetched by default: beside the user bundle
    directory, ``.../streamcap/components``."""
    bundles = user_bundle_dir()
    return None if bundles is None else bundles.parent / "components"


def user_data_dir() -> Path | None:
    """Where data sets are fetched by default: ``.../streamcap/data``."""
    bundles = user_bundle_dir()
    return None if bundles is None else bundles.parent / "data"


def component_search_path() -> tuple[Path, ...]:
    """Where fetched components are looked up: the user's directory, then the system's."""
    user = user_component_dir()
    return (SYSTEM_COMPONENT_DIR,) if user is None else (user, SYSTEM_COMPONENT_DIR)


def find_component(name: str, directories: tuple[Path, ...] | None = None) -> Path | None:
    """The first ``DIR/name`` holding a fetched component (``component.json``)."""
    for directory in directories if directories is not None else component_search_path():
        if (directory / name / COMPONENT_NAME).is_file():
            return directory / name
    return None


def manual_route(name: str) -> str:
    """The advice printed when a host cannot be reached."""
    from streamcap.models.artefacts import DATASETS, RECIPES

    if name in DATASETS:
        return (f"download it on a machine with internet (`streamcap data fetch {name} --dir "
                f"DIR`, then copy DIR/{name} here; docs/data-fetch.md)")
    item = RECIPES.get(name)
    if item is not None and item.is_component:
        return (f"download it on a machine with internet (`streamcap models fetch {name} --dir "
                f"DIR`, then copy DIR/{name} here; docs/models-fetch.md)")
    return (f"download it on a machine with internet (`streamcap models fetch {name} --dir DIR`, "
            f"then copy DIR/{name} here) or fetch the files by hand and run "
            "`streamcap models import-enclap` (docs/models-fetch.md)")


# --------------------------------------------------------------------------- pure checks


@dataclass(frozen=True, slots=True, kw_only=True)
class SpaceNeed:
    """Bytes needed where the downloads and the bundle go, and bytes free there."""

    needed: int
    free: int

    @property
    def enough(self) -> bool:
        return self.free >= self.needed


def space_needed(item: BundleRecipe, present: Mapping[str, int]) -> int:
    """Bytes still to download (``present``: artefact name -> bytes already on disk)
    plus the finished bundle's size."""
    missing = sum(max(0, a.size - present.get(a.name, 0)) for a in item.artefacts)
    return missing + item.bundle_size


def expected_sha256(artefact: Artefact, recorded: Mapping[str, str],
                    hub_etag: str | None) -> str | None:
    """The hash a download must have: published, else the hub's LFS sha256, else recorded."""
    if artefact.sha256 is not None:
        return artefact.sha256
    if hub_etag is not None:
        etag = hub_etag.strip('"').removeprefix("W/").strip('"').lower()
        if len(etag) == 64 and set(etag) <= _SHA_HEX:
            return etag
    return recorded.get(artefact.name)


def licence_text(item: BundleRecipe) -> str:
    """The licence lines printed before a download."""
    lines = [(f"{item.name}: {item.download_size / 1e9:.2f} GB to download, "
             f"{item.bundle_size / 1e9:.2f} GB bundle. Licences:")]
    for source, name, url in licences(item):
        lines.append(f"  {source}: {name} ({url})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- downloads


def _unreachable(url: str, name: str, exc: BaseException) -> ModelError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelError(f"models fetch: cannot download {url} ({reason[:160]}); "
                      f"{manual_route(name)}")


def _hub_error(artefact: Artefact, name: str, exc: BaseException) -> ModelError:
    from huggingface_hub.errors import HfHubHTTPError

    url = artefact.url(_endpoint())
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        return ModelError(f"models fetch: {url}: HTTP {status} "
                          f"({'not found' if status == 404 else 'refused'}); "
                          f"{manual_route(name)}")
    return _unreachable(url, name, exc)


def _quiet_http_logs() -> None:
    """The HTTP client logs every request at INFO; the progress bars say enough."""
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _hub_download(artefact: Artefact, directory: Path, name: str) -> tuple[Path, str | None]:
    """Download one hub file into ``directory`` (resumable); returns (path, LFS etag)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    _quiet_http_logs()

    if constants.HF_HUB_OFFLINE:
        raise ModelError("models fetch: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; unset "
                         f"it to download, or {manual_route(name)}")
    endpoint = _endpoint()
    try:
        meta = get_hf_file_metadata(hf_hub_url(artefact.repo, artefact.filename,
                                               repo_type=artefact.repo_type,
                                               revision=artefact.revision, endpoint=endpoint))
        path = hf_hub_download(artefact.repo, artefact.filename, repo_type=artefact.repo_type,
                               revision=artefact.revision, local_dir=directory,
                               endpoint=endpoint)
    except (OSError, ValueError) as exc:
        raise _hub_error(artefact, name, exc) from exc
    except Exception as exc:  # httpx2 transport errors are not OSError
        raise _unreachable(artefact.url(endpoint), name, exc) from exc
    return Path(path), meta.etag


def _url_download(artefact: Artefact, directory: Path, name: str) -> Path:
    """Download a plain URL into ``directory``: a ``.part`` file, resumed with a Range
    request when a previous run left one, renamed when complete."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    _quiet_http_logs()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / artefact.local_name
    if path.is_file():
        return path
    part = path.with_name(path.name + ".part")
    try:
        with part.open("ab") as handle:
            http_get(artefact.url(), handle, resume_size=handle.tell(),
                     displayed_filename=artefact.local_name)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        raise ModelError(f"models fetch: {artefact.url()}: HTTP {status}; "
                         f"{manual_route(name)}") from exc
    except Exception as exc:  # httpx2 transport errors, OSError
        raise _unreachable(artefact.url(), name, exc) from exc
    os.replace(part, path)
    return path


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, artefact: Artefact, expected: str | None, url: str) -> str:
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        path.unlink(missing_ok=True)
        raise WeightsError(f"{url}: checksum mismatch: expected sha256 {expected}, got {actual}; "
                           f"the download was deleted, run the fetch again")
    if artefact.md5 is not None:
        md5 = _md5_file(path)
        if md5 != artefact.md5:
            path.unlink(missing_ok=True)
            raise WeightsError(f"{url}: checksum mismatch: expected md5 {artefact.md5} (as "
                               f"published), got {md5}; the download was deleted, run the "
                               "fetch again")
    return actual


# --------------------------------------------------------------------------- fetch


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchResult:
    path: Path
    model_id: str
    hashes: Mapping[str, str]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _recorded(final: Path, downloads: Path) -> dict[str, str]:
    """Hashes recorded by earlier verified downloads of this bundle."""
    recorded: dict[str, str] = {}
    sources = (_read_json(final / MANIFEST_NAME).get("sources", [])
               or _read_json(final / COMPONENT_NAME).get("sources", []))
    for row in sources if isinstance(sources, list) else []:
        if isinstance(row, dict) and isinstance(row.get("name"), str) and \
                isinstance(row.get("sha256"), str):
            recorded[row["name"]] = row["sha256"]
    for key, value in _read_json(downloads / VERIFIED_NAME).items():
        if isinstance(value, str):
            recorded.setdefault(key, value)
    return recorded


def _present(item: BundleRecipe, downloads: Path) -> dict[str, int]:
    present: dict[str, int] = {}
    for role, group in item.parts.items():
        for a in group:
            for candidate in downloads.glob(f"{role}/**/{a.local_name}*"):
                if candidate.is_file():
                    present[a.name] = max(present.get(a.name, 0), candidate.stat().st_size)
    return present


def _free_bytes(directory: Path) -> int:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def confirm_on_terminal(question: str) -> bool:
    """Ask on the terminal; ModelError when there is none."""
    if not sys.stdin.isatty():
        raise ModelError("models fetch: the licences above must be accepted; pass "
                         "--accept-licences (no terminal to ask on)")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def fetch_bundle(item: BundleRecipe, *, directory: Path | None = None,
                 accept_licences: bool = False, overwrite: bool = False,
                 keep_downloads: bool = False,
                 confirm: Callable[[str], bool] = confirm_on_terminal,
                 say: Callable[[str], None] = print,
                 import_options: Mapping[str, Any] | None = None,
                 finish: Callable[[Path], Mapping[str, Any]] | None = None) -> FetchResult:
    """Download ``item``'s artefacts and build its bundle at ``directory/item.name``.

    Args:
        directory: the bundle directory (default: the user's, see
            :func:`streamcap.models.bundle.manifest.user_bundle_dir`).
        accept_licences: skip the question (for scripts).
        overwrite: rebuild an existing bundle (its recorded hashes still apply).
        keep_downloads: keep ``directory/.downloads/NAME`` after the build.
        confirm: asks the licence question (default: on the terminal).
        say: prints a line.
        import_options: extra :class:`~streamcap.models.enclap.published.ImportOptions`
            fields (tests use tiny random-codec presets).
        finish: for components and data sets: called on the staged directory (the
            verified files in it) before it is renamed into place; what it returns is
            added to ``component.json`` (``streamcap data fetch`` extracts and writes
            the manifest here).

    Raises:
        ModelError: licences refused, not enough space, a host unreachable or a file
            missing (one line naming the URL), a bundle already there.
        WeightsError: a checksum mismatch (both hashes named).
    """
    default = (user_data_dir() if item.is_dataset else
               user_component_dir() if item.is_component else user_bundle_dir())
    root = directory if directory is not None else default
    if root is None:
        raise ModelError("models fetch: no home directory or XDG_CACHE_HOME to put bundles "
                         "in; pass --dir DIR")
    root = Path(root).expanduser()
    final = root / item.name
    marker = COMPONENT_NAME if item.is_component else MANIFEST_NAME
    if (final / marker).is_file() and not overwrite:
        use = ("train init --from-fetched reads it" if item.is_component
               else f"use it with --model {item.name}")
        kind = "the fetched component" if item.is_component else "a bundle"
        raise ModelError(f"models fetch: {final} already holds {kind}; {use}, or pass "
                         "--overwrite to fetch it again")
    downloads = root / DOWNLOADS_DIR / item.name
    say(licence_text(item))
    if not accept_licences and not confirm("Accept these licences and download?"):
        raise ModelError("models fetch: licences not accepted; nothing downloaded")
    need = SpaceNeed(needed=space_needed(item, _present(item, downloads)),
                     free=_free_bytes(root))
    if not need.enough:
        raise ModelError(f"models fetch: {root}: {need.needed / 1e9:.2f} GB needed, "
                         f"{need.free / 1e9:.2f} GB free; free space or pass --dir DIR")
    recorded = _recorded(final, downloads)
    hashes: dict[str, str] = {}
    paths: dict[str, list[Path]] = {}
    for role, group in item.parts.items():
        for a in group:
            target = downloads / role
            if a.kind == "hub":
                path, etag = _hub_download(a, target, item.name)
            else:
                path, etag = _url_download(a, target, item.name), None
            hashes[a.name] = _verify(path, a, expected_sha256(a, recorded, etag),
                                     a.url(_endpoint()))
            paths.setdefault(role, []).append(path)
            downloads.mkdir(parents=True, exist_ok=True)
            (downloads / VERIFIED_NAME).write_text(
                json.dumps({**recorded, **hashes}, indent=2, sort_keys=True) + "\n")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{item.name}.partial-") as tmp:
        staged = Path(tmp) / item.name
        if item.is_component:
            model_id = _build_component(item, paths, staged, hashes, finish)
        else:
            model_id = _build(item, paths, staged, dict(import_options or {}), say)
            _record_sources(staged, item, hashes)
        if final.exists():
            old = Path(tmp) / "replaced"
            os.replace(final, old)
        os.replace(staged, final)
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
        try:
            (root / DOWNLOADS_DIR).rmdir()
        except OSError:
            pass
    if item.is_dataset:
        say(f"fetched {item.name} to {final}")
    elif item.is_component:
        say(f"fetched {item.name} to {final}; `streamcap train init --from-fetched` reads it")
    else:
        say(f"wrote bundle {model_id} to {final}; run it with: "
            f"streamcap run --model {item.name}")
    return FetchResult(path=final, model_id=model_id, hashes=hashes)


def _build(item: BundleRecipe, paths: Mapping[str, list[Path]], output: Path,
           extra: dict[str, Any], say: Callable[[str], None]) -> str:
    from streamcap.models.enclap.published import ImportOptions, import_enclap

    options = ImportOptions(encodec=paths["encodec"][0].parent, clap=paths["clap"][0],
                            tokenizer=paths["tokenizer"][0].parent, **extra)
    report = import_enclap(paths["checkpoint"][0].parent, output, options)
    for warning in report.warnings:
        say(f"WARNING: {warning}")
    return report.model_id


def _sources(item: BundleRecipe, hashes: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"name": a.name, "url": a.url(), "revision": a.revision if a.kind == "hub" else None,
             "sha256": hashes[a.name], "md5": a.md5, "licence": a.licence,
             "licence_url": a.licence_url} for a in item.artefacts]


def _build_component(item: BundleRecipe, paths: Mapping[str, list[Path]], output: Path,
                     hashes: Mapping[str, str],
                     finish: Callable[[Path], Mapping[str, Any]] | None) -> str:
    """Move the verified files into ``output`` (flat, under their published names), convert
    a descript DAC checkpoint (builder ``dac``) and write ``component.json``."""
    output.mkdir(parents=True)
    files: dict[str, str] = {}
    for a, path in zip(item.artefacts, (p for g in paths.values() for p in g), strict=True):
        shutil.move(str(path), output / a.local_name)
        files[a.name] = a.local_name
    record: dict[str, Any] = {"name": item.name, "builder": item.builder, "files": files,
                              "sources": _sources(item, hashes)}
    if item.builder == "dac":
        from streamcap.models.codecs.descript import convert_descript_file

        config = convert_descript_file(output / item.artefacts[0].local_name,
                                       output / DAC_CONVERTED)
        record["converted"] = {"file": DAC_CONVERTED, "codec_id": config.codec_id}
    if finish is not None:
        record.update(finish(output))
    (output / COMPONENT_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    return item.name


DAC_CONVERTED = "codec.safetensors"


def _record_sources(bundle: Path, item: BundleRecipe, hashes: Mapping[str, str]) -> None:
    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["sources"] = _sources(item, hashes)
    manifest["fetched_as"] = item.name
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")


__all__ = ["COMPONENT_NAME", "DAC_CONVERTED", "FetchResult", "SpaceNeed",
           "component_search_path", "confirm_on_terminal", "expected_sha256", "fetch_bundle",
           "find_component", "licence_text", "manual_route", "space_needed",
           "user_component_dir", "user_data_dir"]
