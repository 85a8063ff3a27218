"""sd_notify over a real AF_UNIX datagram socket, watchdog settings, and the unit file."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamcap import systemd

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "streamcap.service"
ENV_EXAMPLE = ROOT / "systemd" / "streamcap.env.example"
INSTALLED_EXEC = "/opt/streamcap/.venv/bin/streamcap"


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_without_notify_socket_every_call_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_address() is None
    assert systemd.ready("up") is False
    assert systemd.watchdog() is False
    assert systemd.stopping() is False
    assert systemd.status("x") is False


def test_ready_watchdog_stopping_arrive(notify_socket: socket.socket) -> None:
    assert systemd.ready("serving 2 sources") is True
    assert received(notify_socket) == "READY=1\nSTATUS=serving 2 sources"
    assert systemd.watchdog() is True
    assert received(notify_socket) == "WATCHDOG=1"
    assert systemd.status("lag 1.5 s") is True
    assert received(notify_socket) == "STATUS=lag 1.5 s"
    assert systemd.extend_timeout(2.5) is True
    assert received(notify_socket) == "EXTEND_TIMEOUT_USEC=2500000"
    assert systemd.stopping("shutting down") is True
    assert received(notify_socket) == "STOPPING=1\nSTATUS=shutting down"


def test_status_text_cannot_inject_assignments(notify_socket: socket.socket) -> None:
    systemd.status("fine\nREADY=1")
    assert received(notify_socket) == "STATUS=fine READY=1"


def test_bad_key_is_refused() -> None:
    with pytest.raises(ValueError, match="sd_notify key"):
        systemd.format_message({"READY=1\nX": 1})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"streamcap-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify_address() == b"\0" + name.encode()
        assert systemd.ready() is True
        assert received(sock) == "READY=1"


def test_unreachable_socket_reports_false_without_raising(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.ready() is False


def test_non_unix_address_is_ignored() -> None:
    assert systemd.notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert systemd.notify({"READY": 1}, env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


@pytest.mark.parametrize(("env", "timeout", "interval"), [
    ({}, None, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None, None),
    ({"WATCHDOG_USEC": "0"}, None, None),
    ({"WATCHDOG_USEC": "-5"}, None, None),
    ({"WATCHDOG_USEC": "soon"}, None, None),
])
def test_watchdog_settings(env: dict[str, str], timeout: float | None,
                           interval: float | None) -> None:
    assert systemd.watchdog_timeout_s(env) == timeout
    assert systemd.watchdog_interval_s(env) == interval


async def test_watchdog_pinger_pings_only_while_healthy(notify_socket: socket.socket) -> None:
    calls = 0

    def healthy() -> bool:
        nonlocal calls
        calls += 1
        return calls <= 2  # healthy twice, then stuck

    task = asyncio.create_task(systemd.watchdog_pinger(0.001, healthy))
    while calls < 6:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert received(notify_socket) == "WATCHDOG=1"
    assert received(notify_socket) == "WATCHDOG=1"
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)


# --------------------------------------------------------------------------- the unit file


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_the_required_settings() -> None:
    s = unit_settings()
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30",
        "Restart": "on-failure", "RestartSec": "5", "DynamicUser": "yes",
        "SupplementaryGroups": "audio", "StateDirectory": "streamcap",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "PrivateDevices": "no", "KillSignal": "SIGTERM",
        "LimitNOFILE": "8192",
        "EnvironmentFile": "-/etc/streamcap/streamcap.env",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "ExecStart": f"{INSTALLED_EXEC} run --config /etc/streamcap/config.toml",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert "TimeoutStopSec" in s
    assert "MemoryDenyWriteExecute" not in s  # would break PyTorch's run-time generated kernels


def test_env_example_names_the_secrets() -> None:
    names = [line.partition("=")[0] for line in ENV_EXAMPLE.read_text().splitlines()
             if line and not line.startswith("#")]
    assert names == ["STREAMCAP_MQTT_PASSWORD", "STREAMCAP_WS_TOKEN"]


def test_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit without a warning.

    verify checks that the ExecStart binary exists, so a copy of the unit is
    verified with ExecStart pointing at this checkout's venv; everything else is
    the file as shipped. Unknown keys and unparsable values only print warnings
    (exit code 0), so the output must not mention the unit at all.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    exe = Path(sys.executable).parent / "streamcap"
    if not exe.exists():
        exe = Path(sys.executable)  # any executable serves: verify only checks that it runs
    text = UNIT.read_text()
    assert INSTALLED_EXEC in text
    unit = tmp_path / "streamcap.service"
    unit.write_text(text.replace(INSTALLED_EXEC, str(exe)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    output = proc.stdout + proc.stderr
    about_unit = [line for line in output.splitlines()
                  if re.search(r"streamcap\.service", line)]
    assert proc.returncode == 0, output
    assert about_unit == [], output


def test_unit_verify_catches_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    unit = tmp_path / "streamcap.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_EXEC, sys.executable)
                    .replace("WatchdogSec=", "WatchdogSecs="))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert "WatchdogSecs" in proc.stdout + proc.stderr
