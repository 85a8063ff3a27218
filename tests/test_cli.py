"""Tests for the ``streamcap`` command line, run as the real console script.

Exit codes and stderr are those a user sees: 0 success, 1 runtime failure,
2 bad configuration or usage, and never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import streamcap

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STREAMCAP = VENV_BIN / "streamcap"
if not STREAMCAP.exists():  # tests run with another interpreter: use the project's venv
    STREAMCAP = ROOT / ".venv" / "bin" / "streamcap"

BUILT_IN = {("streamcap.sources", "mic"), ("streamcap.sources", "file"),
            ("streamcap.sources", "stream"), ("streamcap.sinks", "websocket"),
            ("streamcap.sinks", "mqtt")}


def run_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed ``streamcap`` script; stdout and stderr captured as text."""
    if not STREAMCAP.exists():
        pytest.skip(f"{STREAMCAP} is missing: pip install -e . in the venv")
    done = subprocess.run([str(STREAMCAP), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def errors(stderr: str) -> list[str]:
    """The ``streamcap: error: ...`` lines, without the prefix."""
    prefix = "streamcap: error: "
    return [line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------- basics


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"streamcap {streamcap.__version__}"


def test_python_dash_m_streamcap() -> None:
    done = subprocess.run([str(STREAMCAP.parent / "python"), "-m", "streamcap", "--version"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"streamcap {streamcap.__version__}"


def test_no_command_prints_usage_and_exits_2() -> None:
    done = run_cli()
    assert done.returncode == 2
    text = done.stdout + done.stderr
    assert "usage: streamcap" in text
    for command in ("run", "check-config", "devices", "plugins", "caption", "models"):
        assert command in text


def test_unknown_command_is_a_usage_error() -> None:
    done = run_cli("frobnicate")
    assert done.returncode == 2
    assert "invalid choice: 'frobnicate'" in done.stderr


def test_models_without_subcommand_is_a_usage_error() -> None:
    done = run_cli("models")
    assert done.returncode == 2
    assert errors(done.stderr) == [
        ("models: a subcommand is needed: presets, build, verify, convert-dac, import-enclap, "
         "fetch, list")]


def test_a_closed_stdout_is_no_traceback(tmp_path: Path) -> None:
    """``streamcap plugins --json | head -c 1``: the reader is gone before we write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([str(STREAMCAP), "plugins", "--json"], cwd=tmp_path,
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60, check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr
    assert "BrokenPipeError" not in done.stderr
    assert done.returncode == 1


# --------------------------------------------------------------------------- check-config


def test_check_config_accepts_the_shipped_file_from_the_working_directory() -> None:
    done = run_cli("check-config")  # default: ./config.toml
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "config.toml: valid; sources: default; sinks: none"


def test_check_config_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[sources.kitchen]\nuri = "mic:default"\nwindow_s = 20\nhop_s = 5\n'
                    '[sinks.ws]\nplugin = "websocket"\ntoken_env = "WS_TOKEN"\n')
    # The sink's own checks run too: token_env must name a variable that is set.
    done = run_cli("check-config", str(path), env={**os.environ, "WS_TOKEN": "s3cret"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: valid; sources: kitchen; sinks: ws (websocket)"
    assert done.stderr == ""


def test_check_config_warns_once_for_each_listener_open_to_the_network(tmp_path: Path) -> None:
    path = tmp_path / "open.toml"
    path.write_text('[http]\nhost = "0.0.0.0"\n[sources.kitchen]\nuri = "mic:default"\n'
                    '[sinks.ws]\nplugin = "websocket"\nhost = "::"\ntoken_env = "WS_TOKEN"\n'
                    '[sinks.local]\nplugin = "websocket"\nport = 8766\n')
    done = run_cli("check-config", str(path), env={**os.environ, "WS_TOKEN": "s3cret"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path}: valid; ")
    warnings = done.stderr.splitlines()
    assert [w.split(": ")[:3] for w in warnings] == [
        ["streamcap", "warning", str(path)], ["streamcap", "warning", str(path)]]
    assert warnings[0].startswith(f"streamcap: warning: {path}: http.host: '0.0.0.0' is not a "
                                  f"loopback address: the HTTP server on port 8080 ")
    assert "/metrics, /healthz and the live page" in warnings[0]
    assert warnings[1].startswith(f"streamcap: warning: {path}: sinks.ws.host: '::' is not a "
                                  f"loopback address: the websocket sink on port 8765 ")
    assert "without TLS" in warnings[1]


def test_check_config_and_run_refuse_two_listeners_on_one_port(tmp_path: Path) -> None:
    path = tmp_path / "clash.toml"
    path.write_text('[http]\nport = 8765\n[sources.kitchen]\nuri = "mic:default"\n'
                    '[sinks.ws]\nplugin = "websocket"\n')
    checked = run_cli("check-config", str(path))
    ran = run_cli("run", "--config", str(path))
    assert (checked.returncode, ran.returncode) == (2, 2), ran.stderr
    assert errors(checked.stderr) == errors(ran.stderr) == [
        (f"{path}: sinks.ws.port: port 8765 is taken by http.port already (the HTTP server on "
         f"'127.0.0.1'; the websocket sink on '127.0.0.1'); give each listener a port of its own")]


def test_check_config_reports_every_bad_value_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nlog_level = "loud"\n\n[sources.kitchen]\nuri = "mic:default"\n'
                    'window_s = 10\nhop_s = 12\n\n[sinks.broker]\nplugin = "mqtt"\n'
                    'password = "hunter2"\n\n[http]\nport = "80"\nbogus = 1\n')
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert errors(done.stderr) == [
        f"{path}: daemon.log_level: must be one of debug, info, warning, error (got 'loud')",
        f"{path}: http.port: expected an integer (got a string '80')",
        f"{path}: http.bogus: unknown key (known keys: allowed_hosts, enabled, host, max_connections, port, request_timeout_s, token_env)",
        f"{path}: sources.kitchen.hop_s: must be > 0 and <= window_s (got 12 > 10)",
        (f"{path}: sinks.broker.password: secrets are not read from the config file: put the "
        "value in an environment variable and name it with 'password_env'"),
    ]
    assert "hunter2" not in done.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert errors(done.stderr) == [f"{path}: no such config file"]


def test_check_config_missing_default_file(tmp_path: Path) -> None:
    done = run_cli("check-config", cwd=tmp_path)
    assert done.returncode == 2
    assert errors(done.stderr) == ["config.toml: no such config file"]


def test_check_config_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[sources.kitchen]\nuri = "mic:default\n')
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    [line] = errors(done.stderr)
    assert line.startswith(f"{path}: invalid TOML: ")
    assert re.search(r"line 2, column \d+", line)


def test_check_config_not_utf8_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\nnode_id = "k\xfcche"\n')
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert errors(done.stderr) == [f"{path}: not UTF-8 text (byte 21)"]
    done = run_cli("check-config", str(tmp_path))
    assert done.returncode == 2
    [line] = errors(done.stderr)
    assert line.startswith(f"{tmp_path}: cannot read config file")


# Malformed configs that `run` refuses, each with the dotted key its error must name. Each
# is a complete file: a valid source (unless the source is the problem) plus the variant.
_SOURCE = '[sources.kitchen]\nuri = "mic:default"\n'
REFUSED: list[tuple[str, str, str]] = [
    # (test id, TOML text, key)
    *[(f"uri-{uri}", f'[sources.kitchen]\nuri = "{uri}"\n', "sources.kitchen.uri") for uri in (
        "nope", "file:", "mic:", "rtsp://", "ftp://h/x", "hls+http://", "file://server/x.wav",
        "file:/x.wav?loop=maybe", "file:/x.wav?realtime=perhaps", "file:/x.wav?unknown=1",
        "file:/x.wav?block_s=nan", "file:/x.wav?block_s=inf", "file:/x.wav?block_s=0.001",
        "file:/x.wav?block_s=5", "file:/x.wav?sample_rate_hz=-5",
        "file:/x.wav?sample_rate_hz=4000", "file:/x.wav?sample_rate_hz=1e9",
        "file:/x.wav?ffmpeg=")],
    ("sink-plugin-missing", _SOURCE + '[sinks.out]\nplugin = "nonexistent"\n',
     "sinks.out.plugin"),
    ("ws-host-empty", _SOURCE + '[sinks.live]\nplugin = "websocket"\nhost = ""\n',
     "sinks.live.host"),
    ("ws-host-int", _SOURCE + '[sinks.live]\nplugin = "websocket"\nhost = 5\n',
     "sinks.live.host"),
    ("ws-port-negative", _SOURCE + '[sinks.live]\nplugin = "websocket"\nport = -1\n',
     "sinks.live.port"),
    ("ws-port-high", _SOURCE + '[sinks.live]\nplugin = "websocket"\nport = 70000\n',
     "sinks.live.port"),
    ("ws-open-without-token", _SOURCE + '[sinks.live]\nplugin = "websocket"\nhost = "0.0.0.0"\n',
     "sinks.live.host"),
    ("ws-token-unset",
     _SOURCE + '[sinks.live]\nplugin = "websocket"\ntoken_env = "STREAMCAP_TEST_UNSET"\n',
     "sinks.live.token_env"),
    ("ws-tls-half", _SOURCE + '[sinks.live]\nplugin = "websocket"\ntls_cert = "/x.pem"\n',
     "sinks.live.tls_key"),
    ("ws-backfill", _SOURCE + '[sinks.live]\nplugin = "websocket"\nbackfill = -1\n',
     "sinks.live.backfill"),
    ("ws-unknown", _SOURCE + '[sinks.live]\nplugin = "websocket"\ncolour = "red"\n',
     "sinks.live.colour"),
    ("sink-queue-size", _SOURCE + '[sinks.live]\nplugin = "websocket"\nqueue_size = 0\n',
     "sinks.live.queue_size"),
    ("sink-accepts", _SOURCE + '[sinks.live]\nplugin = "websocket"\naccepts = ["bogus"]\n',
     "sinks.live.accepts"),
    ("mqtt-host-empty", _SOURCE + '[sinks.broker]\nplugin = "mqtt"\nhost = ""\n',
     "sinks.broker.host"),
    ("mqtt-host-int", _SOURCE + '[sinks.broker]\nplugin = "mqtt"\nhost = 5\n',
     "sinks.broker.host"),
    ("mqtt-port", _SOURCE + '[sinks.broker]\nplugin = "mqtt"\nport = -1\n', "sinks.broker.port"),
    ("mqtt-qos", _SOURCE + '[sinks.broker]\nplugin = "mqtt"\nqos_caption = 3\n',
     "sinks.broker.qos_caption"),
    ("mqtt-password-unset", _SOURCE + '[sinks.broker]\nplugin = "mqtt"\nusername = "u"\n'
     'password_env = "STREAMCAP_TEST_UNSET"\n', "sinks.broker.password_env"),
    *[(f"decoding-{key}-{value}", f"[model.decoding]\n{key} = {value}\n" + _SOURCE,
       f"model.decoding.{key}") for key, value in (
        ("temperature", "1e308"), ("temperature", "1e-320"), ("temperature", "0"),
        ("top_p", "1e308"), ("top_p", "0"),
        ("no_repeat_ngram_size", str(2**63)), ("no_repeat_ngram_size", "31"),
        ("max_new_tokens", "1"), ("max_new_tokens", "100000"), ("beam_max_length", "2"),
        ("num_beams", "0"), ("num_beams", str(2**63)), ("n_candidates", "1000000"),
        ("seed", str(2**64)), ("encoder_weight", "1e308"))],
    ("stop-timeout", '[daemon]\nstop_timeout_s = 1e308\n' + _SOURCE, "daemon.stop_timeout_s"),
    ("stall", _SOURCE + "stall_s = 1e308\n", "sources.kitchen.stall_s"),
    ("backoff-reset", _SOURCE + "backoff_reset_s = 1e308\n", "sources.kitchen.backoff_reset_s"),
    ("backoff-max", _SOURCE + "backoff_max_s = 1e308\n", "sources.kitchen.backoff_max_s"),
    ("retries", _SOURCE + f"max_retries = {2**63}\n", "sources.kitchen.max_retries"),
    ("threads", '[model]\nthreads = 1000000\n' + _SOURCE, "model.threads"),
]


def _check_config_in_process(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from streamcap.cli import main

    code = main(["check-config", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("text", "key"), [(t, k) for _, t, k in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_check_config_refuses_what_run_refuses_with_the_same_lines(
        tmp_path: Path, text: str, key: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from streamcap.daemon import resolve_config
    from streamcap.errors import ConfigError

    monkeypatch.delenv("STREAMCAP_TEST_UNSET", raising=False)
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    code, stderr = _check_config_in_process(path, capsys)
    assert code == 2, stderr
    lines = errors(stderr)
    assert lines, stderr
    assert any(line.startswith(f"{path}: {key}: ") for line in lines), lines
    assert "Traceback" not in stderr
    # The daemon's own validation (what `run` does with --config) says the same.
    with pytest.raises(ConfigError) as info:
        resolve_config(path, None)
    assert info.value.problems == lines


def test_check_config_reports_value_and_plugin_problems_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[model.decoding]\ntemperature = 1e-320\n'
                    '[sources.kitchen]\nuri = "file:/x.wav?loop=maybe"\n'
                    '[sources.hall]\nuri = "mic:default"\n'
                    '[sinks.live]\nplugin = "websocket"\nport = -1\nqueue_size = 0\n'
                    '[sinks.broker]\nplugin = "mqtt"\nhost = ""\n'
                    '[sinks.out]\nplugin = "nonexistent"\n', encoding="utf-8")
    code, stderr = _check_config_in_process(path, capsys)
    assert code == 2
    keys = [line.split(": ")[1] for line in errors(stderr)]
    assert keys == ["model.decoding.temperature", "sources.kitchen.uri", "sinks.live.queue_size",
                    "sinks.live.port", "sinks.broker.host", "sinks.out.plugin"]


def test_run_refuses_a_bad_config_with_the_check_config_lines(tmp_path: Path,
                                                              jsonl_installed: None) -> None:
    """The real `streamcap run`: exit 2 before anything starts, the same lines, no traceback.

    The unknown-plugin line lists the installed sink plugins: ``jsonl_installed`` makes
    that list the same for both commands (no other worker installs it in between).
    """
    path = tmp_path / "bad.toml"
    path.write_text('[model.decoding]\nno_repeat_ngram_size = 9223372036854775808\n'
                    '[sources.kitchen]\nuri = "file:/x.wav?block_s=nan"\n'
                    '[sinks.live]\nplugin = "websocket"\nhost = "0.0.0.0"\n'
                    '[sinks.out]\nplugin = "nonexistent"\n', encoding="utf-8")
    checked = run_cli("check-config", str(path))
    ran = run_cli("run", "--config", str(path))
    assert (checked.returncode, ran.returncode) == (2, 2), ran.stderr
    assert len(errors(checked.stderr)) == 4
    assert errors(ran.stderr) == errors(checked.stderr)


@pytest.mark.parametrize("nested", [
    "x = " + "[" * 5000 + "]" * 5000,
    "x = " + "{a = " * 3000 + "1" + "}" * 3000,
    "[sources.kitchen]\nuri = " + "[" * 5000 + "]" * 5000,
], ids=["arrays", "inline-tables", "under-a-key"])
def test_deeply_nested_toml_is_one_line_naming_the_file(tmp_path: Path, nested: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(nested + "\n", encoding="utf-8")
    for command in (("check-config", str(path)), ("run", "--config", str(path))):
        done = run_cli(*command)
        assert done.returncode == 2, done.stderr
        assert errors(done.stderr) == [
            f"{path}: invalid TOML: arrays or inline tables nested too deeply to parse"]
        assert done.stderr.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = subprocess.run([str(STREAMCAP), "--debug", "check-config", str(tmp_path / "x.toml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1  # the re-raised exception
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr


# --------------------------------------------------------------------------- devices


def _no_device_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which PortAudio reaches no sound server."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items()
           if k not in {"PULSE_SERVER", "PIPEWIRE_REMOTE", "JACK_DEFAULT_SERVER"}}
    env.update(XDG_RUNTIME_DIR=str(runtime), HOME=str(tmp_path),
               PULSE_SERVER=f"unix:{runtime}/no-such-socket")
    return env


DEVICE_LINE = re.compile(r"^[* ] +\d+  .+  \(.+, \d+ ch, [\d.]+ Hz\)$")


def test_devices_lists_or_says_there_are_none(tmp_path: Path) -> None:
    done = run_cli("devices", env=_no_device_env(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    if lines[0].startswith("no audio capture devices found"):
        # A reason the user can act on follows the colon.
        assert len(lines) == 1
        assert re.match(r"no audio capture devices found: \S", lines[0])
    else:  # this machine has a sound card: check the listing instead
        assert all(DEVICE_LINE.match(line) for line in lines[:-1]), lines
        assert lines[-1].startswith("(* = default; capture one with uri = \"mic:")


def test_devices_json(tmp_path: Path) -> None:
    done = run_cli("devices", "--json", env=_no_device_env(tmp_path))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"devices", "note"}
    assert isinstance(data["devices"], list)
    if not data["devices"]:
        assert isinstance(data["note"], str) and data["note"]
    for device in data["devices"]:
        assert set(device) == {"index", "name", "host_api", "max_input_channels",
                               "default_sample_rate_hz", "is_default"}
        assert isinstance(device["index"], int) and device["max_input_channels"] > 0
    assert sum(bool(d["is_default"]) for d in data["devices"]) <= 1


# --------------------------------------------------------------------------- plugins


def test_plugins_json_lists_the_built_in_entry_points(tmp_path: Path) -> None:
    done = run_cli("plugins", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["config"] is None
    rows = {(p["group"], p["name"]): p for p in data["plugins"]}
    assert BUILT_IN <= set(rows)
    for key in BUILT_IN:
        row = rows[key]
        assert row["distribution"] == "streamcap"
        assert row["version"] == streamcap.__version__
        assert row["value"].startswith("streamcap.")
        assert row["enabled_by"] == []
    assert rows[("streamcap.sinks", "websocket")]["value"] == (
        "streamcap.sinks.websocket:create_sink")


def test_plugins_marks_what_a_config_enables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[sources.door]\nuri = "file:/tmp/door.wav"\n'
                    '[sources.cam]\nuri = "rtsp://u:p@cam/live"\n'
                    '[sinks.ws]\nplugin = "websocket"\n')
    done = run_cli("plugins", "--json", "--config", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["config"] == str(path)
    used = {(p["group"], p["name"]): p["enabled_by"] for p in data["plugins"]}
    assert used[("streamcap.sources", "file")] == ["sources.door"]
    assert used[("streamcap.sources", "stream")] == ["sources.cam"]
    assert used[("streamcap.sinks", "websocket")] == ["sinks.ws"]
    assert used[("streamcap.sinks", "mqtt")] == []


def test_plugins_text(tmp_path: Path) -> None:
    done = run_cli("plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    for group, name in BUILT_IN:
        assert any(line.split()[:3] == [group, name, "streamcap"] for line in lines), lines
    assert lines[-1] == "(no config file: nothing is enabled; pass --config)"


def test_plugins_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[sources.x]\nuri = "mic:default"\nwindow_s = 5\n')
    done = run_cli("plugins", "--config", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert errors(done.stderr) == [
        f"{path}: sources.x.window_s: must be between 10 and 30 (got 5.0)"]
