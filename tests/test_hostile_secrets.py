"""Hostile: credentials in every form never reach a log line, /healthz, /metrics or a frame.

One daemon subprocess for the module, at ``log_level = "debug"`` (every library logs what it
does, request headers included), with:

* stream sources whose URIs carry secrets in every form (user info, a password holding ``@``
  and ``:``, ``?access_token=``, ``&apikey=``, ``;password=``, ``sig=``, ``client_secret=``,
  percent-encoded values and names, a URL nested percent-encoded in another's query), each
  pointing at a closed loopback port so that ffmpeg fails and the failure is reported;
* a WebSocket sink with a token, and clients presenting it in the header, in the query
  string, and wrong tokens, cookies and API-key headers;
* an MQTT sink whose password comes from the environment (when mosquitto is installed).

Then the whole log, ``/healthz``, ``/metrics``, ``check-config``'s output, every WebSocket
frame and every MQTT payload are searched for each secret: raw, percent-encoded and
percent-decoded. Every secret holds a marker (``zqv`` and a letter) that nothing else in the
daemon's output holds, so that a secret half-hidden (its tail after a ``&`` or a ``:``) is
found as well.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
import soundfile as sf
import websockets
from conftest import free_port
from daemon_process import WAIT_S, DaemonProcess, http_get, streamcap_command, tiny_model_toml
from mosquitto import Mosquitto, mosquitto_path, start_mosquitto_sub
from timing import scaled

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")

MARKER = re.compile(r"zqv[a-z]", re.IGNORECASE)
"""What every secret below holds, and nothing else the daemon prints."""

TOKEN_ENV = "STREAMCAP_HOSTILE_WS_TOKEN"
TOKEN = "Tok-zqva.9Kx_~+/="
MQTT_USER = "streamcap"
MQTT_PASSWORD_ENV = "STREAMCAP_HOSTILE_MQTT_PASSWORD"
MQTT_PASSWORD = "Mq p@ss:zqvb&;"


def _sources(port: int) -> dict[str, str]:
    """Source id -> URI with secrets, every host a closed loopback port."""
    host = f"127.0.0.1:{port}"
    nested = quote("rtsp://adm:Nest-zqvc@cam/live?token=Inner-zqvd&x=1", safe="")
    return {
        "userinfo": f"http://admin:Ui-zqve@{host}/a.mp3",
        "at_colon": f"rtsp://bob:p@ss:w0rd-zqvf@{host}/live",
        "query": f"http://{host}/s.mp3?access_token=At-zqvg&apikey=Ak-zqvh&x=1",
        "semicolon": f"rtsp://{host}/live;user=u;password=Semi-zqvi;chan=1",
        "signed": f"https://{host}/hls.m3u8?sig=Sig-zqvj&client_secret=Cs-zqvk&n=2",
        "encoded": f"http://u%40x:p%2Fenc%2Bzqvl@{host}/s?token=v%26al%2Fzqvm&y=1",
        "encoded_name": f"http://{host}/s?access%5Ftoken=En-zqvn&%41PIKEY=En-zqvo",
        "nested": f"http://{host}/proxy?u={nested}&z=1",
    }


WRONG_HEADERS: list[dict[str, str]] = [
    {"Authorization": "Bearer Wrong-zqvp"},
    {"Authorization": "Custom Wr-zqvq and-more-zqvq"},
    {"Authorization": "Basic dXNlcjpXci16cXZy", "Cookie": "session=Ck-zqvr; theme=dark"},
    {"X-Api-Key": "Xk-zqvs", "Proxy-Authorization": "Digest username=u, response=Pa-zqvs"},
]
WRONG_QUERIES = ["?token=Wq-zqvt", "?token=Wq-zqvt&access_token=Wq2-zqvt"]


def secret_forms(secret: str) -> set[str]:
    """A secret raw, percent-encoded and percent-decoded."""
    return {s for s in (secret, quote(secret, safe=""), unquote(secret)) if len(s) >= 3}


@dataclass
class Seen:
    """Everything the daemon showed the outside, by where it was seen."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str) -> None:
        self.texts[where] = self.texts.get(where, "") + text + "\n"


@dataclass(kw_only=True)
class Hostile:
    daemon: DaemonProcess
    seen: Seen
    secrets: list[str]


def write_config(tmp: Path, *, wav: Path, ws_port: int, http_port: int, closed_port: int,
                 broker: Mosquitto | None) -> Path:
    # Each stream source fails twice, then stays failed with its last error as the reason;
    # the looping file keeps the daemon running.
    sources = "".join(
        f'[sources.{name}]\nuri = "{uri}"\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.2\n'
        f'max_retries = 1\n\n'
        for name, uri in _sources(closed_port).items())
    sources += f'[sources.tone]\nuri = "file:{wav}?loop=true"\n\n'
    mqtt = "" if broker is None else f"""
[sinks.broker]
plugin = "mqtt"
host = "127.0.0.1"
port = {broker.port}
username = "{MQTT_USER}"
password_env = "{MQTT_PASSWORD_ENV}"
accepts = ["status"]
outbox_fsync = false
reconnect_initial_s = 0.2
reconnect_max_s = 1.0
"""
    config = tmp / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "hostile"
state_dir = "{tmp / 'state'}"
log_format = "json"
log_level = "debug"
stop_timeout_s = 20

{tiny_model_toml()}
{sources}
[sinks.ws]
plugin = "websocket"
port = {ws_port}
token_env = "{TOKEN_ENV}"
{mqtt}
[http]
port = {http_port}
""", encoding="utf-8")
    return config


async def _read_frames(ws: websockets.ClientConnection, until_s: float) -> list[str]:
    frames: list[str] = []
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline:
        try:
            frame = await asyncio.wait_for(ws.recv(), timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            break
        frames.append(frame if isinstance(frame, str) else frame.decode("utf-8", "replace"))
    return frames


async def _clients(ws_port: int, seen: Seen, statuses_of: set[str]) -> None:
    """Good clients (token in the header, in the query) read frames until every source's
    failure status arrived; bad ones are refused."""
    base = f"ws://127.0.0.1:{ws_port}/"
    for headers in WRONG_HEADERS:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(base, additional_headers=headers,
                                          open_timeout=scaled(30)):
                pass
        seen.add("ws refusal", f"{refused.value.response.status_code} "
                               f"{refused.value.response.body!r}")
    for query in WRONG_QUERIES:
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(base + query, open_timeout=scaled(30)):
                pass
    header = websockets.connect(base, additional_headers={
        "Authorization": f"Bearer {TOKEN}", "Cookie": "session=Ck2-zqvu",
        "X-Api-Key": "Xk2-zqvu"}, open_timeout=scaled(30))
    query = websockets.connect(base + "?token=" + quote(TOKEN, safe=""),
                               open_timeout=scaled(30))
    async with header as ws_a, query as ws_b:
        failed: set[str] = set()
        deadline = time.monotonic() + WAIT_S
        while failed < statuses_of and time.monotonic() < deadline:
            for frame in await _read_frames(ws_a, 0.5):
                seen.add("ws frames (header token)", frame)
                data = json.loads(frame)
                if data.get("type") == "status" and data.get("state") == "failed":
                    failed.add(str(data["source_id"]))
        assert failed >= statuses_of, f"no failure status from {statuses_of - failed}"
        # a client frame quoting a secret: answered, never echoed
        await ws_b.send(json.dumps({"type": "subscribe", "token": "Cf-zqvw",
                                    "sources": ["?token=Cf-zqvw"]}))
        await ws_b.send("not json ?access_token=Cf-zqvw")
        for frame in await _read_frames(ws_b, scaled(2)):
            seen.add("ws frames (query token)", frame)


def _http_requests(port: int, seen: Seen) -> None:
    """The HTTP server with secrets in the query, the headers and a malformed request."""
    for path in ("/healthz?token=Hq-zqvx", "/metrics?access_token=Hq-zqvx", "/nope?sig=Hq-zqvx"):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={
            "Authorization": "Custom Hh-zqvx", "Cookie": "sid=Hc-zqvx",
            "Referer": "http://u:Hr-zqvx@example.test/?token=Hr-zqvx"})
        try:
            with urllib.request.urlopen(req, timeout=scaled(30)) as resp:
                seen.add(f"http {path}", resp.read().decode())
        except urllib.error.HTTPError as err:
            seen.add(f"http {path}", err.read().decode())
    malformed = [
        b"GET /healthz?token=Hm-zqvy HTTP/1.1\r\nHost: x\r\nAuthorization: Custom Hm-zqvy\x01\r\n\r\n",
        b"GET /?token=Hm-zqvy HTTP/9.9\r\nCookie: a=Hm-zqvy\r\n\r\n",
    ]
    for raw in malformed:
        with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as sock:
            sock.sendall(raw)
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            seen.add("http raw", b"".join(chunks).decode("utf-8", "replace"))


ALL_SECRETS: list[str] = [
    TOKEN, MQTT_PASSWORD,
    "Nest-zqvc", "Inner-zqvd", "Ui-zqve", "p@ss:w0rd-zqvf", "At-zqvg", "Ak-zqvh", "Semi-zqvi",
    "Sig-zqvj", "Cs-zqvk", "p%2Fenc%2Bzqvl", "v%26al%2Fzqvm", "En-zqvn", "En-zqvo",
    "Wrong-zqvp", "Wr-zqvq", "and-more-zqvq", "Ck-zqvr", "Xk-zqvs", "Pa-zqvs", "Wq-zqvt",
    "Ck2-zqvu", "Xk2-zqvu", "Cf-zqvw", "Hh-zqvx", "Hc-zqvx", "Hr-zqvx", "Hq-zqvx", "Hm-zqvy",
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile-secrets")
    seen = Seen()
    broker: Mosquitto | None = None
    sub: subprocess.Popen[bytes] | None = None
    mqtt_out = tmp / "mqtt.txt"
    if mosquitto_path() is not None and shutil.which("mosquitto_sub") is not None:
        broker = Mosquitto(workdir=tmp / "mosquitto", users={MQTT_USER: MQTT_PASSWORD})
        broker.start()
        sub = start_mosquitto_sub(broker, "#", out=mqtt_out,
                                  extra=("-u", MQTT_USER, "-P", MQTT_PASSWORD))
    ws_port, http_port, closed_port = free_port(), free_port(), free_port()
    rng = np.random.default_rng(11)
    wav = tmp / "noise.wav"
    sf.write(wav, (0.1 * rng.standard_normal(3 * 16000)).astype(np.float32), 16000)
    config = write_config(tmp, wav=wav, ws_port=ws_port, http_port=http_port, closed_port=closed_port,
                          broker=broker)
    env = {TOKEN_ENV: TOKEN, MQTT_PASSWORD_ENV: MQTT_PASSWORD, "PYTHONUNBUFFERED": "1"}
    daemon = DaemonProcess.start(config, env=env, log=tmp / "daemon.log",
                                 jsonl=tmp / "none.jsonl", http_port=http_port)
    try:
        def listening() -> tuple[None, bool]:
            status, _, _ = http_get(daemon.http("/healthz")) if _port_open(http_port) else (0, "", "")
            return None, status != 0 and _port_open(ws_port)

        daemon.poll(listening, lambda _: f"the daemon never listened:\n{daemon.log_tail()}")
        asyncio.run(_clients(ws_port, seen, set(_sources(closed_port))))
        _http_requests(http_port, seen)
        for path in ("/healthz", "/metrics", "/config.json"):
            seen.add(path, http_get(daemon.http(path))[2])
        check = subprocess.run([*streamcap_command(), "check-config", str(config)],
                               capture_output=True, text=True, timeout=scaled(120), check=False,
                               env=daemon.env)
        seen.add("check-config", check.stdout + check.stderr)
        if broker is not None:
            daemon.wait_metric("streamcap_mqtt_connected", '{sink="broker"}', lambda v: v == 1)
        assert daemon.stop() == 0, daemon.log_tail()
        if sub is not None:
            time.sleep(scaled(0.5))
            seen.add("mqtt payloads", mqtt_out.read_text(encoding="utf-8", errors="replace"))
        seen.add("daemon log", daemon.log.read_text(encoding="utf-8", errors="replace"))
        yield Hostile(daemon=daemon, seen=seen, secrets=ALL_SECRETS)
    finally:
        daemon.kill()
        if sub is not None:
            sub.terminate()
            sub.wait(timeout=scaled(10))
        if broker is not None:
            broker.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _context(text: str, index: int) -> str:
    return text[max(0, index - 200):index + 100]


def test_the_daemon_saw_every_secret(hostile: Hostile) -> None:
    """The attack reached the daemon: failures reported, clients refused, statuses published."""
    log = hostile.seen.texts["daemon log"]
    assert "websocket client refused" in log
    for name in _sources(1):
        assert f"source {name} is failed: gave up after 2" in hostile.seen.texts["/healthz"]
    assert "***" in hostile.seen.texts["/healthz"]
    frames = hostile.seen.texts["ws frames (header token)"]
    assert '"type":"status"' in frames and "***" in frames


@pytest.mark.parametrize("where", ["daemon log", "/healthz", "/metrics", "/config.json",
                                   "check-config", "ws frames (header token)",
                                   "ws frames (query token)", "ws refusal",
                                   "mqtt payloads"])
def test_no_secret_reaches_the_outside(hostile: Hostile, where: str) -> None:
    if where not in hostile.seen.texts:
        pytest.skip(f"{where}: not collected (mosquitto not installed)")
    text = hostile.seen.texts[where]
    leaks = [f"{form!r}: ...{_context(text, text.find(form))}..."
             for secret in hostile.secrets for form in sorted(secret_forms(secret))
             if form in text]
    leaks += [f"part of a secret {m.group(0)!r}: ...{_context(text, m.start())}..."
              for m in MARKER.finditer(text)]
    assert not leaks, f"{where} shows {len(leaks)} secret(s):\n" + "\n".join(leaks[:20])


def test_check_config_refusals_show_no_secret(tmp_path: Path) -> None:
    """Every refusal of a bad config names the key and what was expected, never a secret
    (unknown schemes, secret-named URI options, secrets written into the file)."""
    config = tmp_path / "bad.toml"
    config.write_text(f"""
[sources.a]
uri = "foo://admin:Pw-zqva@cam/live?token=T-zqvb&%41PIKEY=K-zqvc"
[sources.b]
uri = "file:{tmp_path / 'none.wav'}?token=T-zqvd&password=P-zqve&loop=true"
[sources.c]
uri = "rtsp://admin:p@ss:Pw-zqvf@cam/live;password=P-zqvg"
window_s = 3
[sinks.ws]
plugin = "websocket"
token = "T-zqvh"
[sinks.m]
plugin = "mqtt"
username = "u"
password = "P-zqvi"
""", encoding="utf-8")
    for args in (["check-config", str(config)], ["--debug", "check-config", str(config)]):
        done = subprocess.run([*streamcap_command(), *args], capture_output=True, text=True,
                              timeout=scaled(120), check=False)
        out = done.stdout + done.stderr
        assert done.returncode != 0
        assert "sources.a.uri" in out and "sinks.ws.token" in out and "sinks.m.password" in out
        found = MARKER.search(out)
        assert found is None, f"{args}: ...{_context(out, found.start())}..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
