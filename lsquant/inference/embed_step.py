"""The embedding of one decoder step in one kernel: token row (int8 rows dequantized with their clip), times
sqrt(hidden), plus the position's row, pad tokens zeroed, rounded to the engine dtype.

The engines' reference (``embed_step_ref``, the arithmetic of ops.embedding_ref at a device position) runs
about ten kernels for this per step (row lookup, clip lookup, dequantize, two casts, scale, position lookup,
add, pad mask, cast); the kernel reads one table row and one position row per token and writes one row.
"""
from __future__ import annotations

import functools

import torch

from lsquant import ops
from lsquant.quant.ref import scale_and_inv

from . import pdl
from .attention import _interpret, use_kernel


def embed_step_ref(tokens, rows, clip, pos, t, scale: torch.Tensor, pad: int, dtype) -> torch.Tensor:
    """tokens int64 (N,); rows (V, H) int8 with clip (V,) fp32, or (V, H) in the engine dtype with clip None;
    pos (P, H) engine dtype; t int64 [1]; scale: fp32 0-d (sqrt(hidden)) -> (N, H) of dtype."""
    r = rows.index_select(0, tokens)
    if clip is not None:
        r = ops.dequantize(r, clip.index_select(0, tokens), 0, dtype)
    e = r.float() * scale + pos.index_select(0, t).float()
    return e.masked_fill((tokens == pad)[:, None], 0.0).to(dtype)


@functools.lru_cache(maxsize=1)
def _build(interpret: bool):
    global triton, tl, _pdl_enter
    import triton
    import triton.language as tl

    from . import gemm_triton

    gemm_triton._build(interpret)
    _pdl_enter = gemm_triton._pdl_enter   # programmatic dependent launch (lsquant.inference.pdl)

    @triton.jit
    def embed_step_kernel(tok_ptr, rows_ptr, stride_row, rscale_ptr, pos_ptr, stride_pos, t_ptr, out_ptr, stride_o,
                          scale, pad, H, INT8: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        n = tl.program_id(0)
        dt = out_ptr.dtype.element_ty
        tok = tl.load(tok_ptr + n)
        t = tl.load(t_ptr)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            m = offs < H
            r = tl.load(rows_ptr + tok * stride_row + offs, mask=m, other=0)
            if INT8:
                # ops.dequantize: q * scale in fp32 (scale = clip / 127, computed by torch), rounded to the dtype
                r = (r.to(tl.float32) * tl.load(rscale_ptr + tok)).to(dt)
            e = r.to(tl.float32) * scale + tl.load(pos_ptr + t * stride_pos + offs, mask=m, other=0.0).to(tl.float32)
            e = tl.where(tok == pad, 0.0, e)
            tl.store(out_ptr + n.to(tl.int64) * stride_o + offs, e.to(dt), mask=m)

    return embed_step_kernel


def embed_step(tokens, rows, clip, pos, t, scale: torch.Tensor, pad: int, dtype,
               row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """See embed_step_ref; one Triton kernel on CUDA. row_scale: scale_and_inv(clip)[0] (V,), precomputed by
    callers that run every step."""
    if not use_kernel(pos):
        return embed_step_ref(tokens, rows, clip, pos, t, scale, pad, dtype)
    import triton

    if clip is not None and row_scale is None:
        row_scale = scale_and_inv(clip.float().reshape(-1))[0]

    N, H = tokens.shape[0], rows.shape[1]
    out = torch.empty(N, H, dtype=dtype, device=pos.device)
    _build(_interpret())[(N,)](tokens, rows, rows.stride(0), row_scale if clip is not None else pos, pos, pos.stride(0),
                               t, out, out.stride(0), float(scale), pad, H, INT8=clip is not None,
                               BLOCK_H=min(1024, triton.next_power_of_2(H)), num_warps=4,
                               enable_fp_fusion=False,   # the reference rounds the product, then the sum
                               **pdl.launch_args(pos.device))
    return out
