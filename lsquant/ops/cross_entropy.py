"""Label-smoothed cross-entropy that ignores padding (csrc/kernels/cross_entropy.cu) and its reference.

logits: (N, V) fp32/fp16/bf16; targets: (N,) int64. Per row, in fp32, with lse = logsumexp(logits):

    nll  = lse - x[t]
    loss = (1 - eps) * nll + eps * (lse - mean(x))   (= torch's cross_entropy(label_smoothing=eps))

Rows whose target is ignore_index give loss = nll = 0 and no gradient. Returns (loss, nll), both fp32 (N,);
only loss is differentiable: d loss / d x_j = softmax_j - (1 - eps) [j == t] - eps / V.
"""
from __future__ import annotations

import torch

from .build import load
from .dropout import acc


def cross_entropy_ref(logits, targets, epsilon: float = 0.0, ignore_index: int = -100):
    x = acc(logits)
    V = x.shape[-1]
    ignore = targets == ignore_index
    t = torch.where(ignore, torch.zeros_like(targets), targets)
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - epsilon) * nll + epsilon * (lse - x.sum(-1) / V)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    return torch.where(ignore, zero, loss), torch.where(ignore, zero, nll).detach()


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, epsilon, ignore_index):
        logits, targets = logits.contiguous(), targets.contiguous()
        loss, nll, lse = load().ce_fwd(logits, targets, float(epsilon), int(ignore_index))
        ctx.args = (float(epsilon), int(ignore_index))
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, gloss, gnll):
        logits, targets, lse = ctx.saved_tensors
        g = load().ce_bwd(gloss.float().contiguous(), logits, targets, lse, *ctx.args)
        return g, None, None, None


def cross_entropy(logits, targets, epsilon: float = 0.0, ignore_index: int = -100):
    """Fused on CUDA, :func:`cross_entropy_ref` elsewhere. logits (N, V), targets (N,) -> (loss, nll) fp32 (N,)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, V) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if not logits.is_cuda:
        return cross_entropy_ref(logits, targets, epsilon, ignore_index)
    return _CrossEntropy.apply(logits, targets, epsilon, ignore_index)
