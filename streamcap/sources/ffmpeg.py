"""An ffmpeg child process decoding to raw float32 mono PCM on its stdout.

Shared by the file source (formats soundfile cannot read) and the stream
source. The process is started with ``asyncio.create_subprocess_exec``; its
stderr is read by a named task into a bounded tail that goes into error
messages; :meth:`FfmpegPipe.close` kills and reaps it, so that neither a
zombie nor a running ffmpeg outlives the source.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence

import numpy as np

from streamcap.errors import SourceUnavailable
from streamcap.logs import get_logger
from streamcap.messages import Float32Array

_log = get_logger(__name__)

STDERR_LINES = 20
"""How many of ffmpeg's last stderr lines are kept for error messages."""

_MAX_LINE_CHARS = 400
_BYTES_PER_SAMPLE = 4


def decode_args(
    ffmpeg: str,
    input_args: Sequence[str],
    source: str,
    sample_rate_hz: int,
) -> list[str]:
    """The command line that decodes ``source`` to f32le mono at ``sample_rate_hz`` on stdout."""
    return [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        *input_args,
        "-i",
        source,
        "-vn",
        "-sn",
        "-dn",
        "-f",
        "f32le",
        "-ac",
        "1",
        "-ar",
        str(sample_rate_hz),
        "pipe:1",
    ]


class FfmpegPipe:
    """A running ffmpeg whose stdout carries float32 little-endian mono samples.

    Use :meth:`start`, then :meth:`read` until it returns fewer samples than
    asked for (end of output), then :meth:`close` (always, also on errors
    and cancellation).
    """

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        what: str,
        task_prefix: str,
        secrets: Sequence[str] = (),
    ) -> None:
        self._proc = proc
        self._what = what
        self._secrets = tuple(secrets)
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._stderr_task = asyncio.create_task(
            self._read_stderr(), name=f"{task_prefix}.ffmpeg-stderr"
        )
        self._pending = b""

    @classmethod
    async def start(
        cls,
        args: Sequence[str],
        *,
        what: str,
        task_prefix: str,
        secrets: Sequence[str] = (),
    ) -> FfmpegPipe:
        """Start ffmpeg with ``args`` (``args[0]`` is the executable).

        Args:
            args: Full command line, e.g. from :func:`decode_args`.
            what: Redacted description of the input for messages.
            task_prefix: ``streamcap[source:<id>]``; the stderr task gets ``.ffmpeg-stderr``.
            secrets: Strings (credentials) replaced by ``***`` in the kept stderr lines.

        Raises:
            SourceUnavailable: the executable is missing or cannot be run.
        """
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            raise SourceUnavailable(
                f"cannot decode {what}: ffmpeg executable {args[0]!r} not found "
                "(install ffmpeg or set the source option 'ffmpeg')"
            ) from exc
        except OSError as exc:
            raise SourceUnavailable(
                f"cannot decode {what}: running {args[0]!r} failed: {exc}"
            ) from exc
        return cls(proc, what=what, task_prefix=task_prefix, secrets=secrets)

    @property
    def pid(self) -> int:
        """The process id of ffmpeg."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """ffmpeg's exit status once it has been reaped, else ``None``."""
        return self._proc.returncode

    def stderr_tail(self) -> str:
        """ffmpeg's last stderr lines joined with ``" | "`` (empty if it said nothing)."""
        return " | ".join(self._stderr)

    async def _read_stderr(self) -> None:
        stream = self._proc.stderr
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                # A line longer than the stream limit; drop what was buffered and go on.
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            for secret in self._secrets:
                text = text.replace(secret, "***")
            if text:
                self._stderr.append(text[:_MAX_LINE_CHARS])

    async def read(self, n_samples: int) -> Float32Array:
        """Read up to ``n_samples`` samples; fewer only at the end of ffmpeg's output.

        Returns:
            float32 array of shape (m,), ``m <= n_samples``; ``m == 0`` at the end.
        """
        stdout = self._proc.stdout
        if stdout is None:
            return np.zeros(0, dtype=np.float32)
        want = n_samples * _BYTES_PER_SAMPLE - len(self._pending)
        try:
            data = self._pending + await stdout.readexactly(want)
            self._pending = b""
        except asyncio.IncompleteReadError as exc:
            data = self._pending + exc.partial
            self._pending = b""
        usable = len(data) - len(data) % _BYTES_PER_SAMPLE
        # a trailing partial sample is dropped (ffmpeg only writes whole samples)
        return np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)

    async def wait(self) -> int:
        """Wait for ffmpeg to exit and for its stderr to be read; return the exit status."""
        code = await self._proc.wait()
        # asyncio.wait neither cancels the reader nor swallows a cancellation of the caller
        # (which must end the source, not let it go on to another pass).
        await asyncio.wait([self._stderr_task], timeout=1.0)
        return code

    async def close(self) -> None:
        """Kill ffmpeg if it still runs and reap it; safe to call more than once."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        try:
            # wait() only returns once every pipe reached EOF: drain what a
            # killed ffmpeg left in stdout, or a paused pipe would block it.
            stdout = self._proc.stdout
            if stdout is not None:
                while await stdout.read(1 << 16):
                    pass
            await self._proc.wait()
        finally:
            task = self._stderr_task
            if not task.done():
                task.cancel()
                await asyncio.wait([task])  # a cancellation of the caller still propagates
            if task.done() and not task.cancelled() and task.exception() is not None:
                _log.debug("ffmpeg stderr reader failed", source=self._what,
                           error=repr(task.exception()))
        _log.debug("ffmpeg exited", source=self._what, returncode=self._proc.returncode)

    def failure_message(self, code: int | None) -> str:
        """Describe an exit of ffmpeg: the input, the exit status and its last stderr lines."""
        tail = self.stderr_tail()
        said = f": {tail}" if tail else " (no message on stderr)"
        return f"ffmpeg exited with code {code} while reading {self._what}{said}"
