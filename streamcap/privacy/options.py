"""``[privacy]``: the speech guard and the bounds of trigger event clips (docs/privacy.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from streamcap.options import option

SPEECH_MODES: Final = ("caption", "mark", "skip")
MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyConfig:
    """The ``[privacy]`` table.

    The defaults of ``speech_threshold`` and ``speech_fraction`` come from
    ``bench/speech_guard.py`` (docs/privacy.md): espeak-ng sentences of 1.5-6 s put
    at least 0.20 of a 10 s window's frames at or above 0.5, the corpus' synthetic
    sounds at most 0.022.
    """

    speech: str = option("caption", choices=SPEECH_MODES,
                         help='caption: no speech guard; mark: captions say whether the '
                              'window holds speech; skip: windows with speech are not '
                              'captioned, stored or clipped')
    speech_threshold: float = option(0.5, above=0, max=1,
                                     help="a 32 ms frame is speech at this VAD probability "
                                          "or above")
    speech_fraction: float = option(0.1, above=0, max=1,
                                    help="a window holds speech when at least this part of "
                                         "its frames is speech")
    clip_max_active: int = option(4, min=1, max=64,
                                  help="trigger event clips collected at once at most; "
                                       "another firing then gets none")
    clip_max_bytes: int = option(32 * MIB, min=MIB, max=1024 * MIB,
                                 help="audio held for one clip at most (float32 samples); "
                                      "the clip is cut short there")

    @property
    def guarded(self) -> bool:
        """Whether the speech guard runs (``speech`` is not "caption")."""
        return self.speech != "caption"
