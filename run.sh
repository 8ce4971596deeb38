#!/usr/bin/env bash
# The main job in one command: set up .venv, then train Patchcore and AnomalousPatchCore on the same
# split and compare them. Without arguments it runs offline on the built-in demo dataset; any
# argument is passed to `anomalib-apc benchmark` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-venv.sh
exec .venv/bin/anomalib-apc benchmark "$@"
