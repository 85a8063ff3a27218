"""``streamcap models ...``: presets, building and verifying bundles, converting DAC weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from streamcap.errors import ModelError


def _presets(args: argparse.Namespace) -> int:
    from streamcap.models.bundle.presets import parameter_counts, preset_names, preset_spec

    rows = []
    for name in preset_names():
        spec = preset_spec(name)
        rows.append({"name": name, "description": spec.description,
                     "parameters": parameter_counts(spec),
                     "codebooks": spec.captioner.n_codebooks,
                     "seq_embed_dim": spec.captioner.seq_embed_dim,
                     "max_window_s": round(spec.captioner.max_frames / spec.codec.frame_rate_hz, 2)})
    if args.json:
        print(json.dumps({"presets": rows}, indent=2))
        return 0
    for row in rows:
        p = row["parameters"]
        assert isinstance(p, dict)
        print(f"{row['name']:12s} total {p['total'] / 1e6:8.2f} M  (codec {p['codec'] / 1e6:.2f} M, "
              f"captioner {p['captioner'] / 1e6:.2f} M, retriever {p['retriever'] / 1e6:.2f} M, "
              f"fluency {p['fluency'] / 1e6:.2f} M, CLAP {p['seq_embedder'] / 1e6:.2f} M)  "
              f"{row['description']}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from streamcap.models.bundle.components import build_components, save_components
    from streamcap.models.bundle.presets import preset_spec

    components = build_components(preset_spec(args.preset), seed=args.seed)
    path = save_components(components, args.directory, overwrite=args.overwrite)
    print(f"wrote bundle {components.model_id} to {path} (random weights of preset "
          f"'{args.preset}')")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from streamcap.models.bundle.manifest import load_bundle

    bundle = load_bundle(args.directory, verify=True)
    n = len(bundle.manifest.get("files", {}))
    print(f"{args.directory}: ok; model {bundle.model_id}, {n} files verified")
    return 0


def _convert_dac(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from streamcap.models.codecs.descript import convert_descript_file

    config = convert_descript_file(args.pth, args.output)
    with safe_open(str(args.output), framework="pt") as handle:
        count = len(list(handle.keys()))
    print(f"wrote {count} tensors to {args.output}; codec config {config.codec_id}")
    return 0


def _import_enclap(args: argparse.Namespace) -> int:
    from streamcap.models.enclap.published import ImportOptions, import_enclap

    options = ImportOptions(max_window_s=args.max_window_s, encodec=args.encodec, clap=args.clap,
                            tokenizer=args.tokenizer, codec_preset=args.codec_preset,
                            clap_preset=args.clap_preset, decoding_mode=args.decoding)
    report = import_enclap(args.directory, args.output, options, overwrite=args.overwrite)
    cfg = report.config
    print(f"wrote bundle {report.model_id} to {report.path} (EnCLAP d_model {cfg.d_model}, "
          f"{cfg.n_codebooks} codebooks, windows up to {cfg.max_frames} frames; default "
          f"decoding {options.decoding_mode})")
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from streamcap.models.artefacts import recipes_for
    from streamcap.models.fetch import COMPONENT_NAME, fetch_bundle, user_component_dir

    items = recipes_for(args.name)
    root = args.dir if args.dir is not None else user_component_dir()
    for item in items:
        if len(items) > 1 and root is not None and not args.overwrite and \
                (root / item.name / COMPONENT_NAME).is_file():
            print(f"{item.name}: already fetched to {root / item.name}")
            continue
        fetch_bundle(item, directory=args.dir, accept_licences=args.accept_licences,
                     overwrite=args.overwrite, keep_downloads=args.keep_downloads)
    return 0


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 100_000_000 else f"{n / 1e6:.1f} MB"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _list(args: argparse.Namespace) -> int:
    from streamcap.models.artefacts import GROUPS, RECIPES, licences
    from streamcap.models.bundle.manifest import bundle_search_path, find_named_bundle
    from streamcap.models.fetch import component_search_path, find_component

    rows: list[dict[str, Any]] = []
    for item in RECIPES.values():
        found = find_component(item.name) if item.is_component else find_named_bundle(item.name)
        rows.append({"name": item.name, "kind": "component" if item.is_component else "bundle",
                     "description": item.description,
                     "download_bytes": item.download_size, "bundle_bytes": item.bundle_size,
                     "installed": None if found is None else str(found),
                     "installed_bytes": None if found is None else _du(found),
                     "sources": [s for s, _, _ in licences(item)],
                     "licences": [{"source": s, "licence": n, "url": u}
                                  for s, n, u in licences(item)]})
    search = [str(d) for d in bundle_search_path()]
    components = [str(d) for d in component_search_path()]
    if args.json:
        print(json.dumps({"fetchable": rows, "groups": {k: list(v) for k, v in GROUPS.items()},
                          "search_path": search, "component_path": components}, indent=2))
        return 0
    for row in rows:
        installed = row["installed_bytes"]
        where = (f"fetched, {_size(installed)} at {row['installed']}"
                 if installed is not None else "not fetched")
        print(f"{row['name']:18s} {row['download_bytes'] / 1e9:5.2f} GB download  "
              f"[{where}]  {row['description']}")
        for source in row["sources"]:
            print(f"{'':18s} from {source}")
    for name, members in GROUPS.items():
        print(f"{name:18s} fetches: {', '.join(members)}")
    print(f"bundles are looked up by name in: {', '.join(search)}")
    print(f"training components in: {', '.join(components)}")
    return 0


def run(args: argparse.Namespace) -> int:
    handlers = {"presets": _presets, "build": _build, "verify": _verify,
                "convert-dac": _convert_dac, "import-enclap": _import_enclap,
                "fetch": _fetch, "list": _list}
    handler = handlers.get(args.models_command)
    if handler is None:
        raise ModelError(f"models: unknown subcommand {args.models_command!r}")
    return handler(args)


__all__ = ["run"]
