"""Trigger event clips: the audio around an ``on`` event, saved as FLAC (docs/privacy.md).

Off unless a trigger sets ``clip_s = [pre, post]``: no audio is kept or written
for a source that no such trigger watches. For each watched source the
:class:`ClipRecorder` keeps only the last ``max(pre)`` seconds of its blocks (a
ring of blocks, fed by the daemon's block handler). When an ``on`` event of such
a trigger is published, :meth:`ClipRecorder.start` names the clip
(``event.clip = "<event_id>.flac"``) and collects the ``pre`` seconds held plus
the next ``post`` seconds; the clip is then written to
``<state_dir>/clips/<event_id>.flac`` on a thread of its own (never on the event
loop): FLAC, 16-bit, at the source's rate, to a temporary file renamed into
place, mode 0600.

Bounds: at most ``[privacy] clip_max_active`` clips are collected or being
written at once (another firing gets no clip: ``result="busy"``), and one clip
holds at most ``clip_max_bytes`` of float32 audio (it is cut short there). A
source that stops, restarts or changes rate mid-clip ends the clip with what it
has. With ``[privacy] speech = "skip"`` a clip whose audio holds speech in any
10 s span (the speech guard's rule) is not written (``result="speech"``).
Every outcome is counted in ``streamcap_clips_total{result}``; failures are
logged. The history store's retention deletes clips with their events; without a store,
:func:`prune_clips` (run by the daemon) bounds the folder by age and size.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import stat
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from streamcap.atomic import replacing
from streamcap.logs import get_logger
from streamcap.messages import AudioBlock, TriggerEvent, TriggerState
from streamcap.stats import Metrics
from streamcap.triggers.spec import TriggerSpec

_log = get_logger(__name__)

Float32Array = npt.NDArray[np.float32]

CLIPS_DIR: Final = "clips"
"""The clips' folder under the state directory."""
SUFFIX: Final = ".flac"
EVENT_ID_RE: Final = re.compile(
    r"^[A-Za-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,64}:[0-9]{1,18}$")
"""What an event id may look like (``<run_id>:<trigger>:<source_id>:<n>``): a clip is
only ever named after one, so no name can leave the clips folder."""
RESULTS: Final = ("written", "failed", "speech", "busy", "empty")


class SpeechCheck(Protocol):
    """What judges a clip for speech (:class:`streamcap.privacy.speech.SpeechGuard`)."""

    def holds_speech(self, samples: npt.ArrayLike, rate_hz: int) -> bool: ...


def clip_name(event_id: str) -> str | None:
    """``"<event_id>.flac"``, or None when ``event_id`` is not an event id."""
    return event_id + SUFFIX if EVENT_ID_RE.match(event_id) else None


def clip_path(clips_dir: Path, name: str) -> Path | None:
    """Where the clip ``name`` (``"<event_id>.flac"``) lives; None for any other name."""
    if not name.endswith(SUFFIX) or clip_name(name[: -len(SUFFIX)]) is None:
        return None
    return clips_dir / name


def clip_plan(specs: Mapping[str, TriggerSpec],
              sources: Collection[str]) -> dict[str, float]:
    """Per source, the seconds of audio to keep: the longest ``pre`` of the triggers with
    ``clip_s`` that watch it. A source that no such trigger watches is absent."""
    out: dict[str, float] = {}
    for spec in specs.values():
        if spec.clip_s is None:
            continue
        for source in spec.sources or tuple(sources):
            out[source] = max(out.get(source, 0.0), spec.clip_s[0])
    return out


class BlockRing:
    """The newest ``keep_s`` seconds of one source's audio, as whole blocks (pure).

    Blocks of another rate or epoch start it afresh.
    """

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self.rate_hz = 0
        self.epoch = -1
        self._blocks: collections.deque[Float32Array] = collections.deque()
        self._samples = 0

    def __len__(self) -> int:
        return self._samples

    def add(self, block: AudioBlock) -> None:
        if block.sample_rate_hz != self.rate_hz or block.epoch != self.epoch:
            self.clear()
            self.rate_hz, self.epoch = block.sample_rate_hz, block.epoch
        keep = round(self.keep_s * self.rate_hz)
        if keep <= 0:
            return
        self._blocks.append(block.samples)
        self._samples += block.samples.size
        while self._blocks and self._samples - self._blocks[0].size >= keep:
            self._samples -= self._blocks.popleft().size

    def last(self, seconds: float) -> Float32Array:
        """A copy of the newest ``seconds`` held (less when less is held)."""
        if not self._blocks:
            return np.zeros(0, dtype=np.float32)
        held = np.concatenate(list(self._blocks))
        want = round(seconds * self.rate_hz)
        return held[max(0, held.size - want):].copy() if want > 0 else held[:0].copy()

    def clear(self) -> None:
        self._blocks.clear()
        self._samples = 0


@dataclasses.dataclass(slots=True)
class _Collecting:
    """One clip being collected (mutable, owned by the recorder on the event loop)."""

    name: str
    source_id: str
    rate_hz: int
    epoch: int
    chunks: list[Float32Array]
    samples: int
    post_left: int  # samples still wanted after the event
    max_samples: int


class ClipRecorder:
    """Collects trigger event clips and writes them off the event loop (see the module doc).

    Args:
        clips_dir: ``<state_dir>/clips`` (made, mode 0700, with the first clip).
        sources: Every configured source (a trigger without ``sources`` watches all).
        metrics: Where ``streamcap_clips_total{result}`` is counted.
        max_active: Clips collected or being written at once, at most.
        max_bytes: float32 audio bytes one clip holds at most.
        speech_guard: With ``[privacy] speech = "skip"``: judges a clip before it is
            written (anything with ``holds_speech(samples, rate_hz) -> bool``); None
            writes every clip.
    """

    def __init__(self, clips_dir: Path, *, sources: Collection[str], metrics: Metrics,
                 max_active: int = 4, max_bytes: int = 32 * 1024 * 1024,
                 speech_guard: SpeechCheck | None = None) -> None:
        self.clips_dir = clips_dir
        self.sources = tuple(sources)
        self.max_active = max_active
        self.max_bytes = max_bytes
        self._guard = speech_guard
        self._specs: dict[str, TriggerSpec] = {}
        self._rings: dict[str, BlockRing] = {}
        self._collecting: list[_Collecting] = []
        self._writing: set[concurrent.futures.Future[str]] = set()
        self._writing_lock = threading.Lock()  # _written runs on the writer thread
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._results = metrics.counter("streamcap_clips_total",
                                        "Trigger event clips, by result", ["result"])
        for result in RESULTS:
            self._results.inc(0, result)

    # ------------------------------------------------------------------ state

    @property
    def active(self) -> int:
        """Clips being collected or written now."""
        with self._writing_lock:
            return len(self._collecting) + len(self._writing)

    def watched(self) -> dict[str, float]:
        """Per source, the seconds of audio kept now."""
        return {source: ring.keep_s for source, ring in self._rings.items()}

    def set_triggers(self, specs: Mapping[str, TriggerSpec]) -> None:
        """The live set of triggers changed: keep audio for exactly the sources whose
        triggers want clips (a source no longer watched forgets its audio)."""
        self._specs = dict(specs)
        plan = clip_plan(specs, self.sources)
        for source in list(self._rings):
            if source not in plan:
                del self._rings[source]
        for source, keep_s in plan.items():
            ring = self._rings.get(source)
            if ring is None:
                self._rings[source] = BlockRing(keep_s)
            else:
                ring.keep_s = keep_s

    # ------------------------------------------------------------------ event loop side

    def feed(self, block: AudioBlock) -> None:
        """One captured block (the daemon's block handler); never blocks."""
        ring = self._rings.get(block.source_id)
        if ring is not None:
            ring.add(block)
        if not self._collecting:
            return
        for clip in [c for c in self._collecting if c.source_id == block.source_id]:
            if block.sample_rate_hz != clip.rate_hz or block.epoch != clip.epoch:
                self._finish(clip)  # the source restarted: the clip ends here
                continue
            take = min(block.samples.size, clip.post_left, clip.max_samples - clip.samples)
            if take > 0:
                clip.chunks.append(block.samples[:take])
                clip.samples += take
                clip.post_left -= take
            if clip.post_left <= 0 or clip.samples >= clip.max_samples:
                self._finish(clip)

    def start(self, event: TriggerEvent) -> TriggerEvent:
        """``event`` with ``clip`` set when a clip of it is now being collected; else as it is.

        Only an ``on`` event of a trigger with ``clip_s`` for a source whose audio is
        kept starts a clip; beyond ``max_active`` none does (counted ``busy``).
        """
        spec = self._specs.get(event.trigger)
        ring = self._rings.get(event.source_id)
        if (self._closed or event.state is not TriggerState.ON or spec is None
                or spec.clip_s is None or ring is None):
            return event
        name = clip_name(event.event_id)
        if name is None:
            return event
        if self.active >= self.max_active:
            self._results.inc(1, "busy")
            _log.warning("too many trigger event clips at once: this one is not saved",
                         event_id=event.event_id, max_active=self.max_active)
            return event
        pre_s, post_s = spec.clip_s
        rate = ring.rate_hz
        max_samples = max(1, self.max_bytes // 4)
        pre = ring.last(pre_s)[-max_samples:]
        self._collecting.append(_Collecting(
            name=name, source_id=event.source_id, rate_hz=rate, epoch=ring.epoch,
            chunks=[pre], samples=pre.size,
            post_left=round(post_s * rate) if rate else 0, max_samples=max_samples))
        if rate == 0 or post_s <= 0 or pre.size >= max_samples:
            self._finish(self._collecting[-1])
        return dataclasses.replace(event, clip=name)

    def source_ended(self, source_id: str) -> None:
        """The source stopped or is restarting: its clips end with what they have."""
        for clip in [c for c in self._collecting if c.source_id == source_id]:
            self._finish(clip)
        ring = self._rings.get(source_id)
        if ring is not None:
            ring.clear()

    def _finish(self, clip: _Collecting) -> None:
        self._collecting.remove(clip)
        if clip.samples == 0 or clip.rate_hz == 0:
            self._results.inc(1, "empty")
            _log.warning("trigger event clip has no audio: not saved", clip=clip.name)
            return
        samples = np.concatenate(clip.chunks)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="streamcap-clips")
        future = self._executor.submit(write_clip, self.clips_dir / clip.name, samples,
                                       clip.rate_hz, self._guard)
        with self._writing_lock:
            self._writing.add(future)
        future.add_done_callback(self._written)

    def _written(self, future: concurrent.futures.Future[str]) -> None:
        """Runs on the writer thread: count the outcome (the counter is thread-safe)."""
        with self._writing_lock:
            self._writing.discard(future)
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed write is logged and counted
            self._results.inc(1, "failed")
            _log.error("cannot write trigger event clip", error=f"{type(exc).__name__}: {exc}",
                       folder=str(self.clips_dir))
            return
        self._results.inc(1, result)
        if result == "speech":
            _log.info("trigger event clip holds speech: not saved ([privacy] speech = skip)")

    async def close(self, timeout_s: float) -> int:
        """End every clip with what it has and wait up to ``timeout_s`` for the writes.

        Returns:
            The number of writes still running (abandoned) at the end.
        """
        self._closed = True
        for clip in list(self._collecting):
            self._finish(clip)
        with self._writing_lock:
            writing = list(self._writing)
        pending = [asyncio.wrap_future(f) for f in writing]
        left = 0
        if pending:
            _, still = await asyncio.wait(pending, timeout=max(0.0, timeout_s))
            left = len(still)
            if left:
                _log.error("trigger event clips still being written; abandoned", clips=left)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        return left


def write_clip(path: Path, samples: Float32Array, rate_hz: int,
               guard: SpeechCheck | None = None) -> str:
    """Write one clip (blocking; on the writer thread); returns its ``result`` label.

    ``"speech"`` when ``guard`` finds speech (nothing is written); else ``"written"``:
    FLAC, 16-bit, to a temporary file in the same folder (mode 0600) that is flushed
    and renamed over ``path``.

    Raises:
        OSError, RuntimeError: the folder or the file cannot be written (no temporary
            file is left behind).
    """
    import soundfile as sf

    if guard is not None and guard.holds_speech(samples, rate_hz):
        return "speech"
    with replacing(path, mode=0o600, folder_mode=0o700) as fh:
        sf.write(fh, np.clip(samples, -1.0, 1.0), rate_hz, format="FLAC", subtype="PCM_16")
    return "written"


STALE_TMP_S: Final = 3600.0
"""A clip's temporary file older than this was left by a process that died mid-write."""


def prune_clips(clips_dir: Path, *, keep_s: float, max_bytes: int, now: float) -> int:
    """The clips folder's own retention, for a daemon without a history store (whose
    retention deletes clips with their events otherwise); blocking, off the loop.

    Deletes temporary files older than :data:`STALE_TMP_S`, clips older than
    ``keep_s``, then the oldest clips until the folder holds at most ``max_bytes``.
    Only plain files named like a clip (or its temporary file) are touched.

    Returns:
        How many files were deleted.
    """
    files: list[tuple[float, int, Path]] = []
    try:
        entries = list(os.scandir(clips_dir))
    except OSError:
        return 0
    deleted = 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        name = entry.name
        stale = (name.startswith(".") and name.endswith(".tmp")
                 and now - st.st_mtime > STALE_TMP_S)
        if stale or (clip_path(clips_dir, name) is not None and now - st.st_mtime > keep_s):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                deleted += 1
            continue
        if clip_path(clips_dir, name) is not None or name.endswith(".tmp"):
            files.append((st.st_mtime, st.st_size, Path(entry.path)))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        if path.name.endswith(".tmp"):
            continue  # being written now
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            deleted += 1
        total -= size
    return deleted
