#!/usr/bin/env bash
# Transformer training layers (issue 3) on the GPU machine: build, a smoke run of every kernel, the `cuda` tests,
# one compute-sanitizer pass, the benchmark; everything under $OUT (prefix layers_).
#
#   bash scripts/gpu_layers.sh [quick|test|bench|all]      (repo root as cwd; $OUT an output folder)
#
#   quick (default)  build + smoke + kernel tests + layer tests + sanitizer + benchmark --quick  (~6 min cold)
#   test             build + smoke + kernel tests + layer tests + sanitizer
#   bench            build + smoke + the full benchmark (~5 min of GPU time once the build is cached)
#   layerbench       build + smoke + the layer rows of the benchmark (no per-kernel rows)
#   all              test + full benchmark (over 10 minutes: split into `test` and `bench` where limited)
#
# Outputs: layers_env.txt, layers_build.log, layers_smoke.log, layers_pytest_ops.log/.xml,
# layers_pytest_layers.log/.xml, layers_sanitizer.log, layers_bench.log, layers_<gpu>.csv, layers_status.txt
# (one line per stage with its exit code). Every stage runs even if an earlier one failed; the exit code is the
# first failure's. Carry .torch_ext (git-ignored) to reuse the JIT build in a later call.
set -u -o pipefail
export PYTHONUNBUFFERED=1
MODE="${1:-quick}"
OUT="${OUT:-$PWD/.gpu_out}"
mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_ext}"
export MAX_JOBS="${MAX_JOBS:-8}"
mkdir -p "$TORCH_EXTENSIONS_DIR"
PY="${PYTHON:-python3}"
STATUS="$OUT/layers_status.txt"
: > "$STATUS"
FIRST_FAIL=0
T0=$(date +%s)

. "$(dirname "$0")/gpu_stage.sh"   # stage NAME TIMEOUT_S LOG -- command...

{
  echo "date: $(date -u)"; echo "mode: $MODE"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1
} > "$OUT/layers_env.txt" 2>&1
cat "$OUT/layers_env.txt"

if ! "$PY" -c "import lsquant.csrc" >/dev/null 2>&1; then
  stage install 300 layers_install.log -- "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

stage build 480 layers_build.log -- "$PY" -m lsquant build

# One direct call per kernel (fwd and bwd, fp16 and bf16), each in its own try: a broken kernel is named here
# with its error before the tests run, and the others still run.
stage smoke 180 layers_smoke.log -- "$PY" - <<'PYEOF'
import math, traceback, torch
from lsquant import ops
torch.manual_seed(0)
dev = "cuda"
failed = 0
def case(name, fn, *refs):
    global failed
    try:
        out, ref = fn()
        torch.cuda.synchronize()
        err = (out.double() - ref.double()).abs().max().item()
        print(f"  ok   {name:<40} max abs diff vs reference {err:.3g}")
    except Exception:
        failed += 1
        print(f"  FAIL {name}")
        traceback.print_exc()
for dt in (torch.float16, torch.bfloat16):
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt)
    x, w, b = r(97, 1000), r(1000), r(1000)
    case(f"layer_norm fwd {dt}", lambda: (ops.layer_norm(x, w, b), ops.layer_norm_ref(x, w, b)))
    def ln_bwd():
        xl = x.clone().requires_grad_(); ops.layer_norm(xl, w, b).sum().backward()
        xr = x.float().requires_grad_(); ops.layer_norm_ref(xr, w.float(), b.float()).sum().backward()
        return xl.grad, xr.grad
    case(f"layer_norm bwd {dt}", ln_bwd)
    y, bias = r(33, 768), r(768)
    case(f"bias_act_dropout {dt}", lambda: (ops.bias_act_dropout(y, bias, "gelu", 0.1, 3), ops.bias_act_dropout_ref(y, bias, "gelu", 0.1, 3)))
    def bact_bwd():
        yl = y.clone().requires_grad_(); ops.bias_act_dropout(yl, bias, "relu", 0.1, 3).sum().backward()
        yr = y.float().requires_grad_(); ops.bias_act_dropout_ref(yr, bias.float(), "relu", 0.1, 3).sum().backward()
        return yl.grad, yr.grad
    case(f"bias_act_dropout bwd {dt}", bact_bwd)
    res = r(33, 768)
    case(f"bias_dropout_residual {dt}", lambda: (ops.bias_dropout_residual(y, bias, res, 0.1, 4), ops.bias_dropout_residual_ref(y, bias, res, 0.1, 4)))
    s = r(2, 3, 7, 97)
    m = torch.zeros(2, 97, dtype=torch.bool, device=dev); m[1, 50:] = True
    case(f"masked_softmax {dt}", lambda: (ops.masked_softmax(s, m, True, 0.1, 5, scale=0.3), ops.masked_softmax_ref(s, m, True, 0.1, 5, scale=0.3)))
    def sm_bwd():
        sl = s.clone().requires_grad_(); (ops.masked_softmax(sl, m, False, 0.0, 0, scale=0.3) * s).sum().backward()
        sr = s.float().requires_grad_(); (ops.masked_softmax_ref(sr, m, False, 0.0, 0, scale=0.3) * s.float()).sum().backward()
        return sl.grad, sr.grad
    case(f"masked_softmax bwd {dt}", sm_bwd)
    tok = torch.randint(0, 100, (3, 9), device=dev); table, pos = r(100, 256), r(20, 256)
    case(f"embedding {dt}", lambda: (ops.embedding(tok, table, pos, 16.0, 1, 2, 0.1, 6), ops.embedding_ref(tok, table, pos, 16.0, 1, 2, 0.1, 6)))
    logits, t = r(13, 1001), torch.randint(0, 1001, (13,), device=dev)
    case(f"cross_entropy {dt}", lambda: (ops.cross_entropy(logits, t, 0.1)[0], ops.cross_entropy_ref(logits, t, 0.1)[0]))
    def ce_bwd():
        ll = logits.clone().requires_grad_(); ops.cross_entropy(ll, t, 0.1)[0].sum().backward()
        lr = logits.float().requires_grad_(); ops.cross_entropy_ref(lr, t, 0.1)[0].sum().backward()
        return ll.grad, lr.grad
    case(f"cross_entropy bwd {dt}", ce_bwd)
    clip = torch.tensor(2.0, device=dev)
    case(f"layer_norm+fake_quant {dt}", lambda: (ops.layer_norm_fake_quant(x, w, b, 1e-5, clip)[1],
                                                 ops.fake_quantize_ref(ops.layer_norm(x, w, b), clip)))
    case(f"bias_act+fake_quant {dt}", lambda: (ops.bias_act_dropout_fake_quant(y, bias, "gelu", 0.1, 3, clip),
                                               ops.fake_quantize_ref(ops.bias_act_dropout(y, bias, "gelu", 0.1, 3), clip)))
print(f"smoke: {failed} failure(s)")
raise SystemExit(1 if failed else 0)
PYEOF

if [ "$MODE" = all ] || [ "$MODE" = test ] || [ "$MODE" = quick ]; then
  stage pytest_ops 420 layers_pytest_ops.log -- "$PY" -m pytest -m cuda tests/test_layer_ops_cuda.py -q -ra \
    --durations=10 --junitxml="$OUT/layers_pytest_ops.xml"
  stage pytest_layers 300 layers_pytest_layers.log -- "$PY" -m pytest -m cuda tests/test_layers_cuda.py tests/test_heads.py -q -ra \
    --durations=10 --junitxml="$OUT/layers_pytest_layers.xml"
  # Out-of-bounds accesses: one pass of a subset of the kernel tests (odd, non-vectorisable shapes and small
  # vectorised ones, both dtypes, forward and backward) under memcheck; --error-exitcode makes a finding fail.
  if command -v compute-sanitizer >/dev/null 2>&1; then
    stage sanitizer 300 layers_sanitizer.log -- compute-sanitizer --tool memcheck --error-exitcode 99 \
      "$PY" -m pytest -m cuda tests/test_layer_ops_cuda.py -q -p no:cacheprovider \
      -k "1001 or 5-3-13 or 3-2-1-40 or 6-13 or 7-768 or fully_masked"
  else
    echo "compute-sanitizer not found: skipped" | tee -a "$STATUS"
  fi
fi

GPU_SLUG=$("$PY" -c "import torch;n=torch.cuda.get_device_name();print(''.join(c if c.isalnum() else '_' for c in n).strip('_').lower())" 2>/dev/null || echo gpu)
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  stage bench 540 layers_bench.log -- "$PY" bench/bench_layers.py --out "$OUT/layers_${GPU_SLUG}.csv"
elif [ "$MODE" = layerbench ]; then   # the layer rows only (every size and dtype), not the per-kernel rows
  stage bench ${LAYERBENCH_S:-330} layers_bench.log -- "$PY" bench/bench_layers.py --only layers --out "$OUT/layers_${GPU_SLUG}.csv"
elif [ "$MODE" = quick ]; then
  stage bench 300 layers_bench.log -- "$PY" bench/bench_layers.py --quick --out "$OUT/layers_${GPU_SLUG}_quick.csv"
fi

echo "total $(( $(date +%s) - T0 )) s; first failure rc=$FIRST_FAIL" | tee -a "$STATUS"
exit "$FIRST_FAIL"
