"""Replacing a small file whole: readers see the old content or the new, never a part.

The text goes to a temporary file of a unique name in the same folder (so two writers
at once never share one), is flushed to disk, and is renamed over the file; the folder
is synced too, so that the rename survives a crash. For the state files of the trigger
package (run-time definitions, learned histories, calibrated thresholds).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), creating its folder if needed.

    Raises:
        OSError: the folder cannot be made, or the file cannot be written or renamed
            (no temporary file is left behind).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
