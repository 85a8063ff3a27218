"""``streamcap run`` as a subprocess, for end-to-end tests: start, watch, query, stop.

Use it from a test module with ``from daemon_process import DaemonProcess, ...`` (pytest puts
``tests/`` on ``sys.path``)::

    notify = NotifyListener(short_dir)           # stands in for systemd's $NOTIFY_SOCKET
    daemon = DaemonProcess.start(config, env={"NOTIFY_SOCKET": str(notify.path)},
                                 log=tmp / "daemon.log", jsonl=tmp / "archive.jsonl",
                                 http_port=port)
    daemon.wait_captions(3)                      # read back from the jsonl sink's file
    text = daemon.wait_metric("streamcap_mqtt_connected", '{sink="broker"}', lambda v: v == 1)
    assert daemon.stop() == 0                    # SIGTERM, then the exit code

Waits are generous upper bounds (``WAIT_S``, scaled by ``STREAMCAP_TEST_TIME_FACTOR``);
they fail with the daemon's log tail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from timing import scaled

WAIT_S = scaled(120.0)  # upper bound for anything the daemon must eventually do
T = TypeVar("T")
SYSTEMD_VARIABLES = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                               "STATE_DIRECTORY"})


def streamcap_command() -> list[str]:
    """The ``streamcap`` console script next to this interpreter, else ``python -m streamcap``."""
    exe = Path(sys.executable).with_name("streamcap")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "streamcap"]


def tiny_model_toml(*, n_candidates: int = 8, max_new_tokens: int | None = None) -> str:
    """The ``[model]`` tables of a daemon test: the tiny preset on one CPU thread, seeded."""
    extra = "" if max_new_tokens is None else f"max_new_tokens = {max_new_tokens}\n"
    return ('[model]\nbundle = "tiny"\ndevice = "cpu"\nprecision = "fp32"\nthreads = 1\n\n'
            f"[model.decoding]\nn_candidates = {n_candidates}\n{extra}seed = 0\n")


def http_get(url: str) -> tuple[int, str, str]:
    """Status, content type and body of a GET (4xx/5xx included)."""
    try:
        with urllib.request.urlopen(url, timeout=scaled(30)) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _canonical(labels: str) -> str:
    """Label text with its labels sorted by name: ``{b="1",a="2"}`` -> ``{a="2",b="1"}``."""
    if not labels:
        return ""
    pairs = sorted(_LABEL.findall(labels))
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


class MetricSamples(dict[str, float]):
    """Samples by label text; looked up in any label order."""

    def __getitem__(self, labels: str) -> float:
        return super().__getitem__(_canonical(labels))

    def __contains__(self, labels: object) -> bool:
        return isinstance(labels, str) and super().__contains__(_canonical(labels))

    def get(self, labels: str, default: float | None = None) -> float | None:  # type: ignore[override]
        return super().get(_canonical(labels), default)


def metric_samples(text: str, name: str) -> MetricSamples:
    """``{label text: value}`` of every sample of metric ``name`` in Prometheus text
    (label text as rendered, e.g. ``{sink="ws"}``; ``""`` without labels; looked up in
    any label order, since exposition orders labels as it likes)."""
    out = MetricSamples()
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{.*\}})? (\S+)", line)
        if match:
            dict.__setitem__(out, _canonical(match[1] or ""), float(match[2]))
    return out


def mqtt_lines(path: Path) -> list[tuple[str, str]]:
    """``(topic, payload)`` of each whole line of a ``mosquitto_sub -v`` output file."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    # split on "\n" only: payloads may hold U+2028 or U+0085, which splitlines() splits on
    return [(t, p) for t, _, p in (line.partition(" ") for line in text.split("\n")[:-1])]


class NotifyListener:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``.

    Every datagram is kept as a dict of its ``KEY=value`` lines, in arrival order.
    ``directory`` must be short: AF_UNIX paths are limited to 108 bytes.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines() if line)
            with self._lock:
                self.messages.append(fields)

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def index(self, key: str, value: str) -> int | None:
        """Position of the first datagram with ``key=value``, or None."""
        for i, msg in enumerate(self.snapshot()):
            if msg.get(key) == value:
                return i
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=scaled(5))
        self.sock.close()


@dataclass(kw_only=True)
class DaemonProcess:
    """A running ``streamcap run --config <config>`` and where to look at it.

    Attributes:
        jsonl: the file of a ``jsonl`` sink accepting every kind: the record of what the
            daemon published.
        http_port: the ``[http]`` port.
    """

    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    jsonl: Path
    http_port: int
    env: dict[str, str]
    exit_code: int | None = None

    @classmethod
    def start(cls, config: Path, *, env: Mapping[str, str], log: Path, jsonl: Path,
              http_port: int, cwd: Path | None = None) -> DaemonProcess:
        """Start the daemon with ``os.environ`` updated by ``env``; output goes to ``log``.

        systemd's variables (``NOTIFY_SOCKET``, ``WATCHDOG_*``, ``STATE_DIRECTORY``) are
        not inherited from the test run: only ``env`` sets them.
        """
        full_env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        full_env.update(env)
        with log.open("wb") as fh:
            proc = subprocess.Popen([*streamcap_command(), "run", "--config", str(config)],
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                    env=full_env, cwd=cwd or config.parent)
        return cls(proc=proc, config=config, log=log, jsonl=jsonl, http_port=http_port,
                   env=full_env)

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines (``log_format = "json"``) as dicts."""
        out: list[dict[str, Any]] = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").split("\n"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")

    def frames(self) -> list[dict[str, Any]]:
        """Every frame the jsonl sink has written so far (whole lines only)."""
        if not self.jsonl.exists():
            return []
        text = self.jsonl.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.split("\n")[:-1] if line]

    def captions(self) -> list[dict[str, Any]]:
        return [f for f in self.frames() if f["type"] == "caption"]

    def poll(self, probe: Callable[[], tuple[T, bool]], failure: Callable[[T], str], *,
             timeout_s: float = WAIT_S, interval_s: float = 0.1) -> T:
        """Call ``probe`` (``(value, done)``) until done, the daemon alive meanwhile; the value.

        Raises:
            AssertionError: The daemon exited, or ``timeout_s`` passed (``failure(value)``).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value, done = probe()
            if done:
                return value
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(failure(value))
            time.sleep(interval_s)

    def wait_captions(self, n: int, timeout_s: float = WAIT_S) -> list[dict[str, Any]]:
        """The jsonl captions, once there are at least ``n``."""
        def probe() -> tuple[list[dict[str, Any]], bool]:
            found = self.captions()
            return found, len(found) >= n

        return self.poll(probe, lambda found: f"only {len(found)} of {n} captions within "
                                              f"{timeout_s} s:\n{self.log_tail()}",
                         timeout_s=timeout_s)

    def wait_metric(self, name: str, labels: str, ok: Callable[[float], bool]) -> str:
        """Poll /metrics until sample ``name{labels}`` satisfies ``ok``; the metrics text."""
        def probe() -> tuple[tuple[str, float | None], bool]:
            _, _, text = http_get(self.http("/metrics"))
            value = metric_samples(text, name).get(labels)
            return (text, value), value is not None and ok(value)

        text, _ = self.poll(probe, lambda got: f"{name}{labels} = {got[1]} never satisfied "
                                               f"the check:\n{got[0]}", interval_s=0.2)
        return text

    def stop(self) -> int:
        """SIGTERM, then the exit code (the signal is sent once)."""
        if self.exit_code is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=scaled(30))
                raise AssertionError(f"the daemon ignored SIGTERM:\n{self.log_tail()}") from None
        return self.exit_code

    def kill(self) -> None:
        """Make sure the process is gone (SIGTERM, SIGKILL after 30 s, scaled)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=scaled(30))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=scaled(30))


__all__ = [
    "WAIT_S",
    "DaemonProcess",
    "NotifyListener",
    "http_get",
    "metric_samples",
    "mqtt_lines",
    "streamcap_command",
    "tiny_model_toml",
]
