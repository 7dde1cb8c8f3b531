"""Switches for ``model.apply(...)``: each acts on the module it is given if that module is a quantizer or an
lsquant layer (anything with ``set_quant_mode``); ``apply`` visits the whole tree."""
from __future__ import annotations

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
