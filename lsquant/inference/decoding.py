"""Decoding algorithms shared by the PyTorch models and the engines: one copy, so the model's own decoding
and an engine built from its export pick tokens by exactly the same rules.

A decoder is any object with
    step(tokens: LongTensor [N], t: int) -> logits FloatTensor [N, vocab]   (tokens: the previous token of each
        row, t: its position, 0 for the <s> that starts every row)
    reorder(rows: LongTensor [N]) -> None   (row i of every cached state becomes old row rows[i])
where N = batch * beams (beams = 1 for greedy and sampling), row b * beams + k holds beam k of sentence b.

pad and bos are never generated. All return (tokens [batch, beams, T] int64, padded with pad after </s>, without the leading <s>;
scores [batch, beams] fp32, best first). Scores are sums of log-probabilities divided by length ** alpha
(length: generated tokens including </s>), the rule of fairseq's length penalty.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _pad_results(seqs: list[list[list[int]]], pad: int, device) -> torch.Tensor:
    B, K = len(seqs), len(seqs[0])
    T = max(1, max(len(s) for beams in seqs for s in beams))
    out = torch.full((B, K, T), pad, dtype=torch.long)
    for b, beams in enumerate(seqs):
        for k, s in enumerate(beams):
            out[b, k, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def _log_probs(logits: torch.Tensor, t: int, max_len: int, eos: int, banned: tuple[int, ...] = (),
               min_len: int = 0) -> torch.Tensor:
    """log-softmax in fp32; tokens in `banned` (pad and bos: never generated) get -inf, and so does </s> before
    position min_len - 1 (outputs of at least min_len tokens, </s> included)."""
    lp = F.log_softmax(logits.float(), dim=-1)
    if banned:
        lp[:, list(banned)] = float("-inf")
    if t < min_len - 1:
        lp[:, eos] = float("-inf")
    if t == max_len - 1:  # the last position: only </s> may follow, so every row ends
        forced = torch.full_like(lp, float("-inf"))
        forced[:, eos] = 0.0
        lp = forced
    return lp


def _one_path(decoder, batch: int, bos: int, eos: int, pad: int, max_len: int, device, min_len: int,
              choose, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One hypothesis per sentence; choose(log_probs [B, V]) -> next tokens [B]. The score is the sum of the
    chosen tokens' log-probabilities (after temperature), unnormalised."""
    last = torch.full((batch,), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, dtype=torch.float32, device=device)
    out = []
    for t in range(max_len):
        lp = _log_probs(decoder.step(last, t).float() / temperature, t, max_len, eos, (pad, bos), min_len)
        tok = torch.where(done, torch.full((batch,), pad, dtype=torch.long, device=device), choose(lp))
        scores = scores + torch.where(done, torch.zeros_like(scores), lp.gather(1, tok.clamp(min=0)[:, None])[:, 0])
        out.append(tok)
        done = done | (tok == eos)
        last = torch.where(tok == pad, torch.full_like(tok, eos), tok)
        if bool(done.all()):
            break
    return torch.stack(out, dim=1)[:, None, :], scores[:, None]


@torch.no_grad()
def greedy(decoder, batch: int, bos: int, eos: int, pad: int, max_len: int, device,
           min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax at every step (ties: the lowest token id, as torch.argmax). -> tokens [B, 1, T], scores [B, 1]
    (the unnormalised sum of log-probabilities)."""
    return _one_path(decoder, batch, bos, eos, pad, max_len, device, min_len, lambda lp: lp.argmax(dim=-1))


@torch.no_grad()
def sample(decoder, batch: int, bos: int, eos: int, pad: int, max_len: int, device, top_k: int = 0,
           top_p: float = 1.0, temperature: float = 1.0, seed: int = 0, min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling with optional top-k and nucleus (top-p) filtering, reproducible for a seed (a CPU generator
    draws the uniforms, so CPU and GPU runs draw the same numbers). -> tokens [B, 1, T], scores [B, 1]."""
    if top_k < 0 or not 0.0 < top_p <= 1.0 or not temperature > 0:
        raise ValueError(f"need top_k >= 0, 0 < top_p <= 1, temperature > 0; got {top_k}, {top_p}, {temperature}")
    gen = torch.Generator().manual_seed(seed)

    def choose(lp: torch.Tensor) -> torch.Tensor:
        filt = lp.clone()
        if top_k:
            kth = filt.topk(min(top_k, filt.shape[-1]), dim=-1).values[:, -1:]
            filt[filt < kth] = float("-inf")
        if top_p < 1.0:
            sorted_lp, order = filt.sort(dim=-1, descending=True)
            p = sorted_lp.softmax(dim=-1)
            sorted_lp[p.cumsum(dim=-1) - p >= top_p] = float("-inf")   # keep the smallest prefix reaching top_p
            filt = torch.full_like(filt, float("-inf")).scatter(1, order, sorted_lp)
        probs = filt.softmax(dim=-1).cpu()
        u = torch.rand(batch, 1, generator=gen, dtype=torch.float64)
        return (probs.double().cumsum(dim=-1) < u).sum(dim=-1).clamp(max=probs.shape[-1] - 1).to(lp.device)

    return _one_path(decoder, batch, bos, eos, pad, max_len, device, min_len, choose, temperature)


@torch.no_grad()
def beam_search(decoder, batch: int, beams: int, bos: int, eos: int, pad: int, max_len: int, device,
                length_penalty: float = 1.0, min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search. At each step the 2 * beams best (beam, token) extensions of each sentence are ranked;
    those among the first `beams` that end in </s> are finished (score / length ** length_penalty), and the
    `beams` best that do not end continue. A sentence is done once it has `beams` finished hypotheses (the
    early stop of fairseq). -> tokens [B, beams, T], scores [B, beams]."""
    K, N = beams, batch * beams
    seqs = torch.full((N, max_len), pad, dtype=torch.long, device=device)
    last = torch.full((N,), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, K, dtype=torch.float32, device=device)
    scores[:, 1:] = float("-inf")   # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    base = (torch.arange(batch, device=device) * K)[:, None]
    for t in range(max_len):
        lp = _log_probs(decoder.step(last, t), t, max_len, eos, (pad, bos), min_len)  # [N, V]
        V = lp.shape[-1]
        cand = (scores.reshape(N, 1) + lp).reshape(batch, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)                  # [B, 2K], best first
        beam_i, tok = top_i // V, top_i % V
        is_eos = tok == eos
        cpu_s, cpu_b, cpu_eos = top_s.cpu(), beam_i.cpu(), is_eos.cpu()
        for b in range(batch):
            if len(finished[b]) >= K:
                continue
            for j in range(min(K, top_s.shape[1])):
                if cpu_eos[b, j] and cpu_s[b, j] > float("-inf"):
                    row = b * K + int(cpu_b[b, j])
                    hyp = seqs[row, :t].tolist() + [eos]
                    finished[b].append((float(cpu_s[b, j]) / (t + 1) ** length_penalty, hyp))
        if all(len(f) >= K for f in finished):
            break
        # the K best continuations that do not end here (stable: ties keep the topk order)
        masked = top_s.masked_fill(is_eos, float("-inf"))
        keep = masked.topk(K, dim=1).indices.sort(dim=1).values            # [B, K], in rank order
        new_scores = masked.gather(1, keep)
        rows = (base + beam_i.gather(1, keep)).reshape(N)
        new_tok = tok.gather(1, keep).reshape(N)
        seqs = seqs.index_select(0, rows)
        seqs[:, t] = new_tok
        decoder.reorder(rows)
        scores = new_scores
        last = new_tok
    results, result_scores = [], []
    for b in range(batch):
        hyps = sorted(finished[b], key=lambda h: -h[0])[:K]
        while len(hyps) < K:   # only when the vocabulary is too small to fill K beams
            hyps.append((float("-inf"), [eos]))
        results.append([h[1] for h in hyps])
        result_scores.append([h[0] for h in hyps])
    return _pad_results(results, pad, device), torch.tensor(result_scores, dtype=torch.float32, device=device)


def generate(make_decoder, encoder_out: torch.Tensor, src_mask: torch.Tensor, *, method: str, beam_size: int,
             length_penalty: float, bos: int, eos: int, pad: int, max_len: int, min_len: int = 0, top_k: int = 0,
             top_p: float = 1.0, temperature: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on method ("beam", "greedy", "sample") for a model or an engine: make_decoder(encoder_out,
    src_mask) builds its step/reorder object; for beam search each sentence's rows are repeated beam_size
    times first. encoder_out: (B, S, H); src_mask: (B, S) bool, True = padding."""
    B, device = encoder_out.shape[0], encoder_out.device
    common = dict(bos=bos, eos=eos, pad=pad, max_len=max_len, device=device, min_len=min_len)
    if method == "greedy":
        return greedy(make_decoder(encoder_out, src_mask), B, **common)
    if method == "sample":
        return sample(make_decoder(encoder_out, src_mask), B, top_k=top_k, top_p=top_p, temperature=temperature,
                      seed=seed, **common)
    if method != "beam":
        raise ValueError(f"method must be 'beam', 'greedy' or 'sample', got {method!r}")
    rows = torch.arange(B, device=device).repeat_interleave(beam_size)
    dec = make_decoder(encoder_out.index_select(0, rows), src_mask.index_select(0, rows))
    return beam_search(dec, B, beam_size, length_penalty=length_penalty, **common)
