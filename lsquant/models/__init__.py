"""Whole models built from lsquant layers, and converters to and from Hugging Face models."""
from .hf import (config_from_hf_bert, encoder_layer_from_hf_bert, encoder_layer_to_hf_bert_state_dict,
                 encoder_layers_from_hf_bert, padding_mask_from_hf)
from .transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig", "config_from_hf_bert", "encoder_layer_from_hf_bert",
           "encoder_layer_to_hf_bert_state_dict", "encoder_layers_from_hf_bert", "padding_mask_from_hf"]
