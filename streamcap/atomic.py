"""Replacing a file whole: readers see the old content or the new, never a part.

The content goes to a temporary file of a unique name in the same folder (so two
writers at once never share one), is flushed to disk, and is renamed over the file;
the folder is synced too, so that the rename survives a crash. For the state files of
the trigger package (run-time definitions, learned histories, calibrated thresholds),
the history's vector index and trigger event clips.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def replacing(path: Path, *, mode: int | None = None,
              folder_mode: int = 0o777) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` when the
    block ends without an error, and is removed otherwise.

    Args:
        mode: the new file's permissions (None: the temporary file's, 0600).
        folder_mode: the permissions of the folder if it has to be made.

    Raises:
        OSError: the folder cannot be made, or the file cannot be written or renamed
            (no temporary file is left behind).
    """
    path.parent.mkdir(mode=folder_mode, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
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


def replace_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), creating its folder if needed.

    Raises:
        OSError: the folder cannot be made, or the file cannot be written or renamed
            (no temporary file is left behind).
    """
    with replacing(path) as fh:
        fh.write(text.encode("utf-8"))
