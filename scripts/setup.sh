#!/usr/bin/env bash
# Creates .venv in the checkout and installs lsquant with its test tools.
# PyTorch: on a machine without an NVIDIA GPU, the CPU build (about 200 MB) instead of PyPI's default
# multi-GB CUDA build: a local wheel if pip has one (--no-index), else PyTorch's CPU index. On a GPU
# machine an existing PyTorch is kept; otherwise PyPI's CUDA build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install "torch>=2.4,<2.15"
  else
    echo "setup: no NVIDIA GPU here: installing the CPU build of PyTorch 2.13.0"
    $PIP install --no-index torch==2.13.0 2>/dev/null \
      || $PIP install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -q -e ".[test]"
echo "setup: ready ($(.venv/bin/python -c 'import torch, lsquant; print("lsquant", lsquant.__version__, "torch", torch.__version__)'))"
