"""Shared pytest fixtures.

Every wait here is ``scaled()`` by the test time factor (``STREAMCAP_TEST_TIME_FACTOR``,
see ``timing.py``); test modules import ``scaled`` from ``timing`` for theirs.

Sections: child processes (no test module may leave one running); loopback
ports; ffmpeg (tone files, loopback senders); PulseAudio null sink (a real
PortAudio device without a sound card).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from processes import become_subreaper, keep_for_session, leaked_since, live_children, stop_leaked
from timing import TIME_FACTOR, scaled

# --------------------------------------------------------------------------- child processes


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    become_subreaper()
    # pytest-timeout's per-test limit from pyproject.toml is a wait too: scale it
    # (before pytest-timeout reads it), unless --timeout or PYTEST_TIMEOUT set one.
    ini = config.getini("timeout") if hasattr(config.option, "timeout") else None
    if TIME_FACTOR != 1 and ini and config.option.timeout is None \
            and not os.environ.get("PYTEST_TIMEOUT"):
        config.option.timeout = scaled(float(ini))


@pytest.fixture(scope="module", autouse=True)
def no_leaked_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the module if any process started during it is still running after it.

    Module-scoped and autouse, so it is set up before and torn down after every
    other fixture of the module: what is left then was never stopped.
    """
    before = set(live_children())
    yield
    stuck = stop_leaked(leaked_since(before))
    if stuck:
        listing = "; ".join(f"pid {pid}: {cmd}" for pid, cmd in sorted(stuck.items()))
        pytest.fail(f"{request.node.nodeid} left processes running (now killed): {listing}",
                    pytrace=False)


# --------------------------------------------------------------------------- ports


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).

    Args:
        kind: ``"tcp"`` or ``"udp"``.
    """
    sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, sock_type) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_tcp_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port("tcp")


@pytest.fixture
def free_udp_port() -> int:
    """A free UDP port on 127.0.0.1."""
    return free_port("udp")


# --------------------------------------------------------------------------- ffmpeg


def ffmpeg_path() -> str | None:
    """The ffmpeg executable on PATH, or None."""
    return shutil.which("ffmpeg")


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    """Path of the ffmpeg executable; skips the test if ffmpeg is not installed."""
    path = ffmpeg_path()
    if path is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg)")
    return path


def make_tone_file(
    path: Path,
    *,
    frequency_hz: float = 440.0,
    duration_s: float = 1.0,
    sample_rate_hz: int = 48000,
    channels: int = 1,
    extra_args: tuple[str, ...] = (),
) -> Path:
    """Write a sine tone with real ffmpeg; the codec follows the file name's suffix.

    Raises:
        RuntimeError: ffmpeg is missing or failed (its stderr is in the message).
    """
    exe = ffmpeg_path()
    if exe is None:
        raise RuntimeError("ffmpeg is not installed")
    args = [
        exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi",
        "-i", f"sine=frequency={frequency_hz}:sample_rate={sample_rate_hz}:duration={duration_s}",
        "-ac", str(channels), *extra_args, str(path),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=scaled(60), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {done.stderr.strip()}")
    return path


@pytest.fixture
def children() -> Callable[[str], list[int]]:
    """Live child processes by executable name, for tests checking that none leaked."""
    return lambda name: sorted(live_children(name))


@pytest.fixture
def tone_file(ffmpeg: str, tmp_path: Path) -> Callable[..., Path]:
    """``tone_file(name, **kw)`` writes :func:`make_tone_file` output under ``tmp_path``."""

    def make(name: str, **kwargs: Any) -> Path:
        return make_tone_file(tmp_path / name, **kwargs)

    return make


@dataclass
class ToneSender:
    """A real ffmpeg sending a live sine tone (``-re``) as MPEG-TS to a loopback URL."""

    url: str
    frequency_hz: float = 440.0
    sample_rate_hz: int = 48000
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        exe = ffmpeg_path()
        if exe is None:
            raise RuntimeError("ffmpeg is not installed")
        self.stop()
        self.proc = subprocess.Popen(
            [
                exe,
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-re",
                "-f",
                "lavfi",
                "-i",
                f"sine=frequency={self.frequency_hz}:sample_rate={self.sample_rate_hz}",
                "-f",
                "mpegts",
                self.url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=scaled(10))


@pytest.fixture
def tone_sender(ffmpeg: str) -> Iterator[Callable[..., ToneSender]]:
    """``tone_sender(url=..., frequency_hz=...)`` makes a :class:`ToneSender` (not started);
    every sender made is stopped after the test."""
    made: list[ToneSender] = []

    def make(**kwargs: Any) -> ToneSender:
        sender = ToneSender(**kwargs)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        sender.stop()


# --------------------------------------------------------------------------- PulseAudio


@dataclass(frozen=True)
class PulseServer:
    """A private PulseAudio server with one null sink.

    Attributes:
        runtime_dir: Its XDG_RUNTIME_DIR (socket at ``<runtime_dir>/pulse/native``).
        sink: Name of the null sink (play into it).
        monitor: Name of the sink's monitor source (the default source: record from it).
        sample_rate_hz: The sink's rate.
        env: Environment for client subprocesses (paplay, ffmpeg -f pulse).
    """

    runtime_dir: Path
    sink: str
    monitor: str
    sample_rate_hz: int
    env: dict[str, str]


def _pactl_ok(env: dict[str, str]) -> bool:
    done = subprocess.run(["pactl", "info"], env=env, capture_output=True, timeout=scaled(5),
                          check=False)
    return done.returncode == 0


@pytest.fixture(scope="session")
def pulse() -> Iterator[PulseServer]:
    """Start PulseAudio with a null sink on a private runtime dir; kill it after the session.

    The test process's environment points at it (XDG_RUNTIME_DIR, PULSE_SERVER)
    while it runs, and PortAudio is re-initialised so that its ALSA ``pulse``
    and ``default`` devices appear. Skips only if the pulseaudio binary is absent.
    """
    exe = shutil.which("pulseaudio")
    if exe is None:
        pytest.skip(
            "pulseaudio is not installed (apt-get install pulseaudio pulseaudio-utils "
            "libasound2-plugins)"
        )
    runtime_dir = Path(tempfile.mkdtemp(prefix="streamcap-pulse-"))
    runtime_dir.chmod(0o700)
    home = runtime_dir / "home"
    home.mkdir()
    sink, rate = "streamcap_test", 48000
    env = dict(os.environ)
    env.update(
        XDG_RUNTIME_DIR=str(runtime_dir),
        PULSE_SERVER=f"unix:{runtime_dir}/pulse/native",
        HOME=str(home),
    )
    log = (runtime_dir / "pulseaudio.log").open("wb")
    proc = subprocess.Popen(
        [
            exe,
            "--daemonize=no",
            "--exit-idle-time=-1",
            "-n",
            "--disallow-exit",
            "--log-target=stderr",
            "--load=module-native-protocol-unix auth-anonymous=1",
            f"--load=module-null-sink sink_name={sink} rate={rate} channels=1",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    keep_for_session(proc.pid)
    saved = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "PULSE_SERVER")}
    try:
        deadline = time.monotonic() + scaled(15)
        while not _pactl_ok(env):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                text = (runtime_dir / "pulseaudio.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pulseaudio did not start (exit {proc.poll()}): {text}")
            time.sleep(0.1)
        subprocess.run(
            ["pactl", "set-default-source", f"{sink}.monitor"], env=env, check=True, timeout=scaled(5)
        )
        subprocess.run(["pactl", "set-default-sink", sink], env=env, check=True,
                       timeout=scaled(5))
        os.environ["XDG_RUNTIME_DIR"] = env["XDG_RUNTIME_DIR"]
        os.environ["PULSE_SERVER"] = env["PULSE_SERVER"]
        _refresh_portaudio()
        yield PulseServer(
            runtime_dir=runtime_dir,
            sink=sink,
            monitor=f"{sink}.monitor",
            sample_rate_hz=rate,
            env=env,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=scaled(10))
        log.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
        _refresh_portaudio()


def _refresh_portaudio() -> None:
    try:
        from streamcap.sources.devices import refresh_portaudio
    except ImportError:
        return
    refresh_portaudio()
