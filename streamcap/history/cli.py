"""``streamcap search``: search the history from the command line (docs/search.md).

The store is opened read-only where the daemon keeps it (``[history] path``,
by default ``<state_dir>/history/history.sqlite3``); a daemon may be writing it
meanwhile. Only what embeds the query's text is loaded: a bundle's retriever
weights and text tokenizer (the codec and the captioner are not read), or, for a
preset (random weights), its whole set of components, as the daemon builds them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from streamcap.config import Config
from streamcap.errors import ConfigError, HistoryError
from streamcap.history.options import DEFAULT_FILE, history_path
from streamcap.history.records import SearchHit, Span
from streamcap.history.search import DEFAULT_LIMIT, MAX_LIMIT, check_query, parse_when
from streamcap.history.store import HistoryStore
from streamcap.messages import Float32Array

__all__ = ["DEFAULT_FILE", "add_parser", "history_path", "open_history_reader",
           "search_command", "text_embedder"]

TextEmbedder = Callable[[str], Float32Array]


def add_parser(sub: Any) -> None:
    """Add ``search`` to the ``streamcap`` subcommands."""
    search = sub.add_parser("search", help="search the captions heard so far (the history)")
    search.add_argument("query", metavar="QUERY", help="what to look for, in words")
    search.add_argument("--config", type=Path,
                        help="config file (default: ./config.toml if present)")
    search.add_argument("--source", action="append", default=[], metavar="S",
                        help="only this source (repeat for more)")
    search.add_argument("--since", metavar="T", help="from: 2h, 30m, 7d (ago), ISO 8601 "
                        "with a zone, or UNIX seconds")
    search.add_argument("--until", metavar="T", help="until (same forms as --since)")
    search.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                        help=f"hits at most (1..{MAX_LIMIT}, default {DEFAULT_LIMIT})")
    search.add_argument("--json", action="store_true", help="print one JSON object per hit")
    search.add_argument("--model", help="bundle directory or preset name whose retriever "
                        "embeds the query (default: [model] bundle)")


def open_history_reader(config: Config) -> HistoryStore:
    """The configured store, opened read-only.

    Raises:
        HistoryError: naming the path: no store there yet, or it cannot be read.
    """
    path = history_path(config)
    if not path.exists():
        raise HistoryError(f"{path}: no history here yet (the daemon writes it while it runs "
                           "with [history] enabled; see --config)")
    from streamcap.history.sqlite import SqliteHistory

    # Without quick_check, as the daemon's readers: it reads the whole file (the daemon
    # checks the store when it opens it); a damaged page is still an error when read.
    return SqliteHistory(path, read_only=True, check=False)


def _load_config(path: Path | None) -> tuple[Config, bool]:
    """The config file's settings (``--config``, else ./config.toml), else the defaults;
    and whether a file was read."""
    from streamcap.config import default_config, load_config

    if path is None and Path("config.toml").exists():
        path = Path("config.toml")
    if path is None:
        return default_config("file:-"), False
    return load_config(path), True


def text_embedder(spec: str) -> tuple[str, TextEmbedder | None]:
    """The model id of ``spec`` (``--model``) and its retriever's text embedding
    (None when the model has no retriever: the search then ranks by text alone).

    Raises:
        ModelError, WeightsError: the bundle cannot be read.
    """
    import torch

    from streamcap.models.bundle.components import DEMO_MODEL, demo_bundle_path, open_components
    from streamcap.models.bundle.manifest import load_bundle, resolve_model, sha256_file

    torch.set_num_threads(1)
    path: Path | None = demo_bundle_path() if spec == DEMO_MODEL else None
    if path is None:
        resolved = resolve_model(spec)
        path = resolved.bundle_path
    if path is None:  # a preset: random weights, built as the daemon builds them
        components = open_components(spec)
        retriever, tokenizer, model_id = (components.retriever, components.text_tokenizer,
                                          components.model_id)
    else:
        from streamcap.errors import WeightsError
        from streamcap.models.bundle.weights import check_state
        from streamcap.models.enclap.tokenizer import load_tokenizer
        from streamcap.models.retrieval.retriever import AudioTextRetriever, RetrieverConfig

        bundle = load_bundle(path, verify=False)  # only the files read below are hashed
        model_id = bundle.model_id
        if "retriever" not in bundle.component_configs:
            return model_id, None
        weights = bundle.weights_path("retriever")
        files = bundle.manifest["files"]
        text_dir = bundle.tokenizer_dirs.get("text", bundle.tokenizer_dirs["caption"])
        for rel, expected in files.items():
            file = path / rel
            if (file == weights or file.parent == text_dir) and sha256_file(file) != expected:
                raise WeightsError(f"{file}: sha256 mismatch: expected {expected}; the file "
                                   "is corrupt or was changed after the bundle was written")
        retriever = AudioTextRetriever(RetrieverConfig.from_dict(
            bundle.component_configs["retriever"]))
        state = bundle.load_weights("retriever")
        check_state(retriever.state_dict(), state,
                    f"{weights}: weights do not fit the 'retriever' configuration")
        retriever.load_state_dict(state)
        retriever.eval()
        tokenizer = load_tokenizer(text_dir)
    if retriever is None:
        return model_id, None
    model = retriever

    @torch.inference_mode()
    def embed(text: str) -> Float32Array:
        from streamcap.models.captioner import TEXT_MAX_LENGTH

        enc = tokenizer([text], padding=True, truncation=True, max_length=TEXT_MAX_LENGTH,
                        return_tensors="pt")
        joint = model.embed_text(enc["input_ids"], enc["attention_mask"])
        vector: Float32Array = torch.nn.functional.normalize(joint.float(), dim=-1)[0].numpy()
        return vector.astype(np.float32)

    return model_id, embed


def _local(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def print_table(hits: list[SearchHit], out: TextIO) -> None:
    """The hits as a table: local time range, source, score, captions."""
    if not hits:
        print("no matches", file=out)
        return
    for hit in hits:
        start = _local(hit.start_at)
        end = _local(hit.end_at)
        same_day = start[:10] == end[:10]
        span = f"{start} - {end[11:] if same_day else end}"
        captions = " | ".join(hit.captions)
        print(f"{span}  {hit.source_id}  {hit.score:6.3f}  {captions}", file=out)


def search_command(args: argparse.Namespace,
                   open_reader: Callable[[Config], HistoryStore] | None = None) -> int:
    """``streamcap search``; returns the exit code (0, also when nothing matched).

    Raises:
        ConfigError: a bad option, or the store cannot be opened or read (exit 2).
    """
    from streamcap.history.search import run_search

    query = check_query(args.query, name="QUERY")
    if not 1 <= args.limit <= MAX_LIMIT:
        raise ConfigError(f"--limit: expected an integer from 1 to {MAX_LIMIT} "
                          f"(got {args.limit})")
    now = time.time()
    since = None if args.since is None else parse_when(args.since, now, name="--since")
    until = None if args.until is None else parse_when(args.until, now, name="--until")
    if since is not None and until is not None and until <= since:
        raise ConfigError("--until: must be later than --since")
    config, from_file = _load_config(args.config)
    unknown = [s for s in args.source if s not in config.sources]
    if unknown and from_file:
        raise ConfigError(f"--source: unknown source {unknown[0]!r} "
                          f"(known: {', '.join(sorted(config.sources))})")
    span = Span(sources=tuple(dict.fromkeys(args.source)), since=since, until=until)
    try:
        store = (open_reader or open_history_reader)(config)
        try:
            model_id, embed = text_embedder(args.model or config.model.bundle)
            hits = run_search(store, embed, model_id, query, span, args.limit)
        finally:
            store.close()
    except HistoryError as exc:  # no store, or one that cannot be read: exit 2, one line
        raise ConfigError(str(exc)) from None
    if args.json:  # the fields of /api/search's hits
        from streamcap.history.api import hit_view

        for hit in hits:
            print(json.dumps(hit_view(hit), ensure_ascii=False))
    else:
        print_table(hits, sys.stdout)
    return 0
