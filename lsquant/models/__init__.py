"""Whole models built from lsquant layers, and converters to and from Hugging Face models."""
from .transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]
