"""The fused training layers, each with a config dataclass."""
from .linear import QuantLinear

__all__ = ["QuantLinear"]
