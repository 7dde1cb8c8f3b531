"""Quantize kernels vs PyTorch's own ops: time and GB/s (bytes each op must move / time).

    python bench/bench_quantize.py [--numel 67108864] [--out bench/results/quantize_<gpu>.csv]

Compared, per dtype: lsquant's CUDA kernel; PyTorch eager (the reference expression, which launches
several kernels and materialises fp32 temporaries; and torch.fake_quantize_per_tensor_affine /
torch._fake_quantize_learnable_per_tensor_affine, PyTorch's fused fake-quant with and without the clip
gradient); and torch.compile of the reference expression.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, gpu_slug, time_cuda, warm_gpu, write_rows  # noqa: E402

from lsquant import ops  # noqa: E402
from lsquant.quant import ref  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 26, help="elements per tensor (default 2^26: 128 MB in fp16)")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/quantize_<gpu>.csv)")
    args = ap.parse_args()
    out = args.out or f"bench/results/quantize_{gpu_slug()}.csv"
    info = env_info()
    warm_gpu()
    n = args.numel
    clip = torch.tensor(2.5, device="cuda")
    scale = (clip / 127).item()
    rows = []
    ref_fq_c = torch.compile(ref.fake_quantize_ref)
    ref_q_c = torch.compile(ref.quantize_ref)

    def fq_bwd_torch_learnable(x, gy, s):
        y = torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1, device="cuda"), -127, 127, 1.0)
        return torch.autograd.grad(y, (x, s), gy)

    ext = ops.load()

    def fq_bwd_ours(x, gy, c):  # the backward kernel alone (grad_x and the clip-gradient reduction)
        return ext.fake_quantize_bwd(gy, x, c, 1, x.numel())

    def fq_fwd_bwd_ours(x, gy, c):
        y = ops.fake_quantize(x, c)
        return torch.autograd.grad(y, (x, c), gy)

    def fq_bwd_ref(x, gy, c):
        return ref.fake_quantize_grad_ref(gy, x, c)

    fq_bwd_ref_c = torch.compile(fq_bwd_ref)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        e = torch.tensor([], dtype=dtype).element_size()
        xs = [(torch.randn(n, device="cuda") * 2).to(dtype) for _ in range(3)]
        qs = [ops.quantize(x, clip) for x in xs]
        gys = [torch.randn(n, device="cuda").to(dtype) for _ in range(3)]
        xgs = [x.clone().requires_grad_() for x in xs]   # leaves for the backward cases
        cases = {
            # kernel: (bytes moved, {impl: (fn, inputs)})
            "quantize": (n * (e + 1), {
                "lsquant": (lambda x: ops.quantize(x, clip), [(x,) for x in xs]),
                "torch_eager_ref": (lambda x: ref.quantize_ref(x, clip), [(x,) for x in xs]),
                "torch_compile_ref": (lambda x: ref_q_c(x, clip), [(x,) for x in xs]),
            }),
            "dequantize": (n * (e + 1), {
                "lsquant": (lambda q: ops.dequantize(q, clip, None, dtype), [(q,) for q in qs]),
                "torch_eager_ref": (lambda q: ref.dequantize_ref(q, clip, None, dtype), [(q,) for q in qs]),
            }),
            "fake_quantize_fwd": (n * 2 * e, {
                "lsquant": (lambda x: ops.fake_quantize(x, clip), [(x,) for x in xs]),
                "torch_eager_ref": (lambda x: ref.fake_quantize_ref(x, clip), [(x,) for x in xs]),
                "torch_compile_ref": (lambda x: ref_fq_c(x, clip), [(x,) for x in xs]),
                "torch_fake_quantize_per_tensor_affine": (
                    lambda x: torch.fake_quantize_per_tensor_affine(x, scale, 0, -127, 127), [(x,) for x in xs]),
            }),
            "fake_quantize_bwd": (n * 3 * e, {
                "lsquant": (fq_bwd_ours, [(x, gy, clip.reshape(1)) for x, gy in zip(xs, gys)]),
                "torch_eager_ref": (fq_bwd_ref, [(x, gy, clip) for x, gy in zip(xs, gys)]),
                "torch_compile_ref": (fq_bwd_ref_c, [(x, gy, clip) for x, gy in zip(xs, gys)]),
            }),
            # forward + backward through autograd, against PyTorch's learnable (LSQ) fake-quant
            "fake_quantize_fwd_bwd": (n * 5 * e, {
                "lsquant": (fq_fwd_bwd_ours, [(x, gy, clip.clone().requires_grad_()) for x, gy in zip(xgs, gys)]),
                "torch_learnable_fake_quantize": (
                    fq_bwd_torch_learnable,
                    [(x, gy, torch.tensor([scale], device="cuda", requires_grad=True)) for x, gy in zip(xgs, gys)]),
            }),
        }
        for kernel, (nbytes, impls) in cases.items():
            for impl, (fn, inputs) in impls.items():
                try:
                    ms = time_cuda(fn, inputs)
                    note = ""
                except Exception as exc:  # one PyTorch op may not support a dtype: record it, go on
                    ms, note = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                rows.append({**info, "kernel": kernel, "dtype": str(dtype).replace("torch.", ""), "numel": n,
                             "impl": impl, "ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 1),
                             "bytes": nbytes, "note": note})
                print(f"{kernel:18s} {rows[-1]['dtype']:9s} {impl:38s} {ms:8.4f} ms {rows[-1]['GB/s']:8.1f} GB/s {note}",
                      flush=True)
    write_rows(out, rows)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
