"""A real mosquitto broker for tests: start, stop, restart, with persistence and optional passwords.

Use it from a test module with ``from mosquitto import Mosquitto, mosquitto_sub`` (pytest puts
``tests/`` on ``sys.path``) or through the ``broker`` fixture factory defined here::

    broker = Mosquitto(workdir=tmp_path / "broker")
    broker.start()          # listener on 127.0.0.1:<free port>, persistence on
    broker.stop()           # SIGTERM: mosquitto saves its persistent sessions
    broker.start()          # same port, sessions and retained messages restored
    broker.close()          # stop for good

The binaries are found on PATH or in /usr/sbin (Debian's mosquitto package).
Tests skip when mosquitto is missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from timing import scaled


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def mosquitto_path() -> str | None:
    """The mosquitto broker executable, or None."""
    return _which("mosquitto")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mosquitto:
    """One mosquitto process listening on 127.0.0.1.

    Attributes:
        workdir: Holds the config, the persistence database and the log.
        port: The listener port (a free one by default; kept across restarts).
        users: ``{username: password}``; when given, anonymous clients are refused.
    """

    workdir: Path
    port: int = field(default_factory=_free_port)
    users: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        persist = self.workdir / "persist"
        persist.mkdir(exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            # as root, mosquitto would switch to user "mosquitto", which cannot read the
            # private pytest directory: stay the current user
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence true",
            f"persistence_location {persist}/",
            "autosave_interval 1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if self.users:
            exe = _which("mosquitto_passwd")
            if exe is None:
                raise RuntimeError("mosquitto_passwd is not installed")
            pwfile = self.workdir / "passwd"
            pwfile.unlink(missing_ok=True)
            for i, (user, password) in enumerate(self.users.items()):
                args = [exe, "-b"] + (["-c"] if i == 0 else []) + [str(pwfile), user, password]
                subprocess.run(args, check=True, capture_output=True, timeout=scaled(30))
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = scaled(20.0)) -> None:
        """Start the broker and wait until its port accepts connections.

        Raises:
            RuntimeError: mosquitto is missing, exited, or never listened (its log is quoted).
        """
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed")
        if self.proc is not None:
            raise RuntimeError("mosquitto is already running")
        conf = self._config()
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start: {self.log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port),
                                                                        timeout=0.5):
                return
            time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError(f"mosquitto did not listen on port {self.port}: "
                           f"{self.log_path.read_text()}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (sessions saved to disk) or SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=scaled(15))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=scaled(15))

    def close(self) -> None:
        """Stop for good."""
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def mosquitto_sub(broker: Mosquitto, topic: str, *, count: int = 1, wait_s: float = scaled(10.0),
                  extra: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Run the real ``mosquitto_sub`` until ``count`` messages (or ``wait_s``) and return them.

    Returns:
        ``(topic, payload)`` pairs in arrival order (retained messages included).
    """
    exe = _which("mosquitto_sub")
    if exe is None:
        raise RuntimeError("mosquitto_sub is not installed")
    args = [exe, "-h", broker.host, "-p", str(broker.port), "-t", topic, "-v",
            "-C", str(count), "-W", str(max(1, int(wait_s))), *extra]
    done = subprocess.run(args, capture_output=True, timeout=wait_s + scaled(15), check=False)
    out: list[tuple[str, str]] = []
    for line in done.stdout.decode().splitlines():
        t, _, payload = line.partition(" ")
        out.append((t, payload))
    return out


def start_mosquitto_sub(broker: Mosquitto, topic: str, *, out: Path,
                        extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Start ``mosquitto_sub -v`` in the background, writing ``topic payload`` lines to ``out``."""
    exe = _which("mosquitto_sub")
    if exe is None:
        raise RuntimeError("mosquitto_sub is not installed")
    fh = out.open("wb")
    try:
        return subprocess.Popen(
            [exe, "-h", broker.host, "-p", str(broker.port), "-t", topic, "-v", *extra],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.DEVNULL,
        )
    finally:
        fh.close()


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., Mosquitto]]:
    """Makes :class:`Mosquitto` brokers (skips without mosquitto); each is killed after the test,
    whether it passed, failed or timed out."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")
    made: list[Mosquitto] = []

    def make(**kwargs: Any) -> Mosquitto:
        broker = Mosquitto(**kwargs)
        made.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in made:
            broker.stop(kill=True)


@pytest.fixture
def broker(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> Mosquitto:
    """A running anonymous mosquitto with persistence, on a free loopback port."""
    b = broker_factory(workdir=tmp_path / "mosquitto")
    b.start()
    return b


__all__ = ["Mosquitto", "broker", "broker_factory", "mosquitto_path", "mosquitto_sub",
           "start_mosquitto_sub"]
