"""The speech guard's rule (pure) and the ``[privacy]`` table."""

from __future__ import annotations

import numpy as np
import pytest

from streamcap.config import parse_config
from streamcap.errors import ConfigError
from streamcap.privacy.guard import judge
from streamcap.privacy.options import PrivacyConfig

SOURCE = {"sources": {"porch": {"uri": "file:/x.wav"}}}


def test_a_window_holds_speech_from_the_minimum_fraction_of_speech_frames() -> None:
    probs = np.array([0.9] * 10 + [0.1] * 90, dtype=np.float32)  # 10 % of the frames
    assert judge(probs, threshold=0.5, min_fraction=0.1).speech
    assert not judge(probs, threshold=0.5, min_fraction=0.11).speech
    assert not judge(probs, threshold=0.95, min_fraction=0.1).speech
    verdict = judge(probs, threshold=0.9, min_fraction=0.05)  # at the threshold counts
    assert verdict.speech and verdict.fraction == pytest.approx(0.1) and verdict.frames == 100


def test_no_frames_hold_no_speech() -> None:
    verdict = judge(np.zeros(0), threshold=0.5, min_fraction=0.01)
    assert not verdict.speech and verdict.frames == 0


def test_the_guard_is_off_by_default() -> None:
    config = parse_config(SOURCE)
    assert config.privacy == PrivacyConfig()
    assert config.privacy.speech == "caption" and not config.privacy.guarded


def test_privacy_is_read_from_the_file() -> None:
    config = parse_config({**SOURCE, "privacy": {"speech": "skip", "speech_threshold": 0.6,
                                                 "speech_fraction": 0.2, "clip_max_active": 2}})
    assert config.privacy == PrivacyConfig(speech="skip", speech_threshold=0.6,
                                           speech_fraction=0.2, clip_max_active=2)
    assert config.privacy.guarded


@pytest.mark.parametrize(("table", "says"), [
    ({"speech": "hide"}, "privacy.speech: must be one of caption, mark, skip (got 'hide')"),
    ({"speech_threshold": 0}, "privacy.speech_threshold: must be > 0 and <= 1 (got 0.0)"),
    ({"speech_fraction": 1.5}, "privacy.speech_fraction: must be > 0 and <= 1 (got 1.5)"),
    ({"clip_max_active": 0}, "privacy.clip_max_active: must be between 1 and 64 (got 0)"),
    ({"clip_max_bytes": 10}, "privacy.clip_max_bytes: must be between 1048576 and"),
    ({"speech_guard": True}, "privacy.speech_guard: unknown key (known keys: clip_max_active,"),
])
def test_bad_privacy_values_are_dotted_problems(table: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({**SOURCE, "privacy": table})
    assert len(refused.value.problems) == 1 and refused.value.problems[0].startswith(says)
