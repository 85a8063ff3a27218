#!/usr/bin/env bash
# Rewrite requirements.lock: resolve the newest versions pyproject.toml allows for the
# package and its test, eval and dev extras in a fresh throwaway venv, and pin them exactly.
# Then run `bash .ci/run` (which installs from the new lock) before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q -e ".[test,eval,dev]"
{
  echo "# Exact versions of every Python package streamcap and its test, eval and dev extras use,"
  echo "# as tested by CI. Written by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" -V)."
  echo "# scripts/install.sh installs with these as constraints (pip -c); pyproject.toml keeps ranges."
  # The local version label (+cpu) is dropped: ==2.13.0 matches the CPU wheel and PyPI's alike.
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --all \
    | grep -v -E '^(pip|streamcap)(==| @)' \
    | sed -E 's/^([A-Za-z0-9_.-]+==[^+]+)\+[A-Za-z0-9.]+$/\1/' \
    | LC_ALL=C sort -f -t= -k1,1
} > requirements.lock
echo "wrote requirements.lock ($(grep -cv '^#' requirements.lock) packages)"
