"""streamcap.preflight: the checks `run` makes before it starts, shared with check-config."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from streamcap.config import load_config, parse_config
from streamcap.errors import ConfigError, PluginError
from streamcap.preflight import (
    Listener,
    Prepared,
    check_config,
    check_config_file,
    hosts_overlap,
    open_bind_warnings,
    port_clashes,
    prepare,
    source_options,
)
from streamcap.sources.base import AudioSource
from streamcap.sources.stream import FfmpegStreamSource, input_args

SOURCE = '[sources.kitchen]\nuri = "mic:default"\n'

# Files whose values all parse: only the plugins' own validation refuses them.
PLUGIN_REFUSED = [
    ('[sinks.out]\nplugin = "nonexistent"\n', "sinks.out.plugin"),
    ('[sinks.live]\nplugin = "websocket"\nhost = ""\n', "sinks.live.host"),
    ('[sinks.live]\nplugin = "websocket"\nport = -1\n', "sinks.live.port"),
    ('[sinks.live]\nplugin = "websocket"\nhost = "0.0.0.0"\n', "sinks.live.host"),
    ('[sinks.broker]\nplugin = "mqtt"\nhost = 5\n', "sinks.broker.host"),
    ('[sinks.broker]\nplugin = "mqtt"\nport = 0\n', "sinks.broker.port"),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def runtime() -> Iterator[object]:
    from streamcap.models.runtime import InferenceRuntime, RuntimeOptions

    rt = InferenceRuntime(RuntimeOptions(device="cpu", precision="fp32", num_threads=1))
    yield rt
    rt.close()


@pytest.mark.parametrize(("text", "key"), PLUGIN_REFUSED)
def test_the_daemon_refuses_with_the_lines_check_config_prints(
        tmp_path: Path, text: str, key: str, runtime: object) -> None:
    from streamcap.daemon import Daemon
    from streamcap.models.runtime import InferenceRuntime

    assert isinstance(runtime, InferenceRuntime)
    path = write(tmp_path, SOURCE + text)
    with pytest.raises(ConfigError) as checked:
        check_config_file(path)
    assert any(line.startswith(f"{path}: {key}: ") for line in checked.value.problems)
    config = load_config(path)  # the values are fine; the plugin is what refuses
    with pytest.raises(ConfigError) as built:
        Daemon(config, lambda: None, runtime=runtime)  # type: ignore[arg-type,return-value]
    assert built.value.problems == checked.value.problems


def test_prepare_builds_each_source_and_sink_without_starting_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMCAP_TEST_TOKEN", "s3cret")
    wav = tmp_path / "x.wav"
    config = parse_config({
        "sources": {"door": {"uri": f"file:{wav}?loop=true", "block_s": 0.2},
                    "cam": {"uri": "rtsp://u:p@127.0.0.1/live"}},
        "sinks": {"live": {"plugin": "websocket", "port": 0, "host": "0.0.0.0",
                           "token_env": "STREAMCAP_TEST_TOKEN", "queue_size": 7}},
    })
    prepared = prepare(config)
    assert isinstance(prepared, Prepared)
    assert sorted(prepared.sources) == ["cam", "door"]
    door = prepared.sources["door"]()
    assert isinstance(door, AudioSource) and door.source_id == "door"
    assert prepared.sources["door"]() is not door  # a fresh source for every restart
    live = prepared.sinks["live"]
    assert live.queue_size == 7
    assert getattr(live.sink, "bound_port", None) is None  # not listening


def test_check_config_file_reports_every_problem_once(tmp_path: Path) -> None:
    # A table whose values are already wrong is not handed to its plugin as well.
    path = write(tmp_path, '[model.decoding]\ntemperature = 1e-320\n'
                 '[sources.kitchen]\nuri = "nope"\n[sources.hall]\nuri = "mic:default"\n'
                 '[sinks.live]\nplugin = "websocket"\ntoken = "x"\nhost = "0.0.0.0"\n'
                 '[sinks.broker]\nplugin = "mqtt"\nhost = ""\nport = 0\n')
    with pytest.raises(ConfigError) as info:
        check_config_file(path)
    keys = [line.split(": ")[1] for line in info.value.problems]
    assert keys == ["model.decoding.temperature", "sources.kitchen.uri", "sinks.live.token",
                    "sinks.broker.host", "sinks.broker.port"]
    assert all(line.startswith(f"{path}: ") for line in info.value.problems)


def test_a_valid_file_comes_back_as_its_config(tmp_path: Path) -> None:
    path = write(tmp_path, SOURCE + '[sinks.live]\nplugin = "websocket"\n')
    config = check_config_file(path)
    assert config == load_config(path)


def test_a_broken_plugin_is_a_plugin_error_carrying_every_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "plugins"
    dist.mkdir()
    (dist / "scbroken_preflight.py").write_text(
        "def create_sink(instance, options):\n    raise RuntimeError('no luck')\n")
    info = dist / "scbroken_preflight-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scbroken-preflight\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[streamcap.sinks]\nscbroken-preflight = scbroken_preflight:create_sink\n")
    monkeypatch.syspath_prepend(str(dist))
    path = write(tmp_path, SOURCE + '[sinks.a]\nplugin = "scbroken-preflight"\n'
                 '[sinks.b]\nplugin = "websocket"\nport = -1\n')
    with pytest.raises(PluginError) as err:
        check_config_file(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: sinks.a: sink plugin 'scbroken-preflight'")
    assert "RuntimeError: no luck" in lines[0]
    assert lines[1].startswith(f"{path}: sinks.b.port: ")


def test_a_config_built_in_code_gets_the_uri_checked_too() -> None:
    # Config objects made without parse_config (tests, embedders) are not trusted.
    from dataclasses import replace

    config = parse_config({"sources": {"k": {"uri": "mic:default"}}})
    bad = replace(config, sources={"k": replace(config.sources["k"], uri="ftp://h/x")})
    with pytest.raises(ConfigError) as info:
        prepare(bad)
    [line] = info.value.problems
    assert line.startswith("sources.k.uri: source uri 'ftp://h/x' has unknown scheme")


def test_source_options_pass_only_what_the_table_sets() -> None:
    config = parse_config({"sources": {
        "a": {"uri": "file:/x.wav?loop=true", "block_s": 0.2, "sample_rate_hz": 0},
        "b": {"uri": "mic:default", "sample_rate_hz": 0, "channels": 2}}})
    assert source_options(config.sources["a"]) == {"block_s": 0.2}
    assert source_options(config.sources["b"]) == {"channels": 2}


def test_source_options_pass_the_keys_of_every_kind() -> None:
    # ffmpeg and probe_s are read from the table and reach the source, like the rest.
    config = parse_config({"sources": {
        "a": {"uri": "file:/x.wav", "ffmpeg": "/opt/ffmpeg/bin/ffmpeg", "realtime": False},
        "b": {"uri": "rtsp://cam/live", "probe_s": 5, "ffmpeg": "/opt/ffmpeg/bin/ffmpeg"}}})
    assert source_options(config.sources["a"]) == {"ffmpeg": "/opt/ffmpeg/bin/ffmpeg",
                                                   "realtime": False}
    assert source_options(config.sources["b"]) == {"probe_s": 5.0,
                                                   "ffmpeg": "/opt/ffmpeg/bin/ffmpeg"}
    prepared = prepare(config)
    cam = prepared.sources["b"]()
    assert isinstance(cam, FfmpegStreamSource)
    assert "5000000" in input_args(cam.url, cam._options)  # -analyzeduration in microseconds



# --------------------------------------------------------------------------- listeners


def _listener(key: str, host: str, port: int, *, token_required: bool | None = None,
              tls: bool = False) -> Listener:
    return Listener(key=key, what=f"the {key}", host=host, port=port,
                    token_required=token_required, tls=tls)


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("127.0.0.1", "127.0.0.1", True), ("0.0.0.0", "127.0.0.1", True), ("::1", "::", True),
    ("::0", "[::1]", True), ("localhost", "127.0.0.1", True), ("LOCALHOST", "::1", True),
    ("localhost", "0.0.0.0", True), ("localhost", "::", True), ("", "127.0.0.1", True),
    ("", "::1", True), ("", "0.0.0.0", True), ("", "::", True), ("", "localhost", True),
    ("Host.Example", "host.example", True), ("host.example", "0.0.0.0", True),
    ("host.example", "::", True),
    # asyncio binds IPv6 with IPV6_V6ONLY: the families do not mix
    ("0.0.0.0", "::1", False), ("::", "127.0.0.1", False), ("0.0.0.0", "::", False),
    ("127.0.0.1", "127.0.0.2", False), ("127.0.0.1", "::1", False),
    ("192.168.1.5", "10.0.0.1", False), ("localhost", "192.168.1.5", False),
    ("host.example", "127.0.0.1", False), ("host.example", "other.example", False),
])
def test_hosts_overlap(a: str, b: str, overlap: bool) -> None:
    assert hosts_overlap(a, b) is overlap
    assert hosts_overlap(b, a) is overlap


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


BIND_HOSTS = ["0.0.0.0", "::", "127.0.0.1", "::1"]


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("first", BIND_HOSTS)
@pytest.mark.parametrize("second", [*BIND_HOSTS, ""])
async def test_hosts_overlap_agrees_with_a_real_bind(first: str, second: str) -> None:
    """Bind ``first`` as the listeners do (asyncio), then ``second`` on its port: the
    second fails exactly when hosts_overlap says so (0.0.0.0 and ::1 bind side by side)."""

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    one = await asyncio.start_server(serve, first, 0)
    try:
        port = one.sockets[0].getsockname()[1]
        try:
            two = await asyncio.start_server(serve, second, port)
        except OSError:
            clashed = True
        else:
            clashed = False
            two.close()
            await two.wait_closed()
    finally:
        one.close()
        await one.wait_closed()
    assert hosts_overlap(first, second) is clashed
    assert hosts_overlap(second, first) is clashed


def test_port_clashes_name_both_keys_and_port_0_never_clashes() -> None:
    listeners = [_listener("http", "127.0.0.1", 8080), _listener("sinks.a", "0.0.0.0", 8080),
                 _listener("sinks.b", "127.0.0.2", 9000), _listener("sinks.c", "::", 9000),
                 _listener("sinks.g", "::1", 8080), _listener("sinks.h", "", 9000),
                 _listener("sinks.d", "127.0.0.1", 0), _listener("sinks.e", "127.0.0.1", 0),
                 _listener("sinks.f", "127.0.0.3", 8081)]
    problems = port_clashes(listeners)
    assert [p.split(": ")[0] for p in problems] == ["sinks.a.port", "sinks.h.port"]
    assert "port 8080 is taken by http.port already" in problems[0]
    assert "port 9000 is taken by sinks.b.port already" in problems[1]
    assert port_clashes([]) == []


def test_open_bind_warnings_only_beyond_loopback() -> None:
    warnings = open_bind_warnings([
        _listener("http", "127.0.0.1", 8080), _listener("sinks.a", "::1", 1),
        _listener("sinks.b", "localhost", 2),
        _listener("http", "0.0.0.0", 8080),
        _listener("sinks.open", "192.168.1.5", 0, token_required=False),
        _listener("sinks.clear", "::", 8765, token_required=True),
        _listener("sinks.tls", "::", 8766, token_required=True, tls=True),
    ])
    assert [str(w).split(": ")[0] for w in warnings] == [
        "http.host", "sinks.open.host", "sinks.clear.host", "sinks.tls.host"]
    http, open_, clear, tls = (w.message for w in warnings)
    assert "/metrics, /healthz and the live page" in http and "port 8080" in http
    assert "requires no token" in open_ and "a port chosen at start" in open_
    assert "without TLS" in clear and "without TLS" not in tls
    assert "set tls_cert/tls_key or put a TLS reverse proxy in front" in clear
    assert warnings[0].host == "0.0.0.0" and warnings[0].port == 8080


def test_two_listeners_on_one_port_are_refused_by_check_config_and_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMCAP_TEST_TOKEN", "s3cret")
    path = write(tmp_path, SOURCE + '[http]\nport = 18080\n'
                 '[sinks.a]\nplugin = "websocket"\nport = 18080\n'
                 '[sinks.b]\nplugin = "websocket"\nport = 18081\nhost = "0.0.0.0"\n'
                 'token_env = "STREAMCAP_TEST_TOKEN"\n'
                 '[sinks.c]\nplugin = "websocket"\nport = 18081\nhost = "::1"\n'
                 '[sinks.f]\nplugin = "websocket"\nport = 18081\nhost = "127.0.0.1"\n'
                 '[sinks.d]\nplugin = "websocket"\nport = 0\n'
                 '[sinks.e]\nplugin = "websocket"\nport = 0\n')
    with pytest.raises(ConfigError) as checked:
        check_config_file(path)
    own = "give each listener a port of its own"
    assert checked.value.problems == [
        (f"{path}: sinks.a.port: port 18080 is taken by http.port already (the HTTP server on "
         f"'127.0.0.1'; the websocket sink on '127.0.0.1'); {own}"),
        (f"{path}: sinks.f.port: port 18081 is taken by sinks.b.port already (the websocket "
         f"sink on '0.0.0.0'; the websocket sink on '127.0.0.1'); {own}")]
    with pytest.raises(ConfigError) as prepared:
        prepare(load_config(path))
    assert prepared.value.problems == checked.value.problems


def test_a_disabled_http_server_or_a_bad_http_table_takes_no_port(tmp_path: Path) -> None:
    sink = '[sinks.a]\nplugin = "websocket"\nport = 8080\n'
    check_config_file(write(tmp_path, SOURCE + '[http]\nenabled = false\n' + sink))
    path = write(tmp_path, SOURCE + '[http]\nport = "8765"\n' + sink)
    with pytest.raises(ConfigError) as info:  # the default 8080 stands in: no clash with it
        check_config_file(path)
    assert [line.split(": ")[1] for line in info.value.problems] == ["http.port"]


def test_check_config_and_prepare_warn_about_open_binds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMCAP_TEST_TOKEN", "s3cret")
    path = write(tmp_path, SOURCE + '[http]\nhost = "0.0.0.0"\nport = 0\n'
                 '[sinks.live]\nplugin = "websocket"\nport = 0\nhost = "::"\n'
                 'token_env = "STREAMCAP_TEST_TOKEN"\n'
                 '[sinks.local]\nplugin = "websocket"\nport = 0\n')
    checked = check_config(path)
    assert [w.key for w in checked.warnings] == ["http", "sinks.live"]
    with capture_logs() as logs:
        prepared = prepare(checked.config)
    assert prepared.warnings == checked.warnings
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["option"], e["host"], e["event"]) for e in warned] == [
        (f"{w.key}.host", w.host, w.message) for w in checked.warnings]
    quiet = check_config(write(tmp_path, SOURCE + '[sinks.live]\nplugin = "websocket"\n'))
    assert quiet.warnings == ()
