#!/usr/bin/env bash
# The README's demo command: set up ./.venv if needed, then run the end-to-end demo on the synthetic phantom.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${NNYSEG_VENV:-.venv}/bin/activate"
nnyseg demo --workdir "${NNYSEG_DEMO_DIR:-nnyseg_demo}" "$@"
