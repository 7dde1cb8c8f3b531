"""The quantization math in one place: quantize, dequantize, fake-quantize, calibration, TensorQuantizer and
the mode switches. Numerics: symmetric int8 in [-127, 127], scale = clip / 127, round half to even."""
from .api import dequantize, fake_quantize, quantize
from .calib import METHODS, Calibrator
from .calibrate import calibrate, quantizers
from .modes import calibrate_mode, disable_quant, enable_quant, exact_gemm, exact_gemm_on, qat_mode
from .quantizer import CALIBRATE, DISABLED, QUANT, TensorQuantizer
from .ref import QMAX

__all__ = [
    "quantize", "dequantize", "fake_quantize", "Calibrator", "METHODS", "calibrate", "quantizers",
    "enable_quant", "disable_quant", "calibrate_mode", "qat_mode", "exact_gemm", "exact_gemm_on", "TensorQuantizer",
    "DISABLED", "CALIBRATE", "QUANT", "QMAX",
]
