"""Shared pytest fixtures.

Every wait here is ``scaled()`` by the test time factor (``STREAMCAP_TEST_TIME_FACTOR``,
see ``timing.py``); test modules import ``scaled`` from ``timing`` for theirs.

Sections: parallel workers (pytest-xdist); child processes (no test module may
leave one running); loopback ports; ffmpeg (tone files, loopback senders);
PulseAudio null sink (a real PortAudio device without a sound card); the example
jsonl plugin.

The suite runs in parallel (``-n auto --dist loadfile`` in pyproject.toml's addopts):
one worker per core, each test file whole on one worker, so that a module-scoped
fixture (one daemon subprocess per module) is set up once. A session fixture runs
once per worker; one that changes something the workers share must go through
``run_once.once_per_run``. ``-n 0`` runs everything in this process (as does a run of
one test file, or ``--pdb``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from processes import become_subreaper, keep_for_session, leaked_since, live_children, stop_leaked
from run_once import once_per_run
from timing import TIME_FACTOR, scaled

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- parallel workers

MAX_AUTO_WORKERS = 8
"""Most workers ``-n auto`` starts: each imports torch and builds its own models."""

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""What sizes the math libraries' thread pools in this process and in the children it starts."""


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _test_files(config: pytest.Config) -> set[Path] | None:
    """The test files the command line names, or None when it names a directory (or nothing
    that exists, which pytest will report)."""
    files: set[Path] = set()
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::", 1)[0])
        if not path.is_file():
            return None
        files.add(path.resolve())
    return files


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per core (at most :data:`MAX_AUTO_WORKERS`); none (the tests
    run in this process) for one test file, which a worker would only collect twice.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    files = _test_files(config)
    if files is not None and len(files) <= 1:
        return 0
    workers = min(cores(), MAX_AUTO_WORKERS)
    return workers if workers > 1 else 0


def worker_threads() -> int | None:
    """Torch threads for each xdist worker: the cores shared out among the workers (so 1
    with 2 workers on 2 cores); None outside xdist (threads stay as the tests set them)."""
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not os.environ.get("PYTEST_XDIST_WORKER") or not count:
        return None
    return max(1, cores() // max(1, int(count)))


@pytest.fixture(autouse=True)
def _worker_torch_threads() -> None:
    """Under xdist, each test starts with the worker's share of torch threads, whatever an
    earlier test or a test module's import (``torch.set_num_threads(2)``) left."""
    threads = worker_threads()
    torch = sys.modules.get("torch")
    if threads is not None and torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

# --------------------------------------------------------------------------- child processes


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    become_subreaper()
    threads = worker_threads()
    if threads is not None:  # before torch is imported, and for the processes tests start
        for name in THREAD_ENV:
            os.environ.setdefault(name, str(threads))
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


# --------------------------------------------------------------------------- the jsonl plugin

JSONL_PLUGIN_DIR = ROOT / "plugins" / "streamcap-jsonl"


def _pip_install_jsonl_plugin() -> None:
    shutil.rmtree(JSONL_PLUGIN_DIR / "build", ignore_errors=True)  # no stale files in the wheel
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--force-reinstall", str(JSONL_PLUGIN_DIR)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install {JSONL_PLUGIN_DIR}:\n{done.stdout}\n"
                           f"{done.stderr}")


@pytest.fixture(scope="session")
def jsonl_installed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """plugins/streamcap-jsonl pip-installed into this interpreter's environment
    (``--no-deps --no-build-isolation``), found through its entry point as a third-party
    plugin is. Every test whose daemon has a ``jsonl`` sink requests it.

    Once per run, not once per xdist worker: a reinstall would pull the plugin from under
    a daemon that another worker runs with it.
    """
    once_per_run(tmp_path_factory, "pip-install-streamcap-jsonl", _pip_install_jsonl_plugin)
    importlib.invalidate_caches()
    sys.modules.pop("streamcap_jsonl", None)
