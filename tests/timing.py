"""One time factor for every wait in the tests.

``STREAMCAP_TEST_TIME_FACTOR`` (default 1) multiplies every timeout a test or a
test helper waits with: set it above 1 on a slow or busy machine
(``STREAMCAP_TEST_TIME_FACTOR=3 pytest ...``). Waits are upper bounds, never
expectations, so a larger factor only makes failures slower to report.

Use it as ``from timing import scaled`` (pytest puts ``tests/`` on ``sys.path``)
and write every wait as ``scaled(seconds)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Final

TIME_FACTOR_ENV: Final = "STREAMCAP_TEST_TIME_FACTOR"


def read_time_factor(env: Mapping[str, str]) -> float:
    """The factor from ``env``; 1 when unset or empty.

    Raises:
        ValueError: The value is not a finite number > 0 (the message names the variable).
    """
    raw = env.get(TIME_FACTOR_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"{TIME_FACTOR_ENV}: expected a number > 0 that multiplies every test "
                         f"timeout (e.g. 2.5), got {raw!r}")
    return factor


TIME_FACTOR: Final = read_time_factor(os.environ)


def scaled(seconds: float) -> float:
    """``seconds`` times :data:`TIME_FACTOR`: the bound for one wait."""
    return seconds * TIME_FACTOR
