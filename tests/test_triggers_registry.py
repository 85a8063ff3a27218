"""The trigger registry: the file's triggers merged with saved run-time changes, on real files."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest

from streamcap.errors import ConfigError
from streamcap.messages import TriggerEvent, TriggerState
from streamcap.triggers.registry import (
    FILE_NAME,
    TriggerRegistry,
    TriggerStates,
    TriggerStoreError,
)
from streamcap.triggers.spec import TriggerSpec, read_trigger

SOURCES = ("porch", "kitchen")


def spec(name: str, **table: object) -> TriggerSpec:
    table.setdefault("text", [f"a {name}"])
    return read_trigger(name, table, f"triggers.{name}").result()


def config() -> dict[str, TriggerSpec]:
    return {"dog": spec("dog", text=["a dog barks"]),
            "smoke": spec("smoke", text=["a smoke alarm beeps"], examples=["beep.wav"])}


def open_registry(directory: Path, cfg: Mapping[str, TriggerSpec] | None = None,
                  **kwargs: int) -> TriggerRegistry:
    return TriggerRegistry.open(config() if cfg is None else cfg, SOURCES, directory, **kwargs)


class Recorder:
    def __init__(self, registry: TriggerRegistry) -> None:
        self.calls: list[dict[str, TriggerSpec]] = []
        self.saved_at_call: list[str] = []
        self.registry = registry
        registry.subscribe(self)

    def __call__(self, specs: Mapping[str, TriggerSpec]) -> None:
        self.calls.append(dict(specs))
        self.saved_at_call.append(self.registry.path.read_text(encoding="utf-8"))


def test_without_a_saved_file_the_config_files_triggers_are_live(tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    assert registry.specs() == config()
    assert registry.origin("dog") == "config"
    assert not (tmp_path / FILE_NAME).exists()


def test_an_added_trigger_is_saved_before_listeners_hear_of_it_and_survives_a_reopen(
        tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    heard = Recorder(registry)
    change = registry.put("glass", {"text": ["glass breaks"], "sources": ["porch"],
                                    "threshold": 0.3, "min_hits": 1})
    assert change.action == "added"
    assert change.spec == spec("glass", text=["glass breaks"], sources=["porch"],
                               threshold=0.3, min_hits=1)
    assert len(heard.calls) == 1 and set(heard.calls[0]) == {"dog", "smoke", "glass"}
    assert '"glass"' in heard.saved_at_call[0]  # written before the listener was called
    saved = json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))
    assert saved["format"] == "streamcap-triggers" and saved["version"] == 1
    assert saved["triggers"]["glass"]["threshold"] == 0.3
    again = open_registry(tmp_path)
    assert again.specs()["glass"] == change.spec
    assert again.origin("glass") == "runtime"


@pytest.mark.parametrize(("table", "expected"), [
    ({"text": ["a dog barks"], "min_hits": 5, "of_windows": 3},
     "triggers.dog.min_hits: must be <= of_windows (got 5 > 3)"),
    ({"text": ["a dog barks"], "sources": ["garage"]},
     "triggers.dog.sources: no such source 'garage' (sources: kitchen, porch)"),
    ({"text": []}, "triggers.dog.text:"),
    ({"txt": ["a dog barks"]}, "triggers.dog.txt: unknown key"),
    ({"text": ["a dog barks"], "threshold": "high"},
     "triggers.dog.threshold: expected \"auto\" or a number (got 'high')"),
    ({"text": ["a dog barks"], "examples": ["/etc/passwd"]},
     "triggers.dog.examples: example files are set in the config file only"),
    ("not a table", "triggers.dog: expected a table"),
])
def test_a_bad_definition_names_the_dotted_key_and_changes_nothing(
        tmp_path: Path, table: object, expected: str) -> None:
    registry = open_registry(tmp_path)
    heard = Recorder(registry)
    with pytest.raises(ConfigError) as caught:
        registry.put("dog", table)
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems
    assert registry.specs() == config()
    assert heard.calls == []
    assert not (tmp_path / FILE_NAME).exists()


def test_a_bad_name_is_refused_like_in_the_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        open_registry(tmp_path).put("a dog", {"text": ["a dog barks"]})
    assert caught.value.problems == [
        "triggers.\"a dog\": a trigger name must be 1-64 letters, digits, '-' or '_'"]


def test_a_run_time_change_overrides_the_files_definition_until_set_back_to_it(
        tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    changed = registry.put("dog", {"text": ["a dog barks loudly"], "cooldown_s": 60})
    assert changed.action == "changed" and registry.origin("dog") == "runtime"
    # the file's definition changes later: the run-time one still wins after a restart
    edited = {**config(), "dog": spec("dog", text=["a puppy yelps"])}
    reopened = open_registry(tmp_path, edited)
    assert reopened.specs()["dog"].text == ("a dog barks loudly",)
    # setting it to the file's own definition hands it back to the file
    back = reopened.put("dog", {"text": ["a puppy yelps"]})
    assert back.action == "changed" and reopened.origin("dog") == "config"
    saved = json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))
    assert "dog" not in saved["triggers"]
    assert open_registry(tmp_path, edited).specs()["dog"] == edited["dog"]


def test_keeping_the_files_example_files_is_allowed(tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    change = registry.put("smoke", {"text": ["an alarm beeps"], "examples": ["beep.wav"]})
    assert change.spec is not None and change.spec.examples == ("beep.wav",)


def test_an_unchanged_definition_writes_nothing_and_tells_nobody(tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    heard = Recorder(registry)
    assert registry.put("dog", {"text": ["a dog barks"]}).action == "unchanged"
    assert heard.calls == [] and not (tmp_path / FILE_NAME).exists()


def test_removing_a_file_defined_trigger_is_saved_as_removed_until_added_again(
        tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    heard = Recorder(registry)
    change = registry.remove("smoke")
    assert change is not None and change.action == "removed"
    assert set(heard.calls[-1]) == {"dog"}
    assert set(open_registry(tmp_path).specs()) == {"dog"}
    assert registry.remove("smoke") is None  # gone: nothing to remove
    assert registry.remove("nothing") is None
    again = open_registry(tmp_path)
    again.put("smoke", {"text": ["an alarm beeps"]})
    assert open_registry(tmp_path).specs()["smoke"].text == ("an alarm beeps",)


def test_removing_a_run_time_trigger_forgets_it(tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    registry.put("glass", {"text": ["glass breaks"]})
    registry.remove("glass")
    saved = json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))
    assert saved["triggers"] == {} and saved["removed"] == []
    assert set(open_registry(tmp_path).specs()) == {"dog", "smoke"}


@pytest.mark.parametrize("text", [
    "{not json", "[]", '{"format": "something else", "version": 1}',
    '{"format": "streamcap-triggers", "version": 99, "triggers": {}}',
    '{"format": "streamcap-triggers", "version": 1, "triggers": []}',
    '{"format": "streamcap-triggers", "version": 1, "removed": [1]}',
])
def test_a_corrupt_saved_file_is_set_aside_and_the_file_triggers_are_used(
        tmp_path: Path, text: str) -> None:
    (tmp_path / FILE_NAME).write_text(text, encoding="utf-8")
    registry = open_registry(tmp_path)
    assert registry.specs() == config()
    assert not (tmp_path / FILE_NAME).exists()
    aside = list(tmp_path.glob(f"{FILE_NAME}.bad-*"))
    assert len(aside) == 1 and aside[0].read_text(encoding="utf-8") == text
    registry.put("glass", {"text": ["glass breaks"]})  # and it goes on working
    assert "glass" in open_registry(tmp_path).specs()


def test_a_saved_trigger_that_no_longer_validates_is_ignored_the_others_kept(
        tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    registry.put("garage_door", {"text": ["a door slams"], "sources": ["kitchen"]})
    registry.put("glass", {"text": ["glass breaks"]})
    # the config file no longer has the source "kitchen"
    reopened = TriggerRegistry.open(config(), ("porch",), tmp_path)
    assert set(reopened.specs()) == {"dog", "smoke", "glass"}


def test_at_most_max_triggers(tmp_path: Path) -> None:
    registry = open_registry(tmp_path, max_triggers=3)
    registry.put("glass", {"text": ["glass breaks"]})
    with pytest.raises(ConfigError) as caught:
        registry.put("door", {"text": ["a door slams"]})
    assert caught.value.problems == [
        "triggers.door: at most 3 triggers (there are 3); remove one first"]
    registry.put("glass", {"text": ["glass shatters"]})  # changing one is fine at the limit
    assert set(registry.specs()) == {"dog", "smoke", "glass"}


def test_a_change_that_cannot_be_saved_changes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    registry = open_registry(blocker / "triggers")
    heard = Recorder(registry)
    with pytest.raises(TriggerStoreError, match="cannot save the triggers"):
        registry.put("glass", {"text": ["glass breaks"]})
    with pytest.raises(TriggerStoreError):
        registry.remove("dog")
    assert registry.specs() == config() and heard.calls == []


def test_a_listener_that_raises_does_not_stop_the_others(tmp_path: Path) -> None:
    registry = open_registry(tmp_path)

    def broken(_specs: Mapping[str, TriggerSpec]) -> None:
        raise RuntimeError("boom")

    registry.subscribe(broken)
    heard = Recorder(registry)
    unsubscribe = registry.subscribe(lambda specs: heard.calls.append({"second": specs["dog"]}))
    registry.put("glass", {"text": ["glass breaks"]})
    assert len(heard.calls) == 2
    unsubscribe()
    registry.remove("glass")
    assert len(heard.calls) == 3


def event(trigger: str, source: str, state: TriggerState, *, n: int, fired_id: str = "",
          at: float = 1000.0, score: float = 0.5) -> TriggerEvent:
    return TriggerEvent(event_id=f"run-{trigger}-{source}-{n}", trigger=trigger,
                        source_id=source, state=state, score=score, threshold=0.4,
                        start_s=0.0, end_s=5.0, captured_at=at, run_id="run", fired_id=fired_id)


def test_states_follow_events_and_keep_the_last_firing() -> None:
    states = TriggerStates()
    states.observe(event("dog", "porch", TriggerState.OFF, n=1, at=math.nan, score=math.nan))
    announced = states.of("dog")["porch"]
    assert announced.state is TriggerState.OFF and announced.last_fired_at is None
    assert announced.score is None and announced.changed_at is None
    states.observe(event("dog", "porch", TriggerState.ON, n=2, at=1010.0))
    on = states.of("dog")["porch"]
    assert (on.state, on.last_fired_at, on.fired_id) == (TriggerState.ON, 1010.0,
                                                         "run-dog-porch-2")
    states.observe(event("dog", "porch", TriggerState.OFF, n=3, at=1020.0,
                         fired_id="run-dog-porch-2"))
    off = states.of("dog")["porch"]
    assert (off.state, off.changed_at, off.last_fired_at, off.fired_id) == (
        TriggerState.OFF, 1020.0, 1010.0, "run-dog-porch-2")
    states.observe(event("glass", "kitchen", TriggerState.ON, n=1))
    states.retain({"glass": spec("glass")})
    assert states.of("dog") == {} and set(states.of("glass")) == {"kitchen"}


HUGE = 10 ** 400  # a valid JSON integer whose float() overflows


@pytest.mark.parametrize("triggers", [
    '{"cat": {"text": ["a cat"], "threshold": ' + str(HUGE) + "}}",
    "[" * 100_000 + "]" * 100_000,  # deeper than json.loads recurses
    '{"cat": {"text": ' + "[" * 40 + '"a"' + "]" * 40 + "}}",  # loads, deeper than allowed
])
def test_open_never_fails_on_the_saved_file(tmp_path: Path, triggers: str) -> None:
    text = '{"format": "streamcap-triggers", "version": 1, "triggers": ' + triggers + "}"
    (tmp_path / FILE_NAME).write_text(text, encoding="utf-8")
    registry = open_registry(tmp_path)
    assert registry.specs() == config()
    # a huge threshold is a problem of one entry (ignored); anything nested too deep
    # sets the whole file aside
    aside = list(tmp_path.glob(f"{FILE_NAME}.bad-*"))
    assert len(aside) == (0 if "threshold" in triggers else 1)


def test_a_run_with_other_sources_keeps_the_saved_triggers_it_cannot_use(
        tmp_path: Path) -> None:
    """`streamcap --source x` opens the same state directory with the one source "cli"."""
    normal = open_registry(tmp_path)
    normal.put("glass", {"text": ["glass breaks"], "sources": ["porch"]})
    cli = TriggerRegistry.open(config(), ("cli",), tmp_path)
    assert "glass" not in cli.specs()  # ignored in that run
    cli.put("tmp", {"text": ["a kettle whistles"]})  # a change rewrites the file
    cli.remove("smoke")
    again = open_registry(tmp_path)
    assert again.specs()["glass"] == spec("glass", text=["glass breaks"], sources=["porch"])
    assert {"tmp", "glass"} <= set(again.specs()) and "smoke" not in again.specs()
    # a new definition of the same name replaces the kept one
    cli.put("glass", {"text": ["a window shatters"]})
    assert open_registry(tmp_path).specs()["glass"].text == ("a window shatters",)


def test_states_ignore_events_of_pairs_no_longer_watched() -> None:
    """An event decided before its trigger was removed, observed after: not brought back."""
    states = TriggerStates()
    states.retain({"dog": spec("dog", sources=["porch"]), "cat": spec("cat")})
    states.observe(event("dog", "porch", TriggerState.ON, n=1))
    states.observe(event("dog", "kitchen", TriggerState.ON, n=1))  # dog does not watch it
    states.observe(event("cat", "kitchen", TriggerState.ON, n=1))
    assert set(states.of("dog")) == {"porch"} and set(states.of("cat")) == {"kitchen"}
    states.retain({"cat": spec("cat")})
    states.observe(event("dog", "porch", TriggerState.OFF, n=2, fired_id="run-dog-porch-1"))
    assert states.of("dog") == {}


def test_the_models_own_check_refuses_a_definition_and_changes_nothing(tmp_path: Path) -> None:
    registry = open_registry(tmp_path)
    heard = Recorder(registry)

    def check(candidate: TriggerSpec) -> list[str]:
        return [f"triggers.{candidate.name}.text[0]: the model's tokenizer keeps nothing of it"
                ] if candidate.text == ("✶✶✶",) else []

    registry.check = check
    with pytest.raises(ConfigError, match=r"triggers\.cat\.text\[0\]: the model's tokenizer"):
        registry.put("cat", {"text": ["✶✶✶"]})
    assert "cat" not in registry.specs() and heard.calls == []
    assert not (tmp_path / FILE_NAME).exists()
    assert registry.put("cat", {"text": ["a cat meows"]}).action == "added"
