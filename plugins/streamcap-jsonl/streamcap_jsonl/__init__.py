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
from pathlib import Path
from typing import IO, Final

from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import SinkContext
from streamcap.bus.wire import encode, to_wire
from streamcap.errors import ConfigError, InboxClosed

__all__ = ["JsonlSink", "create_sink"]
__version__ = "0.1.0"

OPTIONS: Final = frozenset({"path"})
BUS_OPTIONS: Final = frozenset({"accepts", "queue_size"})  # validated and applied by the bus


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
        ConfigError: Naming ``sinks.<instance>.<key>`` for every problem.
    """
    problems = [f"sinks.{instance}.{key}: unknown option (the jsonl sink takes: "
                f"{', '.join(sorted(OPTIONS))}, plus accepts and queue_size)"
                for key in sorted(set(options) - OPTIONS - BUS_OPTIONS)]
    raw = options.get("path")
    path: Path | None = None
    if raw is None:
        problems.append(f"sinks.{instance}.path: required; expected the file to append to")
    elif not isinstance(raw, str) or not raw.strip():
        problems.append(f"sinks.{instance}.path: expected a non-empty string, got {raw!r}")
    else:
        path = Path(raw).expanduser()
    if problems or path is None:
        raise ConfigError(problems)
    return JsonlSink(path)
