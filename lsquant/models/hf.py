"""Converters between Hugging Face transformers' BERT layers and lsquant's fused layers.

A ``transformers`` BertLayer is a post-LayerNorm Transformer encoder layer with separate Q, K and V linears:

    h = LN1(x + dropout(attn_out(attention(query(x), key(x), value(x)))))
    y = LN2(h + dropout(fc2(act(fc1(h)))))

which is lsquant's ``TransformerEncoderLayer`` with ``pre_layer_norm=False``; Q, K and V are stacked into the
fused ``qkv_weight`` (3H, H) / ``qkv_bias`` (3H,) in that order. BERT's LayerNorm eps (1e-12) is carried in the
config's ``layer_norm_eps``. BERT has no dropout after the FFN activation (``activation_dropout_ratio=0``).

Masks: Hugging Face's ``attention_mask`` (batch, seq_len) has 1 for tokens and 0 for padding; lsquant's
``key_padding_mask`` is True for padding (``padding_mask_from_hf``).

transformers is imported lazily (only when a Hugging Face object is passed in): ``import lsquant`` stays light.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lsquant.layers import TransformerEncoderLayer, TransformerLayerConfig

# Our weight name -> the BertLayer state-dict names stacked into it (in order).
_BERT_NAMES: dict[str, tuple[str, ...]] = {
    "qkv_weight": ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"),
    "qkv_bias": ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"),
    "attn_out_weight": ("attention.output.dense.weight",),
    "attn_out_bias": ("attention.output.dense.bias",),
    "attn_ln_weight": ("attention.output.LayerNorm.weight",),
    "attn_ln_bias": ("attention.output.LayerNorm.bias",),
    "fc1_weight": ("intermediate.dense.weight",),
    "fc1_bias": ("intermediate.dense.bias",),
    "fc2_weight": ("output.dense.weight",),
    "fc2_bias": ("output.dense.bias",),
    "ffn_ln_weight": ("output.LayerNorm.weight",),
    "ffn_ln_bias": ("output.LayerNorm.bias",),
}


def _activation_name(act) -> str:
    """'gelu' (exact, erf) or 'relu' for a BertIntermediate's activation; ValueError for anything else."""
    if isinstance(act, nn.ReLU) or act is F.relu or act is torch.relu:
        return "relu"
    if isinstance(act, nn.GELU):
        if act.approximate != "none":
            raise ValueError("lsquant's gelu is the exact (erf) one; this layer uses nn.GELU(approximate='tanh')")
        return "gelu"
    if act is F.gelu:
        return "gelu"
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - a BertLayer without transformers is not possible
        GELUActivation = ()
    if isinstance(act, GELUActivation):  # hidden_act "gelu" (and "gelu_python": the same erf formula)
        return "gelu"
    raise ValueError(f"unsupported BERT activation {type(act).__name__}: lsquant layers take relu or the exact "
                     "(erf) gelu (hidden_act='gelu'); tanh approximations ('gelu_new', 'gelu_pytorch_tanh', ...) "
                     "are not supported")


def _check_bert_layer(layer) -> None:
    missing = [m for m in ("attention.self.query", "attention.output.LayerNorm", "intermediate.dense",
                           "output.dense", "output.LayerNorm") if not _has(layer, m)]
    if not isinstance(layer, nn.Module) or missing:
        raise TypeError(f"expected a transformers BertLayer (model.encoder.layer[i]), got {type(layer).__name__}"
                        + (f" without {', '.join(missing)}" if missing else ""))
    if getattr(layer, "is_decoder", False) or hasattr(layer, "crossattention"):
        raise ValueError("this BertLayer is a decoder layer (causal self-attention or cross-attention): only "
                         "encoder layers convert to TransformerEncoderLayer")
    pos = getattr(layer.attention.self, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(f"position_embedding_type={pos!r} adds relative-position terms to the attention scores, "
                         "which lsquant's layer does not compute; only 'absolute' converts")


def _has(module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
    except AttributeError:
        return False
    return True


def config_from_hf_bert(bert_layer, **config_overrides) -> TransformerLayerConfig:
    """The TransformerLayerConfig matching a BertLayer (sizes, dropouts, activation, LayerNorm eps, dtype);
    keyword arguments override any field (e.g. ``max_batch_tokens=8192``). max_seq_len defaults to the model's
    max_position_embeddings when the layer knows its config, else 512."""
    _check_bert_layer(bert_layer)
    attn = bert_layer.attention
    eps = attn.output.LayerNorm.eps
    if bert_layer.output.LayerNorm.eps != eps:
        raise ValueError(f"the two LayerNorms have different eps ({eps}, {bert_layer.output.LayerNorm.eps}); "
                         "lsquant's layer has one layer_norm_eps")
    p_hidden = attn.output.dropout.p
    if bert_layer.output.dropout.p != p_hidden:
        raise ValueError(f"the attention and FFN outputs have different dropout ({p_hidden}, "
                         f"{bert_layer.output.dropout.p}); lsquant's layer has one hidden_dropout_ratio")
    hf_config = getattr(attn.self, "config", None)
    q = attn.self.query
    kw = dict(hidden_size=q.in_features, intermediate_size=bert_layer.intermediate.dense.out_features,
              nhead=attn.self.num_attention_heads, attn_prob_dropout_ratio=attn.self.dropout.p,
              activation_dropout_ratio=0.0, hidden_dropout_ratio=p_hidden, pre_layer_norm=False,
              activation_fn=_activation_name(bert_layer.intermediate.intermediate_act_fn), dtype=q.weight.dtype,
              layer_norm_eps=eps, max_seq_len=getattr(hf_config, "max_position_embeddings", 512))
    if q.out_features != q.in_features:
        raise ValueError(f"query projects {q.in_features} to {q.out_features}: lsquant's attention needs "
                         "all_head_size == hidden_size")
    kw.update(config_overrides)
    return TransformerLayerConfig(**kw)


def encoder_layer_from_hf_bert(bert_layer, **config_overrides) -> TransformerEncoderLayer:
    """A TransformerEncoderLayer computing the same function as a transformers BertLayer (weights copied, on the
    BertLayer's device and in its dtype). Keyword arguments override config fields (see ``config_from_hf_bert``).

    Call it as ``layer(x, key_padding_mask)`` with x (batch, seq_len, hidden) and key_padding_mask (batch, seq_len)
    bool, True = padding (``padding_mask_from_hf(attention_mask)``)."""
    config = config_from_hf_bert(bert_layer, **config_overrides)
    new = TransformerEncoderLayer(config)
    sd = bert_layer.state_dict()
    new.load_weights({ours: torch.cat([sd[n] for n in theirs]) if len(theirs) > 1 else sd[theirs[0]]
                      for ours, theirs in _BERT_NAMES.items()})
    return new.to(bert_layer.attention.self.query.weight.device)


def encoder_layer_to_hf_bert_state_dict(layer: TransformerEncoderLayer) -> dict[str, torch.Tensor]:
    """The layer's weights under BertLayer's state-dict names (load with ``bert_layer.load_state_dict``); the
    fused qkv is split back into query, key and value. Post-LayerNorm layers only (BERT's structure)."""
    if not isinstance(layer, TransformerEncoderLayer):
        raise TypeError(f"expected lsquant's TransformerEncoderLayer, got {type(layer).__name__}")
    if layer.config.pre_layer_norm:
        raise ValueError("a BertLayer is post-LayerNorm; this layer is pre-LayerNorm (pre_layer_norm=True), which "
                         "computes a different function")
    w = layer.per_weight_state_dict()
    H = layer.config.hidden_size
    sd = {}
    for ours, theirs in _BERT_NAMES.items():
        pieces = w[ours].split(H) if len(theirs) > 1 else (w[ours],)
        sd.update({n: t.clone() for n, t in zip(theirs, pieces)})
    return sd


def encoder_layers_from_hf_bert(model, **config_overrides) -> nn.ModuleList:
    """Every layer of a transformers BertModel (or its ``.encoder``) converted with ``encoder_layer_from_hf_bert``.
    The embeddings and the pooler are not converted."""
    encoder = getattr(model, "encoder", model)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"expected a transformers BertModel or BertEncoder, got {type(model).__name__}")
    return nn.ModuleList(encoder_layer_from_hf_bert(layer, **config_overrides) for layer in layers)


def padding_mask_from_hf(attention_mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's attention_mask (batch, seq_len), 1 = token, 0 = padding -> lsquant's key_padding_mask
    (batch, seq_len) bool, True = padding."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq_len) of 1 (token) and 0 (padding), got shape "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask == 0
