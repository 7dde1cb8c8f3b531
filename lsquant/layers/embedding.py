"""TransformerEmbeddingLayer: token lookup * sqrt(dim) + positions, padding zeroed, dropout; fused on CUDA."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from lsquant import ops
from lsquant.quant import TensorQuantizer

from .base import FlatParamLayer, check_limits, ids_checked, quant_linear
from .config import EmbeddingConfig


def sinusoidal_positions(num: int, dim: int) -> torch.Tensor:
    """(num, dim) fp32: sin of pos * 10000^(-i / (half - 1)) in the first half, cos in the second (the layout of
    fairseq and tensor2tensor); an odd last column is 0."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(num, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(table, (0, dim - 2 * half))


class TransformerEmbeddingLayer(FlatParamLayer):
    """forward(tokens, step=0): tokens (batch, seq_len) int64 -> (batch, seq_len, embedding_dim) in config.dtype.

    Token (b, l) gets position step + l (step > 0 in incremental decoding); padding tokens give exactly 0.
    ``project(x)`` is the output projection sharing the table: x (..., dim) -> logits (..., vocab_size).
    Quantization: the table per row (dynamic clip, the same rows the output projection quantizes per output
    channel), and the projection's input (per-tensor learnable clip).
    """

    _shape_fields = ("vocab_size", "embedding_dim", "learned_pos")
    # Token ids outside [0, vocab_size) raise a ValueError. On CUDA that check is a device-to-host sync per call,
    # so it is skipped under CUDA-graph capture (where it is impossible) and can be turned off (False) for eager
    # training loops that must not sync; the kernel needs no check: an id outside the table reads nothing and
    # gives a zero row and no gradient.
    check_ids_on_cuda: bool = True

    @classmethod
    def get_config(cls, **kwargs) -> EmbeddingConfig:
        return EmbeddingConfig(**kwargs)

    def __init__(self, config: EmbeddingConfig):
        super().__init__()
        if not isinstance(config, EmbeddingConfig):
            raise TypeError(f"TransformerEmbeddingLayer takes an EmbeddingConfig (from get_config()), got "
                            f"{type(config).__name__}")
        self.config = c = dataclasses.replace(config)
        shapes = {"embeddings": (c.vocab_size, c.embedding_dim)}
        if c.learned_pos:
            shapes["pos_embeddings"] = (c.max_seq_len, c.embedding_dim)
        self._init_flat(shapes, c.torch_dtype)
        self.register_buffer("sin_pos", sinusoidal_positions(c.max_seq_len, c.embedding_dim).to(c.torch_dtype),
                             persistent=False)
        self.emb_quantizer = TensorQuantizer(axis=0, num_channels=c.vocab_size, dynamic=True)
        self.proj_input_quantizer = TensorQuantizer(learnable=True, calib_method="percentile")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        with torch.no_grad():
            nn.init.normal_(self.w("embeddings"), 0.0, c.embedding_dim ** -0.5)
            if c.padding_idx is not None:
                self.w("embeddings")[c.padding_idx].zero_()
            if c.learned_pos:
                nn.init.normal_(self.w("pos_embeddings"), 0.0, c.embedding_dim ** -0.5)

    @property
    def scale(self) -> float:
        return math.sqrt(self.config.embedding_dim) if self.config.scale_embedding else 1.0

    def table(self) -> torch.Tensor:
        """(vocab_size, dim): the (fake-quantized, when quantization is on) embedding table."""
        return self.emb_quantizer(self.w("embeddings"))

    def forward(self, tokens: torch.Tensor, step: int = 0) -> torch.Tensor:
        c = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"TransformerEmbeddingLayer: tokens must be a (batch, seq_len) tensor, got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"TransformerEmbeddingLayer: tokens must be integer ids, got {tokens.dtype}")
        if tokens.device != self.flat.device:
            raise ValueError(f"TransformerEmbeddingLayer: tokens are on {tokens.device} but the layer is on "
                             f"{self.flat.device}")
        B, L = tokens.shape
        check_limits(B, L, c, "TransformerEmbeddingLayer", max_len=c.max_seq_len - step)
        tokens = tokens.long()
        if ids_checked(tokens, self.check_ids_on_cuda):
            lo, hi = int(tokens.min()), int(tokens.max())  # a sync on CUDA: see check_ids_on_cuda
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"TransformerEmbeddingLayer: token id {lo if lo < 0 else hi} is outside the "
                                 f"vocabulary [0, {c.vocab_size})")
        pos = self.w("pos_embeddings") if c.learned_pos else self.sin_pos
        # the seed: on CUDA drawn on the device (no sync; a CUDA-graph replay draws a new one), else a Python int
        p, seed = (c.dropout, ops.new_seeds(1, tokens.device)[0]) if self.training and c.dropout > 0 else (0.0, 0)
        return ops.embedding(tokens, self.table(), pos, self.scale, c.padding_idx, step, p, seed)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Output projection with the shared table: x (..., dim) -> logits (..., vocab_size)."""
        return quant_linear(x, self.w("embeddings"), None, self.proj_input_quantizer, self.emb_quantizer)
