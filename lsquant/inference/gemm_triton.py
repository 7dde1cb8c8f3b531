"""Triton int8 GEMM with the epilogue fused (tuner candidates; CUDA only, Triton imported lazily).

Why: the cuBLASLt path writes the int32 accumulator to memory and the epilogue kernel reads it back (6-8
bytes per output element; ~25% of the GEMM's time at 8192x4096x4096), and cuBLASLt's heuristic often
picks an Ampere-generation kernel on H100. Triton lowers ``tl.dot`` on int8 to Hopper's wgmma (for
BLOCK_M >= 64) and applies the epilogue in registers; measured elsewhere on an H100, Inductor's Triton int8
reached 1166 TOPS at 8192^3 where cuBLASLt gave 900-950.

Three kernels, one epilogue (``_epilogue_inputs`` and ``_epilogue_apply``, shared, so every variant rounds alike;
on an H100 every variant's output equaled the tiled kernel's bit for bit, float and GELU included):

- ``tiled`` (config without ``KERNEL``): one program per output tile, pointer loads (cp.async pipeline).
  Its 128x128x128 3-stage config takes 96 KiB, so two programs share an SM and one's epilogue overlaps the
  other's MMAs: on an H100, 891 TOPS at 8192x4096x1024 where the 144 KiB 128x256 tile (one program per SM)
  gave 753-769.
- ``tma``: persistent (one program per SM looping over tiles in grouped order), operands loaded by TMA
  through host-side tensor descriptors, the tile loop flattened into the K loop (``tl.range(flatten=True)``)
  so the next tile's loads are in flight during this tile's epilogue, the output stored by TMA (in two
  halves with ``EPI_SUBTILE`` 2: half the staging buffer). On an H100 its 256x128 tile beat the tiled
  256x128 by 5-9% (8192x4096x1024: 82.5 vs 89.3 us) but not the two-programs-per-SM 128x128 (77.1 us):
  the epilogue still stalls the tensor cores of its SM. ``WARP_SPECIALIZE`` (Triton's automatic warp
  specialization) would fix that; see :func:`warp_specialize_available` for why it is off on sm_90.
  Needs sm_90+, K % 16 == 0 (TMA: 16-byte row strides) and 16-byte aligned operands (else copied).
- ``splitk``: decoding (M <= 64): K split over ``SPLIT_K`` programs per tile, so that a 1024-column output
  still puts ~128 programs to work streaming the weight (16x32 tiles alone: 32 programs at N = 1024). On
  an H100, 1x1024x4096 took 5.9 us instead of 8.2 (bf16: 8.6). Partial int32 sums are added with integer
  atomics into a workspace (exact and order-independent); the last program to arrive at a tile (a per-tile
  counter) takes the sum, resets workspace and counter to zero (so no memset launch is needed) and runs the
  epilogue.

Arithmetic: the epilogue of :mod:`lsquant.inference.gemm`, the optional residual add included (``HAS_RES``:
float outputs; the residual tile is loaded with the output tile's mask, through pointers in every kernel,
also where the TMA kernel stores its output by TMA; the K loops are the same with or without it). The
kernels are compiled with ``enable_fp_fusion=False`` (ptxas --fmad=false), so the multiply and the add are
never contracted into an FMA and round exactly like the reference's two separate fp32 operations; rounding
half to even uses the 1.5 * 2^23 trick (no libdevice: the same code runs in Triton's CPU interpreter); the
output's 1/scale comes precomputed (IEEE division in PyTorch), as Triton's ``/`` on fp32 is an approximate
division.

Layouts: x (M, K) row-major and w (N, K) row-major: both K-contiguous ("TN"), the only layout int8 wgmma
takes; any M, N, K (masked loads, or TMA's zero fill), K contiguous (stride 1) required.
"""
from __future__ import annotations

import functools
import importlib
import os
import threading

import torch

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M). Shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K bytes: 128x256x128 x 3 stages = 144 KiB, under Hopper's 227 KiB.
CONFIGS = [
    # 96 KiB: two programs per SM, so one's epilogue overlaps the other's MMAs. On an H100 this was the best
    # Triton config at 8192x4096x1024 (891 TOPS, 1.25x bf16) and 8192x1024x4096 (1202 TOPS, 1.52x)
    (128, 128, 128, 4, 3, 8),
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

# Persistent TMA kernel: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M, EPI_SUBTILE,
# WARP_SPECIALIZE[, CTAS_PER_SM]). CTAS_PER_SM 2 launches two programs per SM; 128x128x128x2 with them
# (81 KiB each) measured 0.78-1.06x bf16 on an H100, behind 256x128 here and behind the tiled kernel's
# 128x128x128x3 (two 96 KiB programs per SM, 1.15-1.52x), so no config here uses it. BLOCK_K 128 = 128
# bytes of int8, one 128-byte swizzle row. Shared memory: stages x
# (BLOCK_M + BLOCK_N) x BLOCK_K for the operands + BLOCK_M x BLOCK_N / EPI_SUBTILE x output bytes for the
# TMA store's staging tile (pruned against 227 KiB by :func:`smem_bytes`; 256x128x128 x 4 stages = 192 KiB
# + 32 KiB of bf16 half tile fits, with an int32 output it does not).
TMA_CONFIGS = [
    (256, 128, 128, 8, 3, 8, 2, False),  # H100: the best of these at 8192x4096x1024 (see NOTES_gemm.md)
    (256, 128, 128, 8, 4, 8, 2, False),
    (128, 256, 128, 8, 3, 8, 2, False),
    (128, 128, 128, 4, 4, 8, 1, False),
    (64, 256, 128, 4, 4, 8, 2, False),
    (64, 128, 128, 4, 5, 8, 1, False),
    # warp-specialized: with num_warps=4, Triton 3.6 on sm_90 adds a producer warp group (TMA loads) to two
    # consumer warp groups (wgmma, epilogue): 12 warps, setmaxnreg; with num_warps=8 it leaves the loop
    # alone (checked by compiling for sm_90). No TMA store and no flattening there (see the launch).
    (128, 256, 128, 4, 3, 8, 1, True),
    (128, 128, 128, 4, 4, 8, 1, True),
]

# Split-K for decoding (M <= 64): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); SPLIT_K is chosen
# per shape by :func:`split_k_for` (enough programs for every SM, each with at least one full K block).
SPLITK_CONFIGS = [
    (16, 32, 256, 4, 3),
    (16, 64, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
]

# Split-K for mid-size M (64 < M <= SPLITK_MID_MAX_M: large-batch decoding, short prompts), where a transformer's
# N = 512-4096 gives fewer 64-128-row tiles than SMs (M = 512, N = 1536 at 64 x 128: 96 tiles on 132 SMs, each
# walking K = 512 in four steps): the same kernel with wgmma-sized tiles, K split in two or more
SPLITK_MID_CONFIGS = [
    (64, 128, 128, 4, 3),
    (64, 64, 128, 4, 4),
    (128, 128, 128, 8, 3),
]
SPLITK_MID_MAX_M = 1024

SMEM_LIMIT = 227 * 1024  # H100 / H200: the most shared memory one block may take (of 228 KiB per SM)
SMEM_PER_SM = 228 * 1024
MAX_SPLIT_K = 16


def config_dict(c) -> dict:
    bm, bn, bk, w, s, g = c
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s, "GROUP_M": g}


def tma_config_dict(c) -> dict:
    bm, bn, bk, w, s, g, sub, ws = c[:8]
    d = {"KERNEL": "tma", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s,
         "GROUP_M": g, "EPI_SUBTILE": sub, "WARP_SPECIALIZE": bool(ws)}
    if len(c) > 8 and c[8] > 1:
        d["CTAS_PER_SM"] = int(c[8])
    return d


def splitk_config_dict(c, split_k: int) -> dict:
    bm, bn, bk, w, s = c
    return {"KERNEL": "splitk", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s,
            "GROUP_M": 1, "SPLIT_K": int(split_k)}


def config_name(c: dict) -> str:
    """Short, stable name of a Triton config (the tuner's CSV column). The tiled kernel keeps the name
    :func:`lsquant.inference.gemm.choice_name` gives it; the other kernels say which they are."""
    tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}-w{c['num_warps']}-s{c['num_stages']}"
    kind = c.get("KERNEL", "tiled")
    if kind == "tma":
        return (f"triton-tma:{tiles}-g{c.get('GROUP_M', 8)}"
                + (f"-e{c['EPI_SUBTILE']}" if c.get("EPI_SUBTILE", 1) > 1 else "")
                + (f"-c{c['CTAS_PER_SM']}" if c.get("CTAS_PER_SM", 1) > 1 else "")
                + ("-ws" if c.get("WARP_SPECIALIZE") else ""))
    if kind == "splitk":
        return f"triton-splitk{c['SPLIT_K']}:{tiles}" + ("-late" if c.get("EARLY_EPI") is False else "")
    return f"triton:{tiles}-g{c.get('GROUP_M', 8)}" + ("-late" if c.get("EARLY_EPI") is False else "")


def smem_bytes(c: dict, out_bytes: int = 2) -> int:
    """Shared memory a config asks for: the operand stages, and for the TMA kernel the output staging tile
    (BLOCK_M x BLOCK_N / EPI_SUBTILE x out_bytes), + 1 KiB of barriers and slack."""
    b = c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] + 1024
    if c.get("KERNEL") == "tma":
        b += c["BLOCK_M"] * (c["BLOCK_N"] // c.get("EPI_SUBTILE", 1)) * out_bytes
    return b


def _next_pow2(v: int) -> int:
    return 1 << max(0, (max(v, 1) - 1).bit_length())


def _est(M: int, N: int, bm: int, bn: int, num_sms: int) -> float:
    """Rough time of a tiling: waves of tiles over the SMs x work per tile, divided by the tile's arithmetic
    intensity relative to 128x128 (BM*BN/(BM+BN) = 64 ops per byte loaded), capped at 1."""
    tiles = -(-M // bm) * -(-N // bn)
    waves = -(-tiles // num_sms)
    intensity = bm * bn / (bm + bn)
    return waves * bm * bn / min(1.0, intensity / 64.0)


def candidate_configs(M: int, N: int, K: int, limit: int = 6, num_sms: int = 132) -> list[dict]:
    """Configs of the tiled kernel worth timing for (M, N, K), most promising first.

    Pruning: no tile taller than twice M's next power of two (it would compute padding rows) and no
    BLOCK_K beyond K's next power of two. Ranking by :func:`_est`: at M = 8192, N = 4096 this ranks
    128x256 and 256x128 (8 waves) with 128x128 (16 waves of half the work), and at M = 1 the narrowest
    tiles first, as a bandwidth-bound GEMM wants as many SMs streaming weights as possible."""
    mp2, kp2 = _next_pow2(M), _next_pow2(K)
    scored = []
    for i, c in enumerate(CONFIGS):
        bm, bn, bk = c[:3]
        if bm > max(16, 2 * mp2) or bk > max(32, kp2):
            continue
        scored.append((_est(M, N, bm, bn, num_sms), i, c))
    scored.sort()
    return [config_dict(c) for _, _, c in scored[:limit]]


def split_k_for(M: int, N: int, K: int, bm: int, bn: int, bk: int, num_sms: int = 132) -> int:
    """The split of K for a decode tiling: doubled while the programs fill less than 90% of the SMs and
    each split keeps at least one full BLOCK_K of K (at most MAX_SPLIT_K). 1 means "no split needed"."""
    tiles = -(-M // bm) * -(-N // bn)
    s = 1
    while tiles * s < 0.9 * num_sms and 2 * s * bk <= K and 2 * s <= MAX_SPLIT_K:
        s *= 2
    return s


def variant_configs(M: int, N: int, K: int, num_sms: int = 132, out_bytes: int = 2, n_tma: int = 4,
                    n_ws: int = 1, n_splitk: int = 2, tma: bool = True, ws: bool = True) -> list[dict]:
    """Configs of the persistent TMA kernel (M > 64, K % 16 == 0; n_tma plain + n_ws warp-specialized ones,
    those whose shared memory fits, ranked by :func:`_est`) and of the split-K kernel (M <= SPLITK_MID_MAX_M,
    where the split is > 1: SPLITK_CONFIGS' decode tiles up to 64 rows, SPLITK_MID_CONFIGS' beyond), most
    promising first. out_bytes: the output element's size (the TMA staging tile)."""
    out: list[dict] = []
    mp2, kp2 = _next_pow2(M), _next_pow2(K)
    if tma and M > 64 and K % 16 == 0:
        plain, spec = [], []
        for i, c in enumerate(TMA_CONFIGS):
            d = tma_config_dict(c)
            bm, bn, bk = c[:3]
            ctas = d.get("CTAS_PER_SM", 1)
            if bm > max(64, 2 * mp2) or bk > max(32, kp2) or smem_bytes(d, out_bytes) > SMEM_LIMIT or (
                    ctas * smem_bytes(d, out_bytes) > SMEM_PER_SM):
                continue
            item = (_est(M, N, bm, bn, num_sms), i, d)
            (spec if d["WARP_SPECIALIZE"] else plain).append(item)
        plain.sort(key=lambda t: t[:2])
        spec.sort(key=lambda t: t[:2])
        out += [d for _, _, d in plain[:n_tma]]
        if ws:
            out += [d for _, _, d in spec[:n_ws]]
    if M <= SPLITK_MID_MAX_M and n_splitk > 0:
        scored = []
        for i, c in enumerate(SPLITK_CONFIGS if M <= 64 else SPLITK_MID_CONFIGS):
            bm, bn, bk = c[:3]
            if bm > max(16, 2 * mp2) or bk > max(32, kp2):
                continue
            s = split_k_for(M, N, K, bm, bn, bk, num_sms)
            if s <= 1:
                continue
            tiles = -(-M // bm) * -(-N // bn)
            # programs in the last wave (fuller is better), then the narrower tile (more weight streams)
            waves = tiles * s / num_sms
            scored.append((-(waves / max(1, -(-tiles * s // num_sms))), i, splitk_config_dict(c, s)))
        scored.sort(key=lambda t: t[:2])
        out += [d for _, _, d in scored[:n_splitk]]
    return out


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------

def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel():
    """The tiled kernel (kept for callers of the single-kernel API)."""
    return _kernels()["tiled"]


def _kernels() -> dict:
    # triton.jit decides at decoration time whether a function is compiled or interpreted
    # (TRITON_INTERPRET): one set of kernels per mode, so a test that interprets on the CPU never leaves an
    # interpreted kernel behind for CUDA callers in the same process.
    return _build(_interpret())


@functools.lru_cache(maxsize=1)
def _build(interpret: bool) -> dict:
    # Kernels resolve the names they use in this module's globals (the interpreter does not see closures),
    # so the lazily imported modules and the shared jit functions are bound as globals here; maxsize=1: a
    # switch of mode rebuilds (and rebinds) everything, so the shared functions match the kernels in use.
    global triton, tl, _quant, _epilogue, _tile_coords, _tile_offsets, _store_part, _store_tile, _pdl_enter, _pdl_wait
    global _ln_stats, _ln_tail, _row_chunk, _epilogue_inputs, _epilogue_apply, _store_out
    import triton
    import triton.language as tl

    @triton.jit
    def _pdl_enter():
        # the first thing a kernel launched with programmatic dependent launch does (lsquant.inference.pdl): wait
        # for the previous kernel to complete (its writes visible), then let the next kernel launch. Shared by
        # every decode-step kernel
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _pdl_wait(w_rows, nbytes, PREFETCH: tl.constexpr):
        # _pdl_enter for the GEMMs, which first ask for their weight rows in L2 (w_rows: a tensor of row
        # pointers, nbytes each; the weights are constants, so this is the one access allowed before the wait).
        # cp.async.bulk.prefetch needs 16-byte aligned addresses and sizes (PREFETCH); a size <= 0 (a split-K
        # program past K) prefetches nothing
        if PREFETCH:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; } mov.u32 $0, 0;",
                "=r,l,r", [w_rows, nbytes], dtype=tl.int32, is_pure=False, pack=1)
        _pdl_enter()

    @triton.jit
    def _quant(v, inv):
        # lsquant.quant.ref.quantize_ref in fp32: clamp(round_half_even(v * inv), -127, 127). Adding and removing
        # 1.5 * 2^23 leaves no fraction bits in fp32, so the hardware's round-to-nearest-even does the rounding
        # (exact for |t| <= 2^22, which the clamp to +-128 guarantees). Shared by the decode attention kernel.
        t = tl.minimum(tl.maximum(v * inv, -128.0), 128.0)
        q = (t + 12582912.0) - 12582912.0
        return tl.minimum(tl.maximum(q, -127.0), 127.0)

    @triton.jit
    def _epilogue_inputs(offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr, res_ptr, stride_rm,
                         HAS_BIAS: tl.constexpr, OUT_KIND: tl.constexpr, HAS_RES: tl.constexpr):
        # what the epilogue reads besides the accumulator: alpha and bias (N,), the int8 output's 1/scale and the
        # residual tile (float outputs; (M, N) through pointers, row stride stride_rm, with the output tile's
        # mask). Split from _epilogue_apply so that a kernel can issue these loads before its main loop (their
        # latency then overlaps it) or after it; unused ones are never loaded (their pointers may be dummies)
        if OUT_KIND == 0:
            alpha = offs_n.to(tl.float32)
        else:
            alpha = tl.load(alpha_ptr + offs_n, mask=offs_n < N, other=0.0)
        if HAS_BIAS and OUT_KIND != 0:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        else:
            bias = alpha
        if OUT_KIND == 1:
            inv = tl.load(inv_ptr)
        else:
            inv = 1.0
        if HAS_RES and OUT_KIND == 2:
            rmask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            r = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=rmask, other=0.0)
        else:
            r = 0.0
        return alpha, bias, inv, r

    @triton.jit
    def _epilogue_apply(acc, alpha, bias, inv, r, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                        OUT_KIND: tl.constexpr, OUT_TY: tl.constexpr, HAS_RES: tl.constexpr):
        # OUT_KIND: 0 int32 accumulator, 1 int8 re-quantized, 2 float (OUT_TY). HAS_RES (float outputs only):
        # out = OUT_TY(fp32(residual) + fp32(OUT_TY(v)))
        if OUT_KIND == 0:
            out = acc
        else:
            # plain * and +: the kernels are compiled with enable_fp_fusion=False, so each rounds once (no FMA)
            v = acc.to(tl.float32) * alpha[None, :]
            if HAS_BIAS:
                v = v + bias[None, :]
            if ACT == 1:
                v = tl.maximum(v, 0.0)
            elif ACT == 2:
                v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
            if OUT_KIND == 1:
                out = _quant(v, inv).to(tl.int8)
            else:
                out = v.to(OUT_TY)
                if HAS_RES:
                    # round to OUT_TY first, then one fp32 add and one rounding: PyTorch's `residual + y`
                    # (fp16/bf16 adds compute in fp32 and round once)
                    out = (r.to(tl.float32) + out.to(tl.float32)).to(OUT_TY)
        return out

    @triton.jit
    def _epilogue(acc, offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr, res_ptr, stride_rm,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_KIND: tl.constexpr, OUT_TY: tl.constexpr,
                  HAS_RES: tl.constexpr):
        # the epilogue with its inputs loaded after the main loop
        alpha, bias, inv, r = _epilogue_inputs(offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr, res_ptr,
                                               stride_rm, HAS_BIAS, OUT_KIND, HAS_RES)
        return _epilogue_apply(acc, alpha, bias, inv, r, HAS_BIAS, ACT, OUT_KIND, OUT_TY, HAS_RES)

    @triton.jit
    def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        # grouped ordering: GROUP_M row tiles share each column tile of w while it is in L2
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, alpha_ptr, bias_ptr, inv_ptr, res_ptr, stride_rm,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_KIND: tl.constexpr, HAS_RES: tl.constexpr):
        # the epilogue of one output tile, stored through pointers with the (offs_m < M, offs_n < N) mask
        res = _epilogue(acc, offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr, res_ptr, stride_rm, HAS_BIAS, ACT,
                        OUT_KIND, out_ptr.dtype.element_ty, HAS_RES)
        _store_out(res, offs_m, offs_n, M, N, out_ptr, stride_om)

    @triton.jit
    def _store_out(res, offs_m, offs_n, M, N, out_ptr, stride_om):
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], res, mask=mask)

    @triton.jit
    def _row_chunk(x_rows, kk, K, L2_ONLY: tl.constexpr):
        # columns kk of rows x_rows (zeros past K); L2_ONLY: through L2 only (.cg), for rows that other programs
        # of the same grid have just written
        if L2_ONLY:
            v = tl.load(x_rows + kk[None, :], mask=kk[None, :] < K, other=0.0, cache_modifier=".cg")
        else:
            v = tl.load(x_rows + kk[None, :], mask=kk[None, :] < K, other=0.0)
        return v

    @triton.jit
    def _ln_stats(x_rows, K, LN_BLOCK: tl.constexpr, L2_ONLY: tl.constexpr):
        # mean and variance of rows of K floats (x_rows: a (BLOCK_M, 1) tensor of row pointers), two passes over K in
        # LN_BLOCK chunks (as layernorm.cu: the sum, then the squared deviations from the mean), IEEE divisions
        # and square root as layernorm.cu's (Triton's own fp32 `/` is div.full.f32, up to 2 ulp off). L2_ONLY:
        # loads that skip L1 (rows other programs of the same grid have just written)
        offs_l = tl.arange(0, LN_BLOCK)
        s1 = tl.zeros((x_rows.shape[0],), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, LN_BLOCK)):
            kk = k * LN_BLOCK + offs_l
            v = _row_chunk(x_rows, kk, K, L2_ONLY)
            s1 += tl.sum(v.to(tl.float32), axis=1)
        mean = tl.math.div_rn(s1, K.to(tl.float32))
        s2 = tl.zeros((x_rows.shape[0],), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, LN_BLOCK)):
            kk = k * LN_BLOCK + offs_l
            v = _row_chunk(x_rows, kk, K, L2_ONLY)
            d = tl.where(kk[None, :] < K, v.to(tl.float32) - mean[:, None], 0.0)
            s2 += tl.sum(d * d, axis=1)
        return mean, tl.math.div_rn(s2, K.to(tl.float32))

    @triton.jit
    def _ln_tail(pid_m, N, y_ptr, stride_ym, cnt_ptr, g_ptr, beta_ptr, eps, qinv_ptr, q_ptr, stride_qm, M,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LN_BLOCK: tl.constexpr):
        # After a program has stored its output tile of rows pid_m: the LayerNorm of the next sublayer and the
        # quantize of the next linear's input, q = quantize(LayerNorm(y), 1 / qinv), for the rows of this row
        # block, computed by the last of the row block's cdiv(N, BLOCK_N) programs to finish (an arrival counter
        # per row block, as the split-K kernel's per tile, left at zero for the next launch). The arithmetic is
        # the LayerNorm prologue's (int8_ln_linear_kernel): one copy, the same contract against
        # ops.layer_norm_quant (statistics summed in another order: an int8 value may sit one level away)
        tl.debug_barrier()   # every thread's stores of the tile happen before the counter's release
        arrived = tl.atomic_add(cnt_ptr + pid_m, 1, sem="acq_rel")
        if arrived == tl.cdiv(N, BLOCK_N) - 1:
            tl.atomic_xchg(cnt_ptr + pid_m, 0, sem="relaxed")
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = tl.where(offs_m < M, offs_m, 0)
            y_rows = y_ptr + rows[:, None].to(tl.int64) * stride_ym
            mean, var = _ln_stats(y_rows, N, LN_BLOCK, True)
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
            qinv = tl.load(qinv_ptr)
            offs_l = tl.arange(0, LN_BLOCK)
            for k in range(0, tl.cdiv(N, LN_BLOCK)):
                kk = k * LN_BLOCK + offs_l
                km = kk < N
                yv = _row_chunk(y_rows, kk, N, True)
                g = tl.load(g_ptr + kk, mask=km, other=0.0).to(tl.float32)
                bb = tl.load(beta_ptr + kk, mask=km, other=0.0).to(tl.float32)
                h = tl.fma((yv.to(tl.float32) - mean[:, None]) * rstd[:, None], g[None, :], bb[None, :])
                h = h.to(yv.dtype).to(tl.float32)
                qm = (offs_m[:, None] < M) & km[None, :]
                tl.store(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + kk[None, :], _quant(h, qinv).to(tl.int8),
                         mask=qm)

    @triton.jit
    def _tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # the tile's rows and columns, and the same with those out of range replaced by 0: out-of-range
        # rows/columns load row 0 (valid memory) and are masked at the store
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m, offs_n, tl.where(offs_m < M, offs_m, 0), tl.where(offs_n < N, offs_n, 0)

    @triton.jit
    def int8_linear_kernel(x_ptr, w_ptr, out_ptr, alpha_ptr, bias_ptr, inv_ptr, res_ptr, M, N, K, stride_xm,
                           stride_wn, stride_om, stride_rm, ln_g_ptr, ln_b_ptr, ln_eps, ln_qinv_ptr, ln_q_ptr,
                           stride_qm, ln_cnt_ptr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                           OUT_KIND: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                           LN_TAIL: tl.constexpr = False, LN_BLOCK: tl.constexpr = 16,
                           EARLY_EPI: tl.constexpr = False):
        # LN_TAIL (float output): then the next sublayer's LayerNorm + quantize of the finished rows (_ln_tail).
        # EARLY_EPI: the epilogue's inputs (alpha, bias, 1/scale, the residual tile) loaded before the main loop,
        # after the PDL wait (the residual is the previous kernels' output), so their latency overlaps the loop
        pid = tl.program_id(0)
        pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m, offs_n, rm, rn = _tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
        if USE_PDL:
            _pdl_wait(w_ptr + rn.to(tl.int64) * stride_wn, K, PREFETCH)
        if EARLY_EPI:
            e_alpha, e_bias, e_inv, e_res = _epilogue_inputs(offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr,
                                                             res_ptr, stride_rm, HAS_BIAS, OUT_KIND, HAS_RES)
        offs_k = tl.arange(0, BLOCK_K)
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

        if not EARLY_EPI:
            e_alpha, e_bias, e_inv, e_res = _epilogue_inputs(offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr,
                                                             res_ptr, stride_rm, HAS_BIAS, OUT_KIND, HAS_RES)
        res = _epilogue_apply(acc, e_alpha, e_bias, e_inv, e_res, HAS_BIAS, ACT, OUT_KIND, out_ptr.dtype.element_ty,
                              HAS_RES)
        _store_out(res, offs_m, offs_n, M, N, out_ptr, stride_om)
        if LN_TAIL:
            _ln_tail(pid_m, N, out_ptr, stride_om, ln_cnt_ptr, ln_g_ptr, ln_b_ptr, ln_eps, ln_qinv_ptr, ln_q_ptr,
                     stride_qm, M, BLOCK_M, BLOCK_N, LN_BLOCK)

    @triton.jit
    def _store_part(acc, off_m, off_n, M, N, out_desc, out_ptr, stride_om, alpha_ptr, bias_ptr, inv_ptr, res_ptr,
                    stride_rm, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_KIND: tl.constexpr,
                    HAS_RES: tl.constexpr, TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr):
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, SUB_N)
        if TMA_STORE:
            # the residual is read through pointers (masked) even where the output is stored by TMA, which
            # clips the rows and columns past (M, N): no mask
            res = _epilogue(acc, offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr, res_ptr, stride_rm, HAS_BIAS,
                            ACT, OUT_KIND, out_ptr.dtype.element_ty, HAS_RES)
            out_desc.store([off_m, off_n], res)
        else:
            _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, alpha_ptr, bias_ptr, inv_ptr, res_ptr,
                        stride_rm, HAS_BIAS, ACT, OUT_KIND, HAS_RES)

    @triton.jit
    def int8_linear_tma_kernel(x_desc, w_desc, out_desc, out_ptr, alpha_ptr, bias_ptr, inv_ptr, res_ptr, M, N, K,
                               stride_om, stride_rm, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                               OUT_KIND: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                               NUM_PROGS: tl.constexpr, EPI_SUBTILE: tl.constexpr, TMA_STORE: tl.constexpr,
                               WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr):
        start = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_pid_m * num_pid_n
        # the epilogue's tile index is a second counter, not the loop's: with the loops flattened, a value
        # used both by the loads (pipelined ahead) and by the epilogue would have to be kept per stage
        tile_c = start - NUM_PROGS
        for tile_id in tl.range(start, num_tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
            off_am = pid_m * BLOCK_M
            off_bn = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for ki in range(k_tiles):
                off_k = ki * BLOCK_K
                a = x_desc.load([off_am, off_k])  # rows/columns past (M, K) read as zeros
                b = w_desc.load([off_bn, off_k])
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

            tile_c += NUM_PROGS
            pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
            off_cm = pid_m * BLOCK_M
            off_cn = pid_n * BLOCK_N
            if EPI_SUBTILE == 2:
                # two (BLOCK_M, BLOCK_N / 2) halves: half the staging tile, the first half's store overlaps
                # the second half's arithmetic
                acc3 = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(acc3)
                _store_part(acc0, off_cm, off_cn, M, N, out_desc, out_ptr, stride_om, alpha_ptr, bias_ptr,
                            inv_ptr, res_ptr, stride_rm, HAS_BIAS, ACT, OUT_KIND, HAS_RES, TMA_STORE, BLOCK_M,
                            BLOCK_N // 2)
                _store_part(acc1, off_cm, off_cn + BLOCK_N // 2, M, N, out_desc, out_ptr, stride_om, alpha_ptr,
                            bias_ptr, inv_ptr, res_ptr, stride_rm, HAS_BIAS, ACT, OUT_KIND, HAS_RES, TMA_STORE,
                            BLOCK_M, BLOCK_N // 2)
            else:
                _store_part(acc, off_cm, off_cn, M, N, out_desc, out_ptr, stride_om, alpha_ptr, bias_ptr, inv_ptr,
                            res_ptr, stride_rm, HAS_BIAS, ACT, OUT_KIND, HAS_RES, TMA_STORE, BLOCK_M, BLOCK_N)

    @triton.jit
    def int8_linear_splitk_kernel(x_ptr, w_ptr, out_ptr, alpha_ptr, bias_ptr, inv_ptr, res_ptr, ws_ptr, cnt_ptr, M,
                                  N, K, stride_xm, stride_wn, stride_om, stride_rm, k_per_split, ln_g_ptr, ln_b_ptr,
                                  ln_eps, ln_qinv_ptr, ln_q_ptr, stride_qm, ln_cnt_ptr,
                                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_KIND: tl.constexpr,
                                  HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                                  USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                                  LN_TAIL: tl.constexpr = False, LN_BLOCK: tl.constexpr = 16,
                                  EARLY_EPI: tl.constexpr = False):
        # grid (tiles, SPLIT_K); k_per_split is a multiple of BLOCK_K; EVEN_K: K == SPLIT_K * k_per_split.
        # EARLY_EPI: every program loads the epilogue's inputs before its main loop (as the tiled kernel's), so
        # the last one to arrive has them when it takes the total
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), 1)   # row-major tile order
        offs_m, offs_n, rm, rn = _tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        k0 = pid_k * k_per_split
        if USE_PDL:   # this program's K slice of its weight rows (the last slice may be shorter, or empty)
            _pdl_wait(w_ptr + rn.to(tl.int64) * stride_wn + k0, tl.minimum(k_per_split, K - k0), PREFETCH)
        if EARLY_EPI:
            e_alpha, e_bias, e_inv, e_res = _epilogue_inputs(offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr,
                                                             res_ptr, stride_rm, HAS_BIAS, OUT_KIND, HAS_RES)
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :]
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                kk = k0 + k + offs_k
                a = tl.load(x_ptrs, mask=kk[None, :] < K, other=0)
                b = tl.load(w_ptrs, mask=kk[:, None] < K, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        # this tile's int32 slot in the workspace (zero between launches)
        ws_ptrs = (ws_ptr + pid.to(tl.int64) * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N
                   + tl.arange(0, BLOCK_N)[None, :])
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        # every thread's adds happen before the counter's release (barrier, then one release atomic)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # the last of the SPLIT_K programs: every partial sum is in; take the total and leave zeros
            total = tl.atomic_xchg(ws_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=mask, sem="relaxed")
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")
            if not EARLY_EPI:
                e_alpha, e_bias, e_inv, e_res = _epilogue_inputs(offs_m, offs_n, M, N, alpha_ptr, bias_ptr, inv_ptr,
                                                                 res_ptr, stride_rm, HAS_BIAS, OUT_KIND, HAS_RES)
            res = _epilogue_apply(total, e_alpha, e_bias, e_inv, e_res, HAS_BIAS, ACT, OUT_KIND,
                                  out_ptr.dtype.element_ty, HAS_RES)
            _store_out(res, offs_m, offs_n, M, N, out_ptr, stride_om)
            if LN_TAIL:   # the tile is complete: it counts as one arrival of its row block
                _ln_tail(pid_m, N, out_ptr, stride_om, ln_cnt_ptr, ln_g_ptr, ln_b_ptr, ln_eps, ln_qinv_ptr, ln_q_ptr,
                         stride_qm, M, BLOCK_M, BLOCK_N, LN_BLOCK)

    @triton.jit
    def int8_ln_linear_kernel(x_ptr, g_ptr, beta_ptr, xinv_ptr, eps, w_ptr, out_ptr, alpha_ptr, bias_ptr, inv_ptr,
                              res_ptr, q_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_rm,
                              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_KIND: tl.constexpr,
                              HAS_RES: tl.constexpr, WRITE_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LN_BLOCK: tl.constexpr,
                              USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
        # The tiled kernel with LayerNorm + quantize in its prologue: x float (M, K) rows; each program takes the
        # mean and rstd of its BLOCK_M rows (two passes over K, as layernorm.cu: sum, then squared deviations),
        # then quantizes each x tile as ops.layer_norm_quant does (fma((x - mean) * rstd, g, b), rounded to x's
        # dtype, then quantize with the linear's input 1/scale) right before the dot. WRITE_Q: the programs of
        # the first column tile also store the int8 input they computed into q (M, K) (tests). The statistics
        # walk K in LN_BLOCK chunks, a function of K alone, so a row's values do not depend on the tile config
        # (which tuning may change).
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), 1)
        offs_m, offs_n, rm, rn = _tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
        if USE_PDL:
            _pdl_wait(w_ptr + rn.to(tl.int64) * stride_wn, K, PREFETCH)
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        mean, var = _ln_stats(x_rows, K, LN_BLOCK, False)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        xinv = tl.load(xinv_ptr)
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            kk = k * BLOCK_K + offs_k
            km = kk < K
            xv = tl.load(x_rows + kk[None, :], mask=km[None, :], other=0.0)
            g = tl.load(g_ptr + kk, mask=km, other=0.0).to(tl.float32)
            bb = tl.load(beta_ptr + kk, mask=km, other=0.0).to(tl.float32)
            y = tl.fma((xv.to(tl.float32) - mean[:, None]) * rstd[:, None], g[None, :], bb[None, :])
            y = y.to(xv.dtype).to(tl.float32)
            a = tl.where(km[None, :], _quant(y, xinv), 0.0).to(tl.int8)
            if WRITE_Q:
                if pid_n == 0:
                    qmask = (offs_m[:, None] < M) & km[None, :]
                    tl.store(q_ptr + offs_m[:, None].to(tl.int64) * K + kk[None, :], a, mask=qmask)
            b = tl.load(w_ptrs, mask=km[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            w_ptrs += BLOCK_K

        _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, alpha_ptr, bias_ptr, inv_ptr, res_ptr, stride_rm,
                    HAS_BIAS, ACT, OUT_KIND, HAS_RES)

    return {"tiled": int8_linear_kernel, "tma": int8_linear_tma_kernel, "splitk": int8_linear_splitk_kernel,
            "ln_tiled": int8_ln_linear_kernel}


# ------------------------------------------------------------------------------------------------------
# Availability
# ------------------------------------------------------------------------------------------------------

def available() -> bool:
    """True where Triton imports and a CUDA GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def _has_tensor_descriptors() -> bool:
    try:
        importlib.import_module("triton.tools.tensor_descriptor")
        tl_ = importlib.import_module("triton.language")
    except Exception:
        return False
    return hasattr(tl_, "tensor_descriptor") or hasattr(tl_, "make_tensor_descriptor")


def tma_available(device=None) -> bool:
    """The persistent TMA kernel can be offered: a CUDA GPU of compute capability >= 9.0 (TMA, wgmma) and a
    Triton with host-side tensor descriptors (3.3+)."""
    if not available():
        return False
    try:
        if torch.cuda.get_device_capability(device)[0] < 9:
            return False
    except Exception:
        return False
    return _has_tensor_descriptors()


def warp_specialize_available(device=None) -> bool:
    """Whether warp-specialized TMA configs are offered. Triton's automatic warp specialization
    (``tl.range(warp_specialize=True)``, Triton 3.4+) compiles for sm_90 (12 warps, setmaxnreg), but on an
    H100 with Triton 3.6 both warp-specialized configs of TMA_CONFIGS hung at their first launch (512^3,
    killed after 40 s), and a hung kernel would hang the tuner with it. So on sm_90 they are offered only
    with LSQUANT_TRITON_WS=1 (for trying a newer Triton); on sm_100+ (Triton's documented target) always."""
    try:
        import triton

        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
        if (major, minor) < (3, 4) or not torch.cuda.is_available():
            return False
        cap = torch.cuda.get_device_capability(device)[0]
    except Exception:
        return False
    if cap >= 10:
        return True
    return cap == 9 and os.environ.get("LSQUANT_TRITON_WS", "0") == "1"


@functools.lru_cache(maxsize=16)
def num_sms(device_index: int | None = None) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index if device_index is not None else
                                            torch.cuda.current_device()).multi_processor_count


# ------------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------------

_dummies: dict = {}


def _dummy(device) -> torch.Tensor:
    """Two fp32 zeros per device for the pointer arguments a launch does not use (here and in the decode
    attention): allocated once, not per call, since a tensor made during a CUDA-graph capture is a fill kernel
    that every replay runs again."""
    t = _dummies.get(device)
    if t is None:
        t = _dummies[device] = torch.zeros(2, dtype=torch.float32, device=device)
    return t


class _SplitKWorkspace:
    """Zeroed int32 scratch (tile sums and arrival counters) of the split-K kernel, which leaves it zeroed.

    Eager launches get one per (device, stream): launches on one stream run one after another, so no two
    share a slot at once. Launches captured into CUDA graphs (captured on a stream of their own that PyTorch
    picks) share one per device, sized by every eager call, as nothing may be allocated and zeroed during
    capture; so two graphs holding split-K kernels must not be replayed concurrently on two streams (one
    engine replays its graphs on one stream). Buffers only grow, and an outgrown one is kept alive, as a
    captured graph may still point at it."""

    def __init__(self):
        self._bufs: dict = {}
        self._old: list = []
        self._lock = threading.Lock()

    def _grow(self, key, device, n_sum: int, n_cnt: int):
        cur = self._bufs.get(key)
        if cur is not None and cur[0].numel() >= n_sum and cur[1].numel() >= n_cnt:
            return cur
        n_sum = max(n_sum, 2 * cur[0].numel() if cur is not None else 1 << 16)
        n_cnt = max(n_cnt, 2 * cur[1].numel() if cur is not None else 1 << 10)
        new = (torch.zeros(n_sum, dtype=torch.int32, device=device),
               torch.zeros(n_cnt, dtype=torch.int32, device=device))
        if cur is not None:
            self._old.append(cur)
        self._bufs[key] = new
        return new

    def get(self, device: torch.device, n_sum: int, n_cnt: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if device.type != "cuda":
                return self._grow((str(device), None), device, n_sum, n_cnt)
            graph_key = (str(device), "graph")
            if torch.cuda.is_current_stream_capturing():
                cur = self._bufs.get(graph_key)
                if cur is None or cur[0].numel() < n_sum or cur[1].numel() < n_cnt:
                    raise RuntimeError("the split-K workspace is sized by an eager call of the same shape before "
                                       "CUDA graph capture")
                return cur
            self._grow(graph_key, device, n_sum, n_cnt)
            return self._grow((str(device), torch.cuda.current_stream(device).cuda_stream), device, n_sum, n_cnt)


_splitk_ws = _SplitKWorkspace()


def early_epilogue() -> bool | None:
    """LSQUANT_EARLY_EPI: "1" makes every call of the tiled and split-K kernels load its epilogue's inputs (alpha,
    bias, the output's 1/scale, the residual tile) before its main loop, "0" after it; unset (None), a config's
    "EARLY_EPI" decides, True where it has none. Same values either way.

    Before is the default: on an H100 (base, beam 4 and sampling, source 16, two interleaved A/B pairs,
    bench/results/engine_nvidia_h100_early.csv) it made the int8 engine 1.03-1.09x faster at batch 1-8 and
    0.99-1.03x at 32-128. The tuner does not time both ways: timed alone, a GEMM shows no difference (the
    loads overlap the wait for the kernel before it, which a GEMM timed back to back barely has)."""
    v = os.environ.get("LSQUANT_EARLY_EPI", "").strip().lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    return None


def _early(config: dict) -> bool:
    forced = early_epilogue()
    return bool(config.get("EARLY_EPI", True)) if forced is None else forced


def _tma_ok(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(-1) == 1


def _operands(x2, w, alpha, bias32, act: int, out_dtype: torch.dtype, out_inv, residual):
    """What every launcher passes: x2 and w with unit column stride, the output (M, N), the epilogue's pointer
    arguments (alpha, bias, 1/scale of an int8 output, residual and its row stride; a dummy for each one
    absent) and its constexprs."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    M, N = x2.shape[0], w.shape[0]
    if residual is not None:
        from .gemm import _check_residual

        _check_residual(residual, out_dtype, (M, N), x2.device)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=x2.device)
    d = _dummy(x2.device)
    kind = 0 if out_dtype == torch.int32 else (1 if out_dtype == torch.int8 else 2)
    ptrs = (alpha if alpha is not None else d, bias32 if bias32 is not None else d,
            out_inv if out_inv is not None else d, residual if residual is not None else d,
            residual.stride(0) if residual is not None else 0)
    epi = dict(HAS_BIAS=bias32 is not None, ACT=act, OUT_KIND=kind, HAS_RES=residual is not None)
    return x2, w, out, ptrs, epi


def _pdl_args(x2: torch.Tensor, w: torch.Tensor) -> dict:
    """PDL launch arguments (lsquant.inference.pdl) of the pointer kernels: with the L2 prefetch of the weight
    rows where w's rows are 16-byte aligned and K is a multiple of 16 (cp.async.bulk's rule)."""
    from . import pdl

    a = pdl.launch_args(x2.device)
    if a:
        a["PREFETCH"] = w.data_ptr() % 16 == 0 and w.stride(0) % 16 == 0 and w.shape[1] % 16 == 0
    return a


def int8_linear_triton(x2: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor | None, bias32: torch.Tensor | None,
                       act: int, out_dtype: torch.dtype, out_inv: torch.Tensor | None, config: dict,
                       residual: torch.Tensor | None = None, ln_next: tuple | None = None) -> torch.Tensor:
    """x2: int8 (M, K), w: int8 (N, K) -> (M, N) of out_dtype. alpha: fp32 (N,) (None for int32 output);
    bias32: fp32 (N,) or None; act: 0/1/2 (none/relu/gelu); out_inv: fp32 (1,) 1/scale of the int8 output.
    config: a dict of :func:`config_dict`, :func:`tma_config_dict` or :func:`splitk_config_dict`.
    residual: (M, N) of out_dtype (float outputs only) added in the epilogue, rounded as PyTorch's
    ``residual + y`` (see :mod:`lsquant.inference.gemm`); read, never written.
    ln_next (float output, tiled or split-K config): (ln_w, ln_b, eps, q_inv, q) with q int8 (M, N) (unit column
    stride): the kernel also writes q = quantize(LayerNorm(out), 1 / q_inv), the next sublayer's int8 input, in
    the last program of each row block (the counters come zeroed from the split-K workspace)."""
    import triton

    x2, w, out, (alpha_, bias_, inv_, res_, stride_r), epi = _operands(x2, w, alpha, bias32, act, out_dtype, out_inv,
                                                                      residual)
    M, K = x2.shape
    N = w.shape[0]
    c = config
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    kernel_kind = c.get("KERNEL", "tiled")
    kernels = _kernels()
    split = c.get("SPLIT_K", 1) if kernel_kind == "splitk" else 1
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    d = _dummy(x2.device)
    ln_args, ln_kw, row_cnt = (d, d, 0.0, d, d, 0), {}, 0
    if ln_next is not None:
        if kernel_kind == "tma" or epi["OUT_KIND"] != 2:
            raise ValueError("ln_next needs a float output and a tiled or split-K config")
        g, b, eps, q_inv, q = ln_next
        if q.shape != (M, N) or q.dtype != torch.int8 or q.stride(-1) != 1:
            raise ValueError(f"ln_next's q must be int8 ({M}, {N}) with unit column stride, got {q.dtype} "
                             f"{tuple(q.shape)}")
        ln_args = (g, b, float(eps), q_inv, q, q.stride(0))
        ln_kw = dict(LN_TAIL=True, LN_BLOCK=ln_block(N))
        row_cnt = triton.cdiv(M, bm)

    if kernel_kind == "tma" and K % 16 == 0 and M > 0:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if not _tma_ok(x2):
            x2 = x2.clone()  # a fresh allocation: 16-byte aligned, rows of K bytes
        if not _tma_ok(w):
            w = w.clone()
        sub = c.get("EPI_SUBTILE", 1)
        ws = bool(c.get("WARP_SPECIALIZE", False))
        x_desc = TensorDescriptor(x2, [M, K], [x2.stride(0), 1], [bm, bk])
        w_desc = TensorDescriptor(w, [N, K], [w.stride(0), 1], [bn, bk])
        # Triton 3.6's Hopper warp specialization fails on a TMA store in the epilogue and skips flattened
        # loops (compiled for sm_90 on a CPU): its configs store with pointers and keep the loops nested
        tma_store = (N * out.element_size()) % 16 == 0 and not ws
        out_desc = TensorDescriptor(out, [M, N], [N, 1], [bm, bn // sub]) if tma_store else None
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        progs = (num_sms(x2.device.index) * c.get("CTAS_PER_SM", 1)) if x2.is_cuda else 4
        progs = max(1, min(progs, tiles))
        kernels["tma"][(progs,)](
            x_desc, w_desc, out_desc, out, alpha_, bias_, inv_, res_, M, N, K, out.stride(0), stride_r, **epi,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=c.get("GROUP_M", 8), NUM_PROGS=progs, EPI_SUBTILE=sub,
            TMA_STORE=tma_store, WARP_SPECIALIZE=ws, FLATTEN=not ws, num_warps=c["num_warps"],
            num_stages=c["num_stages"], enable_fp_fusion=False)
        return out

    if split > 1:
        k_per_split = triton.cdiv(triton.cdiv(K, bk), split) * bk
        # the tiles' counters, then the row blocks' (ln_next)
        ws, cnt = _splitk_ws.get(x2.device, tiles * bm * bn, tiles + row_cnt)
        kernels["splitk"][(tiles, split)](
            x2, w, out, alpha_, bias_, inv_, res_, ws, cnt, M, N, K, x2.stride(0), w.stride(0), out.stride(0),
            stride_r, k_per_split, *ln_args, cnt[tiles:] if row_cnt else d, **epi, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, SPLIT_K=split, EVEN_K=(K == split * k_per_split), num_warps=c["num_warps"],
            num_stages=c["num_stages"], enable_fp_fusion=False, EARLY_EPI=_early(c), **ln_kw, **_pdl_args(x2, w))
        return out

    # the tiled kernel (also where a TMA config meets K % 16 != 0: same tiles, pointer loads)
    row_cnt_t = _splitk_ws.get(x2.device, 0, row_cnt)[1] if row_cnt else d
    kernels["tiled"][(tiles,)](
        x2, w, out, alpha_, bias_, inv_, res_, M, N, K, x2.stride(0), w.stride(0), out.stride(0), stride_r,
        *ln_args, row_cnt_t, **epi, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=c.get("GROUP_M", 8),
        EVEN_K=(K % bk == 0), num_warps=c["num_warps"], num_stages=c["num_stages"], enable_fp_fusion=False,
        EARLY_EPI=_early(c), **ln_kw, **_pdl_args(x2, w))
    return out


def int8_ln_linear_triton(x2: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, x_inv: torch.Tensor,
                          w: torch.Tensor, alpha: torch.Tensor, bias32: torch.Tensor | None, act: int,
                          out_dtype: torch.dtype, out_inv: torch.Tensor | None, config: dict,
                          residual: torch.Tensor | None = None, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """int8_linear_triton of quantize(LayerNorm(x2), 1 / x_inv) in one kernel: x2 float (M, K) (rows with unit
    column stride), ln_w / ln_b (K,) the LayerNorm's weight and bias, x_inv fp32 (1,) the linear's input
    1/scale; the rest as int8_linear_triton, for a tiled config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages). q_out: int8 (M, K), written with the quantized input (tests)."""
    import triton

    x2, w, out, (alpha_, bias_, inv_, res_, stride_r), epi = _operands(x2, w, alpha, bias32, act, out_dtype, out_inv,
                                                                      residual)
    M, K = x2.shape
    N = w.shape[0]
    c = config
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _kernels()["ln_tiled"][grid](
        x2, ln_w, ln_b, x_inv, float(eps), w, out, alpha_, bias_, inv_, res_,
        q_out if q_out is not None else _dummy(x2.device), M, N, K, x2.stride(0), w.stride(0), out.stride(0),
        stride_r, **epi, WRITE_Q=q_out is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LN_BLOCK=ln_block(K),
        num_warps=c["num_warps"], num_stages=c["num_stages"], enable_fp_fusion=False, **_pdl_args(x2, w))
    return out


def ln_block(K: int) -> int:
    """The fused LayerNorm's chunk over K for its statistics: 256, or K's next power of two if smaller."""
    return min(256, 1 << max(0, (K - 1).bit_length()))
