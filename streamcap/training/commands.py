"""``streamcap train ...`` and ``streamcap eval``: argument wiring around the trainers.

Subcommands of ``train``: ``corpus`` (the synthetic demo corpus), ``init`` (a
randomly initialised bundle with a tokenizer trained on a manifest's
captions), ``features`` (precomputed codes and clip embeddings),
``retriever``, ``captioner`` (each reads a bundle and writes a new one with
the trained component, plus a metrics JSON) and ``soup``. ``eval`` captions
a manifest split and writes a metrics JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from streamcap.errors import ConfigError

TRAIN_COMMANDS = ("corpus", "init", "features", "retriever", "captioner", "soup",
                  "calibrate")


def add_parsers(sub: Any) -> None:
    """Adds ``train`` and ``eval`` to the CLI's subparsers."""
    train = sub.add_parser("train", help="make data, train models, average them")
    tsub = train.add_subparsers(dest="train_command", metavar="SUBCOMMAND")

    corpus = tsub.add_parser("corpus", help="generate the synthetic demo corpus")
    corpus.add_argument("out", type=Path)
    corpus.add_argument("--clips", type=int, default=1000)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--sample-rate", type=int, default=32000)
    corpus.add_argument("--captions-per-clip", type=int, default=5)
    corpus.add_argument("--clip-s", type=float, default=10.0)

    init = tsub.add_parser("init", help="write a randomly initialised bundle to train, or "
                           "one built from fetched components (--from-fetched)")
    init.add_argument("out", type=Path)
    init.add_argument("--preset", default="demo", help="demo, tiny, base or large")
    init.add_argument("--manifest", type=Path,
                      help="the tokenizer is trained on its train-split captions (not with "
                           "--from-fetched, which uses BART's tokenizer)")
    init.add_argument("--vocab-size", type=int, default=1000)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--overwrite", action="store_true")
    init.add_argument("--from-fetched", action="store_true",
                      help="build from `streamcap models fetch` components (DAC, BART, CNext, "
                           "a text encoder; docs/models-fetch.md)")
    init.add_argument("--components-dir", type=Path, action="append", default=[],
                      metavar="DIR", help="where the components were fetched (repeat; "
                                          "default: the user's, then the system's)")
    init.add_argument("--bart", default="bart-base", help="bart-base or bart-large")
    init.add_argument("--text-encoder", default="roberta-base",
                      help="roberta-base or roberta-large")
    init.add_argument("--cnext", default="cnext-audioset-bl",
                      help="cnext-audioset-bl or cnext-audioset")
    init.add_argument("--max-window-s", type=float, default=30.0,
                      help="longest window the captioner takes (default 30)")

    feats = tsub.add_parser("features", help="precompute DAC codes and clip embeddings")
    feats.add_argument("--model", type=Path, required=True, help="bundle directory")
    feats.add_argument("--manifest", type=Path, required=True)
    feats.add_argument("--out", type=Path, required=True)
    feats.add_argument("--shard-size", type=int, default=256)
    feats.add_argument("--device", default="cpu")
    feats.add_argument("--threads", type=int, default=None)
    feats.add_argument("--overwrite", action="store_true")

    for name, helptext in (("retriever", "train the retriever with the m-LTM loss"),
                           ("captioner", "train the EnCLAP captioner")):
        p = tsub.add_parser(name, help=helptext)
        p.add_argument("--model", type=Path, required=True, help="bundle to start from")
        p.add_argument("--out", type=Path, required=True, help="bundle to write")
        p.add_argument("--stage", choices=("pretrain", "finetune"), default="pretrain")
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--warmup", type=int, default=None)
        p.add_argument("--weight-decay", type=float, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--max-steps", type=int, default=None)
        p.add_argument("--max-minutes", type=float, default=None)
        p.add_argument("--checkpoints", type=Path, default=None,
                       help="checkpoint directory (default: OUT.checkpoints)")
        p.add_argument("--resume", type=Path, default=None, help="checkpoint file or directory")
        p.add_argument("--device", default="cpu")
        p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on CUDA only)")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--metrics", type=Path, default=None,
                       help="training metrics JSON (default: OUT.train.json)")
        p.add_argument("--model-id", default=None, help="model id of the written bundle")
    retr = tsub.choices["retriever"]
    retr.add_argument("--manifest", type=Path, action="append", default=[],
                      help="training manifest(s), mixed; with --audio wave")
    retr.add_argument("--features", type=Path, action="append", default=[],
                      help="feature directories (their clip embeddings; --audio embedding)")
    retr.add_argument("--audio", choices=("wave", "embedding"), default=None,
                      help="wave: train CNext end-to-end; embedding: frozen CNext")
    retr.add_argument("--clip-s", type=float, default=10.0)
    capt = tsub.choices["captioner"]
    capt.add_argument("--features", type=Path, action="append", required=True)
    capt.add_argument("--captions", choices=("all", "one"), default="all",
                      help="per epoch: every caption, or one random caption per clip")
    capt.add_argument("--decoding-mode", choices=("sample", "beam"), default=None,
                      help="default decoding stored in the bundle")

    cal = tsub.add_parser("calibrate", help="calibrate a bundle's abstention rule on held-out "
                          "synthetic scenes and write it into its manifest")
    cal.add_argument("--model", type=Path, required=True, help="bundle directory (updated)")
    cal.add_argument("--manifest", type=Path, required=True)
    cal.add_argument("--split", default="val")
    cal.add_argument("--scenes", type=Path, default=None,
                     help="scenes.jsonl of the corpus (default: next to the manifest)")
    cal.add_argument("--keep", type=float, default=0.9,
                     help="share of the right held-out captions the rule keeps")
    cal.add_argument("--quiet-text", action="append", default=[],
                     help="a text that describes no sound event (repeat); none: no quiet rule")
    cal.add_argument("--quiet-dbfs", type=float, default=-70.0,
                     help="windows below this RMS level are captioned quiet")
    cal.add_argument("--limit", type=int, default=None, help="first N clips only")
    cal.add_argument("--report", type=Path, default=None,
                     help="JSON of every judged caption (default: MODEL.calibration.json)")
    cal.add_argument("--threads", type=int, default=None)

    soup = tsub.add_parser("soup", help="average the captioners of several bundles")
    soup.add_argument("bundles", type=Path, nargs="+")
    soup.add_argument("--out", type=Path, required=True)
    soup.add_argument("--retriever", action="store_true", help="average the retrievers too")
    soup.add_argument("--overwrite", action="store_true")

    data = sub.add_parser("data", help="download training data sets (needs internet; "
                                       "docs/data-fetch.md)")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dfetch = dsub.add_parser("fetch", help="download, check and extract a data set and write "
                                           "its manifest")
    dfetch.add_argument("name", metavar="NAME", help="clotho (AudioCaps and WavCaps: see "
                                                     "docs/data-fetch.md)")
    dfetch.add_argument("--dir", type=Path, metavar="DIR",
                        help="directory to write NAME into (default: "
                             "$XDG_CACHE_HOME/streamcap/data or ~/.cache/streamcap/data)")
    dfetch.add_argument("--accept-licences", action="store_true",
                        help="accept the printed licences without asking (for scripts)")
    dfetch.add_argument("--overwrite", action="store_true", help="fetch it again")
    dfetch.add_argument("--keep-archives", action="store_true",
                        help="keep the .7z archives after extracting them")
    dman = dsub.add_parser("manifest", help="write a manifest from a data set prepared by hand "
                                            "(clotho, audiocaps, wavcaps)")
    dman.add_argument("kind", choices=("clotho", "audiocaps", "wavcaps"))
    dman.add_argument("--out", type=Path, required=True, help="manifest.jsonl to write")
    dman.add_argument("--root", type=Path, help="clotho: directory of clotho_captions_*.csv")
    dman.add_argument("--csv-dir", type=Path, help="audiocaps: directory of train/val/test.csv")
    dman.add_argument("--json", type=Path, help="wavcaps: one source's JSON metadata")
    dman.add_argument("--source", help="wavcaps: freesound, bbc, soundbible or audioset")
    dman.add_argument("--split", default="train", help="wavcaps: the rows' split")
    dman.add_argument("--audio-dir", type=Path,
                      help="the audio (audiocaps, wavcaps; clotho: default --root)")
    dman.add_argument("--exclude-ids", type=Path,
                      help="Freesound ids to leave out, one per line (clotho, wavcaps)")

    ev = sub.add_parser("eval", help="caption a manifest split and write metrics")
    ev.add_argument("--model", type=Path, action="append", required=True,
                    help="bundle directory; repeat for an output ensemble")
    ev.add_argument("--manifest", type=Path, required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--out", type=Path, required=True, help="metrics JSON")
    ev.add_argument("--scenes", type=Path, default=None,
                    help="scenes.jsonl of a synthetic corpus (default: next to the manifest)")
    ev.add_argument("--decoding", choices=("beam", "sample"), default="beam")
    ev.add_argument("--num-beams", type=int, default=4)
    ev.add_argument("--limit", type=int, default=None, help="first N clips only")
    ev.add_argument("--no-meteor", action="store_true")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    """Runs ``train <subcommand>`` or ``eval``; returns the exit code."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(int(args.threads))
    if args.command == "eval":
        return _eval(args)
    if args.command == "data":
        return _data(args)
    handlers = {"corpus": _corpus, "init": _init, "features": _features,
                "retriever": _retriever, "captioner": _captioner, "soup": _soup,
                "calibrate": _calibrate}
    if args.train_command is None:
        raise ConfigError(f"train: a subcommand is needed: {', '.join(TRAIN_COMMANDS)}")
    return handlers[args.train_command](args)


def _write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", "utf-8")
    os.replace(tmp, path)


def _data(args: argparse.Namespace) -> int:
    from streamcap.models.artefacts import dataset
    from streamcap.training.data.fetch import fetch_dataset

    if args.data_command is None:
        raise ConfigError("data: a subcommand is needed: fetch, manifest")
    if args.data_command == "manifest":
        return _data_manifest(args)
    summary = fetch_dataset(dataset(args.name), directory=args.dir,
                            accept_licences=args.accept_licences, overwrite=args.overwrite,
                            keep_archives=args.keep_archives)
    counts = ", ".join(f"{split} {n}" for split, n in sorted(summary.per_split.items()))
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(summary.skipped.items()))
    print(f"manifest {summary.manifest}: {counts} clips"
          + (f" (left out: {skipped})" if skipped else "")
          + f"; next: streamcap train init BUNDLE --manifest {summary.manifest}")
    return 0


def _data_manifest(args: argparse.Namespace) -> int:
    from streamcap.training.data.datasets import (
        from_audiocaps,
        from_clotho,
        from_wavcaps,
        read_id_list,
    )
    from streamcap.training.data.manifest import write_manifest

    needed = {"clotho": ("root",), "audiocaps": ("csv_dir", "audio_dir"),
              "wavcaps": ("json", "audio_dir", "source")}[args.kind]
    missing = [f"--{n.replace('_', '-')}" for n in needed if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"data manifest {args.kind}: needs {', '.join(missing)}")
    exclude = read_id_list(args.exclude_ids) if args.exclude_ids else frozenset()
    if args.kind == "clotho":
        conversion = from_clotho(args.root, audio_root=args.audio_dir, exclude_ids=exclude)
    elif args.kind == "audiocaps":
        conversion = from_audiocaps(args.csv_dir, args.audio_dir)
    else:
        conversion = from_wavcaps(args.json, args.audio_dir, source=args.source,
                                  split=args.split, exclude_ids=exclude)
    path = write_manifest(conversion.rows, args.out)
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(conversion.skipped.items()))
    print(f"wrote {len(conversion.rows)} clips to {path}"
          + (f" (left out: {skipped})" if skipped else ""))
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from streamcap.training.data.corpus import CorpusOptions, make_corpus
    from streamcap.training.trainers.loop import Progress

    options = CorpusOptions(clips=args.clips, seed=args.seed, sample_rate_hz=args.sample_rate,
                            captions_per_clip=args.captions_per_clip, clip_s=args.clip_s)
    bar = Progress(args.clips, "corpus")
    summary = make_corpus(args.out, options, progress=lambda done, total: bar.update())
    bar.close()
    print(f"wrote {summary.clips} clips to {summary.directory} ({dict(summary.per_split)}); "
          f"manifest {summary.manifest}")
    return 0


def _init_from_fetched(args: argparse.Namespace) -> int:
    from streamcap.models.bundle.components import save_components
    from streamcap.models.fetch import component_search_path
    from streamcap.training.fetched import FetchedChoice, init_from_fetched

    choice = FetchedChoice(bart=args.bart, text_encoder=args.text_encoder, cnext=args.cnext,
                           max_window_s=args.max_window_s, seed=args.seed)
    built = init_from_fetched(choice, args.components_dir or component_search_path())
    path = save_components(built.components, args.out, overwrite=args.overwrite)
    print(f"wrote bundle {built.components.model_id} to {path} from fetched components")
    for line in built.used:
        print(f"  used: {line}")
    for line in built.not_used:
        print(f"  not used: {line}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from streamcap.models.bundle.components import save_components
    from streamcap.training.data.manifest import read_manifest
    from streamcap.training.demo import init_components

    if args.from_fetched:
        return _init_from_fetched(args)
    if args.manifest is None:
        raise ConfigError("train init: --manifest is needed (its captions train the "
                          "tokenizer), or --from-fetched")
    rows = read_manifest(args.manifest)
    captions = [c for r in rows if r.split == "train" for c in r.captions]
    if not captions:
        raise ConfigError(f"{args.manifest}: no train-split captions to build a tokenizer from")
    components = init_components(args.preset, captions, vocab_size=args.vocab_size,
                                 seed=args.seed)
    path = save_components(components, args.out, overwrite=args.overwrite)
    print(f"wrote random bundle {components.model_id} to {path} "
          f"(vocabulary {len(components.tokenizer)})")
    return 0


def _load(path: Path) -> Any:
    from streamcap.models.bundle.components import load_components
    from streamcap.models.bundle.manifest import load_bundle

    return load_components(load_bundle(path))


def _features(args: argparse.Namespace) -> int:
    from streamcap.training.data.features import FeatureOptions, precompute_features
    from streamcap.training.data.manifest import read_manifest

    rows = read_manifest(args.manifest)
    summary = precompute_features(rows, _load(args.model), args.out,
                                  FeatureOptions(shard_size=args.shard_size, device=args.device,
                                                 overwrite=args.overwrite))
    print(f"features of {summary.rows} clips in {summary.directory} "
          f"({summary.written_shards} shards written, {summary.skipped_shards} already there)")
    return 0


def _loop(args: argparse.Namespace, base: Any) -> Any:
    changes: dict[str, Any] = {"device": args.device, "bf16": args.bf16,
                               "checkpoint_dir": args.checkpoints
                               or args.out.with_name(args.out.name + ".checkpoints")}
    for field, value in (("epochs", args.epochs), ("batch_size", args.batch_size),
                         ("seed", args.seed), ("max_steps", args.max_steps)):
        if value is not None:
            changes[field] = value
    if args.max_minutes is not None:
        changes["max_seconds"] = args.max_minutes * 60.0
    return replace(base, **changes)


def _optim(args: argparse.Namespace, base: Any) -> Any:
    changes: dict[str, Any] = {}
    for field, value in (("lr", args.lr), ("warmup_steps", args.warmup),
                         ("weight_decay", args.weight_decay)):
        if value is not None:
            changes[field] = value
    return replace(base, **changes)


def _finish(args: argparse.Namespace, components: Any, history: Any, extra: dict[str, Any]
            ) -> int:
    from streamcap.models.bundle.components import save_components

    if args.model_id:
        components.model_id = args.model_id
    components.abstention = None  # calibrated for the old weights; `train calibrate` again
    path = save_components(components, args.out, overwrite=True)
    metrics = {"kind": args.train_command, "stage": args.stage, "bundle": str(path),
               "model_id": components.model_id, **extra, "history": history.to_dict()}
    metrics_path = args.metrics or args.out.with_name(args.out.name + ".train.json")
    _write_json(metrics, metrics_path)
    losses = history.epoch_losses
    first = f"{losses[0]:.4f}" if losses else "-"
    last = f"{losses[-1]:.4f}" if losses else "-"
    print(f"{args.train_command}: {len(history.step_losses)} steps in {history.seconds:.0f} s, "
          f"epoch loss {first} -> {last}; bundle {path}; metrics {metrics_path}"
          + (" (stopped early; --resume to continue)" if history.stopped_early else ""))
    return 0


def _retriever(args: argparse.Namespace) -> int:
    from streamcap.training.data.features import FeatureStore
    from streamcap.training.data.manifest import read_manifest
    from streamcap.training.trainers.retriever import (
        RetrieverTrainConfig,
        retrieval_examples,
        train_retriever,
    )

    mode: Literal["wave", "embedding"] = (
        args.audio or ("embedding" if args.features and not args.manifest else "wave"))
    if mode == "wave" and not args.manifest:
        raise ConfigError("train retriever: --audio wave needs at least one --manifest")
    if mode == "embedding" and not args.features:
        raise ConfigError("train retriever: --audio embedding needs at least one --features")
    if mode == "wave":
        rows = [r for m in args.manifest for r in read_manifest(m) if r.split == "train"]
        examples = retrieval_examples(rows, with_embeddings=False)
    else:
        items = [i for d in args.features for i in FeatureStore(d).items("train")]
        examples = retrieval_examples(items, with_embeddings=True)
    components = _load(args.model)
    if components.retriever is None:
        raise ConfigError(f"{args.model}: the bundle has no retriever to train")
    base = RetrieverTrainConfig()
    config = replace(base, stage=args.stage, audio_mode=mode, clip_s=args.clip_s,
                     optim=_optim(args, base.optim), loop=_loop(args, base.loop))
    history, _ = train_retriever(components.retriever, components.text_tokenizer, examples,
                                 config, resume=args.resume,
                                 metadata={"sources": [str(p) for p in args.manifest
                                                       + args.features]})
    return _finish(args, components, history, {"examples": len(examples), "audio": mode})


def _captioner(args: argparse.Namespace) -> int:
    from streamcap.training.data.features import FeatureStore
    from streamcap.training.trainers.captioner import (
        CaptionerTrainConfig,
        caption_examples,
        train_captioner,
    )

    items = [i for d in args.features for i in FeatureStore(d).items("train")]
    examples = caption_examples(items, per_clip=args.captions == "one")
    components = _load(args.model)
    base = CaptionerTrainConfig()
    optim = base.optim if args.stage == "pretrain" else replace(base.optim, warmup_steps=0,
                                                                timescale=1000)
    config = replace(base, stage=args.stage, captions=args.captions,
                     optim=_optim(args, optim), loop=_loop(args, base.loop))
    history = train_captioner(components.captioner, components.tokenizer, examples, config,
                              resume=args.resume,
                              metadata={"features": [str(p) for p in args.features]})
    if args.decoding_mode is not None:
        components.decoding = {**dict(components.decoding), "mode": args.decoding_mode}
    return _finish(args, components, history, {"examples": len(examples)})


def _calibrate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import torch

    from streamcap.models.bundle.manifest import write_abstention
    from streamcap.models.captioner import build_captioner
    from streamcap.models.decoding.options import DecodingOptions
    from streamcap.training.data.corpus import read_scenes
    from streamcap.training.data.manifest import read_manifest, split_rows
    from streamcap.training.evaluation.calibrate import judge_clips, rule_from
    from streamcap.training.trainers.loop import Progress

    if not 0.0 < args.keep <= 1.0:
        raise ConfigError(f"--keep: expected a share in (0, 1], got {args.keep}")
    rows = split_rows(read_manifest(args.manifest), args.split)[: args.limit]
    scenes_path = args.scenes or args.manifest.parent / "scenes.jsonl"
    if not scenes_path.is_file():
        raise ConfigError(f"{scenes_path}: calibration needs the scenes of a synthetic corpus")
    captioner = build_captioner(str(args.model), DecodingOptions(), device=torch.device("cpu"),
                                dtype=torch.float32)
    bar = Progress(len(rows), "calibrate")
    judged = judge_clips(captioner, rows, read_scenes(scenes_path), args.quiet_text,
                         progress=lambda done, total: bar.update())
    bar.close()
    rule, summary = rule_from(judged, keep=args.keep, quiet_texts=args.quiet_text,
                              quiet_dbfs=args.quiet_dbfs, split=args.split)
    write_abstention(args.model, rule)
    report = args.report or args.model.with_name(args.model.name + ".calibration.json")
    _write_json({"rule": rule.to_json(), "summary": summary,
                 "captions": [asdict(j) for j in judged]}, report)
    print(f"calibrate: min_confidence {rule.min_confidence}, quiet_margin {rule.quiet_margin} "
          f"({summary['right']} of {summary['clips']} {args.split} captions right, "
          f"{summary['right_kept']:.0%} kept; wrong ones abstained: "
          f"{summary['wrong_abstained']}); written to {args.model / 'manifest.json'}; "
          f"report {report}")
    return 0


def _soup(args: argparse.Namespace) -> int:
    from streamcap.training.trainers.soup import soup_bundles

    parts = ("captioner", "retriever") if args.retriever else ("captioner",)
    path = soup_bundles(args.bundles, args.out, components=parts, overwrite=args.overwrite)
    print(f"wrote the soup of {len(args.bundles)} bundles ({', '.join(parts)}) to {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from streamcap.training.data.corpus import read_scenes
    from streamcap.training.data.manifest import read_manifest, split_rows
    from streamcap.training.evaluation.evaluate import EvalOptions, evaluate

    rows = split_rows(read_manifest(args.manifest), args.split)
    if args.limit is not None:
        rows = rows[: args.limit]
    scenes_path = args.scenes or args.manifest.parent / "scenes.jsonl"
    scenes = read_scenes(scenes_path) if scenes_path.is_file() else None
    members = [_load(p) for p in args.model]
    options = EvalOptions(decoding=args.decoding, num_beams=args.num_beams,
                          with_meteor=not args.no_meteor, device=args.device)
    result = evaluate(members, rows, options, scenes=scenes)
    result["manifest"] = str(args.manifest)
    result["split"] = args.split
    _write_json(result, args.out)
    caps = result["captions"]
    line = (f"eval: {result['clips']} clips; CIDEr-D {caps.get('cider_d', float('nan')):.3f}, "
            f"BLEU-4 {caps.get('bleu_4', float('nan')):.3f}")
    if result.get("retrieval"):
        line += f", text-to-audio R@1 {result['retrieval']['text_to_audio']['r1']:.3f}"
    if "keywords" in result:
        line += f", keyword recall {result['keywords']['mean_recall']:.3f}"
    print(line + f"; metrics {args.out}")
    return 0
