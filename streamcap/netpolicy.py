"""Who may talk to streamcap's listeners: pure checks of addresses, ``Host`` and ``Origin``.

Two attacks shape these rules:

* **DNS rebinding.** A web page on ``http://evil.example`` makes its name resolve to
  127.0.0.1 and then reads the daemon "same-origin". The browser still sends
  ``Host: evil.example``, so a listener accepts only the ``Host`` names it knows
  (:class:`HostPolicy`): IP literals, ``localhost`` and its subdomains, the name it was
  told to bind, and any configured ``allowed_hosts``.
* **Cross-site WebSocket reads.** Browsers let any page open a WebSocket to any
  address and only tell the server where the page came from (``Origin``). Without an
  allow-list, :func:`origin_allowed` accepts a browser only when the page's host is the
  host the client connected to (the live page, served by the daemon's HTTP port on
  the same host, qualifies); clients that send no ``Origin`` (not browsers) are not
  affected.

Nothing here does I/O; the HTTP server and the WebSocket sink apply these rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = ["HostPolicy", "host_of", "is_ip_literal", "is_loopback", "is_wildcard",
           "normalise_origin", "origin_allowed"]

_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "[::]", "*"})
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every interface (``0.0.0.0``, ``::``, empty)."""
    return host.strip() in _WILDCARDS


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (brackets allowed), not a name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def host_of(authority: str) -> str | None:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``),
    lower case, without brackets or a trailing dot; None when it is not well formed."""
    value = authority.strip()
    if not value or any(c.isspace() or c in "/?#@\\" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or not is_ip_literal(value[1:end]):
            return None
        host, rest = value[1:end], value[end + 1:]
    else:
        host, _, port = value.partition(":")
        rest = f":{port}" if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    host = host.rstrip(".").lower()
    return host or None


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """Which ``Host`` header values a listener answers (see the module docstring).

    Attributes:
        names: Host names accepted besides IP literals and ``localhost`` (lower case).
    """

    names: frozenset[str] = frozenset()

    @classmethod
    def for_listener(cls, bind_host: str, allowed_hosts: Iterable[str] = ()) -> HostPolicy:
        """The policy of a listener bound to ``bind_host`` (a name given there is accepted)."""
        names = {h.strip().rstrip(".").lower() for h in allowed_hosts if h.strip()}
        if not is_wildcard(bind_host) and not is_ip_literal(bind_host):
            names.add(bind_host.strip().rstrip(".").lower())
        return cls(frozenset(names))

    def allows(self, host_header: str | None) -> bool:
        """Whether a request with this ``Host`` header (None: absent) may be answered.

        An absent header is allowed (HTTP/1.0 clients; browsers always send one).
        """
        if host_header is None:
            return True
        host = host_of(host_header)
        if host is None:
            return False
        return (is_ip_literal(host) or host == "localhost" or host.endswith(".localhost")
                or host in self.names)


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None when
    ``origin`` is not a serialised origin (``null``, a path, no host)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if not scheme or not host or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    shown = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


def origin_allowed(origin: str | None, host_header: str | None,
                   allowed_origins: Collection[str] | None) -> bool:
    """Whether a client whose page came from ``origin`` may connect.

    Args:
        origin: The ``Origin`` header; None when absent (not a browser): allowed.
        host_header: The ``Host`` header the client sent.
        allowed_origins: The configured allow-list (compared after
            :func:`normalise_origin`); None: the page's host must equal the
            ``Host`` header's host (any port).
    """
    if origin is None:
        return True
    normal = normalise_origin(origin)
    if normal is None:
        return False
    if allowed_origins is not None:
        return normal in {normalise_origin(o) for o in allowed_origins}
    requested = host_of(host_header) if host_header is not None else None
    page_host = urlsplit(normal).hostname
    return requested is not None and page_host is not None and page_host == requested
