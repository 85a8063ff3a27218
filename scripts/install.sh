#!/usr/bin/env bash
# Install streamcap into ./.venv on a fresh Debian/Ubuntu machine.
#   bash scripts/install.sh          system audio libraries + the package
#   bash scripts/install.sh --test   also the tools the test suite drives for real
#                                    (PulseAudio, ffmpeg, mosquitto) and the test extras
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

apt_packages=(libportaudio2 libsndfile1 ffmpeg)
if (( with_tests )); then
  apt_packages+=(pulseaudio pulseaudio-utils libasound2-plugins mosquitto mosquitto-clients chromium systemd openssl)
fi

# METEOR (evaluation) runs on Java; any Java 11+ will do.
if (( with_tests )) && ! command -v java >/dev/null 2>&1; then
  apt_packages+=(default-jre-headless)
fi

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  echo "installing system packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
# torch is pinned to the CPU wheel (torch==2.13.0) in pyproject.toml: a looser
# requirement would pull a multi-GB CUDA build.
if (( with_tests )); then
  .venv/bin/python -m pip install -q -e ".[test,eval]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "streamcap installed in $(pwd)/.venv"
