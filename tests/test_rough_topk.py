"""lsquant.inference.rough_topk: beam search's ranking of extensions by two Triton kernels (Triton's CPU
interpreter here, the GPU in the cuda tests) against beam_topk_ref (log_probs + topk).

The values are not bit for bit those of log_probs (the kernels sum the exponentials in another order), so each
check is tied to fp32: the kernels' error against an fp64 log-softmax is at most twice PyTorch's fp32 error
(plus one ulp of the largest value), and the selection is exact: every extension whose reference value is
above the 2K-th by more than that tolerance is selected, and every selected index points at an extension of
the value returned."""
import pytest
import torch
from torch.nn import functional as F

from lsquant.inference import decoding, rough_topk
from lsquant.inference.decoding import log_probs

from conftest import compile_in_fresh_process, interpreter_mode

EOS = 2
NEG = float("-inf")

# (what the case exercises, logits dtype, V, beam sizes): V = 1000 is one block of both kernels, 517 (odd) a
# partial one; not every product, to keep the interpreter under ~10 s
CASES = [("random", torch.float32, 1000, (1, 2, 4, 5)), ("random", torch.float16, 517, (1, 4)),
         ("random", torch.bfloat16, 1000, (2, 5)), ("banned_early", torch.float32, 517, (1, 5)),
         ("last", torch.float16, 1000, (2, 4)), ("last_and_early", torch.float32, 517, (1, 5)),
         ("ties", torch.float32, 517, (1, 4, 5)), ("ties", torch.bfloat16, 1000, (2,)),
         ("dead", torch.float32, 1000, (4, 5))]


def _case(kind, dtype, B, K, V, device, seed=0):
    """-> logits (B * K, V), scores (B, K), t [1], limits [2], banned."""
    g = torch.Generator().manual_seed(seed * 100 + K)
    logits = torch.randn(B * K, V, generator=g) * 3
    scores = torch.randn(B, K, generator=g) * 2 - 5
    t, min_len, max_len, banned = 3, 0, 20, (0, 1)
    if kind == "banned_early":            # </s> before min_len, and a banned id at the end of the row
        t, min_len, banned = 1, 5, (0, 1, V - 1)
        logits[:, V - 1] = 50.0           # would be everyone's best
        logits[:, EOS] = 40.0
    elif kind == "last":                  # the last position: only </s>, log-prob 0
        t, max_len = 9, 10
    elif kind == "last_and_early":        # both: the last position wins, as in log_probs
        t, min_len, max_len = 9, 30, 10
    elif kind == "ties":                  # 3 distinct values: ~V/3 tie for the best, over every row's slots
        logits = torch.randint(0, 3, (B * K, V), generator=g).float()
        scores = torch.randint(-3, 0, (B, K), generator=g).float()
    elif kind == "dead":                  # dead beams (the first step's K - 1 copies), one sentence all dead
        scores[:, 1:] = NEG
        scores[-1] = NEG
    if V % 2:                             # rows that are not contiguous with each other (a slice of wider rows)
        logits = torch.cat([logits, torch.randn(B * K, 7, generator=g) + 100], dim=1)[:, :V]
    return (logits.to(device, dtype), scores.to(device), torch.tensor([t], device=device),
            torch.tensor([min_len, max_len], device=device), banned)


def _check(logits, scores, t, limits, banned, K, got):
    N, V = logits.shape
    B = N // K
    top_s, top_i = got
    want_s, want_i = rough_topk.beam_topk_ref(logits, scores, t, limits, EOS, banned, K)
    assert top_s.shape == want_s.shape and top_s.dtype == torch.float32 and top_i.dtype == torch.int64
    # the references: fp32 (log_probs, what the PyTorch path ranks) and fp64 (the same masks)
    lp32 = log_probs(logits, t, limits, EOS, banned)
    last = bool(t == limits[1] - 1)
    lp64 = torch.where(torch.isinf(lp32) | last, lp32.double(), F.log_softmax(logits.double(), dim=-1))
    cand32 = (scores.reshape(B, K, 1) + lp32.view(B, K, V)).reshape(B, K * V)
    cand64 = (scores.double().reshape(B, K, 1) + lp64.view(B, K, V)).reshape(B, K * V)
    fin = torch.isfinite(want_s)
    assert torch.equal(torch.isfinite(top_s), fin)
    assert ((top_i >= 0) & (top_i < K * V)).all()

    def err(s, i):
        return (s.double() - cand64.gather(1, i)).abs()[fin].max().item() if fin.any() else 0.0

    ulp = torch.finfo(torch.float32).eps * (want_s[fin].abs().max().item() if fin.any() else 0.0)
    tol = 2 * err(want_s, want_i) + ulp
    assert err(top_s, top_i) <= tol
    torch.testing.assert_close(top_s[fin], want_s[fin], rtol=0, atol=tol)
    # each index names an extension of (nearly) the value given, and no extension is selected twice
    torch.testing.assert_close(cand32.gather(1, top_i)[fin], top_s[fin], rtol=0, atol=tol)
    for b in range(B):
        sel = top_i[b][fin[b]]
        assert sel.unique().numel() == sel.numel()
    # exact selection: whatever is above the 2K-th reference value by more than the tolerance is selected
    must = cand32 > want_s[:, -1:] + tol
    chosen = torch.zeros_like(must).scatter_(1, top_i, fin)
    assert not (must & ~chosen).any()
    return fin


@pytest.fixture
def interp(triton_interpreter):
    rough_topk._build.cache_clear()   # kernels built for the interpreter (conftest clears its own modules)
    yield
    rough_topk._build.cache_clear()


@pytest.mark.parametrize("kind,dtype,V,K", [(k, d, v, K) for k, d, v, Ks in CASES for K in Ks])
def test_kernels_equal_the_reference_in_the_interpreter(interp, kind, dtype, V, K):
    B = 2
    logits, scores, t, limits, banned = _case(kind, dtype, B, K, V, "cpu")
    val, tok, count = rough_topk.row_candidates(logits, scores, t, limits, EOS, banned, K)
    got = rough_topk.rank(val, tok, K, V)   # = beam_topk (which the search test below calls)
    fin = _check(logits, scores, t, limits, banned, K, got)
    _, CAP = rough_topk.sizes(K)
    if kind == "ties":          # the exact fallback ran (and gave the same values)
        assert (count > CAP).all()
    elif kind in ("last", "last_and_early"):   # one candidate per row: </s>, at score + 0
        assert (count == 1).all()
        assert torch.equal(got[1][:, :K] % V, torch.full((B, K), EOS))
        assert torch.equal(got[0][:, :K], scores.sort(dim=1, descending=True).values)
    else:                       # the threshold kept the candidates within the slots, ~2K per row
        assert (count >= 2 * K).all() and (count <= CAP).all()
    if kind == "dead":
        assert not fin[-1].any()


# V = 2500 spans three 1,024-logit tiles: 2 slices of 2,048 (the second partly empty), 4 slices of 1,024 (the
# last one empty); the banned id V - 1 and the ties sit in later slices too
SLICE_CASES = [("random", torch.float32, 2, (2, 4)), ("random", torch.float16, 4, (4,)),
               ("banned_early", torch.float32, 4, (1, 2)), ("ties", torch.float32, 2, (4,)),
               ("ties", torch.bfloat16, 4, (2,)), ("last", torch.float16, 4, (2,)), ("dead", torch.float32, 2, (4,))]


@pytest.mark.parametrize("kind,dtype,P,K", [(k, d, P, K) for k, d, P, Ks in SLICE_CASES for K in Ks])
def test_slices_equal_one_program_per_row_in_the_interpreter(interp, kind, dtype, P, K):
    """Rows shared by P programs: the reference's ranking, the count of qualifying values (the threshold is the
    whole row's in every slice), and the values of one program per row to the fp32 sum's reordering."""
    B, V = 2, 2500
    logits, scores, t, limits, banned = _case(kind, dtype, B, K, V, "cpu")
    val, tok, count = rough_topk.row_candidates(logits, scores, t, limits, EOS, banned, K, num_slices=P)
    _, CAP = rough_topk.sizes(K)
    assert val.shape == tok.shape == (B * K, P * CAP)
    got = rough_topk.rank(val, tok, K, V)
    _check(logits, scores, t, limits, banned, K, got)
    val1, tok1, count1 = rough_topk.row_candidates(logits, scores, t, limits, EOS, banned, K, num_slices=1)
    assert torch.equal(count, count1)
    one = rough_topk.rank(val1, tok1, K, V)
    if kind != "ties":   # among tied values (-inf included) the two may keep different ids
        fin = got[0] > NEG
        assert torch.equal(got[1][fin], one[1][fin])
    torch.testing.assert_close(got[0], one[0], rtol=0, atol=4e-6)


def test_slices_follow_the_rows():
    assert rough_topk.slices(32, 32000, num_sms=132) == 8      # 8 x 4,096 logits, 256 programs
    assert rough_topk.slices(4, 32000, num_sms=132) == 16      # at most MAX_SLICES
    assert rough_topk.slices(512, 32000, num_sms=132) == 1     # enough rows
    assert rough_topk.slices(4, 1000, num_sms=132) == 1        # never a slice under one tile
    assert rough_topk.slices(4, 2500, num_sms=132) == 2


def test_arguments_are_checked(interp):
    logits, scores, t, limits, banned = _case("random", torch.float32, 2, 3, 50, "cpu")
    with pytest.raises(ValueError, match="do not match"):
        rough_topk.beam_topk(logits, scores, t, limits, EOS, banned, 4)
    with pytest.raises(ValueError, match="at most 4 banned"):
        rough_topk.beam_topk(logits, scores, t, limits, EOS, (0, 1, 3, 4, 5), 3)
    with pytest.raises(ValueError, match="must be in"):
        rough_topk.beam_topk(logits, scores, t, limits, 50, banned, 3)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        rough_topk.beam_topk(logits.double(), scores, t, limits, EOS, banned, 3)


class TableDecoder:
    """Logits from a fixed random table, picked by each row's previous token and the position (so two searches
    that choose the same tokens see the same logits); no state to reorder. Each row is -0.3 sqrt(j) over a random
    permutation j of the ids: no equal logits among a row's best 700 even in fp16 (above -8, gaps 0.3 / (2 sqrt j)
    >= 0.0056 against fp16's spacing of 0.0039), so both paths must pick the same tokens (equal values they may
    order differently). Sums along different paths can still tie exactly (the same ranks met at other steps);
    jitter > 0 adds uniform noise of that size to every entry, which makes exact ties of sums vanish."""

    def __init__(self, vocab, device, dtype=torch.float32, seed=0, jitter=0.0):
        g = torch.Generator().manual_seed(seed)
        perm = torch.stack([torch.randperm(vocab, generator=g) for _ in range(37)])
        table = -0.3 * perm.float().sqrt()
        if jitter:
            table = table - jitter * torch.rand(table.shape, generator=g)
        self.table = table.to(device, dtype)

    def step(self, tokens, t, rows=None):
        return self.table[(tokens * 31 + t) % self.table.shape[0]]


def _spy(monkeypatch):
    """Count the calls of rough_topk.beam_topk (decoding imports it at each call)."""
    calls, real = [0], rough_topk.beam_topk

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(rough_topk, "beam_topk", counted)
    return calls


def test_beam_search_with_the_kernels_equals_the_pytorch_path_in_the_interpreter(interp, monkeypatch):
    """The plumbing of _BeamSearch.update (the kernels take over the ranking only on CUDA: forced here). The
    table is jittered: without it two of these hypotheses tie exactly (score -4.790148 both, the same ranks met at
    other steps) and the two rankings may keep either."""
    kw = dict(bos=1, eos=EOS, pad=0, max_len=6, min_len=3, length_penalty=0.6, device="cpu")
    want = decoding.beam_search(TableDecoder(61, "cpu", jitter=1e-3), 2, 2, **kw)
    monkeypatch.setattr(decoding, "_rough_topk", lambda logits: True)
    calls = _spy(monkeypatch)
    got = decoding.beam_search(TableDecoder(61, "cpu", jitter=1e-3), 2, 2, **kw)
    assert calls == [6]   # one call per step
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


def _rank_case(B, K, W, V, kind, device):
    """Slots (B * K, W): values with -inf (unused slots), repeated values (ties), and distinct token ids per
    sentence, so that beam * V + token names one slot."""
    g = torch.Generator().manual_seed(B * 100 + K * 10 + W)
    val = torch.randn(B * K, W, generator=g) * 3 - 5
    if kind == "ties":
        val = torch.randint(-3, 0, (B * K, W), generator=g).float()
    val[torch.rand(B * K, W, generator=g) < 0.3] = NEG
    if kind == "dead":   # a sentence whose slots are all -inf
        val[:K] = NEG
    tok = torch.stack([torch.randperm(V, generator=g)[:W] for _ in range(B * K)]).int()
    return val.to(device), tok.to(device)


def _check_rank(val, tok, K, V, got, want):
    B = val.shape[0] // K
    assert torch.equal(got[0], want[0])                  # the same values, best first
    keys = (torch.arange(K, device=val.device).repeat_interleave(val.shape[1]) * V).view(1, -1) \
        + tok.view(B, -1).long()                          # beam * V + token of each slot
    for b in range(B):
        slot = {int(k): float(v) for k, v in zip(keys[b], val.view(B, -1)[b])}
        picked = [int(i) for i in got[1][b]]
        assert len(set(picked)) == len(picked)              # distinct slots
        assert all(slot[i] == float(s) for i, s in zip(picked, got[0][b]))   # each index holds its value
        vals = val.view(B, -1)[b]
        for r, s in enumerate(want[0][b]):                  # where the value is unique, the same index
            if int((vals == s).sum()) == 1:
                assert picked[r] == int(want[1][b][r])


@pytest.mark.parametrize("kind", ["random", "ties", "dead"])
@pytest.mark.parametrize("B,K,W", [(3, 4, 32), (2, 5, 64), (1, 1, 16), (2, 4, 256)])
def test_rank_equals_topk_in_the_interpreter(interp, kind, B, K, W):
    V = 1000
    val, tok = _rank_case(B, K, W, V, kind, "cpu")
    _check_rank(val, tok, K, V, rough_topk.rank(val, tok, K, V), rough_topk.rank_ref(val, tok, K, V))


def test_kernels_compile_for_sm90():
    """The compiled path (not the interpreter) lowers the four kernels for an H100: PTX and ptxas, no GPU needed. In a
    fresh process without TRITON_INTERPRET, every kernel compiled (no cache); the same process after interpreted
    kernels is test_kernels_compile_after_the_interpreter_ran."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lsquant.inference import rough_topk
threshold, candidates, finish, rank = rough_topk._build(False)
ints = {n: "i32" for n in ("stride", "V", "eos", "b0", "b1", "b2", "b3")}
for K, dt, P in ((1, "fp32", 1), (5, "bf16", 8)):
    C, CAP = rough_topk.sizes(K)
    sig1 = dict(x_ptr="*" + dt, t_ptr="*i64", lim_ptr="*i64", pmax_ptr="*fp32", pcm_ptr="*fp32", S="i32",
                **ints, P="constexpr", C="constexpr", R="constexpr")
    sig2 = dict(x_ptr="*" + dt, t_ptr="*i64", lim_ptr="*i64", pmax_ptr="*fp32", pcm_ptr="*fp32",
                psum_ptr="*fp32", key_ptr="*fp32", tok_ptr="*i32", cnt_ptr="*i32", S="i32", **ints,
                K2="constexpr", P="constexpr", C="constexpr", CAP="constexpr", BLOCK="constexpr")
    sig3 = dict(x_ptr="*" + dt, scores_ptr="*fp32", t_ptr="*i64", lim_ptr="*i64", pmax_ptr="*fp32",
                psum_ptr="*fp32", val_ptr="*fp32", tok_ptr="*i32", cnt_ptr="*i32", count_ptr="*i32", **ints,
                K2="constexpr", P="constexpr", CAP="constexpr", BLOCK="constexpr")
    for fn, sig, const in ((threshold, sig1, dict(P=P, C=C, R=max(1, 1024 // C))),
                           (candidates, sig2, dict(K2=2 * K, P=P, C=C, CAP=CAP, BLOCK=1024)),
                           (finish, sig3, dict(K2=2 * K, P=P, CAP=CAP, BLOCK=1024))):
        k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4))
        assert k.asm["cubin"], (K, dt)
    sig4 = dict(val_ptr="*fp32", tok_ptr="*i32", top_s_ptr="*fp32", top_i_ptr="*i64", V="i32", KW="i32", W="i32",
                K2="constexpr", BLOCK_KW="constexpr")
    k = triton.compile(ASTSource(rank, sig4, constexprs=dict(K2=2 * K, BLOCK_KW=triton.next_power_of_2(K * P * CAP))),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert k.asm["cubin"], (K, "rank")
print("compiled")
"""
    compile_in_fresh_process(code)


def test_kernels_compile_after_the_interpreter_ran(monkeypatch, tmp_path):
    """In one process, interpreted kernels (which patch triton.language) and then a kernel compiled for sm90: what
    a GPU machine runs when it runs the whole suite. The kernel is lowered through the compiler's builder, not the
    interpreter's (conftest.triton_language_restored). An empty cache: a cached cubin would skip the lowering."""
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with interpreter_mode():
        logits, scores, t, limits, banned = _case("random", torch.float32, 2, 2, 517, "cpu")
        rough_topk.row_candidates(logits, scores, t, limits, EOS, banned, 2)   # tl.max, tl.cumsum: interpreted
    threshold = rough_topk._build(False)[0]
    C, _ = rough_topk.sizes(2)
    sig = dict(x_ptr="*fp32", stride="i32", t_ptr="*i64", lim_ptr="*i64", pmax_ptr="*fp32", pcm_ptr="*fp32",
               V="i32", S="i32", eos="i32", b0="i32", b1="i32", b2="i32", b3="i32", P="constexpr", C="constexpr",
               R="constexpr")
    k = triton.compile(ASTSource(threshold, sig, constexprs=dict(P=2, C=C, R=1024 // C)),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert k.asm["cubin"]


# ---- CUDA ------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("K", [1, 2, 4, 5])
@pytest.mark.parametrize("kind,dtype,V", [(k, d, 32000 + v % 2) for k, d, v, _ in CASES])   # odd: strided rows
def test_kernels_equal_the_reference_on_cuda(K, kind, dtype, V):
    B = 3
    logits, scores, t, limits, banned = _case(kind, dtype, B, K, V, "cuda", seed=1)
    _check(logits, scores, t, limits, banned, K, rough_topk.beam_topk(logits, scores, t, limits, EOS, banned, K))
    _, CAP = rough_topk.sizes(K)
    count = rough_topk.row_candidates(logits, scores, t, limits, EOS, banned, K)[2]
    if kind == "ties":
        assert (count > CAP).all()
    elif kind == "random":
        assert (count <= CAP).all()


@pytest.mark.cuda
def test_beam_topk_is_graph_capturable():
    """Captured once, replayed with new logits, scores and position: the eager result (no host sync inside)."""
    B, K, V = 4, 4, 32000
    logits, scores, t, limits, banned = _case("random", torch.float16, B, K, V, "cuda")
    rough_topk.beam_topk(logits, scores, t, limits, EOS, banned, K)   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rough_topk.beam_topk(logits, scores, t, limits, EOS, banned, K)
    for kind in ("random", "last", "ties"):
        new = _case(kind, torch.float16, B, K, V, "cuda", seed=3)
        for dst, src in zip((logits, scores, t, limits), new[:4]):
            dst.copy_(src)
        graph.replay()
        want = rough_topk.beam_topk(logits, scores, t, limits, EOS, banned, K)
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_beam_search_with_the_kernels_equals_the_pytorch_path_on_cuda(dtype, monkeypatch):
    kw = dict(bos=1, eos=EOS, pad=0, max_len=12, min_len=4, length_penalty=0.6, device="cuda")
    calls = _spy(monkeypatch)
    for B, K in ((1, 4), (5, 3), (8, 5)):
        got = decoding.beam_search(TableDecoder(32000, "cuda", dtype, seed=K), B, K, **kw)
        assert calls[0] >= 4   # the kernels ranked every step (at least min_len of them)
        calls[0] = 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LSQUANT_ROUGH_TOPK", "0")
            want = decoding.beam_search(TableDecoder(32000, "cuda", dtype, seed=K), B, K, **kw)
        assert calls[0] == 0   # and the environment variable turns them off
        # the kernels' log-probabilities differ from PyTorch's log-softmax by a few fp32 ulps (another exp and
        # summation order), and with logits on the fp16 grid different paths often have sums equal but for that
        # rounding: lower beams swap at such near-ties (on an H100, 5 of 15 hypotheses at batch 5, beam 3, after
        # a dozen steps), the best hypotheses agree
        assert torch.equal(got[0][:, 0], want[0][:, 0])
        torch.testing.assert_close(got[1][:, 0], want[1][:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["random", "ties", "dead"])
@pytest.mark.parametrize("B,K,W", [(3, 4, 32), (2, 5, 64), (1, 1, 16), (8, 4, 256), (128, 4, 32)])
def test_rank_equals_topk_on_cuda(kind, B, K, W):
    V = 32000
    val, tok = _rank_case(B, K, W, V, kind, "cuda")
    _check_rank(val, tok, K, V, rough_topk.rank(val, tok, K, V), rough_topk.rank_ref(val, tok, K, V))


def test_rank_falls_back_to_topk_when_the_kernel_fails(monkeypatch):
    val, tok = _rank_case(2, 4, 32, 1000, "random", "cpu")
    monkeypatch.setattr(decoding, "_fused_failed", set())
    monkeypatch.setattr(rough_topk, "_build", lambda interpret: (None, None, None, None))   # not callable
    with pytest.warns(RuntimeWarning, match="rank kernel failed"):
        got = rough_topk.rank(val, tok, 4, 1000)
    want = rough_topk.rank_ref(val, tok, 4, 1000)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert "rough_topk.rank" in decoding._fused_failed   # later calls go straight to topk
