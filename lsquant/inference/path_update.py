"""One kernel for a step of greedy decoding and top-k sampling: what ``decoding._PathSearch.update`` does in
~30 PyTorch kernels (greedy) or ~45 (top-k sampling) a step, each a few microseconds in a CUDA graph replay,
for a handful of rows: at batch 8 the step's update took more GPU time than its six decoder layers' GEMMs.

One program per sentence (row b of the logits [B, V]):
1. One sweep over the row: the max and the sum of exp(x - max) of the scaled logits x = logits * (1 /
   temperature) (log_softmax's, with the sum rescaled as the max grows), and, for top-k sampling, the k largest
   masked values with their multiplicity (each block's k largest, extracted one element at a time, merged into a
   running list of k; blocks whose max cannot enter are skipped).
2. Greedy: the argmax of the log-probabilities lp = (x - max) - log(sum), masked as ``decoding.log_probs`` masks
   them (pad and bos never, </s> not before min_len, only </s> at the last position), ties to the lowest id.
   Sampling: lp below the k-th largest is dropped (``lp < kth``, as the reference's filter), the rest go through
   softmax (max and sum over the kept values), and the inverse CDF in fp64 in token order picks the token where
   the running sum first reaches the uniform u[t, b] (``count(cumsum < u)``, clamped to V - 1).
3. The bookkeeping: pad for done sentences, the score, the output token at position t, done, the next input
   token; the last program to arrive (an arrival counter, as the split-K GEMM's) adds one to ``steps`` if any
   sentence was open and advances ``t``, then leaves the counter at zero: the step's search update is one kernel.

Numerics: the same formulas in fp32 as ``log_probs`` / ``softmax`` (fp64 for the CDF); the sums are taken in
another order than PyTorch's reductions, so log-probabilities and scores agree to a few ulps (as the rough
top-k's do for beam search), and a token can differ only where two log-probabilities round to the same value
in one order and not in the other, or where u lies within ~1e-7 of a CDF step. The temperature is applied as a
multiplication by fp32(1 / temperature), which is what PyTorch's CUDA division by a number computes (exact at
temperature 1). Top-p (nucleus) sampling needs the sorted row and stays on the PyTorch ops.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from . import pdl
from .gemm_triton import _interpret

MAX_BANNED = 4      # banned ids as scalar arguments, as rough_topk's
MAX_TOP_K = 64      # k extractions a block: beyond this the PyTorch ops are faster
BLOCK = 4096        # logits a program reads per iteration (8 KB of fp16)


@functools.lru_cache(maxsize=1)
def _build(interpret: bool):
    global triton, tl, _pdl_enter, _banned, _scaled, _log_prob   # kernels resolve names in this module's globals
    import triton
    import triton.language as tl

    from . import gemm_triton

    gemm_triton._build(interpret)
    _pdl_enter = gemm_triton._pdl_enter

    @triton.jit
    def _banned(col, eos, early, b0, b1, b2, b3):
        # log_probs' masks before the last position: pad and bos never, </s> not before min_len - 1
        return (col == b0) | (col == b1) | (col == b2) | (col == b3) | ((col == eos) & early)

    @triton.jit
    def _scaled(row, start, offs, V, inv_temp):
        # one block of the row: its columns, which are in the row, and the logits times 1 / temperature in fp32
        col = start + offs
        valid = col < V
        return col, valid, tl.load(row + col, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp

    @triton.jit
    def _log_prob(row, start, offs, V, inv_temp, m, log_sum, eos, early, b0, b1, b2, b3):
        # one block's masked log-probabilities, log_softmax's formula: (x - max) - log(sum)
        col, valid, x = _scaled(row, start, offs, V, inv_temp)
        return col, valid, tl.where(valid & ~_banned(col, eos, early, b0, b1, b2, b3), (x - m) - log_sum,
                                    float("-inf"))

    @triton.jit
    def path_update_kernel(x_ptr, stride_x, inv_temp, t_ptr, lim_ptr, done_ptr, scores_ptr, steps_ptr, out_ptr,
                           tokens_ptr, u_ptr, sync_ptr, B, V, L, eos, pad, b0, b1, b2, b3,
                           SAMPLE: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                           USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        b = tl.program_id(0)
        t = tl.load(t_ptr)
        last = t == tl.load(lim_ptr + 1) - 1
        early = t < tl.load(lim_ptr) - 1
        done = tl.load(done_ptr + b) != 0
        row = x_ptr + b.to(tl.int64) * stride_x
        offs = tl.arange(0, BLOCK)
        NEG = float("-inf")
        # 1. max and sum of exp (online), the max masked value, and (top-k) the k largest masked values
        m = tl.full((), NEG, tl.float32)
        s = tl.full((), 0.0, tl.float32)
        kmax = tl.full((), NEG, tl.float32)
        ki = tl.arange(0, KP)
        top = tl.where(ki < TOP_K, NEG, float("inf"))   # entries past k never the minimum
        for start in range(0, V, BLOCK):
            col, valid, x = _scaled(row, start, offs, V, inv_temp)
            bm = tl.max(x, axis=0)
            m_new = tl.maximum(m, bm)
            m_use = tl.where(m_new == NEG, 0.0, m_new)   # all -inf so far (a masked-out block): no NaN, s stays 0
            s = s * tl.exp(m - m_use) + tl.sum(tl.where(valid, tl.exp(x - m_use), 0.0), axis=0)
            m = m_new
            key = tl.where(valid & ~_banned(col, eos, early, b0, b1, b2, b3), x, NEG)
            kmax = tl.maximum(kmax, tl.max(key, axis=0))
            if TOP_K > 0:
                if tl.max(key, axis=0) > tl.min(top, axis=0):
                    for _ in range(TOP_K):
                        v = tl.max(key, axis=0)
                        first = tl.min(tl.where(key == v, offs, BLOCK), axis=0)
                        key = tl.where(offs == first, NEG, key)
                        low = tl.min(top, axis=0)
                        slot = tl.min(tl.where(top == low, ki, KP), axis=0)
                        top = tl.where(ki == slot, tl.maximum(top, v), top)   # v replaces the minimum if larger
        log_sum = tl.log(s)
        if SAMPLE:
            # the k-th largest lp is the image of the k-th largest masked value (lp is nondecreasing in it)
            kth_lp = tl.full((), NEG, tl.float32)
            if TOP_K > 0:
                kth_lp = (tl.min(top, axis=0) - m) - log_sum
            top_lp = (kmax - m) - log_sum
            # 2. softmax of the kept values: their sum (the max is top_lp, always kept)
            fs = tl.full((), 0.0, tl.float32)
            for start in range(0, V, BLOCK):
                col, valid, lp = _log_prob(row, start, offs, V, inv_temp, m, log_sum, eos, early, b0, b1, b2, b3)
                fs += tl.sum(tl.where(lp >= kth_lp, tl.exp(lp - top_lp), 0.0), axis=0)
            # 3. the inverse CDF in fp64, in token order
            u = tl.load(u_ptr + t * B + b)
            carry = tl.full((), 0.0, tl.float64)
            n = tl.full((), 0, tl.int64)
            for start in range(0, V, BLOCK):
                col, valid, lp = _log_prob(row, start, offs, V, inv_temp, m, log_sum, eos, early, b0, b1, b2, b3)
                p = tl.where(lp >= kth_lp, tl.exp(lp - top_lp), 0.0) / fs
                cs = carry + tl.cumsum(p.to(tl.float64), axis=0)
                n += tl.sum((valid & (cs < u)).to(tl.int64), axis=0)
                carry = tl.max(cs, axis=0)   # the running sum is nondecreasing: its last value
            tok = tl.minimum(n, V - 1)
            xt = tl.load(row + tok).to(tl.float32) * inv_temp
            lp_tok = tl.where(_banned(tok, eos, early, b0, b1, b2, b3), NEG, (xt - m) - log_sum)
        else:
            # 2. the argmax of lp, ties to the lowest id
            best = tl.full((), NEG, tl.float32)
            tok = tl.full((), 0, tl.int64)
            for start in range(0, V, BLOCK):
                col, valid, lp = _log_prob(row, start, offs, V, inv_temp, m, log_sum, eos, early, b0, b1, b2, b3)
                bv = tl.max(lp, axis=0)
                bi = tl.min(tl.where(valid & (lp == bv), col, V), axis=0).to(tl.int64)
                better = bv > best
                tok = tl.where(better, bi, tok)
                best = tl.where(better, bv, best)
            lp_tok = best
        # the last position: only </s> (log-prob 0)
        tok = tl.where(last, eos, tok)
        lp_tok = tl.where(last, 0.0, lp_tok)
        # 3. bookkeeping
        tok = tl.where(done, pad, tok).to(tl.int64)
        tl.store(scores_ptr + b, tl.load(scores_ptr + b) + tl.where(done, 0.0, lp_tok))
        tl.store(out_ptr + b.to(tl.int64) * L + t, tok)
        tl.store(done_ptr + b, (done | (tok == eos)).to(tl.int1))
        tl.store(tokens_ptr + b, tl.where(tok == pad, eos, tok))
        tl.atomic_or(sync_ptr + 1, tl.where(done, 0, 1), sem="relaxed")   # any sentence open at this step
        tl.debug_barrier()
        arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
        if arrived == B - 1:
            # every program has read t and stored its row: one step more if any sentence was open, next position
            is_open = tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed")
            tl.store(steps_ptr, tl.load(steps_ptr) + is_open.to(tl.int64))
            tl.store(t_ptr, t + 1)
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed")

    return path_update_kernel


def supported(search) -> bool:
    """Whether the kernel can run this search's update: greedy, or sampling without top-p and with top_k <=
    MAX_TOP_K, at most MAX_BANNED banned ids."""
    if len(search.banned) > MAX_BANNED:
        return False
    if search.sample is None:
        return True
    top_k, top_p = search.sample[:2]
    return top_p >= 1.0 and 0 <= top_k <= MAX_TOP_K


def path_update(search, logits: torch.Tensor) -> None:
    """The update of a _PathSearch (greedy or top-k sampling, see :func:`supported`) from logits [B, V], in one
    kernel, ``search.t += 1`` included. Graph-safe: no host sync, static shapes."""
    import triton

    B, V = logits.shape
    if B != search.batch:
        raise ValueError(f"path_update: {B} logit rows for a batch of {search.batch}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    for name in ("done", "scores", "out", "tokens"):
        if not getattr(search, name).is_contiguous():
            raise ValueError(f"path_update: search.{name} must be contiguous")
    sample = search.sample is not None
    top_k = min(int(search.sample[0]), V) if sample else 0
    b = list(search.banned) + [-1] * (MAX_BANNED - len(search.banned))   # -1 matches no column
    inv_temp = float(np.float32(1.0) / np.float32(search.temperature))
    _build(_interpret())[(B,)](
        logits, logits.stride(0), inv_temp, search.t, search.limits, search.done, search.scores, search.steps,
        search.out, search.tokens, search.u if sample else search.scores, search.sync, B, V, search.L,
        search.eos, search.pad, *b, SAMPLE=sample, TOP_K=top_k, KP=max(2, triton.next_power_of_2(max(top_k, 1))),
        BLOCK=min(BLOCK, triton.next_power_of_2(V)), num_warps=8,
        enable_fp_fusion=False,   # x * (1 / T) rounded before - max, as PyTorch's two kernels round it
        **pdl.launch_args(logits.device))
