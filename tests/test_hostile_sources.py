"""Hostile audio input: bad files, special files and bad source URIs, through the real parts.

Everything runs on loopback with real files, FIFOs, sockets and devices, the real
``streamcap caption`` console script and one real daemon subprocess (shared by the
module). Loops are bounded and seeded (``random.Random(11)``); nothing asserts timing.

What must hold, whatever the input:

* a FIFO, device, socket or directory (or a link to one) is refused by ``os.stat``,
  never opened: nothing hangs, neither ``caption`` (exit 2) nor the daemon, whose
  other sources, ``/healthz`` and SIGTERM keep working;
* a bad header (garbage, truncated, zero or 65535 channels, a rate of 0, 1 Hz or
  4 GHz, no data) gives one clear error naming the file, never a traceback, never a
  hang, never an allocation sized by the header;
* finite samples of any size (1e30, float32 max, a full-scale square, DC at 1.0) are
  captioned: clipped to [-1, 1] and counted, never turned into NaN in the model;
* a looped short file (1 sample) is tiled into whole blocks;
* a URI option outside its range is refused like the config key, naming
  ``sources.<name>.uri``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import free_port
from daemon_process import (
    WAIT_S,
    DaemonProcess,
    NotifyListener,
    http_get,
    metric_samples,
    streamcap_command,
    tiny_model_toml,
)
from timing import scaled

from streamcap.cli import main
from streamcap.config import parse_config
from streamcap.errors import ConfigError

RATE = 16000
FAST_MODEL = """\
[model]
bundle = "tiny"
device = "cpu"
precision = "fp32"
threads = 1

[model.decoding]
n_candidates = 2
max_new_tokens = 4
seed = 0
"""


# --------------------------------------------------------------------------- hostile files


def wav_bytes(*, fmt: int = 3, channels: int = 1, rate: int = RATE, bits: int = 32,
              data: bytes = b"\0" * 64, data_len: int | None = None) -> bytes:
    """A RIFF/WAVE file with any header values, consistent or not."""
    align = channels * bits // 8
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels & 0xFFFF, rate & 0xFFFFFFFF,
                            (rate * align) & 0xFFFFFFFF, align & 0xFFFF, bits)
    size = len(data) if data_len is None else data_len
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data"
            + struct.pack("<I", size & 0xFFFFFFFF) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def floats(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def bad_files(directory: Path) -> dict[str, Path]:
    """Files that cannot be captioned: each must give one error naming it."""
    rng = random.Random(11)
    files: dict[str, bytes] = {
        "empty.wav": b"",
        "riff-only.wav": b"RIFF",
        "zero-channels.wav": wav_bytes(channels=0),
        "65535-channels.wav": wav_bytes(channels=65535, data=b"\0" * 65535 * 8),
        "rate-0.wav": wav_bytes(rate=0),
        "rate-1.wav": wav_bytes(rate=1, data=b"\0" * 4000),
        "rate-999.wav": wav_bytes(rate=999, data=b"\0" * 4000),
        "rate-400k.wav": wav_bytes(rate=400_000, data=b"\0" * 4000),
        "rate-4g.wav": wav_bytes(rate=4_000_000_000),
        "bits-0.wav": wav_bytes(fmt=1, bits=0),
        "no-data.wav": wav_bytes(data=b""),
        "garbage.flac": b"fLaC" + rng.randbytes(3000),
        "garbage.ogg": b"OggS" + rng.randbytes(3000),
        "garbage.mp3": rng.randbytes(3000),
        "text.m4a": b"this is not audio\n" * 100,
    }
    for i in range(6):  # random bytes after a valid-looking RIFF header start
        files[f"garbage-{i}.wav"] = b"RIFF" + rng.randbytes(rng.randrange(8, 2000))
    out = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        out[name] = path
    return out


def odd_but_good_files(directory: Path) -> dict[str, Path]:
    """Files that must be captioned, each with one window and no NaN in the model."""
    t = np.arange(3 * RATE) / RATE
    sine = np.sin(2 * np.pi * 440 * t)
    samples: dict[str, np.ndarray] = {
        "huge-1e30.wav": 1e30 * sine,
        "float32-max.wav": np.where(sine >= 0, 1, -1) * np.finfo(np.float32).max,
        "square-full-scale.wav": np.where(sine >= 0, 1.0, -1.0),
        "dc-1.wav": np.ones_like(sine),
        "nan-and-inf.wav": np.where(np.arange(sine.size) % 3 == 0, np.nan,
                                    np.where(sine >= 0, np.inf, -np.inf)),
        "one-sample.wav": np.array([0.5]),
    }
    out = {}
    for name, values in samples.items():
        path = directory / name
        path.write_bytes(wav_bytes(data=floats(values)))
        out[name] = path
    truncated = directory / "truncated.wav"
    truncated.write_bytes(wav_bytes(data=floats(0.1 * sine[:RATE]), data_len=12 * RATE))
    out["truncated.wav"] = truncated
    return out


def special_inputs(directory: Path) -> dict[str, Path]:
    """Inputs that are no regular file; a FIFO among them blocks whoever opens it."""
    fifo = directory / "fifo.wav"
    os.mkfifo(fifo)
    link = directory / "link-to-fifo.wav"
    link.symlink_to(fifo)
    folder = directory / "folder.wav"
    folder.mkdir()
    sock_path = Path(tempfile.mkdtemp(prefix="sc-sock-")) / "s.wav"  # AF_UNIX paths are short
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(sock_path))  # the socket file stays after the close
    return {"fifo": fifo, "link": link, "folder": folder, "device": Path("/dev/zero"),
            "socket": sock_path}


def caption(tmp: Path, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    config = tmp / "fast.toml"
    config.write_text(FAST_MODEL)
    done = subprocess.run([*streamcap_command(), "caption", "--config", str(config), *args],
                          cwd=tmp, capture_output=True, text=True, timeout=scaled(timeout_s),
                          stdin=subprocess.DEVNULL, check=False)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def errors(stderr: str) -> list[str]:
    prefix = "streamcap: error: "
    return [line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix)]


def test_caption_refuses_special_inputs_up_front_without_opening_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    special = special_inputs(tmp_path)
    good = tmp_path / "good.wav"
    sf.write(good, np.zeros(RATE, dtype=np.float32), RATE)
    # the command line in process: a hang here would hang the test (no writer ever comes)
    code = main(["caption", "--model", "tiny", str(good), *(str(p) for p in special.values())])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    problems = errors(err)
    assert len(problems) == len(special)
    for path, problem in zip(special.values(), problems, strict=True):
        assert problem.startswith(f"{path} is ") and "not a regular file" in problem
    assert "FIFO" in problems[0] and "link to a FIFO" in problems[1]
    assert not out  # nothing was captioned, no model was loaded


def test_caption_reports_each_bad_file_and_captions_odd_but_finite_audio(
        tmp_path: Path) -> None:
    bad = bad_files(tmp_path)
    good = odd_but_good_files(tmp_path)
    done = caption(tmp_path, "--json", *(str(p) for p in [*bad.values(), *good.values()]))
    assert done.returncode == 1, done.stderr[-3000:]
    problems = errors(done.stderr)
    for name, path in bad.items():
        assert [p for p in problems if str(path) in p], f"{name}: no error naming it"
    assert len(problems) == len(bad)
    for problem in problems:
        assert len(problem) < 1000 and "\n" not in problem
    for name in ("rate-1.wav", "rate-999.wav", "rate-400k.wav"):
        [problem] = [p for p in problems if str(bad[name]) in p]
        assert "sample rate of" in problem and "expected 1000 to 384000 Hz" in problem
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    by_file = {row["file"]: row for row in rows}
    assert set(by_file) == {str(p) for p in good.values()}  # one window each
    assert len(rows) == len(good)
    for row in rows:
        assert isinstance(row["text"], str) and np.isfinite(row["score"])
        assert all(np.isfinite(c["decoder_score"]) for c in row["candidates"])
    clip_warnings = [json.loads(line) for line in done.stderr.splitlines()
                     if "full scale" in line]
    assert {w["source"].rsplit(": ", 1)[1] for w in clip_warnings} == {
        str(good["huge-1e30.wav"]), str(good["float32-max.wav"])}


def test_file_sources_never_allocate_what_a_header_claims(tmp_path: Path) -> None:
    """A header announcing 4 GB of data, or 1024 channels, is read in bounded pieces."""
    script = tmp_path / "read.py"
    script.write_text("""
import asyncio, resource, sys
from contextlib import aclosing
from streamcap.errors import SourceError
from streamcap.sources.file import create_source

async def read(path):
    src = create_source("x", "file:" + path, {"realtime": False, "block_s": 2.0})
    try:
        async with aclosing(src.blocks()) as blocks:
            return sum([len(b.samples) async for b in blocks])
    except SourceError as exc:
        return str(exc)

for path in sys.argv[1:]:
    print("result", asyncio.run(read(path)))
print("result", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")
    wide = tmp_path / "wide.wav"
    wide.write_bytes(wav_bytes(channels=1024, rate=384000, data=b"\0" * 1024 * 4 * 8))
    claims = tmp_path / "claims-4gb.wav"
    claims.write_bytes(wav_bytes(data=b"\0" * 400, data_len=0xFFFFFFF0))
    done = subprocess.run([sys.executable, str(script),
                           str(wide), str(claims)], capture_output=True, text=True,
                          timeout=scaled(120), check=False)
    assert done.returncode == 0, done.stderr
    lines = [line.split(" ", 1)[1] for line in done.stdout.splitlines()
             if line.startswith("result ")]
    assert lines[:2] == ["8", "100"]
    assert int(lines[2]) < 1024 * 1024  # kB: far below 4 GB, or 2 s of 1024 channels (3 GB)


# --------------------------------------------------------------------------- source URIs


def hostile_uri_options() -> Iterator[tuple[str, str]]:
    """``(query, key)`` of a file: URI query whose ``key`` is out of range or malformed."""
    rng = random.Random(11)
    bad_values = {
        "block_s": ["0.00001", "1e-300", "0", "-1", "nan", "inf", "-inf", "2.0001", "1e308",
                    "0x10", "", " ", "0.1s", "1_0"],
        "sample_rate_hz": ["1", "7999", "192001", "999999999999999999999", "-5", "1e3",
                           "16000.0", "nan", ""],
        "loop": ["maybe", "2", "", "truee"],
        "realtime": ["nope", "-1"],
        "ffmpeg": ["", "   "],
    }
    for key, values in bad_values.items():
        for value in values:
            yield f"{key}={value}", key
    for _ in range(20):  # a good option plus a bad one, in random order, some percent-encoded
        key = rng.choice(sorted(bad_values))
        value = rng.choice(bad_values[key])
        good = "loop=true" if key == "realtime" else "realtime=false"
        parts = [good, f"{key}={value}"]
        rng.shuffle(parts)
        yield "&".join(parts), key
    yield "block_s=0.1&block_s=0.00001", "block_s"  # the last one counts
    yield "bogus=1", "bogus"
    yield "channels=2", "channels"  # a microphone's option
    yield "x" * 3000 + "=1", "x" * 3000  # long, yet under the 4096-character URI cap


@pytest.mark.parametrize(("query", "key"), list(hostile_uri_options()))
def test_out_of_range_uri_options_are_refused_naming_the_uri_key(query: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sources": {"kitchen": {"uri": f"file:/tmp/x.wav?{query}"}}})
    problems = info.value.problems
    assert problems and all(p.startswith("sources.kitchen.uri: ") for p in problems)
    assert any(f"source option {key[:60]}" in p or f"source option '{key[:60]}" in p
               for p in problems), problems
    assert all(len(p) < 600 for p in problems)


def test_uri_options_within_range_are_accepted() -> None:
    config = parse_config({"sources": {"a": {
        "uri": "file:/tmp/x.wav?block_s=0.005&sample_rate_hz=192000&loop=yes&realtime=0"}}})
    assert config.sources["a"].uri.endswith("realtime=0")


@pytest.mark.parametrize("uri", [
    "file://evil.example/x.wav", "file:", "file:?loop=true", "nope:x", "rtsp:", "http:/x",
    "hls+ftp://x", "mic:", "\x00", "file:/x.wav?block_s=\x00",
])
def test_malformed_uris_are_refused_naming_the_uri_key(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sources": {"kitchen": {"uri": uri}}})
    assert all(p.startswith("sources.kitchen.uri: ") for p in info.value.problems)


def test_run_refuses_a_bad_source_uri_before_starting(tmp_path: Path) -> None:
    done = subprocess.run([*streamcap_command(), "run", "--source",
                           "file:/tmp/x.wav?block_s=0.00001"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=scaled(120),
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert errors(done.stderr) == [("sources.default.uri: source option 'block_s': must be "
                                   "between 0.005 and 2 (got '0.00001')")]


# --------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def daemon(jsonl_installed: None,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One daemon with a good source, a FIFO, a link to it, a 1 Hz file, a 1e30 file and a
    looped 1-sample file, all as file sources."""
    tmp = tmp_path_factory.mktemp("hostile-daemon")
    special = special_inputs(tmp)
    good = tmp / "good.wav"
    sf.write(good, (0.1 * np.random.default_rng(11).standard_normal(RATE)).astype(np.float32),
             RATE)
    huge = tmp / "huge.wav"
    huge.write_bytes(wav_bytes(data=floats(1e30 * np.ones(RATE))))
    one = tmp / "one.wav"
    one.write_bytes(wav_bytes(data=floats(np.array([0.5]))))
    rate1 = tmp / "rate1.wav"
    rate1.write_bytes(wav_bytes(rate=1, data=b"\0" * 40000))
    sources = {"good": f"file:{good}?loop=true", "fifo": f"file:{special['fifo']}",
               "link": f"file:{special['link']}", "device": "file:/dev/zero",
               "rate1": f"file:{rate1}?loop=true", "huge": f"file:{huge}?loop=true",
               "one": f"file:{one}?loop=true"}
    tables = "".join(f'[sources.{name}]\nuri = "{uri}"\nwindow_s = 10\nhop_s = 10\n\n'
                     for name, uri in sources.items())
    http_port = free_port()
    jsonl = tmp / "archive.jsonl"
    config = tmp / "streamcap.toml"
    config.write_text(f"""
[daemon]
node_id = "hostile-sources"
state_dir = "{tmp / 'state'}"
log_format = "json"

{tiny_model_toml(n_candidates=2, max_new_tokens=4)}
{tables}
[sinks.archive]
plugin = "jsonl"
path = "{jsonl}"

[http]
port = {http_port}
""", encoding="utf-8")
    notify = NotifyListener(Path(tempfile.mkdtemp(prefix="sc-hostile-")))
    proc = DaemonProcess.start(config, env={"NOTIFY_SOCKET": str(notify.path)},
                               log=tmp / "daemon.log", jsonl=jsonl, http_port=http_port)
    try:
        deadline = time.monotonic() + WAIT_S
        while notify.index("READY", "1") is None:
            proc.check_alive()
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.2)
        yield {"proc": proc, "special": special, "rate1": rate1}
    finally:
        proc.kill()
        notify.close()
        with contextlib.suppress(OSError):  # release a reader stuck on the FIFO
            os.close(os.open(special["fifo"], os.O_WRONLY | os.O_NONBLOCK))


def health(proc: DaemonProcess) -> dict[str, Any]:
    _, _, body = http_get(proc.http("/healthz"))
    result: dict[str, Any] = json.loads(body)
    return result


def test_daemon_refuses_special_files_and_keeps_serving(daemon: dict[str, Any]) -> None:
    proc: DaemonProcess = daemon["proc"]

    def probe() -> tuple[dict[str, Any], bool]:
        sources = health(proc)["sources"]
        return sources, all(sources[n]["state"] == "failed"
                            for n in ("fifo", "link", "device", "rate1"))

    sources = proc.poll(probe, lambda got: f"not all refused: {got}\n{proc.log_tail()}")
    text = json.dumps(sources)
    assert str(daemon["special"]["fifo"]) in text and "FIFO" in text
    assert "character device" in text
    assert "sample rate of 1 Hz" in text
    proc.wait_metric("streamcap_windows_total", '{source="good"}', lambda v: v >= 1)


def test_daemon_captions_huge_samples_clipped_and_tiles_a_one_sample_loop(
        daemon: dict[str, Any]) -> None:
    proc: DaemonProcess = daemon["proc"]

    def probe() -> tuple[set[str], bool]:
        done = {c["source_id"] for c in proc.captions()}
        return done, {"huge", "one", "good"} <= done

    proc.poll(probe, lambda got: f"captions only from {got}:\n{proc.log_tail()}")
    _, _, text = http_get(proc.http("/metrics"))
    assert metric_samples(text, "streamcap_clipped_samples_total")['{source="huge"}'] > 0
    failures = metric_samples(text, "streamcap_inference_failures_total")
    assert all(v == 0 for v in failures.values()), failures
    assert not [e for e in proc.log_events() if "NaN" in str(e.get("error", ""))]


def test_daemon_stops_on_sigterm_with_a_fifo_source(daemon: dict[str, Any]) -> None:
    proc: DaemonProcess = daemon["proc"]
    assert health(proc)["sources"]["good"]["state"] == "running"
    assert proc.stop() == 0, proc.log_tail()
