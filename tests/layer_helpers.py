"""Shared builders for the layer tests (CPU and CUDA) and the convergence task."""
from __future__ import annotations

import torch
from torch import nn

import lsquant
from lsquant.optim import MasterWeights
from lsquant.layers import CrossEntropyLayer, TransformerEmbeddingLayer, TransformerEncoderLayer


def padding_mask(lengths, L, device="cpu"):
    """(B, L) bool, True past each length (right padding)."""
    return torch.arange(L, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]


class TinyTagger(nn.Module):
    """embedding -> encoder layers -> shared-table projection; used by the convergence tests."""

    def __init__(self, vocab=16, dim=32, layers=2, heads=4, ffn=64, seq=8, dtype="float32", dropout=0.0):
        super().__init__()
        self.emb = TransformerEmbeddingLayer(TransformerEmbeddingLayer.get_config(
            vocab_size=vocab, embedding_dim=dim, max_batch_tokens=1024, max_seq_len=seq, padding_idx=0,
            dropout=dropout, learned_pos=True, dtype=dtype))
        self.layers = nn.ModuleList(TransformerEncoderLayer(TransformerEncoderLayer.get_config(
            max_batch_tokens=1024, max_seq_len=seq, hidden_size=dim, intermediate_size=ffn, nhead=heads,
            hidden_dropout_ratio=dropout, pre_layer_norm=False, dtype=dtype)) for _ in range(layers))
        self.loss = CrossEntropyLayer(CrossEntropyLayer.get_config(max_batch_tokens=1024, padding_idx=0,
                                                                   epsilon=0.1))

    def forward(self, tokens, targets=None):
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        logits = self.emb.project(x)
        if targets is None:
            return logits
        loss, nll = self.loss(logits, targets)
        n = (targets != 0).sum()
        return loss / n, nll / n


def reverse_batch(gen: torch.Generator, batch=32, seq=8, vocab=16):
    """Tokens in [1, vocab); target: the sequence reversed (needs attention and positions)."""
    tokens = torch.randint(1, vocab, (batch, seq), generator=gen)
    return tokens, tokens.flip(1)


def train(model, steps, device="cpu", lr=1e-2, seed=0, quant_from=None):
    """Adam on the reverse task; returns the per-step losses. quant_from: step at which to calibrate on one
    batch and enable quantization (QAT)."""
    gen = torch.Generator().manual_seed(seed)
    master = MasterWeights(list(model.parameters()))  # fp32 copies of bf16/fp16 weights, as in real training
    opt = torch.optim.Adam(master.optim_params(), lr=lr)
    losses = []
    for step in range(steps):
        tokens, targets = reverse_batch(gen)
        tokens, targets = tokens.to(device), targets.to(device)
        if quant_from is not None and step == quant_from:
            lsquant.calibrate(model, [(tokens,)], progress=False)
            model.apply(lsquant.enable_quant)
            master = MasterWeights(list(model.parameters()))
            opt = torch.optim.Adam(master.optim_params(), lr=lr / 3)
        loss, _ = model(tokens, targets)
        opt.zero_grad()
        model.zero_grad()
        loss.backward()
        master.grads_to_master()
        opt.step()
        master.master_to_model()
        losses.append(loss.item())
    return losses
