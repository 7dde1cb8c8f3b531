"""Quantize, dequantize and fake-quantize: CUDA kernels on CUDA tensors, the references on the CPU.

These are the unchecked fast paths used inside layers (the clip is assumed valid); the public functions
in :mod:`lsquant.quant` check their arguments first. The references live in :mod:`lsquant.quant.ref` (the
one home of the quantization math) and are re-exported here beside the kernels they specify.
"""
from __future__ import annotations

import torch

from lsquant.quant.ref import (  # noqa: F401  (re-exported: the oracle beside its kernels)
    dequantize_ref,
    fake_quantize_grad_ref,
    fake_quantize_ref,
    quantize_ref,
)

from .build import load


def channel_layout(shape: torch.Size, axis: int | None) -> tuple[int, int]:
    """(C, inner) of the [outer, C, inner] view the kernels use; per-tensor is C = 1."""
    n = 1
    for s in shape:
        n *= s
    if axis is None:
        return 1, max(n, 1)
    inner = 1
    for s in shape[axis + 1:]:
        inner *= s
    return shape[axis], max(inner, 1)


def _kernel_clip(clip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return clip.detach().to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()


def quantize(x: torch.Tensor, clip: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """x (fp32/fp16/bf16, any shape) -> int8, same shape."""
    if not x.is_cuda:
        return quantize_ref(x, clip, axis)
    C, inner = channel_layout(x.shape, axis)
    return load().quantize(x.contiguous(), _kernel_clip(clip, x), C, inner)


def dequantize(q: torch.Tensor, clip: torch.Tensor, axis: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (int8) -> dtype, same shape."""
    if not q.is_cuda:
        return dequantize_ref(q, clip, axis, dtype)
    C, inner = channel_layout(q.shape, axis)
    return load().dequantize(q.contiguous(), _kernel_clip(clip, q), C, inner, dtype)


class FakeQuantize(torch.autograd.Function):
    """x_hat = dequantize(quantize(x)); backward per :func:`lsquant.quant.ref.fake_quantize_grad_ref`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor, axis: int | None):
        ctx.axis = axis
        ctx.save_for_backward(x, clip)
        if not x.is_cuda:
            return fake_quantize_ref(x, clip, axis)
        C, inner = channel_layout(x.shape, axis)
        return load().fake_quantize_fwd(x.contiguous(), _kernel_clip(clip, x), C, inner)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, clip = ctx.saved_tensors
        if not x.is_cuda:
            grad_x, grad_clip = fake_quantize_grad_ref(grad_y, x, clip, ctx.axis)
        else:
            C, inner = channel_layout(x.shape, ctx.axis)
            grad_x, grad_clip = load().fake_quantize_bwd(grad_y.contiguous(), x.contiguous(),
                                                         _kernel_clip(clip, x), C, inner)
        grad_clip = (grad_clip.reshape(clip.shape).to(device=clip.device, dtype=clip.dtype)
                     if ctx.needs_input_grad[1] else None)
        return grad_x, grad_clip, None


def fake_quantize(x: torch.Tensor, clip: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Differentiable fake-quantize in x's dtype (gradients to x and to clip)."""
    return FakeQuantize.apply(x, clip, axis)
