"""Beam search's ranking of extensions without the vocabulary log-softmax in memory (LightSeq's "rough top-k").

Plain beam search ranks, per sentence, the 2K best of score[beam] + log_softmax(logits[beam])[token] over
K x V (beam, token) pairs. The PyTorch path (``log_probs`` + ``cand.topk``) materialises that as fp32 [N, V]
tensors: at N = 512 rows (batch 128 x 4 beams), V = 32000 each one is 65.5 MB, and the step writes or reads
about seven of them (cast, log-softmax, masks, the add, topk): ~0.5 GB a step. Here three kernels read the
logits twice and write a few bytes per row, and a fourth ranks the collected slots. Passes 1 and 2 run P programs per row, each over a slice of
S = ceil(V / P) logits (rounded up to whole 1,024-logit tiles; P from :func:`slices`): with few rows (decoding at
batch <= 32) one program per row would leave most SMs idle while it walks 32,000 logits in 32 dependent steps.

- pass 1 (``_threshold``, program (row, slice)): the slice's max, and its maxima of C chunks of the *masked*
  logits (chunk = column % C, strided, so the low ids where frequent BPE tokens sit land in different chunks;
  masks: banned ids, </s> before min_len, only </s> at max_len - 1).
- pass 2 (``_candidates``, program (row, slice)): the row's max M (the max of the slices') and threshold T (the
  2K-th largest chunk max over the whole row: at least 2K masked values are >= T, one per chunk whose max is,
  so the row's top 2K all are; every program of the row computes the same M and T from the same inputs); then
  over its slice the sum of exp(x - M) (with the final max: the formula of PyTorch's log-softmax, one exp per
  logit, no rescaling) and the masked values >= T with their token ids, into the slice's CAP slots (CAP =
  4 x next_pow2(2K), at least 16). Simulated over 32000 ids (Gaussian logits, half of the draws biased toward
  low ids), with C = 64 chunks at K = 4 on average 8.4 values of a row qualify, at most 11 in 300 draws (C = 128
  at K = 8: 16.8, at most 21): a slice's CAP = 32 or 64 slots hold a whole row's with room to spare.
- ``_finish`` (one program per row): log(sum) over the slices' sums, then score + ((x - M) - log(sum)) per
  collected slot, in place: the operations of F.log_softmax and the add of the update in the same fp32 order;
  unused slots -inf. If a slice had more than CAP values at T (ties, flat rows), the program recomputes the
  row's exact top 2K by 2K argmax-below sweeps (never a silently wrong result).
- ``_rank`` (one program per sentence, :func:`rank`): the 2K best of the sentence's K x P x CAP slots, best
  first -> (top_s, top_i = beam * V + token); ``rank_ref`` (topk over the slots) is its reference and its
  fallback.

Bytes at N = 512, V = 32000, K = 4 (P = 1), fp16 logits: 2 x 32.8 MB read (the second read mostly from L2: 50
MB on an H100) and N x (12 + CAP x 8) = 137 KB written (CAP = 32), against ~0.5 GB.

Numerics: the max is exact; the sum of exponentials is reduced in another order than PyTorch's (per lane, per
slice, then over the slices; on the GPU Triton's exp is ex2.approx, ~2 ulp), so log(sum) and the values agree
with the PyTorch path to a few fp32 ulps (~1e-6 at values ~10), not bit for bit (PyTorch's CUDA and CPU
log-softmax differ by as much). The selection itself is exact: the kept values are the 2K largest of the values
this path computes.

Ties: among equal values the first slot wins (slots listed beam by beam, slice by slice, token ascending
within a slice), at the 2K-th place and in the order; in the overflow fallback a row keeps its lowest token ids
among values equal at its own 2K-th place. A -inf result (a dead beam, or fewer than 2K finite extensions)
may carry any valid index (token 0 for unused slots), as in the PyTorch path, where such entries only give
tokens to dead beams.
"""
from __future__ import annotations

import functools

import torch

from . import pdl
from .gemm_triton import _interpret
from .decoding import _run_fused, log_probs

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
    global triton, tl, _masked, _pdl_enter
    import triton
    import triton.language as tl

    from . import gemm_triton

    gemm_triton._build(interpret)
    _pdl_enter = gemm_triton._pdl_enter   # programmatic dependent launch (lsquant.inference.pdl)

    @triton.jit
    def _masked(x, col, eos, last, early, b0, b1, b2, b3):
        """The masks of log_probs on logits x at columns col, as an order key: -inf where the log-prob is -inf;
        +inf for </s> at the last position (its log-prob is 0, every other one -inf); x elsewhere."""
        ban = (col == b0) | (col == b1) | (col == b2) | (col == b3)
        key = tl.where(ban | last, float("-inf"), x)
        eos_key = tl.where(last, float("inf"), tl.where(early | ban, float("-inf"), x))
        return tl.where(col == eos, eos_key, key)

    @triton.jit
    def _threshold(x_ptr, stride, t_ptr, lim_ptr, pmax_ptr, pcm_ptr, V, S, eos, b0, b1, b2, b3,
                   P: tl.constexpr, C: tl.constexpr, R: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        # program (row, p): columns [p S, min(V, (p + 1) S)) of the row; S is a multiple of R x C, so a column's
        # chunk (column % C) is its lane c in every tile
        row = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        t = tl.load(t_ptr)
        last = t == tl.load(lim_ptr + 1) - 1
        early = t < tl.load(lim_ptr) - 1
        r = tl.arange(0, R)
        c = tl.arange(0, C)
        end = tl.minimum(V, (p + 1) * S)
        mx = tl.full([R, C], float("-inf"), tl.float32)    # max of the raw logits (the log-softmax's)
        acc = tl.full([R, C], float("-inf"), tl.float32)   # max of the masked keys, chunk = column % C
        for start in range(p * S, end, R * C):
            col = start + r[:, None] * C + c[None, :]
            m = col < end
            x = tl.load(x_ptr + row * stride + col, mask=m, other=float("-inf")).to(tl.float32)
            mx = tl.maximum(mx, x)
            acc = tl.maximum(acc, tl.where(m, _masked(x, col, eos, last, early, b0, b1, b2, b3), float("-inf")))
        tl.store(pcm_ptr + (row * P + p) * C + c, tl.max(acc, axis=0))   # this slice's chunk maxima
        tl.store(pmax_ptr + row * P + p, tl.max(tl.max(mx, axis=1), axis=0))

    @triton.jit
    def _candidates(x_ptr, stride, t_ptr, lim_ptr, pmax_ptr, pcm_ptr, psum_ptr, key_ptr, tok_ptr, cnt_ptr, V, S,
                    eos, b0, b1, b2, b3, K2: tl.constexpr, P: tl.constexpr, C: tl.constexpr, CAP: tl.constexpr,
                    BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        # program (row, p): the row's max and threshold from every slice's pass-1 results (each program of the
        # row computes the same two numbers from the same inputs), then its own slice: the sum of exp(x - max)
        # and the masked values >= threshold, into the slice's CAP slots
        row = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        t = tl.load(t_ptr)
        last = t == tl.load(lim_ptr + 1) - 1
        early = t < tl.load(lim_ptr) - 1
        ps = tl.arange(0, P)
        c = tl.arange(0, C)
        M = tl.max(tl.load(pmax_ptr + row * P + ps), axis=0)
        cm = tl.max(tl.load(pcm_ptr + (row * P + ps[:, None]) * C + c[None, :]), axis=0)   # [C] chunk maxima
        for _ in range(K2 - 1):                            # drop the largest 2K - 1 (one at a time: ties)
            top = tl.max(cm, axis=0)
            first = tl.min(tl.where(cm == top, c, C), axis=0)
            cm = tl.where(c == first, float("-inf"), cm)
        T = tl.max(cm, axis=0)                             # the 2K-th largest chunk max
        xrow = x_ptr + row * stride
        base = (row * P + p) * CAP
        end = tl.minimum(V, (p + 1) * S)
        i = tl.arange(0, BLOCK)
        s = tl.zeros([BLOCK], tl.float32)                  # per-lane sums of exp(x - max)
        n = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)    # values >= T so far
        for start in range(p * S, end, BLOCK):
            col = start + i
            m = col < end
            x = tl.load(xrow + col, mask=m, other=float("-inf")).to(tl.float32)
            s += tl.where(m, tl.exp(x - M), 0.0)
            key = _masked(x, col, eos, last, early, b0, b1, b2, b3)
            q = m & (key >= T) & (key > float("-inf"))
            nq = tl.sum(q.to(tl.int32), axis=0)
            # ~8 values of a row's 32,000 qualify (K = 4), so most tiles have none: the scan and the stores, a
            # serial chain per tile, run only where one does (unconditional, this pass took 4x pass 1's time at
            # 512 rows on an H200: 101 against 25 us a step)
            if nq > 0:
                pos = n + tl.cumsum(q.to(tl.int32), axis=0) - 1
                ok = q & (pos < CAP)
                tl.store(key_ptr + base + pos, key, mask=ok)
                tl.store(tok_ptr + base + pos, col, mask=ok)
            n += nq
        tl.store(psum_ptr + row * P + p, tl.sum(s, axis=0))
        tl.store(cnt_ptr + row * P + p, n)

    @triton.jit
    def _finish(x_ptr, stride, scores_ptr, t_ptr, lim_ptr, pmax_ptr, psum_ptr, val_ptr, tok_ptr, cnt_ptr, count_ptr,
                V, eos, b0, b1, b2, b3, K2: tl.constexpr, P: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        # one program per row: log(sum), the values of the collected slots (in place), or, if a slice had more
        # than CAP values at the threshold, the row's exact top 2K
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr)
        last = t == tl.load(lim_ptr + 1) - 1
        early = t < tl.load(lim_ptr) - 1
        ps = tl.arange(0, P)
        M = tl.max(tl.load(pmax_ptr + row * P + ps), axis=0)
        log_sum = tl.log(tl.sum(tl.load(psum_ptr + row * P + ps), axis=0))
        cnt = tl.load(cnt_ptr + row * P + ps)
        tl.store(count_ptr + row, tl.sum(cnt, axis=0))
        score = tl.load(scores_ptr + row)
        slot = tl.arange(0, P * CAP)
        n_slot = tl.load(cnt_ptr + row * P + slot // CAP)  # the count of the slot's slice
        used = (slot % CAP) < n_slot
        vrow = val_ptr + row * (P * CAP)
        trow = tok_ptr + row * (P * CAP)
        keys = tl.load(vrow + slot, mask=used, other=float("-inf"))
        toks = tl.load(trow + slot, mask=used, other=0)
        if (tl.max(cnt, axis=0) > CAP) & (score > float("-inf")):
            # overflow: the row's exact top 2K by (key descending, column ascending), one sweep per rank, each
            # taking the best below the previous one. (A dead beam's extensions are -inf whatever is kept.)
            xrow = x_ptr + row * stride
            i = tl.arange(0, BLOCK)
            keys = tl.full([P * CAP], float("-inf"), tl.float32)
            toks = tl.zeros([P * CAP], tl.int32)
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

    @triton.jit
    def _rank(val_ptr, tok_ptr, top_s_ptr, top_i_ptr, V, KW, W, K2: tl.constexpr, BLOCK_KW: tl.constexpr,
              USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        # one program per sentence: its K2 best of the K x W slots of its K rows (contiguous), best first, in the
        # order (value descending, slot ascending): sweep j takes the first slot after sweep j - 1's in that order
        # (-inf values included, so every rank gets a slot as topk's does); -> value, beam * V + token (int64)
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_KW)
        valid = i < KW
        v = tl.load(val_ptr + b * KW + i, mask=valid, other=float("-inf"))
        pk = float("inf")
        pi = -1
        for j in range(K2):
            after = valid & ((v < pk) | ((v == pk) & (i > pi)))
            m = tl.max(tl.where(after, v, float("-inf")), axis=0)
            sel = tl.min(tl.where(after & (v == m), i, BLOCK_KW), axis=0)
            tok = tl.load(tok_ptr + b * KW + sel)
            tl.store(top_s_ptr + b * K2 + j, m)
            tl.store(top_i_ptr + b * K2 + j, (sel // W).to(tl.int64) * V + tok.to(tl.int64))
            pk = m
            pi = sel

    return _threshold, _candidates, _finish, _rank


# ------------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------------

BLOCK = 1024   # logits per iteration of pass 2 (and of pass 1's R x C tiles); a slice is a multiple of it
MAX_SLICES = 16


def slices(N: int, V: int, num_sms: int | None = None) -> int:
    """P, the programs that share one row in passes 1 and 2 (a power of two): enough to give the GPU ~2 programs
    per SM when rows are few (at 32 rows on 132 SMs, 8 slices of 4,096 logits instead of one program walking
    32,000 in 32 dependent steps), 1 from 264 rows up, and never a slice under BLOCK logits. The environment
    variable LSQUANT_ROUGH_SLICES=P overrides it (row_candidates checks the value)."""
    import os

    forced = os.environ.get("LSQUANT_ROUGH_SLICES")   # an override for experiments (1: one program per row)
    if forced:
        return int(forced)
    if num_sms is None:
        from .gemm_triton import num_sms as sms

        num_sms = sms()
    want = max(1, min(MAX_SLICES, (2 * num_sms) // max(N, 1), -(-V // BLOCK)))
    return 1 << (want.bit_length() - 1)


def row_candidates(logits: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, limits: torch.Tensor, eos: int,
                   banned: tuple[int, ...], beams: int, num_slices: int | None = None):
    """The three kernels: -> (val (N, P x CAP) fp32: score + log-prob of each collected token, -inf = unused;
    tok (N, P x CAP) int32: its token id; count (N,) int32: how many masked values reached the row's threshold).
    P = num_slices (default :func:`slices`); each slice has CAP slots; where a slice had more than CAP values at
    the threshold (ties, flat rows) and the row's beam score is finite, the row's slots hold its exact top 2K
    instead. Shapes as in beam_topk."""
    if logits.dim() != 2 or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"beam_topk: logits must be (N, V) fp16/bf16/fp32, got {tuple(logits.shape)} {logits.dtype}")
    N, V = logits.shape
    if beams < 1 or N % beams or scores.numel() != N:
        raise ValueError(f"beam_topk: {N} logit rows, {scores.numel()} scores and {beams} beams do not match")
    if len(banned) > MAX_BANNED:
        raise ValueError(f"beam_topk takes at most {MAX_BANNED} banned ids, got {len(banned)}")
    if not 0 <= eos < V or any(not 0 <= b < V for b in banned):
        raise ValueError(f"beam_topk: eos {eos} and banned ids {banned} must be in [0, {V})")
    P = slices(N, V) if num_slices is None else int(num_slices)
    if P < 1 or P & (P - 1) or P > MAX_SLICES:
        raise ValueError(f"beam_topk: num_slices must be a power of two in [1, {MAX_SLICES}], got {num_slices}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    scores = scores.reshape(N).float().contiguous()
    b = list(banned) + [-1] * (MAX_BANNED - len(banned))   # -1 matches no column
    C, CAP = sizes(beams)
    R = max(1, BLOCK // C)                                 # pass 1's tile: R x C logits
    tile = max(BLOCK, R * C)
    S = -(-V // P)                                         # the slice: ceil(V / P) ...
    S = -(-S // tile) * tile                               # ... rounded up to whole tiles
    dev = logits.device
    part = torch.empty(2, N, P, dtype=torch.float32, device=dev)   # per slice: row max, sum of exp(x - max)
    pcm = torch.empty(N, P, C, dtype=torch.float32, device=dev)    # per slice: chunk maxima
    cnt = torch.empty(N, P, dtype=torch.int32, device=dev)
    val = torch.empty(N, P * CAP, dtype=torch.float32, device=dev)
    tok = torch.empty(N, P * CAP, dtype=torch.int32, device=dev)
    count = torch.empty(N, dtype=torch.int32, device=dev)
    threshold, candidates, finish, _ = _build(_interpret())
    pdl_args = pdl.launch_args(dev)
    # pass 1 reads R x C = BLOCK logits per iteration (2 KB of fp16 per program and step)
    threshold[(N, P)](logits, logits.stride(0), t, limits, part[0], pcm, V, S, eos, *b, P=P, C=C, R=R,
                      num_warps=4, **pdl_args)
    candidates[(N, P)](logits, logits.stride(0), t, limits, part[0], pcm, part[1], val, tok, cnt, V, S, eos, *b,
                       K2=2 * beams, P=P, C=C, CAP=CAP, BLOCK=BLOCK, num_warps=4, **pdl_args)
    finish[(N,)](logits, logits.stride(0), scores, t, limits, part[0], part[1], val, tok, cnt, count, V, eos, *b,
                 K2=2 * beams, P=P, CAP=CAP, BLOCK=BLOCK, num_warps=4, **pdl_args)
    return val, tok, count


def beam_topk(logits: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, limits: torch.Tensor, eos: int,
              banned: tuple[int, ...], beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """beam_topk_ref's result (the same arguments and contract: values equal up to the log-softmax's rounding,
    indices equal except among equal values) without the (N, V) log-softmax: two Triton kernels on CUDA (or
    Triton's CPU interpreter). Graph-safe: no host sync, static shapes; allocates (N, CAP) candidate slots."""
    val, tok, _ = row_candidates(logits, scores, t, limits, eos, banned, beams)
    return rank(val, tok, beams, logits.shape[1])


def rank(val: torch.Tensor, tok: torch.Tensor, beams: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """row_candidates' slots (N, W) -> (top_s (B, k) fp32, top_i (B, k) int64 = beam * V + token), k =
    min(2 * beams, beams * V), best first: rank_ref's result (values equal, indices equal except among equal
    values) in one Triton kernel, one program per sentence (K = 4, 8 slices: 2K = 8 sweeps over 1,024 slots),
    instead of a topk (a radix select and a sort) and the index arithmetic around it."""
    N, W = val.shape
    B, K = N // beams, beams
    k = min(2 * K, K * V)
    top_s = torch.empty(B, k, dtype=torch.float32, device=val.device)
    top_i = torch.empty(B, k, dtype=torch.int64, device=val.device)
    if B == 0:
        return top_s, top_i
    import triton

    def launch():
        _build(_interpret())[3][(B,)](val, tok, top_s, top_i, V, K * W, W, K2=k,
                                      BLOCK_KW=triton.next_power_of_2(K * W), num_warps=4,
                                      **pdl.launch_args(val.device))

    # a kernel that cannot run here (a Triton change, say) must not stop the search: topk from then on
    if _run_fused("rough_topk.rank", launch):
        return top_s, top_i
    return rank_ref(val, tok, beams, V)


def rank_ref(val: torch.Tensor, tok: torch.Tensor, beams: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rank in PyTorch ops: a topk over each sentence's beams x W slots, then beam * V + token."""
    N, W = val.shape
    B, K = N // beams, beams
    top_s, j = val.view(B, K * W).topk(min(2 * K, K * V), dim=1)
    top_i = (j // W) * V + tok.view(B, K * W).gather(1, j).long()
    return top_s, top_i
