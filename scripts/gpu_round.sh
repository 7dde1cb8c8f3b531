#!/usr/bin/env bash
# One device call (~9 min) for the decode-step changes: the LayerNorm fused into the int8 GEMM (Int8Linear.ln_call),
# programmatic dependent launch of the step's Triton kernels (on by default; rows without it set LSQUANT_PDL=0), the beam
# ranking kernel (rough_topk.rank) and the attention's cached dummy. Runs their cuda tests, the engines end to end
# (base: int8 fused / fused + PDL / not fused / fused up to 512 rows, fp16 without and with PDL; big: int8 and fp16
# with PDL), the per-kernel profile and the search benchmark. Logs and CSVs packed in $OUT/round.tgz.
#   bash scripts/gpu_round.sh engine     (~9 min; the default)
#   bash scripts/gpu_round.sh followup   (~6 min) the engines at their defaults after the rough top-k pass-2 change
#   bash scripts/gpu_round.sh lnpdl      (~9 min) the LayerNorm under PDL, the LayerNorm in the residual GEMM's tail,
#       cross-attention per sentence, rough top-k slices, each side by side with its former self
#   bash scripts/gpu_round.sh exact      (~7 min; carry .whl) the int8 engine with fp32 activations; with CUTLASS
#   MODEL=base bash scripts/gpu_round.sh final  (~4-7 min) issue 5's whole grid for one model at the defaults
#   bash scripts/gpu_round.sh early      (~8 min) LSQUANT_EARLY_EPI=1 against =0 (two A/B pairs), then the tuner choosing
#   bash scripts/gpu_round.sh memory     (~8 min) the tuned engine's memory after a source-64 request; sampling rows
#   bash scripts/gpu_round.sh close      (~10 min; MODELS=base, TESTS=0 for less) cuda tests of the int8 cross K/V and
#       what the early round's limit cut off, then the int8 and fp16 engines over issue 5's grid, PyTorch at 32 / 128
#   bash scripts/gpu_round.sh tests      (~4-9 min) the cuda tests of the decode step and the engines
#   bash scripts/gpu_round.sh lnpdl_quick (~2 min) the same for base at batch 1 and 8
#   bash scripts/gpu_round.sh gemm       (~9 min; carry .whl: the nvidia-cutlass wheel) the CUTLASS int8 GEMM
#       (lsquant/inference/gemm_cutlass.py): build, cuda tests, bench_gemm over M >= 2048 (GEMM_M="1 8 ...": the
#       M values) with it as a candidate; GEMM_RETIME_M="64 512": those M again, in a second independent run
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD
OUT=${OUT:-/tmp/lsquant_gpu_out}
W="$OUT/w"; mkdir -p "$W"   # logs and CSVs; packed into $OUT/round.tgz after each step (8 files come back)
pack() { tar czf "$OUT/round.tgz" -C "$W" .; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
{ python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -m lsquant build -q; } > "$W/setup.log" 2>&1 \
  || { tail -30 "$W/setup.log"; exit 1; }
python3 -m lsquant env | tee -a "$W/setup.log" | grep -E "^(GPU|triton|torch|programmatic|CUTLASS)"
run() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$W/$name.log" 2>&1; echo "== $name: rc=$? $(tail -1 "$W/$name.log")"; pack
}
bench() {  # name, env assignments..., -- bench_engine arguments...
  local name=$1; shift
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  run "engine_$name" 150 env "${envs[@]}" python3 bench/bench_engine.py --src-lens 16 --graph on \
    --out "$W/engine_$name.csv" "$@"
  grep -v "^\[" "$W/engine_$name.log" | grep "tok/s" | sed 's/^/   /'
}
PART=${1:-engine}
if [ "$PART" = engine ]; then
# in priority order: a step the 600 s call limit cuts off loses only what follows it (each step packs its logs)
run tests 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_pdl.py tests/test_ln_gemm.py \
  tests/test_rough_topk.py tests/test_quantize_cuda.py tests/test_attention.py tests/test_engine_transformer.py \
  tests/test_decoding.py
grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20
bench base_fused LSQUANT_LN_GEMM=1 LSQUANT_PDL=0 -- --models base --batches 1 8 32 128 --impls lsquant_int8 lsquant_fp16
bench base_fused_pdl LSQUANT_LN_GEMM=1 LSQUANT_PDL=1 -- --models base --batches 1 8 32 128 --impls lsquant_int8 lsquant_fp16
# profiles without PDL (with it a kernel's time would include its wait for the one before)
run profile 60 env LSQUANT_LN_GEMM=1 LSQUANT_PDL=0 python3 bench/profile_engine.py --out "$W/profile.csv"
grep -A9 "^lsquant_" "$W/profile.log" | grep -v "^--"
# batch 128 (512 rows a step): where int8 / fp16 was 1.01x; nothing in it was profiled before
run profile128 90 env LSQUANT_LN_GEMM=1 LSQUANT_PDL=0 python3 bench/profile_engine.py --batch 128 --out "$W/profile128.csv"
grep -A9 "^lsquant_" "$W/profile128.log" | grep -v "^--"
bench big_pdl LSQUANT_LN_GEMM=1 LSQUANT_PDL=1 -- --models big --batches 1 8 32 --impls lsquant_int8 lsquant_fp16
# the attention kernel's former tile (4 warps x 64 keys: 4 programs an SM) against the default (2 x 32: 12)
bench base_attn4x64 LSQUANT_LN_GEMM=1 LSQUANT_PDL=0 LSQUANT_ATTN_TILE=4,64 -- --models base --batches 8 128 --impls lsquant_int8
bench base_unfused LSQUANT_LN_GEMM=0 LSQUANT_PDL=0 -- --models base --batches 1 8 32 --impls lsquant_int8
run profile_sample 60 env LSQUANT_LN_GEMM=1 LSQUANT_PDL=0 python3 bench/profile_engine.py --method sample --out "$W/profile_sample.csv"
grep -A9 "^lsquant_" "$W/profile_sample.log" | grep -v "^--"
run search 60 python3 bench/bench_search.py --out "$W/search.csv"
grep "B=" "$W/search.log"
# the LayerNorm fused at 128 and 512 rows too (Int8Linear.ln_config: tiles of at most 64 x 128 there)
bench base_fused512 LSQUANT_LN_GEMM=1 LSQUANT_PDL=0 LSQUANT_LN_GEMM_MAX_M=512 -- --models base --batches 32 128 --impls lsquant_int8
python3 scripts/round_table.py "$W" > "$W/table.md" 2>&1; cat "$W/table.md"; pack
elif [ "$PART" = lnpdl ]; then
# the decode-step changes of the session after run F, each against its former self side by side, in priority order
# (a step the 600 s limit cuts off loses only what follows): the LayerNorm launched with PDL (LSQUANT_PDL_LN=0:
# ordinary launches), the LayerNorm in the residual GEMM's tail (LSQUANT_LN_TAIL=1), cross-attention per (sentence,
# head) (LSQUANT_CROSS_BEAMS=1; per row is the default since run G), more rough top-k slices per row. Cuda tests first
run tests 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_pdl.py tests/test_layer_norm_quant.py \
  tests/test_attention.py tests/test_ln_gemm.py tests/test_engine_transformer.py
grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20
bench base_new -- --models base --batches 1 8 32 128 --impls lsquant_int8 lsquant_fp16
bench base_lntail LSQUANT_LN_TAIL=1 -- --models base --batches 1 8 --impls lsquant_int8
bench big_new -- --models big --batches 1 8 --impls lsquant_int8 lsquant_fp16
bench big_lntail LSQUANT_LN_TAIL=1 -- --models big --batches 1 8 --impls lsquant_int8
bench base_lnplain LSQUANT_PDL_LN=0 -- --models base --batches 1 8 32 --impls lsquant_int8
bench base_crossbeams LSQUANT_CROSS_BEAMS=1 -- --models base --batches 32 128 --impls lsquant_int8
# the rough top-k's slices per row (latency-bound passes at ~4 programs an SM at 512 rows: NOTES_engine.md), against
# the default's 1 at batch 128 in base_new
bench base_slices4 LSQUANT_ROUGH_SLICES=4 -- --models base --batches 128 --impls lsquant_int8
# the tail at 128 and 512 rows (the bound raised), and the LayerNorm in the next GEMM's prologue (LSQUANT_LN_GEMM=1)
bench base_lntail512 LSQUANT_LN_TAIL=1 LSQUANT_LN_TAIL_MAX_M=512 -- --models base --batches 32 128 --impls lsquant_int8
bench base_lnfused LSQUANT_LN_GEMM=1 -- --models base --batches 1 8 --impls lsquant_int8
python3 scripts/round_table.py "$W" --base base_new > "$W/table.md" 2>&1; cat "$W/table.md"; pack
elif [ "$PART" = exact ]; then
# (~7 min; carry .whl) the int8 engine with fp32 activations (the setting whose greedy tokens match the fake-quant
# model): speed and memory against the default fp16 activations and the fp16 engine, side by side; then its GEMMs
# with the CUTLASS candidates (M >= 128: batch 32-128, beam 4)
bench base_default -- --models base --batches 1 8 32 128 --impls lsquant_int8 lsquant_fp16
bench base_int8fp32 -- --models base --batches 1 8 32 128 --impls lsquant_int8_fp32
bench base_int8fp32l16 -- --models base --batches 1 8 32 128 --impls lsquant_int8_fp32l16
bench big_default -- --models big --batches 1 8 32 --impls lsquant_int8 lsquant_fp16
bench big_int8fp32l16 -- --models big --batches 1 8 32 --impls lsquant_int8_fp32l16
python3 scripts/round_table.py "$W" --base base_default > "$W/table.md" 2>&1; cat "$W/table.md"; pack
if ls .whl/nvidia_cutlass-*.whl > /dev/null 2>&1; then
  python3 -m zipfile -e .whl/nvidia_cutlass-*.whl /tmp/lsq_cutlass_whl > /dev/null 2>&1
  run cutlass_build 240 env LSQUANT_CUTLASS_DIR=/tmp/lsq_cutlass_whl/cutlass_library/source python3 -c \
    "from lsquant.inference import gemm_cutlass as g; g.library(); print('built', g.library_path())"
  bench base_cutlass LSQUANT_CUTLASS_DIR=/tmp/lsq_cutlass_whl/cutlass_library/source -- --models base \
    --batches 32 128 --impls lsquant_int8
  python3 scripts/round_table.py "$W" --base base_default > "$W/table.md" 2>&1; cat "$W/table.md"; pack
fi
elif [ "$PART" = tests ]; then
# the cuda tests of the decode step's kernels and the engines (a cold Triton cache compiles for minutes)
run tests "${TEST_S:-540}" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_attention.py tests/test_engine_transformer.py \
  tests/test_pdl.py tests/test_layer_norm_quant.py tests/test_ln_gemm.py tests/test_rough_topk.py tests/test_decoding.py
grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20; tail -3 "$W/tests.log"
elif [ "$PART" = final ]; then
# issue 5's grid at the defaults, one model per call (MODEL=base|big): batch 1-128, source 16/32/64, beam 4 and
# sampling, the int8 and fp16 engines, PyTorch fp16 (the model's own decoding) and Hugging Face Marian fp16
run "engine_final_${MODEL:-base}" "${FINAL_S:-420}" python3 bench/bench_engine.py --graph on --models "${MODEL:-base}" \
  --out "$W/engine_final_${MODEL:-base}.csv" --impls lsquant_int8 lsquant_fp16 pytorch_fp16 hf_marian_fp16
grep -v "^\[" "$W/engine_final_${MODEL:-base}.log" | grep "tok/s" | sed 's/^/   /'; pack
elif [ "$PART" = memory ]; then
# (~4 min) what the tuned int8 engine holds after a batch-128 request at source 64 (~256 MB more than at 16 in
# the final grid), its live blocks summed by owner; then the sampling rows with engines built for sampling
# (beam_size 1, bench_engine's default since the final grid) against PyTorch
run diag_memory 150 python3 scripts/diag_memory.py --batch 128 --tune --src-lens 16 64 --top 16
grep -v "^\[" "$W/diag_memory.log" | tail -40
for m in base big; do
  run "engine_sample_$m" 200 python3 bench/bench_engine.py --graph on --models $m --methods sample \
    --out "$W/engine_sample_$m.csv" --impls lsquant_int8 lsquant_fp16 pytorch_fp16
  grep -v "^\[" "$W/engine_sample_$m.log" | grep "tok/s" | sed 's/^/   /'
done
pack
elif [ "$PART" = early ]; then
# (~8 min) the tiled GEMM with its epilogue's loads before the main loop (LSQUANT_EARLY_EPI=1) against after it (=0),
# in two interleaved A/B pairs (runs of one configuration differ by up to 8%), after its cuda tests and the tuner's
# (candidates now verified with the residual where the engine adds one)
run tests 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gemm.py tests/test_pdl.py \
  tests/test_engine_transformer.py -k "variants_exact or residual or tune or candidate or pdl"
grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20; tail -1 "$W/tests.log"
for pair in 1 2; do
  bench "base_plain$pair" LSQUANT_EARLY_EPI=0 -- --models base --batches 1 8 32 128 --impls lsquant_int8
  bench "base_early$pair" LSQUANT_EARLY_EPI=1 -- --models base --batches 1 8 32 128 --impls lsquant_int8
done
# the default: the tuner times the two best tiled configs both ways and keeps the faster
bench base_tuned -- --models base --batches 1 8 32 128 --impls lsquant_int8 lsquant_fp16
python3 scripts/round_table.py "$W" --base base_plain1 > "$W/table.md" 2>&1; cat "$W/table.md"; pack
elif [ "$PART" = close ]; then
# the cuda tests of what changed since the early round (the residual on every backend and PDL, which its 240 s cut
# off; the cross-attention kernels with int8 K/V; the engines, whose int8 one now stores the cross K/V in int8),
# then per model (MODELS="base big") the int8 and fp16 engines over issue 5's grid (beam 4 with 4-beam engines,
# sampling with 1-beam engines) at the defaults, and PyTorch fp16 at batch 32 and 128 (where memory was missed)
# side by side; TESTS=0 skips the tests
if [ "${TESTS:-1}" = 1 ]; then
  run tests "${TEST_S:-200}" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_attention.py \
    tests/test_engine_transformer.py tests/test_gemm.py tests/test_pdl.py \
    -k "cross_attention_kernel_cuda or cuda_engines_match or cuda_graphs or tune_picks or pdl or residual_every or residual_errors"
  grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20; tail -1 "$W/tests.log"
fi
for m in ${MODELS:-base big}; do
  run "engine_close_$m" "${FINAL_S:-300}" python3 bench/bench_engine.py --graph on --models "$m" \
    --out "$W/engine_close_$m.csv" --impls lsquant_int8 lsquant_fp16
  grep -v "^\[" "$W/engine_close_$m.log" | grep "tok/s" | sed 's/^/   /'
  run "engine_close_pt_$m" 150 python3 bench/bench_engine.py --models "$m" --batches 32 128 \
    --out "$W/engine_close_pt_$m.csv" --impls pytorch_fp16
  grep -v "^\[" "$W/engine_close_pt_$m.log" | grep "tok/s" | sed 's/^/   /'
  # the int8 engine sized for each source length (max_src_len = S), at the batches where memory was missed
  run "engine_close_each_$m" 150 python3 bench/bench_engine.py --graph on --models "$m" --batches 32 128 \
    --engine-src each --out "$W/engine_close_each_$m.csv" --impls lsquant_int8
  grep -v "^\[" "$W/engine_close_each_$m.log" | grep "tok/s" | sed 's/^/   /'
done
pack
elif [ "$PART" = lnpdl_quick ]; then
# lnpdl in ~2 min: the LayerNorm's PDL cuda tests, base at batch 1 and 8 (int8 both ways, fp16 at the default)
run tests 90 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_pdl.py tests/test_engine_transformer.py -k "layernorm or pdl"
grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20
bench base_lnpdl -- --models base --batches 1 8 --impls lsquant_int8 lsquant_fp16
bench base_lnplain LSQUANT_PDL_LN=0 -- --models base --batches 1 8 --impls lsquant_int8
python3 scripts/round_table.py "$W" > "$W/table.md" 2>&1; cat "$W/table.md"; pack
elif [ "$PART" = followup ]; then
# the engines at their defaults (PDL on, LayerNorm not fused) after the pass-2 change of rough_topk._candidates
# (its scan only in tiles where a value qualifies): base beam/sample at 8, 32 and 128, big at 1, 8 and 32 (run E
# measured big with the LayerNorm fused only), and big with it fused at 8 and 32 for comparison
run tests 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_rough_topk.py tests/test_pdl.py
grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20
bench base_default -- --models base --batches 8 32 128 --impls lsquant_int8 lsquant_fp16
bench big_default -- --models big --batches 1 8 32 --impls lsquant_int8 lsquant_fp16
bench big_lnfused LSQUANT_LN_GEMM=1 -- --models big --batches 8 32 --impls lsquant_int8
run profile128 90 env LSQUANT_PDL=0 python3 bench/profile_engine.py --batch 128 --top 16 --out "$W/profile128.csv"
grep -A12 "^lsquant_" "$W/profile128.log" | grep -v "^--"
python3 scripts/round_table.py "$W" > "$W/table.md" 2>&1; cat "$W/table.md"; pack
else
# the headers straight from the wheel (a zip): no dependence on which interpreter `pip` installs into
python3 -m zipfile -e .whl/nvidia_cutlass-*.whl /tmp/lsq_cutlass_whl > "$W/cutlass_install.log" 2>&1
export LSQUANT_CUTLASS_DIR="/tmp/lsq_cutlass_whl/cutlass_library/source"
run cutlass_build 240 python3 -c "from lsquant.inference import gemm_cutlass as g; print('available', g.available(), g.include_dirs(), g.nvcc()); \
g.library(); print('built', g.library_path())"
run cutlass_tests 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gemm_cutlass.py
grep -E "^(FAILED|ERROR)" "$W/cutlass_tests.log" | head -10
run gemm_bench 330 python3 bench/bench_gemm.py --m ${GEMM_M:-2048 8192 16384} --out "$W/gemm.csv" --cache "$W/tune.json"
tail -8 "$W/gemm_bench.log"
if [ -n "${GEMM_RETIME_M:-}" ]; then   # a second, independent run of those M: how far the rows move between runs
  run gemm_retime 150 python3 bench/bench_gemm.py --m $GEMM_RETIME_M --out "$W/gemm_retime.csv" --cache "$W/tune2.json"
  grep -E "x bf16" "$W/gemm_retime.log" | head -30
fi
fi
rm -rf "$W"
