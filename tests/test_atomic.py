"""streamcap.atomic: a file is replaced whole, and a failed write leaves it as it was."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from streamcap import atomic
from streamcap.atomic import replace_text


def test_the_file_is_replaced_and_no_temporary_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "new" / "state.json"
    replace_text(path, "one")
    replace_text(path, "two ✓")
    assert path.read_text("utf-8") == "two ✓"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_content_and_cleans_up(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    replace_text(path, "old")

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        replace_text(path, "new")
    monkeypatch.undo()
    assert path.read_text("utf-8") == "old"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
