"""Decoding algorithms shared by the PyTorch models and the engines: one copy, so the model's own decoding
and an engine built from its export pick tokens by exactly the same rules.

Every step runs on the device without a host sync: the search state (live beams, finished hypotheses, scores,
the current position) lives in device tensors of static shape, updated in place by ``update(logits)``, so an
engine can capture the model step and the update together in one CUDA graph. The host only asks "are all
sentences done?" every ``CHECK_EVERY`` steps; the steps run after a sentence is done change nothing (a done
sentence takes no new hypothesis, a done row of greedy or sampling emits pad), so results do not depend on
when the check happens.

Plain beam search on CUDA ranks its extensions with :func:`lsquant.inference.rough_topk.beam_topk` (LightSeq's
"rough top-k"): one kernel finds each row's max and a threshold that at least 2K masked logits reach, a second
sums the exponentials and keeps only the values over the threshold (~2K per row; an exact fallback where ties
overflow its slots), then a topk over K x CAP slots per sentence. log_probs + topk instead writes and reads
fp32 [N, V] tensors: at N = 512 rows, V = 32000, 65.5 MB each, seven passes (cast, log-softmax, mask, add,
topk): ~0.5 GB a step, where the kernels read the fp16 logits twice (2 x 32.8 MB, the second mostly from L2)
and write ~140 KB. Values agree with log_probs + topk to the log-softmax's rounding (~1e-6; the summation
order differs, as between PyTorch's CUDA and CPU kernels). LSQUANT_ROUGH_TOPK=0 turns it off; the CPU path
and diverse beam search (groups > 1) always take log_probs + topk.

A decoder is any object with
    step(tokens: LongTensor [N], t: int, rows: LongTensor [N] | None) -> logits FloatTensor [N, vocab]
        tokens: the previous token of each row; t: its position, 0 for the <s> that starts every row; rows:
        first, row i of every cached state becomes old row rows[i] (the beam reorder), None: no reorder
where N = batch * beams (beams = 1 for greedy and sampling), row b * beams + k holds beam k of sentence b.
A decoder may also define
    advance(search, t: int) -> None: the step and the search update together, which an engine captures in one
        CUDA graph per ``search.key`` (a hashable that fixes every shape and constant of ``update``): reorder
        the cached rows by ``search.rows`` (int64 [N], when ``search.reorders``; the identity at t = 0), run the
        step on ``search.tokens`` (int64 [N]) at position t (on the device: ``search.t``, int64 [1]), then call
        ``search.update(logits [N, V])``; ``search.batch`` and ``search.beams`` give N = batch * beams
    buffer(name: str, shape: tuple, dtype) -> Tensor: persistent storage for the search state (the same tensor
        for the same name, shape and dtype), so a captured graph finds the state of every later request at
        the same addresses; contents on return are undefined
    max_steps: int: the time dimension of the state buffers (>= max_len; default max_len)
    history: int32 [N, max_steps]: an ancestry table the search keeps for the decoder (an engine whose caches are
        never reordered: lsquant.inference.attention), in the update, with the token rows: after the update of
        step t, history[r, j] for j <= t is history[parent of r, j] before it, and history[r, t + 1] = r; at the
        start history[r, 0] = r (greedy and sampling never reorder: history[r, j] = r for every j)

pad and bos are never generated. All return (tokens [batch, beams, T] int64, padded with pad after </s>, without the leading <s>;
scores [batch, beams] fp32, best first). Scores are sums of log-probabilities divided by length ** alpha
(length: generated tokens including </s>), the rule of fairseq's length penalty.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

NEG_INF = float("-inf")
# How often the host checks whether every sentence is done (a device -> host sync that drains the queue):
# every step would stall the GPU once per token; after a sentence is done at most CHECK_EVERY - 1 extra steps
# run, each changing nothing.
CHECK_EVERY = 4


def _alloc(decoder, device):
    buf = getattr(decoder, "buffer", None)
    if buf is not None:
        return buf
    return lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=device)


def log_probs(logits: torch.Tensor, t: torch.Tensor, limits: torch.Tensor, eos: int,
              banned: tuple[int, ...] = ()) -> torch.Tensor:
    """log-softmax in fp32 [N, V]; tokens in `banned` (pad and bos: never generated) get -inf, and so does </s>
    before position min_len - 1 (outputs of at least min_len tokens, </s> included); at position max_len - 1
    only </s> may follow, so every row ends. t: int64 [1] (the position); limits: int64 [2] = (min_len,
    max_len), both on the device (no host sync: one captured graph serves every position and request)."""
    lp = F.log_softmax(logits.float(), dim=-1)
    for i in banned:
        lp[:, i] = NEG_INF
    last = t == limits[1] - 1                                                   # [1] bool
    eos_lp = torch.where(last, 0.0, torch.where(t < limits[0] - 1, NEG_INF, lp[:, eos]))
    lp.masked_fill_(last, NEG_INF)      # in place: no second [N, V] tensor per step
    lp[:, eos] = eos_lp
    return lp


def _keep(is_eos: torch.Tensor, K: int) -> torch.Tensor:
    """The continuations a step keeps, as indices into the ranked extensions [B, 2K]: the first K (in rank
    order) that do not end in </s>, then, if fewer than K do not end, the first ending ones (dead beams of score
    -inf). The same as the K best of the scores with the ending ones set to -inf, with ties at the K-th place
    going to the better rank (a top-k would leave that choice to the library)."""
    return is_eos.to(torch.uint8).sort(dim=1, stable=True).indices[:, :K].sort(dim=1).values


def _rough_topk(logits: torch.Tensor) -> bool:
    """Whether plain beam search ranks its extensions with lsquant.inference.rough_topk (CUDA with Triton; the
    environment variable LSQUANT_ROUGH_TOPK=0 turns it off). CPU tensors always take log_probs + topk."""
    import os

    from .attention import use_kernel

    return os.environ.get("LSQUANT_ROUGH_TOPK", "1") != "0" and logits.is_cuda and use_kernel(logits)


def _fused(switch: str, logits: torch.Tensor) -> bool:
    """Whether a search update runs as one kernel: CUDA (or Triton's interpreter in tests) and the environment
    variable ``switch`` not "0" (LSQUANT_FUSED_BEAM: beam search's bookkeeping, lsquant.inference.beam_update;
    LSQUANT_FUSED_PATH: greedy decoding and top-k sampling, lsquant.inference.path_update)."""
    import os

    from .attention import use_kernel

    return os.environ.get(switch, "1") != "0" and use_kernel(logits)


_fused_failed: set = set()   # search kernels that failed to run in this process


def _run_fused(name: str, fn, *args) -> bool:
    """fn(*args), a search kernel (the fused updates, the rough top-k's ranking); False (one warning, then never
    again in this process) if it cannot run here (a Triton or driver that rejects it), so that the caller takes
    its PyTorch ops. A kernel fails at its compile or launch, before it changes any state."""
    if name in _fused_failed:
        return False
    try:
        fn(*args)
        return True
    except Exception as e:   # noqa: BLE001 - the PyTorch ops compute the same update
        import warnings

        warnings.warn(f"lsquant {name} kernel failed ({type(e).__name__}: {e}); using PyTorch ops from now on",
                      RuntimeWarning, stacklevel=3)
        _fused_failed.add(name)
        return False


class _Search:
    """The state of one decoding request in device tensors of static shape (see the module docstring)."""

    reorders = False

    def __init__(self, decoder, batch: int, beams: int, bos: int, eos: int, pad: int, max_len: int, min_len: int,
                 device):
        self.L = int(getattr(decoder, "max_steps", None) or max_len)
        if self.L < max_len:
            raise ValueError(f"max_len {max_len} is over the decoder's {self.L} steps")
        self.batch, self.beams, self.N = batch, beams, batch * beams
        self.bos, self.eos, self.pad, self.max_len = bos, eos, pad, max_len
        self.banned = tuple(sorted({pad, bos}))
        a = self.alloc = _alloc(decoder, device)
        self.t = a("t", (1,), torch.long).zero_()
        self.limits = a("limits", (2,), torch.long)
        self.limits[0].fill_(min_len)
        self.limits[1].fill_(max_len)
        self.tokens = a("tokens", (self.N,), torch.long).fill_(bos)
        self.rows = None
        self.hist = getattr(decoder, "history", None)
        if self.hist is not None:
            if self.hist.dtype != torch.int32 or tuple(self.hist.shape) != (self.N, self.L):
                raise ValueError(f"decoder.history must be int32 {(self.N, self.L)}, got {self.hist.dtype} "
                                 f"{tuple(self.hist.shape)}")
            self.hist_rows = a("hist_rows", (self.N,), torch.int32)
            torch.arange(self.N, out=self.hist_rows)

    def rows_for(self, t: int):
        return self.rows if self.reorders and t > 0 else None


class _PathSearch(_Search):
    """Greedy decoding and sampling: one hypothesis per sentence. The score is the sum of the chosen tokens'
    log-probabilities (after temperature), unnormalised."""

    def __init__(self, decoder, batch, bos, eos, pad, max_len, min_len, device, sample=None):
        super().__init__(decoder, batch, 1, bos, eos, pad, max_len, min_len, device)
        a, B, L = self.alloc, batch, self.L
        self.done = a("done", (B,), torch.bool).zero_()
        self.scores = a("scores", (B,), torch.float32).zero_()
        self.out = a("out", (B, L), torch.long).fill_(pad)
        self.steps = a("steps", (1,), torch.long).zero_()   # steps the reference loop would have run
        self.sync = a("path_sync", (2,), torch.int32).zero_()   # the fused update's arrival counter and flag
        if self.hist is not None:   # no reorder ever: every position of row r is its own
            self.hist.copy_(self.hist_rows[:, None].expand(B, L))
        self.sample = sample
        if sample is None:
            self.temperature = 1.0
            self.key = ("greedy", B, L, bos, eos, pad)
        else:
            top_k, top_p, temperature, seed = sample
            self.temperature = temperature
            self.key = ("sample", B, L, bos, eos, pad, top_k, top_p, temperature)
            # all uniforms drawn up front from a CPU generator (the same numbers, in the same order, as one
            # draw of B per step: the CPU generator fills serially) and moved to the device once
            gen = torch.Generator().manual_seed(seed)
            self.u = a("uniforms", (L, B), torch.float64)
            self.u.copy_(torch.rand(L, B, generator=gen, dtype=torch.float64))

    def _choose(self, lp: torch.Tensor) -> torch.Tensor:
        if self.sample is None:
            return lp.argmax(dim=-1)   # ties: the lowest token id, as torch.argmax
        top_k, top_p = self.sample[:2]
        filt = lp.clone()
        if top_k:
            kth = filt.topk(min(top_k, filt.shape[-1]), dim=-1).values[:, -1:]
            filt.masked_fill_(filt < kth, NEG_INF)
        if top_p < 1.0:
            sorted_lp, order = filt.sort(dim=-1, descending=True)
            p = sorted_lp.softmax(dim=-1)
            sorted_lp.masked_fill_(p.cumsum(dim=-1) - p >= top_p, NEG_INF)   # the smallest prefix reaching top_p
            filt = torch.full_like(filt, NEG_INF).scatter(1, order, sorted_lp)
        probs = filt.softmax(dim=-1)
        u = self.u.index_select(0, self.t).reshape(-1, 1)
        # inverse CDF in fp64 (on CUDA the scan's summation order differs from a sequential sum by a few fp64
        # ulps: a token changes only if u falls within ~1e-16 of a boundary)
        return (probs.double().cumsum(dim=-1) < u).sum(dim=-1).clamp(max=probs.shape[-1] - 1)

    def update(self, logits: torch.Tensor) -> None:
        """logits [B, V] -> the state of the next step, in place (graph-safe: no host sync, static shapes)."""
        if _fused("LSQUANT_FUSED_PATH", logits):
            from . import path_update

            if path_update.supported(self) and _run_fused("path_update", path_update.path_update, self, logits):
                return   # the same step in one kernel
        t, pad, eos = self.t, self.pad, self.eos
        lp = log_probs(logits.float() / self.temperature, t, self.limits, eos, self.banned)
        tok = torch.where(self.done, pad, self._choose(lp))
        self.scores.add_(torch.where(self.done, 0.0, lp.gather(1, tok.clamp(min=0)[:, None])[:, 0]))
        self.steps.add_((~self.done).any().long())
        self.out.index_copy_(1, t, tok[:, None])
        self.done.logical_or_(tok == eos)
        self.tokens.copy_(torch.where(tok == pad, eos, tok))
        t.add_(1)

    def finished(self) -> bool:
        return bool(self.done.all())

    def results(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = int(self.steps)
        return self.out[:, None, :T].clone(), self.scores[:, None].clone()


class _BeamSearch(_Search):
    """Beam search state: live beams (scores [B, K], token rows [N, L]) and the K best finished hypotheses of
    each sentence (normalised scores in fp64 [B, K], -inf = empty; token rows [B, K, L]; how many finished).

    Diverse beam search (groups G > 1, Vijayakumar et al. 2018, the rule of fairseq's and Hugging Face's group
    beam search): the K beams form G groups of K / G that search side by side; at each step group g's
    log-probabilities are lowered by strength x (how many beams of groups 0..g-1 continue with that token at
    this step), so the groups take different words; the penalty stays in the hypotheses' scores. The groups
    share each sentence's K finished slots. G = 1 is plain beam search."""

    reorders = True

    def __init__(self, decoder, batch, beams, bos, eos, pad, max_len, min_len, device, length_penalty,
                 groups: int = 1, strength: float = 0.0):
        B, K = batch, beams
        super().__init__(decoder, B, K, bos, eos, pad, max_len, min_len, device)
        a, L = self.alloc, self.L
        self.G, self.strength = groups, float(strength) if groups > 1 else 0.0
        self.B, self.K, self.key = B, K, ("beam", B, K, L, bos, eos, pad, self.G, self.strength)
        self.rows = a("rows", (B * K,), torch.long)
        torch.arange(B * K, out=self.rows)
        self.base = a("base", (B, 1), torch.long)
        torch.arange(0, B * K, K, out=self.base[:, 0])
        self.scores = a("scores", (B, K), torch.float32).zero_()
        # all beams of a group start identical: expand only the group's first
        self.scores.view(B, self.G, K // self.G)[:, :, 1:] = NEG_INF
        self.seqs = a("seqs", (B * K, L), torch.long).fill_(pad)
        self.fin_scores = a("fin_scores", (B, K), torch.float64).fill_(NEG_INF)
        self.fin_tokens = a("fin_tokens", (B, K, L), torch.long).fill_(pad)
        self.fin_tokens[:, :, 0] = eos   # an empty slot reads (-inf, [</s>])
        self.count = a("count", (B,), torch.long).zero_()
        self.sync = a("beam_sync", (1,), torch.int32).zero_()   # the bookkeeping kernel's arrival counter
        # length ** alpha per position, computed by Python's float pow once (what the fp64 division expects)
        self.norm = a("norm", (L,), torch.float64)
        self.norm.copy_(torch.tensor([(t + 1) ** length_penalty for t in range(L)], dtype=torch.float64))
        if self.hist is not None:
            self.hist[:, 0] = self.hist_rows

    def update(self, logits: torch.Tensor) -> None:
        """logits [N, V] -> the state of the next step, in place (graph-safe: no host sync, static shapes).

        In each group of Kg = K / G beams the 2Kg best (beam, token) extensions of each sentence are ranked;
        those among the first Kg ranks that end in </s> finish (if the sentence has fewer than K finished
        hypotheses at the start of the step), and the Kg best that do not end continue. Finished hypotheses are
        merged by a stable sort on the fp64 normalised score: ties keep the order of finishing (earlier step
        first, then lower group, then better rank), which is the order of a stable sort of all finished
        hypotheses by score, kept to the K best."""
        B, K, G, N, t, eos, L = self.B, self.K, self.G, self.N, self.t, self.eos, self.L
        Kg = K // G
        V = logits.shape[-1]
        if G == 1 and _rough_topk(logits):
            # the same ranking without the fp32 [N, V] log-softmax in memory (see lsquant.inference.rough_topk)
            from .rough_topk import beam_topk

            lp, ranked = None, beam_topk(logits, self.scores, t, self.limits, eos, self.banned, K)
        else:
            lp = log_probs(logits, t, self.limits, eos, self.banned).view(B, K, V)   # fp32 [B, K, V]
        chosen = torch.zeros(B, V, dtype=torch.float32, device=logits.device) if G > 1 else None
        fin_s, fin_tok, keep_s, keep_rows, keep_tok, n_new = [self.fin_scores], [self.fin_tokens], [], [], [], 0
        is_open = norm_t = None   # made on first use below: the fused path needs neither (two kernels a step)
        for g in range(G):
            if lp is None:
                top_s, top_i = ranked
            else:
                lpg = lp[:, g * Kg:(g + 1) * Kg]
                if g and self.strength:
                    lpg = lpg - self.strength * chosen[:, None, :]
                cand = (self.scores[:, g * Kg:(g + 1) * Kg, None] + lpg).reshape(B, Kg * V)
                top_s, top_i = cand.topk(min(2 * Kg, Kg * V), dim=1)        # [B, 2Kg], best first
            if G == 1 and 2 * K <= K * V and _fused("LSQUANT_FUSED_BEAM", logits):
                # the rest of the step in one kernel (lsquant.inference.beam_update), same rules
                from .beam_update import beam_update

                if _run_fused("beam_update", beam_update, self, top_s, top_i, V):   # t += 1 included
                    return
            if is_open is None:   # the state at the start of the step, shared by the groups
                is_open = (self.count < K)[:, None]
                norm_t = self.norm.index_select(0, t)
            beam_i, tok = top_i // V + g * Kg, top_i % V
            is_eos = tok == eos
            # finish: </s> among the first Kg ranks, finite, in a sentence still open
            J = min(Kg, top_s.shape[1])
            s_j = top_s[:, :J]
            new_ok = is_eos[:, :J] & (s_j > NEG_INF) & is_open
            fin_s.append(torch.where(new_ok, s_j.double() / norm_t, NEG_INF))
            fin_tok.append(self.seqs.index_select(0, (self.base + beam_i[:, :J]).reshape(-1))
                           .index_fill_(1, t, eos).reshape(B, J, L))
            n_new = n_new + new_ok.sum(dim=1)
            # the Kg best continuations that do not end here (stable: ties keep the topk order)
            masked = top_s.masked_fill(is_eos, NEG_INF)
            keep = _keep(is_eos, Kg)                                        # [B, Kg], in rank order
            keep_s.append(masked.gather(1, keep))
            keep_rows.append(self.base + beam_i.gather(1, keep))
            keep_tok.append(tok.gather(1, keep))
            if chosen is not None:   # what this group continues with, for the groups after it
                chosen.scatter_add_(1, keep_tok[-1], (keep_s[-1] > NEG_INF).to(chosen.dtype))
        all_s, all_tok = torch.cat(fin_s, dim=1), torch.cat(fin_tok, dim=1)     # [B, K + G * J]: old slots first
        best = all_s.sort(dim=1, descending=True, stable=True).indices[:, :K]
        self.fin_scores.copy_(all_s.gather(1, best))
        self.fin_tokens.copy_(all_tok.gather(1, best[:, :, None].expand(B, K, L)))
        self.count.add_(n_new)
        self.scores.copy_(torch.cat(keep_s, dim=1))
        rows = torch.cat(keep_rows, dim=1).reshape(N)
        nxt = torch.cat(keep_tok, dim=1).reshape(N)
        self.seqs.copy_(self.seqs.index_select(0, rows))
        self.seqs.index_copy_(1, t, nxt[:, None])
        if self.hist is not None:   # (the fused kernel does the same; at the last step t + 1 = L: no column)
            self.hist.copy_(self.hist.index_select(0, rows))
            self.hist.index_copy_(1, (t + 1).clamp(max=L - 1), torch.where(t + 1 < L, self.hist_rows,
                                  self.hist[:, L - 1])[:, None])
        self.rows.copy_(rows)
        self.tokens.copy_(nxt)
        t.add_(1)

    def finished(self) -> bool:
        return bool((self.count >= self.K).all())

    def results(self) -> tuple[torch.Tensor, torch.Tensor]:
        # finished hypotheses hold no pad before their </s> (pad is never generated), so length = non-pad count
        T = max(1, int((self.fin_tokens != self.pad).sum(dim=-1).max()))
        return self.fin_tokens[:, :, :T].clone(), self.fin_scores.float()


def _run(decoder, search: _Search) -> tuple[torch.Tensor, torch.Tensor]:
    advance = getattr(decoder, "advance", None)
    for t in range(search.max_len):
        if advance is not None:
            advance(search, t)
        else:
            search.update(decoder.step(search.tokens, t, search.rows_for(t)))
        if (t + 1) % CHECK_EVERY == 0 and t + 1 < search.max_len and search.finished():
            break
    return search.results()


@torch.no_grad()
def greedy(decoder, batch: int, bos: int, eos: int, pad: int, max_len: int, device,
           min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax at every step (ties: the lowest token id, as torch.argmax). -> tokens [B, 1, T], scores [B, 1]
    (the unnormalised sum of log-probabilities)."""
    return _run(decoder, _PathSearch(decoder, batch, bos, eos, pad, max_len, min_len, device))


@torch.no_grad()
def sample(decoder, batch: int, bos: int, eos: int, pad: int, max_len: int, device, top_k: int = 0,
           top_p: float = 1.0, temperature: float = 1.0, seed: int = 0, min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling with optional top-k and nucleus (top-p) filtering, reproducible for a seed (a CPU generator
    draws the uniforms, so CPU and GPU runs draw the same numbers). -> tokens [B, 1, T], scores [B, 1]."""
    if top_k < 0 or not 0.0 < top_p <= 1.0 or not temperature > 0:
        raise ValueError(f"need top_k >= 0, 0 < top_p <= 1, temperature > 0; got {top_k}, {top_p}, {temperature}")
    search = _PathSearch(decoder, batch, bos, eos, pad, max_len, min_len, device,
                         sample=(int(top_k), float(top_p), float(temperature), seed))
    return _run(decoder, search)


@torch.no_grad()
def beam_search(decoder, batch: int, beams: int, bos: int, eos: int, pad: int, max_len: int, device,
                length_penalty: float = 1.0, min_len: int = 0, diverse_groups: int = 1,
                diverse_strength: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search. At each step the 2 * beams best (beam, token) extensions of each sentence are ranked;
    those among the first `beams` that end in </s> are finished (score / length ** length_penalty), and the
    `beams` best that do not end continue. A sentence is done once it has `beams` finished hypotheses (the
    early stop of fairseq). Equal finished scores keep the order in which they finished. -> tokens
    [B, beams, T], scores [B, beams] (-inf with tokens [</s>] where the vocabulary is too small to fill the
    beams). diverse_groups > 1: diverse beam search (see _BeamSearch) in that many groups of beams (a divisor
    of beams), each token's log-probability in a group lowered by diverse_strength per beam of an earlier group
    that continues with it at that step."""
    if not isinstance(diverse_groups, int) or diverse_groups < 1 or beams % diverse_groups:
        raise ValueError(f"diverse_groups must be a positive divisor of the beam size {beams}, got {diverse_groups!r}")
    if not diverse_strength >= 0:
        raise ValueError(f"diverse_strength must be >= 0, got {diverse_strength!r}")
    return _run(decoder, _BeamSearch(decoder, batch, beams, bos, eos, pad, max_len, min_len, device,
                                     length_penalty, diverse_groups, diverse_strength))


def repeat_rows(x: torch.Tensor, beams: int) -> torch.Tensor:
    """x (B, ...) -> (B * beams, ...), row b * beams + k = x[b]: the rows of beam search."""
    if beams == 1:
        return x
    return x.index_select(0, torch.arange(x.shape[0], device=x.device).repeat_interleave(beams))


def generate(make_decoder, encoder_out: torch.Tensor, src_mask: torch.Tensor, *, method: str, beam_size: int,
             length_penalty: float, bos: int, eos: int, pad: int, max_len: int, min_len: int = 0, top_k: int = 0,
             top_p: float = 1.0, temperature: float = 1.0, seed: int = 0, diverse_groups: int = 1,
             diverse_strength: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on method ("beam", "greedy", "sample") for a model or an engine: make_decoder(encoder_out,
    src_mask, beams) builds its decoder over batch * beams rows (row b * beams + k reads sentence b: see
    repeat_rows). encoder_out: (B, S, H); src_mask: (B, S) bool, True = padding."""
    B, device = encoder_out.shape[0], encoder_out.device
    common = dict(bos=bos, eos=eos, pad=pad, max_len=max_len, device=device, min_len=min_len)
    if method == "greedy":
        return greedy(make_decoder(encoder_out, src_mask, 1), B, **common)
    if method == "sample":
        return sample(make_decoder(encoder_out, src_mask, 1), B, top_k=top_k, top_p=top_p, temperature=temperature,
                      seed=seed, **common)
    if method != "beam":
        raise ValueError(f"method must be 'beam', 'greedy' or 'sample', got {method!r}")
    return beam_search(make_decoder(encoder_out, src_mask, beam_size), B, beam_size, length_penalty=length_penalty,
                       diverse_groups=diverse_groups, diverse_strength=diverse_strength, **common)
