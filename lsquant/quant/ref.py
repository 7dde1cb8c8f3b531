"""The quantization math, in plain PyTorch: the CPU path of every quantize op and the oracle of the CUDA kernels.

Symmetric int8 in [-127, 127] (-128 is never produced, so negation stays exact and int8 x int8 products
are symmetric). For a clip c > 0:

    scale     = c / 127                     (fp32)
    inv_scale = 1 / scale                   (fp32, IEEE division)
    q         = clamp(round(x * inv_scale), -127, 127)   (round half to even)
    x_hat     = q * scale

This is the arithmetic of ``torch.fake_quantize_per_tensor_affine`` (which multiplies by ``1.0f / scale``
too) and of csrc/kernels/quantize.cu (``__frcp_rn``, ``rintf``), so all three agree bit for bit. Inputs in
fp16/bf16 are upcast to fp32 first; outputs are rounded back to the input dtype (round to nearest even).

Channel layout: ``axis=None`` is per-tensor (clip has one value); ``axis=k`` gives one clip per index of
dimension k (clip has shape ``(x.shape[k],)``).
"""
from __future__ import annotations

import torch

QMAX = 127  # the int8 range is [-QMAX, QMAX]
INV_QMAX = float(torch.tensor(1.0 / QMAX, dtype=torch.float32))  # fp32(1/127): the clip-gradient factor


def scale_and_inv(clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """clip (fp32, any shape) -> (scale, 1/scale), both fp32, computed exactly as the kernels do (IEEE division,
    correctly rounded: ``__fdiv_rn`` and ``__frcp_rn`` in csrc/kernels/quant_math.cuh).

    The divisor is a tensor on clip's device, not the number 127: on CUDA, PyTorch divides by a Python number as
    a multiplication by fp32(1/127) (``div_true_kernel_cuda``: "may lose one bit of precision"), which gives
    another scale than the CPU and the kernels for some clips (one ulp, ~4% of clips), so the GPU engine's
    scales would not be the model's."""
    c = clip.float()
    scale = c / torch.full_like(c, QMAX)
    return scale, 1.0 / scale


def channel_shape(clip: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Reshape clip so it broadcasts against a tensor of rank ndim along axis (per-tensor: a 0-d tensor)."""
    if axis is None:
        return clip.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return clip.reshape(shape)


def quantize_ref(x: torch.Tensor, clip: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """x: float tensor (any shape, fp32/fp16/bf16) -> int8 tensor of the same shape."""
    _, inv = scale_and_inv(channel_shape(clip, x.dim(), axis))
    return torch.clamp(torch.round(x.float() * inv), -QMAX, QMAX).to(torch.int8)


def dequantize_ref(q: torch.Tensor, clip: torch.Tensor, axis: int | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q: int8 tensor -> float tensor of dtype, q * scale computed in fp32 then rounded to dtype."""
    scale, _ = scale_and_inv(channel_shape(clip, q.dim(), axis))
    return (q.float() * scale).to(dtype)


def fake_quantize_ref(x: torch.Tensor, clip: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what an int8 engine computes with x."""
    scale, inv = scale_and_inv(channel_shape(clip, x.dim(), axis))
    return (torch.clamp(torch.round(x.float() * inv), -QMAX, QMAX) * scale).to(x.dtype)


def fake_quantize_grad_ref(grad_y: torch.Tensor, x: torch.Tensor, clip: torch.Tensor,
                           axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of fake_quantize -> (grad_x in x's dtype, grad_clip fp32 shaped like clip).

    grad_x: the straight-through estimator, grad_y where round(x / scale) lies in [-127, 127] (the rule of
    torch.fake_quantize_*), 0 elsewhere.

    grad_clip: LSQ (Esser et al., 2020). With q held constant, x_hat = scale * q, so inside the range
    d x_hat / d clip = (q - x / scale) / 127 (the rounding error: it pulls the clip down when the range is
    too wide for the levels), and outside it x_hat = sign(x) * clip, so d x_hat / d clip = sign(x) (it pushes
    the clip up when values are clipped). PACT keeps only the second term, which never lowers a clip that
    is too wide; LSQ balances the two, so a learned clip settles near the MSE-optimal one. No gradient
    scaling is applied here: Adam-type optimisers normalise the step size anyway.
    """
    shaped = channel_shape(clip, x.dim(), axis)
    _, inv = scale_and_inv(shaped)
    t = x.float() * inv
    r = torch.round(t)
    inside = (r >= -QMAX) & (r <= QMAX)
    grad_x = torch.where(inside, grad_y, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device))
    d_clip = torch.where(inside, (r - t) * INV_QMAX, torch.sign(r))
    contrib = grad_y.float() * d_clip
    if axis is None:
        grad_clip = contrib.sum().reshape(clip.shape)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        grad_clip = contrib.sum(dim=dims).reshape(clip.shape) if dims else contrib.reshape(clip.shape)
    return grad_x.to(x.dtype), grad_clip
