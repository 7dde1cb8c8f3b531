"""LayerNorm over the last dimension: fused CUDA kernel (csrc/kernels/layernorm.cu) and its reference, alone,
fused with the per-tensor fake-quantize of the next linear's input (QAT), or emitting that input as int8
(inference: :func:`layer_norm_quant`).

x: (..., H) fp32/fp16/bf16; weight, bias: (H,) same dtype; y: like x. Statistics and the affine transform in
fp32, one rounding to x's dtype at the end. The kernel saves mean and rstd (fp32, one per row) for backward.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .build import load
from .dropout import acc
from .quantize import _kernel_clip, fake_quantize, quantize_ref


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Differentiable; computes in fp32 and rounds once to x's dtype."""
    H = x.shape[-1]
    return F.layer_norm(acc(x), (H,), acc(weight), acc(bias), eps).to(x.dtype)


def layer_norm_fake_quant_ref(x, weight, bias, eps: float, clip: torch.Tensor):
    """(y, fake_quantize(y, clip)): LayerNorm then the per-tensor fake-quantize of lsquant.ops (STE for y, LSQ for
    a clip that requires grad)."""
    y = layer_norm_ref(x, weight, bias, eps)
    return y, fake_quantize(y, clip, None)


def layer_norm_quant_ref(x, weight, bias, eps: float, clip: torch.Tensor, float_out: bool = True):
    """(y or None, q): y = :func:`layer_norm_ref` (x's dtype), q = quantize_ref(y, clip) int8 (per-tensor clip,
    one value), from y as rounded to x's dtype. The CPU path and the oracle of :func:`layer_norm_quant`."""
    y = layer_norm_ref(x, weight, bias, eps)
    return (y if float_out else None), quantize_ref(y, clip)


_NONE = torch.empty(0)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm, and with a clip also yq = fake_quantize(y): outputs (y, yq)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, clip, pdl=False):
        H = x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()
        kclip = _kernel_clip(clip, x) if clip is not None else _NONE.to(x.device)
        y, mean, rstd, yq = load().ln_fwd(x2, weight.contiguous(), bias.contiguous(), float(eps), kclip, bool(pdl))
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
            return None, None, None, None, None, None
        gx, gw, gb, gc = load().ln_bwd(gy, gq, x2, weight.contiguous(), bias.contiguous(), mean, rstd, kclip)
        gclip = None
        if ctx.clip_meta is not None and ctx.needs_input_grad[4]:
            shape, dtype, device = ctx.clip_meta
            gc = gc if gc.numel() else torch.zeros(1, device=x2.device)
            gclip = gc.reshape(shape).to(device=device, dtype=dtype)
        return gx.view(ctx.x_shape), gw.to(weight.dtype), gb.to(bias.dtype), None, gclip, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               pdl: bool = False) -> torch.Tensor:
    """The fused kernel on CUDA tensors, :func:`layer_norm_ref` elsewhere. pdl: launch it with programmatic
    dependent launch (the decode step's kernels, where ``lsquant.inference.pdl.enabled`` says it runs); the same
    values either way."""
    if not x.is_cuda:
        return layer_norm_ref(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps, None, bool(pdl))


def layer_norm_fake_quant(x, weight, bias, eps: float, clip: torch.Tensor):
    """(y, yq): LayerNorm and the fake-quantized y for the next linear (per-tensor clip, fp32, one value; it gets
    the LSQ gradient when it requires grad). One kernel each way on CUDA; :func:`layer_norm_fake_quant_ref`
    elsewhere."""
    if not x.is_cuda:
        return layer_norm_fake_quant_ref(x, weight, bias, eps, clip)
    return _LayerNorm.apply(x, weight, bias, eps, clip)


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _check_quant_args(x, weight, bias, clip) -> None:
    """Input checks of :func:`layer_norm_quant` that say how to fix a mistake (no device synchronisation: the
    clip's value is not read here)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("clip", clip)):
        if not isinstance(t, torch.Tensor):
            hint = (" (torch.tensor([clip], device=x.device): the kernel reads it on the device)"
                    if name == "clip" else "")
            raise TypeError(f"{name} must be a torch.Tensor{hint}, got {type(t).__name__}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., H) with H >= 1, got shape {tuple(x.shape)}")
    H = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (H,):
            raise ValueError(f"{name} must have shape ({H},) to match x's last dimension, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must have x's dtype and device ({x.dtype}, {x.device}); "
                            f"convert it with {name}.to(x)")
    if clip.numel() != 1:
        raise ValueError(f"clip must hold one value (a per-tensor clip), got shape {tuple(clip.shape)}")
    if not clip.is_floating_point():
        raise TypeError(f"clip must be a float tensor (float32), got {clip.dtype}")
    if clip.device != x.device:
        raise ValueError(f"clip is on {clip.device} but x on {x.device}: move it with clip.to(x.device) once, outside "
                         "any CUDA graph capture")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias, clip)):
        raise RuntimeError("layer_norm_quant is inference only (int8 output, no gradient), and an input requires "
                           "grad: call it under torch.no_grad() or torch.inference_mode(), or train with "
                           "layer_norm_fake_quant")


def _layer_norm_quant_cuda(x, weight, bias, eps: float, clip: torch.Tensor, float_out: bool, pdl: bool = False):
    """The kernel call (arguments already checked): one launch, no host synchronisation."""
    H = x.shape[-1]
    y, q = load().ln_quant_fwd(x.reshape(-1, H).contiguous(), weight.contiguous(), bias.contiguous(), float(eps),
                               _kernel_clip(clip, x), bool(float_out), bool(pdl))
    return (y.view(x.shape) if float_out else None), q.view(x.shape)


def layer_norm_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, clip: torch.Tensor,
                     float_out: bool = True, pdl: bool = False):
    """LayerNorm that also emits the next linear's int8 input (inference; one kernel on CUDA instead of
    :func:`layer_norm` then :func:`lsquant.ops.quantize`).

    x: (..., H) fp32/fp16/bf16; weight, bias: (H,) x's dtype; clip: one positive value (any shape of one
    element, float, on x's device; read by the kernel on the device, so the call is CUDA-graph capturable; its
    value is not checked here, see :func:`lsquant.quant.api.as_clip`).
    Returns (y, q): y (..., H) in x's dtype, bit-identical to ``layer_norm(x, weight, bias, eps)``, or None when
    float_out is False (then not written); q (..., H) int8 = ``quantize(y, clip)`` (per-tensor, scale
    clip / 127, round half to even, [-127, 127]) of that rounded y, bit-identical to the two-kernel path.
    No autograd: raises if an input requires grad while grad mode is on (call it under torch.no_grad() or
    torch.inference_mode()). pdl: as :func:`layer_norm`'s. :func:`layer_norm_quant_ref` off CUDA."""
    _check_quant_args(x, weight, bias, clip)
    if not x.is_cuda:
        return layer_norm_quant_ref(x, weight, bias, eps, clip, float_out)
    return _layer_norm_quant_cuda(x, weight, bias, eps, clip, float_out, pdl)
