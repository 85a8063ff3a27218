"""Logging: structlog for streamcap, with the standard library routed through it.

JSON lines when stderr is not a terminal (journald, files, pipes) or when
``log_format = "json"``; coloured key=value lines on a terminal. Every string
value passes through :func:`redact` so that credentials in stream URLs
(``rtsp://user:pass@cam/...``, ``?token=...``) never reach a log.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

_USERINFO_RE: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_QUERY_SECRET_RE: Final = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pass|pwd|token|access_token|auth|key|api_key|secret)=)"
    r"[^&;\s#]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Hide user info and secret query parameters in any URL inside ``text``.

    >>> redact("rtsp://admin:hunter2@10.0.0.5/live?token=abc&x=1")
    'rtsp://***@10.0.0.5/live?token=***&x=1'
    """
    text = _USERINFO_RE.sub(r"\g<scheme>***@", text)
    return _QUERY_SECRET_RE.sub(r"\g<key>***", text)


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and ("=" in value or "@" in value):
            event[key] = redact(value)
    return event


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog and the standard library's root logger.

    Args:
        log_format: "auto" (console on a TTY, else JSON), "json" or "console".
        level: debug, info, warning or error.
    """
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    numeric = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _redact_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Chatty libraries stay at warning unless we debug.
    for name in ("transformers", "urllib3", "websockets", "asyncio", "filelock"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)


def _identity(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named after the module (``get_logger(__name__)``)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
