"""The one exception tree of streamcap.

::

    StreamcapError
    ├── ConfigError          bad config file, key or value; CLI exit code 2, no traceback
    ├── PluginError          installed plugin fails to import, crashes or fails the protocol
    ├── SourceError          an audio source cannot deliver
    │   ├── SourceUnavailable    device, file or URL cannot be opened now; the watchdog retries
    │   └── SourceFormatError    the input exists but cannot be decoded (corrupt, unsupported)
    ├── ModelError           a model cannot be built, loaded or run
    │   └── WeightsError         missing weight file, wrong layout or checksum mismatch
    └── InboxClosed          internal signal to sinks that the bus is shutting down

Adapters convert library exceptions into these with ``raise ... from exc``; no
third-party exception type escapes its adapter.
"""

from __future__ import annotations

from streamcap.redact import redact


class StreamcapError(Exception):
    """Base class of every error streamcap raises on purpose.

    Its message is redacted (:func:`streamcap.redact.redact`) when the error is
    made, so that a URL with credentials quoted in it never reaches a terminal,
    a log line or a status reason.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class ConfigError(StreamcapError):
    """A configuration problem; the message names the dotted key and what was expected.

    ``problems`` holds every problem found, one line each, so that a user fixes
    a bad file in one pass instead of one error per run.
    """

    def __init__(self, problems: str | list[str]) -> None:
        found = [problems] if isinstance(problems, str) else list(problems)
        self.problems: list[str] = [redact(problem) for problem in found]
        super().__init__("\n".join(self.problems))


class PluginError(StreamcapError):
    """An installed plugin could not be imported or verified (one the config names but
    that is not installed is a ConfigError)."""


class SourceError(StreamcapError):
    """An audio source failed."""


class SourceUnavailable(SourceError):
    """The device, file or URL cannot be opened or stopped delivering; retrying may help."""


class SourceFormatError(SourceError):
    """The input was reached but cannot be decoded: corrupt or unsupported."""


class ModelError(StreamcapError):
    """A model cannot be built, loaded or run."""


class WeightsError(ModelError):
    """A weight file is missing, malformed, or does not match its recorded hash."""


class HistoryError(StreamcapError):
    """The history store cannot be opened, read or written; the message names its location."""


class HistoryCursorError(HistoryError):
    """A history page's cursor is not one the store made (a client's mistake, not the
    store's: the HTTP API answers 400)."""


class InboxClosed(StreamcapError):
    """Raised by an inbox's ``get`` once it is closed and empty."""
