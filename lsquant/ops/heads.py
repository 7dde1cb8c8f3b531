"""Attention head split (+ bias) and merge (csrc/kernels/heads.cu) and their references.

- ``split_heads(qkv, bias, nhead, parts)``: qkv (B, L, parts * H), a GEMM output without its bias; bias (parts * H,)
  or None -> ``parts`` contiguous tensors (B, nhead, L, H / nhead): q, k, v (parts=3, self-attention), k, v
  (parts=2, cross-attention K/V) or q alone (parts=1). The bias is added in fp32 and rounded once. Backward: the
  gradients of the parts (an unused one counts as zeros) -> grad qkv (B, L, parts * H) in one kernel, and grad
  bias = the column sum of grad qkv in fp32, rounded to the bias's dtype.
- ``merge_heads(ctx)``: the attention context (B, nhead, L, D) -> (B, L, nhead * D), contiguous. When ctx is
  already laid out as (B, L, nhead, D) (PyTorch's flash attention returns it so) the result is a view, as
  reshape gives: no kernel, no copy.

What they fuse and the bytes they move (b = sizeof(dtype), N = B * L * parts * H elements of qkv; the bias, parts * H
values, stays in L1/L2), against the layers' chunk/view/transpose code:

| op | one kernel moves | replaces |
|---|---|---|
| split fwd | 2 N b, bias added | `parts` `.contiguous()` copies (2 N b) + a bias add after a bias-less GEMM (3 N b) |
| split bwd | 2 N b, unused part = 0 | `parts` reshape copies (2 N b) + the chunks' cat (2 N b), 1 + parts launches |
| merge fwd | 2 N b | the transpose-reshape copy (2 N b): same bytes; a view when ctx is laid out (B, L, nH, D) |
| merge bwd | 2 N b | the view's backward (free) + `.contiguous()` where a consumer needs it (2 N b) |

The bias gradient (fp32 column sum of grad qkv) reads N b either way.

Without a bias the ops are pure copies; with one, every output is ``dtype(fp32(x) + fp32(bias))``: the CUDA
kernels equal the references bit for bit.
"""
from __future__ import annotations

import torch

from .build import load
from .dropout import acc


# ---- references (the CPU path and the tests' oracle) --------------------------------------------------------

def split_heads_ref(qkv: torch.Tensor, bias: torch.Tensor | None, nhead: int, parts: int = 3) -> tuple:
    """qkv (B, L, parts * H), bias (parts * H,) or None -> tuple of ``parts`` contiguous (B, nhead, L, H / nhead)."""
    _check_split(qkv, bias, nhead, parts)
    B, L, N = qkv.shape
    t = qkv if bias is None else (acc(qkv) + acc(bias)).to(qkv.dtype)
    t = t.reshape(B, L, parts, nhead, N // (parts * nhead)).permute(2, 0, 3, 1, 4)
    return tuple(p.contiguous() for p in t.unbind(0))


def merge_heads_ref(ctx: torch.Tensor) -> torch.Tensor:
    """ctx (B, nhead, L, D) -> (B, L, nhead * D), contiguous."""
    _check_merge(ctx)
    B, nH, L, D = ctx.shape
    return ctx.transpose(1, 2).reshape(B, L, nH * D)


# ---- CUDA autograd Functions -------------------------------------------------------------------------------

def _bias_grad(gx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return gx.reshape(-1, gx.shape[-1]).sum(0, dtype=torch.float32).to(dtype)


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, nhead, parts):
        ctx.set_materialize_grads(False)  # an unused part's gradient stays None: the kernel writes zeros for it
        B, L, N = qkv.shape
        ctx.dims = (B, L, nhead, N // (parts * nhead))
        ctx.bias_dtype = None if bias is None else bias.dtype
        outs = load().split_heads_fwd(qkv.contiguous(), None if bias is None else bias.contiguous(), nhead, parts)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grads = [None if g is None else g.contiguous() for g in grads]
        given = [g for g in grads if g is not None]
        if not given:
            return None, None, None, None
        gx = load().split_heads_bwd(grads, given[0], *ctx.dims)
        gb = _bias_grad(gx, ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[1] else None
        return gx, gb, None, None


class _MergeHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.nhead = x.shape[1]
        return load().merge_heads_fwd(x.contiguous())

    @staticmethod
    def backward(ctx, gy):
        return load().merge_heads_bwd(gy.contiguous(), ctx.nhead)


# ---- public ops ------------------------------------------------------------------------------------------------

def _check_split(qkv, bias, nhead: int, parts: int) -> None:
    if parts not in (1, 2, 3):
        raise ValueError(f"parts must be 1 (q), 2 (k, v) or 3 (q, k, v), got {parts!r}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (batch, seq_len, {parts} * hidden), got shape {tuple(qkv.shape)}")
    N = qkv.shape[-1]
    if N % parts or not isinstance(nhead, int) or nhead < 1 or (N // parts) % nhead:
        raise ValueError(f"qkv's last dimension {N} must be parts={parts} x hidden with hidden divisible by "
                         f"nhead={nhead}")
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},) to match qkv's last dimension, got {tuple(bias.shape)}")
        if bias.dtype != qkv.dtype or bias.device != qkv.device:
            raise TypeError(f"bias ({bias.dtype}, {bias.device}) must have qkv's dtype and device ({qkv.dtype}, "
                            f"{qkv.device})")


def _check_merge(ctx) -> None:
    if ctx.dim() != 4:
        raise ValueError(f"ctx must be (batch, nhead, seq_len, head_dim), got shape {tuple(ctx.shape)}")


def split_heads(qkv: torch.Tensor, bias: torch.Tensor | None, nhead: int, parts: int = 3) -> tuple:
    """(qkv + bias) split into ``parts`` contiguous (B, nhead, L, D) tensors, D = qkv.shape[-1] / (parts * nhead).

    qkv: (B, L, parts * H) fp32/fp16/bf16; bias: (parts * H,) in qkv's dtype, or None. Always returns a tuple
    (``q, = split_heads(x, b, nhead, 1)`` for one part). One kernel each way on CUDA."""
    _check_split(qkv, bias, nhead, parts)
    if not qkv.is_cuda:
        return split_heads_ref(qkv, bias, nhead, parts)
    return _SplitHeads.apply(qkv, bias, nhead, parts)


def merge_heads(ctx: torch.Tensor) -> torch.Tensor:
    """ctx (B, nhead, L, D) -> (B, L, nhead * D), contiguous: a view when ctx's memory is already (B, L, nhead, D),
    else one kernel each way on CUDA."""
    _check_merge(ctx)
    B, nH, L, D = ctx.shape
    t = ctx.transpose(1, 2)
    if not ctx.is_cuda or t.is_contiguous():
        return t.reshape(B, L, nH * D)
    return _MergeHeads.apply(ctx)
