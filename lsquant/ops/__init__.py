"""One Python function per fused kernel, each beside its plain-PyTorch ``*_ref``; the lazy CUDA build."""
from .build import BuildError, build, is_built, load
from .quantize import (
    FakeQuantize,
    dequantize,
    dequantize_ref,
    fake_quantize,
    fake_quantize_grad_ref,
    fake_quantize_ref,
    quantize,
    quantize_ref,
)
# Transformer layer kernels (issue 3): each fused op beside its reference.
from .bias_dropout import (bias_act_dropout, bias_act_dropout_fake_quant, bias_act_dropout_fake_quant_ref,
                           bias_act_dropout_ref, bias_dropout_residual, bias_dropout_residual_ref)
from .cross_entropy import cross_entropy, cross_entropy_ref
from .dropout import dropout_ref, keep_mask_ref, new_seed, new_seeds
from .embedding import embedding, embedding_ref
from .heads import merge_heads, merge_heads_ref, split_heads, split_heads_ref
from .layernorm import (layer_norm, layer_norm_fake_quant, layer_norm_fake_quant_ref, layer_norm_quant,
                        layer_norm_quant_ref, layer_norm_ref)
from .softmax import masked_softmax, masked_softmax_ref

__all__ = [
    "BuildError", "build", "is_built", "load",
    "FakeQuantize", "dequantize", "dequantize_ref", "fake_quantize", "fake_quantize_grad_ref",
    "fake_quantize_ref", "quantize", "quantize_ref",
    "bias_act_dropout", "bias_act_dropout_fake_quant", "bias_act_dropout_fake_quant_ref", "bias_act_dropout_ref",
    "bias_dropout_residual", "bias_dropout_residual_ref",
    "cross_entropy", "cross_entropy_ref", "dropout_ref", "keep_mask_ref", "new_seed", "new_seeds", "embedding",
    "embedding_ref", "layer_norm", "layer_norm_fake_quant", "layer_norm_fake_quant_ref", "layer_norm_quant",
    "layer_norm_quant_ref", "layer_norm_ref",
    "masked_softmax", "masked_softmax_ref",
    "merge_heads", "merge_heads_ref", "split_heads", "split_heads_ref",
]
