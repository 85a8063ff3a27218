"""``streamcap models fetch`` against a local server that stands in for the hosts.

The server answers under the real hosts' paths: the hub's
``/{spaces/}{repo}/resolve/{revision}/{file}`` (HEAD and GET, with X-Repo-Commit, ETag,
X-Linked-Etag and X-Linked-Size, Range requests), reached through ``HF_ENDPOINT``,
plus a GitHub-release-like and a Zenodo-like path for plain-URL artefacts. The files
are tiny random models in the published layouts. Nothing here touches the internet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_clap import _to_laion
from test_enclap_import import _bart_config
from transformers import BartForConditionalGeneration, EncodecModel

from streamcap.cli import main
from streamcap.errors import ModelError, WeightsError
from streamcap.models.artefacts import ENCLAP_BASE, Artefact, BundleRecipe
from streamcap.models.bundle.manifest import MANIFEST_NAME, load_bundle, resolve_model
from streamcap.models.codecs.encodec import EncodecCodecConfig
from streamcap.models.enclap.tokenizer import build_caption_tokenizer
from streamcap.models.fetch import (
    DOWNLOADS_DIR,
    expected_sha256,
    fetch_bundle,
    licence_text,
    space_needed,
)
from streamcap.models.retrieval.clap import ClapEmbedder, clap_preset

torch.set_num_threads(1)

K, D = 16, 32  # EnCodec at 12 kbps: 16 codebooks; BART d_model of the tiny stand-in
TINY = {"clap_preset": "clap-tiny", "max_window_s": 10.0}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- stand-in files


def _checkpoint_files(tokenizer: dict[str, bytes]) -> dict[str, bytes]:
    vocab = 320
    d_clap = clap_preset("clap-tiny").embed_dim
    gen = torch.Generator().manual_seed(0)
    bart = BartForConditionalGeneration(_bart_config(vocab))
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in bart.state_dict().items()}
    for i in range(K):
        table = torch.randn(1088, D, generator=gen) * 0.1
        table[1024] = 0.0
        state[f"model.encoder.embed_encodec.{i}.weight"] = table
        state[f"mcm_heads.{i}.weight"] = torch.randn(1024, D, generator=gen) * 0.1
        state[f"mcm_heads.{i}.bias"] = torch.randn(1024, generator=gen) * 0.1
    state["model.encoder.clap_projection.weight"] = torch.randn(D, d_clap, generator=gen) * 0.1
    state["model.encoder.clap_projection.bias"] = torch.randn(D, generator=gen) * 0.1
    for key in ("lm_head.weight", "model.encoder.embed_tokens.weight",
                "model.decoder.embed_tokens.weight"):
        state.pop(key, None)  # tied copies may be absent
    config = {**_bart_config(vocab).to_dict(), "architectures": ["BartModel"], "num_rvq": K,
              "d_clap": d_clap, "encodec_vocab_size": 1024, "encodec_pad_token_id": 1024}
    weights = io.BytesIO()
    torch.save(state, weights)
    return {"config": json.dumps(config).encode(), "weights": weights.getvalue(), **tokenizer}


def _encodec_files(tmp: Path) -> dict[str, bytes]:
    config = EncodecCodecConfig(num_filters=4, hidden_size=16, num_lstm_layers=1)
    torch.manual_seed(0)
    EncodecModel(config.to_hf_config()).save_pretrained(tmp / "encodec")
    return {"config": (tmp / "encodec" / "config.json").read_bytes(),
            "weights": (tmp / "encodec" / "model.safetensors").read_bytes()}


def _clap_file() -> bytes:
    torch.manual_seed(0)
    state = _to_laion(ClapEmbedder(clap_preset("clap-tiny")).state_dict())
    buffer = io.BytesIO()
    torch.save({"state_dict": state}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def contents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Artefact name -> the stand-in bytes served for it."""
    tmp = tmp_path_factory.mktemp("standins")
    build_caption_tokenizer(300).backend_tokenizer.model.save(str(tmp))
    tok = {"vocab": (tmp / "vocab.json").read_bytes(), "merges": (tmp / "merges.txt").read_bytes()}
    ckpt = _checkpoint_files(tok)
    enc = _encodec_files(tmp)
    return {"enclap-base/ckpt-config": ckpt["config"],
            "enclap-base/ckpt-weights": ckpt["weights"],
            "encodec-24khz/config": enc["config"], "encodec-24khz/weights": enc["weights"],
            "laion-clap/630k-audioset-fusion-best": _clap_file(),
            "bart-base/vocab": tok["vocab"], "bart-base/merges": tok["merges"]}


def _small(recipe: BundleRecipe, contents: dict[str, bytes]) -> BundleRecipe:
    """The real recipe (same hosts and paths) with the stand-ins' sizes."""
    parts = {role: tuple(dataclasses.replace(a, size=len(contents[a.name])) for a in group)
             for role, group in recipe.parts.items()}
    return dataclasses.replace(recipe, parts=parts, bundle_size=20_000_000)


# --------------------------------------------------------------------------- the server


@dataclasses.dataclass
class Host:
    """What the stand-in server serves and what it saw."""

    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    lfs: set[str] = dataclasses.field(default_factory=set)
    wrong_sha: set[str] = dataclasses.field(default_factory=set)
    drop_once: set[str] = dataclasses.field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    url: str = ""

    def serve(self, url_path: str, data: bytes, *, lfs: bool = False) -> None:
        self.files[url_path] = data
        if lfs:
            self.lfs.add(url_path)


def _handler(host: Host) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            with host.lock:
                host.requests.append((self.command, path, self.headers.get("Range")))
            data = host.files.get(path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and body:
                start = int(ranged[6:].split("-")[0])
            self.send_response(206 if start else 200)
            sha256 = hashlib.sha256(data).hexdigest()
            if path in host.wrong_sha:
                sha256 = "0" * 64
            self.send_header("X-Repo-Commit", COMMIT)
            if path in host.lfs:
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{sha256}"')
            else:
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            payload = data[start:]
            with host.lock:
                drop = path in host.drop_once
                host.drop_once.discard(path)
            if drop:  # half the body, then the connection is gone
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(payload)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


@contextlib.contextmanager
def serving(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """A stand-in host on a free local port, with ``HF_ENDPOINT`` pointing at it."""
    state = Host()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    with serving(monkeypatch) as state:
        yield state


def _serve_recipe(host: Host, recipe: BundleRecipe, contents: dict[str, bytes]) -> None:
    for a in recipe.artefacts:
        path = a.url(host.url).removeprefix(host.url)
        host.serve(path, contents[a.name], lfs=a.filename.endswith((".bin", ".pt",
                                                                     ".safetensors")))


def _path_of(host: Host, artefact: Artefact) -> str:
    return artefact.url(host.url).removeprefix(host.url)


# --------------------------------------------------------------------------- tests


def test_full_fetch_builds_a_named_bundle_that_captions(
        host: Host, contents: dict[str, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _small(ENCLAP_BASE, contents)
    _serve_recipe(host, recipe, contents)
    weights = _path_of(host, recipe.parts["checkpoint"][1])
    host.drop_once.add(weights)  # the connection drops mid-file: the download resumes
    # 64 KiB chunks (not 10 MB), so that part of the small stand-in is written before the drop
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 65536)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = fetch_bundle(recipe, accept_licences=True, import_options=TINY)
    out = capsys.readouterr().out
    assert "CC0-1.0" in out and "Apache-2.0" in out  # licences printed before the download
    bundles = tmp_path / "cache" / "streamcap" / "bundles"
    assert result.path == bundles / "enclap-base"
    assert sorted(p.name for p in bundles.iterdir()) == ["enclap-base"]  # no temp, no downloads
    ranged = [r for m, p, r in host.requests if m == "GET" and p == weights]
    assert len(ranged) == 2 and ranged[0] is None
    assert ranged[1] is not None and ranged[1].startswith("bytes=")
    resumed_at = int(ranged[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(contents["enclap-base/ckpt-weights"]) // 2
    # the Space's files, by the Space's resolve URL at its pinned commit
    assert any(p.startswith("/spaces/enclap-team/enclap/resolve/73baeae") for _, p, _ in
               host.requests)
    bundle = load_bundle(result.path)
    assert bundle.component_configs["codec"].get("random_weights") is not True
    assert bundle.component_configs["seq_embedder"].get("random_weights") is not True
    sources = {row["name"]: row for row in bundle.manifest["sources"]}
    assert sources["bart-base/vocab"]["sha256"] == \
        hashlib.sha256(contents["bart-base/vocab"]).hexdigest()
    assert resolve_model("enclap-base").bundle_path == result.path  # shadows the preset
    wav = tmp_path / "noise.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(48000 * 10)).astype(
        np.float32), 48000)
    code = main(["caption", "--model", "enclap-base", "--window-s", "10", "--hop-s", "10",
                 "--json", str(wav)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert rows and all(row["model"] == result.model_id for row in rows)


def test_wrong_checksum_is_refused_and_the_file_deleted(
        host: Host, contents: dict[str, bytes], tmp_path: Path) -> None:
    recipe = _small(ENCLAP_BASE, contents)
    _serve_recipe(host, recipe, contents)
    clap = recipe.parts["clap"][0]
    host.wrong_sha.add(_path_of(host, clap))
    with pytest.raises(WeightsError) as info:
        fetch_bundle(recipe, directory=tmp_path, accept_licences=True, import_options=TINY)
    message = str(info.value)
    actual = hashlib.sha256(contents[clap.name]).hexdigest()
    assert "0" * 64 in message and actual in message and clap.filename in message
    assert "\n" not in message
    assert not list(tmp_path.glob(f"{DOWNLOADS_DIR}/**/{clap.local_name}"))
    assert not (tmp_path / "enclap-base").exists()


def test_recorded_hash_is_checked_on_a_later_fetch(
        host: Host, contents: dict[str, bytes], tmp_path: Path) -> None:
    recipe = _small(ENCLAP_BASE, contents)
    _serve_recipe(host, recipe, contents)
    fetch_bundle(recipe, directory=tmp_path, accept_licences=True, import_options=TINY)
    vocab = recipe.parts["tokenizer"][0]  # not LFS: only the recorded hash protects it
    host.files[_path_of(host, vocab)] = contents[vocab.name] + b" "
    with pytest.raises(ModelError, match="already holds a bundle"):
        fetch_bundle(recipe, directory=tmp_path, accept_licences=True, import_options=TINY)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        fetch_bundle(recipe, directory=tmp_path, accept_licences=True, overwrite=True,
                     import_options=TINY)
    assert (tmp_path / "enclap-base" / MANIFEST_NAME).is_file()  # the old bundle is intact


def test_missing_file_gives_one_line_naming_the_url(
        host: Host, contents: dict[str, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _small(ENCLAP_BASE, contents)
    _serve_recipe(host, recipe, contents)
    weights = recipe.parts["checkpoint"][1]
    del host.files[_path_of(host, weights)]
    monkeypatch.setattr("streamcap.models.artefacts.RECIPES", {"enclap-base": recipe})
    code = main(["models", "fetch", "enclap-base", "--dir", str(tmp_path), "--accept-licences"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert weights.url(host.url) in err[0] and "404" in err[0]
    assert "import-enclap" in err[0] and "--dir" in err[0]
    assert not (tmp_path / "enclap-base").exists()


def test_refused_connection_gives_one_line_naming_the_url(
        contents: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    recipe = _small(ENCLAP_BASE, contents)
    monkeypatch.setattr("streamcap.models.artefacts.RECIPES", {"enclap-base": recipe})
    code = main(["models", "fetch", "enclap-base", "--dir", str(tmp_path), "--accept-licences"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    first = recipe.artefacts[0].url(f"http://127.0.0.1:{port}")
    assert first in err[0] and "cannot download" in err[0] and "import-enclap" in err[0]


def test_without_a_terminal_the_licences_must_be_accepted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code = main(["models", "fetch", "enclap-base", "--dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "CC0-1.0" in captured.out  # printed first
    assert "--accept-licences" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_refused_licences_download_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not accepted"):
        fetch_bundle(ENCLAP_BASE, directory=tmp_path, confirm=lambda q: False,
                     say=lambda line: None)
    assert not any(tmp_path.iterdir())


def test_not_enough_space_is_refused_before_downloading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streamcap.models.fetch._free_bytes", lambda d: 10**9)
    with pytest.raises(ModelError, match=r"GB needed, 1\.00 GB free") as info:
        fetch_bundle(ENCLAP_BASE, directory=tmp_path, accept_licences=True,
                     say=lambda line: None)
    assert str(tmp_path) in str(info.value)


def test_url_artefact_resumes_a_partial_file(host: Host, tmp_path: Path) -> None:
    from streamcap.models.fetch import _url_download

    data = bytes(range(256)) * 400
    for path in ("/owner/repo/releases/download/v1.0/weights.pth",
                 "/records/1234567/files/weights.pth"):  # GitHub-like, Zenodo-like
        host.serve(path, data)
        artefact = Artefact(name="test/w", kind="url", repo=host.url + path,
                            filename="weights.pth", size=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), licence="MIT",
                            licence_url="https://example.invalid/licence")
        target = tmp_path / path.split("/")[1]
        target.mkdir()
        (target / "weights.pth.part").write_bytes(data[:1000])  # an interrupted run
        got = _url_download(artefact, target, "test")
        assert got.read_bytes() == data and not (target / "weights.pth.part").exists()
        assert host.requests[-1] == ("GET", path, "bytes=1000-")
    with pytest.raises(ModelError, match="HTTP 404"):
        _url_download(dataclasses.replace(artefact, repo=host.url + "/missing.pth"),
                      tmp_path / "x", "test")


def test_expected_hash_order_and_space_arithmetic() -> None:
    a = ENCLAP_BASE.parts["checkpoint"][1]
    lfs = "ab" * 32
    assert expected_sha256(a, {a.name: "cd" * 32}, f'"{lfs}"') == lfs
    assert expected_sha256(a, {a.name: "cd" * 32}, '"' + "1" * 40 + '"') == "cd" * 32
    assert expected_sha256(a, {}, None) is None
    published = dataclasses.replace(a, sha256="ef" * 32)
    assert expected_sha256(published, {a.name: "cd" * 32}, f'"{lfs}"') == "ef" * 32
    full = space_needed(ENCLAP_BASE, {})
    assert full == ENCLAP_BASE.download_size + ENCLAP_BASE.bundle_size
    assert space_needed(ENCLAP_BASE, {a.name: a.size}) == full - a.size
    text = licence_text(ENCLAP_BASE)
    assert "lukewys/laion_clap: CC0-1.0" in text and "facebook/bart-base" in text
