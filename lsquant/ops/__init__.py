"""One Python function per fused kernel, each beside its plain-PyTorch ``*_ref``; the lazy CUDA build."""
from .build import BuildError, build, is_built, load
from .quantize import (
    FakeQuantize,
    dequantize,
    dequantize_ref,
    fake_quantize,
    fake_quantize_grad_ref,
    fake_quantize_ref,
    quantize,
    quantize_ref,
)

__all__ = [
    "BuildError", "build", "is_built", "load",
    "FakeQuantize", "dequantize", "dequantize_ref", "fake_quantize", "fake_quantize_grad_ref",
    "fake_quantize_ref", "quantize", "quantize_ref",
]
