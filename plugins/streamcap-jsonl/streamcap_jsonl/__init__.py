"""streamcap-jsonl: an example streamcap sink plugin writing JSON lines.

Every message the bus delivers (caption, embedding, status) is appended to
a file as one ``streamcap.v1`` frame per line, flushed line by line, so that
``tail -f`` and log shippers see each caption as soon as it is published.

Enable it in the daemon's config::

    [sinks.archive]
    plugin = "jsonl"
    path = "captions.jsonl"        # relative paths live in the sink's state directory
    accepts = ["caption", "status"]  # optional; default: all three kinds
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import SinkContext, read_sink_options
from streamcap.bus.wire import encode, to_wire
from streamcap.errors import InboxClosed
from streamcap.options import option

__all__ = ["JsonlOptions", "JsonlSink", "create_sink"]
__version__ = "0.1.0"



@dataclass(frozen=True, slots=True, kw_only=True)
class JsonlOptions:
    """The ``[sinks.<instance>]`` options of a ``jsonl`` sink (``accepts`` and
    ``queue_size`` are the bus's: known without being declared here)."""

    path: Path = option(Path(), required=True, non_empty=True,
                        help="the file to append to; a relative path lives in the sink's "
                             "state directory")


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", newline="\n")


def _write_lines(fh: IO[str], lines: list[str]) -> None:
    for line in lines:
        fh.write(line)
        fh.flush()


class JsonlSink:
    """Appends one JSON frame per line to a file.

    Args:
        path: The file; a relative path is resolved in ``ctx.state_dir`` when
            the sink runs. Parent directories are created.
    """

    accepts: frozenset[str] = frozenset({"caption", "embedding", "status"})

    def __init__(self, path: Path) -> None:
        self.path = path

    def resolve(self, ctx: SinkContext) -> Path:
        """The file this sink writes for ``ctx``."""
        return self.path if self.path.is_absolute() else ctx.state_dir / self.path

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        """Write every message until the inbox closes; file I/O runs off the event loop."""
        path = self.resolve(ctx)
        fh = await asyncio.to_thread(_open, path)
        try:
            ctx.logger.info("jsonl sink writing", path=str(path))
            ctx.ready()
            while True:
                try:
                    first = await inbox.get()
                except InboxClosed:
                    return
                batch = [first]
                while (more := inbox.get_nowait()) is not None:
                    batch.append(more)
                lines = [encode(to_wire(m, node_id=ctx.node_id)) + "\n" for m in batch]
                await asyncio.to_thread(_write_lines, fh, lines)
        finally:
            fh.close()


def create_sink(instance: str, options: Mapping[str, object]) -> JsonlSink:
    """The ``streamcap.sinks`` entry point ``jsonl``.

    Args:
        instance: The ``[sinks.<instance>]`` table name.
        options: The table without ``plugin``: ``path`` (a string), and
            possibly ``accepts``, which the bus validates and applies.

    Raises:
        ConfigError: Naming ``sinks.<instance>.<key>`` for every problem (from
            the options reader, in the same words as every streamcap table).
    """
    parsed = read_sink_options(JsonlOptions, instance, options).result()
    return JsonlSink(parsed.path.expanduser())
