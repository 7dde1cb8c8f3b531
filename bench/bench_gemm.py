"""int8 GEMM with its epilogue vs bf16 cuBLAS and torch._int_mm, over Transformer shapes.

    python bench/bench_gemm.py [--quick] [--out bench/results/gemm_<gpu>.csv] [--cache PATH]

Per row (M tokens x one linear of one model): bf16 ``torch.matmul(x, w.t())`` (no bias: the plain GEMM);
``torch._int_mm(x_q, w_q.t())`` (int32 out, no epilogue; it refuses M <= 16, so those rows time it on M
padded to 32, flagged in ``int_mm_note``); lsquant default (cuBLASLt heuristic algorithm + CUDA epilogue);
lsquant tuned (the tuner's choice). Both lsquant columns produce bf16 with the full epilogue: per-channel
weight scale x activation scale, bias. TOPS = 2 M N K / time.

Timing (lsquant.inference.gemm_tuner.time_fn, the same for every column): each measurement is ``iters``
back-to-back calls captured in one CUDA graph, inputs rotating over 2-4 sets (more than 2x the 50 MB L2
where they fit), median of 5 measurements, after warm-up. Inputs: random non-zero int8, bf16 N(0, 1).
The lsquant columns launch as the library does: on sm_90 the Triton kernels with programmatic dependent launch
(column ``pdl``; LSQUANT_PDL=0 times them without), so a call's launch and weight prefetch overlap the call before
it, as in the engines' decode steps; cuBLAS, cuBLASLt and CUTLASS calls launch ordinarily.
Shapes shared by two models (Transformer-big and GPT-2 medium) are timed once and written for both.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, gpu_slug, warm_gpu, write_rows  # noqa: E402

from lsquant.inference import gemm as G  # noqa: E402
from lsquant.inference import gemm_tuner as T  # noqa: E402

MODELS = {  # name: hidden, ffn
    "transformer-base": (512, 2048),
    "transformer-big": (1024, 4096),
    "bert-base": (768, 3072),
    "gpt2-medium": (1024, 4096),
}
VOCAB = 32000
# large M first: the targets are set on M >= 2048, and a run cut short keeps those rows
M_GRID = [2048, 8192, 16384, 512, 64, 8, 1]
M_QUICK = [2048, 8192, 8]


def shapes_for(h: int, ffn: int) -> list[tuple[str, int, int]]:
    return [("qkv", 3 * h, h), ("attn_out", h, h), ("ffn1", ffn, h), ("ffn2", h, ffn), ("vocab", VOCAB, h)]


def bench_shape(M: int, N: int, K: int, cache: T.TuningCache, iters: int, backends) -> dict:
    out_dtype = torch.bfloat16
    bytes_per_set = M * K + N * K + 2 * M * N
    n_sets = T.n_rotating_sets(bytes_per_set)
    prob = T.Problem(M, N, K, out_dtype, "none", True, n_sets=n_sets)
    res = {}
    g = torch.Generator(device="cuda").manual_seed(1)
    xb = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(n_sets)]
    wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(n_sets)]
    res["bf16_ms"] = T.time_fn(lambda x, w: torch.matmul(x, w.t()), list(zip(xb, wb)), iters=iters)
    del xb, wb

    Mi = M if M > 16 else 32
    res["int_mm_note"] = "" if M > 16 else "M padded to 32"
    try:
        xi = [torch.nn.functional.pad(x, (0, 0, 0, Mi - M)) if Mi != M else x for x in prob.xs]
        res["int_mm_ms"] = T.time_fn(lambda x, w: torch._int_mm(x, w.t()),
                                     [(xi[i], prob.layers[i].weight) for i in range(n_sets)], iters=iters)
    except Exception as e:
        res["int_mm_ms"] = float("nan")
        res["int_mm_note"] = f"failed: {type(e).__name__}"

    def lsq_args(choice):
        return [(prob.layers[i], prob.xs[i], choice) for i in range(n_sets)]

    res["default_ms"] = T.time_fn(G.run_choice, lsq_args(G.default_choice(M)), iters=iters)
    t0 = time.perf_counter()
    r = T.tune_shape(M, N, K, out_dtype, "none", True, backends=backends, problem=prob)
    res["tune_s"] = time.perf_counter() - t0
    # re-timed like the other columns (the tuner's own number is the minimum of a few noisy medians)
    res["tuned_ms"] = T.time_fn(G.run_choice, lsq_args(r.choice), iters=iters)
    res["chosen"] = r.name
    res["rejected"] = len(r.rejected)
    cache.put(M, N, K, out_dtype, r.choice, ms=round(res["tuned_ms"], 5), default_ms=round(res["default_ms"], 5),
              M_tuned=M)
    return res


def gmean(v):
    v = [x for x in v if x == x and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"M in {M_QUICK}, Transformer-big shapes only")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/gemm_<gpu>.csv)")
    ap.add_argument("--cache", default=None, help="tuning cache to write (default: the user's cache)")
    ap.add_argument("--iters", type=int, default=20, help="calls per timed graph (default 20)")
    ap.add_argument("--backends", default=",".join(T.BACKENDS))
    ap.add_argument("--m", type=int, nargs="+", default=None, help=f"token counts (default {M_GRID})")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    out = args.out or f"bench/results/gemm_{gpu_slug()}.csv"
    info = env_info()
    from lsquant.ops.build import load

    info["cublaslt"] = str(load().gemm_int8_cublaslt_version())
    from lsquant.inference import pdl

    # the Triton kernels' launch mode (the library's default on sm_90: PDL, LSQUANT_PDL=0 turns it off): with it,
    # a call in the timed graph is scheduled while the one before it runs and prefetches its weights into L2
    info["pdl"] = "on" if pdl.enabled(torch.device("cuda", torch.cuda.current_device())) else "off"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = ""
    cache = T.TuningCache(args.cache) if args.cache else T.global_cache()
    models = {"transformer-big": MODELS["transformer-big"]} if args.quick else MODELS
    m_list = args.m or (M_QUICK if args.quick else M_GRID)
    backends = tuple(args.backends.split(","))
    warm_gpu(2.0)
    done: dict[tuple[int, int, int], dict] = {}
    rows = []
    t_start = time.perf_counter()
    for M in m_list:
        for model, (h, ffn) in models.items():
            for shape, N, K in shapes_for(h, ffn):
                key = (M, N, K)
                if key not in done:
                    try:
                        done[key] = bench_shape(M, N, K, cache, args.iters, backends)
                    except Exception as e:  # one broken shape must not lose the rest of the grid
                        traceback.print_exc()
                        done[key] = {"error": f"{type(e).__name__}: {e}"}
                    try:
                        cache.save()
                    except Exception as e:
                        print(f"warning: tuning cache not saved: {e}", file=sys.stderr)
                r = done[key]
                if "error" in r:
                    print(f"{model:<17} {shape:<8} M={M:<6} N={N:<6} K={K:<5} ERROR {r['error']}", flush=True)
                    continue
                ops = 2.0 * M * N * K
                row = {**info, "M": M, "N": N, "K": K, "model": model, "shape": shape, "out": "bf16",
                       "epilogue": "scale+bias",
                       "bf16_ms": round(r["bf16_ms"], 5), "int_mm_ms": round(r["int_mm_ms"], 5),
                       "lsq_default_ms": round(r["default_ms"], 5), "lsq_tuned_ms": round(r["tuned_ms"], 5),
                       "chosen_kernel": r["chosen"],
                       "tuned_tops": round(ops / (r["tuned_ms"] * 1e-3) / 1e12, 1),
                       "bf16_tflops": round(ops / (r["bf16_ms"] * 1e-3) / 1e12, 1),
                       "int_mm_tops": round(ops / (r["int_mm_ms"] * 1e-3) / 1e12, 1) if r["int_mm_ms"] == r[
                           "int_mm_ms"] else float("nan"),
                       "tuned_vs_bf16": round(r["bf16_ms"] / r["tuned_ms"], 3),
                       "tuned_vs_int_mm": round(r["int_mm_ms"] / r["tuned_ms"], 3),
                       "default_vs_bf16": round(r["bf16_ms"] / r["default_ms"], 3),
                       "tuned_vs_default": round(r["default_ms"] / r["tuned_ms"], 3),
                       "int_mm_note": r["int_mm_note"], "tune_s": round(r["tune_s"], 2)}
                rows.append(row)
                write_rows(out, [row])  # row by row: a run cut short keeps what it measured
                print(f"{model:<17} {shape:<8} M={M:<6} N={N:<6} K={K:<5} bf16 {r['bf16_ms']:.4f}  "
                      f"_int_mm {r['int_mm_ms']:.4f}  default {r['default_ms']:.4f}  tuned {r['tuned_ms']:.4f} "
                      f"({row['tuned_tops']} TOPS, {row['tuned_vs_bf16']}x bf16) {r['chosen']}", flush=True)
    elapsed = time.perf_counter() - t_start
    big = [r for r in rows if r["M"] >= 2048]
    print(f"\n{len(rows)} rows -> {out} ({elapsed:.0f} s)")
    if big:
        print(f"M >= 2048 ({len(big)} rows): tuned vs bf16 cuBLAS geomean {gmean([r['tuned_vs_bf16'] for r in big]):.3f}x "
              f"(target >= 1.4), vs torch._int_mm {gmean([r['tuned_vs_int_mm'] for r in big]):.3f}x (target >= 1.3), "
              f"default vs bf16 {gmean([r['default_vs_bf16'] for r in big]):.3f}x")
    if rows:
        worst = min(rows, key=lambda r: r["tuned_vs_bf16"])
        slower = [r for r in rows if r["tuned_vs_bf16"] < 1.0]
        print(f"worst row vs bf16: {worst['tuned_vs_bf16']}x at {worst['model']} {worst['shape']} M={worst['M']} "
              f"({worst['chosen_kernel']}); rows slower than bf16: {len(slower)} of {len(rows)} (target 0)")
        kinds = {}
        for r in rows:
            k = r["chosen_kernel"].split(":")[0]
            kinds[k] = kinds.get(k, 0) + 1
        print("chosen kernel families:", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
