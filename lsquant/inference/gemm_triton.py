"""Triton int8 GEMM with the epilogue fused (a tuner candidate; CUDA only, Triton imported lazily).

Why: the cuBLASLt path writes the int32 accumulator to memory and the epilogue kernel reads it back (6-8
bytes per output element; ~25% of the GEMM's time at 8192x4096x4096), and cuBLASLt's heuristic often
picks an Ampere-generation kernel on H100. Triton lowers ``tl.dot`` on int8 to Hopper's wgmma (for
BLOCK_M >= 64) and applies the epilogue in registers; measured elsewhere on an H100, Inductor's Triton int8
reached 1166 TOPS at 8192^3 where cuBLASLt gave 900-950.

Arithmetic: the epilogue of :mod:`lsquant.inference.gemm`. The kernel is compiled with
``enable_fp_fusion=False`` (ptxas --fmad=false), so the multiply and the add are never contracted into an
FMA and round exactly like the reference's two separate fp32 operations; rounding half to even uses the
1.5 * 2^23 trick (no libdevice: the same code runs in Triton's CPU interpreter); the output's 1/scale comes
precomputed (IEEE division in PyTorch), as Triton's ``/`` on fp32 is an approximate division.

Layouts: x (M, K) row-major and w (N, K) row-major: both K-contiguous ("TN"), the only layout int8 wgmma
takes; any M, N, K (masked loads), K contiguous (stride 1) required.
"""
from __future__ import annotations

import functools
import importlib

import torch

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M). Shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K bytes: 128x256x128 x 3 stages = 144 KiB, under Hopper's 227 KiB.
CONFIGS = [
    (128, 256, 128, 8, 3, 8),
    (256, 128, 128, 8, 3, 8),
    (128, 128, 128, 8, 4, 8),
    (128, 128, 128, 4, 4, 8),
    (64, 256, 128, 4, 4, 8),
    (64, 128, 128, 4, 4, 8),
    (128, 64, 128, 4, 4, 8),
    (64, 64, 256, 4, 4, 8),
    # small M (decoding: 1-64 tokens): weight-bandwidth bound, many narrow column tiles to use every SM
    (16, 64, 256, 4, 4, 1),
    (16, 32, 256, 4, 4, 1),
    (32, 64, 256, 4, 4, 1),
    (16, 128, 128, 4, 5, 1),
    (32, 128, 128, 4, 4, 1),
]


def config_dict(c) -> dict:
    bm, bn, bk, w, s, g = c
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s, "GROUP_M": g}


def candidate_configs(M: int, N: int, K: int, limit: int = 6, num_sms: int = 132) -> list[dict]:
    """Configs worth timing for (M, N, K), most promising first.

    Pruning: no tile taller than twice M's next power of two (it would compute padding rows) and no
    BLOCK_K beyond K's next power of two. Ranking by a rough time model: waves of tiles over the SMs
    (ceil(tiles / num_sms)) x work per tile (BLOCK_M x BLOCK_N), divided by the tile's arithmetic intensity
    relative to 128x128 (BM*BN/(BM+BN) = 64 ops per byte loaded), capped at 1. At M = 8192, N = 4096 this
    ranks 128x256 and 256x128 (8 waves) with 128x128 (16 waves of half the work), and at M = 1 the
    narrowest tiles first, as a bandwidth-bound GEMM wants as many SMs streaming weights as possible."""
    mp2 = 1 << max(0, (max(M, 1) - 1).bit_length())
    kp2 = 1 << max(0, (max(K, 1) - 1).bit_length())
    scored = []
    for i, c in enumerate(CONFIGS):
        bm, bn, bk = c[:3]
        if bm > max(16, 2 * mp2) or bk > max(32, kp2):
            continue
        tiles = -(-M // bm) * -(-N // bn)
        waves = -(-tiles // num_sms)
        intensity = bm * bn / (bm + bn)
        est = waves * bm * bn / min(1.0, intensity / 64.0)
        scored.append((est, i, c))
    scored.sort()
    return [config_dict(c) for _, _, c in scored[:limit]]


@functools.lru_cache(maxsize=1)
def _kernel():
    # Triton resolves the names a kernel uses in its module's globals (not in a closure), so the lazily
    # imported modules are bound as globals of this module before the kernel is defined.
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def int8_linear_kernel(x_ptr, w_ptr, out_ptr, alpha_ptr, bias_ptr, inv_ptr, M, N, K, stride_xm, stride_wn,
                           stride_om, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_KIND: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        # OUT_KIND: 0 int32 accumulator, 1 int8 re-quantized, 2 float (out_ptr's dtype)
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # grouped ordering: GROUP_M row tiles share each column tile of w while it is in L2
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # out-of-range rows/columns load row 0 (valid memory) and are masked at the store
        rm = tl.where(offs_m < M, offs_m, 0)
        rn = tl.where(offs_n < N, offs_n, 0)
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                kk = k * BLOCK_K + offs_k
                a = tl.load(x_ptrs, mask=kk[None, :] < K, other=0)
                b = tl.load(w_ptrs, mask=kk[:, None] < K, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        if OUT_KIND == 0:
            tl.store(out_ptrs, acc, mask=mask)
        else:
            # plain * and +: the kernel is compiled with enable_fp_fusion=False, so each rounds once (no FMA)
            alpha = tl.load(alpha_ptr + offs_n, mask=offs_n < N, other=0.0)
            v = acc.to(tl.float32) * alpha[None, :]
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
                v = v + bias[None, :]
            if ACT == 1:
                v = tl.maximum(v, 0.0)
            elif ACT == 2:
                v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
            if OUT_KIND == 1:
                inv = tl.load(inv_ptr)
                t = tl.minimum(tl.maximum(v * inv, -128.0), 128.0)
                # round half to even: adding and removing 1.5 * 2^23 leaves no fraction bits in fp32, so the
                # hardware's round-to-nearest-even does the rounding (exact for |t| <= 2^22)
                q = (t + 12582912.0) - 12582912.0
                q = tl.minimum(tl.maximum(q, -127.0), 127.0)
                tl.store(out_ptrs, q.to(tl.int8), mask=mask)
            else:
                tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)

    return int8_linear_kernel


def available() -> bool:
    """True where Triton imports and a CUDA GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


_dummies: dict = {}


def _dummy(device) -> torch.Tensor:
    t = _dummies.get(device)
    if t is None:
        t = _dummies[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return t


def int8_linear_triton(x2: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor | None, bias32: torch.Tensor | None,
                       act: int, out_dtype: torch.dtype, out_inv: torch.Tensor | None, config: dict) -> torch.Tensor:
    """x2: int8 (M, K), w: int8 (N, K) -> (M, N) of out_dtype. alpha: fp32 (N,) (None for int32 output);
    bias32: fp32 (N,) or None; act: 0/1/2 (none/relu/gelu); out_inv: fp32 (1,) 1/scale of the int8 output."""
    import triton

    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    M, K = x2.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=x2.device)
    kind = 0 if out_dtype == torch.int32 else (1 if out_dtype == torch.int8 else 2)
    d = _dummy(x2.device)
    c = config
    grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
    _kernel()[grid](
        x2, w, out, alpha if alpha is not None else d, bias32 if bias32 is not None else d,
        out_inv if out_inv is not None else d, M, N, K, x2.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias32 is not None, ACT=act, OUT_KIND=kind, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
        BLOCK_K=c["BLOCK_K"], GROUP_M=c.get("GROUP_M", 8), EVEN_K=(K % c["BLOCK_K"] == 0),
        num_warps=c["num_warps"], num_stages=c["num_stages"], enable_fp_fusion=False)
    return out
