"""The demo corpus: procedurally synthesized everyday-sound scenes with compositional captions.

Each clip holds one to three events of :data:`EVENT_TYPES` (synthesized by
:mod:`streamcap.training.data.corpus_sounds`, each maybe coloured by a random EQ
and put in a random room) over a background bed
(:data:`~streamcap.training.data.corpus_sounds.BACKGROUNDS`: none, room tone,
street, mains hum, distant chatter, hiss) 3 to 30 dB below the loudest event,
at random levels and timings. Scenes are a *sequence* (events one after
another, sometimes overlapping: "a dog barks, then a phone rings"), an
*overlay* (a long event such as rain under one or two short ones: "a dog barks
while rain falls") or, one clip in eight, *quiet*: a bed alone or silence,
captioned as such ("a quiet room", "silence", "quiet background chatter").
Every clip gets :attr:`CorpusOptions.captions_per_clip`
distinct captions drawn from templates and synonyms; every caption names
each event with one of its :data:`EVENT_KEYWORDS`, so keyword accuracy per
event type can be scored with :func:`keyword_accuracy`.

Clip ``i`` depends only on the seed and ``i`` (same seed -> identical files);
its split is ``train`` for ``i % 10 < 8``, ``val`` for 8 and ``test`` for 9.

Output directory::

    manifest.jsonl    manifest rows (streamcap.training.data.manifest)
    scenes.jsonl      per clip: clip_id, events (kind, start_s, end_s, level_db), background, layout
    audio/<clip_id>.wav   16-bit PCM mono
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import soundfile as sf

from streamcap.errors import ConfigError
from streamcap.training.data.corpus_sounds import (
    BACKGROUNDS,
    SYNTHS,
    Float32Array,
    background,
    colour,
    reverberate,
)
from streamcap.training.data.manifest import ManifestRow, write_manifest

EVENT_TYPES: Final = tuple(SYNTHS)
"""The 14 synthesized event types."""

CONTINUOUS: Final = frozenset({"rain", "wind", "engine", "clock"})
"""Event types that may run under other events (overlay scenes)."""

_DURATION_S: Final[Mapping[str, tuple[float, float]]] = {
    "siren": (3.0, 7.0), "alarm": (2.0, 4.0), "phone": (2.5, 5.0), "knock": (1.0, 3.0),
    "clock": (4.0, 9.0), "engine": (4.0, 9.0), "rain": (4.0, 9.0), "wind": (4.0, 9.0),
    "whistle": (1.0, 3.0), "bird": (1.5, 4.0), "footsteps": (2.0, 5.0), "dog": (1.0, 3.0),
    "horn": (0.6, 2.5), "bell": (1.5, 4.0),
}


@dataclass(frozen=True, slots=True)
class EventWords:
    """How captions name one event type."""

    subjects: tuple[str, ...]  # noun phrases for a clause subject ("a dog")
    verbs: tuple[str, ...]  # third-person present verb phrases ("barks")
    nouns: tuple[str, ...]  # stand-alone noun phrases ("a barking dog")


WORDS: Final[Mapping[str, EventWords]] = {
    "siren": EventWords(("a siren", "an emergency siren", "a police siren"),
                        ("wails", "sounds", "blares"),
                        ("a wailing siren", "the sound of a siren", "a siren")),
    "alarm": EventWords(("an alarm", "an electronic alarm", "a fire alarm"),
                        ("beeps", "beeps repeatedly", "goes off"),
                        ("a beeping alarm", "alarm beeps", "an alarm going off")),
    "phone": EventWords(("a phone", "a telephone", "an old telephone"),
                        ("rings", "is ringing", "rings twice"),
                        ("a ringing phone", "a telephone ringing", "the ring of a phone")),
    "knock": EventWords(("someone", "a person", "somebody"),
                        ("knocks on a door", "knocks on wood", "is knocking"),
                        ("knocking on a door", "a knock at the door", "loud knocks")),
    "clock": EventWords(("a clock", "a wall clock", "a clock nearby"),
                        ("ticks", "is ticking", "ticks steadily"),
                        ("a ticking clock", "the ticking of a clock", "clock ticks")),
    "engine": EventWords(("an engine", "a car engine", "a motor"),
                         ("hums", "idles", "rumbles"),
                         ("an idling engine", "the hum of an engine", "a running motor")),
    "rain": EventWords(("rain", "heavy rain", "light rain"),
                       ("falls", "pours down", "patters"),
                       ("falling rain", "the sound of rain", "rainfall")),
    "wind": EventWords(("wind", "strong wind", "the wind"),
                       ("blows", "gusts", "howls"),
                       ("blowing wind", "gusts of wind", "the wind")),
    "whistle": EventWords(("a whistle", "a referee whistle", "a shrill whistle"),
                          ("blows", "is blown", "sounds"),
                          ("a whistle blowing", "whistle blasts", "a shrill whistle")),
    "bird": EventWords(("a bird", "birds", "a small bird"),
                       ("chirps", "tweets", "sings"),
                       ("birds chirping", "chirping birds", "a bird chirping")),
    "footsteps": EventWords(("footsteps", "someone's footsteps", "heavy footsteps"),
                            ("approach", "pass by", "walk across the floor"),
                            ("footsteps", "the sound of footsteps", "walking footsteps")),
    "dog": EventWords(("a dog", "a small dog", "a large dog"),
                      ("barks", "barks repeatedly", "is barking"),
                      ("a barking dog", "a dog barking", "dog barks")),
    "horn": EventWords(("a car horn", "a horn", "a truck horn"),
                       ("honks", "beeps", "blares"),
                       ("a honking horn", "a car horn honking", "horn honks")),
    "bell": EventWords(("a bell", "a church bell", "a small bell"),
                       ("rings", "chimes", "tolls"),
                       ("a ringing bell", "bell chimes", "the chime of a bell")),
}

EVENT_KEYWORDS: Final[Mapping[str, frozenset[str]]] = {
    "siren": frozenset({"siren", "sirens"}),
    "alarm": frozenset({"alarm", "alarms"}),
    "phone": frozenset({"phone", "telephone", "phones"}),
    "knock": frozenset({"knock", "knocks", "knocking"}),
    "clock": frozenset({"clock", "clocks", "ticking", "ticks"}),
    "engine": frozenset({"engine", "motor", "engines"}),
    "rain": frozenset({"rain", "rainfall", "raining"}),
    "wind": frozenset({"wind", "windy"}),
    "whistle": frozenset({"whistle", "whistles", "whistling"}),
    "bird": frozenset({"bird", "birds", "chirping", "chirps"}),
    "footsteps": frozenset({"footsteps", "steps", "footstep"}),
    "dog": frozenset({"dog", "dogs", "barking", "barks"}),
    "horn": frozenset({"horn", "horns", "honking", "honks"}),
    "bell": frozenset({"bell", "bells", "chime", "chimes"}),
}
"""Words whose presence in a caption counts as mentioning the event type."""

BACKGROUND_PHRASES: Final[Mapping[str, tuple[str, ...]]] = {
    "none": (),
    "room": ("in a quiet room", "indoors", "inside a room"),
    "street": ("on a busy street", "with traffic in the background", "outside near a road"),
    "hum": ("with a hum in the background", "over a low electrical hum"),
    "chatter": ("with people talking in the background", "over distant chatter"),
    "hiss": ("over background noise", "with a faint hiss"),
}

QUIET_CAPTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "none": ("silence", "complete silence", "nothing can be heard", "quiet, no sound at all"),
    "room": ("a quiet room", "quiet room tone", "a quiet room, nothing happens",
             "silence in a quiet room"),
    "street": ("a quiet street with distant traffic", "quiet traffic noise in the distance",
               "a quiet street, nothing else"),
    "hum": ("a quiet room with a low electrical hum", "a quiet hum", "quiet, only a steady hum"),
    "chatter": ("quiet background chatter", "quiet distant voices",
                "people talk quietly far away"),
    "hiss": ("quiet background noise", "quiet static hiss", "a quiet hiss of noise"),
}
"""Captions of quiet scenes (no event) by background; none names an event type."""

QUIET_SHARE: Final = 0.125
"""Share of clips that are quiet: a background alone, or silence."""

SEQUENCE_TEMPLATES: Final[Mapping[int, tuple[str, ...]]] = {
    1: ("{c0}", "{n0}", "{c0}"),
    2: ("{c0}, then {c1}", "{c0} and then {c1}", "{n0} followed by {n1}",
        "first {c0}, then {c1}", "{n0}, then {n1}"),
    3: ("{c0}, then {c1}, and finally {c2}", "{n0}, then {n1} and {n2}",
        "{n0} followed by {n1} and then {n2}", "first {c0}, then {c1}, then {c2}"),
}
"""Caption templates of sequence scenes by event count (c = clause, n = noun phrase)."""

OVERLAY_TEMPLATES: Final[Mapping[int, tuple[str, ...]]] = {
    1: ("{c0} while {cb}", "{cb} as {c0}", "{n0} and {nb} at the same time", "{n0} over {nb}",
        "{c0} with {nb} in the background"),
    2: ("{c0}, then {c1}, while {cb}", "while {cb}, {c0} and then {c1}",
        "{n0} followed by {n1} over {nb}", "{cb} as {c0} and then {c1}"),
}
"""Caption templates of overlay scenes by number of short events (b = the long event)."""

_WORD_RE = re.compile(r"[a-z]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class CorpusOptions:
    """What :func:`make_corpus` generates.

    Attributes:
        clips: Number of clips.
        seed: Seed; clip ``i`` depends only on ``seed`` and ``i``.
        clip_s: Clip length in seconds (the daemon's window is 10 s).
        sample_rate_hz: Sample rate of the wavs.
        captions_per_clip: Distinct captions per clip.
    """

    clips: int = 1000
    seed: int = 0
    clip_s: float = 10.0
    sample_rate_hz: int = 16000
    captions_per_clip: int = 5

    def __post_init__(self) -> None:
        problems = []
        if self.clips < 1:
            problems.append(f"corpus.clips: expected at least 1, got {self.clips}")
        if not 4.0 <= self.clip_s <= 60.0:
            problems.append(f"corpus.clip_s: expected 4-60 seconds, got {self.clip_s}")
        if self.sample_rate_hz not in (16000, 22050, 24000, 32000, 44100, 48000):
            problems.append(f"corpus.sample_rate_hz: expected 16000, 22050, 24000, 32000, "
                            f"44100 or 48000, got {self.sample_rate_hz}")
        if not 1 <= self.captions_per_clip <= 10:
            problems.append(f"corpus.captions_per_clip: expected 1-10, got "
                            f"{self.captions_per_clip}")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, slots=True, kw_only=True)
class SceneEvent:
    """One event of a scene; ``level_db`` is its RMS level in dBFS while active."""

    kind: str
    start_s: float
    end_s: float
    level_db: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Scene:
    """A clip's content: ``events`` in start order; ``bed`` is the overlay's long event."""

    clip_id: str
    split: str
    layout: str  # "sequence", "overlay" or "quiet" (no event)
    events: tuple[SceneEvent, ...]  # every event, sorted by start time (the bed included)
    bed: str | None  # kind of the long event under an overlay scene
    background: str  # one of corpus_sounds.BACKGROUNDS
    background_db: float

    @property
    def kinds(self) -> tuple[str, ...]:
        """Event types present, in start order."""
        return tuple(e.kind for e in self.events)

    def to_json(self) -> dict[str, object]:
        return {"clip_id": self.clip_id, "split": self.split, "layout": self.layout,
                "events": [asdict(e) for e in self.events], "bed": self.bed,
                "background": self.background, "background_db": self.background_db}


def split_of(index: int) -> str:
    """The split of clip ``index``: 8 in 10 train, then one val, one test."""
    r = index % 10
    return "train" if r < 8 else ("val" if r == 8 else "test")


def clip_id_of(index: int) -> str:
    return f"scene-{index:06d}"


def _round(x: float) -> float:
    return float(round(x, 3))


def sample_scene(rng: np.random.Generator, index: int, clip_s: float) -> Scene:
    """Draw the content of clip ``index`` (types, layout, timings, levels, background)."""
    if rng.random() < QUIET_SHARE:
        back = str(rng.choice(BACKGROUNDS))
        back_db = -90.0 if back == "none" else rng.uniform(-70, -35)
        return Scene(clip_id=clip_id_of(index), split=split_of(index), layout="quiet",
                     events=(), bed=None, background=back, background_db=_round(back_db))
    n_events = int(rng.choice([1, 2, 3], p=[0.38, 0.37, 0.25]))
    kinds = [str(k) for k in rng.choice(EVENT_TYPES, size=n_events, replace=False)]
    bed = next((k for k in kinds if k in CONTINUOUS), None)
    overlay = n_events >= 2 and bed is not None and rng.random() < 0.7
    events: list[SceneEvent] = []
    if overlay:
        assert bed is not None
        kinds.remove(bed)
        start = rng.uniform(0.0, 1.0)
        events.append(SceneEvent(kind=bed, start_s=_round(start),
                                 end_s=_round(rng.uniform(clip_s - 1.0, clip_s)),
                                 level_db=_round(rng.uniform(-35, -18))))
        lo, hi = start + 0.5, clip_s - 0.5
    else:
        bed = None
        lo, hi = 0.2, clip_s - 0.2
    slot = (hi - lo) / len(kinds)
    for i, kind in enumerate(kinds):
        d_lo, d_hi = _DURATION_S[kind]
        duration = min(rng.uniform(d_lo, d_hi), slot * 0.85)
        start = lo + i * slot + rng.uniform(0.0, slot - duration)
        if i > 0 and rng.random() < 0.3:  # overlap the previous event a little
            start = max(lo, start - rng.uniform(0.0, 0.3) * slot)
        events.append(SceneEvent(kind=kind, start_s=_round(start),
                                 end_s=_round(start + duration),
                                 level_db=_round(rng.uniform(-35, -8))))
    events.sort(key=lambda e: e.start_s)
    weights = np.array([0.1] + [0.9 / (len(BACKGROUNDS) - 1)] * (len(BACKGROUNDS) - 1))
    back = str(rng.choice(BACKGROUNDS, p=weights / weights.sum()))
    quietest = min(e.level_db for e in events)
    back_db = -90.0 if back == "none" else quietest - rng.uniform(3.0, 30.0)
    return Scene(clip_id=clip_id_of(index), split=split_of(index),
                 layout="overlay" if overlay else "sequence", events=tuple(events), bed=bed,
                 background=back, background_db=_round(float(back_db)))


def _clause(rng: np.random.Generator, event: SceneEvent) -> str:
    words = WORDS[event.kind]
    text = f"{rng.choice(words.subjects)} {rng.choice(words.verbs)}"
    if event.level_db < -24 and rng.random() < 0.4:
        text += " in the distance"
    elif event.level_db > -14 and rng.random() < 0.4:
        text += " loudly"
    return text


def caption_scene(rng: np.random.Generator, scene: Scene) -> str:
    """One caption of ``scene`` (template, synonyms and modifiers drawn from ``rng``)."""
    if scene.layout == "quiet":
        return str(rng.choice(QUIET_CAPTIONS[scene.background]))
    short = [e for e in scene.events if e.kind != scene.bed]
    fill: dict[str, str] = {}
    for i, event in enumerate(short):
        fill[f"c{i}"] = _clause(rng, event)
        fill[f"n{i}"] = str(rng.choice(WORDS[event.kind].nouns))
    if scene.bed is not None:
        bed = next(e for e in scene.events if e.kind == scene.bed)
        fill["cb"] = _clause(rng, bed)
        fill["nb"] = str(rng.choice(WORDS[bed.kind].nouns))
        template = str(rng.choice(OVERLAY_TEMPLATES[len(short)]))
    else:
        template = str(rng.choice(SEQUENCE_TEMPLATES[len(short)]))
    text = template.format(**fill)
    phrases = BACKGROUND_PHRASES[scene.background]
    if phrases and rng.random() < 0.5:
        text += " " + str(rng.choice(phrases))
    return text


def scene_captions(rng: np.random.Generator, scene: Scene, count: int) -> tuple[str, ...]:
    """``count`` captions of ``scene``, distinct where the templates allow."""
    out: list[str] = []
    for _ in range(count * 20):
        text = caption_scene(rng, scene)
        if text not in out:
            out.append(text)
        if len(out) == count:
            break
    while len(out) < count:
        out.append(out[len(out) % max(1, len(out))])
    return tuple(out)


def active_rms(x: npt.NDArray[np.float64], sr: int) -> float:
    """RMS over the 20 ms frames within 20 dB of the loudest frame (the sound while active)."""
    frame = max(1, int(0.02 * sr))
    n = len(x) // frame * frame
    if n == 0:
        return max(float(np.sqrt(np.mean(x**2))) if len(x) else 0.0, 1e-9)
    energy = np.mean(x[:n].reshape(-1, frame) ** 2, axis=1)
    active = energy[energy >= 0.01 * energy.max()]
    return max(float(np.sqrt(np.mean(active))), 1e-9)


def render_scene(rng: np.random.Generator, scene: Scene, clip_s: float,
                 sample_rate_hz: int) -> Float32Array:
    """The audio of ``scene``: float32 (round(clip_s * rate),), peak at most 0.95."""
    sr = sample_rate_hz
    n = round(clip_s * sr)
    mix = np.zeros(n, dtype=np.float64)
    for event in scene.events:
        start, end = int(event.start_s * sr), min(n, int(event.end_s * sr))
        sound = SYNTHS[event.kind](rng, end - start, sr).astype(np.float64)
        if rng.random() < 0.6:
            sound = colour(rng, sound, sr)
        if rng.random() < 0.4:
            sound = reverberate(rng, sound, sr)
        mix[start:end] += sound * (10 ** (event.level_db / 20) / active_rms(sound, sr))
    if scene.background != "none":
        mix += background(rng, scene.background, n, sr) * 10 ** (scene.background_db / 20)
    peak = float(np.max(np.abs(mix)))
    if peak > 0.95:
        mix *= 0.95 / peak
    return mix.astype(np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class CorpusSummary:
    """What :func:`make_corpus` wrote."""

    directory: Path
    manifest: Path
    scenes: Path
    clips: int
    per_split: Mapping[str, int]
    per_event: Mapping[str, int]


def make_clip(options: CorpusOptions, index: int
              ) -> tuple[Scene, tuple[str, ...], Float32Array]:
    """Scene, captions and audio of clip ``index`` (a pure function of options and index)."""
    rng = np.random.default_rng([options.seed, index])
    scene = sample_scene(rng, index, options.clip_s)
    captions = scene_captions(rng, scene, options.captions_per_clip)
    audio = render_scene(rng, scene, options.clip_s, options.sample_rate_hz)
    return scene, captions, audio


def make_corpus(directory: Path, options: CorpusOptions,
                progress: Callable[[int, int], None] | None = None) -> CorpusSummary:
    """Write the corpus (wavs, ``manifest.jsonl``, ``scenes.jsonl``) under ``directory``.

    Existing files of the same names are overwritten; the manifest is written last.

    Args:
        directory: Output directory (created).
        options: What to generate.
        progress: Called with (done, total) after each clip.
    """
    audio_dir = directory / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows: list[ManifestRow] = []
    scenes: list[str] = []
    per_split: dict[str, int] = {}
    per_event: dict[str, int] = {k: 0 for k in EVENT_TYPES}
    for index in range(options.clips):
        scene, captions, audio = make_clip(options, index)
        path = audio_dir / f"{scene.clip_id}.wav"
        sf.write(str(path), audio, options.sample_rate_hz, subtype="PCM_16", format="WAV")
        rows.append(ManifestRow(audio=path, captions=captions, split=scene.split,
                                source="streamcap-demo", duration_s=options.clip_s,
                                clip_id=scene.clip_id))
        scenes.append(json.dumps(scene.to_json()))
        per_split[scene.split] = per_split.get(scene.split, 0) + 1
        for kind in scene.kinds:
            per_event[kind] += 1
        if progress is not None:
            progress(index + 1, options.clips)
    scenes_path = directory / "scenes.jsonl"
    fd, tmp = tempfile.mkstemp(prefix=".scenes.", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("".join(s + "\n" for s in scenes))
    os.replace(tmp, scenes_path)
    manifest = write_manifest(rows, directory / "manifest.jsonl")
    return CorpusSummary(directory=directory, manifest=manifest, scenes=scenes_path,
                         clips=options.clips, per_split=per_split, per_event=per_event)


def read_scenes(path: Path) -> dict[str, Scene]:
    """``scenes.jsonl`` as clip_id -> :class:`Scene`.

    Raises:
        ConfigError: the file cannot be read or a line is malformed (named by line).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read scenes ({exc.strerror or exc})") from exc
    out: dict[str, Scene] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            events = tuple(SceneEvent(kind=str(e["kind"]), start_s=float(e["start_s"]),
                                      end_s=float(e["end_s"]), level_db=float(e["level_db"]))
                           for e in obj["events"])
            scene = Scene(clip_id=str(obj["clip_id"]), split=str(obj["split"]),
                          layout=str(obj["layout"]), events=events,
                          bed=None if obj["bed"] is None else str(obj["bed"]),
                          background=str(obj["background"]),
                          background_db=float(obj["background_db"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path.name} line {number}: malformed scene ({exc})") from None
        out[scene.clip_id] = scene
    return out


def mentioned_events(text: str) -> frozenset[str]:
    """Event types whose keywords occur in ``text`` (lower-cased words)."""
    words = set(_WORD_RE.findall(text.lower()))
    return frozenset(k for k, keys in EVENT_KEYWORDS.items() if words & keys)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeywordScores:
    """Keyword accuracy of predicted captions against scene contents.

    Attributes:
        recall: event type -> fraction of clips containing it whose caption mentions it.
        false_positive_rate: event type -> fraction of clips without it whose caption mentions it.
        support: event type -> number of clips containing it.
        mean_recall: unweighted mean of ``recall`` over types with support.
        exact: fraction of clips whose caption mentions exactly the events present.
    """

    recall: Mapping[str, float]
    false_positive_rate: Mapping[str, float]
    support: Mapping[str, int]
    mean_recall: float
    exact: float


def keyword_accuracy(predictions: Sequence[str],
                     present: Sequence[Iterable[str]]) -> KeywordScores:
    """Per-event-type keyword accuracy of ``predictions[i]`` given the types in ``present[i]``.

    Raises:
        ConfigError: the sequences differ in length or name unknown types.
    """
    if len(predictions) != len(present):
        raise ConfigError(f"keyword_accuracy: {len(predictions)} predictions but "
                          f"{len(present)} scenes")
    truth = [frozenset(p) for p in present]
    unknown = sorted(set().union(*truth) - set(EVENT_TYPES)) if truth else []
    if unknown:
        raise ConfigError(f"keyword_accuracy: unknown event type(s) {', '.join(unknown)}")
    said = [mentioned_events(p) for p in predictions]
    recall: dict[str, float] = {}
    fpr: dict[str, float] = {}
    support: dict[str, int] = {}
    for kind in EVENT_TYPES:
        pos = [kind in s for t, s in zip(truth, said, strict=True) if kind in t]
        neg = [kind in s for t, s in zip(truth, said, strict=True) if kind not in t]
        support[kind] = len(pos)
        if pos:
            recall[kind] = sum(pos) / len(pos)
        if neg:
            fpr[kind] = sum(neg) / len(neg)
    mean = float(np.mean(list(recall.values()))) if recall else 0.0
    exact = (sum(s == t for s, t in zip(said, truth, strict=True)) / len(truth)) if truth else 0.0
    return KeywordScores(recall=recall, false_positive_rate=fpr, support=support,
                         mean_recall=mean, exact=exact)
