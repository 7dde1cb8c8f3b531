#!/usr/bin/env bash
# Greedy agreement between the int8 engine and the fake-quant model, diagnosed (scripts/diag_agreement.py), plus
# the cuda tests named in TESTS, on the GPU machine. Multi30k must be in .gpu_data/multi30k (carry .gpu_data).
#   [MIN=1.5] [TESTS="tests/a.py tests/b.py"] [DIAG_ARGS="--tf32 off"] [PROFILES="big:8 big:32"] bash scripts/gpu_diag.sh
# Writes $OUT/setup.log, $OUT/tests.log, $OUT/diag.log and $OUT/diag_agreement.json; PROFILES (model:batch, after the
# diagnosis) runs bench/profile_engine.py for each into $OUT/profile_<model>_b<batch>.{log,csv}.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lsquant_gpu_out}; mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16}
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name())'
  python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -m lsquant build -q
} > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
tail -3 "$OUT/setup.log"
if [ -n "${TESTS:-}" ]; then
  timeout "${TEST_S:-240}" python3 -m pytest -q -x -m cuda $TESTS > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -5 "$OUT/tests.log"
fi
timeout "${DIAG_S:-420}" python3 scripts/diag_agreement.py --data .gpu_data/multi30k --run-dir runs/diag \
  --minutes "${MIN:-1.5}" --out "$OUT" ${DIAG_ARGS:-} 2>&1 | grep -v "it/s]\|s/it]" > "$OUT/diag.log"
echo "diag rc=${PIPESTATUS[0]}"; tail -45 "$OUT/diag.log"
for spec in ${PROFILES:-}; do
  m=${spec%%:*}; b=${spec##*:}
  timeout 150 env LSQUANT_PDL=0 python3 bench/profile_engine.py --model "$m" --batch "$b" --top 24 \
    --out "$OUT/profile_${m}_b$b.csv" > "$OUT/profile_${m}_b$b.log" 2>&1
  echo "profile $spec rc=$?"; grep -A12 "^lsquant_" "$OUT/profile_${m}_b$b.log" | grep -v "^--"
done
