"""The one redaction: credentials never reach a log line, an error message or /healthz.

:func:`redact` hides, anywhere inside a text:

* user info in a URL: ``rtsp://admin:hunter2@cam/live`` -> ``rtsp://***@cam/live``
  (up to the last ``@`` of the authority: a password may hold an unencoded ``@``);
* the value of a secret parameter after ``?``, ``&`` or ``;``, which covers query
  strings (``?token=abc``, ``&api_key=k``) and ``;param=`` forms such as RTSP's
  ``rtsp://cam/live;password=p``: ``token=***``; a name percent-encoded
  (``?access%5Ftoken=``) is the same name;
* the same two forms percent-encoded in a URL nested in another's query
  (``?u=rtsp%3A%2F%2Fuser%3Apass%40cam%3Ftoken%3Dabc`` ->
  ``?u=rtsp%3A%2F%2F***%40cam%3Ftoken%3D***``);
* the value of a secret header, ``Authorization``, ``Proxy-Authorization``,
  ``Cookie``, ``Set-Cookie``, ``X-Api-Key``, ``X-Auth-Token`` ..., to the end of its
  line or its closing quote, a known scheme kept (``Authorization: Bearer abc`` ->
  ``Authorization: Bearer ***``, ``Cookie: a=1; b=2`` -> ``Cookie: ***``; as the
  libraries log request headers at debug), and a bare ``Bearer <token>``;
* the value of a secret key quoted in JSON or a Python repr (``"token": "abc"``,
  ``{'password': 'x'}``), as a client's frame or a dict in a message shows it.

A name is secret when, compared case-insensitively, it is one of :data:`SECRET_KEYS`:
the one list for URL parameters, header names, log event keys and config keys
(:func:`is_secret_key`). Text without credentials comes back unchanged, e-mail
addresses included; :func:`redact` is idempotent and linear in the text's length (a
URL scheme counts only when at most 32 characters long).
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
    "secret", "client_secret", "private_key",
    "token", "access_token", "refresh_token", "id_token", "auth_token", "session_token",
    "auth", "authorization", "proxy-authorization",
    "key", "apikey", "api_key", "api-key", "x-api-key",
    "x-auth-token", "x-access-token",
    "cookie", "set-cookie",
    "sig", "signature",
})
"""Names (lower case) whose values are secrets: URL parameters, header names, log event keys,
config keys. A name is compared after percent-decoding (``access%5Ftoken`` is ``access_token``)."""

_KEY_ALTERNATION: Final = "|".join(sorted((re.escape(k) for k in SECRET_KEYS), key=len,
                                          reverse=True))
_KEY_HINTS: Final = ("pass", "pwd", "secret", "token", "auth", "key", "sig", "cookie")
"""One of these is in every secret key and header name: text without any of them needs no
key-based pattern (a fast check: most log lines hold none)."""

_HEADER_NAMES: Final = ("proxy-authorization", "authorization", "set-cookie", "cookie",
                        "x-api-key", "api-key", "x-auth-token", "x-access-token")
"""Header names whose whole value is a secret (a header line ``Name: value`` or ``Name=value``)."""

_AUTH_SCHEMES: Final = r"bearer|basic|digest|token|negotiate|apikey|ntlm|hoba|mutual|aws4-hmac-sha256"

# Every pattern below is tried at every position of a text, so none may scan an
# unbounded run from each: what precedes a fixed marker is capped (the URL scheme at
# _SCHEME_MAX characters before "://", a parameter name at 64), and what follows one
# ends at the next marker of its kind. That keeps :func:`redact` linear in the text.
_SCHEME_MAX: Final = 32
_SCHEME: Final = rf"[A-Za-z][A-Za-z0-9+.-]{{0,{_SCHEME_MAX - 1}}}"
# Raw URL user info, greedy up to the last "@" of the authority: a password may hold an
# unencoded "@".
_USERINFO_RE: Final = re.compile(rf"(?P<scheme>{_SCHEME}://)[^/?#\s]+@")
# The same, percent-encoded inside another URL (rtsp%3A%2F%2Fuser%3Apass%40cam), greedy
# likewise up to the last %40.
_ENC_USERINFO_RE: Final = re.compile(
    rf"(?P<scheme>{_SCHEME}%3A%2F%2F)(?:(?!%2F|%3F|%23)[^/?#\s&;])+%40", re.IGNORECASE)
# name=value after ?, & or ; (query strings and RTSP's ;param= forms); the name is checked
# against SECRET_KEYS after percent-decoding.
_PARAM_RE: Final = re.compile(
    r"(?P<key>[?&;](?P<name>[^=?&;\s#\"'<>]{1,64})=)[^?&;\s#\"']*")
# The same, percent-encoded inside another URL's query: %3Ftoken%3Dabc%26x%3D1
_ENC_PARAM_RE: Final = re.compile(
    r"(?P<key>(?:%3F|%26|%3B)(?P<name>(?:[A-Za-z0-9._~+-]|%(?!3D|26|3B|3F|23)[0-9A-F]{2}){1,64})"
    r"%3D)(?:[^?&;\s#\"'%]|%(?!26|3B|3F|23)[0-9A-F]{2})*", re.IGNORECASE)
# A secret-named key quoted in JSON or a Python repr: "token": "abc", 'password': 'x',
# {"pin": 1234}; an unquoted value only where a mapping's entry ends (not in a sentence
# such as "option 'token': unknown key").
_QUOTED_KEY_RE: Final = re.compile(
    rf"""(?P<key>(?P<q>["'])(?P<name>{_KEY_ALTERNATION})(?P=q)\s*:\s*)"""
    r"""(?:(?P<v>["'])(?:\\.|(?!(?P=v)).)*(?P=v)|[^\s,}\]"']+(?=\s*(?:[,}\]]|$)))""",
    re.IGNORECASE)
_HEADER_RE: Final = re.compile(
    rf"(?P<name>(?<![?&;])\b(?:{'|'.join(re.escape(h) for h in _HEADER_NAMES)})[\"']?\s*"
    rf"(?P<sep>[:=])\s*)"
    r"""(?:(?P<oq>["'])(?P<qvalue>(?:\\.|(?!(?P=oq))[^\r\n])*)(?P=oq)|(?P<value>[^\r\n]+))""",
    re.IGNORECASE,
)
_SCHEME_RE: Final = re.compile(rf"(?:{_AUTH_SCHEMES})\s+", re.IGNORECASE)
_WORD_RE: Final = re.compile(r"[^\s&;,]*")
_BEARER_RE: Final = re.compile(
    r"\b(?P<scheme>Bearer\s+)(?!\*\*\*|realm=)[A-Za-z0-9._~+/-]+=*")


def redact(text: str) -> str:
    """Hide URL user info, secret parameters, secret headers and secret-named keys in ``text``.

    >>> redact("rtsp://admin:hunter2@10.0.0.5/live?token=abc&x=1")
    'rtsp://***@10.0.0.5/live?token=***&x=1'
    >>> redact("rtsp://cam/live;password=pw")
    'rtsp://cam/live;password=***'
    >>> redact("Authorization: Basic dXNlcjpwYXNz")
    'Authorization: Basic ***'
    >>> redact("Cookie: session=abc; theme=dark")
    'Cookie: ***'
    >>> redact("http://h/p?u=rtsp%3A%2F%2Fa%3Ab%40cam%3Ftoken%3Dt%26x%3D1")
    'http://h/p?u=rtsp%3A%2F%2F***%40cam%3Ftoken%3D***%26x%3D1'
    """
    if "@" in text:
        text = _USERINFO_RE.sub(rf"\g<scheme>{REDACTED}@", text)
    if "%" in text:
        text = _ENC_USERINFO_RE.sub(rf"\g<scheme>{REDACTED}%40", text)
        text = _ENC_PARAM_RE.sub(_param_sub, text)
    if "=" in text:
        text = _PARAM_RE.sub(_param_sub, text)
    lowered = text.lower()
    if any(hint in lowered for hint in _KEY_HINTS):
        if ":" in text and ("'" in text or '"' in text):
            text = _QUOTED_KEY_RE.sub(_param_sub, text)
        text = _HEADER_RE.sub(_header_sub, text)
    if "Bearer" in text:
        text = _BEARER_RE.sub(rf"\g<scheme>{REDACTED}", text)
    return text


def _secret_name(name: str) -> bool:
    """Whether ``name``, percent-decoded (twice at most), is one of :data:`SECRET_KEYS`."""
    for _ in range(3):
        if name.lower() in SECRET_KEYS:
            return True
        decoded = unquote(name)
        if decoded == name:
            return False
        name = decoded
    return False


def _param_sub(match: re.Match[str]) -> str:
    if not _secret_name(match.group("name")):
        return match.group(0)
    quote_char = match.groupdict().get("v")
    value = f"{quote_char}{REDACTED}{quote_char}" if quote_char else REDACTED
    return f"{match.group('key')}{value}"


def _header_sub(match: re.Match[str]) -> str:
    """``Name: value`` hides the value to the end of the line (to its closing quote when it
    is quoted), a known scheme kept; ``name=value`` hides one word."""
    quote_char = match.group("oq")
    value = match.group("qvalue") if quote_char else match.group("value")
    scheme = _SCHEME_RE.match(value)
    keep = scheme.group(0) if scheme else ""
    rest = ""
    if match.group("sep") == "=" and not quote_char:
        word = _WORD_RE.match(value, len(keep))
        rest = value[word.end():] if word else ""
    hidden = f"{keep}{REDACTED}"
    if quote_char:
        hidden = f"{quote_char}{hidden}{quote_char}"
    return f"{match.group('name')}{hidden}{rest}"


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
    infos: list[str] = []
    if userinfo is not None:
        infos.append(userinfo.group(0)[len(userinfo.group("scheme")):-1])
    for match in _ENC_USERINFO_RE.finditer(url):
        infos.append(unquote(match.group(0)[len(match.group("scheme")):-3]))
    for info in infos:
        password = info.partition(":")[2]
        found += [info, unquote(info), password, unquote(password)]
    for regex in (_PARAM_RE, _ENC_PARAM_RE):
        for match in regex.finditer(url):
            if not _secret_name(match.group("name")):
                continue
            value = url[match.end("key"):match.end()]
            found += [value, unquote(value), unquote(unquote(value)),
                      quote(unquote(value), safe="")]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)
