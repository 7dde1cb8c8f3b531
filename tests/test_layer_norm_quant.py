"""ops.layer_norm_quant on the CPU: the reference (its CPU path and the oracle of the CUDA kernel, see
tests/test_layer_ops_cuda.py) and the Python side of the CUDA path with a stand-in extension.

q must be quantize(y) of y ROUNDED to x's dtype (bit-identical to ops.layer_norm then ops.quantize), so besides
the composition the tests pin values that a different order of rounding or a different rounding rule would get
wrong, with the expected int8 values written out by hand."""
import pytest
import torch

from lsquant import ops
from lsquant.ops import layernorm
from lsquant.quant import ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _inputs(rows, H, dtype, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = (torch.randn(rows, H, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    w = (torch.randn(H, generator=g, dtype=torch.float64) * 0.5 + 1).to(dtype)
    b = (torch.randn(H, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 256), (7, 768), (3, 5, 100), (97, 1024)])
@pytest.mark.parametrize("float_out", [True, False])
def test_ref_is_layer_norm_then_quantize(shape, dtype, float_out):
    _, w, b = _inputs(1, shape[-1], dtype)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).to(dtype)
    clip = torch.tensor(2.0)  # LayerNorm outputs reach ~4: clipped and unclipped values both occur
    y, q = ops.layer_norm_quant(x, w, b, EPS, clip, float_out=float_out)
    y_ln = ops.layer_norm(x, w, b, EPS)
    want = ref.quantize_ref(y_ln, clip)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, want)
    assert torch.equal(q, ops.quantize(y_ln, clip))
    if float_out:
        assert y.dtype == dtype and torch.equal(y, y_ln)
    else:
        assert y is None
    # the test has teeth: saturated levels and interior levels both present
    assert int((q.abs() == 127).sum()) > 0 and int(((q.abs() > 0) & (q.abs() < 127)).sum()) > 0
    # and q dequantizes to within half a step of the clamped y
    scale = 2.0 / 127
    err = (q.double() * scale - y_ln.double().clamp(-2.0, 2.0)).abs().max().item()
    assert err <= scale / 2 * (1 + 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_steps_round_to_even_and_clamp(dtype):
    """weight 0: y = bias exactly (fma(xhat, 0, b) = b). clip 127: scale 1, 1/scale 1, so q = round-half-even(b)
    clamped to [-127, 127], written out by hand."""
    vals = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, 127.5, -127.5, 300.0, -300.0, 0.0, 0.25, 1.0, -1.0]
    want = [0, 2, 2, 4, 0, -2, -2, -4, 126, 127, -127, 127, -127, 0, 0, 1, -1]
    H = len(vals)
    b = torch.tensor(vals, dtype=dtype)
    assert b.double().tolist() == vals  # every value exact in this dtype
    x = torch.randn(5, H).to(dtype)
    w = torch.zeros(H, dtype=dtype)
    clip = torch.tensor(127.0)
    y, q = ops.layer_norm_quant(x, w, b, EPS, clip)
    assert torch.equal(y, b.expand(5, H))
    assert q.tolist() == [want] * 5
    assert torch.equal(q, ref.quantize_ref(b, clip).expand(5, H))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantizes_the_rounded_y(dtype):
    """x = +-1 alternating: mean 0, rstd = 1/sqrt(1 + eps), xhat = +-0.999995; weight 0.5, bias 3, clip 127
    (scale 1). In fp32 y = 3.4999975 and 2.5000025 -> q 3 and 3; rounded to fp16/bf16 y is 3.5 and 2.5 exactly
    -> q 4 and 2 (half to even). Quantizing the unrounded fp32 y would give 3 and 3 in every dtype."""
    H = 64
    x = torch.tensor([1.0, -1.0] * (H // 2)).repeat(3, 1).to(dtype)
    w, b = torch.full((H,), 0.5, dtype=dtype), torch.full((H,), 3.0, dtype=dtype)
    clip = torch.tensor(127.0)
    y, q = ops.layer_norm_quant(x, w, b, EPS, clip)
    hi, lo = (3, 3) if dtype == torch.float32 else (4, 2)
    assert q.tolist() == [[hi, lo] * (H // 2)] * 3
    if dtype != torch.float32:
        assert y.tolist() == [[3.5, 2.5] * (H // 2)] * 3
    y32 = layernorm.layer_norm_ref(x.float(), w.float(), b.float(), EPS)  # the unrounded fp32 y
    assert ref.quantize_ref(y32, clip).tolist() == [[3, 3] * (H // 2)] * 3


def test_clip_edges():
    x, w, b = _inputs(7, 96, torch.float16)
    w[:8] = 0
    b[:8] = 0  # columns where y is exactly 0
    y = ops.layer_norm(x, w, b, EPS)
    assert bool((y[:, :8] == 0).all())
    # a tiny clip saturates everything but the zeros: q = 127 * sign(y)
    _, q = ops.layer_norm_quant(x, w, b, EPS, torch.tensor(1e-30))
    assert torch.equal(q, (127 * torch.sign(y.float())).to(torch.int8))
    # a huge clip maps everything to 0
    _, q = ops.layer_norm_quant(x, w, b, EPS, torch.tensor(1e30))
    assert not bool(q.any())
    # clip = max |y|: the largest element lands on the last level, nothing beyond it
    amax = y.float().abs().max()
    _, q = ops.layer_norm_quant(x, w, b, EPS, amax)
    i = int(y.float().abs().argmax())
    assert int(q.abs().max()) == 127 and int(q.reshape(-1)[i].abs()) == 127
    assert torch.equal(q, ref.quantize_ref(y, amax))
    # any one-element float clip: 0-d, (1,), (1, 1), fp64 (rounded to fp32 like ops.quantize does)
    c = torch.tensor(1.7)
    want = ref.quantize_ref(y, c)
    for clip in (c, c.reshape(1), c.reshape(1, 1), c.double()):
        _, q = ops.layer_norm_quant(x, w, b, EPS, clip, float_out=False)
        assert torch.equal(q, want), clip


def test_bad_inputs_are_refused_clearly():
    x, w, b = _inputs(4, 32, torch.float16)
    clip = torch.tensor(1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.layer_norm_quant(x.to(torch.int32), w, b, EPS, clip)
    with pytest.raises(ValueError, match=r"weight must have shape \(32,\)"):
        ops.layer_norm_quant(x, w[:31], b, EPS, clip)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        ops.layer_norm_quant(x, w, b.reshape(1, 32), EPS, clip)
    with pytest.raises(TypeError, match="bias .* must have x's dtype"):
        ops.layer_norm_quant(x, w, b.float(), EPS, clip)
    with pytest.raises(ValueError, match="clip must hold one value"):
        ops.layer_norm_quant(x, w, b, EPS, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="clip must be a float tensor"):
        ops.layer_norm_quant(x, w, b, EPS, torch.tensor(1))
    with pytest.raises(TypeError, match="clip must be a torch.Tensor"):
        ops.layer_norm_quant(x, w, b, EPS, 1.0)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., H\)"):
        ops.layer_norm_quant(x[:, :0], w[:0], b[:0], EPS, clip)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="clip is on"):
            ops.layer_norm_quant(x.cuda(), w.cuda(), b.cuda(), EPS, clip)


def test_inference_only():
    x, w, b = _inputs(4, 32, torch.float32)
    wp = torch.nn.Parameter(w.clone())
    clip = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.layer_norm_quant(x, wp, b, EPS, clip)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.layer_norm_quant(x, w, b, EPS, clip.clone().requires_grad_())
    want = ops.layer_norm_quant(x, w, b, EPS, clip)
    with torch.no_grad():
        got = ops.layer_norm_quant(x, wp, b, EPS, clip)
    with torch.inference_mode():
        got2 = ops.layer_norm_quant(x, wp, b, EPS, clip)
    for g in (got, got2):
        assert not g[0].requires_grad and torch.equal(g[0], want[0]) and torch.equal(g[1], want[1])


class _StandIn:
    """csrc/bindings.cpp's ln_quant_fwd computed with the reference, checking what the wrapper passes."""

    def __init__(self):
        self.calls = []

    def ln_quant_fwd(self, x, w, b, eps, clip, float_out, pdl):
        assert x.dim() == 2 and x.is_contiguous() and w.is_contiguous() and b.is_contiguous()
        assert clip.dtype == torch.float32 and clip.shape == (1,) and clip.is_contiguous()
        assert isinstance(eps, float) and isinstance(float_out, bool) and isinstance(pdl, bool)
        self.calls.append((x.shape, pdl))
        y, q = layernorm.layer_norm_quant_ref(x, w, b, eps, clip, float_out)
        return (y if float_out else torch.empty(0, dtype=x.dtype)), q


@pytest.mark.parametrize("float_out,pdl", [(True, False), (False, False), (False, True)])
def test_cuda_path_plumbing(monkeypatch, float_out, pdl):
    """The CUDA branch's Python side (reshape to rows, contiguity, the clip as fp32 [1], views back to x's shape,
    None for y) on CPU tensors, with the extension replaced by the stand-in."""
    ext = _StandIn()
    monkeypatch.setattr(layernorm, "load", lambda: ext)
    x = torch.randn(3, 40, 5, dtype=torch.float64).to(torch.bfloat16).transpose(1, 2)  # (3, 5, 40), strided
    w, b = torch.randn(40).to(torch.bfloat16), torch.randn(40).to(torch.bfloat16)
    clip = torch.tensor([[1.25]], dtype=torch.float64)
    y, q = layernorm._layer_norm_quant_cuda(x, w, b, EPS, clip, float_out, pdl)
    assert ext.calls == [((15, 40), pdl)]
    y_ref, q_ref = ops.layer_norm_quant_ref(x, w, b, EPS, clip, float_out)
    assert q.shape == x.shape and torch.equal(q, q_ref)
    if float_out:
        assert y.shape == x.shape and torch.equal(y, y_ref)
    else:
        assert y is None and y_ref is None
