"""Mixed-precision training support: fp32 master weights for bf16/fp16 models."""
from __future__ import annotations

import torch


class MasterWeights:
    """fp32 master copies of a model's bf16/fp16 parameters, for mixed-precision training: the model computes in
    its low-precision dtype, the optimizer steps the fp32 copies (a bf16 weight cannot hold an update below 2^-8
    of itself, so plain bf16 Adam stalls), and the copies are rounded back into the model after each step.
    fp32 parameters (e.g. the quantizers' clips) are optimized directly."""

    def __init__(self, params):
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True)) for p in params
                      if p.requires_grad and p.dtype != torch.float32]
        low = {id(p) for p, _ in self.pairs}
        self.direct = [p for p in params if p.requires_grad and id(p) not in low]

    def optim_params(self) -> list:
        return [m for _, m in self.pairs] + self.direct

    def grads_to_master(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()

    def master_to_model(self) -> None:
        with torch.no_grad():
            for p, m in self.pairs:
                p.copy_(m)

    def state_dict(self) -> list:
        return [m.detach().clone() for _, m in self.pairs]

    def load_state_dict(self, state: list) -> None:
        if len(state) != len(self.pairs):
            raise ValueError(f"checkpoint has {len(state)} master tensors, the model {len(self.pairs)}")
        with torch.no_grad():
            for (_, m), t in zip(self.pairs, state):
                m.copy_(t)
        self.master_to_model()
