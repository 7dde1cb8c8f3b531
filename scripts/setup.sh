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
    # a CPU wheel in one of pip's find-links folders (machines with a local package mirror), else PyTorch's
    # CPU index (its dependencies from PyPI)
    wheel=""
    for d in ${PIP_FIND_LINKS:-} $($PIP config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p"); do
      wheel=$(ls "$d"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1)
      [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
      $PIP install "$wheel"
    else
      $PIP install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
  fi
fi
$PIP install -q -e ".[test]"
# CUTLASS's headers (for the test that compiles csrc/cutlass for sm_90a); --no-deps: only the files are used, not
# the package's Python interface (which would pull cuda-python, scipy, ...)
$PIP install -q --no-deps "nvidia-cutlass==4.2.0.0"
echo "setup: ready ($(.venv/bin/python -c 'import torch, lsquant; print("lsquant", lsquant.__version__, "torch", torch.__version__)'))"
