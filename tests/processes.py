"""Child processes of the test run: find them, and fail a module that leaves any running.

Every fixture that starts a process (mosquitto, the daemon, ffmpeg senders,
PulseAudio, Chromium) must stop it, also when its test fails or times out.
``conftest.py`` enforces that: the pytest process is made a *child subreaper*,
so that a grandchild orphaned by a killed child is re-parented to pytest
instead of init and stays visible; after each test module, every live child
that was not there before the module and was not registered as session-wide
(:func:`keep_for_session`) is killed and reported as an error.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterable

_PR_SET_CHILD_SUBREAPER = 36
_session_pids: set[int] = set()


def become_subreaper() -> bool:
    """Re-parent orphaned descendants to this process (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def live_children(name: str | None = None) -> dict[int, str]:
    """This process's live (not zombie) children: pid -> command line.

    Args:
        name: only children whose executable name (``comm``) is this.
    """
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(entry)
        if stat is None or stat[1] != me or stat[0] == "Z":
            continue
        if name is not None and _read(f"/proc/{entry}/comm") != name:
            continue
        found[int(entry)] = _read(f"/proc/{entry}/cmdline")[:200]
    return found


def keep_for_session(pid: int) -> None:
    """Mark a process started by a session-wide fixture: it may outlive a module."""
    _session_pids.add(pid)


def leaked_since(before: Iterable[int]) -> dict[int, str]:
    """Live children that are neither in ``before`` nor session-wide."""
    old = set(before) | _session_pids
    return {pid: cmd for pid, cmd in live_children().items() if pid not in old}


def stop_leaked(leaked: dict[int, str], grace_s: float = 5.0) -> dict[int, str]:
    """Give ``leaked`` processes ``grace_s`` to exit (one being stopped may still be
    on its way out), SIGKILL those still alive and return them."""
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in leaked) and time.monotonic() < deadline:
        time.sleep(0.1)
    stuck = {pid: cmd for pid, cmd in leaked.items() if _alive(pid)}
    for pid in stuck:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stuck


def _alive(pid: int) -> bool:
    stat = _stat(str(pid))
    return stat is not None and stat[0] != "Z"
