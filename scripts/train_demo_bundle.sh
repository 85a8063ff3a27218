#!/usr/bin/env bash
# Regenerates the demo bundle (streamcap/data/demo-bundle) from scratch on a CPU:
# synthetic corpus -> random demo bundle -> retriever (m-LTM, end-to-end on waveforms)
# -> features (tiny FIXED RANDOM DAC codes + CNext clip embeddings of the trained retriever)
# -> captioner pretraining (caption + MCM) -> finetuning (caption only)
# -> abstention rule calibrated on the val split -> held-out eval.
# Every stage is bounded by epochs, never by wall-clock time: the same SEED gives the same
# bundle however loaded the machine is (only slower).
# Usage: scripts/train_demo_bundle.sh [WORK_DIR] ; env CLIPS, SEED, THREADS override.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/streamcap-demo}
CLIPS=${CLIPS:-2400}
SEED=${SEED:-0}
THREADS=${THREADS:-1}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
SC="$PY -m streamcap"
BUNDLE=streamcap/data/demo-bundle
mkdir -p "$WORK"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

stamp "corpus"
$SC train corpus "$WORK/corpus" --clips "$CLIPS" --seed "$SEED" --sample-rate 32000
stamp "init"
$SC train init "$WORK/init" --preset demo --manifest "$WORK/corpus/manifest.jsonl" \
    --vocab-size 1000 --seed "$SEED" --overwrite
stamp "retriever"
$SC train retriever --model "$WORK/init" --manifest "$WORK/corpus/manifest.jsonl" \
    --out "$WORK/retriever" --audio wave --epochs 30 --batch-size 32 --lr 2e-3 --warmup 60 \
    --seed "$SEED" --threads "$THREADS"
stamp "features"
$SC train features --model "$WORK/retriever" --manifest "$WORK/corpus/manifest.jsonl" \
    --out "$WORK/features" --threads "$THREADS" --overwrite
stamp "captioner pretrain"
$SC train captioner --model "$WORK/retriever" --features "$WORK/features" \
    --out "$WORK/pretrained" --stage pretrain --captions one --epochs 10 --batch-size 32 \
    --lr 1e-3 --warmup 60 --seed "$SEED" --threads "$THREADS"
stamp "captioner finetune"
$SC train captioner --model "$WORK/pretrained" --features "$WORK/features" \
    --out "$WORK/finetuned" --stage finetune --captions one --epochs 3 --batch-size 32 \
    --lr 3e-4 --seed "$SEED" --threads "$THREADS" \
    --decoding-mode beam --model-id streamcap-demo-v2
stamp "abstention (calibrated on the val split)"
$SC train calibrate --model "$WORK/finetuned" --manifest "$WORK/corpus/manifest.jsonl" \
    --split val --keep 0.9 --quiet-text "a quiet room" --quiet-text "silence" \
    --quiet-text "quiet background noise" --threads "$THREADS"
trained=$(( $(date +%s) - start ))
stamp "install bundle (corpus + training took $trained s)"
rm -rf "$BUNDLE"
cp -r "$WORK/finetuned" "$BUNDLE"
chmod -R a+rX "$BUNDLE"  # the bundle writer creates private files; the package ships them
$SC models verify "$BUNDLE"
du -sh "$BUNDLE"
stamp "eval (held-out test scenes)"
$SC eval --model "$BUNDLE" --manifest "$WORK/corpus/manifest.jsonl" --split test \
    --out "$WORK/eval-test.json" --threads "$THREADS"
$PY scripts/demo_bundle_report.py "$WORK" "$BUNDLE" bench/results/demo_bundle.json "$trained"
stamp "done"
