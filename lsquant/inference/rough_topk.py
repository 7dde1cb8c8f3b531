"""Beam search's ranking of extensions without the vocabulary log-softmax in memory (LightSeq's "rough top-k").

Plain beam search ranks, per sentence, the 2K best of score[beam] + log_softmax(logits[beam])[token] over
K x V (beam, token) pairs. The PyTorch path (``log_probs`` + ``cand.topk``) materialises that as fp32 [N, V]
tensors: at N = 512 rows (batch 128 x 4 beams), V = 32000 each one is 65.5 MB, and the step writes or reads
about seven of them (cast, log-softmax, masks, the add, topk): ~0.5 GB a step. Here two kernels read the
logits twice and write a few bytes per row:

- pass 1 (``_threshold``, one program per row): the row's max over all logits, and a threshold T: the row
  is split into C chunks (column % C; strided, so the low ids where frequent BPE tokens sit land in different
  chunks), and T = the 2K-th largest of the chunk maxima of the *masked* logits (banned ids, </s> before
  min_len, only </s> at max_len - 1). At least 2K masked values are >= T (one per chunk whose max is), so the
  row's top 2K all are. Simulated over 32000 ids (Gaussian logits, half of the draws biased toward low ids),
  with C = 64 chunks at K = 4 on average 8.4 values qualify, at most 11 in 300 draws (C = 128 at K = 8: 16.8,
  at most 21); CAP = 32 and 64 slots leave room for ~3x that.
- pass 2 (``_candidates``, one program per row): sum exp(x - max) over all logits (here, not in pass 1: with
  the final max, the formula of PyTorch's log-softmax, one exp per logit and no rescaling), collect the masked
  values >= T with their token ids into CAP slots (CAP = 4 x next_pow2(2K), at least 16), then write
  score + ((x - max) - log(sum)) per slot, the operations of F.log_softmax and the add of the update in the
  same fp32 order; unused slots -inf. If more than CAP values qualify (ties, flat rows), the program
  recomputes the row's exact top 2K by 2K argmax-below sweeps (never a silently wrong result).
- torch: topk(2K) over each sentence's K x CAP slots -> (top_s, top_i = beam * V + token).

Bytes at N = 512, V = 32000, K = 4, fp16 logits: 2 x 32.8 MB read (the second read mostly from L2: 50 MB on
an H100) and N x (12 + CAP x 8) = 137 KB written (CAP = 32), against ~0.5 GB.

Numerics: the max is exact; the sum of exponentials is reduced in another order than PyTorch's (and on the
GPU Triton's exp is ex2.approx, ~2 ulp), so log(sum) and the values agree with the PyTorch path to a few fp32
ulps (~1e-6 at values ~10), not bit for bit (PyTorch's CUDA and CPU log-softmax differ by as much). The
selection itself is exact: the kept values are the 2K largest of the values this path computes.

Ties: among equal values topk (over the slots, listed beam by beam, token ascending within a beam) decides
which are kept at the 2K-th place and their order; in the overflow fallback a row keeps its lowest token ids
among values equal at its own 2K-th place. A -inf result (a dead beam, or fewer than 2K finite extensions)
may carry any valid index (token 0 for unused slots), as in the PyTorch path, where such entries only give
tokens to dead beams.
"""
from __future__ import annotations

import functools

import torch

from .gemm_triton import _interpret
from .decoding import log_probs

MAX_BANNED = 4   # banned ids travel as scalar kernel arguments (baked into a captured graph, no device copy)


def sizes(beams: int) -> tuple[int, int]:
    """(C, CAP) for K = beams: C chunks in pass 1, CAP candidate slots per row in pass 2 (both powers of two).
    C = 8 x next_pow2(2K), at least 64 (K = 4: 64 chunks, ~8.4 qualifying values of CAP = 32)."""
    k2 = 1 << max(0, (2 * beams - 1).bit_length())   # next power of two >= 2K
    return max(64, 8 * k2), max(16, 4 * k2)


# ------------------------------------------------------------------------------------------------------
# Reference (CPU path and oracle)
# ------------------------------------------------------------------------------------------------------

def beam_topk_ref(logits: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, limits: torch.Tensor, eos: int,
                  banned: tuple[int, ...], beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) fp16/bf16/fp32, N = B * beams (row b * beams + k: beam k of sentence b); scores (B, beams)
    or (N,) fp32; t int64 [1]; limits int64 [2] = (min_len, max_len) -> (top_s (B, k) fp32, top_i (B, k)
    int64 = beam * V + token), k = min(2 * beams, beams * V), best first: plain beam search's ranking."""
    N, V = logits.shape
    B, K = N // beams, beams
    lp = log_probs(logits, t, limits, eos, banned).view(B, K, V)
    cand = (scores.reshape(B, K, 1) + lp).reshape(B, K * V)
    return cand.topk(min(2 * K, K * V), dim=1)


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _build(interpret: bool):
    # triton.jit decides at decoration time whether a function is compiled or interpreted: one build per mode.
    # The kernels resolve names in this module's globals (the interpreter does not see closures).
    global triton, tl, _masked
    import triton
    import triton.language as tl

    @triton.jit
    def _masked(x, col, eos, last, early, b0, b1, b2, b3):
        """The masks of log_probs on logits x at columns col, as an order key: -inf where the log-prob is -inf;
        +inf for </s> at the last position (its log-prob is 0, every other one -inf); x elsewhere."""
        ban = (col == b0) | (col == b1) | (col == b2) | (col == b3)
        key = tl.where(ban | last, float("-inf"), x)
        eos_key = tl.where(last, float("inf"), tl.where(early | ban, float("-inf"), x))
        return tl.where(col == eos, eos_key, key)

    @triton.jit
    def _threshold(x_ptr, stride, t_ptr, lim_ptr, max_ptr, thr_ptr, V, eos, b0, b1, b2, b3,
                   K2: tl.constexpr, C: tl.constexpr, R: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr)
        last = t == tl.load(lim_ptr + 1) - 1
        early = t < tl.load(lim_ptr) - 1
        r = tl.arange(0, R)
        c = tl.arange(0, C)
        mx = tl.full([R, C], float("-inf"), tl.float32)    # max of the raw logits (the log-softmax's)
        acc = tl.full([R, C], float("-inf"), tl.float32)   # max of the masked keys, chunk = column % C
        for start in range(0, V, R * C):
            col = start + r[:, None] * C + c[None, :]
            m = col < V
            x = tl.load(x_ptr + row * stride + col, mask=m, other=float("-inf")).to(tl.float32)
            mx = tl.maximum(mx, x)
            acc = tl.maximum(acc, tl.where(m, _masked(x, col, eos, last, early, b0, b1, b2, b3), float("-inf")))
        cm = tl.max(acc, axis=0)                           # [C] chunk maxima
        for _ in range(K2 - 1):                            # drop the largest 2K - 1 (one at a time: ties)
            top = tl.max(cm, axis=0)
            first = tl.min(tl.where(cm == top, c, C), axis=0)
            cm = tl.where(c == first, float("-inf"), cm)
        tl.store(thr_ptr + row, tl.max(cm, axis=0))        # the 2K-th largest chunk max
        tl.store(max_ptr + row, tl.max(tl.max(mx, axis=1), axis=0))

    @triton.jit
    def _candidates(x_ptr, stride, scores_ptr, t_ptr, lim_ptr, max_ptr, thr_ptr, val_ptr, tok_ptr, cnt_ptr,
                    V, eos, b0, b1, b2, b3, K2: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr)
        last = t == tl.load(lim_ptr + 1) - 1
        early = t < tl.load(lim_ptr) - 1
        M = tl.load(max_ptr + row)
        T = tl.load(thr_ptr + row)
        score = tl.load(scores_ptr + row)
        xrow = x_ptr + row * stride
        vrow = val_ptr + row * CAP
        trow = tok_ptr + row * CAP
        i = tl.arange(0, BLOCK)
        s = tl.zeros([BLOCK], tl.float32)                  # per-lane sums of exp(x - max)
        n = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)    # values >= T so far
        for start in range(0, V, BLOCK):
            col = start + i
            m = col < V
            x = tl.load(xrow + col, mask=m, other=float("-inf")).to(tl.float32)
            s += tl.where(m, tl.exp(x - M), 0.0)
            key = _masked(x, col, eos, last, early, b0, b1, b2, b3)
            q = m & (key >= T) & (key > float("-inf"))
            pos = n + tl.cumsum(q.to(tl.int32), axis=0) - 1
            ok = q & (pos < CAP)
            tl.store(vrow + pos, key, mask=ok)
            tl.store(trow + pos, col, mask=ok)
            n += tl.sum(q.to(tl.int32), axis=0)
        log_sum = tl.log(tl.sum(s, axis=0))
        tl.store(cnt_ptr + row, n)
        tl.debug_barrier()                                 # the slots written above, read by other threads
        slot = tl.arange(0, CAP)
        keys = tl.load(vrow + slot, mask=slot < n, other=float("-inf"))
        toks = tl.load(trow + slot, mask=slot < n, other=0)
        if (n > CAP) & (score > float("-inf")):
            # overflow: the row's exact top 2K by (key descending, column ascending), one sweep per rank, each
            # taking the best below the previous one. (A dead beam's extensions are -inf whatever is kept.)
            keys = tl.full([CAP], float("-inf"), tl.float32)
            toks = tl.zeros([CAP], tl.int32)
            pk = float("inf")
            pi = -1
            for j in range(K2):
                bk = float("-inf")
                bi = V
                for start in range(0, V, BLOCK):
                    col = start + i
                    m = col < V
                    x = tl.load(xrow + col, mask=m, other=float("-inf")).to(tl.float32)
                    key = _masked(x, col, eos, last, early, b0, b1, b2, b3)
                    below = (key < pk) | ((key == pk) & (col > pi))
                    kk = tl.where(m & below & (key > float("-inf")), key, float("-inf"))
                    blk = tl.max(kk, axis=0)
                    bc = tl.min(tl.where((kk == blk) & (kk > float("-inf")), col, V), axis=0)
                    better = (blk > bk) | ((blk == bk) & (bc < bi))
                    bk = tl.where(better, blk, bk)
                    bi = tl.where(better, bc, bi)
                keys = tl.where(slot == j, bk, keys)
                toks = tl.where(slot == j, bi, toks)
                pk = bk
                pi = bi
        # the values, in the fp32 order of F.log_softmax and the update's add: score + ((x - max) - log(sum))
        lp = tl.where((toks == eos) & last, 0.0, (keys - M) - log_sum)
        val = tl.where(keys > float("-inf"), score + lp, float("-inf"))
        tl.debug_barrier()                                 # every thread has read its slots before they change
        tl.store(vrow + slot, val)
        tl.store(trow + slot, tl.where(keys > float("-inf"), toks, 0))

    return _threshold, _candidates


# ------------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------------

def row_candidates(logits: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, limits: torch.Tensor, eos: int,
                   banned: tuple[int, ...], beams: int):
    """The two kernels: -> (val (N, CAP) fp32: score + log-prob of each collected token, -inf = unused;
    tok (N, CAP) int32: its token id; count (N,) int32: how many masked values reached the row's threshold
    (> CAP: the exact fallback ran, where the row's beam score is finite)). Shapes as in beam_topk."""
    if logits.dim() != 2 or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"beam_topk: logits must be (N, V) fp16/bf16/fp32, got {tuple(logits.shape)} {logits.dtype}")
    N, V = logits.shape
    if beams < 1 or N % beams or scores.numel() != N:
        raise ValueError(f"beam_topk: {N} logit rows, {scores.numel()} scores and {beams} beams do not match")
    if len(banned) > MAX_BANNED:
        raise ValueError(f"beam_topk takes at most {MAX_BANNED} banned ids, got {len(banned)}")
    if not 0 <= eos < V or any(not 0 <= b < V for b in banned):
        raise ValueError(f"beam_topk: eos {eos} and banned ids {banned} must be in [0, {V})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    scores = scores.reshape(N).float().contiguous()
    b = list(banned) + [-1] * (MAX_BANNED - len(banned))   # -1 matches no column
    C, CAP = sizes(beams)
    dev = logits.device
    stats = torch.empty(2, N, dtype=torch.float32, device=dev)   # row max, threshold
    val = torch.empty(N, CAP, dtype=torch.float32, device=dev)
    tok = torch.empty(N, CAP, dtype=torch.int32, device=dev)
    count = torch.empty(N, dtype=torch.int32, device=dev)
    threshold, candidates = _build(_interpret())
    # pass 1 reads R x C = 1024 logits per iteration (2 KB of fp16 per program and step)
    threshold[(N,)](logits, logits.stride(0), t, limits, stats[0], stats[1], V, eos, *b, K2=2 * beams, C=C,
                    R=max(1, 1024 // C), num_warps=4)
    candidates[(N,)](logits, logits.stride(0), scores, t, limits, stats[0], stats[1], val, tok, count, V, eos, *b,
                     K2=2 * beams, CAP=CAP, BLOCK=1024, num_warps=4)
    return val, tok, count


def beam_topk(logits: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, limits: torch.Tensor, eos: int,
              banned: tuple[int, ...], beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """beam_topk_ref's result (the same arguments and contract: values equal up to the log-softmax's rounding,
    indices equal except among equal values) without the (N, V) log-softmax: two Triton kernels on CUDA (or
    Triton's CPU interpreter). Graph-safe: no host sync, static shapes; allocates (N, CAP) candidate slots."""
    val, tok, _ = row_candidates(logits, scores, t, limits, eos, banned, beams)
    return rank(val, tok, beams, logits.shape[1])


def rank(val: torch.Tensor, tok: torch.Tensor, beams: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """row_candidates' slots (N, CAP) -> (top_s (B, k) fp32, top_i (B, k) int64 = beam * V + token), k =
    min(2 * beams, beams * V): a topk over each sentence's beams x CAP slots (K = 4: 128 values, not 128000)."""
    N, CAP = val.shape
    B, K = N // beams, beams
    top_s, j = val.view(B, K * CAP).topk(min(2 * K, K * V), dim=1)
    top_i = (j // CAP) * V + tok.view(B, K * CAP).gather(1, j).long()
    return top_s, top_i
