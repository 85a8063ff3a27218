"""``[history]``: where the history store is, how long it keeps what, and what happens
when it cannot be used (docs/history.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from streamcap.options import option

if TYPE_CHECKING:
    from streamcap.config import Config

MIB: Final = 1024 * 1024
DEFAULT_MAX_BYTES: Final = 2 * 1024 * MIB
MAX_KEEP_DAYS: Final = 36500.0
MAX_BYTES_LIMIT: Final = 2 ** 50  # 1 PiB
DEFAULT_FILE: Final = Path("history") / "history.sqlite3"
"""Where the store is, under the state directory, when ``[history] path`` is empty."""


def _path(v: str) -> str | None:
    return "must not contain a NUL character" if "\x00" in v else None


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryOptions:
    enabled: bool = option(True, help="keep a history of every captioned window and "
                                      "trigger event")
    path: str = option("", check=_path,
                       help='the SQLite file; "" = <state_dir>/history/history.sqlite3')
    keep_days: float = option(30.0, above=0, max=MAX_KEEP_DAYS,
                              help="records older than this many days are deleted")
    max_bytes: int = option(DEFAULT_MAX_BYTES, min=MIB, max=MAX_BYTES_LIMIT,
                            help="then the oldest go until the database's pages in use + "
                                 "clips fit")
    required: bool = option(False, help="true: exit (status 2) when the store cannot be "
                                        "opened; false: log it and caption without history")
    queue_size: int = option(1000, min=1, max=1_000_000,
                             help="records waiting to be written; the oldest is dropped "
                                  "beyond")
    retention_interval_s: float = option(60.0, above=0, max=86400.0,
                                         help="how often the retention limits are applied")


def history_path(config: Config) -> Path:
    """The store's file: ``[history] path``, else :data:`DEFAULT_FILE` in the state
    directory (the daemon writes it there; ``streamcap search`` reads it there)."""
    from streamcap.daemon import state_root

    if config.history.path:
        return Path(config.history.path).expanduser()
    return state_root(config) / DEFAULT_FILE
