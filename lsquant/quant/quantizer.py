"""TensorQuantizer: the module every quantized tensor of a layer passes through."""
from __future__ import annotations

import torch
from torch import nn

from lsquant import ops

from .calib import METHODS, Calibrator

DISABLED, CALIBRATE, QUANT = "disabled", "calibrate", "quant"
MODES = (DISABLED, CALIBRATE, QUANT)
MIN_CLIP = 1e-8  # a learned clip is never used below this (its scale would underflow fp32 past ~1e-36)


class _PositiveClip(torch.autograd.Function):
    """clamp(clip, MIN_CLIP) forward, identity backward: the clip stays positive in use, and a clip that an
    optimiser pushed below zero still gets the gradient that brings it back (a plain clamp would freeze it)."""

    @staticmethod
    def forward(ctx, clip):
        return clip.clamp(min=MIN_CLIP)

    @staticmethod
    def backward(ctx, grad):
        return grad


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor to symmetric int8 with a per-tensor or per-channel clip.

    Args:
        axis: None for one clip per tensor; k for one clip per index of dimension k (weights: axis=0).
        num_channels: the size of that dimension (required with axis).
        learnable: the clip is an ``nn.Parameter`` trained by the LSQ gradient (see
            :func:`lsquant.quant.ref.fake_quantize_grad_ref`); otherwise a buffer.
        dynamic: the clip is the tensor's own max |x| (per channel) at every forward: the usual choice for
            weights ("scales from the weight's range"); nothing to calibrate.
        calib_method: default method used by :func:`lsquant.calibrate` ("max", "percentile", "mse").
        init_clip: a starting clip; otherwise the quantizer must be calibrated before it quantizes.

    Modes: ``disabled`` returns its input unchanged (the float model exactly), ``calibrate`` collects
    statistics and returns its input unchanged, ``quant`` fake-quantizes. Set them with
    ``model.apply(lsquant.enable_quant)`` and friends. The clip and whether it has been set are saved in
    ``state_dict``.
    """

    def __init__(self, axis: int | None = None, num_channels: int | None = None, learnable: bool = True,
                 dynamic: bool = False, calib_method: str = "max", init_clip: float | None = None):
        super().__init__()
        if (axis is None) != (num_channels is None):
            raise ValueError("give axis and num_channels together (per-channel) or neither (per-tensor)")
        if num_channels is not None and num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if calib_method not in METHODS:
            raise ValueError(f"unknown calibration method {calib_method!r}: use one of {', '.join(METHODS)}")
        if dynamic and learnable:
            learnable = False  # a clip recomputed from the data at every step has nothing to learn
        if init_clip is not None and not init_clip > 0:
            raise ValueError(f"init_clip must be positive, got {init_clip}")
        self.axis, self.num_channels, self.dynamic, self.calib_method = axis, num_channels, dynamic, calib_method
        self.mode = DISABLED
        shape = () if axis is None else (num_channels,)
        clip = torch.full(shape, 1.0 if init_clip is None else float(init_clip))
        if learnable:
            self.clip = nn.Parameter(clip)
        else:
            self.register_buffer("clip", clip)
        self.register_buffer("initialized", torch.tensor(init_clip is not None or dynamic))
        # a host copy of `initialized` once it is known to be True: the quant-mode forward then never reads the
        # buffer (on CUDA a device-to-host sync per quantizer per call, and impossible under CUDA graph capture)
        self._initialized_host = bool(init_clip is not None or dynamic)
        self.calibrator: Calibrator | None = None

    @property
    def learnable(self) -> bool:
        return isinstance(self.clip, nn.Parameter)

    def extra_repr(self) -> str:
        where = "per-tensor" if self.axis is None else f"axis={self.axis}, channels={self.num_channels}"
        kind = "dynamic" if self.dynamic else ("learnable" if self.learnable else "fixed")
        return f"{where}, {kind} clip, mode={self.mode}"

    # -- modes ---------------------------------------------------------------------------------------------
    def set_quant_mode(self, mode: str, method: str | None = None, **calib_kwargs) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == CALIBRATE and not self.dynamic:
            self.calibrator = Calibrator(method or self.calib_method, self.axis, name=self._name(), **calib_kwargs)
        self.mode = mode

    def _name(self) -> str:
        return getattr(self, "_lsquant_name", "TensorQuantizer")

    def is_initialized(self) -> bool:
        """Whether the clip has been set (calibration, set_clip, init_clip, a loaded state dict, or dynamic). The
        buffer is read once (one sync on CUDA) and the answer kept on the host after it is True; the methods that
        set it, and load_state_dict, keep the host copy in step."""
        if not getattr(self, "_initialized_host", False):
            self._initialized_host = bool(self.initialized)
        return self._initialized_host

    def load_calibration(self) -> torch.Tensor | None:
        """Set the clip from what the calibrator collected; returns it (None for dynamic quantizers)."""
        if self.dynamic:
            return None
        if self.calibrator is None:
            raise RuntimeError(f"{self._name()} has not been in calibrate mode")
        clip = self.calibrator.compute_clip().to(self.clip.device)
        with torch.no_grad():
            self.clip.copy_(clip.reshape(self.clip.shape))
            self.initialized.fill_(True)
        self._initialized_host = True
        self.calibrator = None
        return clip

    def set_clip(self, clip) -> None:
        clip = torch.as_tensor(clip, dtype=torch.float32)
        if not bool((torch.isfinite(clip) & (clip > 0)).all()):
            raise ValueError(f"{self._name()}: clip must be positive and finite, got {clip}")
        with torch.no_grad():
            self.clip.copy_(clip.reshape(self.clip.shape).to(self.clip.device))
            self.initialized.fill_(True)
        self._initialized_host = True

    # -- forward -------------------------------------------------------------------------------------------
    def current_clip(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The clip that quant mode uses (for dynamic quantizers: x's max |x| per channel)."""
        if self.dynamic:
            if x is None:
                raise ValueError("a dynamic quantizer's clip depends on the tensor: pass it")
            a = x.detach().abs()
            if self.axis is None:
                amax = a.amax().float()
            else:
                dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
                amax = a.amax(dim=dims).float() if dims else a.float()
            return amax.clamp(min=MIN_CLIP)
        return _PositiveClip.apply(self.clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == DISABLED:
            return x
        if self.mode == CALIBRATE:
            if self.calibrator is not None:
                self.calibrator.collect(x)
            return x
        if not self.is_initialized():
            raise RuntimeError(f"{self._name()} quantizes with a clip that was never set: run "
                               "lsquant.calibrate(model, batches) first (or give init_clip)")
        if self.axis is not None and x.shape[self.axis] != self.num_channels:
            raise ValueError(f"{self._name()} expects {self.num_channels} channels along axis {self.axis}, "
                             f"got {x.shape[self.axis]}")
        axis = None if self.axis is None else self.axis % x.dim()
        return ops.fake_quantize(x, self.current_clip(x), axis)

    # -- loading a float model's state dict leaves the quantizer as it is --------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + "clip", prefix + "initialized"]
        if not any(k in state_dict for k in keys):
            return  # e.g. an nn.Linear state dict loaded into QuantLinear: keep the current clip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._initialized_host = False  # the loaded buffer decides: read again at the next use
