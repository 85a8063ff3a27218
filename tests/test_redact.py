"""The one redaction: every secret form is hidden in log lines, status reasons and error messages."""

from __future__ import annotations

import pytest

from streamcap.audio.watchdog import SourceWatchdog
from streamcap.errors import ConfigError, SourceUnavailable
from streamcap.redact import SECRET_KEYS, is_secret_key, redact, url_secrets

SECRET = "hunter2xyz"

# Every form a credential takes in a URL or a sentence, each holding SECRET.
URL_FORMS = [
    f"rtsp://admin:{SECRET}@cam:554/live",  # userinfo
    f"rtsp://{SECRET}@cam/live",  # userinfo without a password
    f"rtsp://admin:p@{SECRET}@cam/live",  # an unencoded '@' in the password
    f"rtsp://admin:p@ss:{SECRET}@cam/live",  # an unencoded '@' and ':' in the password
    f"rtsp://admin:p%40{SECRET}%3A@cam/live",  # a percent-encoded password
    f"rtsp://cam/live;password={SECRET}",  # rtsp ;param= form
    f"rtsp://cam/live;user=bob;pass={SECRET};chan=1",
    *(f"https://api.example/x?a=1&{key}={SECRET}&b=2" for key in sorted(SECRET_KEYS)),
    f"http://h/s?PassWord={SECRET}",  # names compare case-insensitively
    f"http://h/s?token={SECRET}#frag",
    f"http://h/s?token=a%26{SECRET}&x=1",  # a percent-encoded '&' inside the value
    f"http://h/s?access%5Ftoken={SECRET}&x=1",  # a percent-encoded name
    f"http://h/s?%41PI%4BEY={SECRET}",
    f"http://h/s?%2561pikey={SECRET}",  # a name encoded twice
    # a URL nested, percent-encoded, in another's query
    f"http://h/proxy?u=rtsp%3A%2F%2Fadm%3A{SECRET}%40cam%2Flive&z=1",
    f"http://h/proxy?u=rtsp%3a%2f%2fcam%2flive%3ftoken%3d{SECRET}%26x%3d1",
    f"http://h/proxy?u=http%3A%2F%2Fcam%2Fs%3Bpassword%3D{SECRET}",
    f"http://h/proxy?u=http%3A%2F%2Fcam%2Fs%3Fa%3D1%26sig%3D{SECRET}",
    f"sent Bearer {SECRET} upstream",
    f"authorization={SECRET}",
    f"headers: {{'Authorization': 'Bearer {SECRET}', 'Host': 'cam'}}",
    f'frame {{"type": "subscribe", "token": "{SECRET}"}}',  # JSON
    f"{{'password': '{SECRET}', 'user': 'bob'}}",  # a Python repr
    f'{{"api_key": {SECRET}}}',  # an unquoted value
]
# A header's value is hidden to the end of its line or its closing quote.
HEADER_FORMS = [
    f"Authorization: Bearer {SECRET}",
    f"Authorization: Basic {SECRET}",
    f"Authorization: Custom {SECRET}",  # an unknown scheme
    f"Authorization: Bearer wrong {SECRET}",  # more than one word
    f"Proxy-Authorization: Digest {SECRET}",
    f'Proxy-Authorization: Digest username="u", response="{SECRET}"',
    f"< Cookie: session={SECRET}; theme=dark",
    f"> Set-Cookie: sid={SECRET}; HttpOnly",
    f"< X-Api-Key: {SECRET}",
    f"X-Auth-Token: {SECRET}",
    f"x-access-token: {SECRET}",
    f"Invalid header value char: b'Authorization: Custom {SECRET}\\x01'",
]
SECRET_FORMS = URL_FORMS + HEADER_FORMS


@pytest.mark.parametrize("form", URL_FORMS)
def test_redact_hides_every_secret_form(form: str) -> None:
    out = redact(f"opening {form} now")
    assert SECRET not in out
    assert "***" in out
    assert out.startswith("opening ") and out.endswith(" now")
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize("form", HEADER_FORMS)
def test_redact_hides_every_header_value(form: str) -> None:
    out = redact(form)
    assert SECRET not in out
    assert out.endswith(("***", "***'"))
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize(("text", "expected"), [
    ("rtsp://admin:hunter2@10.0.0.5/live?token=abc&x=1",
     "rtsp://***@10.0.0.5/live?token=***&x=1"),
    ("rtsp://user:pass@cam:554/s", "rtsp://***@cam:554/s"),
    ("rtsp://user@cam/s", "rtsp://***@cam/s"),
    ("http://h/s?Password=p&key=k&secret=s", "http://h/s?Password=***&key=***&secret=***"),
    ("https://host/x?access_token=zz;pwd=qq", "https://host/x?access_token=***;pwd=***"),
    ("rtsp://cam/live;password=pw;chan=1", "rtsp://cam/live;password=***;chan=1"),
    ("http://h/s?sig=abc&apikey=k&client_secret=c",
     "http://h/s?sig=***&apikey=***&client_secret=***"),
    ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
    ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
    ("Authorization: s3cr3t", "Authorization: ***"),
    ("http://user:pass@radio.example:8000/stream.mp3",
     "http://***@radio.example:8000/stream.mp3"),
    ("rtsp://user:p@ss@cam/stream", "rtsp://***@cam/stream"),  # unencoded '@' in a password
    ("https://host/x?password=p&api_key=k#frag", "https://host/x?password=***&api_key=***#frag"),
    ("http://host/hls.m3u8?a=1&Token=T0K&b=2", "http://host/hls.m3u8?a=1&Token=***&b=2"),
    ("opening rtsp://a:b@cam1/s and http://c:d@cam2/t?auth=e now",
     "opening rtsp://***@cam1/s and http://***@cam2/t?auth=*** now"),
    ("http://h/s?access%5Ftoken=zz&x=1", "http://h/s?access%5Ftoken=***&x=1"),
    ("http://h/p?u=rtsp%3A%2F%2Fa%3Ab%40cam%3Ftoken%3Dt%26x%3D1&z=2",
     "http://h/p?u=rtsp%3A%2F%2F***%40cam%3Ftoken%3D***%26x%3D1&z=2"),
    ("Authorization: Custom a b", "Authorization: ***"),
    ("Authorization: Bearer abc, then more", "Authorization: Bearer ***"),
    ("< Cookie: session=abc; theme=dark", "< Cookie: ***"),
    ("authorization=abc next", "authorization=*** next"),
    ("{'Authorization': 'Bearer x', 'Host': 'cam'}", "{'Authorization': '***', 'Host': 'cam'}"),
    ('{"token": "a\\"b", "n": 1}', '{"token": "***", "n": 1}'),
    ('{"password": null}', '{"password": ***}'),
    ('> WWW-Authenticate: Bearer realm="streamcap"', '> WWW-Authenticate: Bearer realm="streamcap"'),
])
def test_redact_output(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "no url here",
    "window_s=10 hop_s=5",
    "mail bob@example.com about key=value",
    "http://host/path?email=a@b.c&monkey=1&keyframe=2",
    "file:/srv/clip.wav?loop=true&realtime=false",
    "mic:default",
    "udp://0.0.0.0:5004",
    "Basic information",
    "authorization failed",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    '{"auth_required": true, "monkey": "x", "keyframe": 2}',
    "http://h/p?u=http%3A%2F%2Fcam%2Fs%3Fa%3D1%26b%3D2",
    "progress 50%26 done",
    "source option 'token': unknown key (known keys: loop)",
    "sinks.ws.token: secrets are not read from the config file",
    "",
])
def test_redact_leaves_text_without_credentials_unchanged(text: str) -> None:
    assert redact(text) == text


def test_secret_keys_are_one_case_insensitive_list() -> None:
    for key in ("password", "PASSWORD", "api_key", "Token", "sig", "client_secret", "auth"):
        assert is_secret_key(key)
    for key in ("Cookie", "Set-Cookie", "X-Api-Key", "x-auth-token"):
        assert is_secret_key(key)
    for key in ("host", "keepalive_s", "password_env", "monkey", "key_file", "token_env"):
        assert not is_secret_key(key)


def test_url_secrets_lists_what_redact_hides_raw_decoded_and_encoded() -> None:
    url = "rtsp://admin:p%40ss%2Fw@cam/live;password=semi1?token=a%2Bb&x=1"
    found = url_secrets(url)
    assert "admin:p%40ss%2Fw" in found and "p@ss/w" in found
    assert "semi1" in found and "a%2Bb" in found and "a+b" in found
    assert found == sorted(found, key=len, reverse=True)
    assert url_secrets("udp://0.0.0.0:5004") == []
    assert url_secrets("http://h/s?access%5Ftoken=enc1&x=1") == ["enc1"]
    nested = url_secrets("http://h/p?u=rtsp%3A%2F%2Fadm%3Anest1%40cam%3Ftoken%3Dnest2%26x%3D1")
    assert "nest1" in nested and "adm:nest1" in nested and "nest2" in nested


# ------------------------------------------------------------------ where the text goes
# (log lines: tests/test_logs.py)


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_every_secret_form_is_redacted_in_a_health_reason(form: str) -> None:
    """A failing source's status reason is what /healthz shows and the sinks publish."""
    watchdog = SourceWatchdog("cam")
    watchdog.started(0.0)
    status = watchdog.error(OSError(f"cannot open {form}"), permanent=False, now=1.0)
    assert SECRET not in status.reason and "***" in status.reason
    failed = watchdog.error(f"ffmpeg said: {form}", permanent=True, now=2.0)
    assert SECRET not in failed.reason


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_every_secret_form_is_redacted_in_an_error_message(form: str) -> None:
    unavailable = SourceUnavailable(f"stream {form} cannot be opened")
    assert SECRET not in str(unavailable) and SECRET not in repr(unavailable)
    config = ConfigError([f"sources.cam.uri: {form} is not allowed", "other problem"])
    assert SECRET not in str(config)
    assert all(SECRET not in problem for problem in config.problems)
    assert config.problems[1] == "other problem"


# Texts an HTTP client can put in a debug log line (a request path up to 8190 bytes, a
# header), shaped so that a pattern retried from every position with an unbounded scan
# would take minutes at this size: 256 KiB of one run, then what makes a pattern start.
_RUN = 256 * 1024
HOSTILE_TEXTS = {
    "letters then @": "a" * _RUN + "@",
    "letters then %": "a" * _RUN + "%",
    "letters then =": "a" * _RUN + "=",
    "letters and digits then @": "a1" * (_RUN // 2) + "@",
    "Bearer repeated": "Bearer " * (_RUN // 7),
    "Bearer then spaces": "Bearer" + " " * _RUN,
    "authorization repeated": "authorization" * (_RUN // 13),
    "authorization then spaces": ("authorization" + " " * 64) * (_RUN // 77),
    "a scheme then a long authority": "a" * 40 + "://" + "x" * _RUN + "/@",
    "an encoded scheme then a long authority": "a" * 40 + "%3A%2F%2F" + "x" * _RUN + "%2F%40",
    "encoded parameter names": "%3Ftoken" * (_RUN // 8),
    "parameter names": "?token" * (_RUN // 6),
    "quoted keys, values left open": "'token': \"" * (_RUN // 10),
    "quoted header values left open": "authorization: '\"" * (_RUN // 17),
}


@pytest.mark.timeout(60)  # a hang guard: each takes well under a second when linear
@pytest.mark.parametrize("shape", sorted(HOSTILE_TEXTS))
def test_redact_finishes_on_hostile_text_and_still_hides_what_follows(shape: str) -> None:
    text = HOSTILE_TEXTS[shape] + f"; rtsp://admin:{SECRET}@cam/live?token={SECRET}"
    hidden = redact(text)
    assert SECRET not in hidden
    assert "rtsp://***@cam/live?token=***" in hidden
