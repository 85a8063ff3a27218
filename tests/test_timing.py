"""The test time factor (tests/timing.py)."""

from __future__ import annotations

import pytest
from timing import TIME_FACTOR_ENV, read_time_factor


def test_unset_or_empty_is_one() -> None:
    assert read_time_factor({}) == 1.0
    assert read_time_factor({TIME_FACTOR_ENV: " "}) == 1.0


def test_a_positive_number_is_the_factor() -> None:
    assert read_time_factor({TIME_FACTOR_ENV: "2.5"}) == 2.5


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "inf"])
def test_anything_else_is_refused_by_name(raw: str) -> None:
    with pytest.raises(ValueError, match=rf"{TIME_FACTOR_ENV}: expected a number > 0.*{raw!r}"):
        read_time_factor({TIME_FACTOR_ENV: raw})
