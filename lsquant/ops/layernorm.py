"""LayerNorm over the last dimension: fused CUDA kernel (csrc/kernels/layernorm.cu) and its reference, alone or
fused with the per-tensor fake-quantize of the next linear's input (QAT).

x: (..., H) fp32/fp16/bf16; weight, bias: (H,) same dtype; y: like x. Statistics and the affine transform in
fp32, one rounding to x's dtype at the end. The kernel saves mean and rstd (fp32, one per row) for backward.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .build import load
from .dropout import acc
from .quantize import _kernel_clip, fake_quantize


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Differentiable; computes in fp32 and rounds once to x's dtype."""
    H = x.shape[-1]
    return F.layer_norm(acc(x), (H,), acc(weight), acc(bias), eps).to(x.dtype)


def layer_norm_fake_quant_ref(x, weight, bias, eps: float, clip: torch.Tensor):
    """(y, fake_quantize(y, clip)): LayerNorm then the per-tensor fake-quantize of lsquant.ops (STE for y, LSQ for
    a clip that requires grad)."""
    y = layer_norm_ref(x, weight, bias, eps)
    return y, fake_quantize(y, clip, None)


_NONE = torch.empty(0)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm, and with a clip also yq = fake_quantize(y): outputs (y, yq)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, clip):
        H = x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()
        kclip = _kernel_clip(clip, x) if clip is not None else _NONE.to(x.device)
        y, mean, rstd, yq = load().ln_fwd(x2, weight.contiguous(), bias.contiguous(), float(eps), kclip)
        ctx.save_for_backward(x2, weight, bias, mean, rstd, kclip)
        ctx.clip_meta = None if clip is None else (clip.shape, clip.dtype, clip.device)
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        if clip is None:
            return y.view(x.shape)
        return y.view(x.shape), yq.view(x.shape)

    @staticmethod
    def backward(ctx, gy, gq=None):
        x2, weight, bias, mean, rstd, kclip = ctx.saved_tensors
        empty = _NONE.to(x2.device)
        gy = empty if gy is None else gy.reshape(x2.shape).contiguous()
        gq = empty if gq is None else gq.reshape(x2.shape).contiguous()
        if gy.numel() == 0 and gq.numel() == 0:
            return None, None, None, None, None
        gx, gw, gb, gc = load().ln_bwd(gy, gq, x2, weight.contiguous(), bias.contiguous(), mean, rstd, kclip)
        gclip = None
        if ctx.clip_meta is not None and ctx.needs_input_grad[4]:
            shape, dtype, device = ctx.clip_meta
            gc = gc if gc.numel() else torch.zeros(1, device=x2.device)
            gclip = gc.reshape(shape).to(device=device, dtype=dtype)
        return gx.view(ctx.x_shape), gw.to(weight.dtype), gb.to(bias.dtype), None, gclip


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The fused kernel on CUDA tensors, :func:`layer_norm_ref` elsewhere."""
    if not x.is_cuda:
        return layer_norm_ref(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps, None)


def layer_norm_fake_quant(x, weight, bias, eps: float, clip: torch.Tensor):
    """(y, yq): LayerNorm and the fake-quantized y for the next linear (per-tensor clip, fp32, one value; it gets
    the LSQ gradient when it requires grad). One kernel each way on CUDA; :func:`layer_norm_fake_quant_ref`
    elsewhere."""
    if not x.is_cuda:
        return layer_norm_fake_quant_ref(x, weight, bias, eps, clip)
    return _LayerNorm.apply(x, weight, bias, eps, clip)
