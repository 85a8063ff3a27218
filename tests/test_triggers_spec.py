"""Reading a trigger's definition: the threshold, and which pairs a set of triggers watches."""

from __future__ import annotations

import tomllib

import pytest

from streamcap.config import parse_config
from streamcap.errors import ConfigError
from streamcap.triggers.spec import TriggerSpec, read_trigger, watches

HUGE = 10 ** 400  # float(HUGE) overflows


def spec(name: str, **table: object) -> TriggerSpec:
    table.setdefault("text", [f"a {name}"])
    return read_trigger(name, table, f"triggers.{name}").result()


@pytest.mark.parametrize("threshold", [HUGE, -HUGE, 2, -2, 1.5, float("inf"), float("nan")])
def test_a_threshold_out_of_range_is_a_problem_never_an_exception(threshold: object) -> None:
    got = read_trigger("dog", {"text": ["a dog barks"], "threshold": threshold}, "triggers.dog")
    assert len(got.problems) == 1
    assert got.problems[0].startswith("triggers.dog.threshold: must be between -1 and 1 (got ")
    assert len(got.problems[0]) < 200  # a huge integer is not spelled out


@pytest.mark.parametrize(("threshold", "expected"), [
    (1, 1.0), (-1, -1.0), (0, 0.0), (0.25, 0.25), ("auto", None)])
def test_a_threshold_in_range_is_read_as_a_float(threshold: object,
                                                 expected: float | None) -> None:
    got = read_trigger("dog", {"text": ["a"], "threshold": threshold}, "triggers.dog")
    assert got.problems == () and got.value.threshold == expected


def test_a_huge_threshold_in_the_config_file_is_a_config_error() -> None:
    text = ('[sources.porch]\nuri = "file:/x.wav"\n'
            f'[triggers.dog]\ntext = ["a dog barks"]\nthreshold = {HUGE}\n')
    with pytest.raises(ConfigError, match=r"triggers\.dog\.threshold: must be between -1 and 1"):
        parse_config(tomllib.loads(text))


def test_watches_names_the_pairs_of_the_live_set() -> None:
    specs = {"dog": spec("dog", sources=["porch"]), "cat": spec("cat")}
    assert watches(specs, "dog", "porch") and not watches(specs, "dog", "kitchen")
    assert watches(specs, "cat", "kitchen")  # no sources: every source
    assert not watches(specs, "cow", "porch") and not watches({}, "dog", "porch")
