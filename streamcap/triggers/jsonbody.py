"""The one reader of a JSON object sent to the daemon: an HTTP body, an MQTT command.

:func:`parse_json_object` never quotes what it was sent (a phrase may be private),
refuses ``NaN``/``Infinity`` (not JSON) and anything nested deeper than
:data:`MAX_DEPTH` (a trigger's table is three levels deep; deeper input only
costs time and stack further on), and never raises.
"""

from __future__ import annotations

import json
from typing import Final

__all__ = ["MAX_DEPTH", "parse_json_object"]

MAX_DEPTH: Final = 32
"""Most arrays and objects nested in one another."""

_CONSTANT: Final = "is not a JSON number"


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} {_CONSTANT}")


def _within(value: object, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` arrays and objects deep (no recursion)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                   else item))
    return True


def parse_json_object(raw: bytes, *, what: str, expected: str = "a JSON object"
                      ) -> tuple[dict[str, object] | None, str | None]:
    """``(the object, None)`` or ``(None, what is wrong)``; never raises, never quotes ``raw``.

    Args:
        raw: The bytes received.
        what: How a problem names them (``"the body"``, ``"the command"``).
        expected: What a JSON value that is not an object is told it must be.
    """
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return None, f"{what} is not UTF-8"
    except RecursionError:
        return None, f"{what} nests deeper than {MAX_DEPTH} levels"
    except ValueError as exc:
        if _CONSTANT in str(exc):  # NaN, Infinity or -Infinity: nothing else is quoted
            return None, f"{what} holds {exc}"
        return None, f"{what} is not valid JSON"
    if not isinstance(value, dict):
        return None, f"{what} must be {expected}"
    if not _within(value, MAX_DEPTH):
        return None, f"{what} nests deeper than {MAX_DEPTH} levels"
    return value, None
