#!/usr/bin/env bash
# The GPU checks the last CPU-side changes wait for, in two device calls (tests, then benchmarks; ~5 min each):
# the head split/merge kernels
# (cuda tests, benchmark rows), the tuner's memory (cuda test, scripts/diag_leak.py), the int8 rounding now shared
# by the GEMM epilogue and the decode attention (their cuda tests), the rough top-k with rows split into slices
# (its tests, its benchmark against one program per row and PyTorch), and the engine profile with the search
# split by kernel; the engines' encoder attention through SDPA on one shared side stream (engine cuda tests; the
# engine benchmark's memory column: no cuBLAS workspace for the int8 engine's stream). Logs and CSVs under $OUT.
#   bash scripts/gpu_followup.sh tests     (cuda tests, diag_leak)
#   bash scripts/gpu_followup.sh bench     (rough top-k tests, head kernel rows, bench_search, engines sliced / one slice)
#   bash scripts/gpu_followup.sh profile   (the engine profile)
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD
OUT=${OUT:-/tmp/lsquant_gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
{ python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -m lsquant build -q; } > "$OUT/setup.log" 2>&1 \
  || { tail -30 "$OUT/setup.log"; exit 1; }
run() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "== $name: rc=$? $(tail -1 "$OUT/$name.log")"
}
PART=${1:-tests}
if [ "$PART" = tests ]; then
run heads_tests 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_heads.py
run gemm_tests 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gemm.py \
  -k "tuning_leaves_no_memory or tune_and_cache_round_trip or triton_epilogues or triton_variants_exact"
run attention_tests 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_attention.py
run rough_topk_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_rough_topk.py
run engine_tests 180 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_engine_transformer.py \
  tests/test_decoding.py
run diag_leak 120 python3 scripts/diag_leak.py
grep -E "^(after|built|tuned|served|dropped)" "$OUT/diag_leak.log"
elif [ "$PART" = bench ]; then
run rough_topk_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_rough_topk.py
run layers_heads_bench 180 python3 bench/bench_layers.py --only kernels --kernels split_heads+bias merge_heads \
  --out "$OUT/layers_heads.csv"
grep -v "^\[" "$OUT/layers_heads_bench.log" | tail -12
run search_bench 90 python3 bench/bench_search.py --out "$OUT/search.csv"
tail -13 "$OUT/search_bench.log"
for P in auto 1; do   # the engines end to end, rows split (auto) and one program per row, same machine
  LSQUANT_ROUGH_SLICES=$([ $P = auto ] || echo $P) run engine_bench_slices_$P 150 python3 bench/bench_engine.py \
    --models base --batches 1 8 32 --src-lens 16 --graph on --impls lsquant_int8 lsquant_fp16 --out "$OUT/engine_$P.csv"
  grep -v "^\[" "$OUT/engine_bench_slices_$P.log" | tail -13
done
else
run engine_profile 150 python3 bench/profile_engine.py --out "$OUT/engine_profile.csv"
tail -45 "$OUT/engine_profile.log"
fi
