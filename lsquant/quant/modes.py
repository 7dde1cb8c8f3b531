"""Switches for ``model.apply(...)``: each acts on the module it is given if that module is a quantizer or an
lsquant layer (anything with ``set_quant_mode``); ``apply`` visits the whole tree."""
from __future__ import annotations

import contextlib
import threading

from torch import nn

from .quantizer import CALIBRATE, DISABLED, QUANT


def _set(module: nn.Module, mode: str) -> None:
    setter = getattr(module, "set_quant_mode", None)
    if callable(setter):
        setter(mode)


def enable_quant(module: nn.Module) -> None:
    """Fake-quantize in the forward (int8 numerics); learnable clips train: ``model.apply(enable_quant)``."""
    _set(module, QUANT)


def disable_quant(module: nn.Module) -> None:
    """Back to the float forward, exactly: ``model.apply(disable_quant)``."""
    _set(module, DISABLED)


def calibrate_mode(module: nn.Module) -> None:
    """Collect calibration statistics with the float forward; :func:`lsquant.calibrate` does this for you."""
    _set(module, CALIBRATE)


def qat_mode(module: nn.Module) -> None:
    """enable_quant plus training mode for this module: ``model.apply(qat_mode)`` readies QAT fine-tuning."""
    _set(module, QUANT)
    module.training = True


_exact = threading.local()


@contextlib.contextmanager
def exact_gemm(enabled: bool = True):
    """Inside ``with lsquant.exact_gemm():`` every quantized linear (input and weight quantizers both in quant mode:
    the lsquant layers, QuantLinear, the embedding's output projection) computes its GEMM on the int8 levels:

        y = fp32(x_levels @ w_levels.T) * (x_scale * w_scale[n]) + bias    (each step one fp32 rounding)

    the int8 engine's arithmetic (lsquant.inference.gemm, steps 1-3), on any device. It is the same function as the
    fake-quant forward, F.linear(x_scale * x_levels, w_scale * w_levels, bias), with its dot products exact: a
    fake-quant GEMM in fp32 rounds ~sqrt(K) partial sums, in an order that depends on the library, the device and
    the GEMM's shape, and the next quantizer turns that noise into whole int8 steps near its rounding boundaries
    (recipes/mt/RESULTS.md: the fake-quant model on CUDA reproduced its own greedy output, teacher-forced, on
    97.7% of a test set). Exact dot products make a quantized model's output independent of summation order, so
    it can be compared with the engine token for token. Evaluation only (no gradient): use it under
    ``torch.no_grad()``. Not thread-crossing: it holds for the thread that entered it."""
    saved = getattr(_exact, "on", False)
    _exact.on = bool(enabled)
    try:
        yield
    finally:
        _exact.on = saved


def exact_gemm_on() -> bool:
    """Whether this thread is inside :func:`exact_gemm`."""
    return getattr(_exact, "on", False)
