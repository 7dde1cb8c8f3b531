"""lsquant.exact_gemm(): the fake-quant linears computed on int8 levels with exact dot products, as the int8
engine computes them (CPU; the model-level check against the engine is in test_engine_transformer.py)."""
import pytest
import torch

import lsquant
from lsquant.inference.gemm import int8_linear_ref
from lsquant.layers.base import LinearQuant
from lsquant.quant.ref import quantize_ref


def _qlinear(K=77, N=45, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(N, generator=g))
    q = lsquant.QuantLinear.from_linear(lin)
    q.input_quantizer.set_clip(2.5)
    q.apply(lsquant.enable_quant)
    x = (torch.randn(3, 17, K, generator=g) * 1.2).to(dtype)
    return q, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_linear_is_the_engines_arithmetic(dtype):
    q, x = _qlinear(dtype=dtype)
    with torch.no_grad(), lsquant.exact_gemm():
        y = q(x)
    x_q = quantize_ref(x, torch.tensor(2.5))
    w_clip = q.weight.detach().abs().amax(1).float()
    w_q = quantize_ref(q.weight.detach(), w_clip, 0)
    # the engine's oracle on the same levels and clips, bit for bit
    assert torch.equal(y, int8_linear_ref(x_q, w_q, torch.tensor(2.5), w_clip, q.bias.detach(), out_dtype=dtype))
    # by hand: exact integer dot products, then fp32(acc) * (x_scale * w_scale) + bias, one rounding each
    acc = (x_q.double() @ w_q.double().T).float()
    alpha = (torch.tensor(2.5) / 127) * (w_clip / 127)
    assert torch.equal(y, (acc * alpha + q.bias.detach().float()).to(dtype))
    # and the same function as the fake-quant forward, up to the latter's rounding
    with torch.no_grad():
        ref = q(x)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


def test_exact_linear_does_not_depend_on_summation_order():
    """Permuting K (the same permutation of x's columns and w's) changes every partial sum's order: the exact
    linear gives the same bits; so does splitting M into row blocks."""
    q, x = _qlinear(K=1000, N=64)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    p, _ = _qlinear(K=1000, N=64)
    with torch.no_grad():
        p.weight.copy_(q.weight[:, perm])
        p.bias.copy_(q.bias)
    with torch.no_grad(), lsquant.exact_gemm():
        y, y_perm = q(x), p(x[..., perm])
        y_rows = torch.cat([q(x[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
    assert torch.equal(y, y_perm)
    assert torch.equal(y, y_rows)


def test_prequantized_input_gives_the_same_levels():
    q, x = _qlinear(dtype=torch.bfloat16)
    lq = LinearQuant(q.out_features)
    lq.input_quantizer.set_clip(2.5)
    lq.apply(lsquant.enable_quant)
    x_hat = lsquant.fake_quantize(x, torch.tensor(2.5))
    with torch.no_grad(), lsquant.exact_gemm():
        a = lq(x, q.weight, q.bias)
        b = lq(x_hat, q.weight, q.bias, prequantized=True)
    assert torch.equal(a, b)


def test_off_outside_the_context_and_when_not_quantizing():
    q, x = _qlinear()
    with torch.no_grad():
        plain = q(x)
        with lsquant.exact_gemm():
            assert lsquant.quant.exact_gemm_on()
            with lsquant.exact_gemm(False):
                assert torch.equal(q(x), plain)
            q.apply(lsquant.disable_quant)  # the float model: exact_gemm changes nothing
            assert torch.equal(q(x), torch.nn.functional.linear(x, q.weight, q.bias))
        assert not lsquant.quant.exact_gemm_on()


def test_errors():
    q, x = _qlinear()
    with lsquant.exact_gemm(), pytest.raises(RuntimeError, match="no_grad"):
        q(x)
    fresh = lsquant.QuantLinear(8, 4)
    fresh.apply(lsquant.enable_quant)
    with torch.no_grad(), lsquant.exact_gemm(), pytest.raises(RuntimeError, match="calibrate"):
        fresh(torch.randn(2, 8))
