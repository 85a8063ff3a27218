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

from streamcap.errors import ConfigError, ModelError

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
        md5: the md5 the publisher lists (Zenodo lists md5 only), checked as well.
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
    md5: str | None = None

    def __post_init__(self) -> None:
        if self.md5 is not None and (len(self.md5) != 32 or any(
                c not in "0123456789abcdef" for c in self.md5)):
            raise ModelError(f"artefact {self.name}: md5 must be 32 lowercase hex digits")
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
            ``models import-enclap`` importer) or a training component (``files``: the
            verified files as published; ``dac``: those plus the descript checkpoint
            converted to ``codec.safetensors`` as ``models convert-dac`` does).
        bundle_size: bytes of the finished bundle (for the free-space check).
    """

    name: str
    description: str
    parts: Mapping[str, tuple[Artefact, ...]]
    builder: Literal["enclap", "files", "dac", "dataset"]
    bundle_size: int

    @property
    def is_component(self) -> bool:
        """Not a bundle: a training component or a data set (``DIR/NAME`` holding
        ``component.json``)."""
        return self.builder != "enclap"

    @property
    def is_dataset(self) -> bool:
        """A data set (``streamcap data fetch``)."""
        return self.builder == "dataset"

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

# --------------------------------------------------------------------------- training components
# The parts of the DCASE2024 recipe that ``streamcap train init --from-fetched`` reads.
# Sizes marked size_verified=False are the publishers' listings as remembered, not read
# while this was written; the free-space check uses them, the hashes protect the files.

_DAC_LICENCE_URL = "https://github.com/descriptinc/descript-audio-codec/blob/main/LICENSE"
DAC_24K_WEIGHTS = Artefact(
    name="dac-24khz/weights", kind="url",
    repo="https://github.com/descriptinc/descript-audio-codec/releases/download/0.0.4/"
         "weights_24khz.pth",
    filename="weights_24khz.pth", size=300 * MB, size_verified=False, sha256=None,
    licence="MIT (descript-audio-codec's licence, code and weights)",
    licence_url=_DAC_LICENCE_URL)

_CNEXT_LICENCE = "unverified (the Zenodo records' licence was not read; CC-BY-4.0 expected)"
CNEXT_AUDIOSET = Artefact(
    name="cnext-audioset/checkpoint", kind="url",
    repo="https://zenodo.org/records/8020843/files/convnext_tiny_471mAP.pth",
    filename="convnext_tiny_471mAP.pth", size=115 * MB, size_verified=False, sha256=None,
    md5="e069ecd1c7b880268331119521c549f2", licence=_CNEXT_LICENCE,
    licence_url="https://zenodo.org/records/8020843")
CNEXT_AUDIOSET_BL = Artefact(
    name="cnext-audioset-bl/checkpoint", kind="url",
    repo="https://zenodo.org/records/10987498/files/convnext_tiny_465mAP_BL_AC_75kit.pth",
    filename="convnext_tiny_465mAP_BL_AC_75kit.pth", size=115 * MB, size_verified=False,
    sha256=None, md5="f6f57c87b7eb664a23ae8cad26eccaa0", licence=_CNEXT_LICENCE,
    licence_url="https://zenodo.org/records/10987498")

FENSE_ECHECKER = Artefact(
    name="fense-echecker/checkpoint", kind="url",
    repo="https://github.com/blmoistawinde/fense/releases/download/V0.1/"
         "echecker_clotho_audiocaps_base.ckpt",
    filename="echecker_clotho_audiocaps_base.ckpt", size=440 * MB, size_verified=False,
    sha256="1a719f090af70614bbdb9f9437530b7e133c48cfa4a58d964de0d47fc974a2fa",
    licence="unverified (the FENSE repository's licence was not read)",
    licence_url="https://github.com/blmoistawinde/fense")


def _hub_files(name: str, repo: str, files: Mapping[str, int], licence: str
               ) -> tuple[Artefact, ...]:
    return tuple(Artefact(name=f"{name}/{filename}", kind="hub", repo=repo, filename=filename,
                          size=size, size_verified=False, sha256=None, licence=licence,
                          licence_url=f"https://huggingface.co/{repo}")
                 for filename, size in files.items())


def _component(name: str, description: str, parts: Mapping[str, tuple[Artefact, ...]],
               builder: Literal["files", "dac"] = "files") -> BundleRecipe:
    size = sum(a.size for group in parts.values() for a in group)
    # files are moved, not copied; the DAC conversion writes the encoder+quantizer again
    return BundleRecipe(name=name, description=description, parts=parts, builder=builder,
                        bundle_size=size if builder == "dac" else 1 * MB)


_BPE = {"vocab.json": 899_000, "merges.txt": 456_000}
_WORDPIECE = {"vocab.txt": 232_000, "tokenizer.json": 700_000}

COMPONENTS: tuple[BundleRecipe, ...] = (
    _component("dac-24khz", "DAC 24 kHz codec (descript release 0.0.4), converted for "
               "streamcap", {"weights": (DAC_24K_WEIGHTS,)}, builder="dac"),
    _component("cnext-audioset-bl", "CNext (ConvNeXt-Tiny) AudioSet tagger without the "
               "AudioCaps/Clotho overlap, Zenodo 10987498", {"checkpoint": (CNEXT_AUDIOSET_BL,)}),
    _component("cnext-audioset", "CNext (ConvNeXt-Tiny) AudioSet tagger, 47.1 mAP, Zenodo "
               "8020843", {"checkpoint": (CNEXT_AUDIOSET,)}),
    _component("fense-echecker", "FENSE error detector (BERT-base), for fluency checks",
               {"checkpoint": (FENSE_ECHECKER,)}),
    _component("bart-base", "BART base: captioner initialisation and caption tokenizer",
               {"model": _hub_files("bart-base", "facebook/bart-base",
                                    {"config.json": 1_720, "model.safetensors": 558 * MB,
                                     **_BPE}, "Apache-2.0")}),
    _component("bart-large", "BART large: captioner initialisation and caption tokenizer",
               {"model": _hub_files("bart-large", "facebook/bart-large",
                                    {"config.json": 1_630, "model.safetensors": 1_020 * MB,
                                     **_BPE}, "Apache-2.0")}),
    *(_component(name, f"retriever text encoder {repo}",
                 {"model": _hub_files(name, repo, {"config.json": 800, "model.safetensors": size,
                                                   **tok}, licence)})
      for name, repo, size, tok, licence in (
          ("bge-base-en-v1.5", "BAAI/bge-base-en-v1.5", 438 * MB, _WORDPIECE, "MIT"),
          ("bge-large-en-v1.5", "BAAI/bge-large-en-v1.5", 1_340 * MB, _WORDPIECE, "MIT"),
          ("bert-base-uncased", "google-bert/bert-base-uncased", 440 * MB, _WORDPIECE,
           "Apache-2.0"),
          ("bert-large-uncased", "google-bert/bert-large-uncased", 1_340 * MB, _WORDPIECE,
           "Apache-2.0"),
          ("roberta-base", "FacebookAI/roberta-base", 499 * MB, _BPE, "MIT"),
          ("roberta-large", "FacebookAI/roberta-large", 1_420 * MB, _BPE, "MIT"))),
)

RECIPES: Mapping[str, BundleRecipe] = {r.name: r for r in (ENCLAP_BASE, *COMPONENTS)}

# --------------------------------------------------------------------------- data sets
# Clotho v2.1 (Zenodo record 4783391). The md5 sums are those Zenodo lists for the
# record; the sizes of the development and validation files are Zenodo's listing, those
# of the evaluation files estimates (size_verified=False).

_CLOTHO_URL = "https://zenodo.org/records/4783391/files/"
_CLOTHO_LICENCE = ("unverified (Clotho's terms on its Zenodo record; each clip's Freesound "
                   "licence is in clotho_metadata_*.csv)")


def _clotho(filename: str, size: int, md5: str, *, verified: bool = True) -> Artefact:
    return Artefact(name=f"clotho/{filename}", kind="url", repo=_CLOTHO_URL + filename,
                    filename=filename, size=size, size_verified=verified, sha256=None,
                    md5=md5, licence=_CLOTHO_LICENCE,
                    licence_url="https://zenodo.org/records/4783391")


CLOTHO = BundleRecipe(
    name="clotho",
    description="Clotho v2.1 audio captioning data set (Zenodo 4783391): 6,974 clips of "
                "15-30 s, five captions each",
    parts={
        "audio": (
            _clotho("clotho_audio_development.7z", 4_541_582_263,
                    "c8b05bc7acdb13895bb3c6a29608667e"),
            _clotho("clotho_audio_validation.7z", 1_260_701_425,
                    "7dba730be08bada48bd15dc4e668df59"),
            _clotho("clotho_audio_evaluation.7z", 1_270_000_000,
                    "4569624ccadf96223f19cb59fe4f849f", verified=False)),
        "captions": (
            _clotho("clotho_captions_development.csv", 1_336_762,
                    "d4090b39ce9f2491908eebf4d5b09bae"),
            _clotho("clotho_captions_validation.csv", 367_649,
                    "5879e023032b22a2c930aaa0528bead4"),
            _clotho("clotho_captions_evaluation.csv", 370_000,
                    "1b16b9e57cf7bdb7f13a13802aeb57e2", verified=False)),
        "metadata": (
            _clotho("clotho_metadata_development.csv", 830_797,
                    "170d20935ecfdf161ce1bb154118cda5"),
            _clotho("clotho_metadata_validation.csv", 224_803,
                    "2e010427c56b1ce6008b0f03f41048ce"),
            _clotho("clotho_metadata_evaluation.csv", 225_000,
                    "13946f054d4e1bf48079813aac61bf77", verified=False)),
    },
    builder="dataset",
    # the extracted WAV files (44.1 kHz, 16 bit), estimated; the archives are deleted
    bundle_size=11_500 * MB,
)

DATASETS: Mapping[str, BundleRecipe] = {CLOTHO.name: CLOTHO}
"""What ``streamcap data fetch`` downloads."""


def dataset(name: str) -> BundleRecipe:
    """The data set called ``name``.

    Raises:
        ConfigError: no such data set (the message lists them and the manual ones).
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"data fetch: unknown data set {name!r}; expected one of "
                          f"{', '.join(DATASETS)} (AudioCaps and WavCaps are prepared by "
                          "hand: docs/data-fetch.md)") from None


GROUPS: Mapping[str, tuple[str, ...]] = {
    "dcase2024-components": tuple(c.name for c in COMPONENTS)}
"""Names that fetch several components, one after another."""


def recipe_names() -> tuple[str, ...]:
    """The names ``streamcap models fetch`` accepts."""
    return (*RECIPES, *GROUPS)


def recipes_for(name: str) -> tuple[BundleRecipe, ...]:
    """The recipes a fetch of ``name`` runs (a group's members, or the one recipe)."""
    if name in GROUPS:
        return tuple(RECIPES[n] for n in GROUPS[name])
    return (recipe(name),)


def recipe(name: str) -> BundleRecipe:
    """The recipe called ``name``.

    Raises:
        ModelError: no such recipe (the message lists them).
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise ModelError(f"models fetch: unknown model {name!r}; expected one of "
                         f"{', '.join(recipe_names())} (streamcap models list)") from None


def licences(item: BundleRecipe) -> tuple[tuple[str, str, str], ...]:
    """``(artefact source, licence, licence URL)`` rows, one per distinct source."""
    rows: dict[tuple[str, str, str], None] = {}
    for a in item.artefacts:
        rows[(a.repo if a.kind == "hub" else a.url(), a.licence, a.licence_url)] = None
    return tuple(rows)


__all__ = [
    "CLOTHO",
    "COMPONENTS",
    "DATASETS",
    "ENCLAP_BASE",
    "GROUPS",
    "RECIPES",
    "Artefact",
    "BundleRecipe",
    "dataset",
    "licences",
    "recipe",
    "recipe_names",
    "recipes_for",
]
