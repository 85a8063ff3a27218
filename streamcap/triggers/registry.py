"""The live set of triggers: the config file's, changed at run time, persisted, announced.

:class:`TriggerRegistry` holds the triggers the daemon watches. It starts from
``[triggers.*]`` of the config file merged with the run-time changes saved in
``<state_dir>/triggers/triggers.json``; the HTTP API and the MQTT command topic
change it with :meth:`TriggerRegistry.put` and :meth:`TriggerRegistry.remove`.
Every change is validated by the config file's own reader (:func:`read_triggers`,
so errors read ``triggers.dog.min_hits: must be <= of_windows (got 5 > 3)``
wherever the definition came from), saved (atomic write), and only then applied
and told to the listeners (:meth:`TriggerRegistry.subscribe`), on the event loop.

How run-time changes relate to the config file:

* a trigger added or changed at run time is saved in full and **overrides** the
  file's definition of the same name, across restarts, even if the file changes
  later (a changed definition equal to the file's is not saved: the file's
  applies again, edits included);
* removing a trigger the file defines is saved as a removal: it stays removed
  across restarts until it is added again (HTTP or MQTT), or ``triggers.json``
  is deleted while the daemon is stopped;
* to go back to the file's definitions entirely, stop the daemon and delete
  ``triggers.json``.

Limits: at most :data:`MAX_TRIGGERS` triggers. Example files (``examples``) are
read from the config file only: a run-time definition may keep a file-defined
trigger's ``examples`` unchanged but not name other files, so that nothing
reaching the daemon over the network can make it open a path.

The saved file (:data:`FORMAT`, version :data:`VERSION`)::

    {"format": "streamcap-triggers", "version": 1,
     "triggers": {"dog": {"text": ["a dog barks"], "threshold": "auto", ...}},
     "removed": ["smoke"]}

A file that cannot be read or decoded (not JSON, nested deeper than 32 levels, ...),
or whose format or version is not this one, is renamed ``triggers.json.bad-<UTC
time>`` with a warning naming the reason, and the daemon starts from the config
file alone. A saved trigger that does not validate in this run (it names a source
this run does not have: the config file changed, or ``--source`` replaced the
sources) is ignored with a warning naming ``<file>: triggers.<name>.<key>``, and
written back as it is at every change, so that a later run with the sources it
names has it again; adding a trigger of that name (or removing the live one)
replaces it.

:class:`TriggerStates` keeps the newest state of each (trigger, source) pair from
the :class:`~streamcap.messages.TriggerEvent` s the engine publishes, for
``GET /api/triggers``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from streamcap.atomic import replace_text
from streamcap.errors import ConfigError, StreamcapError
from streamcap.logs import get_logger
from streamcap.messages import TriggerEvent, TriggerState
from streamcap.options import shown, toml_key
from streamcap.triggers.jsonbody import parse_json_object
from streamcap.triggers.spec import AUTO, TriggerSpec, read_triggers, watches

__all__ = ["FILE_NAME", "FORMAT", "MAX_TRIGGERS", "VERSION", "Change", "Saved", "SourceState",
           "TriggerRegistry", "TriggerStates", "TriggerStoreError", "decode_saved",
           "encode_saved", "merge", "spec_table"]

_log = get_logger(__name__)

FORMAT: Final = "streamcap-triggers"
VERSION: Final = 1
FILE_NAME: Final = "triggers.json"
MAX_TRIGGERS: Final = 256
"""Most triggers the registry holds (config file and run-time ones together)."""

Listener = Callable[[Mapping[str, TriggerSpec]], None]


class TriggerStoreError(StreamcapError):
    """The run-time triggers could not be saved; nothing was changed."""


# --------------------------------------------------------------------------- pure logic


def spec_table(spec: TriggerSpec) -> dict[str, object]:
    """The ``[triggers.<name>]`` table of ``spec``, JSON-ready: what is saved and shown."""
    return {
        "text": list(spec.text),
        "negative": list(spec.negative),
        "examples": list(spec.examples),
        "sources": list(spec.sources),
        "threshold": AUTO if spec.threshold is None else spec.threshold,
        "min_hits": spec.min_hits,
        "of_windows": spec.of_windows,
        "cooldown_s": spec.cooldown_s,
        "off_after_s": spec.off_after_s,
        # only when set: a table without it reads as before
        **({"clip_s": list(spec.clip_s)} if spec.clip_s is not None else {}),
    }


@dataclass(frozen=True, slots=True)
class Saved:
    """The run-time changes: definitions that override or add to the file's, and removals.

    ``kept`` holds the saved tables that did not validate when the file was read (a
    source missing from this run's config, say): ignored, but written back as they
    are, so that a run with other sources (``--source``) does not lose them.
    """

    triggers: Mapping[str, TriggerSpec] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()
    kept: Mapping[str, object] = field(default_factory=dict)


def merge(config: Mapping[str, TriggerSpec], saved: Saved) -> dict[str, TriggerSpec]:
    """The live set: the file's triggers less the removed ones, the saved ones over them."""
    out = {name: spec for name, spec in config.items() if name not in saved.removed}
    out.update(saved.triggers)
    return out


def encode_saved(saved: Saved) -> str:
    """``triggers.json`` text for ``saved`` (names sorted, so that a diff is readable)."""
    tables: dict[str, object] = {**saved.kept, **{name: spec_table(spec)
                                                  for name, spec in saved.triggers.items()}}
    return json.dumps({"format": FORMAT, "version": VERSION,
                       "triggers": {name: tables[name] for name in sorted(tables)},
                       "removed": sorted(saved.removed)}, indent=2, ensure_ascii=False) + "\n"


def decode_saved(text: str, *, where: str, config: Mapping[str, TriggerSpec],
                 sources: Collection[str]) -> tuple[Saved, list[str]]:
    """Read ``triggers.json`` text; ``(saved, problems with single entries)``.

    Args:
        where: The file, named at the start of every problem.
        config: The file's triggers (a removal of anything else is dropped).
        sources: The configured sources (a saved trigger naming another is dropped).

    Raises:
        ValueError: The text is not this format and version at all (the file is set aside).
    """
    data, problem = parse_json_object(text.encode("utf-8"), what="the file",
                                      expected="a JSON object")
    if data is None:
        raise ValueError(problem)
    if data.get("format") != FORMAT:
        raise ValueError(f'not a triggers file (expected "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise ValueError(f"version {shown(data.get('version'))} is not {VERSION}")
    tables, removed = data.get("triggers", {}), data.get("removed", [])
    shape = (None if isinstance(tables, dict) else '"triggers" is not an object') or (
        None if isinstance(removed, list) and all(isinstance(n, str) for n in removed)
        else '"removed" is not a list of names')
    if shape is not None or not isinstance(tables, dict) or not isinstance(removed, list):
        raise ValueError(shape)
    problems: list[str] = []
    specs: dict[str, TriggerSpec] = {}
    kept: dict[str, object] = {}
    for name, table in list(tables.items())[:MAX_TRIGGERS]:
        found: list[str] = []  # an entry with any problem is left out whole
        got = read_triggers({name: table}, sources, found)
        problems.extend(found)
        if not found and name in got:
            specs[name] = got[name]
        else:
            kept[name] = table
    return (Saved(specs, frozenset(n for n in removed if n in config), kept),
            [f"{where}: {p}" for p in problems])


def _examples_problem(name: str, spec: TriggerSpec,
                      config: Mapping[str, TriggerSpec]) -> str | None:
    """A run-time definition may keep the file's example files, not name others."""
    if not spec.examples:
        return None
    known = config.get(name)
    if known is not None and known.examples == spec.examples:
        return None
    return (f"triggers.{toml_key(name)}.examples: example files are set in the config file "
            f"only, not at run time (got {shown(list(spec.examples))})")


def validate(name: str, table: object, *, sources: Collection[str],
             config: Mapping[str, TriggerSpec]) -> TriggerSpec:
    """``table`` read as ``[triggers.<name>]`` with the config file's reader and checks.

    Raises:
        ConfigError: Every problem, each naming ``triggers.<name>.<key>``.
    """
    problems: list[str] = []
    got = read_triggers({name: table}, sources, problems)
    spec = got.get(name)
    if spec is not None and (problem := _examples_problem(name, spec, config)):
        problems.append(problem)
    if problems or spec is None:
        raise ConfigError(problems or [f"triggers.{toml_key(name)}: expected a table"])
    return spec


@dataclass(frozen=True, slots=True)
class Change:
    """What :meth:`TriggerRegistry.put` or :meth:`TriggerRegistry.remove` did."""

    name: str
    action: str  # "added", "changed", "unchanged" or "removed"
    spec: TriggerSpec | None


# --------------------------------------------------------------------------- the registry


class TriggerRegistry:
    """The live set of triggers (see the module docstring).

    Build it with :meth:`open`; change it with :meth:`put` and :meth:`remove` on
    the event loop; read it with :meth:`specs`; be told of changes with
    :meth:`subscribe`.

    Args:
        config: ``Config.triggers``, the file's triggers.
        sources: The configured source names (a trigger may name only these).
        path: The ``triggers.json`` of the run-time changes.
        saved: The changes already read from ``path``.
        max_triggers: The most triggers held.
    """

    def __init__(self, config: Mapping[str, TriggerSpec], sources: Collection[str], path: Path,
                 saved: Saved | None = None, *, max_triggers: int = MAX_TRIGGERS) -> None:
        self.config: Mapping[str, TriggerSpec] = dict(config)
        self.sources = frozenset(sources)
        self.path = path
        self.max_triggers = max_triggers
        self._saved = saved or Saved()
        self._specs = merge(self.config, self._saved)
        self._listeners: list[Listener] = []
        self.check: Callable[[TriggerSpec], list[str]] | None = None
        """The loaded model's own checks of a definition (phrasings its tokenizer cannot
        represent, ...), run by :meth:`put` after the config file's."""

    @classmethod
    def open(cls, config: Mapping[str, TriggerSpec], sources: Collection[str],
             directory: Path, *, max_triggers: int = MAX_TRIGGERS) -> TriggerRegistry:
        """The registry of ``<directory>/triggers.json`` (absent: the file's triggers alone).

        Never fails on the saved file: a corrupt one is set aside (see the module docstring).
        """
        path = directory / FILE_NAME
        saved = Saved()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as exc:
            text = None
            _set_aside(path, f"cannot be read: {getattr(exc, 'strerror', None) or exc}")
        if text is not None:
            try:
                saved, problems = decode_saved(text, where=str(path), config=config,
                                               sources=sources)
            except ValueError as exc:
                _set_aside(path, str(exc))
            except Exception as exc:  # noqa: BLE001 - a saved file never stops the start
                _set_aside(path, f"cannot be decoded ({type(exc).__name__})")
            else:
                for problem in problems:
                    _log.warning("saved trigger ignored: it does not validate in this run; "
                                 "kept in the file as it is", problem=problem)
                for name in sorted(set(saved.triggers) & set(config)):
                    if saved.triggers[name] != config[name]:
                        _log.info("trigger defined at run time overrides the config file's",
                                  trigger=name, saved=str(path))
                for name in sorted(saved.removed):
                    _log.info("trigger of the config file removed at run time", trigger=name,
                              saved=str(path))
        registry = cls(config, sources, path, saved, max_triggers=max_triggers)
        if len(registry._specs) > max_triggers:
            _log.warning("more triggers than the registry holds; run-time changes beyond the "
                         "limit are refused", triggers=len(registry._specs), max=max_triggers)
        return registry

    # ----------------------------------------------------------------- reading

    def specs(self) -> Mapping[str, TriggerSpec]:
        """The live set, by name (a copy)."""
        return dict(self._specs)

    def origin(self, name: str) -> str:
        """``"config"`` for a trigger as the file defines it, ``"runtime"`` otherwise."""
        return "runtime" if name in self._saved.triggers else "config"

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(specs)`` after every change with the new full set; returns the
        unsubscribe function. A callback that raises is logged and the others still run."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)
        return unsubscribe

    # ----------------------------------------------------------------- changing

    def put(self, name: str, table: object) -> Change:
        """Add or change trigger ``name`` to ``table`` (a ``[triggers.<name>]`` table).

        Raises:
            ConfigError: ``table`` is not valid (every problem, the file's dotted keys);
                nothing changed.
            TriggerStoreError: The change could not be saved; nothing changed.
        """
        spec = validate(name, table, sources=self.sources, config=self.config)
        if self.check is not None and (problems := self.check(spec)):
            raise ConfigError(problems)
        old = self._specs.get(name)
        if old is None and len(self._specs) >= self.max_triggers:
            raise ConfigError(f"triggers.{toml_key(name)}: at most {self.max_triggers} triggers "
                              f"(there are {len(self._specs)}); remove one first")
        triggers = dict(self._saved.triggers)
        if self.config.get(name) == spec:
            triggers.pop(name, None)  # the file's own definition: the file rules it again
        else:
            triggers[name] = spec
        kept = {k: v for k, v in self._saved.kept.items() if k != name}
        saved = Saved(triggers, self._saved.removed - {name}, kept)
        if saved == self._saved:
            return Change(name, "unchanged", spec)
        self._commit(saved)
        return Change(name, "added" if old is None else "changed", spec)

    def remove(self, name: str) -> Change | None:
        """Remove trigger ``name``; None when there is no such trigger.

        Raises:
            TriggerStoreError: The change could not be saved; nothing changed.
        """
        if name not in self._specs:
            return None
        triggers = {k: v for k, v in self._saved.triggers.items() if k != name}
        removed = self._saved.removed | ({name} if name in self.config else set())
        kept = {k: v for k, v in self._saved.kept.items() if k != name}
        self._commit(Saved(triggers, frozenset(removed), kept))
        return Change(name, "removed", None)

    def _commit(self, saved: Saved) -> None:
        try:
            replace_text(self.path, encode_saved(saved))
        except OSError as exc:
            _log.error("cannot save the run-time triggers; the change is refused",
                       path=str(self.path), error=exc.strerror or str(exc))
            raise TriggerStoreError(f"cannot save the triggers to {self.path}: "
                                    f"{exc.strerror or exc}") from exc
        self._saved = saved
        self._specs = merge(self.config, saved)
        specs = self.specs()
        for listener in list(self._listeners):
            try:
                listener(specs)
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                _log.exception("trigger registry listener raised")


def _set_aside(path: Path, reason: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.bad-{stamp}")
    try:
        os.replace(path, target)
    except OSError as exc:
        _log.warning("saved triggers unusable and cannot be set aside; starting from the config "
                     "file's triggers", path=str(path), reason=reason,
                     error=exc.strerror or str(exc))
        return
    _log.warning("saved triggers unusable: set aside; starting from the config file's triggers",
                 path=str(path), reason=reason, set_aside=str(target))


# --------------------------------------------------------------------------- states


@dataclass(frozen=True, slots=True)
class SourceState:
    """A trigger's newest known state on one source.

    ``last_fired_at`` (wall clock) and ``fired_id`` are those of its newest ``on``
    event, kept when it turns off; None/"" before it ever fired in this run.
    """

    state: TriggerState
    changed_at: float | None
    last_fired_at: float | None = None
    fired_id: str = ""
    score: float | None = None


class TriggerStates:
    """The newest state per (trigger, source), from the engine's TriggerEvents.

    The daemon passes every published TriggerEvent to :meth:`observe` (announcements
    included: they set "off"); :meth:`retain` drops removed triggers' entries, and
    from then on events of a (source, trigger) pair the set does not watch are
    ignored (one produced before its trigger was removed and handled after).
    """

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], SourceState] = {}
        self._specs: Mapping[str, TriggerSpec] | None = None

    def observe(self, event: TriggerEvent) -> None:
        """Take ``event`` as its pair's newest state; ``changed_at`` is its ``captured_at``
        (None when not finite)."""
        if self._specs is not None and not watches(self._specs, event.trigger,
                                                   event.source_id):
            return
        key = (event.trigger, event.source_id)
        old = self._states.get(key)
        at = event.captured_at if math.isfinite(event.captured_at) else None
        score = event.score if math.isfinite(event.score) else None
        if event.state is TriggerState.ON:
            self._states[key] = SourceState(TriggerState.ON, at, at, event.event_id, score)
        else:
            self._states[key] = SourceState(
                TriggerState.OFF, at, old.last_fired_at if old else None,
                old.fired_id if old else "", score)

    def retain(self, specs: Mapping[str, TriggerSpec]) -> None:
        """Forget the pairs ``specs`` does not watch, and ignore their events from now on
        (a registry listener)."""
        self._specs = dict(specs)
        for key in [k for k in self._states if not watches(specs, k[0], k[1])]:
            del self._states[key]

    def of(self, trigger: str) -> dict[str, SourceState]:
        """By source."""
        return {src: st for (name, src), st in self._states.items() if name == trigger}
