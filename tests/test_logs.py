"""Tests for streamcap.logs: redaction, JSON lines, stdlib logging routed through structlog."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from streamcap.logs import configure_logging, get_logger
from streamcap.redact import redact

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("text", "expected"), [
    ("rtsp://admin:hunter2@10.0.0.5/live?token=abc&x=1",
     "rtsp://***@10.0.0.5/live?token=***&x=1"),
    ("http://user:pass@radio.example:8000/stream.mp3",
     "http://***@radio.example:8000/stream.mp3"),
    ("https://bob@host/x", "https://***@host/x"),
    ("rtsp://user:p@ss@cam/stream", "rtsp://***@cam/stream"),  # unencoded '@' in a password
    ("https://host/x?password=p&api_key=k#frag", "https://host/x?password=***&api_key=***#frag"),
    ("http://host/hls.m3u8?a=1&Token=T0K&b=2", "http://host/hls.m3u8?a=1&Token=***&b=2"),
    ("https://host/x?access_token=zz;pwd=qq", "https://host/x?access_token=***;pwd=***"),
    ("opening rtsp://a:b@cam1/s and http://c:d@cam2/t?auth=e now",
     "opening rtsp://***@cam1/s and http://***@cam2/t?auth=*** now"),
    ("http://host/path?email=a@b.c", "http://host/path?email=a@b.c"),
])
def test_redact_urls(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "hunter2" not in redact(text)


@pytest.mark.parametrize("text", [
    "no url here",
    "window_s=10 hop_s=5",
    "mail bob@example.com about key=value",
    "file:/srv/clip.wav?loop=true&realtime=false",
    "mic:default",
    "udp://0.0.0.0:5004",
    "",
])
def test_redact_leaves_text_without_credentials_unchanged(text: str) -> None:
    assert redact(text) == text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging's global changes after a test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in ("transformers", "urllib3", "websockets", "asyncio", "filelock"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_from_structlog_and_stdlib(capsys: pytest.CaptureFixture[str],
                                             restore_logging: None) -> None:
    configure_logging("json", "info")
    get_logger("streamcap.test").info("source started", source="kitchen", blocks=3)
    logging.getLogger("some.library").warning("library says %s", "hello")
    logging.getLogger("some.library").debug("below the level")
    out, err = capsys.readouterr()
    assert out == ""
    lines = _json_lines(err)
    assert len(lines) == 2
    first, second = lines
    assert first["event"] == "source started"
    assert (first["level"], first["logger"], first["source"], first["blocks"]) == (
        "info", "streamcap.test", "kitchen", 3)
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "library says hello"
    assert (second["level"], second["logger"]) == ("warning", "some.library")
    assert "timestamp" in second


def test_credentials_in_logged_urls_are_redacted(capsys: pytest.CaptureFixture[str],
                                                 restore_logging: None) -> None:
    configure_logging("json", "info")
    log = get_logger("streamcap.test")
    log.info("connecting", uri="rtsp://admin:hunter2@cam/live?token=s3cret")
    log.info("sources", uris=["rtsp://admin:hunter2@cam/a"], extra={"u": "http://x:hunter2@h/"})
    Pair = namedtuple("Pair", "a b")
    log.info("pair", pair=Pair("rtsp://admin:hunter2@cam/", 1))  # left as is, must not crash
    logging.getLogger("ffmpeg").error("cannot open %s", "http://user:hunter2@radio/s?key=s3cret")
    try:
        raise OSError("connect to rtsp://admin:hunter2@cam/live failed")
    except OSError:
        log.exception("stream failed")
    err = capsys.readouterr().err
    lines = _json_lines(err)
    assert [line["event"] for line in lines] == [
        "connecting", "sources", "pair", "cannot open http://***@radio/s?key=***",
        "stream failed"]
    assert lines[0]["uri"] == "rtsp://***@cam/live?token=***"
    assert lines[1]["uris"] == ["rtsp://***@cam/a"]
    assert lines[1]["extra"] == {"u": "http://***@h/"}
    assert "rtsp://***@cam/live failed" in lines[4]["exception"]
    assert "s3cret" not in err
    assert err.count("hunter2") == 1  # only inside the named tuple's repr


def test_console_format_is_readable_and_redacted(capsys: pytest.CaptureFixture[str],
                                                 restore_logging: None) -> None:
    configure_logging("console", "debug")
    log = get_logger("streamcap.test")
    log.debug("connecting", uri="rtsp://admin:hunter2@cam/live")
    try:
        raise OSError("connect to rtsp://admin:hunter2@cam/live failed")
    except OSError:
        log.exception("stream failed")
    err = capsys.readouterr().err
    assert "connecting" in err and "rtsp://***@cam/live" in err
    assert "OSError: connect to rtsp://***@cam/live failed" in err
    assert "hunter2" not in err
    assert not err.lstrip().startswith("{")


def test_level_filters_structlog_and_chatty_libraries(capsys: pytest.CaptureFixture[str],
                                                      restore_logging: None) -> None:
    configure_logging("json", "warning")
    get_logger("streamcap.test").info("hidden")
    get_logger("streamcap.test").error("shown")
    logging.getLogger("transformers").warning("library warning")
    assert [line["event"] for line in _json_lines(capsys.readouterr().err)] == [
        "shown", "library warning"]
    configure_logging("json", "info")
    logging.getLogger("transformers").info("chatty at info")
    get_logger("streamcap.test").info("ours at info")
    assert [line["event"] for line in _json_lines(capsys.readouterr().err)] == ["ours at info"]
    configure_logging("json", "debug")
    logging.getLogger("transformers").info("chatty")
    get_logger("streamcap.test").debug("debugging")
    assert [line["event"] for line in _json_lines(capsys.readouterr().err)] == [
        "chatty", "debugging"]


def test_transformers_logging_is_routed_through_structlog(
        capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.test")  # transformers installs its own handler
    configure_logging("json", "info")
    hf_logging.get_logger("transformers.test").warning("from transformers")
    [line] = _json_lines(capsys.readouterr().err)
    assert (line["event"], line["logger"], line["level"]) == (
        "from transformers", "transformers.test", "warning")


def test_auto_format_is_json_when_stderr_is_not_a_terminal() -> None:
    code = textwrap.dedent("""
        import logging, warnings
        from streamcap.logs import configure_logging, get_logger
        configure_logging("auto", "info")
        get_logger("streamcap.sub").info("hello", uri="rtsp://u:hunter2@cam/x")
        logging.getLogger("lib").info("from stdlib")
        warnings.warn("a python warning")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = _json_lines(done.stderr)
    assert [line["event"] for line in lines[:2]] == ["hello", "from stdlib"]
    assert lines[0]["uri"] == "rtsp://***@cam/x"
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
    # Python warnings go through logging too (logger "py.warnings").
    assert lines[2]["logger"] == "py.warnings"
    assert "a python warning" in lines[2]["event"]
    assert "hunter2" not in done.stderr
