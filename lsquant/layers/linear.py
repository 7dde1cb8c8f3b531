"""QuantLinear: nn.Linear with an input quantizer (per-tensor, learnable clip) and a weight quantizer
(per output channel, clip from the weight's own range)."""
from __future__ import annotations

import torch
from torch import nn

from lsquant.quant import TensorQuantizer

from .base import quant_linear


class QuantLinear(nn.Linear):
    """Drop-in for ``nn.Linear(in_features, out_features, bias)``; loads an nn.Linear state dict as is.

    x: (..., in_features) -> (..., out_features). Quantization is off until ``model.apply(enable_quant)``;
    the input clip must be calibrated first (``lsquant.calibrate``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 input_calib_method: str = "percentile"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_quantizer = TensorQuantizer(learnable=True, calib_method=input_calib_method)
        self.weight_quantizer = TensorQuantizer(axis=0, num_channels=out_features, dynamic=True)
        if device is not None:
            self.input_quantizer.to(device)
            self.weight_quantizer.to(device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        q.load_state_dict(linear.state_dict())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias, self.input_quantizer, self.weight_quantizer)
