"""The fused training layers, each with a config dataclass; ``graphed`` captures them (or a model built from
them) in CUDA graphs."""
from .config import CrossEntropyConfig, EmbeddingConfig, TransformerLayerConfig
from .cross_entropy import CrossEntropyLayer
from .embedding import TransformerEmbeddingLayer
from .graphs import graphed
from .linear import QuantLinear
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "QuantLinear",
    "TransformerLayerConfig", "EmbeddingConfig", "CrossEntropyConfig", "TransformerEncoderLayer",
    "TransformerDecoderLayer", "TransformerEmbeddingLayer", "CrossEntropyLayer", "graphed",
]
