#!/usr/bin/env bash
# Create (or reuse) ./.venv with a matching torch/torchvision pair and nnyseg installed with its test extras.
# nnU-Net 2.8 imports timm and torchvision, so torch and torchvision must be a matching pair: torch 2.14.1 with
# torchvision 0.29.1 (with the 2.13.0 CPU wheel, pip picks a torchvision that fails to import).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${NNYSEG_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
    echo "== installing torch 2.14.1 + torchvision 0.29.1 (large download the first time)"
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
echo "== installing nnyseg and its dependencies (nnunetv2 2.8.x, ...)"
python -m pip install --quiet -e ".[test]"
python -m nnyseg.cli --version
