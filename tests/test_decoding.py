"""lsquant.inference.decoding on random decoders: the device-side search returns exactly (same tokens, same
scores, bit for bit) what the former host-side implementation returned. That implementation is kept below,
in the tests only, as the reference."""
import itertools

import pytest
import torch
from torch.nn import functional as F

from lsquant.inference import decoding

PAD, BOS, EOS = 0, 1, 2


# -- the reference: the former implementation (a Python loop over sentences, a host sync per step) --------------

def _ref_pad_results(seqs, pad, device):
    B, K = len(seqs), len(seqs[0])
    T = max(1, max(len(s) for beams in seqs for s in beams))
    out = torch.full((B, K, T), pad, dtype=torch.long)
    for b, beams in enumerate(seqs):
        for k, s in enumerate(beams):
            out[b, k, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def _ref_log_probs(logits, t, max_len, eos, banned=(), min_len=0):
    lp = F.log_softmax(logits.float(), dim=-1)
    if banned:
        lp[:, list(banned)] = float("-inf")
    if t < min_len - 1:
        lp[:, eos] = float("-inf")
    if t == max_len - 1:
        forced = torch.full_like(lp, float("-inf"))
        forced[:, eos] = 0.0
        lp = forced
    return lp


def _ref_one_path(decoder, batch, bos, eos, pad, max_len, device, min_len, choose, temperature=1.0):
    last = torch.full((batch,), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, dtype=torch.float32, device=device)
    out = []
    for t in range(max_len):
        lp = _ref_log_probs(decoder.step(last, t).float() / temperature, t, max_len, eos, (pad, bos), min_len)
        tok = torch.where(done, torch.full((batch,), pad, dtype=torch.long, device=device), choose(lp))
        scores = scores + torch.where(done, torch.zeros_like(scores), lp.gather(1, tok.clamp(min=0)[:, None])[:, 0])
        out.append(tok)
        done = done | (tok == eos)
        last = torch.where(tok == pad, torch.full_like(tok, eos), tok)
        if bool(done.all()):
            break
    return torch.stack(out, dim=1)[:, None, :], scores[:, None]


def _ref_greedy(decoder, batch, bos, eos, pad, max_len, device, min_len=0):
    return _ref_one_path(decoder, batch, bos, eos, pad, max_len, device, min_len, lambda lp: lp.argmax(dim=-1))


def _ref_sample(decoder, batch, bos, eos, pad, max_len, device, top_k=0, top_p=1.0, temperature=1.0, seed=0,
                min_len=0):
    gen = torch.Generator().manual_seed(seed)

    def choose(lp):
        filt = lp.clone()
        if top_k:
            kth = filt.topk(min(top_k, filt.shape[-1]), dim=-1).values[:, -1:]
            filt[filt < kth] = float("-inf")
        if top_p < 1.0:
            sorted_lp, order = filt.sort(dim=-1, descending=True)
            p = sorted_lp.softmax(dim=-1)
            sorted_lp[p.cumsum(dim=-1) - p >= top_p] = float("-inf")
            filt = torch.full_like(filt, float("-inf")).scatter(1, order, sorted_lp)
        probs = filt.softmax(dim=-1).cpu()
        u = torch.rand(batch, 1, generator=gen, dtype=torch.float64)
        return (probs.double().cumsum(dim=-1) < u).sum(dim=-1).clamp(max=probs.shape[-1] - 1).to(lp.device)

    return _ref_one_path(decoder, batch, bos, eos, pad, max_len, device, min_len, choose, temperature)


def _ref_beam_search(decoder, batch, beams, bos, eos, pad, max_len, device, length_penalty=1.0, min_len=0):
    K, N = beams, batch * beams
    seqs = torch.full((N, max_len), pad, dtype=torch.long, device=device)
    last = torch.full((N,), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, K, dtype=torch.float32, device=device)
    scores[:, 1:] = float("-inf")
    finished = [[] for _ in range(batch)]
    base = (torch.arange(batch, device=device) * K)[:, None]
    for t in range(max_len):
        lp = _ref_log_probs(decoder.step(last, t), t, max_len, eos, (pad, bos), min_len)
        V = lp.shape[-1]
        cand = (scores.reshape(N, 1) + lp).reshape(batch, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
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
        masked = top_s.masked_fill(is_eos, float("-inf"))
        # the first K in rank order that do not end (then ending ones: dead beams); the former code took
        # masked.topk(K), the same set up to ties at the K-th place, which it left to the library
        keep = is_eos.to(torch.uint8).sort(dim=1, stable=True).indices[:, :K].sort(dim=1).values
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
        while len(hyps) < K:
            hyps.append((float("-inf"), [eos]))
        results.append([h[1] for h in hyps])
        result_scores.append([h[0] for h in hyps])
    return _ref_pad_results(results, pad, device), torch.tensor(result_scores, dtype=torch.float32, device=device)


# -- random decoders ------------------------------------------------------------------------------------------

class RandomDecoder:
    """Logits from a random table indexed by a hash of each row's whole history, so the beam reorder matters.
    Logits are multiples of 0.5 (many exact ties among tokens, beams and finished hypotheses); eos_bias makes
    </s> likely (many hypotheses finish). Speaks both interfaces: step(tokens, t) + reorder(rows) (the reference)
    and step(tokens, t, rows) (the current one)."""

    def __init__(self, rows, vocab, seed, eos_bias=1.0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.table = (torch.randint(-6, 7, (61, vocab), generator=g).float() / 2).to(device)
        self.table[:, EOS] += eos_bias
        self.h = torch.zeros(rows, dtype=torch.long, device=device)

    def step(self, tokens, t, rows=None):
        if rows is not None:
            self.reorder(rows)
        self.h = (self.h * 31 + tokens + 7) % 1_000_003
        return self.table[self.h % self.table.shape[0]]

    def reorder(self, rows):
        self.h = self.h[rows]


class PersistentRandomDecoder(RandomDecoder):
    """With an engine's storage: state buffers that persist across requests (garbage on first use), their time
    dimension max_steps > max_len."""

    max_steps = 24

    def __init__(self, *args, shared, **kw):
        super().__init__(*args, **kw)
        self.shared = shared

    def buffer(self, name, shape, dtype):
        key = (name, tuple(shape), dtype)
        if key not in self.shared:
            garbage = torch.ones(shape, dtype=dtype) if dtype == torch.bool else torch.full(shape, 99, dtype=dtype)
            self.shared[key] = garbage
        return self.shared[key]


def _decoders(rows, vocab, seed, eos_bias, persistent):
    ref = RandomDecoder(rows, vocab, seed, eos_bias)
    if persistent is None:
        return ref, RandomDecoder(rows, vocab, seed, eos_bias)
    return ref, PersistentRandomDecoder(rows, vocab, seed, eos_bias, shared=persistent)


def _check_equal(a, b):
    (ta, sa), (tb, sb) = a, b
    assert ta.shape == tb.shape, (ta.shape, tb.shape)
    assert torch.equal(ta, tb), (ta, tb)
    assert sa.dtype == sb.dtype and torch.equal(sa, sb), (sa, sb)


BEAM_CASES = list(itertools.product(
    [1, 5],             # batch
    [1, 2, 3, 4, 5],    # beams
    [(7, 1.5), (12, 0.0), (4, 1.0)],   # (vocab, eos bias); vocab 4 has one word: too small to fill 5 beams
))


@pytest.mark.parametrize("batch,beams,vocab_bias", BEAM_CASES)
def test_beam_search_equals_the_reference(batch, beams, vocab_bias):
    vocab, bias = vocab_bias
    n = 0
    for max_len, min_len, alpha in [(1, 0, 1.0), (6, 0, 1.0), (6, 3, 0.0), (13, 0, 0.6), (13, 5, 1.0), (20, 0, 0.0)]:
        for seed in range(2):
            for persistent in (None, {}):
                ref, new = _decoders(batch * beams, vocab, seed * 7 + beams, bias, persistent)
                kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=max_len, device="cpu", length_penalty=alpha,
                          min_len=min_len)
                want = _ref_beam_search(ref, batch, beams, **kw)
                got = decoding.beam_search(new, batch, beams, **kw)
                _check_equal(got, want)
                if persistent is not None and seed == 0:   # the same buffers serve the next request
                    _check_equal(decoding.beam_search(_decoders(batch * beams, vocab, seed * 7 + beams, bias,
                                                                persistent)[1], batch, beams, **kw), want)
                n += int((want[1] > float("-inf")).sum())
    assert n > 0


@pytest.mark.parametrize("beams", [1, 4, 5])
def test_fused_beam_bookkeeping_equals_the_reference(triton_interpreter, beams):
    """The bookkeeping kernel (lsquant.inference.beam_update, run by Triton's CPU interpreter) on the reference
    cases: ties everywhere (logits in multiples of 0.5), early stops, empty slots, state buffers reused."""
    batch = 5
    for vocab, bias in [(7, 1.5), (12, 0.0), (4, 1.0)]:
        for max_len, min_len, alpha in [(6, 0, 1.0), (13, 5, 1.0)]:
            shared = {}
            for seed in (0, 1):
                ref, new = _decoders(batch * beams, vocab, seed * 7 + beams, bias, shared)
                kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=max_len, device="cpu", length_penalty=alpha,
                          min_len=min_len)
                _check_equal(decoding.beam_search(new, batch, beams, **kw), _ref_beam_search(ref, batch, beams, **kw))


class HistoryDecoder(PersistentRandomDecoder):
    """A decoder with an ancestry table for the search to keep (decoder.history, as the engines' caches use it),
    checked at every step against the table reordered the explicit way (what the engines did themselves before:
    anc = anc[rows]; anc[:, t] = arange), starting from garbage."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        N = self.h.shape[0]
        self.history = torch.full((N, self.max_steps), 77, dtype=torch.int32)
        self.ref = torch.full((N, self.max_steps), 55, dtype=torch.int32)
        self.checked = 0

    def step(self, tokens, t, rows=None):
        if rows is not None:
            self.ref = self.ref[rows]
        self.ref[:, t] = torch.arange(self.ref.shape[0], dtype=torch.int32)
        assert torch.equal(self.history[:, :t + 1], self.ref[:, :t + 1]), t
        self.checked += 1
        return super().step(tokens, t, rows)


@pytest.mark.parametrize("method,fused", [("beam", False), ("beam", True), ("greedy", False), ("sample", False)])
def test_the_search_keeps_the_decoders_ancestry_table(method, fused, request):
    """decoder.history: after each update, row r's positions name the rows its ancestors were cached in, and its
    next position itself; beam search in PyTorch ops and in the fused bookkeeping kernel (interpreted)."""
    if fused:
        request.getfixturevalue("triton_interpreter")
    for batch, beams, (vocab, bias) in ((1, 3, (7, 1.5)), (5, 4, (12, 0.0)), (3, 5, (4, 1.0))):
        beams = beams if method == "beam" else 1
        dec = HistoryDecoder(batch * beams, vocab, beams, bias, shared={})
        kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=13, device="cpu")
        if method == "beam":
            decoding.beam_search(dec, batch, beams, length_penalty=1.0, **kw)
        elif method == "greedy":
            decoding.greedy(dec, batch, **kw)
        else:
            decoding.sample(dec, batch, top_k=3, seed=1, **kw)
        assert dec.checked >= 2
    with pytest.raises(ValueError, match="history must be int32"):
        bad = HistoryDecoder(6, 7, 0, 0.0, shared={})
        bad.history = bad.history.long()
        decoding.greedy(bad, 6, **kw)


@pytest.mark.parametrize("batch", [1, 5])
def test_fused_greedy_and_top_k_sampling_equal_the_reference(triton_interpreter, batch):
    """The one-kernel update (lsquant.inference.path_update, run by Triton's CPU interpreter) against the PyTorch
    ops it replaces: the same tokens, and the scores to fp32 rounding (its sums run in another order); ties
    everywhere (logits in multiples of 0.5), min_len, early stops, the state buffers reused."""
    import os

    n = 0
    # vocabulary 5000: two blocks of the kernel's sweep, ties across them
    for max_len, min_len, (vocab, bias) in itertools.product([1, 9], [0, 4], [(7, 1.5), (4, 1.0), (5000, 0.0)]):
        for method, kw in (("greedy", {}), ("sample", dict(top_k=0, seed=1)), ("sample", dict(top_k=1, seed=2)),
                           ("sample", dict(top_k=3, seed=3, temperature=0.7)), ("sample", dict(top_k=64, seed=4))):
            if vocab > 1000 and kw.get("top_k") == 0:
                # the CDF over 5000 nonzero probabilities: its fp32 / fp64 sums in another order move each step by
                # ~1e-7, and u falls that close to one of 5000 steps about once in a few hundred draws
                continue
            kw = dict(kw, bos=BOS, eos=EOS, pad=PAD, max_len=max_len, device="cpu", min_len=min_len)
            shared = {}
            for seed in (0, 1):
                ref, new = _decoders(batch, vocab, seed + 3 * vocab, bias, shared)
                run = decoding.greedy if method == "greedy" else decoding.sample
                os.environ["LSQUANT_FUSED_PATH"] = "0"
                try:
                    want = run(ref, batch, **kw)
                finally:
                    os.environ.pop("LSQUANT_FUSED_PATH")
                got = run(new, batch, **kw)
                assert torch.equal(got[0], want[0]), (method, kw)
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
                n += 1
    assert n > 0


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_a_fused_update_that_cannot_run_falls_back_to_the_pytorch_ops(triton_interpreter, monkeypatch, method):
    """A fused search kernel that fails (a Triton or driver that rejects it) warns once and the search goes on with
    the PyTorch ops, with the same results."""
    from lsquant.inference import beam_update, path_update

    def broken(*a, **k):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(decoding, "_fused_failed", set())
    monkeypatch.setattr(path_update, "path_update", broken)
    monkeypatch.setattr(beam_update, "beam_update", broken)
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=9, device="cpu")
    ref, new = _decoders(6, 7, 3, 1.5, {})
    with pytest.warns(RuntimeWarning, match="kernel failed .*no kernel here"):
        got = (decoding.greedy(new, 6, **kw) if method == "greedy" else
               decoding.beam_search(new, 2, 3, length_penalty=1.0, **kw))
    want = _ref_greedy(ref, 6, **kw) if method == "greedy" else _ref_beam_search(ref, 2, 3, length_penalty=1.0, **kw)
    _check_equal(got, want)
    assert decoding._fused_failed == {"path_update" if method == "greedy" else "beam_update"}


def test_fused_update_with_a_masked_first_block(triton_interpreter):
    """A first block of only -inf logits leaves the log-softmax's sum at zero (no NaN): the PyTorch ops' tokens."""
    import os

    class _MaskedHead(SmoothDecoder):
        """Logits whose ids 0..4099 are -inf: a whole first block of the sweep."""

        def step(self, tokens, t, rows=None):
            x = super().step(tokens, t, rows).clone()
            x[:, :4100] = float("-inf")
            return x

    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=5, device="cpu")
    for method, extra in (("greedy", {}), ("sample", dict(top_k=3, seed=1))):
        run = decoding.greedy if method == "greedy" else decoding.sample
        os.environ["LSQUANT_FUSED_PATH"] = "0"
        try:
            want = run(_MaskedHead(2, 5000, 4), 2, **kw, **extra)
        finally:
            os.environ.pop("LSQUANT_FUSED_PATH")
        got = run(_MaskedHead(2, 5000, 4), 2, **kw, **extra)
        assert torch.equal(got[0], want[0]) and bool(torch.isfinite(got[1]).all()), method
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_fused_update_is_launched_without_fma_contraction(monkeypatch):
    """x * (1 / T) must be rounded before - max (PyTorch's two kernels round it): with FMA contraction the k-th
    token's own log-prob fell below the threshold computed from rounded values and top-k became top-(k - 1)
    (sm_90 PTX had fma.rn.f32 there). The launch asks for no contraction."""
    from lsquant.inference import path_update

    seen = {}

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.update(k)

    monkeypatch.setattr(path_update, "_build", lambda interpret: Kernel())
    search = decoding._PathSearch(RandomDecoder(3, 9, 0), 3, BOS, EOS, PAD, 6, 0, "cpu", sample=(4, 1.0, 0.7, 0))
    path_update.path_update(search, torch.randn(3, 9))
    assert seen["enable_fp_fusion"] is False and seen["TOP_K"] == 4 and seen["SAMPLE"] is True


def test_beam_search_reference_cases_cover_ties_early_stops_and_empty_slots():
    """The random cases above are not vacuous: some finished scores tie, some sentences stop before max_len,
    and a vocabulary of one word leaves beams empty."""
    ties = early = empty = 0
    for seed in range(3):
        for beams in (2, 3, 4, 5):
            for vocab, bias, alpha, max_len in ((7, 1.5, 0.0, 13), (12, 0.0, 0.0, 13), (4, 1.0, 1.0, 3)):
                ref = RandomDecoder(5 * beams, vocab, seed * 7 + beams, bias)
                tok, s = _ref_beam_search(ref, 5, beams, BOS, EOS, PAD, max_len, "cpu", length_penalty=alpha)
                fin = s[s > float("-inf")]
                ties += len(fin) - len(torch.unique(fin))
                early += tok.shape[-1] < max_len
                empty += int((s == float("-inf")).sum())
    assert ties > 0 and early > 0 and empty > 0, (ties, early, empty)


@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_equals_the_reference(batch):
    for max_len, min_len, (vocab, bias) in itertools.product([1, 5, 13], [0, 4], [(7, 1.5), (12, 0.0)]):
        for seed in range(3):
            for persistent in (None, {}):
                ref, new = _decoders(batch, vocab, seed, bias, persistent)
                kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=max_len, device="cpu", min_len=min_len)
                _check_equal(decoding.greedy(new, batch, **kw), _ref_greedy(ref, batch, **kw))


@pytest.mark.parametrize("batch", [1, 5])
def test_sampling_equals_the_reference(batch):
    for max_len, min_len, (top_k, top_p, temp) in itertools.product(
            [1, 6, 15], [0, 4], [(0, 1.0, 1.0), (3, 1.0, 1.0), (0, 0.7, 1.0), (4, 0.9, 0.7), (2, 1.0, 1.6)]):
        for seed in range(2):
            for persistent in (None, {}):
                ref, new = _decoders(batch, 9, seed, 0.5, persistent)
                kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=max_len, device="cpu", min_len=min_len, top_k=top_k,
                          top_p=top_p, temperature=temp, seed=seed + 11)
                _check_equal(decoding.sample(new, batch, **kw), _ref_sample(ref, batch, **kw))


def test_one_state_buffer_per_name_and_a_key_per_shape():
    shared = {}
    decoding.beam_search(PersistentRandomDecoder(6, 7, 0, shared=shared), 2, 3, BOS, EOS, PAD, 10, "cpu")
    n = len(shared)
    decoding.beam_search(PersistentRandomDecoder(6, 7, 1, shared=shared), 2, 3, BOS, EOS, PAD, 17, "cpu")
    assert len(shared) == n                          # a longer request reuses every buffer
    with pytest.raises(ValueError, match="over the decoder's 24 steps"):
        decoding.greedy(PersistentRandomDecoder(2, 7, 0, shared=shared), 2, BOS, EOS, PAD, 25, "cpu")


@pytest.mark.cuda
def test_device_search_on_cuda_equals_the_cpu_reference():
    """On the GPU the same rules pick the same tokens (beam search: the same tokens, scores up to the log-softmax's
    rounding); sampling draws the same uniforms (fp64 scan order aside)."""
    for batch, beams in ((1, 4), (5, 3)):
        ref = RandomDecoder(batch * beams, 12, beams, 0.5)
        dev = RandomDecoder(batch * beams, 12, beams, 0.5, device="cuda")
        # no exact ties here: CUDA's topk orders equal values differently from the CPU's (measured on an H100),
        # which the rules leave free; the CPU tests above cover the tie rules with exact multiples of 0.5
        ref.table += torch.rand(ref.table.shape, generator=torch.Generator().manual_seed(beams)) * 0.1
        dev.table = ref.table.to("cuda")
        kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=13, length_penalty=0.6)
        want = _ref_beam_search(ref, batch, beams, device="cpu", **kw)
        got = decoding.beam_search(dev, batch, beams, device="cuda", **kw)
        assert torch.equal(got[0].cpu(), want[0])
        with pytest.MonkeyPatch.context() as mp:   # and without the bookkeeping kernel
            mp.setenv("LSQUANT_FUSED_BEAM", "0")
            dev.h.zero_()
            got0 = decoding.beam_search(dev, batch, beams, device="cuda", **kw)
        assert torch.equal(got0[0], got[0]) and torch.equal(got0[1], got[1])
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-5, atol=1e-5)   # log-softmax: CUDA vs CPU
    ref, dev = RandomDecoder(5, 12, 3, 0.5), RandomDecoder(5, 12, 3, 0.5, device="cuda")
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=13, top_k=4, seed=5)
    assert torch.equal(decoding.sample(dev, 5, device="cuda", **kw)[0].cpu(),
                       _ref_sample(ref, 5, device="cpu", **kw)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_greedy_and_sampling_on_cuda_equal_the_pytorch_ops(dtype):
    """lsquant.inference.path_update on the GPU, a 32,000-word vocabulary in fp16 / bf16 / fp32 logits (eight
    blocks a sweep): greedy and top-k sampling give the PyTorch ops' tokens, scores to fp32 rounding (the engines'
    graph tests replay it from CUDA graphs). The temperature: fp32(1 / T) times x, as PyTorch's CUDA division."""
    class Vocab(SmoothDecoder):
        def step(self, tokens, t, rows=None):
            return super().step(tokens, t, rows).to(dtype)

    for method, kw in (("greedy", {}), ("sample", dict(top_k=4, seed=5)), ("sample", dict(top_k=40, seed=6,
                                                                                         temperature=0.8))):
        run = decoding.greedy if method == "greedy" else decoding.sample
        kw = dict(kw, bos=BOS, eos=EOS, pad=PAD, max_len=17, min_len=3, device="cuda")
        outs = {}
        for flag in ("0", "1"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("LSQUANT_FUSED_PATH", flag)
                outs[flag] = run(Vocab(6, 32000, 7, 1.0, device="cuda"), 6, **kw)
        assert torch.equal(outs["0"][0], outs["1"][0]), (method, dtype)
        torch.testing.assert_close(outs["0"][1], outs["1"][1], rtol=1e-5, atol=1e-5)


# ---- diverse beam search ------------------------------------------------------------------------------------------

class SmoothDecoder(RandomDecoder):
    """RandomDecoder with continuous logits: no exact ties, so a plain Python sort ranks as topk does."""

    def __init__(self, rows, vocab, seed, eos_bias=0.0, device="cpu"):
        super().__init__(rows, vocab, seed, eos_bias, device)
        g = torch.Generator().manual_seed(seed + 1000)
        self.table = (torch.randn(61, vocab, generator=g) * 2).to(device)
        self.table[:, EOS] += eos_bias


def _ref_diverse_beam_search(decoder, batch, beams, groups, strength, bos, eos, pad, max_len, length_penalty=1.0,
                             min_len=0):
    """Diverse beam search written sentence by sentence, group by group, in Python (the rules of
    decoding._BeamSearch, independently)."""
    K, Kg, N = beams, beams // groups, batch * beams
    seqs = [[] for _ in range(N)]
    scores = [[0.0 if k % Kg == 0 else float("-inf") for k in range(K)] for _ in range(batch)]
    last = torch.full((N,), bos, dtype=torch.long)
    finished = [[] for _ in range(batch)]
    for t in range(max_len):
        lp = _ref_log_probs(decoder.step(last, t), t, max_len, eos, (pad, bos), min_len)
        V = lp.shape[-1]
        rows, toks, new_scores = [], [], []
        open_at_start = [len(f) < K for f in finished]
        for b in range(batch):
            chosen = torch.zeros(V, dtype=torch.float32)
            for g in range(groups):
                cands = []
                for k in range(g * Kg, (g + 1) * Kg):
                    # fp32, in the order the search computes it: score + (log-prob - strength * count)
                    row_lp = lp[b * K + k] - strength * chosen if g else lp[b * K + k]
                    vec = torch.tensor(scores[b][k], dtype=torch.float32) + row_lp
                    cands += [(s, k, v) for v, s in enumerate(vec.tolist())]
                cands.sort(key=lambda c: -c[0])
                cands = cands[:2 * Kg]
                for s, k, v in cands[:Kg]:
                    if v == eos and s > float("-inf") and open_at_start[b]:
                        finished[b].append((s / (t + 1) ** length_penalty, seqs[b * K + k] + [eos]))
                cont = [c for c in cands if c[2] != eos][:Kg]
                assert len(cont) == Kg   # the vocabularies here are large enough
                for s, k, v in cont:
                    rows.append(b * K + k)
                    toks.append(v)
                    new_scores.append(s)
                    chosen[v] += 1.0
        if all(len(f) >= K for f in finished):
            break
        seqs = [seqs[r] + [v] for r, v in zip(rows, toks)]
        decoder.reorder(torch.tensor(rows))
        last = torch.tensor(toks)
        scores = [new_scores[b * K:(b + 1) * K] for b in range(batch)]
    results, result_scores = [], []
    for b in range(batch):
        hyps = sorted(finished[b], key=lambda h: -h[0])[:K]
        results.append([h[1] for h in hyps])
        result_scores.append([h[0] for h in hyps])
    return _ref_pad_results(results, pad, "cpu"), torch.tensor(result_scores, dtype=torch.float32)


@pytest.mark.parametrize("batch,beams,groups", [(1, 4, 2), (3, 4, 4), (2, 6, 3), (2, 3, 1)])
@pytest.mark.parametrize("strength", [0.0, 0.37, 3.0])
def test_diverse_beam_search_equals_the_reference(batch, beams, groups, strength):
    for max_len, min_len, alpha, bias in [(6, 0, 1.0, 1.0), (12, 3, 0.6, 0.5), (9, 0, 0.0, 2.0)]:
        for persistent in (None, {}):
            ref = SmoothDecoder(batch * beams, 14, beams + groups, bias)
            new = SmoothDecoder(batch * beams, 14, beams + groups, bias)
            if persistent is not None:   # with an engine's persistent state buffers
                table, new = new.table, PersistentRandomDecoder(batch * beams, 14, 0, shared=persistent)
                new.table = table
            kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=max_len, length_penalty=alpha, min_len=min_len)
            want = _ref_diverse_beam_search(ref, batch, beams, groups, strength, **kw)
            got = decoding.beam_search(new, batch, beams, device="cpu", diverse_groups=groups,
                                       diverse_strength=strength, **kw)
            assert torch.equal(got[0], want[0]), (got[0], want[0])
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_diverse_groups_take_different_words():
    """One beam per group and a large strength: every group starts with a different first token, where plain
    beam search's beams can share one."""
    B, K, L = 3, 4, 5
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=L, min_len=L, device="cpu")
    toks, _ = decoding.beam_search(SmoothDecoder(B * K, 14, 3), B, K, diverse_groups=K, diverse_strength=100.0, **kw)
    for b in range(B):
        assert len(set(toks[b, :, 0].tolist())) == K, toks[b]
    plain, _ = decoding.beam_search(SmoothDecoder(B * K, 14, 3), B, K, **kw)
    assert any(len(set(plain[b, :, 0].tolist())) < K for b in range(B))   # the contrast that makes the test bite


def test_diverse_arguments_are_checked():
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=5, device="cpu")
    with pytest.raises(ValueError, match="divisor of the beam size 4"):
        decoding.beam_search(SmoothDecoder(8, 14, 0), 2, 4, diverse_groups=3, **kw)
    with pytest.raises(ValueError, match="diverse_strength"):
        decoding.beam_search(SmoothDecoder(8, 14, 0), 2, 4, diverse_groups=2, diverse_strength=-1.0, **kw)
