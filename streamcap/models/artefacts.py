"""The registry of published artefacts ``streamcap models fetch`` downloads.

This module is the single home of every URL, size and licence: the fetch code
(:mod:`streamcap.models.fetch`) and the docs (``docs/models-fetch.md``) follow it.
Pure data and lookups, no I/O.

Sizes are the publishers' listings (rounded; used for the free-space check and shown
before a download). Revisions are pinned where the publisher's commit is known;
``revision="main"`` means the branch head: the first verified download's sha256 is then
recorded in the bundle manifest and every later fetch of the bundle is checked against
it. Hub files stored with LFS carry a published sha256 (their ETag), which is checked
on every download; for small non-LFS files the recorded hash is the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from streamcap.errors import ModelError

SourceKind = Literal["hub", "url"]
RepoType = Literal["model", "space", "dataset"]

MB = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Artefact:
    """One downloadable file.

    Attributes:
        name: registry key, e.g. ``enclap-base/ckpt-weights``.
        kind: ``hub`` (a Hugging Face repository file, via huggingface_hub) or ``url``
            (a plain HTTPS URL such as a GitHub release or Zenodo file, via pooch).
        repo: ``owner/name`` for hub files; the full URL for url files.
        filename: the path inside the repository (hub) or the local file name (url).
        size: bytes, as the publisher lists it (approximate where rounded).
        sha256: the published sha256, or None (hub LFS files are checked against the
            hub's own sha256; others against the hash recorded at the first download).
        licence: the licence's name (SPDX id where there is one); ``unverified`` in it
            says the publisher's page was not read to confirm it.
        licence_url: where the licence is stated.
        repo_type: for hub files: ``model``, ``space`` or ``dataset``.
        revision: for hub files: a commit sha, or ``main`` (see the module doc).
        size_verified: False where ``size`` is an estimate, not a listed size.
    """

    name: str
    kind: SourceKind
    repo: str
    filename: str
    size: int
    sha256: str | None
    licence: str
    licence_url: str
    repo_type: RepoType = "model"
    revision: str = "main"
    size_verified: bool = True

    def __post_init__(self) -> None:
        if self.sha256 is not None and (len(self.sha256) != 64 or any(
                c not in "0123456789abcdef" for c in self.sha256)):
            raise ModelError(f"artefact {self.name}: sha256 must be 64 lowercase hex digits")
        if self.size <= 0:
            raise ModelError(f"artefact {self.name}: size must be positive")

    @property
    def local_name(self) -> str:
        """The file's name on disk (the last path part)."""
        return self.filename.rsplit("/", 1)[-1]

    def url(self, endpoint: str = "https://huggingface.co") -> str:
        """Where the file is downloaded from (hub files under ``endpoint``)."""
        if self.kind == "url":
            return self.repo
        prefix = {"model": "", "space": "spaces/", "dataset": "datasets/"}[self.repo_type]
        return f"{endpoint.rstrip('/')}/{prefix}{self.repo}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleRecipe:
    """What ``streamcap models fetch NAME`` downloads and how it becomes a bundle.

    Attributes:
        name: the bundle's name (its directory under the bundle directory).
        description: one line for ``streamcap models list``.
        parts: role -> artefacts; the roles are what the builder expects (for
            ``enclap``: ``checkpoint``, ``encodec``, ``clap``, ``tokenizer``).
        builder: how the downloads become a bundle (``enclap``: the
            ``models import-enclap`` importer).
        bundle_size: bytes of the finished bundle (for the free-space check).
    """

    name: str
    description: str
    parts: Mapping[str, tuple[Artefact, ...]]
    builder: Literal["enclap"]
    bundle_size: int

    @property
    def artefacts(self) -> tuple[Artefact, ...]:
        return tuple(a for group in self.parts.values() for a in group)

    @property
    def download_size(self) -> int:
        return sum(a.size for a in self.artefacts)


_ENCLAP_SPACE_LICENCE_URL = "https://huggingface.co/spaces/enclap-team/enclap"
# The Space's initial commit, which added ckpt/ (unchanged since).
_ENCLAP_SPACE_REVISION = "73baeaed68b54f79abff2b05b37eb2ba7b51d382"
# facebook/encodec_24khz: the commit "add `inference: false` tag (#1)".
_ENCODEC_REVISION = "c1dbe2ae3f1de713481a3b3e7c47f357092ee040"

ENCLAP_BASE_CONFIG = Artefact(
    name="enclap-base/ckpt-config", kind="hub", repo="enclap-team/enclap", repo_type="space",
    filename="ckpt/config.json", size=1_720, sha256=None, revision=_ENCLAP_SPACE_REVISION,
    licence="unverified (the Space states none; EnCLAP authors' release)",
    licence_url=_ENCLAP_SPACE_LICENCE_URL)
ENCLAP_BASE_WEIGHTS = Artefact(
    name="enclap-base/ckpt-weights", kind="hub", repo="enclap-team/enclap", repo_type="space",
    filename="ckpt/pytorch_model.bin", size=663 * MB, sha256=None,
    revision=_ENCLAP_SPACE_REVISION,
    licence="unverified (the Space states none; EnCLAP authors' release)",
    licence_url=_ENCLAP_SPACE_LICENCE_URL)
ENCODEC_24K_CONFIG = Artefact(
    name="encodec-24khz/config", kind="hub", repo="facebook/encodec_24khz",
    filename="config.json", size=809, sha256=None, revision=_ENCODEC_REVISION,
    licence="CC-BY-NC-4.0 (unverified: the EnCodec release's weights licence; "
            "the hub card states none)",
    licence_url="https://github.com/facebookresearch/encodec/blob/main/LICENSE_weights")
ENCODEC_24K_WEIGHTS = Artefact(
    name="encodec-24khz/weights", kind="hub", repo="facebook/encodec_24khz",
    filename="model.safetensors", size=93_100_000, sha256=None, revision=_ENCODEC_REVISION,
    licence=ENCODEC_24K_CONFIG.licence, licence_url=ENCODEC_24K_CONFIG.licence_url)
LAION_CLAP_FUSION = Artefact(
    name="laion-clap/630k-audioset-fusion-best", kind="hub", repo="lukewys/laion_clap",
    filename="630k-audioset-fusion-best.pt", size=1_900 * MB, size_verified=False,
    sha256=None, licence="CC0-1.0",
    licence_url="https://huggingface.co/lukewys/laion_clap")
BART_BASE_VOCAB = Artefact(
    name="bart-base/vocab", kind="hub", repo="facebook/bart-base", filename="vocab.json",
    size=899_000, sha256=None, licence="Apache-2.0",
    licence_url="https://huggingface.co/facebook/bart-base")
BART_BASE_MERGES = Artefact(
    name="bart-base/merges", kind="hub", repo="facebook/bart-base", filename="merges.txt",
    size=456_000, sha256=None, licence="Apache-2.0",
    licence_url="https://huggingface.co/facebook/bart-base")

ENCLAP_BASE = BundleRecipe(
    name="enclap-base",
    description="EnCLAP base (the authors' published checkpoint) with EnCodec 24 kHz and "
                "LAION-CLAP fusion: real captions",
    parts={"checkpoint": (ENCLAP_BASE_CONFIG, ENCLAP_BASE_WEIGHTS),
           "encodec": (ENCODEC_24K_CONFIG, ENCODEC_24K_WEIGHTS),
           "clap": (LAION_CLAP_FUSION,),
           "tokenizer": (BART_BASE_VOCAB, BART_BASE_MERGES)},
    builder="enclap",
    # captioner 166 M (+ grown positions) + EnCodec encoder 7.4 M + CLAP 28.2 M, float32
    bundle_size=850 * MB,
)

RECIPES: Mapping[str, BundleRecipe] = {r.name: r for r in (ENCLAP_BASE,)}


def recipe_names() -> tuple[str, ...]:
    """The names ``streamcap models fetch`` accepts."""
    return tuple(RECIPES)


def recipe(name: str) -> BundleRecipe:
    """The recipe called ``name``.

    Raises:
        ModelError: no such recipe (the message lists them).
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise ModelError(f"models fetch: unknown model {name!r}; expected one of "
                         f"{', '.join(RECIPES)} (streamcap models list)") from None


def licences(item: BundleRecipe) -> tuple[tuple[str, str, str], ...]:
    """``(artefact source, licence, licence URL)`` rows, one per distinct source."""
    rows: dict[tuple[str, str, str], None] = {}
    for a in item.artefacts:
        rows[(a.repo if a.kind == "hub" else a.url(), a.licence, a.licence_url)] = None
    return tuple(rows)


__all__ = [
    "ENCLAP_BASE",
    "RECIPES",
    "Artefact",
    "BundleRecipe",
    "licences",
    "recipe",
    "recipe_names",
]
