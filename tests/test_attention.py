"""The engines' decode-step attention (lsquant.inference.attention): the fused Triton kernel against the
reference ops (in Triton's CPU interpreter here, on the GPU in the cuda tests), the ancestry table against a
physically reordered cache, and the reference against the engine's earlier arithmetic."""
import pytest
import torch

from lsquant import ops
from lsquant.inference import attention as A


def _case(N, nH, D, T, t, R=None, int8=False, dtype=torch.float32, device="cpu", reorder=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = R or N
    H = nH * D
    qkv = (torch.randn(N, 3 * H, generator=g) * 1.5).to(device=device, dtype=dtype)
    kv_clip = torch.tensor([3.0, 2.5]) if int8 else None
    if int8:
        cache = torch.randint(-127, 128, (2, R, nH, T, D), generator=g, dtype=torch.int8)
    else:
        cache = torch.randn(2, R, nH, T, D, generator=g).to(dtype)
    anc = torch.randint(0, N, (R, T), generator=g, dtype=torch.int32) if reorder else \
        torch.arange(R, dtype=torch.int32)[:, None].expand(R, T).contiguous()
    anc[:N, t] = torch.arange(N, dtype=torch.int32)
    tt = torch.tensor([t])
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return qkv, cache.to(device), anc.to(device), tt.to(device), mv(kv_clip)


def _tol(dtype):
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _check_self(device, N, nH, D, T, t, int8, dtype, out_int8=False, reorder=True):
    qkv, cache, anc, tt, kv_clip = _case(N, nH, D, T, t, R=N + 3, int8=int8, dtype=dtype, device=device,
                                         reorder=reorder)
    out_clip = torch.tensor(2.0, device=device) if out_int8 else None
    c_ref, c_ker = cache.clone(), cache.clone()
    ref = A.self_attention_ref(qkv, c_ref, anc, tt, nH, kv_clip, None, out_clip)
    got = A.self_attention(qkv, c_ker, anc, tt, nH, kv_clip, out_clip=out_clip)
    assert torch.equal(c_ker, c_ref), "the new K/V written at position t differ"
    if out_int8:
        # the context is rounded to the engine dtype and quantized: against the fp32 oracle's levels the kernel
        # is off by at most one level and no more often than the reference (which rounds scores and
        # probabilities to the engine dtype too)
        oracle = A.self_attention_ref(qkv.float(), cache.clone() if int8 else cache.float(), anc, tt, nH, kv_clip,
                                      None, out_clip)
        d_got, d_ref = (got.int() - oracle.int()).abs(), (ref.int() - oracle.int()).abs()
        assert d_got.max() <= 1 and (d_got > 0).float().mean() <= (d_ref > 0).float().mean() + 0.01
    else:
        # the oracle: the reference in fp32 (the kernel keeps scores and probabilities in fp32, where the
        # reference rounds them to the engine dtype between its kernels): the kernel is no further from it
        oracle = A.self_attention_ref(qkv.float(), cache.clone() if int8 else cache.float(), anc, tt, nH, kv_clip)
        _no_worse(got, ref, oracle, dtype)


def _no_worse(got, ref, oracle, dtype):
    err_got = (got.float() - oracle).abs().max().item()
    err_ref = (ref.float() - oracle).abs().max().item()
    slack = 8 * torch.finfo(dtype).eps * max(oracle.abs().max().item(), 1.0)   # a few ulps: other sum orders
    assert err_got <= err_ref + slack, (err_got, err_ref, slack)
    torch.testing.assert_close(got.float(), oracle, atol=max(_tol(dtype), 2 * err_ref), rtol=_tol(dtype))


INTERP_SHAPES = [(1, 1, 8, 5, 0), (3, 2, 16, 9, 4), (5, 2, 12, 40, 37)]   # (N, nH, D, T, t): D 12 not a power of 2


@pytest.mark.parametrize("N,nH,D,T,t", INTERP_SHAPES)
@pytest.mark.parametrize("int8", [False, True])
def test_self_attention_kernel_interpreted(triton_interpreter, N, nH, D, T, t, int8):
    _check_self("cpu", N, nH, D, T, t, int8, torch.float32)


def test_self_attention_kernel_interpreted_int8_out(triton_interpreter):
    _check_self("cpu", 4, 2, 16, 20, 17, True, torch.float32, out_int8=True)


def _check_cross(device, B, beams, nH, D, S, dtype, out_int8=False, int8_kv=False):
    """int8_kv: the K/V stored in int8 with per-tensor K and V clips (a model with quant_cross_kv); the oracle
    dequantizes them to fp32."""
    g = torch.Generator().manual_seed(1)
    N, H = B * beams, nH * D
    q = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    kv = torch.randn(2, B, nH, S, D, generator=g).to(device=device, dtype=dtype)
    kv_clip = None
    if int8_kv:
        kv_clip = torch.tensor([3.0, 2.5], device=device)
        kv = ops.quantize(kv, kv_clip, axis=0)
    mask = torch.rand(B, S, generator=g) < 0.3
    mask[0] = True   # a sentence of padding only: zeros
    mask[-1, :] = False
    mask = mask.to(device)
    out_clip = torch.tensor(2.0, device=device) if out_int8 else None
    ref = A.cross_attention_ref(q, kv, mask, beams, out_clip, kv_clip)
    got = A.cross_attention(q, kv, mask, beams, out_clip, kv_clip=kv_clip)
    kv32 = kv if int8_kv else kv.float()
    if out_int8:
        oracle = A.cross_attention_ref(q.float(), kv32, mask, beams, out_clip, kv_clip)
        d_got, d_ref = (got.int() - oracle.int()).abs(), (ref.int() - oracle.int()).abs()
        assert d_got.max() <= 1 and (d_got > 0).float().mean() <= (d_ref > 0).float().mean() + 0.01
    else:
        _no_worse(got, ref, A.cross_attention_ref(q.float(), kv32, mask, beams, kv_clip=kv_clip), dtype)
        if B > 1:
            assert got[:beams].abs().max() == 0


@pytest.mark.parametrize("per_sentence", ["0", "1"])
@pytest.mark.parametrize("B,beams,nH,D,S", [(1, 1, 1, 8, 3), (3, 2, 2, 12, 37), (2, 5, 3, 20, 40), (2, 4, 2, 16, 1)])
def test_cross_attention_kernel_interpreted(triton_interpreter, monkeypatch, per_sentence, B, beams, nH, D, S):
    """The per-row kernel (the default) and, with LSQUANT_CROSS_BEAMS=1, the per-sentence one for beams > 1;
    int8 K/V (always the per-row kernel)."""
    monkeypatch.setenv("LSQUANT_CROSS_BEAMS", per_sentence)
    _check_cross("cpu", B, beams, nH, D, S, torch.float32)
    _check_cross("cpu", B, beams, nH, D, S, torch.float32, int8_kv=True)


def test_cross_attention_int8_kv_needs_its_clips():
    q, kv = torch.randn(2, 8), torch.zeros(2, 1, 2, 3, 4, dtype=torch.int8)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="int8 K/V need their clips"):
        A.cross_attention(q, kv, mask, 2)
    with pytest.raises(ValueError, match="float ones none"):
        A.cross_attention(q, kv.float(), mask, 2, kv_clip=torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("tile", ["1,16", "4,64"])
def test_kernel_tiles_interpreted(triton_interpreter, monkeypatch, tile):
    """Other (warps, keys per block) than the default (2, 32): 16 keys a block walk a 37-key history in three
    blocks, 64 in one; the same values up to the summation order."""
    monkeypatch.setenv("LSQUANT_ATTN_TILE", tile)
    _check_self("cpu", 5, 2, 12, 40, 37, True, torch.float32)
    _check_cross("cpu", 3, 2, 2, 12, 37, torch.float32)


def test_kernel_tile_setting(monkeypatch):
    monkeypatch.delenv("LSQUANT_ATTN_TILE", raising=False)
    assert A.tile() == (2, 32)
    monkeypatch.setenv("LSQUANT_ATTN_TILE", "4,64")
    assert A.tile() == (4, 64)
    monkeypatch.setenv("LSQUANT_ATTN_TILE", "3,64")
    with pytest.raises(ValueError, match="LSQUANT_ATTN_TILE"):
        A.tile()


def test_ancestry_table_equals_reordered_cache():
    """Three steps of beam reorders: attending through anc over a cache that never moves equals the engine's
    earlier scheme (gather the cache rows by parent every step, write position t, attend over 0..t)."""
    g = torch.Generator().manual_seed(3)
    N, nH, D, T = 4, 2, 8, 6
    H = nH * D
    anc = torch.zeros(N, T, dtype=torch.int32)
    cache = torch.zeros(2, N, nH, T, D)
    moved = torch.zeros(2, N, nH, T, D)
    for t in range(4):
        rows = torch.randint(0, N, (N,), generator=g) if t else torch.arange(N)
        anc.copy_(anc.index_select(0, rows))
        anc[:, t] = torch.arange(N, dtype=torch.int32)
        qkv = torch.randn(N, 3 * H, generator=g)
        tt = torch.tensor([t])
        got = A.self_attention_ref(qkv, cache, anc, tt, nH, bucket=T)
        # the earlier scheme
        moved.copy_(moved.index_select(1, rows))
        moved.index_copy_(3, tt, qkv[:, H:].reshape(N, 2, nH, D).permute(1, 0, 2, 3).unsqueeze(3))
        q = qkv[:, :H].reshape(N, nH, 1, D)
        mask = (torch.arange(T) > t).to(torch.uint8).expand(N, T)
        probs = ops.masked_softmax(q @ moved[0].transpose(-1, -2), mask, False, scale=D ** -0.5)
        want = (probs @ moved[1]).reshape(N, H)
        assert torch.equal(got, want)


def test_reference_bucket_does_not_change_values():
    qkv, cache, anc, tt, kv_clip = _case(3, 2, 8, 32, 5, int8=True)
    a = A.self_attention_ref(qkv, cache.clone(), anc, tt, 2, kv_clip, bucket=16)
    b = A.self_attention_ref(qkv, cache.clone(), anc, tt, 2, kv_clip, bucket=32)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ GPU ----

CUDA_SHAPES = [(1, 8, 64, 32, 0), (4, 8, 64, 32, 17), (33, 16, 64, 128, 127), (7, 3, 40, 1025, 1000)]


@pytest.mark.cuda
@pytest.mark.parametrize("N,nH,D,T,t", CUDA_SHAPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_self_attention_kernel_cuda(N, nH, D, T, t, int8, dtype):
    _check_self("cuda", N, nH, D, T, t, int8, dtype)
    _check_self("cuda", N, nH, D, T, t, int8, dtype, reorder=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_self_attention_kernel_cuda_int8_out(dtype):
    _check_self("cuda", 12, 8, 64, 64, 40, True, dtype, out_int8=True)


@pytest.mark.cuda
@pytest.mark.parametrize("per_sentence", ["0", "1"])
@pytest.mark.parametrize("B,beams,nH,D,S", [(1, 4, 8, 64, 16), (9, 4, 16, 64, 97), (3, 1, 3, 40, 1025)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_attention_kernel_cuda(monkeypatch, per_sentence, B, beams, nH, D, S, dtype):
    monkeypatch.setenv("LSQUANT_CROSS_BEAMS", per_sentence)
    _check_cross("cuda", B, beams, nH, D, S, dtype)
    _check_cross("cuda", B, beams, nH, D, S, dtype, out_int8=True)
    _check_cross("cuda", B, beams, nH, D, S, dtype, int8_kv=True)
    _check_cross("cuda", B, beams, nH, D, S, dtype, out_int8=True, int8_kv=True)


@pytest.mark.cuda
@pytest.mark.parametrize("tile", ["1,16", "4,64", "8,128"])
def test_kernel_tiles_cuda(monkeypatch, tile):
    monkeypatch.setenv("LSQUANT_ATTN_TILE", tile)
    _check_self("cuda", 12, 8, 64, 64, 40, True, torch.float16)
    _check_self("cuda", 12, 8, 64, 64, 40, True, torch.float16, out_int8=True)
    _check_cross("cuda", 9, 4, 16, 64, 97, torch.bfloat16)


@pytest.mark.cuda
def test_self_attention_kernel_in_cuda_graph():
    qkv, cache, anc, tt, kv_clip = _case(8, 8, 64, 64, 3, int8=True, dtype=torch.float16, device="cuda")
    A.self_attention(qkv, cache.clone(), anc, tt, 8, kv_clip)   # compile outside the capture
    c, c_ref = cache.clone(), cache.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = A.self_attention(qkv, c, anc, tt, 8, kv_clip)
    for t in (3, 10, 40):
        tt.fill_(t)
        anc[:8, t] = torch.arange(8, dtype=torch.int32, device="cuda")
        g.replay()
        ref = A.self_attention_ref(qkv, c_ref, anc, tt, 8, kv_clip)   # the same writes, step after step
        assert torch.equal(c, c_ref)
        oracle = A.self_attention_ref(qkv.float(), c_ref.clone(), anc, tt, 8, kv_clip)
        _no_worse(out, ref, oracle, torch.float16)


# ------------------------------------------------------------------------------------- step embedding ----

def _embed_case(V, H, N, int8, dtype, device):
    from lsquant.quant.ref import quantize_ref

    g = torch.Generator().manual_seed(5)
    table = torch.randn(V, H, generator=g)
    clip = table.abs().amax(1) * 0.9 if int8 else None
    rows = quantize_ref(table, clip, 0) if int8 else table.to(dtype)
    pos = torch.randn(40, H, generator=g).to(dtype)
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[0] = 1   # the pad id below
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(tokens), mv(rows), mv(clip), mv(pos), torch.tensor([7], device=device), torch.tensor(H ** 0.5)


@pytest.mark.parametrize("int8", [False, True])
def test_embed_step_kernel_interpreted(triton_interpreter, int8):
    from lsquant.inference.embed_step import embed_step, embed_step_ref

    args = _embed_case(50, 24, 5, int8, torch.float32, "cpu")
    want = embed_step_ref(*args, 1, torch.float32)
    got = embed_step(*args, 1, torch.float32)
    assert torch.equal(got, want) and got[0].abs().max() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V,H,N", [(32000, 512, 4), (1000, 1024, 33), (97, 100, 7)])
def test_embed_step_kernel_cuda(int8, dtype, V, H, N):
    from lsquant.inference.embed_step import embed_step, embed_step_ref

    args = _embed_case(V, H, N, int8, dtype, "cuda")
    assert torch.equal(embed_step(*args, 1, dtype), embed_step_ref(*args, 1, dtype))


def test_cross_attention_beams_kernel_interpreted_int8_out(triton_interpreter, monkeypatch):
    """The per-sentence kernel (LSQUANT_CROSS_BEAMS=1, beams > 1) with the int8 context for the output linear."""
    monkeypatch.setenv("LSQUANT_CROSS_BEAMS", "1")
    _check_cross("cpu", 3, 4, 2, 24, 45, torch.float32, out_int8=True)


def test_cross_attention_kernel_choice_follows_the_environment(monkeypatch):
    """Per row by default (measured faster on an H100: bench/NOTES_engine.md, run G); per sentence with
    LSQUANT_CROSS_BEAMS=1, and only for beams > 1."""
    monkeypatch.delenv("LSQUANT_CROSS_BEAMS", raising=False)
    assert not A.per_sentence(4)
    monkeypatch.setenv("LSQUANT_CROSS_BEAMS", "1")
    assert A.per_sentence(4) and not A.per_sentence(1)
