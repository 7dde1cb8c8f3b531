"""What the fused layers share: parameters in one flat buffer, the quantizer pair of a linear, and the input
checks that turn a bad call into a clear exception before any kernel runs."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from lsquant.quant import QUANT, TensorQuantizer, exact_gemm_on
from lsquant.quant.ref import quantize_ref

ALIGN = 8  # elements: every view starts on a 16-byte boundary in fp16/bf16 (the kernels' vector loads)


class FlatParamLayer(nn.Module):
    """A module whose float weights are views of one contiguous ``nn.Parameter`` (``self.flat``): one tensor
    for the optimizer (LightSeq measured 40-50% faster optimizer steps) and for gradient all-reduce.

    ``self.w(name)`` returns the view of a weight (recomputed on each call, so ``.to(dtype)`` and
    ``load_state_dict`` keep working). ``per_weight_state_dict()`` and ``load_state_dict`` with per-weight
    keys convert to and from ordinary state dicts.
    """

    config = None  # set by subclasses

    def _init_flat(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
        self._shapes = dict(shapes)
        self._offsets = {}
        total = 0
        for name, shape in shapes.items():
            self._offsets[name] = total
            total += -(-math.prod(shape) // ALIGN) * ALIGN
        self.flat = nn.Parameter(torch.zeros(total, dtype=dtype))

    def w(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        start = self._offsets[name]
        return self.flat[start:start + math.prod(shape)].view(shape)

    def weight_names(self) -> list[str]:
        return list(self._shapes)

    def per_weight_state_dict(self) -> dict[str, torch.Tensor]:
        """{weight name: tensor copy}, the float weights only (quantizer clips are in ``state_dict()``)."""
        return {n: self.w(n).detach().clone() for n in self._shapes}

    def load_weights(self, weights: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy per-weight tensors into the flat buffer (shapes checked, dtype and device converted)."""
        missing = [n for n in self._shapes if n not in weights]
        unexpected = [k for k in weights if k not in self._shapes]
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}: missing weights {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for n, t in weights.items():
                if n not in self._shapes:
                    continue
                if tuple(t.shape) != self._shapes[n]:
                    raise ValueError(f"{type(self).__name__}.{n} has shape {self._shapes[n]}, got {tuple(t.shape)}")
                self.w(n).copy_(t)

    def _apply(self, fn, recurse=True):
        # .half()/.to(bfloat16) converts the float weights; the quantizers' clips stay fp32 (a bf16 clip would
        # move the scale by up to 2^-8, shifting every value near a level boundary, and fp16 overflows at 65504)
        out = super()._apply(fn, recurse)
        for m in self.modules():
            if isinstance(m, TensorQuantizer) and m.clip.is_floating_point() and m.clip.dtype != torch.float32:
                m.clip.data = m.clip.data.float()
        return out

    # config travels in the state dict (principle 8)
    def get_extra_state(self):
        return {"config": self.config.to_dict(), "class": type(self).__name__}

    def set_extra_state(self, state):
        other = type(self.config).from_dict(state["config"])
        for f in self._shape_fields:
            if getattr(other, f) != getattr(self.config, f):
                raise ValueError(f"checkpoint has {f}={getattr(other, f)}, this {type(self).__name__} has "
                                 f"{getattr(self.config, f)}: build the layer from the checkpoint's config")

    _shape_fields: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # per-weight keys (an exported or converted state dict) -> the flat buffer
        if prefix + "flat" not in state_dict and any(prefix + n in state_dict for n in self._shapes):
            flat = self.flat.detach().clone()
            for n, shape in self._shapes.items():
                key = prefix + n
                if key in state_dict:
                    t = state_dict.pop(key)
                    if tuple(t.shape) != shape:
                        error_msgs.append(f"{key}: shape {tuple(t.shape)}, expected {shape}")
                        continue
                    start = self._offsets[n]
                    flat[start:start + math.prod(shape)].copy_(t.reshape(-1))
                elif strict:
                    missing_keys.append(key)
            state_dict[prefix + "flat"] = flat
        if prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def quant_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, input_quantizer: TensorQuantizer,
                 weight_quantizer: TensorQuantizer, prequantized: bool = False) -> torch.Tensor:
    """``F.linear(input_quantizer(x), weight_quantizer(w), b)``: x (..., K), w (N, K) -> (..., N); prequantized: x
    was already fake-quantized with input_quantizer's clip (by a fused kernel). Inside ``lsquant.exact_gemm()``
    with both quantizers in quant mode, the same function on the int8 levels with exact dot products
    (:func:`exact_quant_linear`)."""
    if exact_gemm_on() and input_quantizer.mode == QUANT and weight_quantizer.mode == QUANT:
        return exact_quant_linear(x, w, b, input_quantizer, weight_quantizer)
    return F.linear(x if prequantized else input_quantizer(x), weight_quantizer(w), b)


def exact_quant_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, input_quantizer: TensorQuantizer,
                       weight_quantizer: TensorQuantizer) -> torch.Tensor:
    """The fake-quant linear computed as the int8 engine computes it: levels = quantize(x), quantize(w) (the
    project's rounding, lsquant.quant.ref), an exact integer GEMM, then ``fp32(acc) * alpha[n] + bias[n]`` rounded
    to x's dtype (lsquant.inference.gemm.int8_linear_ref, the engine's oracle). x may already be fake-quantized: its
    levels come back exactly (x_hat = level * scale rounded to x's dtype is within 2^-9 relative of it, bf16's
    rounding, so x_hat * inv_scale lies within 127 * 2^-8 < 0.5 of the level). No gradient: evaluation only."""
    from lsquant.inference.gemm import int8_linear_ref  # lsquant.inference imports the layers

    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        raise RuntimeError("lsquant.exact_gemm() evaluates a quantized model and has no gradient: decode or "
                           "evaluate under torch.no_grad(), and train outside exact_gemm()")
    for q, t in ((input_quantizer, x), (weight_quantizer, w)):
        if not q.is_initialized():
            q(t)  # the quantizer's own "never set: run lsquant.calibrate" error
    if input_quantizer.axis is not None:
        raise ValueError(f"exact_gemm: {input_quantizer._name()} quantizes per channel; the int8 GEMM takes a "
                         "per-tensor activation clip")
    if weight_quantizer.axis is not None and weight_quantizer.axis % w.dim() != 0:
        raise ValueError(f"exact_gemm: {weight_quantizer._name()} quantizes along axis {weight_quantizer.axis}; "
                         "the int8 GEMM takes one weight clip per output channel (axis 0) or per tensor")
    x_clip = input_quantizer.current_clip(x).detach().float()
    w_clip = weight_quantizer.current_clip(w).detach().float().reshape(-1).expand(w.shape[0]).contiguous()
    x_q = quantize_ref(x, x_clip)
    w_q = quantize_ref(w, w_clip, 0)
    return int8_linear_ref(x_q, w_q, x_clip, w_clip, b, out_dtype=x.dtype)


class LinearQuant(nn.Module):
    """The quantizers of one linear: input (per-tensor, learnable clip set by calibration) and weight (per
    output channel, dynamic: the clip is the row's max |w| at every step). ``q(x, w, b)`` is
    ``F.linear(input_quantizer(x), weight_quantizer(w), b)``; in disabled mode both are the identity."""

    def __init__(self, out_features: int, calib_method: str = "percentile"):
        super().__init__()
        self.input_quantizer = TensorQuantizer(learnable=True, calib_method=calib_method)
        self.weight_quantizer = TensorQuantizer(axis=0, num_channels=out_features, dynamic=True)

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                prequantized: bool = False) -> torch.Tensor:
        """prequantized: x was already fake-quantized with input_quantizer's clip by a fused kernel."""
        return quant_linear(x, w, b, self.input_quantizer, self.weight_quantizer, prequantized)

    def fusable_input_clip(self, x: torch.Tensor) -> torch.Tensor | None:
        """The input clip when a kernel before this linear may fake-quantize for it (CUDA, quant mode, per-tensor,
        not dynamic), else None."""
        q = self.input_quantizer
        if not (x.is_cuda and q.mode == QUANT and q.axis is None and not q.dynamic):
            return None
        if not q.is_initialized():  # a host flag after the first True: no device sync per call
            q(x)  # raises TensorQuantizer's own "never set: run lsquant.calibrate" error
        return q.current_clip()


# ---- checks at the boundary (principle 7) ----------------------------------------------------------------

def check_tensor(x: torch.Tensor, name: str, like: torch.Tensor, layer: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != like.device:
        raise ValueError(f"{layer}: {name} is on {x.device} but the layer's parameters are on {like.device}; "
                         f"move one of them (layer.to({x.device}) or {name}.to({like.device}))")
    if x.is_floating_point() and x.dtype != like.dtype:
        raise TypeError(f"{layer}: {name} has dtype {x.dtype} but the layer's parameters are {like.dtype}; "
                        f"convert one of them (layer.to({x.dtype}) or {name}.to({like.dtype}))")


def check_hidden(x: torch.Tensor, name: str, cfg, layer: str, max_len: int | None = None) -> tuple[int, int]:
    """x: (batch, seq, hidden) within the config's limits -> (batch, seq)."""
    if x.dim() != 3 or x.shape[-1] != cfg.hidden_size:
        raise ValueError(f"{layer}: {name} must be (batch, seq_len, hidden_size={cfg.hidden_size}), got shape "
                         f"{tuple(x.shape)}")
    B, L = x.shape[0], x.shape[1]
    check_limits(B, L, cfg, layer, max_len)
    return B, L


def check_limits(B: int, L: int, cfg, layer: str, max_len: int | None = None) -> None:
    max_len = cfg.max_seq_len if max_len is None else max_len
    if L > max_len:
        raise ValueError(f"{layer}: sequence length {L} is over max_seq_len={max_len}; raise max_seq_len in the "
                         "config or split the sequence")
    if B * L > cfg.max_batch_tokens:
        raise ValueError(f"{layer}: batch has {B * L} tokens (batch {B} x seq_len {L}), over max_batch_tokens="
                         f"{cfg.max_batch_tokens}; use smaller batches or raise max_batch_tokens in the config")


def ids_checked(ids: torch.Tensor, check_on_cuda: bool) -> bool:
    """Whether a layer checks these token/target ids against its vocabulary now: always on the CPU; on CUDA (where
    the check is a device-to-host sync) when the layer's check_ids_on_cuda is set and no CUDA graph is being
    captured (a capture cannot sync)."""
    return ids.numel() > 0 and (not ids.is_cuda or (check_on_cuda and not torch.cuda.is_current_stream_capturing()))


def check_padding_mask(mask, B: int, L: int, like: torch.Tensor, name: str, layer: str):
    """(B, L) bool (True = padding) or None; 0/1 integer masks are accepted and converted."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a bool tensor (batch, seq_len), got {type(mask).__name__}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"{layer}: {name} must have shape (batch, seq_len) = ({B}, {L}), got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{layer}: {name} is on {mask.device} but the input is on {like.device}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point():
            raise TypeError(f"{layer}: {name} must be bool (True = padding), got {mask.dtype}; an additive float "
                            "mask is not supported")
        mask = mask != 0
    return mask


def xavier_(t: torch.Tensor, fan_in: int, fan_out: int, gain: float = 1.0) -> None:
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        t.uniform_(-bound, bound)
