"""Bias epilogues of the linears (csrc/kernels/bias_dropout.cu) and their references.

- ``bias_act_dropout``: y = dropout(act(x + bias)), act in {relu, gelu (erf, as torch.nn.GELU())}: the FFN1
  epilogue. Backward regenerates the dropout mask from (seed, offset) and recomputes act'(x + bias) from x.
- ``bias_act_dropout_fake_quant``: fake_quantize(bias_act_dropout(...)) with a per-tensor clip: the FFN1 epilogue
  under QAT, emitting FFN2's quantized input directly (y itself is never written).
- ``bias_dropout_residual``: y = residual + dropout(x + bias): the epilogue of the attention output and FFN2.

x: (..., N) (a GEMM output without its bias), bias: (N,), residual: like x; all one dtype. Everything is
computed in fp32 and rounded once. The bias gradient is grad_x summed over rows in fp32. seed: an int or an int64
tensor of one element (lsquant.ops.dropout: on CUDA the kernels read it from device memory, graph-safe).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .build import load
from .dropout import acc, apply_dropout_ref, dropout_params, seed_tensor
from .quantize import _kernel_clip, fake_quantize

ACTIVATIONS = {"relu": 0, "gelu": 1}


def _act_ref(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")


def bias_act_dropout_ref(x, bias, activation: str, p: float = 0.0, seed=0, offset: int = 0):
    h = acc(x) + acc(bias)
    return apply_dropout_ref(_act_ref(h, activation), p, seed, offset).to(x.dtype)


def bias_act_dropout_fake_quant_ref(x, bias, activation: str, p: float, seed, clip, offset: int = 0):
    return fake_quantize(bias_act_dropout_ref(x, bias, activation, p, seed, offset), clip, None)


def bias_dropout_residual_ref(x, bias, residual, p: float = 0.0, seed=0, offset: int = 0):
    return (acc(residual) + apply_dropout_ref(acc(x) + acc(bias), p, seed, offset)).to(x.dtype)


def _bias_grad(gx: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return gx.reshape(-1, gx.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, act, p, seed, offset, clip):
        thr, scale = dropout_params(p)
        x = x.contiguous()
        seed = seed_tensor(seed, x.device) if thr else None  # read by the kernels; kept for the backward
        kclip = _kernel_clip(clip, x) if clip is not None else torch.empty(0, device=x.device)
        ctx.args = (act, offset, thr, scale)
        ctx.clip_meta = None if clip is None else (clip.shape, clip.dtype, clip.device)
        ctx.save_for_backward(x, bias, kclip, seed)
        return load().bias_act_fwd(x, bias.contiguous(), act, seed, offset, thr, scale, kclip)

    @staticmethod
    def backward(ctx, gy):
        x, bias, kclip, seed = ctx.saved_tensors
        act, offset, thr, scale = ctx.args
        gx, gc = load().bias_act_bwd(gy.contiguous(), x, bias.contiguous(), act, seed, offset, thr, scale, kclip)
        gclip = None
        if ctx.clip_meta is not None and ctx.needs_input_grad[6]:
            shape, dtype, device = ctx.clip_meta
            gclip = gc.reshape(shape).to(device=device, dtype=dtype)
        return gx, _bias_grad(gx, bias), None, None, None, None, gclip


class _BiasDropoutResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, p, seed, offset):
        thr, scale = dropout_params(p)
        seed = seed_tensor(seed, x.device) if thr else None  # read by the kernels; kept for the backward
        ctx.args = (offset, thr, scale)
        ctx.bias_dtype = bias.dtype
        ctx.save_for_backward(seed)
        return load().bias_dropout_residual_fwd(x.contiguous(), bias.contiguous(), residual.contiguous(), seed,
                                                offset, thr, scale)

    @staticmethod
    def backward(ctx, gy):
        (seed,) = ctx.saved_tensors
        offset, thr, scale = ctx.args
        gy = gy.contiguous()
        gx = gy if thr == 0 else load().dropout_bwd(gy, seed, offset, thr, scale)
        gb = gx.reshape(-1, gx.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return gx, gb, gy, None, None, None


def _check(x, bias, residual=None):
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias must have shape ({x.shape[-1]},) to match x's last dimension, got "
                         f"{tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")


def bias_act_dropout(x, bias, activation: str = "relu", p: float = 0.0, seed=0, offset: int = 0):
    """act(x + bias) with dropout p; fused on CUDA. x: (..., N), bias: (N,) -> (..., N) in x's dtype."""
    _check(x, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if not x.is_cuda:
        return bias_act_dropout_ref(x, bias, activation, p, seed, offset)
    return _BiasAct.apply(x, bias, ACTIVATIONS[activation], p, seed, offset, None)


def bias_act_dropout_fake_quant(x, bias, activation: str, p: float, seed, clip: torch.Tensor,
                                offset: int = 0):
    """fake_quantize(act(x + bias) with dropout p, clip): x (..., N), bias (N,), clip fp32 (one value; LSQ gradient
    when it requires grad) -> (..., N) in x's dtype. One kernel each way on CUDA."""
    _check(x, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if not x.is_cuda:
        return bias_act_dropout_fake_quant_ref(x, bias, activation, p, seed, clip, offset)
    return _BiasAct.apply(x, bias, ACTIVATIONS[activation], p, seed, offset, clip)


def bias_dropout_residual(x, bias, residual, p: float = 0.0, seed=0, offset: int = 0):
    """residual + dropout(x + bias); fused on CUDA. x, residual: (..., N), bias: (N,)."""
    _check(x, bias, residual)
    if not x.is_cuda:
        return bias_dropout_residual_ref(x, bias, residual, p, seed, offset)
    return _BiasDropoutResidual.apply(x, bias, residual, p, seed, offset)
