"""Do a step once per test run, also when pytest-xdist runs the tests in several workers.

A session fixture runs once per *process*: with ``-n 2`` each worker has its own session,
so a session fixture that changes something all workers share (pip-installing a plugin
into the virtual environment, writing a shared file) would run twice, possibly at the
same time. :func:`once_per_run` runs such a step under an exclusive file lock in the
temporary directory the whole run shares, and records that it succeeded there: the first
worker to ask does it while the others wait, and later callers skip it.

Use it from a session fixture::

    @pytest.fixture(scope="session")
    def plugin_installed(tmp_path_factory: pytest.TempPathFactory) -> None:
        once_per_run(tmp_path_factory, "install-plugin", install)
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def run_temp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory of this whole run: shared by all xdist workers.

    Without xdist it is the session's base temporary directory; under xdist each
    worker's base directory (``.../pytest-N/popen-gwK``) lies in the run's one.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str,
                 step: Callable[[], None]) -> bool:
    """Run ``step`` unless it already succeeded in this run (in any worker).

    A step that raises is not recorded: the next caller tries again (and fails with
    its own error). Returns True when this call ran the step.
    """
    root = run_temp_root(tmp_path_factory)
    done = root / f"{name}.done"
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.exists():
            return False
        step()
        done.write_text(f"{os.getpid()}\n")
        return True


__all__ = ["once_per_run", "run_temp_root"]
