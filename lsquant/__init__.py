"""lsquant: int8 quantization-aware training, post-training quantization, export and inference for
Transformer models on NVIDIA GPUs.

Importing lsquant never initialises CUDA and never builds anything: the CUDA extension is compiled on the
first CUDA call (or by ``lsquant build``).
"""
__version__ = "0.1.0"

from .quant import (  # noqa: E402  (the quantization core first: ops and layers import it)
    TensorQuantizer,
    calibrate,
    calibrate_mode,
    dequantize,
    disable_quant,
    enable_quant,
    exact_gemm,
    fake_quantize,
    qat_mode,
    quantize,
)
from .layers import (  # noqa: E402
    CrossEntropyLayer,
    QuantLinear,
    TransformerDecoderLayer,
    TransformerEmbeddingLayer,
    TransformerEncoderLayer,
)

__all__ = [
    "__version__", "TensorQuantizer", "calibrate", "calibrate_mode", "dequantize", "disable_quant",
    "enable_quant", "exact_gemm", "fake_quantize", "qat_mode", "quantize", "QuantLinear",
    "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEmbeddingLayer", "CrossEntropyLayer",
]
