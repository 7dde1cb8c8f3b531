"""Attention head split (+ bias) and merge: the references on the CPU (shapes, equality to the layers'
view/transpose formulation, fp64 gradcheck), the autograd Functions' plumbing with a stand-in extension, and the
CUDA kernels against the references (marked ``cuda``).

Tolerance: none. The ops are copies plus, with a bias, one fp32 add rounded once; kernels and references compute
exactly that, so outputs and input gradients are compared bit for bit. The bias gradient is a fp32 column sum:
bit-exact against the same sum of the reference's gradient, and within one rounding of the dtype (plus the fp32
sum's error) of the fp64 sum.
"""
import importlib

import pytest
import torch

from lsquant import ops

heads = importlib.import_module("lsquant.ops.heads")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def view_split(t, nH):
    """The layers' formulation (lsquant.layers.transformer._split_heads)."""
    B, L, H = t.shape
    return t.view(B, L, nH, H // nH).transpose(1, 2)


def view_merge(t):
    B, nH, L, D = t.shape
    return t.transpose(1, 2).reshape(B, L, nH * D)


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64, device=device).to(dtype)


# ---- references (CPU) --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("B,L,H,nH", [(1, 1, 8, 2), (2, 7, 72, 4), (3, 5, 48, 12)])
def test_split_ref_equals_view_formulation(B, L, H, nH, parts, dtype):
    qkv, bias = rand(B, L, parts * H, dtype=dtype), rand(parts * H, dtype=dtype)
    for b in (None, bias):
        out = ops.split_heads_ref(qkv, b, nH, parts)
        assert isinstance(out, tuple) and len(out) == parts
        # torch's own x + bias in fp16/bf16 is also the fp32 sum rounded once
        full = qkv if b is None else qkv + b
        for o, want in zip(out, full.chunk(parts, dim=-1)):
            assert o.shape == (B, nH, L, H // nH) and o.dtype == dtype and o.is_contiguous()
            assert torch.equal(o, view_split(want, nH))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_ref_equals_view_formulation_and_inverts_split(dtype):
    ctx = rand(2, 4, 7, 18, dtype=dtype)
    y = ops.merge_heads_ref(ctx)
    assert y.shape == (2, 7, 72) and y.is_contiguous()
    assert torch.equal(y, view_merge(ctx))
    (back,) = ops.split_heads_ref(y, None, 4, 1)
    assert torch.equal(back, ctx)
    # the public op on the CPU is the reference; on an already (B, L, nH, D)-laid-out ctx it is a view
    assert torch.equal(ops.merge_heads(ctx), y)
    blhd = rand(2, 7, 4, 18, dtype=dtype)
    merged = ops.merge_heads(blhd.transpose(1, 2))
    assert merged.data_ptr() == blhd.data_ptr() and torch.equal(merged, blhd.reshape(2, 7, 72))


def test_split_public_op_on_cpu_is_the_reference():
    qkv, bias = rand(2, 3, 3 * 16), rand(3 * 16)
    for a, b in zip(ops.split_heads(qkv, bias, 4), ops.split_heads_ref(qkv, bias, 4)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_ref_gradcheck(parts, with_bias):
    qkv = rand(2, 3, parts * 6, dtype=torch.float64).requires_grad_()
    bias = rand(parts * 6, dtype=torch.float64).requires_grad_() if with_bias else None
    inputs = (qkv, bias) if with_bias else (qkv,)
    f = (lambda x, b: ops.split_heads_ref(x, b, 2, parts)) if with_bias else \
        (lambda x: ops.split_heads_ref(x, None, 2, parts))
    assert torch.autograd.gradcheck(f, inputs)


def test_merge_ref_gradcheck():
    ctx = rand(2, 3, 4, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(ops.merge_heads_ref, (ctx,))


@pytest.mark.parametrize("call,word", [
    (lambda: ops.split_heads(torch.zeros(2, 3, 12), None, 2, 4), "parts"),
    (lambda: ops.split_heads(torch.zeros(2, 12), None, 2, 3), "batch, seq_len"),
    (lambda: ops.split_heads(torch.zeros(2, 3, 13), None, 2, 3), "divisible"),
    (lambda: ops.split_heads(torch.zeros(2, 3, 12), None, 3, 3), "divisible"),
    (lambda: ops.split_heads(torch.zeros(2, 3, 12), torch.zeros(4), 2, 3), "bias must have shape"),
    (lambda: ops.split_heads(torch.zeros(2, 3, 12), torch.zeros(12, dtype=torch.float64), 2, 3), "dtype"),
    (lambda: ops.merge_heads(torch.zeros(2, 3, 12)), "head_dim"),
])
def test_bad_arguments_say_what_is_wrong(call, word):
    with pytest.raises((ValueError, TypeError), match=word):
        call()


# ---- the autograd Functions with a stand-in extension (CPU) ------------------------------------------------------

class RefExtension:
    """The heads bindings of csrc/bindings.cpp, computed with the references."""

    def split_heads_fwd(self, qkv, bias, nH, parts):
        return list(ops.split_heads_ref(qkv, bias, nH, parts))

    def split_heads_bwd(self, grads, ref, B, L, nH, D):
        assert all(g is None or g.is_contiguous() for g in grads)
        full = [torch.zeros(B, nH, L, D, dtype=ref.dtype) if g is None else g for g in grads]
        return torch.cat([ops.merge_heads_ref(g) for g in full], dim=-1)

    def merge_heads_fwd(self, ctx):
        assert ctx.is_contiguous()
        return ops.merge_heads_ref(ctx)

    def merge_heads_bwd(self, gy, nH):
        return ops.split_heads_ref(gy, None, nH, 1)[0]


@pytest.fixture
def ref_extension(monkeypatch):
    monkeypatch.setattr(heads, "load", lambda: RefExtension())


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_function_plumbing(ref_extension, parts, with_bias):
    qkv0, bias0 = rand(2, 5, parts * 12), rand(parts * 12)
    leaves_f = [qkv0.clone().requires_grad_(), bias0.clone().requires_grad_() if with_bias else None]
    leaves_r = [qkv0.clone().requires_grad_(), bias0.clone().requires_grad_() if with_bias else None]
    out_f = heads._SplitHeads.apply(*leaves_f, 3, parts)
    out_r = ops.split_heads_ref(*leaves_r, 3, parts)
    assert len(out_f) == parts
    for a, b in zip(out_f, out_r):
        assert torch.equal(a, b)
    # the middle part unused when there are several (its gradient arrives as None), a transposed gradient
    used = [0, parts - 1] if parts > 1 else [0]
    gs = [rand(2, 3, 12 // 3, 5).transpose(-1, -2) for _ in range(parts)]
    sum((out_f[i] * gs[i]).sum() for i in used).backward()
    sum((out_r[i] * gs[i]).sum() for i in used).backward()
    assert torch.equal(leaves_f[0].grad, leaves_r[0].grad)
    if with_bias:
        torch.testing.assert_close(leaves_f[1].grad, leaves_r[1].grad, rtol=1e-6, atol=1e-6)


def test_merge_function_plumbing(ref_extension):
    ctx0 = rand(2, 3, 5, 4)
    a, b = ctx0.clone().requires_grad_(), ctx0.clone().requires_grad_()
    ya, yb = heads._MergeHeads.apply(a), ops.merge_heads_ref(b)
    assert torch.equal(ya, yb)
    g = rand(2, 5, 12)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)


# ---- CUDA kernels against the references -------------------------------------------------------------------------

BL = [(1, 1), (2, 7), (1, 97), (3, 255), (1, 1025)]
HN = [(256, 4), (768, 12), (1024, 16), (72, 4)]  # (72, 4): D = 18, 36 bytes in fp16: the scalar path


def _cuda_case(B, L, H, nH, parts, dtype, with_bias, misalign=False):
    dev = "cuda"
    N = parts * H
    qkv0 = rand(B, L, N, dtype=dtype, device=dev)
    if misalign:  # contiguous but 1 element off a 16-byte boundary: the kernel must fall back to scalar accesses
        buf = torch.empty(qkv0.numel() + 1, dtype=dtype, device=dev)
        buf[1:].copy_(qkv0.reshape(-1))
        qkv0 = buf[1:].view(B, L, N)
    bias0 = rand(N, dtype=dtype, device=dev) if with_bias else None
    qa = qkv0.clone().requires_grad_() if not misalign else qkv0.detach().requires_grad_()
    qr = qkv0.detach().clone().requires_grad_()
    ba = bias0.clone().requires_grad_() if with_bias else None
    br = bias0.clone().requires_grad_() if with_bias else None
    out = ops.split_heads(qa, ba, nH, parts)
    ref = ops.split_heads_ref(qr, br, nH, parts)
    for o, r in zip(out, ref):
        assert o.is_contiguous() and o.shape == (B, nH, L, H // nH)
        assert torch.equal(o, r), "split forward differs from the reference"
    gs = [rand(B, nH, L, H // nH, dtype=dtype, device=dev) for _ in range(parts)]
    used = range(parts) if parts == 1 else [i for i in range(parts) if i != 1]  # part 1 unused: None gradient
    torch.autograd.backward([out[i] for i in used], [gs[i] for i in used])
    torch.autograd.backward([ref[i] for i in used], [gs[i] for i in used])
    assert torch.equal(qa.grad, qr.grad), "split backward (grad qkv) differs from the reference"
    if with_bias:
        assert torch.equal(ba.grad, heads._bias_grad(qr.grad, dtype)), "bias grad is not the fp32 column sum"
        exact = qr.grad.double().reshape(-1, N).sum(0)
        eps = torch.finfo(dtype).eps
        tol = eps * exact.abs() + 1e-6 * qr.grad.double().abs().reshape(-1, N).sum(0) + 1e-30
        assert ((ba.grad.double() - exact).abs() <= tol).all(), "bias grad too far from the fp64 sum"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,nH", HN)
@pytest.mark.parametrize("B,L", BL)
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_heads_cuda(B, L, H, nH, parts, dtype):
    for with_bias in (True, False):
        _cuda_case(B, L, H, nH, parts, dtype, with_bias)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [1, 3])
def test_split_heads_cuda_misaligned(parts, dtype):
    _cuda_case(2, 97, 768, 12, parts, dtype, with_bias=True, misalign=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,nH", HN)
@pytest.mark.parametrize("B,L", BL)
def test_merge_heads_cuda(B, L, H, nH, dtype):
    ctx0 = rand(B, nH, L, H // nH, dtype=dtype, device="cuda")
    a, r = ctx0.clone().requires_grad_(), ctx0.clone().requires_grad_()
    ya, yr = ops.merge_heads(a), ops.merge_heads_ref(r)
    assert ya.is_contiguous() and torch.equal(ya, yr)
    g = rand(B, L, H, dtype=dtype, device="cuda")
    ya.backward(g)
    yr.backward(g)
    assert torch.equal(a.grad, r.grad)
    # a context already laid out as (B, L, nH, D), as flash attention returns it: a view, no kernel
    blhd = ctx0.transpose(1, 2).contiguous()
    v = ops.merge_heads(blhd.transpose(1, 2))
    assert v.data_ptr() == blhd.data_ptr() and torch.equal(v, yr)


@pytest.mark.cuda
def test_split_heads_cuda_empty_batch():
    out = ops.split_heads(torch.zeros(0, 5, 3 * 64, device="cuda", dtype=torch.float16),
                          torch.zeros(3 * 64, device="cuda", dtype=torch.float16), 4, 3)
    assert [tuple(o.shape) for o in out] == [(0, 4, 5, 16)] * 3
