"""Config dataclasses of the fused layers: one instance per layer (``Layer.get_config(**kw)`` makes a new one;
nothing is shared or keyed by a global counter), checked in ``__post_init__``, serialised into the layer's
state dict (``_extra_state``) with a version so that a checkpoint describes itself."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACTIVATIONS = ("relu", "gelu")


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")


def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(cfg).__name__}.{n} must be a positive int, got {v!r}")


def _ratio(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{type(cfg).__name__}.{n} must be in [0, 1), got {v!r}")


class _Config:
    VERSION = 1
    # boolean fields added after configs were first saved: a saved config without one gets False (what a model
    # saved then had), a new config the field's default
    _ADDED_OFF: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        version = d.get("version", cls.VERSION)
        if version > cls.VERSION:
            raise ValueError(f"{cls.__name__} version {version} is newer than this lsquant's ({cls.VERSION}): "
                             "upgrade lsquant to load it")
        for name in cls._ADDED_OFF:   # options added since: off for a config saved before them
            d.setdefault(name, False)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class TransformerLayerConfig(_Config):
    """Config of TransformerEncoderLayer and TransformerDecoderLayer.

    max_batch_tokens bounds batch * seq_len of one call, max_seq_len the sequence (and the decoder cache)
    length. Dropout ratios: on attention probabilities, after the FFN activation, and on each sublayer's
    output before the residual add. pre_layer_norm=True is torch's norm_first=True.
    """
    max_batch_tokens: int = 4096
    max_seq_len: int = 256
    hidden_size: int = 512
    intermediate_size: int = 2048
    nhead: int = 8
    attn_prob_dropout_ratio: float = 0.0
    activation_dropout_ratio: float = 0.0
    hidden_dropout_ratio: float = 0.1
    pre_layer_norm: bool = True
    activation_fn: str = "relu"
    dtype: str = "float32"
    layer_norm_eps: float = 1e-5
    input_calib_method: str = "percentile"  # activation clips: calibrated with this method, then learned
    # decoder layers: quantize the cross-attention K/V (per-tensor learnable clips, as the self-attention's), so
    # that the int8 engine may store them in int8 (half the memory of its largest buffer at long sources)
    quant_cross_kv: bool = True
    version: int = 1
    _ADDED_OFF = ("quant_cross_kv",)

    def __post_init__(self):
        self.dtype = _dtype_name(self.dtype)
        _positive(self, "max_batch_tokens", "max_seq_len", "hidden_size", "intermediate_size", "nhead")
        _ratio(self, "attn_prob_dropout_ratio", "activation_dropout_ratio", "hidden_dropout_ratio")
        if self.hidden_size % self.nhead:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by nhead {self.nhead}")
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {', '.join(ACTIVATIONS)}, got {self.activation_fn!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")


@dataclass
class EmbeddingConfig(_Config):
    """Config of TransformerEmbeddingLayer: tokens (batch, seq) -> (batch, seq, embedding_dim)."""
    vocab_size: int = 32000
    embedding_dim: int = 512
    max_batch_tokens: int = 4096
    max_seq_len: int = 256
    padding_idx: int | None = 0
    dropout: float = 0.1
    learned_pos: bool = False  # False: fixed sinusoidal positions (Vaswani et al.)
    scale_embedding: bool = True  # multiply the token embedding by sqrt(embedding_dim)
    dtype: str = "float32"
    version: int = 1

    def __post_init__(self):
        self.dtype = _dtype_name(self.dtype)
        _positive(self, "vocab_size", "embedding_dim", "max_batch_tokens", "max_seq_len")
        _ratio(self, "dropout")
        if self.padding_idx is not None and not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"padding_idx {self.padding_idx} is outside the vocabulary [0, {self.vocab_size})")


@dataclass
class CrossEntropyConfig(_Config):
    """Config of CrossEntropyLayer: label smoothing epsilon; targets equal to padding_idx are ignored."""
    max_batch_tokens: int = 4096
    padding_idx: int = 0
    epsilon: float = 0.1
    version: int = 1

    def __post_init__(self):
        _positive(self, "max_batch_tokens")
        _ratio(self, "epsilon")
