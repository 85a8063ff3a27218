"""Logging: structlog for streamcap, with the standard library routed through it.

JSON lines when stderr is not a terminal (journald, files, pipes) or when
``log_format = "json"``; coloured key=value lines on a terminal. Every string
value passes through :func:`streamcap.redact.redact` (the :func:`redact_event`
processor) so that credentials in stream URLs (``rtsp://user:pass@cam/...``,
``?token=...``, ``;password=...``) and authorization headers never reach a log;
the value of a key that names a secret (``password=...``) is hidden whole. This holds
for every logger: the libraries' records (websockets, aiohttp, aiomqtt, asyncio log
request lines and headers at debug) go through the same processors, their extra
fields included; any other object in an event is rendered here (its ``repr()``)
and redacted, and a traceback is redacted once formatted. Uncaught exceptions (main
thread, other threads, ``__del__``) are logged, not printed by Python as they are.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Hashable, MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

from streamcap.clock import Clock, SystemClock
from streamcap.redact import REDACTED, is_secret_key, redact

_PLAIN: tuple[type, ...] = (int, float, bool, type(None))
_KEPT_AS_IS: frozenset[str] = frozenset({"exc_info", "stack_info"})
"""Event keys a later processor renders itself (and redacts: see :func:`configure_logging`)."""


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PLAIN):
        return value
    if type(value) in (list, tuple):  # exactly: a named tuple cannot be rebuilt this way
        return type(value)(_redact_value(v) for v in value)
    if type(value) is dict:
        return {k: _redact_field(k, v) for k, v in value.items()}
    # Any other object (a named tuple, a URL object, a request) would be rendered with its
    # repr(), out of our sight: render it here, redacted.
    return redact(_render(value))


def _render(value: object) -> str:
    structlog_repr = getattr(value, "__structlog__", None)
    if callable(structlog_repr):
        return str(structlog_repr())
    return repr(value)


def _redact_field(key: object, value: Any) -> Any:
    if isinstance(key, str) and is_secret_key(key) and value is not None:
        return REDACTED
    return _redact_value(value)


def redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The structlog processor: every string value through :func:`~streamcap.redact.redact`,
    other objects as their redacted ``repr()``, and the whole value of a key that names a
    secret (``password=...``, ``token=...``). ``exc_info`` and structlog's own ``_``-keys
    are left for later processors (the traceback is redacted once formatted)."""
    for key, value in event.items():
        if key in _KEPT_AS_IS or (isinstance(key, str) and key.startswith("_")):
            continue
        event[key] = _redact_field(key, value)
    return event


def _redacted_traceback(sio: TextIO, exc_info: Any) -> None:
    """A plain traceback (no local variables) with URLs redacted, for the console."""
    buffer = io.StringIO()
    structlog.dev.plain_traceback(buffer, exc_info)
    sio.write(redact(buffer.getvalue()))


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
        redact_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                           exception_formatter=_redacted_traceback)
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
            redact_event,  # again: exception text formatted just above
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Chatty libraries stay at warning unless we debug.
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        # transformers gives its logger a handler of its own and stops propagation.
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    for name in ("transformers", "urllib3", "websockets", "asyncio", "filelock"):
        library = logging.getLogger(name)
        library.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
        library.propagate = True
    logging.captureWarnings(True)
    # Uncaught exceptions would be printed by Python itself, unredacted: log them instead.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


_UNCAUGHT = logging.getLogger("streamcap.uncaught")


def _log_uncaught(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    """``sys.excepthook``: the traceback as a (redacted) log record."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    _UNCAUGHT.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: likewise, naming the thread."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = args.exc_value
    _UNCAUGHT.error("uncaught exception in thread %s", name,
                    exc_info=(args.exc_type, exc, args.exc_traceback) if exc is not None else None)


def _log_unraisable(args: Any) -> None:
    """``sys.unraisablehook`` (an exception in ``__del__``, say): likewise."""
    exc = args.exc_value
    exc_info = (args.exc_type, exc, args.exc_traceback) if exc is not None else None
    _UNCAUGHT.error("exception ignored in %r%s", args.object,
                    f": {args.err_msg}" if args.err_msg else "", exc_info=exc_info)


class Throttle:
    """At most one log line per key per interval, for events a peer can repeat at will
    (refused connections, malformed frames, accept errors).

    ``allow(key)`` returns None when the line must be held back (it is counted), or
    the number of lines held back for ``key`` since the last one that was let through,
    to be logged with it (``suppressed=n``)::

        if (held := throttle.allow(("token", remote_ip))) is not None:
            log.warning("websocket client refused: invalid token", suppressed=held)

    At most ``max_keys`` keys are remembered (the least recently seen are forgotten),
    so a flood of distinct keys cannot grow memory.
    """

    def __init__(self, interval_s: float = 60.0, *, clock: Clock | None = None,
                 max_keys: int = 1024) -> None:
        if not interval_s > 0 or max_keys < 1:
            raise ValueError(f"Throttle: interval_s must be > 0 and max_keys >= 1 "
                             f"(got {interval_s}, {max_keys})")
        self.interval_s = interval_s
        self._clock = clock or SystemClock()
        self._max_keys = max_keys
        self._keys: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        self.suppressed_total = 0
        """Lines held back so far, over all keys."""

    def allow(self, key: Hashable = None) -> int | None:
        """None: hold this line back; else log it, with the count held back before it."""
        now = self._clock.monotonic()
        last = self._keys.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._keys[key] = (last[0], last[1] + 1)
            self._keys.move_to_end(key)
            self.suppressed_total += 1
            return None
        self._keys[key] = (now, 0)
        self._keys.move_to_end(key)
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)
        return 0 if last is None else last[1]


def _identity(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named after the module (``get_logger(__name__)``)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
