"""``streamcap search``: the real ``python -m streamcap search`` in a subprocess against a
real store (``SqliteHistory`` at ``<state>/history/history.sqlite3``), and its table
in-process on the same store.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from history_fakes import window
from timing import scaled

from streamcap.config import Config
from streamcap.errors import HistoryError
from streamcap.history import cli as history_cli
from streamcap.history.cli import DEFAULT_FILE, print_table, search_command, text_embedder
from streamcap.history.sqlite import SqliteHistory
from streamcap.history.store import HistoryStore

TESTS = Path(__file__).parent
ROOT = TESTS.parent
QUERY = "a dog is barking"


@pytest.fixture(scope="module")
def demo() -> tuple[str, np.ndarray, np.ndarray]:
    """The demo bundle's model id and the text embeddings of QUERY and of another text."""
    model, embed = text_embedder("demo")
    assert embed is not None
    return model, embed(QUERY), embed("rain falls on the roof")


def setup_store(tmp: Path, demo: tuple[str, np.ndarray, np.ndarray]) -> tuple[Path, Path]:
    """A config naming the state directory, and the store the daemon would have written there."""
    model, dog, rain = demo
    state = tmp / "state"
    config = tmp / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n\n[model]\nbundle = "demo"\n\n'
                      '[sources.porch]\nuri = "file:/dev/null"\n\n'
                      '[sources.kitchen]\nuri = "file:/dev/null"\n')
    now = time.time()
    path = state / DEFAULT_FILE
    store = SqliteHistory(path)
    store.write([
        window("porch", now - 3600, "rain", vector=rain, model=model),
        window("porch", now - 1200, "a dog barks", vector=dog, model=model),
        window("porch", now - 1190, "a dog barks twice", vector=dog * 0.9 + rain * 0.1,
               model=model),
        window("kitchen", now - 600, "a kettle whistles", vector=rain, model=model),
        window("kitchen", now - 4 * 86400, "a dog barks", vector=dog, model=model),
        window("porch", now - 300, "a dog barks", vector=[1.0, 0.0], model="old-model"),
    ])
    store.close()
    return config, path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "streamcap", "search", *args],
                          capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=scaled(180), check=False)


def test_search_prints_hits_as_json_lines(tmp_path: Path,
                                          demo: tuple[str, np.ndarray, np.ndarray]) -> None:
    config, _ = setup_store(tmp_path, demo)
    done = run_cli(QUERY, "--config", str(config), "--json", "--since", "2d",
                   "--source", "porch")
    assert done.returncode == 0, done.stderr
    hits = [json.loads(line) for line in done.stdout.splitlines()]
    first = hits[0]
    assert first["captions"] == ["a dog barks", "a dog barks twice"]
    # the same retriever; the store keeps the embedding as int8 (a cosine within 1e-3)
    assert first["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert first["model"] == demo[0] and first["end_at"] - first["start_at"] == 20
    assert {h["source_id"] for h in hits} == {"porch"}
    old = next(h for h in hits if h["model"] == "old-model")  # no comparable embedding
    assert old["similarity"] is None and old["text_match"] > 0
    assert "Traceback" not in done.stderr


def test_search_prints_a_table_with_local_times(tmp_path: Path,
                                                demo: tuple[str, np.ndarray, np.ndarray],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config, path = setup_store(tmp_path, demo)
    args = argparse.Namespace(query=QUERY, config=config, source=[], since=None, until=None,
                              limit=2, json=False, model=None)
    readers: list[HistoryStore] = []

    def open_reader(config: Config) -> HistoryStore:
        readers.append(history_cli.open_history_reader(config))
        assert readers[-1].location == str(path)
        return readers[-1]

    assert search_command(args, open_reader=open_reader) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert " porch " in lines[0] and lines[0].endswith("a dog barks | a dog barks twice")
    day = time.strftime("%Y-%m-%d", time.localtime(time.time() - 4 * 86400))
    assert lines[1].startswith(day) and " kitchen " in lines[1]
    with pytest.raises(HistoryError, match="closed"):  # the command closed its reader
        readers[-1].stats()
    out = io.StringIO()
    print_table([], out)
    assert out.getvalue() == "no matches\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "yesterday"], "--since: expected a time ago"),
    (["--until", "2024-05-01T10:00"], "--until: has no time zone"),
    (["--since", "1h", "--until", "2h"], "--until: must be later than --since"),
    (["--limit", "0"], "--limit: expected an integer from 1 to 100"),
    (["--limit", "101"], "--limit: expected an integer from 1 to 100"),
    (["--source", "attic"], "--source: unknown source 'attic' (known: kitchen, porch)"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                              message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n\n'
                      '[sources.porch]\nuri = "file:/dev/null"\n\n'
                      '[sources.kitchen]\nuri = "file:/dev/null"\n')
    done = run_cli("dog", "--config", str(config), *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"streamcap: error: {message}"), lines
    assert done.stdout == ""


def test_no_store_yet_names_the_path_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    done = run_cli("dog", "--config", str(config))
    assert done.returncode == 2
    path = tmp_path / "state" / DEFAULT_FILE
    assert done.stderr.splitlines() == [
        (f"streamcap: error: {path}: no history here yet (the daemon writes it while it runs "
        "with [history] enabled; see --config)")]


@pytest.mark.parametrize("content", [b"not a database at all",
                                     b"SQLite format 3\x00" + bytes(range(256)) * 64])
def test_an_unreadable_store_names_the_path_and_exits_2(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    path = tmp_path / "state" / DEFAULT_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    done = run_cli("dog", "--config", str(config))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamcap: error: history store ")
    assert str(path) in lines[0] and "Traceback" not in done.stderr


def test_an_empty_query_is_refused(tmp_path: Path) -> None:
    done = run_cli("  ", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "streamcap: error: QUERY: expected the words to search for (got nothing)"]


def test_the_store_path_follows_the_state_directory(tmp_path: Path) -> None:
    from streamcap.config import parse_config

    config = parse_config({"daemon": {"state_dir": str(tmp_path)}})
    assert history_cli.history_path(config) == tmp_path / "history" / "history.sqlite3"
