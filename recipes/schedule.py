"""Learning-rate schedules (torch ``LambdaLR`` factors, so their state saves and restores with the
scheduler's ``state_dict``)."""
from __future__ import annotations

import math

import torch


class InverseSqrt:
    """LR factor (of the optimizer's peak ``lr``) for step ``s`` (0-based, one per optimizer step):
    ``min((s + 1) / warmup, sqrt(warmup / (s + 1)))``: linear warm-up reaching the peak at step
    ``warmup - 1``, then decay as 1/sqrt(step) ("Attention is all you need", fairseq's inverse_sqrt).
    The first step already gets peak/warmup (not 0, which would waste it). A class, not a lambda, so
    LambdaLR saves its settings in ``state_dict``."""

    def __init__(self, warmup_steps: int):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        s = step + 1
        return min(s / self.warmup_steps, math.sqrt(self.warmup_steps / s))


def inverse_sqrt_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Inverse-sqrt schedule with linear warm-up; the optimizer's ``lr`` is the peak. Call
    ``scheduler.step()`` after each ``optimizer.step()``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, InverseSqrt(warmup_steps))
