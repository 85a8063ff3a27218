"""systemd integration: ``sd_notify`` over ``$NOTIFY_SOCKET`` and the watchdog settings.

The notification protocol is one datagram of newline-separated ``KEY=VALUE``
assignments sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a name that
starts with ``@`` is in the Linux abstract namespace (the ``@`` stands for a
leading NUL byte). Outside systemd the variable is unset and every call here is
a no-op that returns False, so the daemon calls these unconditionally.

Under ``Type=notify`` the daemon sends ``READY=1`` once it serves, ``STATUS=...``
lines for ``systemctl status``, ``WATCHDOG=1`` at least every half
``WatchdogSec`` (:func:`watchdog_interval_s`, :func:`watchdog_pinger`) and
``STOPPING=1`` when shutdown begins. Sending never raises: a failure is logged
once per call and reported by the return value, because losing a notification
must not take the service down (systemd acts on the missing message itself).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from typing import Final

from streamcap.logs import get_logger

_log = get_logger(__name__)

SEND_TIMEOUT_S: Final = 1.0
"""How long one send may block if systemd's receive queue is full."""


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def notify_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """The socket address from ``$NOTIFY_SOCKET``, in the form ``socket.connect`` takes.

    Args:
        env: Environment to read (default ``os.environ``).

    Returns:
        A filesystem path (str), an abstract-namespace name (bytes starting with
        NUL, from an ``@name`` value), or None when unset, empty or not an
        AF_UNIX address (e.g. systemd's ``vsock:`` form, which streamcap does not
        speak).
    """
    value = _env(env).get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    if value.startswith("/"):
        return value
    return None


def format_message(assignments: Mapping[str, str | int]) -> bytes:
    """Encode ``{"READY": 1, "STATUS": "..."}`` as a notification datagram.

    Newlines inside values would start a new assignment, so they become spaces.

    Raises:
        ValueError: A key is empty or contains ``=`` or whitespace.
    """
    lines: list[str] = []
    for key, value in assignments.items():
        if not key or "=" in key or any(c.isspace() for c in key):
            raise ValueError(f"sd_notify key {key!r} must be a non-empty word without '='")
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8")


def notify(assignments: Mapping[str, str | int], *, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification to systemd.

    Args:
        assignments: ``KEY -> value`` pairs, e.g. ``{"READY": 1, "STATUS": "serving"}``.
        env: Environment to read ``NOTIFY_SOCKET`` from (default ``os.environ``).

    Returns:
        True if the datagram was sent; False without ``$NOTIFY_SOCKET`` or when
        sending failed (logged as a warning).
    """
    address = notify_address(env)
    if address is None:
        return False
    data = format_message(assignments)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(data)
    except OSError as exc:
        _log.warning("sd_notify failed", socket=_env(env).get("NOTIFY_SOCKET"),
                     message=data.decode("utf-8", "replace"), error=str(exc))
        return False
    return True


def ready(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (plus ``STATUS=``): startup finished; systemd marks the unit active."""
    msg: dict[str, str | int] = {"READY": 1}
    if status is not None:
        msg["STATUS"] = status
    return notify(msg, env=env)


def stopping(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1`` (plus ``STATUS=``): orderly shutdown has begun."""
    msg: dict[str, str | int] = {"STOPPING": 1}
    if status is not None:
        msg["STATUS"] = status
    return notify(msg, env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """``STATUS=text``: the one-line state shown by ``systemctl status``."""
    return notify({"STATUS": text}, env=env)


def watchdog(*, env: Mapping[str, str] | None = None) -> bool:
    """``WATCHDOG=1``: the keep-alive ping that ``WatchdogSec=`` expects."""
    return notify({"WATCHDOG": 1}, env=env)


def extend_timeout(seconds: float, *, env: Mapping[str, str] | None = None) -> bool:
    """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more to finish starting or stopping.

    Useful while models load on a slow machine, before ``READY=1``.
    """
    if seconds <= 0:
        raise ValueError(f"extend_timeout seconds must be > 0 (got {seconds})")
    return notify({"EXTEND_TIMEOUT_USEC": int(seconds * 1_000_000)}, env=env)


def watchdog_timeout_s(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd enforces on this process, in seconds.

    Reads ``$WATCHDOG_USEC`` (set from ``WatchdogSec=``) and ``$WATCHDOG_PID``
    (when set, the watchdog is meant for that process only).

    Returns:
        The timeout, or None when no watchdog applies to this process (unset,
        not a positive integer, or meant for another PID).
    """
    values = _env(env)
    raw_usec = values.get("WATCHDOG_USEC", "").strip()
    if not raw_usec.isdigit() or int(raw_usec) <= 0:
        return None
    raw_pid = values.get("WATCHDOG_PID", "").strip()
    if raw_pid and (not raw_pid.isdigit() or int(raw_pid) != os.getpid()):
        return None
    return int(raw_usec) / 1_000_000


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1``: half the enforced timeout, as systemd recommends.

    Returns:
        Seconds between pings, or None when no watchdog applies to this process.
    """
    timeout = watchdog_timeout_s(env)
    return None if timeout is None else timeout / 2


async def watchdog_pinger(interval_s: float, healthy: Callable[[], bool] | None = None, *,
                          env: Mapping[str, str] | None = None) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` seconds while ``healthy()`` is true; runs until cancelled.

    The ping runs on the event loop, so a blocked loop stops it by itself;
    ``healthy`` adds what the loop cannot see (e.g. a stuck inference thread).
    When ``healthy()`` is false the ping is skipped and systemd restarts the
    service once the timeout passes.

    Args:
        interval_s: Seconds between pings (:func:`watchdog_interval_s`).
        healthy: Optional check called before each ping.
        env: Environment to read ``NOTIFY_SOCKET`` from (default ``os.environ``).
    """
    if interval_s <= 0:
        raise ValueError(f"watchdog interval must be > 0 (got {interval_s})")
    skipped = False
    while True:
        if healthy is None or healthy():
            watchdog(env=env)
            skipped = False
        elif not skipped:
            _log.warning("watchdog ping withheld: the daemon reports itself unhealthy")
            skipped = True
        await asyncio.sleep(interval_s)
