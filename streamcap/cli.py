"""The ``streamcap`` command line.

Every expected failure is a :class:`~streamcap.errors.StreamcapError` and ends
as one ``streamcap: error: ...`` line per problem on stderr, never a traceback
(``--debug`` shows it). Exit codes: 0 success, 1 runtime failure, 2 bad
configuration or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from streamcap import __version__
from streamcap.errors import ConfigError, StreamcapError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamcap",
        description="Live natural-language captioning of everyday sound.",
    )
    parser.add_argument("--version", action="version", version=f"streamcap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="capture, window, caption and publish until stopped")
    run.add_argument("--config", type=Path, help="config file (default: embedded defaults)")
    run.add_argument("--model", help="bundle directory or preset name (overrides [model] bundle)")
    run.add_argument("--source", metavar="URI",
                     help="capture this URI instead of the configured sources")

    check = sub.add_parser("check-config", help="validate a config file as `run` would, "
                           "starting nothing")
    check.add_argument("path", nargs="?", type=Path, default=Path("config.toml"),
                       help="config file (default: ./config.toml)")

    devices = sub.add_parser("devices", help="list audio capture devices")
    devices.add_argument("--json", action="store_true", help="print JSON")

    plugins = sub.add_parser("plugins", help="list installed plugins and which are enabled")
    plugins.add_argument("--config", type=Path, help="config file (default: ./config.toml "
                         "if present)")
    plugins.add_argument("--json", action="store_true", help="print JSON")

    caption = sub.add_parser("caption", help="caption audio files window by window")
    caption.add_argument("files", nargs="+", type=Path, metavar="FILE")
    caption.add_argument("--model", help="bundle directory or preset name")
    caption.add_argument("--config", type=Path, help="config file for model and decoding")
    caption.add_argument("--window-s", type=float, default=None, help="window length (s)")
    caption.add_argument("--hop-s", type=float, default=None, help="hop between windows (s)")
    caption.add_argument("--json", action="store_true", help="print one JSON object per window")

    models = sub.add_parser("models", help="model presets and bundles")
    msub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    presets = msub.add_parser("presets", help="list presets with parameter counts")
    presets.add_argument("--json", action="store_true", help="print JSON")
    build = msub.add_parser("build", help="write a bundle with a preset's (random) weights")
    build.add_argument("preset")
    build.add_argument("directory", type=Path)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true")
    verify = msub.add_parser("verify", help="check a bundle's manifest and hashes")
    verify.add_argument("directory", type=Path)
    convert = msub.add_parser("convert-dac",
                              help="convert a descript DAC weights .pth into a codec state dict")
    convert.add_argument("pth", type=Path)
    convert.add_argument("output", type=Path, help="output .safetensors file")
    enclap = msub.add_parser("import-enclap",
                             help="convert a published EnCLAP checkpoint directory into a bundle")
    enclap.add_argument("directory", type=Path, metavar="DIR",
                        help="checkpoint directory: config.json + pytorch_model.bin")
    enclap.add_argument("--output", type=Path, required=True, metavar="BUNDLE",
                        help="bundle directory to write")
    enclap.add_argument("--clap", type=Path, metavar="CKPT_OR_HF_DIR",
                        help="630k-audioset-fusion-best.pt or a laion/clap-htsat-fused directory")
    enclap.add_argument("--encodec", type=Path, metavar="HF_DIR",
                        help="a facebook/encodec_24khz directory (config.json + weights)")
    enclap.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="directory with BART's vocab.json + merges.txt (default: DIR)")
    enclap.add_argument("--max-window-s", type=float, default=30.0,
                        help="longest window to support; grows the position table (default 30)")
    enclap.add_argument("--decoding", choices=("beam", "sample"), default="beam",
                        help="the bundle's default decoding (default: beam, as the reference)")
    enclap.add_argument("--codec-preset", choices=("encodec24k", "encodec-tiny"),
                        help="size of the random codec used without --encodec")
    enclap.add_argument("--clap-preset", choices=("clap-htsat-fused", "clap-tiny"),
                        help="size of the random CLAP used without --clap")
    enclap.add_argument("--overwrite", action="store_true")
    fetch = msub.add_parser("fetch", help="download published weights and build a named bundle "
                                          "(needs internet; see docs/models-fetch.md)")
    fetch.add_argument("name", metavar="NAME", help="what to fetch (streamcap models list)")
    fetch.add_argument("--dir", type=Path, metavar="DIR",
                       help="bundle directory to write NAME into (default: "
                            "$XDG_CACHE_HOME/streamcap/bundles or ~/.cache/streamcap/bundles)")
    fetch.add_argument("--accept-licences", action="store_true",
                       help="accept the printed licences without asking (for scripts)")
    fetch.add_argument("--overwrite", action="store_true", help="fetch an existing bundle again")
    fetch.add_argument("--keep-downloads", action="store_true",
                       help="keep the downloaded files (DIR/.downloads/NAME) after the build")
    listing = msub.add_parser("list", help="what `models fetch` can download, and the bundles "
                                           "found by name")
    listing.add_argument("--json", action="store_true", help="print JSON")

    from streamcap.training.commands import add_parsers as add_training_parsers

    add_training_parsers(sub)
    from streamcap.triggers.calibrate import add_parser as add_triggers_parser

    add_triggers_parser(sub)
    from streamcap.history.cli import add_parser as add_search_parser

    add_search_parser(sub)
    from streamcap.benchmark import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def _cmd_check_config(args: argparse.Namespace) -> int:
    # The checks `run` makes before it starts: values, source URIs, every named
    # plugin's own option validation and the listeners' ports (nothing is started).
    from streamcap.config import located
    from streamcap.preflight import check_config

    checked = check_config(args.path)
    config = checked.config
    for line in located([str(w) for w in checked.warnings], args.path):
        print(f"streamcap: warning: {line}", file=sys.stderr)
    names = ", ".join(config.sources) or "none (embedded default source)"
    sinks = ", ".join(f"{n} ({s.plugin})" for n, s in config.sinks.items()) or "none"
    print(f"{args.path}: valid; sources: {names}; sinks: {sinks}")
    return EXIT_OK


def _cmd_devices(args: argparse.Namespace) -> int:
    from streamcap.sources.devices import list_input_devices

    devices, reason = list_input_devices()
    if args.json:
        print(json.dumps({"devices": [d.to_dict() for d in devices], "note": reason}, indent=2))
        return EXIT_OK
    if not devices:
        print(f"no audio capture devices found{': ' + reason if reason else ''}")
        return EXIT_OK
    for d in devices:
        mark = "*" if d.is_default else " "
        print(f"{mark} {d.index:3d}  {d.name}  ({d.host_api}, {d.max_input_channels} ch, "
              f"{d.default_sample_rate_hz:g} Hz)")
    print("(* = default; capture one with uri = \"mic:<index or name>\")")
    return EXIT_OK


def _cmd_plugins(args: argparse.Namespace) -> int:
    from streamcap.bus.plugin import list_plugins
    from streamcap.config import load_config
    from streamcap.sources.base import parse_source_uri

    path = args.config or (Path("config.toml") if Path("config.toml").exists() else None)
    enabled: dict[tuple[str, str], list[str]] = {}
    if path is not None:
        config = load_config(path)
        for name, src in config.sources.items():
            kind = parse_source_uri(src.uri)[0]
            enabled.setdefault(("streamcap.sources", kind), []).append(f"sources.{name}")
        for name, sink in config.sinks.items():
            enabled.setdefault(("streamcap.sinks", sink.plugin), []).append(f"sinks.{name}")
    rows = [{"group": p.group, "name": p.name, "value": p.value,
             "distribution": p.distribution, "version": p.version,
             "enabled_by": enabled.get((p.group, p.name), [])} for p in list_plugins()]
    if args.json:
        print(json.dumps({"config": str(path) if path else None, "plugins": rows}, indent=2))
        return EXIT_OK
    for row in rows:
        used = ", ".join(row["enabled_by"]) or "-"
        print(f"{row['group']:18s} {row['name']:10s} {row['distribution']} {row['version']:8s} "
              f"enabled by: {used}")
    if path is None:
        print("(no config file: nothing is enabled; pass --config)")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from streamcap.daemon import run_daemon

    return run_daemon(config_path=args.config, model=args.model, source_uri=args.source)


def _cmd_caption(args: argparse.Namespace) -> int:
    from streamcap.captioning import caption_files_command

    return caption_files_command(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from streamcap.models import commands

    if args.models_command is None:
        raise ConfigError("models: a subcommand is needed: presets, build, verify, convert-dac, "
                          "import-enclap, fetch, list")
    return commands.run(args)


def _cmd_training(args: argparse.Namespace) -> int:
    from streamcap.training import commands

    return commands.run(args)


def _cmd_triggers(args: argparse.Namespace) -> int:
    from streamcap.triggers.calibrate import calibrate_command

    return calibrate_command(args)


def _cmd_search(args: argparse.Namespace) -> int:
    from streamcap.history.cli import search_command

    return search_command(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from streamcap.benchmark import bench_command

    return bench_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from streamcap.logs import configure_logging

    configure_logging("auto", "debug" if args.debug else "info")
    handlers = {
        "run": _cmd_run,
        "check-config": _cmd_check_config,
        "devices": _cmd_devices,
        "plugins": _cmd_plugins,
        "caption": _cmd_caption,
        "models": _cmd_models,
        "train": _cmd_training,
        "eval": _cmd_training,
        "data": _cmd_training,
        "triggers": _cmd_triggers,
        "search": _cmd_search,
        "bench": _cmd_bench,
    }
    try:
        code = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (``streamcap plugins --json | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    except ConfigError as exc:
        for line in exc.problems:
            print(f"streamcap: error: {line}", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_USAGE
    except StreamcapError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"streamcap: error: {line}", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
