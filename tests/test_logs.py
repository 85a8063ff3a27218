"""Tests for streamcap.logs: redaction, JSON lines, stdlib logging routed through structlog."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from test_redact import SECRET, SECRET_FORMS

from streamcap.clock import FakeClock
from streamcap.logs import Throttle, configure_logging, get_logger

ROOT = Path(__file__).resolve().parent.parent


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
    sys.excepthook, threading.excepthook = sys.__excepthook__, threading.__excepthook__
    sys.unraisablehook = sys.__unraisablehook__


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
    log.info("pair", pair=Pair("rtsp://admin:hunter2@cam/", 1))  # rendered as its repr, redacted
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
    assert lines[2]["pair"] == "Pair(a='rtsp://***@cam/', b=1)"
    assert "hunter2" not in err


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


# ------------------------------------------------------------------ every secret form


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_every_secret_form_is_redacted_in_a_log_line(form: str, restore_logging: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    log = get_logger("streamcap.test")
    log.info("connecting", uri=form, fields={"nested": [form]})
    log.info(f"event text quotes {form}")
    logging.getLogger("some.library").warning("library quotes %s", form)
    try:
        raise OSError(f"connect to {form} failed")
    except OSError:
        log.exception("stream failed")
    err = capsys.readouterr().err
    assert len(_json_lines(err)) == 4
    assert SECRET not in err


def test_a_secret_named_field_is_hidden_whole(restore_logging: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    get_logger("streamcap.test").info("login", user="bob", password=SECRET,
                                      headers={"Authorization": f"Bearer {SECRET}"})
    [line] = _json_lines(capsys.readouterr().err)
    assert (line["user"], line["password"], line["headers"]) == (
        "bob", "***", {"Authorization": "***"})


def test_throttle_lets_one_line_per_interval_and_counts_the_rest() -> None:
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(5)] == [None] * 5
    assert throttle.allow("b") == 0  # keys are independent
    clock.advance(10.0)
    assert throttle.allow("a") == 5  # logged with the five held back
    assert throttle.allow("a") is None
    assert throttle.suppressed_total == 6


def test_throttle_remembers_a_bounded_number_of_keys() -> None:
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock, max_keys=3)
    for key in range(100):
        assert throttle.allow(key) == 0
    assert len(throttle._keys) == 3
    assert throttle.allow(99) is None and throttle.allow(0) == 0  # 0 was forgotten


def test_throttle_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        Throttle(0.0)
    with pytest.raises(ValueError, match="max_keys"):
        Throttle(1.0, max_keys=0)


class _Url:
    """An object whose repr() quotes a URL, as URL and request objects do."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"_Url({self.url!r})"


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_objects_in_a_log_event_are_rendered_redacted(
        form: str, restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    """structlog renders other objects with repr() after every processor: they are
    rendered, redacted, by the redaction itself (log extras of libraries included)."""
    configure_logging("json", "info")
    get_logger("streamcap.test").info("request", target=_Url(form))
    logging.getLogger("some.library").info("request", extra={"request": _Url(form)})
    err = capsys.readouterr().err
    first, second = _json_lines(err)
    assert first["target"].startswith("_Url(") and second["request"].startswith("_Url(")
    assert SECRET not in err


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_uncaught_exceptions_are_logged_redacted(log_format: str) -> None:
    """An exception nobody catches (main thread, another thread, __del__) is logged through
    the redaction, never printed by Python as is."""
    code = textwrap.dedent(f"""
        import threading
        from streamcap.logs import configure_logging
        configure_logging({log_format!r}, "info")

        def fail():
            raise OSError("cannot open rtsp://admin:{SECRET}@cam/live?token={SECRET}")

        class Leaky:
            def __del__(self):
                raise ValueError("Authorization: Bearer {SECRET}")

        thread = threading.Thread(target=fail, name="worker")
        thread.start()
        thread.join()
        Leaky()
        fail()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert SECRET not in done.stderr
    assert "uncaught exception in thread worker" in done.stderr
    assert "exception ignored in" in done.stderr
    assert done.stderr.count("OSError: cannot open rtsp://***@cam/live?token=***") == 2
    if log_format == "json":
        levels = [line["level"] for line in _json_lines(done.stderr)]
        assert levels == ["error", "error", "critical"]
