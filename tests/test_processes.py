"""Fixtures that start processes stop them, even when their test fails or times out.

Each case runs an inner pytest session (a real subprocess) whose test records the
pid of the process a fixture started, then passes, fails or overruns its timeout;
afterwards that process must be gone.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mosquitto import mosquitto_path
from processes import live_children, stop_leaked

pytest_plugins = ["pytester"]

TESTS_DIR = Path(__file__).resolve().parent

_INNER = """
import os
import subprocess
from pathlib import Path

import pytest
from mosquitto import broker, broker_factory  # noqa: F401  (fixtures)

PID_FILE = Path({pid_file!r})


def test_uses_a_broker(broker):
    PID_FILE.write_text(str(broker.proc.pid))
    {ending}
"""

_ENDINGS = {
    "passes": "pass",
    "fails": "assert False, 'the test fails'",
    "times out": "import time; time.sleep(120)",
}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
@pytest.mark.parametrize("ending", list(_ENDINGS))
def test_broker_fixture_stops_its_broker(pytester: pytest.Pytester, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    pid_file = tmp_path / "broker.pid"
    pytester.makepyfile(test_inner=_INNER.format(pid_file=str(pid_file),
                                                  ending=_ENDINGS[ending]))
    pytester.makeini("[pytest]\ntimeout = 10\nasyncio_default_fixture_loop_scope = function\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    pid = int(pid_file.read_text())
    still_running = _alive(pid)
    stop_leaked({pid: "mosquitto"}, grace_s=0)  # never leave it behind, even when failing
    assert not still_running, f"the broker (pid {pid}) outlived its test ({ending})\n" + \
        "\n".join(result.outlines[-20:])
    expected = {"passes": 0}.get(ending, 1)
    assert result.ret == expected


def test_live_children_sees_a_child_and_not_after_it_ends() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert proc.pid in live_children("sleep")
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in live_children()
