"""Whole-file audio reading for offline work (training data, features, evaluation).

WAV, FLAC, OGG, AIFF and AU files are read with soundfile; other formats
(mp3, m4a, opus, ...) are decoded by an ``ffmpeg`` child to float32 mono.
Unlike the live file source this reads a whole clip at once, synchronously.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf

from streamcap.audio.resample import resample
from streamcap.errors import SourceFormatError, SourceUnavailable
from streamcap.sources.ffmpeg import decode_args
from streamcap.sources.file import SOUNDFILE_SUFFIXES, ffprobe_for

Float32Array = npt.NDArray[np.float32]

_TIMEOUT_S = 300.0


def audio_duration_s(path: Path, *, ffmpeg: str = "ffmpeg") -> float:
    """Length of an audio file in seconds (header only where soundfile can read it).

    Raises:
        SourceUnavailable: the file does not exist, or ffprobe is needed and missing.
        SourceFormatError: the file cannot be decoded.
    """
    if not path.is_file():
        raise SourceUnavailable(f"audio file {path} does not exist")
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            info = sf.info(str(path))
            return float(info.frames) / float(info.samplerate)
        except (sf.LibsndfileError, RuntimeError):
            pass
    args = [ffprobe_for(ffmpeg), "-v", "error", "-show_entries", "format=duration",
            "-of", "csv=p=0", str(path)]
    out = _run(args, path)
    try:
        return float(out.decode("ascii", "replace").strip().split()[0])
    except (ValueError, IndexError):
        raise SourceFormatError(f"audio file {path}: ffprobe reports no duration") from None


def load_audio(path: Path, sample_rate_hz: int, *, max_s: float | None = None,
               ffmpeg: str = "ffmpeg") -> Float32Array:
    """A whole file as mono float32 at ``sample_rate_hz``.

    Channels are averaged; soundfile-readable files are resampled with
    :func:`streamcap.audio.resample.resample`, others by ffmpeg.

    Args:
        path: The audio file.
        sample_rate_hz: The wanted rate.
        max_s: Keep at most this many seconds from the start.
        ffmpeg: The ffmpeg executable for formats soundfile cannot read.

    Returns:
        float32 (n,) samples at ``sample_rate_hz``.

    Raises:
        SourceUnavailable: the file is missing, or ffmpeg is needed and missing.
        SourceFormatError: the file cannot be decoded or holds no samples.
    """
    if not path.is_file():
        raise SourceUnavailable(f"audio file {path} does not exist")
    samples: Float32Array | None = None
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError):
            data, rate = None, 0
        if data is not None:
            if max_s is not None:
                data = data[: round(max_s * rate)]
            mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
            samples = np.ascontiguousarray(mono, dtype=np.float32)
            if rate != sample_rate_hz:
                samples = resample(samples, int(rate), sample_rate_hz)
    if samples is None:
        extra = ["-t", f"{max_s:.6f}"] if max_s is not None else []
        args = decode_args(ffmpeg, [], str(path), sample_rate_hz)
        args[-1:-1] = extra
        samples = np.frombuffer(_run(args, path), dtype="<f4").astype(np.float32)
    if samples.size == 0:
        raise SourceFormatError(f"audio file {path} decoded to no samples")
    if not np.all(np.isfinite(samples)):
        raise SourceFormatError(f"audio file {path} holds NaN or inf samples")
    return samples


def _run(args: list[str], path: Path) -> bytes:
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise SourceUnavailable(f"audio file {path}: needs {args[0]!r} to decode, which cannot "
                                f"be run ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise SourceFormatError(f"audio file {path}: {args[0]} took over {_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise SourceFormatError(f"audio file {path} cannot be decoded ({args[0]}: "
                                f"{' | '.join(said) or f'exit {proc.returncode}'})")
    return proc.stdout
