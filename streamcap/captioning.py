"""``streamcap caption FILE...``: caption audio files window by window.

Files are decoded by the same file source the daemon uses (soundfile, or
ffmpeg for other formats), cut by the same windower, and captioned by the
same captioner, so a file gives the captions the daemon would give for it.
The end of a file is padded with silence so that its last seconds get a
window too; a file shorter than one window gets one padded window (and a
warning giving its real duration).

A file is streamed: read one block at a time and each window captioned and
printed as soon as it is complete, so memory stays at a few windows however
long the file is, and the first caption comes after one window of audio.

Everything the user typed is checked before the model loads (seconds):
``--window-s`` and ``--hop-s`` by the same rules as ``window_s`` and ``hop_s``
in a ``[sources.<name>]`` table, and every file is opened and probed as the
daemon's file source would, so a missing, unreadable or non-audio file is
reported at once. An input that is no regular file (a FIFO, a device, a
socket, a directory, or a link to one) is refused before anything is read
from it, with exit status 2 (a usage error); a file that fails otherwise
is reported and the others are still captioned (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from streamcap.audio.windowing import Windower
from streamcap.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from streamcap.config import ModelConfig, SourceConfig, load_config, parse_config
from streamcap.errors import ConfigError, SourceError, StreamcapError
from streamcap.messages import CaptionResult, Window, make_block
from streamcap.options import irregular_file
from streamcap.pipeline import SkippedWindow, WindowCaptioner
from streamcap.sources.base import FileOptions
from streamcap.sources.file import FileSource

_FLAGS = {"window_s": "--window-s", "hop_s": "--hop-s"}
_TABLE = "sources.caption"
_BLOCK_S = 1.0

T = TypeVar("T")


def _file_source(path: Path) -> FileSource:
    # The path is a path, never a URI: a name holding "?loop=true" stays part of the name.
    return FileSource(path.name, path.absolute(), FileOptions(realtime=False, block_s=_BLOCK_S))


@dataclass(frozen=True, slots=True)
class CheckedFiles:
    """What :func:`check_files` found.

    Attributes:
        good: The files that can be captioned, in the order given.
        problems: One line for each file that cannot (missing, unreadable, not audio).
        refused: One line for each input that is no regular file (a FIFO,
            device, socket or directory): a usage error.
    """

    good: list[Path]
    problems: list[str]
    refused: list[str]


def check_files(paths: list[Path]) -> CheckedFiles:
    """Examine and probe every file as the file source would, decoding nothing.

    A FIFO, device, socket or directory is found with ``os.stat`` and never opened.
    """

    async def probe_all() -> CheckedFiles:
        found = CheckedFiles([], [], [])
        for path in paths:
            if not path.exists() and not path.is_symlink():
                found.problems.append(f"{path}: no such file")
                continue
            if (what := irregular_file(path)) is not None:
                found.refused.append(f"{path} is {what}, not a regular file; "
                                     f"expected an audio file")
                continue
            try:
                await _file_source(path).probe()
            except SourceError as exc:
                found.problems.append(str(exc))
            else:
                found.good.append(path)
        return found

    return asyncio.run(probe_all())


@dataclass(frozen=True, slots=True)
class FileEnd:
    """The end of a file's audio, reached before its padded tail windows.

    Attributes:
        total_samples: The samples the file held.
        sample_rate_hz: Their rate.
    """

    total_samples: int
    sample_rate_hz: int


def short_file_warning(path: Path, end: FileEnd, window_s: float) -> str | None:
    """The warning for a file holding less audio than one window, or None."""
    total, rate = end.total_samples, end.sample_rate_hz
    if total >= window_s * rate:
        return None
    return (f"{path}: holds only {total / rate:.6g} s of audio ({total} samples at {rate} Hz), "
            f"shorter than the {window_s:g} s window; the rest of the window is silence")


async def stream_windows(path: Path, window_s: float, hop_s: float,
                         rates_hz: tuple[int, ...]) -> AsyncGenerator[Window | FileEnd, None]:
    """The windows of one file as its blocks are read, then :class:`FileEnd`, then the
    windows of its tail padded with silence.

    Raises:
        SourceError: the file is missing, unreadable, corrupt or not audio.
    """
    windower = Windower(path.name, window_s, hop_s, rates_hz)
    total = 0
    rate: int | None = None
    captured_at = 0.0
    async with aclosing(_file_source(path).blocks()) as blocks:
        async for block in blocks:
            if rate is None:
                rate, captured_at = block.sample_rate_hz, block.captured_at
            total = block.start_sample + len(block.samples)
            for window in windower.feed(block).windows:
                yield window
    if rate is None:
        raise SourceError(f"{path}: no audio in the file")
    yield FileEnd(total, rate)
    pad = np.zeros(int(np.ceil((window_s + 1.0) * rate)), dtype=np.float32)
    tail = make_block(source_id=path.name, start_sample=total, sample_rate_hz=rate,
                      samples=pad, captured_at=captured_at + total / rate)
    for window in windower.feed(tail).windows:
        if window.start_sample(rate) < total or window.seq == 0:  # starts inside the file
            yield window


def iterate(agen: AsyncGenerator[T, None]) -> Iterator[T]:
    """Drive an async generator from synchronous code, one item at a time, on a loop
    of its own; the generator is closed however the iteration ends."""
    loop = asyncio.new_event_loop()

    async def step() -> T:
        return await anext(agen)

    try:
        while True:
            try:
                item = loop.run_until_complete(step())
            except StopAsyncIteration:
                return
            yield item
    finally:
        try:
            loop.run_until_complete(agen.aclose())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def file_windows(path: Path, window_s: float, hop_s: float,
                 rates_hz: tuple[int, ...]) -> Iterator[Window]:
    """The windows of one file, streamed, the tail padded with silence.

    Raises:
        SourceError: the file is missing, unreadable, corrupt or not audio.
    """
    for item in iterate(stream_windows(path, window_s, hop_s, rates_hz)):
        if isinstance(item, Window):
            yield item


class _Progress:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def update(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[2K" + text)
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def _settings(args: argparse.Namespace) -> tuple[ModelConfig, float, float]:
    """The model settings and window lengths: the config file's, then the flags.

    The flags are checked by the config's own rules for ``window_s`` and
    ``hop_s`` (the daemon's bounds); problems name the flag.

    Raises:
        ConfigError: a bad config file or flag value.
    """
    model = ModelConfig()
    source = SourceConfig(name="file", uri="file:-")
    if args.config is not None:
        config = load_config(args.config)
        model = config.model
        source = next(iter(config.sources.values()), source)
    table: dict[str, object] = {"uri": "file:-", "window_s": source.window_s}
    if args.window_s is not None:
        table["window_s"] = args.window_s
    if args.hop_s is not None:
        table["hop_s"] = args.hop_s
    try:
        checked = parse_config({"sources": {"caption": table}}).sources["caption"]
    except ConfigError as exc:
        raise ConfigError([_flag_problem(p) for p in exc.problems]) from None
    window_s = checked.window_s
    hop_s = checked.hop_s if args.hop_s is not None else min(source.hop_s, window_s)
    return model, window_s, hop_s


def _flag_problem(problem: str) -> str:
    """``sources.caption.window_s: ...`` as ``--window-s: ...``."""
    for key, flag in _FLAGS.items():
        prefix = f"{_TABLE}.{key}:"
        if problem.startswith(prefix):
            return flag + problem[len(prefix) - 1:]
    return problem


def caption_files_command(args: argparse.Namespace) -> int:
    """Run ``streamcap caption``; returns the exit code (1 when any file failed, 2 when an
    input is no regular file)."""
    from streamcap.models.captioner import build_captioner
    from streamcap.models.runtime import choose_device, choose_plan

    model, window_s, hop_s = _settings(args)
    checked = check_files(list(args.files))
    for problem in checked.refused + checked.problems:
        print(f"streamcap: error: {problem}", file=sys.stderr)
    if checked.refused:
        return EXIT_USAGE
    if not checked.good:
        return EXIT_FAILURE
    device = choose_device(model.device)
    plan = choose_plan(model.precision, device, codec_precision=model.codec_precision)
    dtype = plan.dtype
    if model.threads:
        import torch

        torch.set_num_threads(model.threads)
    captioner: WindowCaptioner = build_captioner(
        args.model or model.bundle, model.decoding, device=device, dtype=dtype,
        codec_follows_dtype=model.codec_precision == "model", abstention=model.abstention,
        int8=plan.int8)
    from streamcap.logs import configure_logging

    # transformers replaced our log handler when it loaded
    configure_logging("auto", "debug" if getattr(args, "debug", False) else "info")
    progress = _Progress(sys.stderr.isatty() and not args.json)
    failed = len(checked.problems)
    for path in checked.good:
        try:
            for item in iterate(stream_windows(path, window_s, hop_s,
                                               captioner.sample_rates_hz)):
                if isinstance(item, FileEnd):
                    warning = short_file_warning(path, item, window_s)
                    if warning is not None:
                        print(f"streamcap: warning: {warning}", file=sys.stderr)
                    continue
                progress.update(f"{path.name}: window {item.seq + 1} at {item.start_s:.0f} s")
                started = time.perf_counter()
                result = captioner.caption(item)
                elapsed = time.perf_counter() - started
                if isinstance(result, SkippedWindow):  # a guarded captioner's; none is here
                    continue
                progress.clear()
                _print(path, item, result, elapsed, as_json=args.json)
        except StreamcapError as exc:  # a source's or the model's
            progress.clear()
            failed += 1
            print(f"streamcap: error: {exc}", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def _print(path: Path, window: Window, result: CaptionResult, elapsed_s: float, *,
           as_json: bool) -> None:
    c = result.caption
    if as_json:
        print(json.dumps({
            "file": str(path), "window": window.seq, "start_s": round(window.start_s, 3),
            "end_s": round(window.end_s, 3), "text": c.text, "score": round(c.score, 4),
            "flagged": c.flagged, "seconds": round(elapsed_s, 3), "model": c.model,
            "confidence": None if c.confidence is None else round(c.confidence, 4),
            "abstained": c.abstained,
            "stages": {k: round(v, 4) for k, v in result.stage_seconds.items()},
            "candidates": [{"text": k.text, "score": round(k.score, 4),
                            "decoder_score": round(k.decoder_score, 4),
                            "encoder_score": None if k.encoder_score is None
                            else round(k.encoder_score, 4),
                            "flagged": k.flagged} for k in c.candidates],
        }, ensure_ascii=False), flush=True)
        return
    flag = " (flagged)" if c.flagged else ""
    # One line per window, whatever the model wrote (newlines, control characters).
    text = "".join(ch if ch.isprintable() else " " for ch in c.text)
    print(f"{path.name} {window.start_s:7.1f}-{window.end_s:<7.1f} score {c.score:+.3f} "
          f"{elapsed_s:5.2f}s  {text}{flag}", flush=True)
