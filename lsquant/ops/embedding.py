"""Token embedding lookup + scale + positions + dropout (csrc/kernels/embedding.cu) and its reference.

tokens: (B, L) int64; table: (V, H); pos_table: (P, H) with P >= start + L (learned or sinusoidal), same dtype
as table; the position of token (b, l) is start + l (start > 0 in incremental decoding). Output (B, L, H) in
the table's dtype: dropout(scale * table[token] + pos_table[position]) in fp32, and exactly 0 at padding
tokens (which give no gradient). Backward accumulates the table (and learned position) gradients in fp32 with
atomics, then rounds to the table's dtype. seed: an int or an int64 tensor of one element (lsquant.ops.dropout:
on CUDA the kernels read it from device memory, graph-safe).
"""
from __future__ import annotations

import torch

from .build import load
from .dropout import acc, apply_dropout_ref, dropout_params, seed_tensor


def embedding_ref(tokens, table, pos_table, scale: float, padding_idx: int | None, start: int = 0,
                  p: float = 0.0, seed=0, offset: int = 0) -> torch.Tensor:
    B, L = tokens.shape
    positions = torch.arange(start, start + L, device=tokens.device)
    rows = acc(table[tokens])
    e = rows * torch.tensor(scale, dtype=rows.dtype) + acc(pos_table[positions])
    if padding_idx is not None:
        e = e.masked_fill((tokens == padding_idx).unsqueeze(-1), 0.0)
    return apply_dropout_ref(e, p, seed, offset).to(table.dtype)


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, table, pos_table, scale, padding_idx, start, p, seed, offset):
        thr, dscale = dropout_params(p)
        pad = -1 if padding_idx is None else int(padding_idx)
        seed = seed_tensor(seed, table.device) if thr else None  # read by the kernels; kept for the backward
        tokens = tokens.contiguous()
        ctx.args = (float(scale), pad, int(start), offset, thr, dscale)
        ctx.save_for_backward(tokens, seed)
        ctx.shapes = (table.shape, pos_table.shape, table.dtype, pos_table.dtype)
        return load().embedding_fwd(tokens, table.contiguous(), pos_table.contiguous(), float(scale), pad, int(start),
                                    seed, offset, thr, dscale)

    @staticmethod
    def backward(ctx, gy):
        tokens, seed = ctx.saved_tensors
        (V, _), (P, _), tdt, pdt = ctx.shapes
        scale, pad, start, offset, thr, dscale = ctx.args
        need_pos = ctx.needs_input_grad[2]
        gt, gp = load().embedding_bwd(gy.contiguous(), tokens, V, P, need_pos, scale, pad, start, seed, offset, thr,
                                      dscale)
        return (None, gt.to(tdt) if ctx.needs_input_grad[1] else None, gp.to(pdt) if need_pos else None,
                None, None, None, None, None, None)


def embedding(tokens, table, pos_table, scale: float, padding_idx: int | None, start: int = 0, p: float = 0.0,
              seed=0, offset: int = 0) -> torch.Tensor:
    """Fused on CUDA, :func:`embedding_ref` elsewhere. Token ids must be checked by the caller."""
    if not table.is_cuda:
        return embedding_ref(tokens, table, pos_table, scale, padding_idx, start, p, seed, offset)
    return _Embedding.apply(tokens, table, pos_table, scale, padding_idx, start, p, seed, offset)
