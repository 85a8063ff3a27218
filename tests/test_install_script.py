"""scripts/install.sh and its apt helper, run for real (as root, against this machine's apt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DPKG_FRONTEND_LOCK = Path("/var/lib/dpkg/lock-frontend")

needs_root_apt = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None or not DPKG_FRONTEND_LOCK.exists(),
    reason="needs root and Debian's apt",
)

# Holds dpkg's frontend lock (the fcntl lock apt and dpkg take) for a few seconds,
# as a concurrent unattended-upgrades or a second install would.
_HOLDER = textwrap.dedent("""
    import fcntl, sys, time
    with open(sys.argv[1], "w") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _apt_get(*args: str, wait_s: int) -> subprocess.CompletedProcess[str]:
    script = f'source scripts/apt.sh && apt_get {" ".join(args)}'
    env = {**os.environ, "APT_LOCK_WAIT_S": str(wait_s)}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=wait_s + 120, check=False)


@needs_root_apt
def test_apt_waits_for_a_held_lock_instead_of_failing() -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(DPKG_FRONTEND_LOCK), "4"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        # coreutils is installed on every Debian: nothing changes, but apt takes its locks
        done = _apt_get("install", "-y", "-qq", "--no-install-recommends", "coreutils",
                        wait_s=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 0, done.stdout + done.stderr


@needs_root_apt
def test_apt_gives_up_after_its_wait_with_apts_message() -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(DPKG_FRONTEND_LOCK), "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        done = _apt_get("install", "-y", "-qq", "coreutils", wait_s=1)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    assert "lock" in done.stderr.lower()


def test_install_refuses_an_unknown_option() -> None:
    done = subprocess.run(["bash", "scripts/install.sh", "--tset"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--tset" in done.stderr
