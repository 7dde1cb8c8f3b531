"""lsquant.models.Transformer: the encoder-decoder translation model built from the lsquant layers."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lsquant import ops
from lsquant.files import atomic_path
from lsquant.inference import decoding
from lsquant.layers import (
    CrossEntropyLayer,
    TransformerDecoderLayer,
    TransformerEmbeddingLayer,
    TransformerEncoderLayer,
)
from lsquant.layers.config import _Config, _dtype_name, _positive

CHECKPOINT_FORMAT = "lsquant-transformer"


@dataclass
class TransformerConfig(_Config):
    """Sizes, limits and defaults of a translation Transformer (Transformer-base: the defaults).

    Source and target share one vocabulary (a joint BPE); share_embeddings uses one table for both, and the
    output projection is always tied to the target table. Decoding defaults: beam_size, length_penalty,
    and a maximum output length of max_len_a * src_len + max_len_b (capped by max_seq_len - 1).
    """
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 2048
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_seq_len: int = 256
    max_batch_tokens: int = 8192
    dropout: float = 0.1
    attn_dropout: float = 0.0
    activation_dropout: float = 0.0
    pre_layer_norm: bool = True
    activation_fn: str = "relu"
    share_embeddings: bool = True
    learned_pos: bool = False
    label_smoothing: float = 0.1
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    beam_size: int = 4
    length_penalty: float = 1.0
    max_len_a: float = 1.2
    max_len_b: int = 10
    dtype: str = "float32"
    # the decoder's cross-attention K/V quantized in QAT and PTQ (the int8 engine then stores them in int8); a
    # config saved before this option loads with it off, as that model was trained
    quant_cross_kv: bool = True
    version: int = 1
    _ADDED_OFF = ("quant_cross_kv",)

    def __post_init__(self):
        self.dtype = _dtype_name(self.dtype)
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "nhead", "max_seq_len", "max_batch_tokens",
                  "beam_size")
        if self.num_encoder_layers < 1 or self.num_decoder_layers < 1:
            raise ValueError("a Transformer needs at least one encoder and one decoder layer")
        for name in ("pad_id", "bos_id", "eos_id", "unk_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"TransformerConfig.{name}={getattr(self, name)} is outside the vocabulary")

    def layer_config(self) -> dict:
        return dict(max_batch_tokens=self.max_batch_tokens, max_seq_len=self.max_seq_len, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, nhead=self.nhead,
                    attn_prob_dropout_ratio=self.attn_dropout, activation_dropout_ratio=self.activation_dropout,
                    hidden_dropout_ratio=self.dropout, pre_layer_norm=self.pre_layer_norm,
                    activation_fn=self.activation_fn, dtype=self.dtype, quant_cross_kv=self.quant_cross_kv)

    def max_output_len(self, src_len: int) -> int:
        return max(1, min(int(self.max_len_a * src_len + self.max_len_b), self.max_seq_len - 1))


class Transformer(nn.Module):
    """Encoder-decoder Transformer for translation.

    forward(src, tgt_in) -> logits: src (batch, src_len) and tgt_in (batch, tgt_len) int64 ids padded with
    pad_id; logits (batch, tgt_len, vocab) in the config dtype. ``loss`` adds the fused label-smoothed
    criterion; ``generate`` decodes (greedy, beam, sampling) with the rules of lsquant.inference.decoding,
    which the engines share.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = dataclasses.replace(config)
        emb = dict(vocab_size=c.vocab_size, embedding_dim=c.hidden_size, max_batch_tokens=c.max_batch_tokens,
                   max_seq_len=c.max_seq_len, padding_idx=c.pad_id, dropout=c.dropout, learned_pos=c.learned_pos,
                   dtype=c.dtype)
        self.src_embedding = TransformerEmbeddingLayer(TransformerEmbeddingLayer.get_config(**emb))
        self.tgt_embedding = (self.src_embedding if c.share_embeddings
                              else TransformerEmbeddingLayer(TransformerEmbeddingLayer.get_config(**emb)))
        self.encoder = nn.ModuleList(TransformerEncoderLayer(TransformerEncoderLayer.get_config(**c.layer_config()))
                                     for _ in range(c.num_encoder_layers))
        self.decoder = nn.ModuleList(TransformerDecoderLayer(TransformerDecoderLayer.get_config(**c.layer_config()))
                                     for _ in range(c.num_decoder_layers))
        # pre-LN stacks end with a LayerNorm (the last sublayer's output is otherwise unnormalised)
        dt = c.torch_dtype
        self.encoder_norm = nn.LayerNorm(c.hidden_size, dtype=dt) if c.pre_layer_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.hidden_size, dtype=dt) if c.pre_layer_norm else nn.Identity()
        self.criterion = CrossEntropyLayer(CrossEntropyLayer.get_config(
            max_batch_tokens=c.max_batch_tokens, padding_idx=c.pad_id, epsilon=c.label_smoothing))

    # -- forward ----------------------------------------------------------------------------------------------
    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> (encoder_out (B, S, H), padding mask (B, S) bool, True = pad)."""
        mask = src == self.config.pad_id
        x = self.src_embedding(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self._final_norm(x, self.encoder_norm), mask

    def decode(self, tgt_in: torch.Tensor, encoder_out: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder: tgt_in (B, T) -> logits (B, T, V)."""
        tgt_mask = tgt_in == self.config.pad_id
        y = self.tgt_embedding(tgt_in)
        for layer in self.decoder:
            y = layer(y, encoder_out, src_mask, tgt_mask)
        return self.tgt_embedding.project(self._final_norm(y, self.decoder_norm))

    @staticmethod
    def _final_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """The stack's closing LayerNorm (pre-LN) through the fused op; identity for post-LN."""
        if isinstance(norm, nn.LayerNorm):
            return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
        return x

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        enc, mask = self.encode(src)
        return self.decode(tgt_in, enc, mask)

    def loss(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(label-smoothed loss, nll) summed over the non-pad targets of tgt_out (B, T)."""
        return self.criterion(self(src, tgt_in), tgt_out)

    # -- decoding ---------------------------------------------------------------------------------------------
    class _Decoder:
        """The step interface of lsquant.inference.decoding over incremental decoder layers: encoder_out (B, S, H)
        and src_mask (B, S) serve batch * beams rows (row b * beams + k reads sentence b)."""

        def __init__(self, model: "Transformer", encoder_out: torch.Tensor, src_mask: torch.Tensor, beams: int = 1):
            self.m = model
            self.enc, self.mask = decoding.repeat_rows(encoder_out, beams), decoding.repeat_rows(src_mask, beams)
            self.caches = [{} for _ in model.decoder]

        def step(self, tokens: torch.Tensor, t: int, rows: torch.Tensor | None = None) -> torch.Tensor:
            """tokens (N,) at position t -> logits (N, V); rows (N,): reorder the caches first (beam search)."""
            if rows is not None:
                self.reorder(rows)
            emb = self.m.tgt_embedding
            # the search's own tokens are ids of the vocabulary by construction: no id check (on CUDA a
            # device-to-host sync per step)
            saved, emb.check_ids_on_cuda = emb.check_ids_on_cuda, False
            try:
                y = emb(tokens[:, None], step=t)
            finally:
                emb.check_ids_on_cuda = saved
            for layer, cache in zip(self.m.decoder, self.caches):
                y = layer(y, self.enc, self.mask, cache=cache)
            return self.m.tgt_embedding.project(self.m._final_norm(y, self.m.decoder_norm))[:, 0]

        def reorder(self, rows: torch.Tensor) -> None:
            self.enc, self.mask = self.enc.index_select(0, rows), self.mask.index_select(0, rows)
            for cache in self.caches:
                for k in cache:
                    cache[k] = cache[k].index_select(0, rows)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, method: str = "beam", beam_size: int | None = None,
                 length_penalty: float | None = None, max_len: int | None = None, top_k: int = 0, top_p: float = 1.0,
                 temperature: float = 1.0, seed: int = 0, min_len: int = 0, diverse_groups: int = 1,
                 diverse_strength: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) int64 -> (tokens (B, beams, T) int64 without <s>, padded after </s>; scores (B, beams)).
        method: "beam" (diverse beam search with diverse_groups > 1), "greedy" or "sample" (top_k / top_p /
        temperature / seed)."""
        c = self.config
        was_training = self.training
        self.eval()
        try:
            max_len = max_len or c.max_output_len(src.shape[1])
            enc, mask = self.encode(src)
            return decoding.generate(
                lambda e, m, k: self._Decoder(self, e, m, k), enc, mask, method=method,
                beam_size=beam_size or c.beam_size,
                length_penalty=c.length_penalty if length_penalty is None else length_penalty, bos=c.bos_id,
                eos=c.eos_id, pad=c.pad_id, max_len=max_len, min_len=min_len, top_k=top_k, top_p=top_p,
                temperature=temperature, seed=seed, diverse_groups=diverse_groups, diverse_strength=diverse_strength)
        finally:
            self.train(was_training)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write config and weights atomically (a crash never leaves a half file under path)."""
        blob = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "model": self.state_dict(),
                "extra": extra or {}}
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "Transformer":
        blob = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an lsquant Transformer checkpoint (Transformer.save writes them)")
        model = cls(TransformerConfig.from_dict(blob["config"]))
        model.load_state_dict(blob["model"])
        return model.to(map_location) if map_location != "cpu" else model
