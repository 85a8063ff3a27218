"""Who may talk to streamcap's listeners: pure checks of addresses, ``Host`` and ``Origin``.

Two attacks shape these rules:

* **DNS rebinding.** A web page on ``http://evil.example`` makes its name resolve to
  127.0.0.1 and then reads the daemon "same-origin". The browser still sends
  ``Host: evil.example``, so a listener accepts only the ``Host`` names it knows
  (:class:`HostPolicy`): IP literals, ``localhost`` and its subdomains, the name it was
  told to bind, and any configured ``allowed_hosts``.
* **Cross-site WebSocket reads.** Browsers let any page open a WebSocket to any
  address and only tell the server where the page came from (``Origin``). Without an
  allow-list, :class:`OriginPolicy` accepts a browser only when the page's host is the
  host the client connected to (the live page, served by the daemon's HTTP port on
  the same host, qualifies), or when both are loopback hosts (a page opened as
  ``localhost`` connecting to ``127.0.0.1``: both name this machine); clients that send
  no ``Origin`` (not browsers) are not affected.

Configured ``allowed_hosts`` are checked once, by :func:`host_names_problem`, for both
the HTTP server and the WebSocket sink.

Nothing here does I/O; the HTTP server and the WebSocket sink apply these rules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = ["HostPolicy", "OriginPolicy", "host_names_problem", "host_of", "ip_address",
           "is_host_name", "is_ip_literal", "is_loopback", "is_wildcard", "normalise_origin"]

_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "*"})
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_HOST_NAME: Final = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
                               r"(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?\Z")


def ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells (surrounding blanks and brackets allowed), None for a name."""
    try:
        return ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    if host.strip().lower() == "localhost":
        return True
    address = ip_address(host)
    return address is not None and address.is_loopback


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every address of a family or of both
    (``0.0.0.0``, ``::`` in any spelling, empty)."""
    address = ip_address(host)
    if address is not None:
        return address.is_unspecified
    return host.strip() in _WILDCARDS


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (brackets allowed), not a name."""
    return ip_address(host) is not None


def is_host_name(value: str) -> bool:
    """Whether ``value`` is a DNS name (or an IPv4 address) as a ``Host`` header carries it:
    ASCII labels of letters, digits, ``-`` and ``_``, without scheme, port or path.

    Browsers send internationalised names in their ``xn--`` form, so a name written in
    Unicode could never match a ``Host`` header and is refused.
    """
    return _HOST_NAME.match(value) is not None


def host_names_problem(values: Iterable[str]) -> str | None:
    """The check of an ``allowed_hosts`` option: None, or what is wrong (never quoting it)."""
    if all(is_host_name(v) for v in values):
        return None
    return ("each must be a host name without scheme, port or path, e.g. 'streamcap.lan' "
            "(an internationalised name in its xn-- form)")


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


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """Which browser pages (``Origin``) may open a WebSocket (see the module docstring).

    Attributes:
        allowed: The configured allow-list, normalised (:func:`normalise_origin`);
            None: no list, the same-host rule applies.
    """

    allowed: frozenset[str] | None = None

    @classmethod
    def from_config(cls, allowed_origins: Iterable[str] | None) -> OriginPolicy:
        """The policy of an ``allowed_origins`` option (None: unset), normalised once.

        Entries that are not origins are left out (the option's check refuses them).
        """
        if allowed_origins is None:
            return cls(None)
        return cls(frozenset(n for o in allowed_origins
                             if (n := normalise_origin(o)) is not None))

    def allows(self, origin: str | None, host_header: str | None) -> bool:
        """Whether a client whose page came from ``origin`` may connect.

        Args:
            origin: The ``Origin`` header; None when absent (not a browser): allowed.
            host_header: The ``Host`` header the client sent.

        With an allow-list, the page's normalised origin must be on it. Without one,
        the page's host must equal the ``Host`` header's host (any port), or both must
        be loopback hosts (``localhost``, 127.0.0.0/8, ``::1``).
        """
        if origin is None:
            return True
        normal = normalise_origin(origin)
        if normal is None:
            return False
        if self.allowed is not None:
            return normal in self.allowed
        requested = host_of(host_header) if host_header is not None else None
        page_host = urlsplit(normal).hostname
        if requested is None or page_host is None:
            return False
        return page_host == requested or (is_loopback(page_host) and is_loopback(requested))
