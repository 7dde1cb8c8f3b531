"""Attention of one decoder step over the engines' caches: one fused Triton kernel on CUDA, the reference ops
elsewhere (and as the oracle of the tests).

Self-attention (one new query per row at position t): the step's K and V (from the QKV linear) are written at
position t of the row's cache (quantized with the per-channel K / V clips in the int8 engine), then the query
attends over positions 0..t. The beam reorder never moves the caches: ``anc`` (rows, max_tgt_len) int32 names,
for each row and position j, the cache row that holds the row's key j (the row of its ancestor at step j; every
slot (row, j) is written once, at step j, and never overwritten while the request runs). A reorder by parents
``rows`` is then ``anc = anc[rows]; anc[:, t] = arange`` on a (rows x positions) int32 table (which the beam
search's update does, as ``decoder.history``: lsquant.inference.decoding), instead of
gathering and rewriting every layer's K/V cache (at batch 32, beam 4, Transformer-base, 32 positions: 12 layer
caches of 128 rows x 32 x 512 int8, 25 MB read and written per step, against a 16 KB table).

Cross-attention: row r (beam r % beams of sentence r // beams) attends over its sentence's one copy of the
source keys, with the source padding mask, one program per (row, head). ``cross_beams_kernel`` (opt-in,
LSQUANT_CROSS_BEAMS=1) serves a sentence's beams from one program per (sentence, head), reading the source K/V
once, not once per beam; measured slower on an H100 (see per_sentence).

The kernel (one program per row and head) fuses what the reference runs as ~10 kernels per layer: quantize the
new K/V and write them, gather the cached keys through ``anc``, dequantize, Q K^T, the masked softmax, P V, the
head merge and (int8 engine) the quantize of the context for the output linear. Per program it reads t keys
and values of head_dim bytes (int8) or 2 * head_dim bytes (fp16) and writes head_dim output elements.

Numerics: cached K/V are dequantized to the engine dtype (as ``ops.dequantize``), scores, softmax and the
weighted sum are kept in fp32 (the reference rounds scores and probabilities to the engine dtype between its
kernels: results agree within a few ulps of the engine dtype, not bit for bit), the context is rounded to the
engine dtype once, then quantized exactly as ``ops.quantize`` when an int8 output is asked for.
"""
from __future__ import annotations

import functools
import os

import torch

from lsquant import ops
from lsquant.quant.ref import scale_and_inv

from . import pdl
from .gemm_triton import _dummy, _interpret


def use_kernel(t: torch.Tensor) -> bool:
    """The fused kernel runs for CUDA tensors (or under Triton's CPU interpreter, in tests)."""
    if not (t.is_cuda or _interpret()):
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def kv_scales(kv_clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V clips (2,) -> (scale (2,), 1/scale (2,)) fp32, as lsquant.quant.ref computes them."""
    s, inv = scale_and_inv(kv_clip.float().reshape(2))
    return s.contiguous(), inv.contiguous()


# ------------------------------------------------------------------------------------------------------
# Reference (CPU path and oracle)
# ------------------------------------------------------------------------------------------------------

def self_attention_ref(qkv, cache, anc, t, nhead: int, kv_clip=None, bucket: int | None = None, out_clip=None):
    """qkv (N, 3H) engine dtype; cache (2, R, nH, T, D): K and V (int8 with kv_clip (2,) or engine dtype);
    anc (R, T) int32; t int64 [1] (device). Writes this step's K/V at (row, t), then attends over positions
    0..bucket-1 (positions > t masked; bucket defaults to T) -> ctx (N, H) in the engine dtype, or int8 when
    out_clip (the output linear's input clip) is given."""
    N, H3 = qkv.shape
    H = H3 // 3
    D = H // nhead
    T = cache.shape[3]
    bucket = bucket or T
    dt = qkv.dtype
    new = qkv[:, H:].reshape(N, 2, H)
    if kv_clip is not None:
        new = ops.quantize(new, kv_clip, axis=1)
    new = new.reshape(N, 2, nhead, D).permute(1, 0, 2, 3).unsqueeze(3)            # (2, N, nH, 1, D)
    cache[:, :N].index_copy_(3, t, new.to(cache.dtype))
    pos = torch.arange(bucket, device=qkv.device)
    cur = cache[:, anc[:N, :bucket].long(), :, pos]                               # (N, bucket, 2, nH, D)
    cur = cur.permute(2, 0, 3, 1, 4)                                              # (2, N, nH, bucket, D)
    if kv_clip is not None:
        cur = ops.dequantize(cur, kv_clip, 0, dt)
    q = qkv[:, :H].reshape(N, nhead, 1, D)
    mask = (pos > t).to(torch.uint8).expand(N, bucket)
    probs = ops.masked_softmax(torch.matmul(q, cur[0].transpose(-1, -2)), mask, False, scale=D ** -0.5)
    ctx = torch.matmul(probs, cur[1]).reshape(N, H)
    return ctx if out_clip is None else ops.quantize(ctx, out_clip)


def cross_attention_ref(q, kv, mask, beams: int, out_clip=None, kv_clip=None):
    """q (N, H) engine dtype, N = B * beams; kv (2, B, nH, S, D) engine dtype, or int8 with kv_clip (2,) (K and V
    clips); mask (B, S) bool or uint8, True = padding -> ctx (N, H), or int8 with out_clip."""
    N, H = q.shape
    _, B, nH, S, D = kv.shape
    if kv_clip is not None:
        kv = ops.dequantize(kv, kv_clip, 0, q.dtype)
    qh = q.view(B, beams, nH, D).transpose(1, 2)                                  # (B, nH, beams, D)
    probs = ops.masked_softmax(torch.matmul(qh, kv[0].transpose(-1, -2)), mask.to(torch.uint8), False,
                               scale=D ** -0.5)
    ctx = torch.matmul(probs, kv[1]).transpose(1, 2).reshape(N, H)
    return ctx if out_clip is None else ops.quantize(ctx, out_clip)


# ------------------------------------------------------------------------------------------------------
# The fused kernel
# ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _build(interpret: bool):
    # kernels resolve names in this module's globals (the interpreter does not see closures)
    global triton, tl, _quant, _pdl_enter
    import triton
    import triton.language as tl

    from . import gemm_triton

    gemm_triton._build(interpret)   # binds its jit helpers, built for the same mode
    _quant = gemm_triton._quant     # quantize_ref's rounding in fp32, as the GEMM epilogue does it
    _pdl_enter = gemm_triton._pdl_enter

    @triton.jit
    def decode_attention_kernel(q_ptr, stride_q, new_ptr, stride_new, cache_ptr, s_kv, s_row, s_head, s_pos,
                                anc_ptr, stride_anc, mask_ptr, stride_mask, t_ptr, L, kv_scale_ptr, kv_inv_ptr,
                                out_ptr, stride_o, out_inv_ptr, sm_scale, HD, BEAMS,
                                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                                SELF: tl.constexpr, INT8_KV: tl.constexpr, OUT_INT8: tl.constexpr,
                                USE_PDL: tl.constexpr = False):
        if USE_PDL:   # programmatic dependent launch (lsquant.inference.pdl): wait before any access
            _pdl_enter()
        r = tl.program_id(0)
        h = tl.program_id(1)
        dt = q_ptr.dtype.element_ty
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        col = h * D + offs_d
        q = tl.load(q_ptr + r.to(tl.int64) * stride_q + col, mask=dmask, other=0.0).to(tl.float32)
        head = cache_ptr + h.to(tl.int64) * s_head
        if INT8_KV:
            k_scale = tl.load(kv_scale_ptr)
            v_scale = tl.load(kv_scale_ptr + 1)
        if SELF:
            t = tl.load(t_ptr)
            kn = tl.load(new_ptr + r.to(tl.int64) * stride_new + col, mask=dmask, other=0.0).to(tl.float32)
            vn = tl.load(new_ptr + r.to(tl.int64) * stride_new + HD + col, mask=dmask, other=0.0).to(tl.float32)
            slot = head + r.to(tl.int64) * s_row + t * s_pos + offs_d
            if INT8_KV:
                kq = _quant(kn, tl.load(kv_inv_ptr))
                vq = _quant(vn, tl.load(kv_inv_ptr + 1))
                tl.store(slot, kq.to(tl.int8), mask=dmask)
                tl.store(slot + s_kv, vq.to(tl.int8), mask=dmask)
                kn = (kq * k_scale).to(dt).to(tl.float32)     # what a later step reads back (ops.dequantize)
                vn = (vq * v_scale).to(dt).to(tl.float32)
            else:
                tl.store(slot, kn.to(cache_ptr.dtype.element_ty), mask=dmask)
                tl.store(slot + s_kv, vn.to(cache_ptr.dtype.element_ty), mask=dmask)
            # the new key starts the online softmax; the loop covers the cached positions 0..t-1
            m = tl.sum(q * kn, 0) * sm_scale
            l = tl.full((), 1.0, tl.float32)
            acc = vn
            n_keys = t
            b = r
        else:
            m = tl.full((), float("-inf"), tl.float32)
            l = tl.full((), 0.0, tl.float32)
            acc = tl.zeros((BLOCK_D,), tl.float32)
            n_keys = L
            b = r // BEAMS
        for j0 in range(0, n_keys, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            jm = offs_j < n_keys
            if SELF:
                rows = tl.load(anc_ptr + r.to(tl.int64) * stride_anc + offs_j, mask=jm, other=0).to(tl.int64)
                valid = jm
            else:
                rows = tl.zeros((BLOCK_J,), tl.int64) + b
                pad = tl.load(mask_ptr + b.to(tl.int64) * stride_mask + offs_j, mask=jm, other=1)
                valid = jm & (pad == 0)
            kp = head + rows[:, None] * s_row + offs_j[:, None].to(tl.int64) * s_pos + offs_d[None, :]
            lm = valid[:, None] & dmask[None, :]
            k = tl.load(kp, mask=lm, other=0).to(tl.float32)
            v = tl.load(kp + s_kv, mask=lm, other=0).to(tl.float32)
            if INT8_KV:
                k = (k * k_scale).to(dt).to(tl.float32)
                v = (v * v_scale).to(dt).to(tl.float32)
            s = tl.sum(q[None, :] * k, 1) * sm_scale
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # all masked so far: no NaN from -inf - -inf
            alpha = tl.exp(m - m_use)
            p = tl.exp(s - m_use)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        # a row whose keys are all masked gives zeros (as ops.masked_softmax)
        ctx = tl.where(l > 0, acc / tl.where(l > 0, l, 1.0), 0.0).to(dt)
        optr = out_ptr + r.to(tl.int64) * stride_o + col
        if OUT_INT8:
            tl.store(optr, _quant(ctx.to(tl.float32), tl.load(out_inv_ptr)).to(tl.int8), mask=dmask)
        else:
            tl.store(optr, ctx, mask=dmask)

    @triton.jit
    def cross_beams_kernel(q_ptr, stride_q, kv_ptr, s_kv, s_row, s_head, s_pos, mask_ptr, stride_mask, L,
                           out_ptr, stride_o, out_inv_ptr, sm_scale, BEAMS,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                           OUT_INT8: tl.constexpr, USE_PDL: tl.constexpr = False):
        # cross-attention of a sentence's beams: program (sentence b, head h) loads each block of the source keys
        # and values once for its BEAMS query rows (decode_attention_kernel, one program per row, loads them
        # BEAMS times). Scores, softmax and the weighted sum in fp32 as there (exact fp32 products: IEEE dots,
        # not TF32), the same masking and the same rounding of the context
        if USE_PDL:
            _pdl_enter()
        b = tl.program_id(0)
        h = tl.program_id(1)
        dt = q_ptr.dtype.element_ty
        offs_i = tl.arange(0, BLOCK_B)
        imask = offs_i < BEAMS
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        col = h * D + offs_d
        rows = b.to(tl.int64) * BEAMS + offs_i
        qm = imask[:, None] & dmask[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_q + col[None, :], mask=qm, other=0.0).to(tl.float32)
        head = kv_ptr + b.to(tl.int64) * s_row + h.to(tl.int64) * s_head
        m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_B,), tl.float32)
        acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for j0 in range(0, L, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            jm = offs_j < L
            pad = tl.load(mask_ptr + b.to(tl.int64) * stride_mask + offs_j, mask=jm, other=1)
            valid = jm & (pad == 0)
            kp = head + offs_j[:, None].to(tl.int64) * s_pos + offs_d[None, :]
            lm = valid[:, None] & dmask[None, :]
            k = tl.load(kp, mask=lm, other=0).to(tl.float32)
            v = tl.load(kp + s_kv, mask=lm, other=0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale            # (BLOCK_B, BLOCK_J)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # all masked so far: no NaN from -inf - -inf
            alpha = tl.exp(m - m_use)
            p = tl.exp(s - m_use[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new
        # a row whose keys are all masked gives zeros (as ops.masked_softmax)
        ctx = tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0).to(dt)
        optr = out_ptr + rows[:, None] * stride_o + col[None, :]
        if OUT_INT8:
            tl.store(optr, _quant(ctx.to(tl.float32), tl.load(out_inv_ptr)).to(tl.int8), mask=qm)
        else:
            tl.store(optr, ctx, mask=qm)

    return decode_attention_kernel, cross_beams_kernel


def _kernel():
    return _build(_interpret())[0]


def tile() -> tuple[int, int]:
    """(num_warps, keys per block at head_dim 64) of the kernel: (2, 32). One program per (row, head) is latency
    bound (dependent gathers through ``anc``), so what decides the time at large batch is how many programs an SM
    holds: compiled for sm_90 as launched, 2 warps x 32 keys take 80 registers (self-attention; 64 cross), 12 (16)
    programs an SM, where 4 warps x 64 keys took 128 registers, 4 an SM: at batch 128, beam 4 (4,096 programs) 2.6
    waves instead of 7.8. Each thread holds the same 32 key elements either way, so a block of keys costs the same;
    outputs over 32 tokens take two blocks. ``LSQUANT_ATTN_TILE=warps,keys`` overrides it (comparisons)."""

    v = os.environ.get("LSQUANT_ATTN_TILE")
    if v:
        try:
            w, k = (int(x) for x in v.split(","))
        except ValueError:
            w = k = 0
        if w not in (1, 2, 4, 8) or k not in (16, 32, 64, 128):
            raise ValueError(f"LSQUANT_ATTN_TILE must be warps,keys with warps in 1/2/4/8 and keys in 16..128, got {v!r}")
        return w, k
    return 2, 32


def _launch(q, new, cache, anc, mask, t, L, kv, out_inv, beams, self_attn: bool, nhead: int):
    import triton

    N, H = q.shape[0], q.shape[1] if not self_attn else q.shape[1] // 3
    D = H // nhead
    int8_out = out_inv is not None
    out = torch.empty(N, H, dtype=torch.int8 if int8_out else q.dtype, device=q.device)
    dummy = _dummy(q.device)   # kv scales (no int8 cache) and out_inv (float output) unused
    kv_scale, kv_inv = kv if kv is not None else (dummy, dummy)
    BLOCK_D = triton.next_power_of_2(D)
    warps, keys = tile()
    _kernel()[(N, nhead)](
        q, q.stride(0), new if new is not None else q, new.stride(0) if new is not None else 0,
        cache, cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        anc if anc is not None else t, anc.stride(0) if anc is not None else 0,
        mask if mask is not None else t, mask.stride(0) if mask is not None else 0,
        t, L, kv_scale, kv_inv, out, out.stride(0), out_inv if int8_out else dummy, D ** -0.5, H, beams,
        D=D, BLOCK_D=BLOCK_D, BLOCK_J=max(16, min(keys, keys * 64 // BLOCK_D)), SELF=self_attn,
        INT8_KV=kv is not None, OUT_INT8=int8_out, num_warps=warps, **pdl.launch_args(q.device))
    return out


def _launch_beams(q, kv, mask, L, out_inv, beams, nhead: int):
    """cross_beams_kernel: one program per (sentence, head) over its beams' query rows. 16 rows at least (tl.dot's
    smallest tile; the rows past ``beams`` are masked), 16 keys a block, 2 warps. Like the per-row kernel it is
    latency-bound, so what decides its time is how many waves of programs it takes: compiled for sm_90 as launched
    (head_dim 64) it takes 106 registers, 9 programs an SM, so batch 128 x 8 heads (1,024 programs) is one wave on
    132 SMs, where the per-row kernel's 4,096 programs at 16 an SM take two (4 warps x 32 keys: 111 registers, 4
    an SM, two waves again; 2 x 32: 166)."""
    import triton

    N, H = q.shape
    D = H // nhead
    int8_out = out_inv is not None
    out = torch.empty(N, H, dtype=torch.int8 if int8_out else q.dtype, device=q.device)
    _build(_interpret())[1][(N // beams, nhead)](
        q, q.stride(0), kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), mask, mask.stride(0), L,
        out, out.stride(0), out_inv if int8_out else _dummy(q.device), D ** -0.5, beams,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_B=max(16, triton.next_power_of_2(beams)),
        BLOCK_J=16, OUT_INT8=int8_out, num_warps=2, **pdl.launch_args(q.device))
    return out


def self_attention(qkv, cache, anc, t, nhead: int, kv_clip=None, kv=None, bucket: int | None = None,
                   out_clip=None, out_inv=None):
    """One decoder step's self-attention (see the module docstring). qkv (N, 3H); cache (2, R, nH, T, D), a view
    whose head_dim is contiguous; anc (R, T) int32 with anc[:N, t] already set (row r: r); t int64 [1].
    kv_clip (2,) for an int8 cache (kv: its kv_scales, precomputed); out_clip / out_inv: int8 output for the
    next linear. bucket: the reference's attention length (the kernel reads t itself) -> ctx (N, H)."""
    if not use_kernel(qkv):
        return self_attention_ref(qkv, cache, anc, t, nhead, kv_clip, bucket, out_clip)
    if kv_clip is not None and kv is None:
        kv = kv_scales(kv_clip)
    if out_clip is not None and out_inv is None:
        out_inv = scale_and_inv(out_clip.float().reshape(1))[1]
    # the kernel reads q at column h * D, this step's K at H + h * D and V at 2H + h * D of each qkv row
    return _launch(qkv, qkv[:, qkv.shape[1] // 3:], cache, anc, None, t, 0, kv, out_inv, 1, True, nhead)


def per_sentence(beams: int) -> bool:
    """Whether beam search's cross-attention runs cross_beams_kernel (one program per (sentence, head)):
    LSQUANT_CROSS_BEAMS=1 and beams > 1 (for float K/V: int8 ones always run the per-row kernel). Off by default:
    on an H100 (bench/NOTES_engine.md, run G, two A/B pairs) the per-row kernel gave the int8 engine 2-4% more
    tokens/s at batch 32 and 10-14% more at batch 128, beam 4, although it reads each source block once per
    beam."""
    return beams > 1 and os.environ.get("LSQUANT_CROSS_BEAMS", "0") == "1"


def cross_attention(q, kv, mask, beams: int, out_clip=None, out_inv=None, kv_clip=None, kvs=None):
    """One decoder step's cross-attention: q (N, H), N = B * beams; kv (2, B, nH, S, D) (head_dim
    contiguous), float, or int8 with kv_clip (2,) (kvs: its kv_scales, precomputed); mask (B, S) bool/uint8,
    True = padding -> ctx (N, H), int8 with out_clip / out_inv."""
    if (kv.dtype == torch.int8) != (kv_clip is not None):
        raise ValueError(f"cross-attention K/V of dtype {kv.dtype} {'without' if kv_clip is None else 'with'} "
                         "kv_clip: int8 K/V need their clips, float ones none")
    if not use_kernel(q):
        return cross_attention_ref(q, kv, mask, beams, out_clip, kv_clip)
    if out_clip is not None and out_inv is None:
        out_inv = scale_and_inv(out_clip.float().reshape(1))[1]
    if kv_clip is not None and kvs is None:
        kvs = kv_scales(kv_clip)
    nhead, S = kv.shape[2], kv.shape[3]
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if per_sentence(beams) and kvs is None:
        return _launch_beams(q, kv, mask, S, out_inv, beams, nhead)
    # the position pointer is read by self-attention only: the mask stands in for it
    return _launch(q, None, kv, None, mask, mask, S, kvs, out_inv, beams, False, nhead)
