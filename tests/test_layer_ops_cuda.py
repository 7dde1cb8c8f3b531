"""Each Transformer-layer kernel against its reference on awkward shapes, fp16 and bf16 (fp32 where cheap),
forward and backward.

Tolerance rule (DESIGN.md principle 4): max |kernel - fp64 reference| <= 2 * max |PyTorch in the same
precision - fp64 reference| + a floor: 1e-6 of the output's scale, so that a PyTorch error of exactly 0 does not
demand bit equality from a differently ordered sum. A backward that starts from low-precision saved outputs (the
softmax backward: the probabilities) is checked from those same saved outputs: the reference and PyTorch then see
what the kernel sees, and the forward's rounding is checked where it happens.
Dropout masks and the pure dropout backward are compared exactly.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from lsquant import ops
from lsquant.ops.dropout import keep_mask_ref
from lsquant.ops.softmax import attention_mask_ref

pytestmark = pytest.mark.cuda
DTYPES = [torch.float16, torch.bfloat16]
DEV = "cuda"


def check(name, ours, ref64, torch_same, floor_scale=None):
    """ours, torch_same: low-precision results; ref64: fp64 reference."""
    ref64 = ref64.double()
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    base = (torch_same.double() - ref64).abs().max().item() if ours.numel() else 0.0
    scale = ref64.abs().max().item() if floor_scale is None and ref64.numel() else (floor_scale or 0.0)
    tol = 2 * base + 1e-6 * scale
    assert math.isfinite(err) and err <= tol, f"{name}: error {err:.3e} > 2 x PyTorch's {base:.3e} (+{1e-6 * scale:.1e})"


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float64) * scale).to(dtype)


def keep_like(shape, p, seed):
    return keep_mask_ref(shape, p, seed, 0, DEV)


# ---- LayerNorm -------------------------------------------------------------------------------------------------

LN_SHAPES = [(1, 256), (7, 768), (97, 1024), (255, 768), (1025, 256), (13, 1001), (3, 20000)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("rows,H", LN_SHAPES)
def test_layer_norm(rows, H, dtype):
    x = rand(rows, H, dtype=dtype, scale=3.0) + 2.0  # a non-zero mean on purpose
    w, b = rand(H, dtype=dtype) * 0.5 + 1, rand(H, dtype=dtype) * 0.1
    gy = rand(rows, H, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = ops.layer_norm(*leaves, 1e-5)
    y.backward(gy)
    l64 = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = F.layer_norm(l64[0], (H,), l64[1], l64[2], 1e-5)
    y64.backward(gy.double())
    lt = [t.clone().requires_grad_() for t in (x, w, b)]
    yt = F.layer_norm(lt[0], (H,), lt[1], lt[2], 1e-5)
    yt.backward(gy)
    check("y", y, y64, yt)
    for n, a, r, t in zip(("gx", "gw", "gb"), leaves, l64, lt):
        check(n, a.grad, r.grad, t.grad)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("rows,H", [(1, 256), (97, 1024), (1025, 768), (13, 1001)])
def test_layer_norm_fake_quant(rows, H, dtype):
    """The fused LayerNorm + fake-quantize against LayerNorm then the fake-quantize kernel: yq bit-exact; with
    only yq's gradient (the pre-LN layers' case) the input and LayerNorm-parameter gradients are bit-exact too
    (the straight-through gradient reaches the LayerNorm backward unrounded either way); the clip gradient is
    the same sum in another order (fp32)."""
    x = rand(rows, H, dtype=dtype, scale=2.0)
    w, b = rand(H, dtype=dtype) * 0.5 + 1, rand(H, dtype=dtype) * 0.1
    gq = rand(rows, H, dtype=dtype)
    clip0 = torch.tensor(2.0, device=DEV)  # LN outputs reach ~4: both clipped and unclipped values
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    clip = clip0.clone().requires_grad_()
    y, yq = ops.layer_norm_fake_quant(*leaves, 1e-5, clip)
    assert torch.equal(yq, ops.fake_quantize_ref(y.detach(), clip0)), "yq is not fake_quantize(y) bit for bit"
    yq.backward(gq)
    l2 = [t.clone().requires_grad_() for t in (x, w, b)]
    clip2 = clip0.clone().requires_grad_()
    y2 = ops.layer_norm(*l2, 1e-5)
    assert torch.equal(y, y2)
    ops.fake_quantize(y2, clip2).backward(gq)
    for n, a, r in zip(("gx", "gw", "gb"), leaves, l2):
        assert torch.equal(a.grad, r.grad), n
    torch.testing.assert_close(clip.grad, clip2.grad, rtol=1e-4, atol=1e-4)
    assert float(clip.grad.abs()) > 0


LNQ_SHAPES = [(r, H) for r in (1, 7, 97, 1025) for H in (256, 768, 1024, 100)] + [(13, 1001), (3, 20000)]


@pytest.mark.parametrize("float_out", [True, False])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("rows,H", LNQ_SHAPES)
def test_layer_norm_quant(rows, H, dtype, float_out):
    """The int8-output LayerNorm against ops.layer_norm then ops.quantize (the two-kernel path), bit for bit, and
    q against the CPU oracle quantize_ref of that y. H = 100, 1001: the scalar row loop for 2-byte types (H not a
    multiple of 8); 100 is vectorised for fp32."""
    x = rand(rows, H, dtype=dtype, scale=3.0) + 2.0
    w, b = rand(H, dtype=dtype) * 0.5 + 1, rand(H, dtype=dtype) * 0.1
    clip = torch.tensor(2.0, device=DEV)  # LN outputs reach ~4: both clipped and unclipped values
    with torch.inference_mode():
        y, q = ops.layer_norm_quant(x, w, b, 1e-5, clip, float_out=float_out)
        y2 = ops.layer_norm(x, w, b, 1e-5)
        q2 = ops.quantize(y2, clip)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, q2), f"{int((q != q2).sum())} of {q.numel()} int8 values differ from quantize(layer_norm)"
    assert torch.equal(q.cpu(), ops.quantize_ref(y2.cpu(), clip.cpu()))
    if float_out:
        assert y.dtype == dtype and torch.equal(y, y2)
    else:
        assert y is None
    if rows * H >= 4096:  # saturated and interior levels both present
        assert int((q.abs() == 127).sum()) > 0 and int(((q.abs() > 0) & (q.abs() < 127)).sum()) > 0


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("H", [64, 100])
def test_layer_norm_quant_rounding(H, dtype):
    """Hand-written int8 values (tests/test_layer_norm_quant.py explains them): q is taken from y rounded to x's
    dtype (fp16/bf16: 3.4999975 -> 3.5 -> 4, 2.5000025 -> 2.5 -> 2; fp32: 3 and 3), and half steps round to even
    and clamp to [-127, 127] (weight 0: y = bias exactly; clip 127: scale 1)."""
    x = torch.tensor([1.0, -1.0] * (H // 2), device=DEV).repeat(3, 1).to(dtype)
    w, b = torch.full((H,), 0.5, device=DEV, dtype=dtype), torch.full((H,), 3.0, device=DEV, dtype=dtype)
    clip = torch.tensor([127.0], device=DEV)
    with torch.no_grad():
        _, q = ops.layer_norm_quant(x, w, b, 1e-5, clip, float_out=False)
    hi, lo = (3, 3) if dtype == torch.float32 else (4, 2)
    assert q.tolist() == [[hi, lo] * (H // 2)] * 3
    vals = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, 127.5, -127.5, 300.0, -300.0, 0.0, 0.25, 1.0, -1.0]
    want = [0, 2, 2, 4, 0, -2, -2, -4, 126, 127, -127, 127, -127, 0, 0, 1, -1]
    reps = -(-H // len(vals))
    b = torch.tensor((vals * reps)[:H], device=DEV, dtype=dtype)
    x = rand(5, H, dtype=dtype)
    with torch.no_grad():
        y, q = ops.layer_norm_quant(x, torch.zeros_like(b), b, 1e-5, clip)
    assert torch.equal(y, b.expand(5, H))
    assert q.tolist() == [(want * reps)[:H]] * 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_quant_clip_edges(dtype):
    x = rand(7, 768, dtype=dtype, scale=2.0)
    w, b = rand(768, dtype=dtype) * 0.5 + 1, rand(768, dtype=dtype) * 0.1
    w[:8], b[:8] = 0, 0  # y exactly 0 there
    with torch.no_grad():
        y = ops.layer_norm(x, w, b, 1e-5)
        amax = y.float().abs().max()
        for c in (torch.tensor(1e-30, device=DEV), torch.tensor(1e30, device=DEV), amax, amax.double().reshape(1, 1)):
            _, q = ops.layer_norm_quant(x, w, b, 1e-5, c, float_out=False)
            assert torch.equal(q, ops.quantize(y, c)) and torch.equal(q.cpu(), ops.quantize_ref(y.cpu(), c.cpu()))
        _, q = ops.layer_norm_quant(x, w, b, 1e-5, torch.tensor(1e-30, device=DEV))
        assert torch.equal(q, (127 * torch.sign(y.float())).to(torch.int8))
        _, q = ops.layer_norm_quant(x, w, b, 1e-5, amax)
        assert int(q.abs().max()) == 127


def test_layer_norm_quant_in_a_cuda_graph():
    """Captured once (float_out True and False); replays after x and the clip were rewritten in place give the
    eager two-kernel results: the kernel reads the clip on the device."""
    dt = torch.float16
    rows, H = 97, 768
    x = rand(rows, H, dtype=dt, scale=2.0)
    w, b = rand(H, dtype=dt) * 0.5 + 1, rand(H, dtype=dt) * 0.1
    clip = torch.tensor([2.0], device=DEV)
    with torch.no_grad():  # (not inference_mode: x and the clip are rewritten in place between replays)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (build, allocator)
            ops.layer_norm_quant(x, w, b, 1e-5, clip)
            ops.layer_norm_quant(x, w, b, 1e-5, clip, float_out=False)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y, q = ops.layer_norm_quant(x, w, b, 1e-5, clip)
            none, q_only = ops.layer_norm_quant(x, w, b, 1e-5, clip, float_out=False)
        assert none is None
        for c, s in ((2.0, 2.0), (0.7, 1.0), (3.5, 4.0)):
            x.copy_(rand(rows, H, dtype=dt, scale=s))
            clip.fill_(c)
            g.replay()
            y2 = ops.layer_norm(x, w, b, 1e-5)
            q2 = ops.quantize(y2, clip)
            assert torch.equal(y, y2) and torch.equal(q, q2) and torch.equal(q_only, q2), c


def test_layer_norm_quant_refuses_bad_inputs():
    x, w, b = rand(4, 64, dtype=torch.float16), rand(64, dtype=torch.float16), rand(64, dtype=torch.float16)
    clip = torch.tensor([1.0], device=DEV)
    with pytest.raises(ValueError, match="clip is on"):
        ops.layer_norm_quant(x, w, b, 1e-5, clip.cpu())
    with pytest.raises(TypeError, match="must have x's dtype and device"):
        ops.layer_norm_quant(x, w.cpu(), b, 1e-5, clip)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.layer_norm_quant(x.clone().requires_grad_(), w, b, 1e-5, clip)


# ---- bias + activation + dropout, bias + dropout + residual ---------------------------------------------------

EW_SHAPES = [(1, 256), (7, 768), (97, 1024), (255, 3072), (1025, 1001), (3, 13)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("rows,N", EW_SHAPES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bias_act_dropout(rows, N, act, p, dtype):
    seed = 1234 + rows
    x, bias, gy = rand(rows, N, dtype=dtype), rand(N, dtype=dtype), rand(rows, N, dtype=dtype)
    xl, bl = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = ops.bias_act_dropout(xl, bl, act, p, seed)
    y.backward(gy)
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    y64 = ops.bias_act_dropout_ref(x64, b64, act, p, seed)
    y64.backward(gy.double())
    xt, bt = x.clone().requires_grad_(), bias.clone().requires_grad_()
    a = torch.relu(xt + bt) if act == "relu" else F.gelu(xt + bt)
    yt = a * keep_like(a.shape, p, seed).to(dtype) * (1 / (1 - p)) if p else a
    yt.backward(gy)
    if p:
        dropped = ~keep_like(y.shape, p, seed)
        assert bool((y[dropped] == 0).all()), "an element the mask drops is not 0"
    check("y", y, y64, yt)
    check("gx", xl.grad, x64.grad, xt.grad)
    check("gbias", bl.grad, b64.grad, bt.grad)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("rows,N", [(1, 256), (97, 1024), (1025, 1001), (3, 13)])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bias_act_dropout_fake_quant(rows, N, act, p, dtype):
    """Fused against bias_act_dropout then the fake-quantize kernel: output and input/bias gradients bit-exact
    (the same arithmetic, the straight-through gradient unrounded either way); clip gradient up to fp32
    summation order."""
    seed = 77 + N
    x, bias, gy = rand(rows, N, dtype=dtype), rand(N, dtype=dtype), rand(rows, N, dtype=dtype)
    clip0 = torch.tensor(1.5, device=DEV)  # activations reach ~4: clipped and unclipped values
    xl, bl, cl = x.clone().requires_grad_(), bias.clone().requires_grad_(), clip0.clone().requires_grad_()
    y = ops.bias_act_dropout_fake_quant(xl, bl, act, p, seed, cl)
    y.backward(gy)
    x2, b2, c2 = x.clone().requires_grad_(), bias.clone().requires_grad_(), clip0.clone().requires_grad_()
    y2 = ops.fake_quantize(ops.bias_act_dropout(x2, b2, act, p, seed), c2)
    y2.backward(gy)
    assert torch.equal(y, y2)
    assert torch.equal(xl.grad, x2.grad) and torch.equal(bl.grad, b2.grad)
    torch.testing.assert_close(cl.grad, c2.grad, rtol=1e-4, atol=1e-4)
    assert float(cl.grad.abs()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N", EW_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_bias_dropout_residual(rows, N, p, dtype):
    seed = 99 + N
    x, bias, res, gy = (rand(rows, N, dtype=dtype), rand(N, dtype=dtype), rand(rows, N, dtype=dtype),
                        rand(rows, N, dtype=dtype))
    leaves = [t.clone().requires_grad_() for t in (x, bias, res)]
    y = ops.bias_dropout_residual(*leaves, p, seed)
    y.backward(gy)
    l64 = [t.double().requires_grad_() for t in (x, bias, res)]
    y64 = ops.bias_dropout_residual_ref(*l64, p, seed)
    y64.backward(gy.double())
    lt = [t.clone().requires_grad_() for t in (x, bias, res)]
    h = lt[0] + lt[1]
    yt = lt[2] + (h * keep_like(h.shape, p, seed).to(dtype) * (1 / (1 - p)) if p else h)
    yt.backward(gy)
    check("y", y, y64, yt)
    for n, a, r, t in zip(("gx", "gbias", "gres"), leaves, l64, lt):
        check(n, a.grad, r.grad, t.grad)
    if p:  # the dropout backward is one multiply: bit-exact against the reference
        assert torch.equal(leaves[0].grad, ops.dropout_ref(gy, p, seed))


# ---- masked softmax --------------------------------------------------------------------------------------------

SM_SHAPES = [(1, 2, 1, 1), (1, 4, 7, 7), (2, 3, 97, 97), (1, 2, 255, 255), (1, 1, 33, 1025), (3, 2, 1, 40),
             (2, 2, 5, 64)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("B,nH,Lq,Lk", SM_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_masked_softmax(B, nH, Lq, Lk, causal, masked, p, dtype):
    seed, sscale = 7 + Lk, 0.125
    x, gy = rand(B, nH, Lq, Lk, dtype=dtype, scale=4.0), rand(B, nH, Lq, Lk, dtype=dtype)
    mask = None
    if masked:  # right padding; every row keeps at least its first key
        lengths = torch.randint(1, Lk + 1, (B,), generator=torch.Generator().manual_seed(Lk))
        mask = (torch.arange(Lk)[None] >= lengths[:, None]).to(DEV)
    xl = x.clone().requires_grad_()
    y = ops.masked_softmax(xl, mask, causal, p, seed, scale=sscale)
    y.backward(gy)
    x64 = x.double().requires_grad_()
    y64 = ops.masked_softmax_ref(x64, mask, causal, p, seed, scale=sscale)
    y64.backward(gy.double())
    xt = x.clone().requires_grad_()
    m = attention_mask_ref(B, Lq, Lk, mask, causal, DEV)
    s = xt * sscale
    if m is not None:
        s = s.masked_fill(m, float("-inf"))
    yt = torch.softmax(s, -1).nan_to_num(0.0)
    if p:
        yt = yt * keep_like(yt.shape, p, seed).to(dtype) * (1 / (1 - p))
    yt.backward(gy)
    check("probs", y, y64, yt, floor_scale=1.0)
    # The backward, given the probabilities it starts from (the forward's own, checked just above): the fp64
    # reference and PyTorch's softmax backward in the same precision both start from those rounded probabilities,
    # so the comparison is the backward kernel's error alone, not the forward's rounding carried through it.
    probs = ops.masked_softmax(x, mask, causal, 0.0, seed, scale=sscale)  # what the backward saved (dropout aside)
    g64 = gy.double() * (keep_like(gy.shape, p, seed).double() / (1 - p) if p else 1.0)
    P = probs.double()
    grad64 = sscale * P * (g64 - (g64 * P).sum(-1, keepdim=True))
    grad_torch = torch._softmax_backward_data(g64.to(dtype), probs, -1, dtype) * sscale  # sscale = 2^-3: exact
    check("grad", xl.grad, grad64, grad_torch)


def test_fully_masked_rows_give_zeros():
    x = torch.randn(1, 1, 3, 8, device=DEV, dtype=torch.float16)
    mask = torch.ones(1, 8, dtype=torch.bool, device=DEV)
    assert torch.equal(ops.masked_softmax(x, mask), torch.zeros_like(x))


# ---- embedding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("B,L,H", [(1, 1, 256), (1, 7, 768), (3, 97, 1024), (2, 255, 256), (1, 1025, 768),
                                   (5, 3, 13)])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("learned", [False, True])
def test_embedding(B, L, H, p, learned, dtype):
    V, P, pad, start, seed = 1000, L + 4, 1, 3, 5 + L
    gen = torch.Generator().manual_seed(L)
    tokens = torch.randint(0, V, (B, L), generator=gen)
    tokens[0, -1] = pad
    tokens = tokens.to(DEV)
    table, pos = rand(V, H, dtype=dtype, scale=0.1), rand(P, H, dtype=dtype, scale=0.1)
    gy = rand(B, L, H, dtype=dtype)
    tl, pl = table.clone().requires_grad_(), pos.clone().requires_grad_(learned)
    scale = math.sqrt(H)
    y = ops.embedding(tokens, tl, pl, scale, pad, start, p, seed)
    y.backward(gy)
    t64, p64 = table.double().requires_grad_(), pos.double().requires_grad_(learned)
    y64 = ops.embedding_ref(tokens, t64, p64, scale, pad, start, p, seed)
    y64.backward(gy.double())
    tt, pt = table.clone().requires_grad_(), pos.clone().requires_grad_(learned)
    yt = F.embedding(tokens, tt) * scale + pt[start:start + L]
    yt = yt.masked_fill((tokens == pad)[..., None], 0)
    if p:
        yt = yt * keep_like(yt.shape, p, seed).to(dtype) * (1 / (1 - p))
    yt.backward(gy)
    assert float(y[0, -1].abs().sum()) == 0.0
    check("y", y, y64, yt)
    check("gtable", tl.grad, t64.grad, tt.grad)
    if learned:
        check("gpos", pl.grad, p64.grad, pt.grad)


# ---- cross-entropy ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("N,V", [(1, 256), (7, 1000), (97, 32000), (255, 50257), (1025, 768), (6, 13)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy(N, V, eps, dtype):
    x = rand(N, V, dtype=dtype, scale=3.0)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(N)).to(DEV)
    t[::3] = -100  # ignored
    gl = torch.rand(N, device=DEV)
    xl = x.clone().requires_grad_()
    loss, nll = ops.cross_entropy(xl, t, eps)
    loss.backward(gl)
    x64 = x.double().requires_grad_()
    l64, n64 = ops.cross_entropy_ref(x64, t, eps)
    l64.backward(gl.double())
    xt = x.clone().requires_grad_()
    lt = F.cross_entropy(xt, t, label_smoothing=eps, reduction="none")
    lt.backward(gl.to(dtype))
    nt = F.cross_entropy(x, t, reduction="none")
    check("loss", loss, l64, lt)
    check("nll", nll, n64, nt)
    check("grad", xl.grad, x64.grad, xt.grad)
    assert float(xl.grad[::3].abs().sum()) == 0.0


# ---- seeds read from device memory (graph-safe dropout) --------------------------------------------------------

@pytest.mark.parametrize("seed", [5, 2**40 + 7, 2**62 - 1, -3])
def test_tensor_seed_equals_int_seed(seed):
    """A one-element int64 CUDA tensor (here a view inside a larger one, as the layers pass them) gives the
    mask of the same int: the kernels hash the 64 bits they read as the host hashed the int."""
    dt = torch.bfloat16
    x, bias, res = rand(97, 1024, dtype=dt), rand(1024, dtype=dt), rand(97, 1024, dtype=dt)
    t = torch.tensor([0, seed, 0], dtype=torch.int64, device=DEV)[1]
    tokens = torch.randint(0, 97, (3, 33), generator=torch.Generator().manual_seed(1)).to(DEV)
    for f in (lambda s: ops.bias_act_dropout(x, bias, "gelu", 0.1, s),
              lambda s: ops.bias_dropout_residual(x, bias, res, 0.1, s),
              lambda s: ops.masked_softmax(x.view(1, 1, 97, 1024), None, True, 0.1, s, scale=0.1),
              lambda s: ops.embedding(tokens, x, res, 2.0, 0, 0, 0.1, s)):
        assert torch.equal(f(seed), f(t))
    dropped = ~keep_like(x.shape, 0.1, seed)
    y = ops.bias_act_dropout(x, bias, "relu", 0.1, t)
    assert bool((y[dropped] == 0).all()) and torch.equal(y != 0, (torch.relu(x.float() + bias.float()) != 0)
                                                         & ~dropped)


def test_captured_ops_read_the_seed_at_replay():
    """Each dropout kernel, forward and backward, captured in a CUDA graph with a seed tensor: a replay after
    the tensor was rewritten applies the new seed's mask (a seed passed by value would be frozen at capture)."""
    dt = torch.float16
    x, bias, res = rand(33, 256, dtype=dt), rand(256, dtype=dt), rand(33, 256, dtype=dt)
    s4 = rand(2, 2, 7, 40, dtype=dt)
    tokens = torch.randint(1, 50, (3, 11), device=DEV)
    table, pos = rand(50, 256, dtype=dt), rand(16, 256, dtype=dt)
    leaves = [t.clone().requires_grad_() for t in (x, s4, table)]
    seed = torch.tensor([11], dtype=torch.int64, device=DEV)

    def run(leaves, seed):
        outs = (ops.bias_act_dropout(leaves[0], bias, "gelu", 0.2, seed),
                ops.bias_dropout_residual(leaves[0], bias, res, 0.2, seed),
                ops.masked_softmax(leaves[1], None, False, 0.2, seed, scale=0.5),
                ops.embedding(tokens, leaves[2], pos, 16.0, 1, 0, 0.2, seed))
        grads = torch.autograd.grad([o.float().sum() for o in outs], leaves)
        return outs, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(leaves, seed)  # warm-up outside the capture (build, cuBLAS handles)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs, grads = run(leaves, seed)
    for sv in (11, 2**50 + 1, 12345):
        seed.fill_(sv)
        g.replay()
        want_outs, want = run([t.clone().requires_grad_() for t in (x, s4, table)], sv)
        for o, r in zip(outs, want_outs):
            assert torch.equal(o, r), sv
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # the embedding's atomics: order varies
        assert torch.equal(grads[0], want[0]) and torch.equal(grads[1], want[1])


def test_dropout_without_a_seed_tensor_is_refused():
    x, bias, res = rand(4, 64, dtype=torch.float16), rand(64, dtype=torch.float16), rand(4, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="needs a seed tensor"):
        ops.load().bias_dropout_residual_fwd(x, bias, res, None, 0, 100, 1.1)
    with pytest.raises(RuntimeError, match="int64 CUDA tensor of one element"):
        ops.load().bias_dropout_residual_fwd(x, bias, res, torch.tensor([1, 2], device=DEV), 0, 100, 1.1)
    # no dropout: no seed needed
    torch.testing.assert_close(ops.load().bias_dropout_residual_fwd(x, bias, res, None, 0, 0, 1.0),
                               ops.bias_dropout_residual_ref(x, bias, res))
