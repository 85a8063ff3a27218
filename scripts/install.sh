#!/usr/bin/env bash
# Install streamcap into ./.venv on a fresh Debian/Ubuntu machine.
#   bash scripts/install.sh            system audio libraries + the package
#   bash scripts/install.sh --test     also the tools the test suite drives for real
#                                      (PulseAudio, ffmpeg, mosquitto, Chromium, espeak-ng) and the test extras
#   bash scripts/install.sh --newest   Python packages at the newest versions pyproject.toml
#                                      allows instead of the tested ones in requirements.lock
# Flags combine. Python packages come from requirements.lock (exact versions CI tested)
# unless --newest is given; scripts/lock.sh rewrites the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
newest=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    --newest) newest=1 ;;
    *) echo "install.sh: unknown option '$arg' (expected --test and/or --newest)" >&2; exit 2 ;;
  esac
done

apt_packages=(libportaudio2 libsndfile1 ffmpeg)
if (( with_tests )); then
  apt_packages+=(pulseaudio pulseaudio-utils libasound2-plugins mosquitto mosquitto-clients chromium systemd openssl espeak-ng)
fi

# METEOR (evaluation) runs on Java; any Java 11+ will do.
if (( with_tests )) && ! command -v java >/dev/null 2>&1; then
  apt_packages+=(default-jre-headless)
fi

# shellcheck source=scripts/apt.sh
source scripts/apt.sh

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "installing system packages: ${missing[*]}"
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
extras=""
(( with_tests )) && extras="[test,eval]"
# torch is pinned to the CPU wheel (torch==2.13.0) in pyproject.toml: a looser
# requirement would pull a multi-GB CUDA build.
if (( newest )); then
  echo "installing the newest versions pyproject.toml allows (not the lock file)"
  .venv/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".${extras}"
else
  .venv/bin/python -m pip install -q -c requirements.lock -e ".${extras}"
fi
echo "streamcap installed in $(pwd)/.venv"
