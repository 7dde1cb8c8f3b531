#!/usr/bin/env bash
# The one command for the GPU machine: install, build, run the `cuda` tests and the benchmarks, and write
# logs and CSVs under $OUT. Usage: bash scripts/gpu_check.sh [part ...]   (parts: quant gemm layers; default all)
# Each part is independent: a failure is logged and the next part still runs; the exit code is the number
# of failed parts.
set -uo pipefail
export PYTHONUNBUFFERED=1
# The device returns at most 8 files: every part writes into a work folder, packed into $OUT/results.tgz
# after each part (so a run cut short still returns what finished); CSVs are also copied to $OUT.
FINAL_OUT=${OUT:-/tmp/lsquant_gpu_out}
export OUT=$(mktemp -d /tmp/lsquant_work.XXXX)
mkdir -p "$FINAL_OUT"
pack() { tar czf "$FINAL_OUT/results.tgz" -C "$OUT" . 2>/dev/null; cp "$OUT"/*.csv "$FINAL_OUT"/ 2>/dev/null; true; }
trap pack EXIT
# A build under the checkout can travel to the next call in `carry` (.torch_ext is git-ignored).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_ext}
export MAX_JOBS=${MAX_JOBS:-16}
parts=${*:-quant gemm layers}
failed=0

(
  set -e
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  python3 -m pip install -q --no-deps --no-build-isolation -e . && echo "installed lsquant (editable)"
  echo "== lsquant build (cold unless TORCH_EXTENSIONS_DIR was carried)"
  python3 -m lsquant build -q
) 2>&1 | tee "$OUT/setup.log" || failed=$((failed + 1))

for part in $parts; do
  case $part in
    quant)
      ( rc=0
        echo "== cuda tests: quantize"
        python3 -m pytest -q -m cuda tests/test_quantize_cuda.py || rc=1
        echo "== bench: quantize"
        python3 bench/bench_quantize.py --out "$OUT/quantize.csv" || rc=1
        exit $rc
      ) 2>&1 | tee "$OUT/quant.log" || failed=$((failed + 1)) ;;
    gemm)   [ -f scripts/gpu_gemm.sh ] && { bash scripts/gpu_gemm.sh 2>&1 | tee "$OUT/gemm.log" || failed=$((failed + 1)); } ;;
    layers) [ -f scripts/gpu_layers.sh ] && { bash scripts/gpu_layers.sh 2>&1 | tee "$OUT/layers.log" || failed=$((failed + 1)); } ;;
    *) echo "unknown part $part"; failed=$((failed + 1)) ;;
  esac
  pack
done
echo "gpu_check: $failed part(s) failed"
exit $failed
