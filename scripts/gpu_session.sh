#!/usr/bin/env bash
# One device call that measures the training layers and the engines after a change to both: the layer rows of
# bench_layers.py, the engine benchmark (source length 32, CUDA graphs on), one profiled request per engine,
# and the CUDA tests named in $TESTS; logs and CSVs under $OUT (packed in results.tgz by gpu_check.sh).
#   bash scripts/gpu_session.sh            (repo root as cwd)
set -u
export MAX_JOBS=${MAX_JOBS:-16} LAYERBENCH_S=${LAYERBENCH_S:-280} PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/lsquant_gpu_out}
mkdir -p "$OUTDIR"
bash scripts/gpu_check.sh layers:layerbench > "$OUTDIR/layers_console.log" 2>&1
TESTS=${TESTS:-}
if [ -n "$TESTS" ]; then
  timeout 90 python3 -m pytest -q -m cuda $TESTS > "$OUTDIR/tests.log" 2>&1
fi
timeout ${ENGINE_S:-170} python3 bench/bench_engine.py --batches 1 8 32 128 --src-lens 32 --graph on \
  --out "$OUTDIR/engine.csv" > "$OUTDIR/engine_bench.log" 2>&1
timeout 60 python3 bench/profile_engine.py --out "$OUTDIR/engine_profile.csv" > "$OUTDIR/engine_profile.log" 2>&1
tail -3 "$OUTDIR/tests.log" 2>/dev/null; tail -5 "$OUTDIR/engine_bench.log"; tail -20 "$OUTDIR/engine_profile.log"
