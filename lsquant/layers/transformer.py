"""TransformerEncoderLayer and TransformerDecoderLayer: fused on CUDA, the ``lsquant.ops`` references on the
CPU, with the same parameters and semantics (torch.nn.TransformerEncoderLayer/DecoderLayer with batch_first=True,
norm_first=pre_layer_norm; dropout masks come from lsquant.ops.dropout's counter hash).

Data flow of one sublayer (pre-LN; post-LN moves the LayerNorm after the residual add):

    h = LN(x); y = linear_nobias(h) (cuBLAS); x = residual + dropout(y + bias)   (fused epilogue)

Quantization (``layer.apply(lsquant.enable_quant)``): every linear's input (per-tensor learnable clip) and
weight (per output channel, dynamic), and in the decoder the self-attention K and V as they enter the cache.

On CUDA: LayerNorm, the bias epilogues, the embedding and the loss are the fused kernels of csrc/kernels; GEMMs
are cuBLAS (F.linear / matmul) in the layer's dtype; attention without probability dropout is
F.scaled_dot_product_attention, with dropout the fused masked softmax. Under QAT the pre-LN LayerNorms and the
FFN1 epilogue emit the next linear's fake-quantized input in the same kernel. Inputs are checked first
(shapes, max_batch_tokens, max_seq_len, dtype, device): a clear exception, never a bad kernel launch.

The CUDA path makes no host sync in forward or backward (training mode; the decoder's incremental cache mode
aside), float or QAT: dropout seeds are drawn on the device and read by the kernels, the quantizers' state is
host-side after calibration, the input checks read shapes only. A layer, or a model built from them, can so be
captured whole in CUDA graphs (lsquant.layers.graphed): the wall time is then the GPU time.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from lsquant import ops
from lsquant.ops.softmax import attention_mask_ref
from lsquant.quant import TensorQuantizer

from .base import FlatParamLayer, LinearQuant, check_hidden, check_padding_mask, check_tensor, xavier_
from .config import TransformerLayerConfig


def _split_heads(t: torch.Tensor, nH: int, parts: int, contiguous: bool) -> tuple[torch.Tensor, ...]:
    """(B, L, parts * nH * D) -> ``parts`` tensors (B, nH, L, D). contiguous=False: strided views (what
    F.scaled_dot_product_attention takes as they are); True: one split kernel (ops.split_heads) instead of the
    copies torch.matmul would make of each view (the fused-softmax path)."""
    if contiguous:
        return ops.split_heads(t, None, nH, parts)
    B, L, H = t.shape
    return tuple(u.view(B, L, nH, H // (parts * nH)).transpose(1, 2) for u in t.chunk(parts, dim=-1))


def _sdpa(q, k, v, key_padding_mask, causal: bool) -> torch.Tensor:
    """Attention without dropout through F.scaled_dot_product_attention, masks as ops.masked_softmax takes them
    (a query whose keys are all masked gives NaN here, 0 in the reference: the layers' inputs never have one)."""
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    if key_padding_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    masked = attention_mask_ref(B, Lq, Lk, key_padding_mask, causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)


class _TransformerLayerBase(FlatParamLayer):
    _shape_fields = ("hidden_size", "intermediate_size", "nhead", "pre_layer_norm", "activation_fn")
    _sublayers: tuple[str, ...] = ()  # LayerNorm prefixes, in order

    @classmethod
    def get_config(cls, **kwargs) -> TransformerLayerConfig:
        """A new config instance each call (fields: see TransformerLayerConfig)."""
        return TransformerLayerConfig(**kwargs)

    def __init__(self, config: TransformerLayerConfig):
        super().__init__()
        if not isinstance(config, TransformerLayerConfig):
            raise TypeError(f"{type(self).__name__} takes a TransformerLayerConfig (from get_config()), got "
                            f"{type(config).__name__}")
        self.config = dataclasses.replace(config)  # this layer's own copy
        H, I = config.hidden_size, config.intermediate_size
        self._init_flat(self._weight_shapes(H, I), config.torch_dtype)
        self.reset_parameters()

    def _weight_shapes(self, H: int, I: int) -> dict:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        H = self.config.hidden_size
        for name, shape in self._shapes.items():
            t = self.w(name)
            if name.endswith("ln_weight"):
                nn.init.ones_(t)
            elif name.endswith("bias"):
                nn.init.zeros_(t)
            elif name in ("qkv_weight", "cross_kv_weight"):
                for part in t.view(-1, H, H):  # each of q, k, v as its own H x H matrix (as torch's MHA)
                    xavier_(part, H, H)
            else:
                xavier_(t, shape[1], shape[0])

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={c.hidden_size}, ffn={c.intermediate_size}, heads={c.nhead}, "
                f"{'pre' if c.pre_layer_norm else 'post'}-LN, {c.activation_fn}, {c.dtype}")

    # -- pieces ------------------------------------------------------------------------------------------
    def _dropouts(self, x: torch.Tensor, *ratios: float) -> list[tuple[float, object]]:
        """(ratio, seed) for each dropout site of this call, in order; (0.0, 0) where there is none (eval mode or
        a zero ratio). All seeds come from one ``ops.new_seeds`` draw: on CUDA one-element int64 tensors drawn on
        the device, which the kernels read and the backward keeps (no host sync; a replay of the layer captured
        in a CUDA graph draws new ones, hence new masks); on the CPU Python ints."""
        on = [self.training and r > 0.0 for r in ratios]
        seeds = iter(ops.new_seeds(sum(on), x.device))
        return [(r, next(seeds)) if o else (0.0, 0) for r, o in zip(ratios, on)]

    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return ops.layer_norm(x, self.w(prefix + "_weight"), self.w(prefix + "_bias"), self.config.layer_norm_eps)

    def _ln_linear(self, x: torch.Tensor, prefix: str, lq: LinearQuant, weight: str, bias: str | None):
        """linear(LN(x)) for pre-LN sublayers. Under QAT on CUDA the LayerNorm kernel also emits the fake-quantized
        input of the linear (saving the separate fake-quantize kernel's read and write of the activation);
        elsewhere LayerNorm, then the linear's own input quantizer: the same function."""
        b = None if bias is None else self.w(bias)
        clip = lq.fusable_input_clip(x)
        if clip is None:
            return lq(self._ln(x, prefix), self.w(weight), b)
        _, hq = ops.layer_norm_fake_quant(x, self.w(prefix + "_weight"), self.w(prefix + "_bias"),
                                          self.config.layer_norm_eps, clip)
        return lq(hq, self.w(weight), b, prequantized=True)

    @staticmethod
    def _fused_softmax(x: torch.Tensor, drop: tuple[float, object]) -> bool:
        """True where _attend takes the fused-softmax path on CUDA (dropout on the attention probabilities)."""
        return x.is_cuda and drop[0] > 0.0

    def _attend(self, q, k, v, key_padding_mask, causal: bool, drop: tuple[float, object]) -> torch.Tensor:
        """q (B, nH, Lq, D), k/v (B, nH, Lk, D) -> context (B, Lq, H); drop: (ratio, seed) on the probabilities."""
        p, seed = drop
        if q.is_cuda and not self._fused_softmax(q, drop):
            # No dropout on the probabilities: the same function through PyTorch's fused attention (flash /
            # memory-efficient), which keeps the scores in fp32 and never writes the (B, nH, Lq, Lk) matrix.
            # With dropout, the fused softmax kernel below, whose mask the CPU path reproduces exactly.
            return ops.merge_heads(_sdpa(q, k, v, key_padding_mask, causal))
        scores = torch.matmul(q, k.transpose(-1, -2))
        probs = ops.masked_softmax(scores, key_padding_mask, causal, p, seed, scale=q.shape[-1] ** -0.5)
        return ops.merge_heads(torch.matmul(probs, v))

    def _residual(self, y: torch.Tensor, bias_name: str, residual: torch.Tensor,
                  drop: tuple[float, object]) -> torch.Tensor:
        p, seed = drop
        return ops.bias_dropout_residual(y, self.w(bias_name), residual, p, seed)

    def _ffn(self, x: torch.Tensor, act_drop: tuple[float, object], out_drop: tuple[float, object]) -> torch.Tensor:
        cfg = self.config
        if cfg.pre_layer_norm:
            f = self._ln_linear(x, "ffn_ln", self.fc1_quant, "fc1_weight", None)
        else:
            f = self.fc1_quant(x, self.w("fc1_weight"))
        p, seed = act_drop
        clip = self.fc2_quant.fusable_input_clip(f)
        if clip is None:
            f = ops.bias_act_dropout(f, self.w("fc1_bias"), cfg.activation_fn, p, seed)
        else:  # QAT on CUDA: the FFN1 epilogue emits FFN2's fake-quantized input directly
            f = ops.bias_act_dropout_fake_quant(f, self.w("fc1_bias"), cfg.activation_fn, p, seed, clip)
        x = self._residual(self.fc2_quant(f, self.w("fc2_weight"), prequantized=clip is not None), "fc2_bias", x,
                           out_drop)
        return x if cfg.pre_layer_norm else self._ln(x, "ffn_ln")

    def _check_input(self, x: torch.Tensor, name: str, max_len: int | None = None) -> tuple[int, int]:
        check_tensor(x, name, self.flat, type(self).__name__)
        return check_hidden(x, name, self.config, type(self).__name__, max_len)

    # -- torch.nn conversion -----------------------------------------------------------------------------
    @staticmethod
    def _config_from_torch(layer: nn.Module, **overrides) -> TransformerLayerConfig:
        act = getattr(layer, "activation", F.relu)
        if isinstance(act, nn.Module):
            act_name = "gelu" if isinstance(act, nn.GELU) else "relu" if isinstance(act, nn.ReLU) else None
        else:
            act_name = {F.relu: "relu", F.gelu: "gelu"}.get(act)
        if act_name is None:
            raise ValueError(f"unsupported activation {act!r}: lsquant layers take relu or gelu")
        if isinstance(act, nn.GELU) and act.approximate != "none":
            raise ValueError("lsquant's gelu is the exact (erf) one; the layer uses approximate='tanh'")
        p = layer.dropout.p
        kw = dict(hidden_size=layer.linear1.in_features, intermediate_size=layer.linear1.out_features,
                  nhead=layer.self_attn.num_heads, attn_prob_dropout_ratio=p, activation_dropout_ratio=p,
                  hidden_dropout_ratio=p, pre_layer_norm=layer.norm_first, activation_fn=act_name,
                  dtype=layer.linear1.weight.dtype, layer_norm_eps=layer.norm1.eps)
        kw.update(overrides)
        return TransformerLayerConfig(**kw)


class TransformerEncoderLayer(_TransformerLayerBase):
    """Self-attention with a key padding mask, then FFN; pre- or post-LayerNorm.

    forward(x, key_padding_mask=None): x (batch, seq_len, hidden) in config.dtype; key_padding_mask (batch,
    seq_len) bool, True = padding -> (batch, seq_len, hidden). Outputs at padding positions are computed but
    meaningless (as in torch).
    """

    def _weight_shapes(self, H, I):
        return {"qkv_weight": (3 * H, H), "qkv_bias": (3 * H,), "attn_out_weight": (H, H), "attn_out_bias": (H,),
                "attn_ln_weight": (H,), "attn_ln_bias": (H,), "fc1_weight": (I, H), "fc1_bias": (I,),
                "fc2_weight": (H, I), "fc2_bias": (H,), "ffn_ln_weight": (H,), "ffn_ln_bias": (H,)}

    def __init__(self, config: TransformerLayerConfig):
        super().__init__(config)
        H, I, m = config.hidden_size, config.intermediate_size, config.input_calib_method
        self.qkv_quant = LinearQuant(3 * H, m)
        self.attn_out_quant = LinearQuant(H, m)
        self.fc1_quant = LinearQuant(I, m)
        self.fc2_quant = LinearQuant(H, m)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        name = type(self).__name__
        B, L = self._check_input(x, "x")
        key_padding_mask = check_padding_mask(key_padding_mask, B, L, x, "key_padding_mask", name)
        cfg = self.config
        attn_drop, out_drop, act_drop, ffn_drop = self._dropouts(
            x, cfg.attn_prob_dropout_ratio, cfg.hidden_dropout_ratio, cfg.activation_dropout_ratio,
            cfg.hidden_dropout_ratio)
        if cfg.pre_layer_norm:
            qkv = self._ln_linear(x, "attn_ln", self.qkv_quant, "qkv_weight", "qkv_bias")
        else:
            qkv = self.qkv_quant(x, self.w("qkv_weight"), self.w("qkv_bias"))
        q, k, v = _split_heads(qkv, cfg.nhead, 3, self._fused_softmax(x, attn_drop))
        ctx = self._attend(q, k, v, key_padding_mask, causal=False, drop=attn_drop)
        x = self._residual(self.attn_out_quant(ctx, self.w("attn_out_weight")), "attn_out_bias", x, out_drop)
        if not cfg.pre_layer_norm:
            x = self._ln(x, "attn_ln")
        return self._ffn(x, act_drop, ffn_drop)

    # -- conversion ----------------------------------------------------------------------------------------
    _TORCH_NAMES = {"self_attn.in_proj_weight": "qkv_weight", "self_attn.in_proj_bias": "qkv_bias",
                    "self_attn.out_proj.weight": "attn_out_weight", "self_attn.out_proj.bias": "attn_out_bias",
                    "linear1.weight": "fc1_weight", "linear1.bias": "fc1_bias", "linear2.weight": "fc2_weight",
                    "linear2.bias": "fc2_bias", "norm1.weight": "attn_ln_weight", "norm1.bias": "attn_ln_bias",
                    "norm2.weight": "ffn_ln_weight", "norm2.bias": "ffn_ln_bias"}

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer, **config_overrides) -> "TransformerEncoderLayer":
        """Build from torch.nn.TransformerEncoderLayer (weights copied; the config from its hyperparameters,
        e.g. ``max_batch_tokens=...`` overrides)."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"expected torch.nn.TransformerEncoderLayer, got {type(layer).__name__}")
        new = cls(cls._config_from_torch(layer, **config_overrides))
        sd = layer.state_dict()
        new.load_weights({ours: sd[theirs] for theirs, ours in cls._TORCH_NAMES.items()})
        return new.to(layer.linear1.weight.device)

    def to_torch_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under torch.nn.TransformerEncoderLayer's names (load with its load_state_dict)."""
        w = self.per_weight_state_dict()
        return {theirs: w[ours] for theirs, ours in self._TORCH_NAMES.items()}


class TransformerDecoderLayer(_TransformerLayerBase):
    """Causal self-attention, cross-attention over the encoder output, FFN; pre- or post-LayerNorm.

    forward(x, encoder_out, encoder_padding_mask=None, self_padding_mask=None, cache=None):
        x: (batch, tgt_len, hidden); encoder_out: (batch, src_len, hidden); encoder_padding_mask: (batch,
        src_len) bool, True = padding; self_padding_mask: (batch, tgt_len) bool (full mode only).
        cache: None for full (training) mode; a dict (empty at the first step) for incremental decoding: the
        self-attention K/V of earlier steps ("self_k", "self_v": (batch, nhead, steps, head_dim)) are
        appended to, and the cross-attention K/V ("cross_k", "cross_v") computed once. x then holds the new
        tokens only (usually one). Returns (batch, tgt_len, hidden).
    """

    _shape_fields = _TransformerLayerBase._shape_fields + ("quant_cross_kv",)

    def _weight_shapes(self, H, I):
        return {"qkv_weight": (3 * H, H), "qkv_bias": (3 * H,), "attn_out_weight": (H, H), "attn_out_bias": (H,),
                "attn_ln_weight": (H,), "attn_ln_bias": (H,),
                "cross_q_weight": (H, H), "cross_q_bias": (H,), "cross_kv_weight": (2 * H, H),
                "cross_kv_bias": (2 * H,), "cross_out_weight": (H, H), "cross_out_bias": (H,),
                "cross_ln_weight": (H,), "cross_ln_bias": (H,),
                "fc1_weight": (I, H), "fc1_bias": (I,), "fc2_weight": (H, I), "fc2_bias": (H,),
                "ffn_ln_weight": (H,), "ffn_ln_bias": (H,)}

    def __init__(self, config: TransformerLayerConfig):
        super().__init__(config)
        H, I, m = config.hidden_size, config.intermediate_size, config.input_calib_method
        self.qkv_quant = LinearQuant(3 * H, m)
        self.attn_out_quant = LinearQuant(H, m)
        self.cross_q_quant = LinearQuant(H, m)
        self.cross_kv_quant = LinearQuant(2 * H, m)
        self.cross_out_quant = LinearQuant(H, m)
        self.fc1_quant = LinearQuant(I, m)
        self.fc2_quant = LinearQuant(H, m)
        # K and V as the int8 engine caches them (per-tensor, learnable clips)
        self.k_quantizer = TensorQuantizer(learnable=True, calib_method=m)
        self.v_quantizer = TensorQuantizer(learnable=True, calib_method=m)
        # the cross-attention K/V likewise (config.quant_cross_kv; None in a layer saved before the option)
        self.cross_k_quantizer = self.cross_v_quantizer = None
        if config.quant_cross_kv:
            self.cross_k_quantizer = TensorQuantizer(learnable=True, calib_method=m)
            self.cross_v_quantizer = TensorQuantizer(learnable=True, calib_method=m)

    def forward(self, x, encoder_out, encoder_padding_mask=None, self_padding_mask=None, cache=None):
        name = type(self).__name__
        cfg = self.config
        past = 0 if not cache or "self_k" not in cache else cache["self_k"].shape[2]
        B, L = self._check_input(x, "x", max_len=cfg.max_seq_len - past)
        Bs, S = self._check_input(encoder_out, "encoder_out")
        if Bs != B:
            raise ValueError(f"{name}: encoder_out has batch {Bs}, x has batch {B}")
        encoder_padding_mask = check_padding_mask(encoder_padding_mask, B, S, x, "encoder_padding_mask", name)
        if cache is not None and self_padding_mask is not None:
            raise ValueError(f"{name}: self_padding_mask is for full (training) mode; incremental decoding "
                             "(cache given) takes no target padding")
        self_padding_mask = check_padding_mask(self_padding_mask, B, L, x, "self_padding_mask", name)
        hid = cfg.hidden_dropout_ratio
        self_drop, self_out_drop, cross_drop, cross_out_drop, act_drop, ffn_drop = self._dropouts(
            x, cfg.attn_prob_dropout_ratio, hid, cfg.attn_prob_dropout_ratio, hid, cfg.activation_dropout_ratio, hid)

        # causal self-attention
        if cfg.pre_layer_norm:
            qkv = self._ln_linear(x, "attn_ln", self.qkv_quant, "qkv_weight", "qkv_bias")
        else:
            qkv = self.qkv_quant(x, self.w("qkv_weight"), self.w("qkv_bias"))
        q, k, v = _split_heads(qkv, cfg.nhead, 3, self._fused_softmax(x, self_drop))
        k, v = self.k_quantizer(k), self.v_quantizer(v)
        if cache is not None:
            if past:
                k = torch.cat([cache["self_k"], k], dim=2)
                v = torch.cat([cache["self_v"], v], dim=2)
            cache["self_k"], cache["self_v"] = k, v
        ctx = self._attend(q, k, v, self_padding_mask, causal=True, drop=self_drop)
        x = self._residual(self.attn_out_quant(ctx, self.w("attn_out_weight")), "attn_out_bias", x, self_out_drop)
        if not cfg.pre_layer_norm:
            x = self._ln(x, "attn_ln")

        # cross-attention
        if cfg.pre_layer_norm:
            q = self._ln_linear(x, "cross_ln", self.cross_q_quant, "cross_q_weight", "cross_q_bias")
        else:
            q = self.cross_q_quant(x, self.w("cross_q_weight"), self.w("cross_q_bias"))
        (q,) = _split_heads(q, cfg.nhead, 1, self._fused_softmax(x, cross_drop))
        if cache is not None and "cross_k" in cache:
            ck, cv = cache["cross_k"], cache["cross_v"]
        else:
            kv = self.cross_kv_quant(encoder_out, self.w("cross_kv_weight"), self.w("cross_kv_bias"))
            ck, cv = _split_heads(kv, cfg.nhead, 2, self._fused_softmax(x, cross_drop))
            if self.cross_k_quantizer is not None:
                ck, cv = self.cross_k_quantizer(ck), self.cross_v_quantizer(cv)
            if cache is not None:
                cache["cross_k"], cache["cross_v"] = ck, cv
        ctx = self._attend(q, ck, cv, encoder_padding_mask, causal=False, drop=cross_drop)
        x = self._residual(self.cross_out_quant(ctx, self.w("cross_out_weight")), "cross_out_bias", x,
                           cross_out_drop)
        if not cfg.pre_layer_norm:
            x = self._ln(x, "cross_ln")
        return self._ffn(x, act_drop, ffn_drop)

    # -- conversion ----------------------------------------------------------------------------------------
    _TORCH_NAMES = {"self_attn.in_proj_weight": "qkv_weight", "self_attn.in_proj_bias": "qkv_bias",
                    "self_attn.out_proj.weight": "attn_out_weight", "self_attn.out_proj.bias": "attn_out_bias",
                    "multihead_attn.out_proj.weight": "cross_out_weight",
                    "multihead_attn.out_proj.bias": "cross_out_bias",
                    "linear1.weight": "fc1_weight", "linear1.bias": "fc1_bias", "linear2.weight": "fc2_weight",
                    "linear2.bias": "fc2_bias", "norm1.weight": "attn_ln_weight", "norm1.bias": "attn_ln_bias",
                    "norm2.weight": "cross_ln_weight", "norm2.bias": "cross_ln_bias",
                    "norm3.weight": "ffn_ln_weight", "norm3.bias": "ffn_ln_bias"}

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer, **config_overrides) -> "TransformerDecoderLayer":
        """Build from torch.nn.TransformerDecoderLayer (weights copied)."""
        if not isinstance(layer, nn.TransformerDecoderLayer):
            raise TypeError(f"expected torch.nn.TransformerDecoderLayer, got {type(layer).__name__}")
        new = cls(cls._config_from_torch(layer, **config_overrides))
        sd = layer.state_dict()
        H = new.config.hidden_size
        w = {ours: sd[theirs] for theirs, ours in cls._TORCH_NAMES.items()}
        w["cross_q_weight"], w["cross_kv_weight"] = sd["multihead_attn.in_proj_weight"].split([H, 2 * H])
        w["cross_q_bias"], w["cross_kv_bias"] = sd["multihead_attn.in_proj_bias"].split([H, 2 * H])
        new.load_weights(w)
        return new.to(layer.linear1.weight.device)

    def to_torch_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under torch.nn.TransformerDecoderLayer's names."""
        w = self.per_weight_state_dict()
        sd = {theirs: w[ours] for theirs, ours in self._TORCH_NAMES.items()}
        sd["multihead_attn.in_proj_weight"] = torch.cat([w["cross_q_weight"], w["cross_kv_weight"]])
        sd["multihead_attn.in_proj_bias"] = torch.cat([w["cross_q_bias"], w["cross_kv_bias"]])
        return sd
