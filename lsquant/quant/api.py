"""Public quantize / dequantize / fake_quantize: argument checks that say how to fix a mistake, then the ops."""
from __future__ import annotations

import torch

from lsquant import ops

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}; convert it with "
                        f"{name}.float() first")


def check_axis(axis: int | None, ndim: int) -> int | None:
    """Normalise axis (negative counts from the end); ValueError when out of range."""
    if axis is None:
        return None
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int or None (per-tensor), got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of {ndim} dimensions: use an axis in "
                         f"[{-ndim}, {ndim - 1}], or axis=None for one clip per tensor")
    return axis % ndim


def as_clip(clip, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """clip (float or tensor) -> fp32 tensor on x's device, checked: right shape, finite and > 0."""
    t = torch.as_tensor(clip, dtype=torch.float32, device=x.device)
    if axis is None:
        if t.numel() != 1:
            raise ValueError(f"per-tensor quantization takes one clip value, got {t.numel()}; pass axis=k "
                             "for one clip per channel")
        t = t.reshape(())
    elif t.shape != (x.shape[axis],):
        raise ValueError(f"per-channel clip along axis {axis} must have shape ({x.shape[axis]},), got "
                         f"{tuple(t.shape)}")
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        value = t.reshape(-1)[bad.reshape(-1)][0].item()
        raise ValueError(f"clip must be positive and finite, got {value}: a clip of zero or below has no "
                         "scale; calibrate the quantizer (lsquant.calibrate) or set the clip from the data's "
                         "range, e.g. x.abs().amax()")
    return t


def quantize(x: torch.Tensor, clip, axis: int | None = None) -> torch.Tensor:
    """Symmetric int8 quantization. x: float tensor (fp32/fp16/bf16, any shape); clip: a float or tensor
    (one value, or shape ``(x.shape[axis],)`` per channel) -> int8 tensor shaped like x, values in
    [-127, 127]. scale = clip / 127; rounding is half to even."""
    check_float(x)
    axis = check_axis(axis, x.dim())
    return ops.quantize(x, as_clip(clip, x, axis), axis)


def dequantize(q: torch.Tensor, clip, axis: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 tensor -> float tensor of dtype: q * clip / 127."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    axis = check_axis(axis, q.dim())
    return ops.dequantize(q, as_clip(clip, q, axis), axis, dtype)


def fake_quantize(x: torch.Tensor, clip, axis: int | None = None) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, differentiable: straight-through for x, LSQ for a clip that
    requires grad (see :func:`lsquant.quant.ref.fake_quantize_grad_ref`)."""
    check_float(x)
    axis = check_axis(axis, x.dim())
    if isinstance(clip, torch.Tensor) and clip.requires_grad:
        as_clip(clip.detach(), x, axis)  # check only; keep the graph to the caller's tensor
        return ops.fake_quantize(x, clip.reshape(()) if axis is None else clip, axis)
    return ops.fake_quantize(x, as_clip(clip, x, axis), axis)
