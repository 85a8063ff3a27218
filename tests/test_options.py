"""streamcap.options: the one reader of option dataclasses, its types, rules and messages."""

from __future__ import annotations

import math
import os
import sys
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from streamcap import options
from streamcap.errors import ConfigError
from streamcap.options import (
    as_found,
    fixed,
    given_keys,
    irregular_file,
    known_keys,
    open_regular,
    option,
    read,
    read_options,
    regular_file,
    secret,
    shown,
    toml_key,
)

Colour = Literal["red", "green"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Inner:
    depth: int = option(1, min=1, max=3)


@dataclass(frozen=True, slots=True, kw_only=True)
class Opts:
    name: str = fixed("")
    title: str = option("t", non_empty=True)
    count: int = option(2, min=0, max=10)
    ratio: float = option(0.5, above=0, max=1)
    rate_hz: int | None = option(None, min=8000, max=48000, null=0)
    on: bool = True
    mode: str = option("a", choices=("a", "b"))
    colour: Colour = "red"
    kinds: frozenset[str] = option(frozenset({"x"}), choices=("x", "y"), non_empty=True)
    tags: tuple[str, ...] = ()
    path: Path | None = None
    token_env: str | None = option(None, secret="the test token")
    even: int = option(0, check=lambda v: None if v % 2 == 0 else "must be even")
    inner: Inner = option(default_factory=Inner)
    extra: Mapping[str, object] = option(default_factory=dict)
    explicit: frozenset[str] = given_keys()


def problems(values: Mapping[str, Any], **kwargs: Any) -> list[str]:
    return list(read(Opts, values, "sinks.t", **kwargs).problems)


# --------------------------------------------------------------------------- good values


def test_defaults_and_given_values() -> None:
    assert read_options(Opts, {}, fixed_values={"name": "n"}) == Opts(name="n")
    got = read_options(Opts, {"title": "x", "count": 10, "ratio": 1, "rate_hz": 16000,
                              "on": False, "mode": "b", "colour": "green",
                              "kinds": ["x", "y"], "tags": ["a", "b"], "path": "/tmp/a",
                              "inner": {"depth": 3}, "extra": {"k": [1]}})
    assert got == Opts(title="x", count=10, ratio=1.0, rate_hz=16000, on=False, mode="b",
                       colour="green", kinds=frozenset({"x", "y"}), tags=("a", "b"),
                       path=Path("/tmp/a"), inner=Inner(depth=3), extra={"k": [1]})
    assert isinstance(got.ratio, float)  # an integer is accepted for a number
    assert got.explicit == frozenset({"title", "count", "ratio", "rate_hz", "on", "mode",
                                      "colour", "kinds", "tags", "path", "inner", "extra"})


def test_null_stands_for_none() -> None:
    assert read_options(Opts, {"rate_hz": 0}).rate_hz is None
    assert read_options(Opts, {"rate_hz": "0"}, text=True).rate_hz is None


def test_text_values_of_a_uri_query() -> None:
    got = read_options(Opts, {"count": "7", "ratio": " 0.25 ", "on": "no", "rate_hz": "+8000"},
                       text=True)
    assert (got.count, got.ratio, got.on, got.rate_hz) == (7, 0.25, False, 8000)
    for word, value in (("1", True), ("TRUE", True), ("yes", True), ("on", True),
                        ("0", False), ("false", False), ("Off", False)):
        assert read_options(Opts, {"on": word}, text=True).on is value
    # Without text=True a string is not a number.
    assert problems({"count": "7"}) == ["sinks.t.count: expected an integer (got a string '7')"]


def test_known_keys() -> None:
    assert "name" not in known_keys(Opts) and "explicit" not in known_keys(Opts)
    assert {"title", "inner", "token_env"} <= known_keys(Opts)


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(("values", "expected"), [
    ({"count": True}, "sinks.t.count: expected an integer (got a boolean true)"),
    ({"count": 2.0}, "sinks.t.count: expected an integer (got a number 2.0)"),
    ({"ratio": "0.5"}, "sinks.t.ratio: expected a number (got a string '0.5')"),
    ({"ratio": False}, "sinks.t.ratio: expected a number (got a boolean false)"),
    ({"on": 1}, "sinks.t.on: expected true or false (got an integer 1)"),
    ({"title": 3}, "sinks.t.title: expected a string (got an integer 3)"),
    ({"tags": "a"}, "sinks.t.tags: expected an array (got a string 'a')"),
    ({"tags": ["a", 1]}, "sinks.t.tags: expected a string (got an integer 1)"),
    ({"inner": 3}, "sinks.t.inner: expected a table (got an integer)"),
    ({"extra": [1]}, "sinks.t.extra: expected a table (got an array)"),
    ({"path": 5}, "sinks.t.path: expected a string (got an integer 5)"),
])
def test_wrong_types(values: dict[str, Any], expected: str) -> None:
    assert problems(values) == [expected]


@pytest.mark.parametrize("value", ["maybe", "2", "", "tru"])
def test_text_that_is_no_boolean(value: str) -> None:
    assert problems({"on": value}, text=True) == [
        f"sinks.t.on: expected true or false (got a string {value!r})"]


@pytest.mark.parametrize("value", ["1e9", "1.0", "", "ten", "0x10"])
def test_text_that_is_no_integer(value: str) -> None:
    assert problems({"count": value}, text=True) == [
        f"sinks.t.count: expected an integer (got a string {value!r})"]


def test_text_of_more_digits_than_int_reads_is_refused_not_raised() -> None:
    limit = sys.get_int_max_str_digits()
    [problem] = problems({"count": "9" * (limit + 1)}, text=True)
    assert problem.startswith(f"sinks.t.count: expected an integer of at most {limit} digits "
                              f"(got '999")
    assert len(problem) < 160


def test_an_integer_too_long_to_print_is_shown_as_such() -> None:
    limit = sys.get_int_max_str_digits()
    assert shown(10 ** (limit + 1)) == f"an integer of more than {limit} digits"


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"])
def test_nan_and_infinities_are_never_numbers(value: object) -> None:
    assert problems({"ratio": value}, text=True) == [
        f"sinks.t.ratio: must be a finite number (got {value!r})"]


def test_an_integer_too_large_for_a_float_is_no_finite_number() -> None:
    [problem] = problems({"ratio": 10**400})
    assert problem.startswith("sinks.t.ratio: must be a finite number (got 1000")


@pytest.mark.parametrize(("values", "expected"), [
    ({"count": -1}, "sinks.t.count: must be between 0 and 10 (got -1)"),
    ({"count": 2**63}, f"sinks.t.count: must be between 0 and 10 (got {2**63})"),
    ({"ratio": 0}, "sinks.t.ratio: must be > 0 and <= 1 (got 0.0)"),
    ({"ratio": 1.5}, "sinks.t.ratio: must be > 0 and <= 1 (got 1.5)"),
    ({"ratio": 1e-320}, None),
    ({"rate_hz": 4000}, ("sinks.t.rate_hz: must be 0 (automatic) or between 8000 and 48000 "
                         "(got 4000)")),
    ({"even": 3}, "sinks.t.even: must be even (got 3)"),
    ({"inner": {"depth": 4}}, "sinks.t.inner.depth: must be between 1 and 3 (got 4)"),
])
def test_ranges_and_checks(values: dict[str, Any], expected: str | None) -> None:
    assert problems(values) == ([] if expected is None else [expected])


def test_range_limits_are_accepted() -> None:
    got = read_options(Opts, {"count": 0, "ratio": 1, "rate_hz": 48000, "even": 4})
    assert (got.count, got.ratio, got.rate_hz, got.even) == (0, 1.0, 48000, 4)
    assert read_options(Opts, {"count": 10, "rate_hz": 8000}).count == 10


def test_text_values_obey_the_same_ranges_and_show_what_was_written() -> None:
    assert problems({"count": "11", "ratio": "0"}, text=True) == [
        "sinks.t.count: must be between 0 and 10 (got '11')",
        "sinks.t.ratio: must be > 0 and <= 1 (got '0')"]


# --------------------------------------------------------------------------- choices, strings


@pytest.mark.parametrize(("values", "expected"), [
    ({"mode": "c"}, "sinks.t.mode: must be one of a, b (got 'c')"),
    ({"colour": "blue"}, "sinks.t.colour: must be one of red, green (got 'blue')"),
    ({"kinds": ["x", "z"]}, "sinks.t.kinds: must be some of x, y (got ['x', 'z'])"),
    ({"kinds": []}, "sinks.t.kinds: must not be empty (got [])"),
    ({"title": ""}, "sinks.t.title: must not be empty (got '')"),
    ({"title": "  "}, "sinks.t.title: must not be empty (got '  ')"),
])
def test_choices_and_empty_values(values: dict[str, Any], expected: str) -> None:
    assert problems(values) == [expected]


def test_a_long_value_is_shown_cut_short() -> None:
    [problem] = problems({"title": ["x" * 500]})
    assert problem.startswith("sinks.t.title: expected a string (got an array ['xxx")
    assert problem.endswith("...)") and len(problem) < 140


# --------------------------------------------------------------------------- keys


def test_unknown_keys_name_the_known_ones() -> None:
    known = ", ".join(sorted(known_keys(Opts)))
    assert problems({"colour": "red", "color": "red"}) == [
        f"sinks.t.color: unknown key (known keys: {known})"]


@pytest.mark.parametrize(("name", "key"), [
    ("plain_key-1", "plain_key-1"), ("with space", '"with space"'), ("", '""'),
    ("kü", '"kü"'), ('q"\\', '"q\\"\\\\"'),
    ("\x1b[31m\r\n\x00\x7f\x9b\u202e", '"\\u001b[31m\\u000d\\u000a\\u0000\\u007f\\u009b\\u202e"'),
    ("k" * 200, "k" * 77 + "..."),
])
def test_a_key_is_named_as_toml_writes_it(name: str, key: str) -> None:
    """No raw control character, line break or bidi override from a file reaches a message."""
    assert toml_key(name) == key
    assert problems({name: 1})[0].startswith(f"sinks.t.{key}: unknown key")


def test_a_quoted_key_reads_back_as_the_key() -> None:
    for name in ("with space", "\x1b[31m\r\n", 'q"\\', "kü\u202e"):
        assert tomllib.loads(f"{toml_key(name)} = 1") == {name: 1}


def test_keys_read_elsewhere_are_known_and_listed() -> None:
    assert problems({"queue_size": 3}, also={"queue_size"}) == []
    [problem] = problems({"bogus": 1}, also={"queue_size"})
    assert "queue_size" in problem and problem.startswith("sinks.t.bogus: unknown key")


def test_a_fixed_field_is_not_a_key() -> None:
    [problem] = problems({"name": "x"})
    assert problem.startswith("sinks.t.name: unknown key")


def test_a_label_names_keys_outside_a_table() -> None:
    with pytest.raises(ConfigError) as err:
        read_options(Opts, {"count": "x"}, text=True, label=lambda k: f"option {k!r}")
    assert err.value.problems == ["option 'count': expected an integer (got a string 'x')"]


def test_a_missing_required_key_says_what_it_is() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Needs:
        uri: str = option("", required=True, help="every source needs a uri")

    assert list(read(Needs, {}, "sources.a").problems) == [
        "sources.a.uri: missing: every source needs a uri"]


# --------------------------------------------------------------------------- secrets


def test_a_secret_is_read_from_the_variable_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMCAP_TEST_OPTIONS_TOKEN", "s3cret")
    got = read_options(Opts, {"token_env": "STREAMCAP_TEST_OPTIONS_TOKEN"})
    assert got.token_env == "STREAMCAP_TEST_OPTIONS_TOKEN"  # the name, never the secret
    assert "s3cret" not in repr(got)
    assert secret(got.token_env) == "s3cret"
    assert secret(None) is None


@pytest.mark.parametrize("value", [None, ""])
def test_an_unset_or_empty_secret_variable_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                      value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("STREAMCAP_TEST_OPTIONS_TOKEN", raising=False)
    else:
        monkeypatch.setenv("STREAMCAP_TEST_OPTIONS_TOKEN", value)
    assert problems({"token_env": "STREAMCAP_TEST_OPTIONS_TOKEN"}) == [
        ("sinks.t.token_env: environment variable STREAMCAP_TEST_OPTIONS_TOKEN is not set or "
         "empty (it must hold the test token)")]
    assert problems({"token_env": ""}) == [
        "sinks.t.token_env: expected the name of an environment variable"]


def test_a_secret_written_into_the_table_is_refused_without_echo() -> None:
    [problem] = problems({"token": "hunter2"})
    assert problem == ("sinks.t.token: secrets are not read from the config file: put the "
                       "value in an environment variable and name it with 'token_env'")


# --------------------------------------------------------------------------- all at once


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    window_s: float = option(10.0, min=1, max=30)
    hop_s: float = option(5.0, above=0)

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        if not {"window_s", "hop_s"} & set(refused) and self.hop_s > self.window_s:
            yield "hop_s", f"must be <= window_s (got {self.hop_s:g} > {self.window_s:g})"


def test_rules_between_fields_skip_a_refused_value() -> None:
    assert list(read(Window, {"window_s": 10, "hop_s": 12}, "s").problems) == [
        "s.hop_s: must be <= window_s (got 12 > 10)"]
    # window_s is wrong, not hop_s: the fallback 10 s must not blame hop_s as well.
    got = read(Window, {"window_s": 40, "hop_s": 12}, "s")
    assert list(got.problems) == ["s.window_s: must be between 1 and 30 (got 40.0)"]
    assert got.refused == frozenset({"window_s"})


def test_every_problem_at_once_in_declaration_order_then_unknown_keys() -> None:
    got = read(Opts, {"bogus": 1, "mode": "z", "count": "x", "inner": {"depth": 0, "x": 1},
                      "ratio": math.nan, "title": ""}, "sinks.t")
    assert [p.split(":")[0] for p in got.problems] == [
        "sinks.t.title", "sinks.t.count", "sinks.t.ratio", "sinks.t.mode",
        "sinks.t.inner.depth", "sinks.t.inner.x", "sinks.t.bogus"]
    assert got.value == Opts()  # every refused value is back at its default
    assert got.refused == frozenset({"title", "count", "ratio", "mode"})
    with pytest.raises(ConfigError) as err:
        got.result()
    assert err.value.problems == list(got.problems)


def test_regular_file_refuses_fifos_and_devices_and_leaves_missing_paths_to_the_reader(
        tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    plain = tmp_path / "p"
    plain.write_text("x")
    assert regular_file(fifo) == "must be a regular file (it is a FIFO)"
    assert regular_file("/dev/zero") == "must be a regular file (it is a character device)"
    assert regular_file(tmp_path) == "must be a regular file (it is a directory)"
    assert regular_file(plain) is None
    assert regular_file(tmp_path / "missing") is None
    assert regular_file("nul\x00byte") is None


def test_regular_file_as_a_check_names_the_key(tmp_path: Path) -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Files:
        cert: Path | None = option(None, check=regular_file)

    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    assert list(read(Files, {"cert": str(fifo)}, "sinks.t").problems) == [
        f"sinks.t.cert: must be a regular file (it is a FIFO) (got {str(fifo)!r})"]


class Refused(Exception):
    pass


def test_open_regular_opens_only_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)  # opened for reading without O_NONBLOCK, it would block this test
    link = tmp_path / "l"
    link.symlink_to(fifo)
    plain = tmp_path / "p"
    plain.write_text("x")
    for path, kind in ((fifo, "a FIFO"), (link, "a FIFO"),
                       (Path("/dev/zero"), "a character device"), (tmp_path, "a directory")):
        with pytest.raises(Refused) as err:
            open_regular(path, Refused)
        assert err.value.args == (kind,)
    assert as_found(link, "a FIFO") == f"a link to a FIFO ({fifo})"
    assert as_found(fifo, "a FIFO") == "a FIFO"
    assert irregular_file(link) == f"a link to a FIFO ({fifo})"
    assert irregular_file(plain) is None and irregular_file(tmp_path / "missing") is None
    fd = open_regular(plain, Refused)
    try:
        assert os.get_blocking(fd) and os.read(fd, 8) == b"x"
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing", Refused)


def test_open_regular_checks_again_what_it_opened(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A FIFO swapped in after the look-up: the open does not block, fstat refuses it and
    # the descriptor is closed.
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    plain = tmp_path / "p"
    plain.write_text("x")
    looked_up = os.stat(plain)
    monkeypatch.setattr(options.os, "stat", lambda _path: looked_up)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(Refused) as err:
        open_regular(fifo, Refused)
    assert err.value.args == ("a FIFO",)
    assert set(os.listdir("/proc/self/fd")) <= before
