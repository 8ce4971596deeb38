#!/usr/bin/env bash
# Creates .venv (if missing) and installs anomalib-apc with its test extra into it.
# torch is pinned to the CPU-usable build that pip finds on this machine's disk, and installed first
# so that no dependency resolves a different torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
