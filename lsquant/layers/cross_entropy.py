"""CrossEntropyLayer: label-smoothed cross-entropy ignoring padding targets, fused on CUDA."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lsquant import ops

from .base import ids_checked
from .config import CrossEntropyConfig


class CrossEntropyLayer(nn.Module):
    """forward(logits, targets) -> (loss, nll_loss), fp32 scalars summed over the non-padding targets.

    logits: (batch, seq_len, vocab) or (tokens, vocab), fp32/fp16/bf16; targets: (batch, seq_len) or (tokens,)
    int64, padding_idx where there is no target. loss is torch's cross_entropy(label_smoothing=epsilon,
    ignore_index=padding_idx, reduction="sum"); nll_loss is the unsmoothed one (no gradient), for logging.
    """

    # Target ids outside [0, vocab) (other than padding_idx) raise a ValueError. On CUDA that check is a
    # device-to-host sync per call (the host waits until the forward has run), so it is skipped under CUDA-graph
    # capture (where it is impossible) and can be turned off (False) for eager loops that must not sync; the
    # kernel needs no check: a target outside the vocabulary reads nothing and gives a NaN loss for its row.
    check_ids_on_cuda: bool = True

    @classmethod
    def get_config(cls, **kwargs) -> CrossEntropyConfig:
        return CrossEntropyConfig(**kwargs)

    def __init__(self, config: CrossEntropyConfig):
        super().__init__()
        if not isinstance(config, CrossEntropyConfig):
            raise TypeError(f"CrossEntropyLayer takes a CrossEntropyConfig (from get_config()), got "
                            f"{type(config).__name__}")
        self.config = dataclasses.replace(config)

    def extra_repr(self) -> str:
        return f"epsilon={self.config.epsilon}, padding_idx={self.config.padding_idx}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if logits.dim() < 2 or tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"CrossEntropyLayer: targets must have logits' shape without the vocabulary "
                             f"dimension: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")
        if targets.device != logits.device:
            raise ValueError(f"CrossEntropyLayer: targets are on {targets.device}, logits on {logits.device}")
        if targets.is_floating_point():
            raise TypeError(f"CrossEntropyLayer: targets must be integer ids, got {targets.dtype}")
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        t = targets.reshape(-1).long()
        if flat.shape[0] > c.max_batch_tokens:
            raise ValueError(f"CrossEntropyLayer: {flat.shape[0]} tokens, over max_batch_tokens="
                             f"{c.max_batch_tokens}; use smaller batches or raise it in the config")
        if ids_checked(t, self.check_ids_on_cuda):
            bad = (t != c.padding_idx) & ((t < 0) | (t >= V))
            if bool(bad.any()):  # a sync on CUDA: see check_ids_on_cuda
                raise ValueError(f"CrossEntropyLayer: target id {int(t[bad][0])} is outside the vocabulary "
                                 f"[0, {V}) and is not padding_idx={c.padding_idx}")
        loss, nll = ops.cross_entropy(flat, t, c.epsilon, c.padding_idx)
        return loss.sum(), nll.sum()
