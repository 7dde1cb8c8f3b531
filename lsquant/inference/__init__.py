"""The int8 and fp16 inference engines, the GEMM tuner and decoding."""
