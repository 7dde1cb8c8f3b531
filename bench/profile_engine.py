"""Where a translation engine's time goes: one request profiled with torch.profiler, GPU kernel time grouped
into GEMMs, attention, LayerNorm, quantize/dequantize, decoding (log-softmax, top-k, sort, beam bookkeeping)
and the rest, next to the request's wall time (wall - GPU busy time = time the GPU waited for the host).

    python bench/profile_engine.py [--model base|big] [--batch 8] [--src-len 32] [--method beam|sample]
                                   [--out bench/results/engine_profile_<gpu>.csv]

Random weights from bench_engine.make_files (6+6 layers, vocabulary 32000, 32 new tokens forced). Kernel names are
matched with the patterns in CATEGORIES, first match wins; the CSV has one row per (engine, category) (kernel
empty) and one per listed kernel (its name cut at 120 characters, calls).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_gpu_bench, write_rows  # noqa: E402

from bench_engine import MODELS, NEW, VOCAB, make_files  # noqa: E402

from lsquant.inference.transformer_engine import QuantTransformer, Transformer as FloatEngine  # noqa: E402

# (category, regex over the lower-cased kernel name), first match wins
CATEGORIES = [
    ("attention", r"fmha|flash|attention|softmax_fwd|softmax_bwd|masked_softmax|sdpa|efficient_attention"),
    ("decoding", r"log_softmax|softmax|topk|sort|radix|scan|cumsum|argmax|gather_topk|bitonic|multinomial|beam_update|path_update|_threshold|_candidates|_finish|_rank"),
    ("gemm", r"gemm|gemv|matmul|mm_kernel|int8|cutlass|xmma|sm90|sm80|ampere|hopper|wgmma|cublas|splitk"),
    ("layernorm", r"layer_?norm|ln_fwd|ln_bwd"),
    ("quantize", r"quantiz|dequant"),
    ("embedding", r"embedding|embed_step|index_select|indexselect"),
    ("copy/elementwise", r"copy|elementwise|fill|vectorized|unrolled|reduce|where|index|cat|scatter"),
]


def categorise(name: str) -> str:
    n = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, n):
            return cat
    return "other"


def profile(engine, src: torch.Tensor, method: str) -> tuple[float, dict[str, float], int, dict]:
    """-> (wall ms of one request, {category: GPU ms}, kernel count, {kernel name: (calls, GPU ms)})"""
    run = lambda: engine.infer(src, method, max_len=NEW, min_len=NEW, top_k=4)  # noqa: E731
    with torch.inference_mode():
        for _ in range(2):   # warm-up: tuning lookups, graph capture, allocator
            run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            run()
            torch.cuda.synchronize()
    cats: dict[str, float] = {}
    kernels: dict[str, tuple[int, float]] = {}
    count = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            c = categorise(ev.name)
            cats[c] = cats.get(c, 0.0) + ev.device_time / 1e3
            n, ms = kernels.get(ev.name, (0, 0.0))
            kernels[ev.name] = (n + 1, ms + ev.device_time / 1e3)
            count += 1
    return wall, cats, count, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base", choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src-len", type=int, default=32)
    ap.add_argument("--method", default="beam", choices=["beam", "sample"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=12, help="kernels listed one by one (besides every decoding one)")
    args = ap.parse_args()
    out, info = start_gpu_bench("profile_engine.py", "engine_profile", args.out)
    tmp = Path(tempfile.mkdtemp())
    _, _, fp16, int8 = make_files(args.model, tmp)
    src = torch.randint(4, VOCAB, (args.batch, args.src_len), device="cuda")
    rows = []
    for impl, cls, path in (("lsquant_int8", QuantTransformer, int8), ("lsquant_fp16", FloatEngine, fp16)):
        eng = cls(path, max_batch_size=args.batch, beam_size=4)
        if eng.int8:   # as bench_engine.py measures it: GEMMs tuned for this batch and source length
            from lsquant.inference.gemm_tuner import TuningCache

            eng.tune([args.batch], args.src_len, cache=TuningCache(tmp / "gemm_tuning.json"), progress=False)
        wall, cats, n, kernels = profile(eng, src, args.method)
        gpu = sum(cats.values())
        print(f"{impl}: wall {wall:.2f} ms, GPU busy {gpu:.2f} ms ({100 * gpu / wall:.0f}% of wall), {n} kernels")
        common = {**info, "model": f"transformer-{args.model}", "impl": impl, "method": args.method,
                  "batch": args.batch, "src_len": args.src_len, "new_tokens": NEW, "wall_ms": round(wall, 3),
                  "gpu_busy_ms": round(gpu, 3), "kernels": n}
        for c, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
            print(f"   {c:18s} {ms:8.3f} ms  {100 * ms / gpu:5.1f}% of GPU time")
            rows.append({**common, "category": c, "kernel": "", "calls": "", "ms": round(ms, 3),
                         "share_of_gpu": round(ms / gpu, 4)})
        # the kernels one by one (the decoding ones all, the rest the top args.top): which kernel a category's
        # time is in, e.g. the rough top-k's two passes against the bookkeeping
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
        shown = [kv for i, kv in enumerate(ranked) if i < args.top or categorise(kv[0]) == "decoding"]
        for name, (calls, ms) in shown:
            print(f"     {ms:8.3f} ms {calls:6d} calls {1e3 * ms / calls:8.1f} us  [{categorise(name)}] {name[:90]}")
            rows.append({**common, "category": categorise(name), "kernel": name[:120], "calls": calls,
                         "ms": round(ms, 3), "share_of_gpu": round(ms / gpu, 4)})
        del eng
        torch.cuda.empty_cache()
    write_rows(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
