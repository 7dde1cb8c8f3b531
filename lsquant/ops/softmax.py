"""Masked softmax over attention scores with dropout on the probabilities (csrc/kernels/softmax.cu).

scores: (B, nH, Lq, Lk) fp32/fp16/bf16, multiplied by ``scale`` (1/sqrt(head_dim)) inside the kernel;
key_padding_mask: (B, Lk) bool, True = padding (torch's convention), or None; causal: query i sees key j iff j <= i + (Lk - Lq) (the offset lets Lq new queries attend
to a cache of Lk - Lq earlier keys). Returns probs (B, nH, Lq, Lk) in scores' dtype, dropout applied. A row whose keys are
all masked gives zeros (torch gives NaN there). Computed in fp32 and rounded once. seed: an int or an int64
tensor of one element (lsquant.ops.dropout: on CUDA the kernels read it from device memory, graph-safe).
"""
from __future__ import annotations

import torch

from .build import load
from .dropout import acc, apply_dropout_ref, dropout_params, seed_tensor


def attention_mask_ref(B: int, Lq: int, Lk: int, key_padding_mask, causal: bool, device) -> torch.Tensor | None:
    """bool (B, 1, Lq, Lk), True = masked, or None when nothing is masked."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.to(device=device, dtype=torch.bool).reshape(B, 1, 1, Lk).expand(B, 1, Lq, Lk)
    if causal:
        i = torch.arange(Lq, device=device).reshape(Lq, 1)
        j = torch.arange(Lk, device=device).reshape(1, Lk)
        c = (j > i + (Lk - Lq)).reshape(1, 1, Lq, Lk)
        mask = c if mask is None else (mask | c)
    return mask


def masked_softmax_ref(scores, key_padding_mask=None, causal: bool = False, p: float = 0.0, seed=0,
                       offset: int = 0, scale: float = 1.0) -> torch.Tensor:
    B, _, Lq, Lk = scores.shape
    s = acc(scores)
    if scale != 1.0:
        s = s * torch.tensor(scale, dtype=s.dtype)
    mask = attention_mask_ref(B, Lq, Lk, key_padding_mask, causal, s.device)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    probs = torch.where(z > 0, e / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(e))
    return apply_dropout_ref(probs, p, seed, offset).to(scores.dtype)


class _MaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, causal, p, seed, offset, sscale):
        thr, scale = dropout_params(p)
        seed = seed_tensor(seed, scores.device) if thr else None  # read by the kernels; kept for the backward
        probs, dropped = load().softmax_fwd(scores.contiguous(), mask, causal, float(sscale), seed, offset, thr,
                                            scale)
        ctx.args = (float(sscale), offset, thr, scale)
        ctx.save_for_backward(probs, seed)
        return dropped

    @staticmethod
    def backward(ctx, gy):
        probs, seed = ctx.saved_tensors
        sscale, offset, thr, scale = ctx.args
        gx = load().softmax_bwd(gy.contiguous(), probs, sscale, seed, offset, thr, scale)
        return gx, None, None, None, None, None, None


def masked_softmax(scores, key_padding_mask=None, causal: bool = False, p: float = 0.0, seed=0,
                   offset: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Fused on CUDA, :func:`masked_softmax_ref` elsewhere (same arguments, same result)."""
    if scores.dim() != 4:
        raise ValueError(f"scores must be (batch, heads, q_len, k_len), got shape {tuple(scores.shape)}")
    B, _, _, Lk = scores.shape
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Lk):
        raise ValueError(f"key_padding_mask must have shape (batch, k_len) = ({B}, {Lk}), got "
                         f"{tuple(key_padding_mask.shape)}")
    if not scores.is_cuda:
        return masked_softmax_ref(scores, key_padding_mask, causal, p, seed, offset, scale)
    if key_padding_mask is None:
        mask = torch.empty(0, dtype=torch.uint8, device=scores.device)
    else:
        mask = key_padding_mask.to(device=scores.device, dtype=torch.uint8).contiguous()
    return _MaskedSoftmax.apply(scores, mask, bool(causal), p, seed, offset, scale)
