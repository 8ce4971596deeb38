#!/usr/bin/env bash
# The main job in one command: set up .venv, then train Patchcore and AnomalousPatchCore on the same
# split and compare them. Without arguments it runs offline on the built-in demo dataset; any
# argument is passed to `anomalib-apc benchmark` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-venv.sh
# The demo (no argument) is the offline job: ask the model hub nothing, so that a machine without it
# gets random weights at once instead of after a minute of the hub client's retries.
if [ $# -eq 0 ]; then
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
fi
exec .venv/bin/anomalib-apc benchmark "$@"
