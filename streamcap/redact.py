"""The one redaction: credentials never reach a log line, an error message or /healthz.

:func:`redact` hides, anywhere inside a text:

* user info in a URL: ``rtsp://admin:hunter2@cam/live`` -> ``rtsp://***@cam/live``
  (up to the last ``@`` of the authority: a password may hold an unencoded ``@``);
* the value of a secret parameter after ``?``, ``&`` or ``;``, which covers query
  strings (``?token=abc``, ``&api_key=k``) and ``;param=`` forms such as RTSP's
  ``rtsp://cam/live;password=p``: ``token=***``;
* ``Authorization`` and ``Proxy-Authorization`` header values (``Authorization: Bearer
  abc`` -> ``Authorization: Bearer ***``, ``Basic``, ``Digest`` ... alike) and a bare
  ``Bearer <token>``.

A parameter is secret when its name, compared case-insensitively, is one of
:data:`SECRET_KEYS`. The same list decides which keys of a log event or a config
table hold secrets (:func:`is_secret_key`). Text without credentials comes back
unchanged, e-mail addresses included.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import quote, unquote

__all__ = ["REDACTED", "SECRET_KEYS", "is_secret_key", "redact", "url_secrets"]

REDACTED: Final = "***"
"""What a hidden value is replaced with."""

SECRET_KEYS: Final = frozenset({
    "password", "passwd", "pass", "pwd", "passphrase",
    "secret", "client_secret",
    "token", "access_token", "refresh_token", "id_token", "auth_token",
    "auth", "authorization",
    "key", "apikey", "api_key", "api-key", "x-api-key",
    "sig", "signature",
})
"""Names (lower case) whose values are secrets: URL parameters, log event keys, config keys."""

_KEY_ALTERNATION: Final = "|".join(sorted((re.escape(k) for k in SECRET_KEYS), key=len,
                                          reverse=True))

# Greedy up to the last "@" of the authority: a password may hold an unencoded "@".
_USERINFO_RE: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]+@")
_PARAM_RE: Final = re.compile(
    rf"(?P<key>[?&;](?:{_KEY_ALTERNATION})=)[^?&;\s#\"']*", re.IGNORECASE)
_HEADER_RE: Final = re.compile(
    r"(?P<name>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?P<scheme>bearer|basic|digest|token|negotiate|apikey)\s+)?[^\s,;\"']+",
    re.IGNORECASE,
)
_BEARER_RE: Final = re.compile(r"\b(?P<scheme>Bearer\s+)(?!\*\*\*)[A-Za-z0-9._~+/-]+=*")


def redact(text: str) -> str:
    """Hide URL user info, secret parameters and authorization headers in ``text``.

    >>> redact("rtsp://admin:hunter2@10.0.0.5/live?token=abc&x=1")
    'rtsp://***@10.0.0.5/live?token=***&x=1'
    >>> redact("rtsp://cam/live;password=pw")
    'rtsp://cam/live;password=***'
    >>> redact("Authorization: Basic dXNlcjpwYXNz")
    'Authorization: Basic ***'
    """
    if "@" in text:
        text = _USERINFO_RE.sub(rf"\g<scheme>{REDACTED}@", text)
    if "=" in text:
        text = _PARAM_RE.sub(rf"\g<key>{REDACTED}", text)
    if "uthorization" in text or "UTHORIZATION" in text:
        text = _HEADER_RE.sub(_header_sub, text)
    if "Bearer" in text:
        text = _BEARER_RE.sub(rf"\g<scheme>{REDACTED}", text)
    return text


def _header_sub(match: re.Match[str]) -> str:
    scheme = match.group("scheme")
    return f"{match.group('name')}{scheme + ' ' if scheme else ''}{REDACTED}"


def is_secret_key(key: str) -> bool:
    """Whether ``key`` (a URL parameter, log event key or config key) names a secret."""
    return key.lower() in SECRET_KEYS


def url_secrets(url: str) -> list[str]:
    """The strings :func:`redact` hides in ``url``: user info, password, secret values.

    For scrubbing text that quotes the URL in its own way (ffmpeg's messages
    decode and re-encode it): each value comes raw, percent-decoded and
    percent-encoded; longest first, so that ``user:pass`` goes before
    ``pass``; strings shorter than 3 characters are left out, as they would
    scrub ordinary words.
    """
    found: list[str] = []
    userinfo = _USERINFO_RE.match(url.strip())
    if userinfo is not None:
        info = userinfo.group(0)[len(userinfo.group("scheme")):-1]
        password = info.partition(":")[2]
        found += [info, unquote(info), password, unquote(password)]
    for match in _PARAM_RE.finditer(url):
        value = url[match.end("key"):match.end()]
        found += [value, unquote(value), quote(unquote(value), safe="")]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)
