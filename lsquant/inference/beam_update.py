"""The bookkeeping of one beam-search step in one kernel (plain beam search, one group).

Given each sentence's 2K best (score, beam * V + token) extensions, ranked (``top_s``, ``top_i`` [B, 2K], best
first), :meth:`lsquant.inference.decoding._BeamSearch.update` finishes the extensions that end in </s> among the
first K ranks, merges them into the sentence's K finished hypotheses (a stable sort on the fp64 normalised
score), keeps the K best extensions that do not end, and reorders the token rows by their parents. In PyTorch
ops that is ~35 small kernels a step (divisions, masks, two top-k, a sort, gathers, cats, copies); here one
program per sentence does all of it:

- keep: the first K extensions in rank order that do not end in </s> (then, if fewer than K do not end, the
  ending ones in rank order, as dead beams of score -inf). The PyTorch path takes the K largest of the masked
  scores: the same set but among equal scores at the K-th place, where it may pick another of the tied ones
  (and among -inf scores, which only choose the tokens of dead beams: they never finish, so results are
  unaffected);
- finish: of the first K ranks, those ending in </s>, finite, in a sentence with fewer than K finished, get
  score / length ** alpha in fp64; the K old and K new candidates are ranked exactly as a stable descending
  sort of [old, new] ranks them (ties: old first, then by index), computed by pairwise comparison;
- the token rows: old finished rows, candidate rows (with </s> at position t) and the kept beams' rows (with
  the new token at t) are read in chunks of positions, then a barrier, then written (the writes permute rows
  the same program reads).

Bytes per sentence and step: reads 2K x 12 (candidates) + K x 8 (old finished scores) + 2K x L x 8 (rows) +
K x L x 8 (finished rows); writes K x L x 8 twice and K x 20: at B = 32, K = 4, L = 32, ~200 KB.
"""
from __future__ import annotations

import functools

import torch

from . import pdl
from .gemm_triton import _interpret


@functools.lru_cache(maxsize=1)
def _build(interpret: bool):
    global triton, tl, _pdl_enter
    import triton
    import triton.language as tl

    from . import gemm_triton

    gemm_triton._build(interpret)
    _pdl_enter = gemm_triton._pdl_enter   # programmatic dependent launch (lsquant.inference.pdl)

    @triton.jit
    def beam_update_kernel(top_s_ptr, top_i_ptr, scores_ptr, seqs_ptr, fin_s_ptr, fin_tok_ptr, count_ptr, norm_ptr,
                           t_ptr, rows_ptr, tokens_ptr, hist_ptr, sync_ptr, V, eos, L, B,
                           K: tl.constexpr, K2: tl.constexpr, KP: tl.constexpr, BLOCK_L: tl.constexpr,
                           HIST: tl.constexpr = False, USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        b = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr)
        NEG = float("-inf")
        j = tl.arange(0, K2)                     # rank positions of the 2K extensions
        jm = j < 2 * K
        ts = tl.load(top_s_ptr + b * 2 * K + j, mask=jm, other=NEG)
        ti = tl.load(top_i_ptr + b * 2 * K + j, mask=jm, other=0)
        beam = ti // V
        tok = ti % V
        is_eos = (tok == eos) & jm
        # keep: the first K that do not end, then (if too few) the ending ones, in rank order
        non = (~is_eos & jm).to(tl.int32)
        c_non = tl.cumsum(non, 0)
        n_non = tl.sum(non, 0)
        keep_a = (non > 0) & (c_non <= K)
        c_eos = tl.cumsum(is_eos.to(tl.int32), 0)
        keep_b = is_eos & (c_eos <= K - tl.minimum(n_non, K))
        keep = keep_a | keep_b
        slot = tl.cumsum(keep.to(tl.int32), 0) - 1
        keep_s = tl.where(keep_a, ts, NEG)
        row0 = b * K
        tl.store(scores_ptr + row0 + slot, keep_s, mask=keep)
        tl.store(rows_ptr + row0 + slot, row0 + beam, mask=keep)
        tl.store(tokens_ptr + row0 + slot, tok, mask=keep)
        # finish: candidates are the first K ranks
        count = tl.load(count_ptr + b)
        is_new = j < K
        new_ok = is_eos & (ts > NEG) & (count < K) & is_new
        norm = tl.load(norm_ptr + t)
        new_s = tl.where(new_ok, ts.to(tl.float64) / norm, NEG)
        i = tl.arange(0, KP)
        im = i < K
        old_s = tl.load(fin_s_ptr + b * K + i, mask=im, other=NEG)
        # ranks in a stable descending sort of [old (K), new (K)]
        o_i, o_c = old_s[:, None], old_s[None, :]
        before = (o_c > o_i) | ((o_c == o_i) & (i[None, :] < i[:, None]))
        r_old = tl.sum((before & im[None, :]).to(tl.int32), 1) \
            + tl.sum(((new_s[None, :] > o_i) & is_new[None, :]).to(tl.int32), 1)
        n_j, n_c = new_s[:, None], new_s[None, :]
        before_n = (n_c > n_j) | ((n_c == n_j) & (j[None, :] < j[:, None]))
        r_new = tl.sum((before_n & is_new[None, :]).to(tl.int32), 1) \
            + tl.sum(((old_s[None, :] >= n_j) & im[None, :]).to(tl.int32), 1)
        old_to = im & (r_old < K)
        new_to = is_new & (r_new < K)
        tl.store(fin_s_ptr + b * K + r_old, old_s, mask=old_to)
        tl.store(fin_s_ptr + b * K + r_new, new_s, mask=new_to)
        tl.store(count_ptr + b, count + tl.sum(new_ok.to(tl.int64), 0))
        # token rows (and the decoder's ancestry rows, HIST: int32 (N, L), the parent's row with this row's own
        # index at position t + 1), a chunk of positions at a time: read everything the chunk needs, barrier, write
        src_rows = seqs_ptr + (row0 + beam)[:, None] * L
        for p0 in range(0, L, BLOCK_L):
            p = p0 + tl.arange(0, BLOCK_L)
            pm = p < L
            cand = tl.load(src_rows + p[None, :], mask=jm[:, None] & pm[None, :], other=0)
            old = tl.load(fin_tok_ptr + (b * K + i)[:, None] * L + p[None, :], mask=im[:, None] & pm[None, :], other=0)
            if HIST:
                anc = tl.load(hist_ptr + (row0 + beam)[:, None] * L + p[None, :], mask=jm[:, None] & pm[None, :],
                              other=0)
            tl.debug_barrier()
            at_t = (p == t)[None, :]
            tl.store(fin_tok_ptr + (b * K + r_old)[:, None] * L + p[None, :], old, mask=old_to[:, None] & pm[None, :])
            tl.store(fin_tok_ptr + (b * K + r_new)[:, None] * L + p[None, :], tl.where(at_t, eos, cand),
                     mask=new_to[:, None] & pm[None, :])
            tl.store(seqs_ptr + (row0 + slot)[:, None] * L + p[None, :], tl.where(at_t, tok[:, None], cand),
                     mask=keep[:, None] & pm[None, :])
            if HIST:
                own = (row0 + slot).to(tl.int32)
                tl.store(hist_ptr + (row0 + slot)[:, None] * L + p[None, :],
                         tl.where((p == t + 1)[None, :], own[:, None], anc), mask=keep[:, None] & pm[None, :])
            tl.debug_barrier()
        # the last program to arrive (every other one has read t) advances the position and resets the counter
        arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
        if arrived == B - 1:
            tl.store(t_ptr, t + 1)
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed")

    return beam_update_kernel


def beam_update(search, top_s: torch.Tensor, top_i: torch.Tensor, V: int) -> None:
    """Apply one step of plain beam search (search: a _BeamSearch with one group) from the ranked extensions
    top_s (B, 2K) fp32, top_i (B, 2K) int64 = beam * V + token; ``search.t += 1`` included (the last program to
    arrive at ``search.sync``, an int32 counter left at zero)."""
    import triton

    B, K, L = search.B, search.K, search.L
    if top_s.shape != (B, 2 * K):
        raise ValueError(f"beam_update needs the 2K = {2 * K} best extensions per sentence, got {tuple(top_s.shape)}")
    for name, x in (("seqs", search.seqs), ("fin_tokens", search.fin_tokens)):
        if not x.is_contiguous():
            raise ValueError(f"beam_update: search.{name} must be contiguous")
    hist = search.hist
    if hist is not None and (hist.stride(1) != 1 or hist.stride(0) != L):
        raise ValueError("beam_update: search.hist must have rows of L contiguous positions")
    _build(_interpret())[(B,)](
        top_s.contiguous(), top_i.contiguous(), search.scores, search.seqs, search.fin_scores, search.fin_tokens,
        search.count, search.norm, search.t, search.rows, search.tokens, hist if hist is not None else search.t,
        search.sync, V, search.eos, L, B, K=K, HIST=hist is not None,
        K2=max(2, triton.next_power_of_2(2 * K)), KP=max(2, triton.next_power_of_2(K)),
        BLOCK_L=min(128, max(16, triton.next_power_of_2(L))), num_warps=4, **pdl.launch_args(top_s.device))
