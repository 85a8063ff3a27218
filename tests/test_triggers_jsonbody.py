"""The one reader of JSON objects sent to the daemon (HTTP bodies, MQTT commands)."""

from __future__ import annotations

import pytest

from streamcap.triggers.jsonbody import MAX_DEPTH, parse_json_object


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"a": [1, {"b": "x"}]}', ({"a": [1, {"b": "x"}]}, None)),
    (nested(MAX_DEPTH), None),  # at the limit: read
    (nested(MAX_DEPTH + 1), (None, f"it nests deeper than {MAX_DEPTH} levels")),
    (b"[" * 100_000 + b"]" * 100_000, (None, f"it nests deeper than {MAX_DEPTH} levels")),
    (b'{"a": Infinity}', (None, "it holds Infinity is not a JSON number")),
    (b'{"a": "secret', (None, "it is not valid JSON")),
    (b"\xc3(", (None, "it is not UTF-8")),
    (b"[1]", (None, "it must be a list of things")),
])
def test_parse_json_object(raw: bytes, expected: tuple[object, str | None] | None) -> None:
    got = parse_json_object(raw, what="it", expected="a list of things")
    if expected is None:
        assert got[1] is None and isinstance(got[0], dict)
    else:
        assert got == expected
