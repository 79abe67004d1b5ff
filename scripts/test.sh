#!/usr/bin/env bash
# The README's test command: set up ./.venv if needed, then run the whole test suite (about 10-15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${NNYSEG_VENV:-.venv}/bin/activate"
python -m pytest "$@"
