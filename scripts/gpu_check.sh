#!/usr/bin/env bash
# The one command for the GPU machine: install, build, run the `cuda` tests and the benchmarks, and write
# logs and CSVs under $OUT. Usage: bash scripts/gpu_check.sh [part[:mode] ...]
#   parts: quant[:test] engine gemm[:quick|test|bench] layers[:quick|test|bench] recipe[:MINUTES]
#   enginebench[:quick]; default
#   "quant engine gemm layers". Run `test` modes first, then `bench` modes in the next call with .torch_ext
#   carried (or on the same warm machine) so the build is reused.
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
parts=${*:-quant engine gemm layers}
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
  name=${part%%:*}; mode=""; [ "$name" != "$part" ] && mode=${part#*:}
  case $name in
    quant)
      ( rc=0
        echo "== cuda tests: quantize"
        python3 -m pytest -q -m cuda tests/test_quantize_cuda.py || rc=1
        if [ "$mode" != "test" ]; then
          echo "== bench: quantize"
          python3 bench/bench_quantize.py --out "$OUT/quantize.csv" || rc=1
        fi
        exit $rc
      ) 2>&1 | tee "$OUT/quant.log" || failed=$((failed + 1)) ;;
    engine)
      ( echo "== cuda tests: models and engines"
        python3 -m pytest -q -m cuda tests/test_engine_transformer.py tests/test_models_transformer.py tests/test_decoding.py
      ) 2>&1 | tee "$OUT/engine.log" || failed=$((failed + 1)) ;;
    gemm)   bash scripts/gpu_gemm.sh $mode 2>&1 | tee "$OUT/gemm.log" || failed=$((failed + 1)) ;;
    layers) bash scripts/gpu_layers.sh $mode 2>&1 | tee "$OUT/layers.log" || failed=$((failed + 1)) ;;
    recipe) bash scripts/gpu_recipe.sh $mode 2>&1 | tee "$OUT/recipe.log" || failed=$((failed + 1)) ;;
    enginebench)
      ( echo "== bench: engines (${mode:-full})"
        timeout 420 python3 bench/bench_engine.py ${mode:+--$mode} --out "$OUT/engine.csv"
        echo "== profile: one request per engine (base, batch 8, beam 4)"
        timeout 120 python3 bench/profile_engine.py --out "$OUT/engine_profile.csv"
      ) 2>&1 | tee "$OUT/enginebench.log" || failed=$((failed + 1)) ;;
    *) echo "unknown part $part"; failed=$((failed + 1)) ;;
  esac
  pack
done
echo "gpu_check: $failed part(s) failed"
exit $failed
