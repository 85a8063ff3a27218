"""The one options reader: a mapping in, a frozen dataclass out, every problem at once.

Every table of the config file, every source's options (from its table and from
a ``file:`` URI's query, whose values are strings) and every sink's options,
plugins' included, are read by :func:`read`. An options type is a frozen
dataclass; each field's type says what a value must be, and :func:`option`
adds the rest::

    @dataclass(frozen=True, slots=True, kw_only=True)
    class ArchiveOptions:
        path: Path = option(Path(), required=True, help="the file to append to")
        max_mb: int = option(100, min=1, max=10_000, help="rotate beyond this size")
        token_env: str | None = option(None, secret="the upload token")

Field types read: ``str``, ``int``, ``float`` (an integer is accepted), ``bool``,
``Path``, a ``Literal`` of strings (its values are the choices), ``X | None``,
``tuple[str, ...]``, ``frozenset[str]``, ``Mapping[str, object]`` (any table,
passed on) and another options dataclass (a sub-table, read the same way).

A problem is one line, ``<dotted key>: <what is wrong> (got <value>)``, in the
same words wherever the value comes from:

* ``expected an integer (got a string '4')``: the wrong type;
* ``must be a finite number (got nan)``: NaN and infinities are never numbers;
* ``must be between 1 and 64 (got 65)``, ``must be > 0 and <= 3600 (got 0.0)``,
  ``must be one of a, b (got 'c')``: a value out of its range or choices;
* ``unknown key (known keys: a, b)``: a key no field declares;
* ``environment variable X is not set or empty``: a secret's variable;
* ``secrets are not read from the config file: ...``: a secret written in.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import sys
import types
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import (
    Any,
    Final,
    Generic,
    Literal,
    Protocol,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from streamcap.errors import ConfigError

T = TypeVar("T")

METADATA_KEY: Final = "streamcap.option"
MAX_SHOWN: Final = 80
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_INTEGER_TEXT: Final = re.compile(r"^[+-]?\d+$")
_BARE_KEY: Final = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """How one field is read, besides its type (see :func:`option`)."""

    help: str = ""
    min: float | None = None
    max: float | None = None
    above: float | None = None
    choices: tuple[str, ...] | None = None
    null: int | None = None
    null_means: str = "automatic"
    non_empty: bool = False
    required: bool = False
    secret: str | None = None
    check: Callable[[Any], str | None] | None = None
    read: bool = True
    given: bool = False


def option(default: Any = MISSING, *, default_factory: Callable[[], Any] | None = None,
           help: str = "", min: float | None = None, max: float | None = None,
           above: float | None = None, choices: Iterable[str] | None = None,
           null: int | None = None, null_means: str = "automatic", non_empty: bool = False,
           required: bool = False, secret: str | None = None,
           check: Callable[[Any], str | None] | None = None, compare: bool = True) -> Any:
    """A dataclass field read by :func:`read`.

    Args:
        default: The value when the key is absent (``default_factory`` for a mutable one).
        help: What the option means; the message of a missing ``required`` key.
        min, max: Inclusive bounds of a number.
        above: An exclusive lower bound (``> 0``), instead of ``min``.
        choices: The allowed strings (of a string, or of each member of a collection).
        null: A number that stands for ``None`` ("0 = automatic", "-1 = random"),
            for a field typed ``int | None``.
        null_means: What ``null`` stands for, in messages.
        non_empty: A string must hold more than white space; a collection a member.
        required: The key must be given (the default only stands in while reading).
        secret: The field names an environment variable holding this secret
            (say ``"the bearer token clients present"``); the variable must be
            set, and the key without ``_env`` is refused in the file.
        check: Any further rule: returns the message of a broken rule, or None.
        compare: As for :func:`dataclasses.field`.
    """
    spec = Option(help=help, min=min, max=max, above=above,
                  choices=None if choices is None else tuple(choices), null=null,
                  null_means=null_means, non_empty=non_empty, required=required, secret=secret,
                  check=check)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, compare=compare,
                                 metadata={METADATA_KEY: spec})
    return dataclasses.field(default=default, compare=compare, metadata={METADATA_KEY: spec})


def fixed(default: Any = MISSING, *, default_factory: Callable[[], Any] | None = None,
          compare: bool = True) -> Any:
    """A dataclass field that is not read from the mapping (the caller passes it in ``fixed``)."""
    meta = {METADATA_KEY: Option(read=False)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, compare=compare, metadata=meta)
    return dataclasses.field(default=default, compare=compare, metadata=meta)


def given_keys() -> Any:
    """A ``frozenset[str]`` field filled with the keys the mapping sets (not compared)."""
    return dataclasses.field(default=frozenset(), compare=False,
                             metadata={METADATA_KEY: Option(read=False, given=True)})


class RelatedChecks(Protocol):
    """An options type whose fields constrain each other (``hop_s <= window_s``)."""

    def related_problems(self, refused: Collection[str]) -> Iterable[tuple[str, str]]:
        """``(field, message)`` for each broken rule between fields.

        Args:
            refused: The fields whose value was refused (they hold their
                default): a rule that involves one of them is not checked,
                so that a bad value is not blamed on another field too.
        """
        ...


@dataclass(frozen=True, slots=True)
class Read(Generic[T]):
    """What :func:`read` made of a mapping.

    Attributes:
        value: The options, each refused or missing value replaced by its default.
        problems: Every problem, one line each, naming its dotted key.
        given: The keys the mapping sets.
        refused: The fields whose value was refused.
    """

    value: T
    problems: tuple[str, ...]
    given: frozenset[str]
    refused: frozenset[str]

    def result(self) -> T:
        """The options, or ConfigError listing every problem."""
        if self.problems:
            raise ConfigError(list(self.problems))
        return self.value


# --------------------------------------------------------------------------- messages


def shown(value: object) -> str:
    """``repr(value)``, cut short: a message stays one readable line."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than repr() converts
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 3]}..."


def toml_key(name: str) -> str:
    """``name`` as one part of a dotted key, written as TOML writes it.

    A bare key (letters, digits, ``-``, ``_``) stays as it is; any other is
    quoted with its control characters escaped, so that a message never
    carries a raw escape sequence or line break from the file, and cut short
    like :func:`shown`.
    """
    if _BARE_KEY.match(name):
        return name if len(name) <= MAX_SHOWN else f"{name[:MAX_SHOWN - 3]}..."
    quoted = '"' + "".join(map(_toml_char, name)) + '"'
    return quoted if len(quoted) <= MAX_SHOWN else f"{quoted[:MAX_SHOWN - 4]}...\""


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if unicodedata.category(c).startswith("C"):  # control, format, surrogate, unassigned
        return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
    return c


# ---------------------------------------------------------------------- files read whole
#
# The one home of "only a regular file is read": a FIFO blocks whoever opens it until a
# writer comes, a device may never end (/dev/zero) or act on open (a terminal, a tape),
# so anything else is refused from ``os.stat``, before it is opened, and again from
# ``fstat`` once open, in case it was swapped in between.


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for messages: ``a FIFO``, ``a character device``..."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def not_regular(mode: int) -> str | None:
    """:func:`file_kind` of a ``st_mode`` that is not a regular file's; None for one."""
    return None if stat.S_ISREG(mode) else file_kind(mode)


def as_found(path: str | os.PathLike[str], kind: str) -> str:
    """``kind``, or ``a link to <kind> (<target>)`` when ``path`` is a symbolic link."""
    if os.path.islink(path):
        return f"a link to {kind} ({os.path.realpath(path)})"
    return kind


def irregular_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` names when it is no regular file (:func:`as_found`), looked up with
    ``os.stat`` (never opened); None for a regular file and for a path that cannot be
    looked up (missing: the reader reports it)."""
    try:
        kind = not_regular(os.stat(path).st_mode)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    return None if kind is None else as_found(path, kind)


def open_regular(path: str | os.PathLike[str],
                 refuse: Callable[[str], Exception]) -> int:
    """A blocking, read-only descriptor of ``path``, which must be a regular file (or a
    link to one).

    Anything else is refused from ``os.stat``, before it is opened; the open itself does
    not block (a FIFO swapped in meanwhile) and makes no terminal the controlling one,
    and what it opened is checked again with ``fstat``.

    Args:
        path: The file.
        refuse: Makes the error raised for what is not a regular file, from its
            :func:`file_kind` (``a FIFO``; see :func:`as_found` for links).

    Raises:
        OSError: From ``os.stat`` or ``os.open`` (missing, no permission...): the
            caller words it.
        Exception: ``refuse(kind)`` when ``path`` is no regular file.
    """
    if (kind := not_regular(os.stat(path).st_mode)) is not None:
        raise refuse(kind)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if (kind := not_regular(os.fstat(fd).st_mode)) is not None:
            raise refuse(kind)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def regular_file(value: object) -> str | None:
    """A ``check`` for an option naming a file that is read whole (a certificate, say):
    anything but a regular file is refused before it is opened. A path that cannot be
    looked up at all is left for the reader to report."""
    what = irregular_file(str(value))
    return None if what is None else f"must be a regular file (it is {what})"


def type_name(kind: object) -> str:
    """How a message names a type: ``an integer``, ``a number``, ``true or false``..."""
    names: dict[object, str] = {str: "a string", int: "an integer", float: "a number",
                                bool: "true or false", list: "an array", tuple: "an array",
                                frozenset: "an array", dict: "a table", Path: "a string"}
    if kind in names:
        return names[kind]
    if isinstance(kind, type) and issubclass(kind, Mapping):
        return "a table"
    return getattr(kind, "__name__", str(kind))


def described(value: object) -> str:
    """``a string '4'``, ``a boolean true``, ``an array [1]``: a value with its type."""
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    return f"{type_name(type(value))} {shown(value)}"


def number(x: float) -> str:
    """``3`` for an integer, ``0.005`` or ``1e+308`` for a float."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def secret_in_file(key: str) -> str:
    """The message for a secret written into the config file under ``key``."""
    return (f"secrets are not read from the config file: put the value in an environment "
            f"variable and name it with '{key}_env'")


def unknown_key(known: Iterable[str]) -> str:
    """The message for a key no field declares."""
    return f"unknown key (known keys: {', '.join(sorted(known))})"


def range_rule(spec: Option) -> str | None:
    """How ``spec``'s bounds read in a message (None without bounds)."""
    lo, hi, above = spec.min, spec.max, spec.above
    if above is not None:
        rule = f"> {number(above)}" + (f" and <= {number(hi)}" if hi is not None else "")
    elif lo is not None and hi is not None:
        rule = f"between {number(lo)} and {number(hi)}"
    elif lo is not None:
        rule = f">= {number(lo)}"
    elif hi is not None:
        rule = f"<= {number(hi)}"
    else:
        return None
    if spec.null is not None:
        return f"{spec.null} ({spec.null_means}) or {rule}"
    return rule


def _in_range(spec: Option, value: float) -> bool:
    if spec.above is not None and not value > spec.above:
        return False
    if spec.min is not None and not value >= spec.min:
        return False
    return spec.max is None or value <= spec.max


# --------------------------------------------------------------------------- reading


class _Refused(Exception):
    """One value's problem (internal)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _scalar(kind: object, value: object, text: bool) -> object:
    """``value`` as ``kind`` (str, int, float, bool, Path), or _Refused."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text and isinstance(value, str) and _INTEGER_TEXT.match(value.strip()):
            try:
                return int(value.strip())
            except ValueError:  # more digits than int() converts
                raise _Refused(f"expected an integer of at most {sys.get_int_max_str_digits()} "
                               f"digits (got {shown(value)})") from None
    elif kind is float:
        result: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                result = float(value)
            except OverflowError:
                result = math.inf
        elif text and isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                result = None
        if result is not None:
            if not math.isfinite(result):
                raise _Refused(f"must be a finite number (got {shown(value)})")
            return result
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Path:
        if isinstance(value, str | Path):
            return Path(value)
    else:
        raise TypeError(f"options of type {kind!r} cannot be read")
    raise _Refused(f"expected {type_name(kind)} (got {described(value)})")


def _optional(kind: object) -> tuple[object, bool]:
    """``(X, True)`` for ``X | None``, else ``(kind, False)``."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(get_args(kind)) == 2:
            return args[0], True
    return kind, False


def _value(kind: object, spec: Option, value: object, text: bool,
           where: str, problems: list[str]) -> object:
    """``value`` read as ``kind`` under ``spec``, or _Refused."""
    kind, nullable = _optional(kind)
    if value is None and nullable:
        return None
    origin = get_origin(kind)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, Mapping):
            raise _Refused(f"expected a table (got {type_name(type(value))})")
        sub = read(kind, value, where, text=text)
        problems.extend(sub.problems)
        return sub.value
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise _Refused(f"expected a table (got {type_name(type(value))})")
        return value
    if origin is Literal:
        choices = tuple(str(a) for a in get_args(kind))
        got = _scalar(str, value, text)
        if got not in choices:
            raise _Refused(f"must be one of {', '.join(choices)} (got {shown(value)})")
        return got
    if origin in (tuple, frozenset, list):
        if not isinstance(value, list | tuple | frozenset | set):
            raise _Refused(f"expected an array (got {described(value)})")
        member = get_args(kind)[0]
        items = [_scalar(member, item, text) for item in value]
        if spec.choices is not None and any(item not in spec.choices for item in items):
            raise _Refused(f"must be some of {', '.join(spec.choices)} (got {shown(value)})")
        if spec.non_empty and not items:
            raise _Refused(f"must not be empty (got {shown(value)})")
        collected = origin(items)
        if spec.check is not None and (message := spec.check(collected)) is not None:
            raise _Refused(f"{message} (got {shown(value)})")
        return collected
    got = _scalar(kind, value, text)
    show = shown(value if isinstance(value, str) else got)
    if spec.null is not None and got == spec.null:
        return None
    if spec.choices is not None and got not in spec.choices:
        raise _Refused(f"must be one of {', '.join(spec.choices)} (got {show})")
    if spec.non_empty and isinstance(value, str) and not value.strip():
        raise _Refused(f"must not be empty (got {show})")
    if isinstance(got, int | float) and not isinstance(got, bool) and not _in_range(spec, got):
        raise _Refused(f"must be {range_rule(spec)} (got {show})")
    if spec.check is not None and (message := spec.check(got)) is not None:
        raise _Refused(f"{message} (got {show})")
    if spec.secret is not None and isinstance(got, str):
        if not got:
            raise _Refused("expected the name of an environment variable")
        if not os.environ.get(got):
            raise _Refused(f"environment variable {got} is not set or empty "
                           f"(it must hold {spec.secret})")
    return got


_TYPE_HINTS: dict[type, Mapping[str, Any]] = {}


def _type_hints(cls: type) -> Mapping[str, Any]:
    """The field types of an options dataclass, evaluated once per class (read-only: every
    caller gets the same mapping)."""
    hints = _TYPE_HINTS.get(cls)
    if hints is None:
        hints = _TYPE_HINTS[cls] = types.MappingProxyType(get_type_hints(cls))
    return hints


def _specs(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Option]]:
    fields = dataclasses.fields(cls)
    return {f.name: (f, f.metadata.get(METADATA_KEY) or Option()) for f in fields if f.init}


def known_keys(cls: type) -> frozenset[str]:
    """The keys an options dataclass reads."""
    return frozenset(name for name, (_, spec) in _specs(cls).items() if spec.read)


def read(cls: type[T], values: Mapping[str, object], where: str = "", *, text: bool = False,
         also: Collection[str] = (), fixed_values: Mapping[str, object] | None = None,
         label: Callable[[str], str] | None = None) -> Read[T]:
    """Read ``values`` into the options dataclass ``cls``, collecting every problem.

    Args:
        cls: A dataclass whose fields are declared with :func:`option` (or
            plain fields, read by their type and default).
        values: A TOML table, or a URI query whose values are strings.
        where: The dotted key of the table (``"sinks.live"``); messages name
            ``<where>.<key>``.
        text: Also accept a string for a number or a boolean (a URI query:
            ``"0.5"``, ``"true"``/``"false"``, ``"1"``/``"0"``, ``"yes"``/``"no"``).
        also: Keys that belong to the same table but are read elsewhere:
            neither read nor unknown.
        fixed_values: Values for the fields declared with :func:`fixed`.
        label: How a message names a key, instead of the dotted key.

    Returns:
        The options (a refused value replaced by its default) and every problem.
    """
    def key(name: str) -> str:
        if label is not None:
            return label(name)
        return f"{where}.{toml_key(name)}" if where else toml_key(name)

    specs = _specs(cls)
    hints = _type_hints(cls)
    problems: list[str] = []
    refused: set[str] = set()
    kwargs: dict[str, object] = dict(fixed_values or {})
    given = frozenset(values)
    secret_keys = {name.removesuffix("_env"): name for name, (_, spec) in specs.items()
                   if spec.secret is not None and name.endswith("_env")}
    for name, (fld, spec) in specs.items():
        if spec.given:
            kwargs[name] = given
        if not spec.read:
            continue
        if name not in values:
            if spec.required:
                problems.append(f"{key(name)}: missing: {spec.help or 'required'}")
                refused.add(name)
            continue
        try:
            kwargs[name] = _value(hints[name], spec, values[name], text, key(name), problems)
        except _Refused as exc:
            problems.append(f"{key(name)}: {exc.message}")
            refused.add(name)
    known = {name for name, (_, spec) in specs.items() if spec.read} | set(also)
    for name in values:
        if name in known:
            continue
        if name in secret_keys:
            problems.append(f"{key(name)}: {secret_in_file(name)}")
        else:
            problems.append(f"{key(name)}: {unknown_key(known)}")
    value = cls(**kwargs)
    related = getattr(value, "related_problems", None)
    if callable(related):
        for name, message in related(frozenset(refused)):
            problems.append(f"{key(name)}: {message}")
            refused.add(name)
    return Read(value=value, problems=tuple(problems), given=given,
                refused=frozenset(refused))


def read_options(cls: type[T], values: Mapping[str, object], where: str = "", *,
                 text: bool = False, also: Collection[str] = (),
                 fixed_values: Mapping[str, object] | None = None,
                 label: Callable[[str], str] | None = None) -> T:
    """:func:`read`, raising ConfigError with every problem instead of returning them."""
    return read(cls, values, where, text=text, also=also, fixed_values=fixed_values,
                label=label).result()


def secret(name: str | None) -> str | None:
    """The secret held by the environment variable ``name`` (None without a name).

    The reader has checked that the variable is set; it is read again where
    the secret is used, so that it never sits in an options object.
    """
    return os.environ.get(name) or None if name else None
