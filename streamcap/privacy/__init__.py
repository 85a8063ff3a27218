"""Privacy: the speech guard ([privacy] speech) and its options; see docs/privacy.md.

The trigger event clips it bounds live in :mod:`streamcap.triggers.clips`.
"""

from streamcap.privacy.options import PrivacyConfig

__all__ = ["PrivacyConfig"]
