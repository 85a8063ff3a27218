"""``streamcap caption FILE...``: caption audio files window by window.

Files are decoded by the same file source the daemon uses (soundfile, or
ffmpeg for other formats), cut by the same windower, and captioned by the
same captioner, so a file gives the captions the daemon would give for it.
The end of a file is padded with silence so that its last seconds get a
window too; a file shorter than one window gets one padded window (and a
warning giving its real duration).

Everything the user typed is checked before the model loads (seconds):
``--window-s`` and ``--hop-s`` by the same rules as ``window_s`` and ``hop_s``
in a ``[sources.<name>]`` table, and every file is opened and probed as the
daemon's file source would, so a missing, unreadable or non-audio file is
reported at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import numpy as np

from streamcap.audio.windowing import Windower
from streamcap.config import ModelConfig, SourceConfig, load_config, parse_config
from streamcap.errors import ConfigError, SourceError, StreamcapError
from streamcap.messages import AudioBlock, CaptionResult, Window, make_block
from streamcap.pipeline import WindowCaptioner
from streamcap.sources.file import FileSource, create_source

_FLAGS = {"window_s": "--window-s", "hop_s": "--hop-s"}
_TABLE = "sources.caption"


def _file_source(path: Path) -> FileSource:
    return create_source(path.name, f"file:{path.resolve()}", {"realtime": False, "block_s": 1.0})


def check_files(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Open and probe every file as the file source would, decoding nothing.

    Returns:
        The files that can be captioned, and one problem line for each other
        file (missing, unreadable, a directory, not audio).
    """

    async def probe_all() -> tuple[list[Path], list[str]]:
        good: list[Path] = []
        problems: list[str] = []
        for path in paths:
            if not path.exists() and not path.is_symlink():
                problems.append(f"{path}: no such file")
                continue
            try:
                await _file_source(path).probe()
            except SourceError as exc:
                problems.append(str(exc))
            else:
                good.append(path)
        return good, problems

    return asyncio.run(probe_all())


def _file_blocks(path: Path) -> list[AudioBlock]:
    """Decode a whole file as fast as possible (blocks of 1 s)."""

    async def collect() -> list[AudioBlock]:
        async with aclosing(_file_source(path).blocks()) as blocks:
            return [block async for block in blocks]

    return asyncio.run(collect())


def short_file_warning(path: Path, blocks: list[AudioBlock], window_s: float) -> str | None:
    """The warning for a file holding less audio than one window, or None."""
    if not blocks:
        return None
    rate = blocks[0].sample_rate_hz
    total = blocks[-1].start_sample + len(blocks[-1].samples)
    if total >= window_s * rate:
        return None
    return (f"{path}: holds only {total / rate:.6g} s of audio ({total} samples at {rate} Hz), "
            f"shorter than the {window_s:g} s window; the rest of the window is silence")


def file_windows(path: Path, window_s: float, hop_s: float,
                 rates_hz: tuple[int, ...]) -> Iterator[Window]:
    """The windows of one file, the tail padded with silence.

    Raises:
        SourceError: the file is missing, unreadable, corrupt or not audio.
    """
    return cut_windows(path, _file_blocks(path), window_s, hop_s, rates_hz)


def cut_windows(path: Path, blocks: list[AudioBlock], window_s: float, hop_s: float,
                rates_hz: tuple[int, ...]) -> Iterator[Window]:
    """The windows of a decoded file's blocks, the tail padded with silence.

    Raises:
        SourceError: there are no blocks.
    """
    if not blocks:
        raise SourceError(f"{path}: no audio in the file")
    rate = blocks[0].sample_rate_hz
    total = blocks[-1].start_sample + len(blocks[-1].samples)
    windower = Windower(path.name, window_s, hop_s, rates_hz)
    for block in blocks:
        yield from windower.feed(block).windows
    pad = np.zeros(int(np.ceil((window_s + 1.0) * rate)), dtype=np.float32)
    tail = make_block(source_id=path.name, start_sample=total, sample_rate_hz=rate,
                      samples=pad, captured_at=blocks[-1].captured_at + total / rate)
    for window in windower.feed(tail).windows:
        if window.start_sample(rate) < total or window.seq == 0:  # starts inside the file
            yield window


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
    """Run ``streamcap caption``; returns the exit code (1 when any file failed)."""
    from streamcap.models.captioner import build_captioner
    from streamcap.models.runtime import choose_device, choose_precision

    model, window_s, hop_s = _settings(args)
    files, problems = check_files(list(args.files))
    for problem in problems:
        print(f"streamcap: error: {problem}", file=sys.stderr)
    if not files:
        return 1
    device = choose_device(model.device)
    dtype = choose_precision(model.precision, device)
    if model.threads:
        import torch

        torch.set_num_threads(model.threads)
    captioner: WindowCaptioner = build_captioner(
        args.model or model.bundle, model.decoding, device=device, dtype=dtype,
        codec_follows_dtype=model.codec_precision == "model")
    from streamcap.logs import configure_logging

    # transformers replaced our log handler when it loaded
    configure_logging("auto", "debug" if getattr(args, "debug", False) else "info")
    progress = _Progress(sys.stderr.isatty() and not args.json)
    failed = len(problems)
    for path in files:
        try:
            blocks = _file_blocks(path)
            windows = list(cut_windows(path, blocks, window_s, hop_s,
                                       captioner.sample_rates_hz))
        except (SourceError, StreamcapError) as exc:
            failed += 1
            print(f"streamcap: error: {exc}", file=sys.stderr)
            continue
        warning = short_file_warning(path, blocks, window_s)
        if warning is not None:
            print(f"streamcap: warning: {warning}", file=sys.stderr)
        for i, window in enumerate(windows, 1):
            progress.update(f"{path.name}: window {i}/{len(windows)}")
            started = time.perf_counter()
            result: CaptionResult = captioner.caption(window)
            elapsed = time.perf_counter() - started
            progress.clear()
            _print(path, window, result, elapsed, as_json=args.json)
    return 1 if failed else 0


def _print(path: Path, window: Window, result: CaptionResult, elapsed_s: float, *,
           as_json: bool) -> None:
    c = result.caption
    if as_json:
        print(json.dumps({
            "file": str(path), "window": window.seq, "start_s": round(window.start_s, 3),
            "end_s": round(window.end_s, 3), "text": c.text, "score": round(c.score, 4),
            "flagged": c.flagged, "seconds": round(elapsed_s, 3), "model": c.model,
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
