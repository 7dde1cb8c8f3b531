"""The int8 and fp16 inference engines, the GEMM tuner and decoding."""

# ---- int8 GEMM (gemm.py, gemm_tuner.py; gemm_triton.py is imported only on CUDA paths) ----
from .gemm import (  # noqa: E402
    Int8Linear,
    epilogue_ref,
    gemm_alpha,
    int8_gemm_ref,
    int8_linear,
    int8_linear_ref,
    int8_mm,
)
from .gemm_tuner import (  # noqa: E402
    MODEL_PRESETS,
    TuningCache,
    model_shapes,
    tune_model,
    tune_shape,
)

__all__ = list(globals().get("__all__", [])) + [
    "Int8Linear", "epilogue_ref", "gemm_alpha", "int8_gemm_ref", "int8_linear", "int8_linear_ref", "int8_mm",
    "MODEL_PRESETS", "TuningCache", "model_shapes", "tune_model", "tune_shape",
]
