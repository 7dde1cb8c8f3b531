#!/usr/bin/env bash
# The engine work on the GPU machine in one call: build, the cuda tests of the decode-step kernels, engines and
# (optionally) $TESTS, then the engine benchmark for $MODELS / $BATCHES (source length 32, graphs on, GEMMs
# tuned first) and one profiled request per engine. Logs and CSVs under $OUT.
#   [MODELS="base big"] [BATCHES="1 8 32 128"] [SRC_LENS="32"] [IMPLS="lsquant_int8 ..."] [TESTS=...] [ENGINE_TESTS=1] [PROFILE=1]
#   bash scripts/gpu_engine.sh
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD
OUTDIR=${OUT:-/tmp/lsquant_gpu_out}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUTDIR/setup.log" 2>&1
python3 -m lsquant build -q >> "$OUTDIR/setup.log" 2>&1 || { tail -30 "$OUTDIR/setup.log"; exit 1; }
# one pytest per file, each under its own limit, so a slow file cannot hide the others' summaries
engine_tests="tests/test_attention.py tests/test_engine_transformer.py tests/test_decoding.py"
[ "${ENGINE_TESTS:-1}" = 1 ] || engine_tests=""
for f in $engine_tests ${TESTS:-}; do
  echo "== $f" >> "$OUTDIR/tests.log"
  timeout ${TEST_S:-240} python3 -m pytest -q -m cuda -rf --tb=short -p no:cacheprovider $f >> "$OUTDIR/tests.log" 2>&1
  echo "$f: $(tail -1 "$OUTDIR/tests.log")"
done
grep -E "^FAILED" "$OUTDIR/tests.log" | head -20
if [ -n "${BATCHES:-1 8 32 128}" ] && [ "${BENCH:-1}" = 1 ]; then
  timeout ${ENGINE_S:-300} python3 bench/bench_engine.py --models ${MODELS:-base big} --batches ${BATCHES:-1 8 32 128} \
    --src-lens ${SRC_LENS:-32} ${IMPLS:+--impls $IMPLS} --graph on --out "$OUTDIR/engine.csv" > "$OUTDIR/engine_bench.log" 2>&1
  grep -v "^\[" "$OUTDIR/engine_bench.log" | tail -40
  [ "${PROFILE:-1}" = 1 ] && timeout 90 python3 bench/profile_engine.py --out "$OUTDIR/engine_profile.csv" > "$OUTDIR/engine_profile.log" 2>&1
  [ "${PROFILE:-1}" = 1 ] && tail -24 "$OUTDIR/engine_profile.log"
fi
