#!/usr/bin/env bash
# int8 GEMM on the GPU machine: build, CUDA tests, benchmark, a small `lsquant tune`; everything under $OUT.
#
#   bash scripts/gpu_gemm.sh [quick|test|bench|all]     (repo root as cwd; $OUT an output folder)
#
#   quick  (default) build + smoke + pytest -m cuda tests/test_gemm.py + small `lsquant tune` + benchmark
#          --quick (Transformer-big shapes, M in 2048/8192/8): about 5-7 minutes with a cold build
#   test   build + smoke + tests + small `lsquant tune`
#   bench  build + smoke + the full benchmark grid (about 4-6 minutes once the build is cached: carry
#          .torch_ext from an earlier call)
#   all    test + full benchmark (over 10 minutes: split into `test` and `bench` where a command is limited)
#
# Outputs in $OUT, all prefixed gemm_: gemm_env.txt, gemm_build.log, gemm_smoke.log, gemm_pytest.log,
# gemm_pytest.xml, gemm_tune_cli.log, gemm_bench.log, gemm_<gpu>.csv (or gemm_<gpu>_quick.csv),
# gemm_tuning.json (the tuning cache the benchmark filled), gemm_status.txt (one line per stage with its exit
# code). Every stage runs even if an earlier one failed (a broken Triton or cuBLASLt backend is logged by the
# tuner and skipped); the script's exit code is the first failure's.
#
# To reuse the JIT build and Triton's kernel cache in a later call, carry .torch_ext (git-ignored).
set -u -o pipefail
export PYTHONUNBUFFERED=1
MODE="${1:-quick}"
OUT="${OUT:-$PWD/.gpu_out}"
mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_ext}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.torch_ext/triton}"
export LSQUANT_GEMM_CACHE="$OUT/gemm_tuning.json"
export MAX_JOBS="${MAX_JOBS:-8}"
mkdir -p "$TORCH_EXTENSIONS_DIR" "$TRITON_CACHE_DIR"
PY="${PYTHON:-python3}"
STATUS="$OUT/gemm_status.txt"
: > "$STATUS"
FIRST_FAIL=0
T0=$(date +%s)

. "$(dirname "$0")/gpu_stage.sh"   # stage NAME TIMEOUT_S LOG -- command...

{
  echo "date: $(date -u)"; echo "mode: $MODE"; echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  "$PY" - <<'EOF' 2>&1
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF
} > "$OUT/gemm_env.txt" 2>&1
cat "$OUT/gemm_env.txt"

# lsquant.csrc (the CUDA sources) is importable only from an installed package: install in place if needed.
if ! "$PY" -c "import lsquant.csrc" >/dev/null 2>&1; then
  stage install 300 gemm_install.log -- "$PY" -m pip install --no-deps --no-build-isolation -e .
fi

# cublasLt.h: the CUDA toolkit's, else the one PyTorch's pip dependency nvidia-cublas ships (nvcc's host
# preprocessor honours CPATH). Without any, the extension still builds and the tuner uses Triton only.
CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
if [ ! -f "$CUDA_INC/cublasLt.h" ]; then
  WHEEL_INC=$("$PY" -c "
import glob, os
try:
    import nvidia
    hits = [h for d in nvidia.__path__ for h in glob.glob(os.path.join(d, '*', 'include', 'cublasLt.h'))]
    print(os.path.dirname(hits[0]) if hits else '')
except Exception:
    print('')" 2>/dev/null)
  echo "no $CUDA_INC/cublasLt.h; nvidia-cublas include: '${WHEEL_INC}'" | tee -a "$OUT/gemm_env.txt"
  [ -n "$WHEEL_INC" ] && export CPATH="$WHEEL_INC${CPATH:+:$CPATH}"
fi

stage build 420 gemm_build.log -- "$PY" -m lsquant build

stage smoke 180 gemm_smoke.log -- "$PY" - <<'EOF'
# A few direct calls, so that a failure is explained here before the tests and the benchmark run; each
# section is independent.
import time, traceback
import torch
from lsquant.ops.build import load
from lsquant.inference import gemm as G, gemm_tuner as T

def section(title, fn):
    print(f"-- {title}", flush=True)
    try:
        fn()
    except Exception:
        print(f"   FAILED: {title}"); traceback.print_exc()

ext = load()
a = torch.randint(-127, 128, (1000, 1024), dtype=torch.int8, device="cuda")
b = torch.randint(-127, 128, (4096, 1024), dtype=torch.int8, device="cuda")
ref = torch._int_mm(a, b.t())

def versions():
    v = ext.gemm_int8_cublaslt_version()
    print("   cublasLt version", v, "" if v else "(0: BUILT WITHOUT cublasLt.h, cuBLASLt candidates disabled)")
    print("   env key", T.env_key())

def exact():
    print("   default int8_mm == torch._int_mm:", torch.equal(G.int8_mm(a, b), ref))

def algos():
    h = ext.gemm_int8_algos(1000, 4096, 1024, 4096, G.WORKSPACE_BYTES, 32, False)
    print(f"   heuristic: {len(h)} algos; first: {h[:3]}")
    t = time.perf_counter()
    e = ext.gemm_int8_algos(1000, 4096, 1024, 4096, G.WORKSPACE_BYTES, 2048, True)
    print(f"   enumerated: {len(e)} valid configs in {time.perf_counter() - t:.3f} s; "
          f"ids {sorted(set(x[0] for x in e))}")

def cands():
    from lsquant.inference import gemm_triton
    print("   triton available:", gemm_triton.available())
    t = time.perf_counter()
    cs = T.candidates(1000, 4096, 1024, torch.bfloat16) + T.chunked_candidates(8192, 4096, [])
    print(f"   {len(cs)} candidates in {time.perf_counter() - t:.3f} s")
    layer = G.Int8Linear(b, w_clip=torch.full((4096,), 0.05, device="cuda"), x_clip=2.0,
                         bias=torch.randn(4096, device="cuda"), out_dtype=torch.bfloat16)
    r = G.epilogue_ref(ref, layer.alpha, layer.bias32, "none", torch.bfloat16)
    for c in cs:
        try:
            t = time.perf_counter()
            y = G.run_choice(layer, a, c)
            torch.cuda.synchronize()
            err = (y.float() - r.float()).abs().max().item()
            print(f"   {G.choice_name(c):<44} max abs err {err:.3g}  first call {time.perf_counter() - t:.2f} s")
        except Exception:
            print(f"   {G.choice_name(c):<44} FAILED"); traceback.print_exc()

def tune_one():
    t = time.perf_counter()
    r = T.tune_shape(2048, 4096, 1024, torch.bfloat16)
    print(f"   tune_shape(2048, 4096, 1024): {r.name} {r.ms * 1e3:.1f} us (default {r.default_ms * 1e3:.1f} us, "
          f"{r.tops:.0f} TOPS) in {time.perf_counter() - t:.1f} s; rejected: {r.rejected}")
    for name, ms in sorted(r.timings.items(), key=lambda kv: kv[1]):
        print(f"     {name:<44} {ms * 1e3:9.1f} us")

for title, fn in [("versions", versions), ("exactness", exact), ("cuBLASLt algorithms", algos),
                  ("every candidate once", cands), ("one tuning", tune_one)]:
    section(title, fn)
EOF

if [ "$MODE" = all ] || [ "$MODE" = test ] || [ "$MODE" = quick ]; then
  stage pytest 400 gemm_pytest.log -- "$PY" -m pytest -m cuda tests/test_gemm.py -q -ra --durations=15 \
    --junitxml="$OUT/gemm_pytest.xml"
  stage tune_cli 100 gemm_tune_cli.log -- "$PY" -m lsquant tune --model transformer-base --tokens 1,512 \
    --cache "$OUT/gemm_tuning_cli.json" --no-progress
fi

GPU_SLUG=$("$PY" -c "import torch;n=torch.cuda.get_device_name();print(''.join(c if c.isalnum() else '_' for c in n).strip('_').lower())" 2>/dev/null || echo gpu)
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  stage bench 480 gemm_bench.log -- "$PY" bench/bench_gemm.py --out "$OUT/gemm_${GPU_SLUG}.csv" \
    --cache "$OUT/gemm_tuning.json"
elif [ "$MODE" = quick ]; then
  stage bench 200 gemm_bench.log -- "$PY" bench/bench_gemm.py --quick --out "$OUT/gemm_${GPU_SLUG}_quick.csv" \
    --cache "$OUT/gemm_tuning.json"
fi

echo "total $(( $(date +%s) - T0 )) s; first failure rc=$FIRST_FAIL" | tee -a "$STATUS"
exit "$FIRST_FAIL"
