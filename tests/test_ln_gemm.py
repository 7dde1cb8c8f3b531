"""Int8Linear.ln_call: a pre-LN sublayer's first linear, LayerNorm + quantize in the int8 GEMM's prologue
(lsquant.inference.gemm_triton's ln_tiled kernel), against ops.layer_norm_quant then the GEMM.

The fused kernel sums the LayerNorm's statistics in another order than layernorm.cu (or PyTorch), so its int8 input
may sit one level away where LayerNorm(x) / scale lies within an ulp of a rounding boundary: the tests bound how
often (and by how much), and check the GEMM part bit for bit from the int8 input the kernel says it used."""
from __future__ import annotations

import pytest
import torch

from lsquant import ops
from lsquant.inference import gemm as G
from lsquant.quant.ref import scale_and_inv

from conftest import compile_in_fresh_process

EPS = 1e-5
# the interpreter runs every program one after another: small tiles, two column tiles and a partial K block
INTERP_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}


def _case(M, N, K, x_dtype, out_dtype, activation="none", device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2 + 0.3
    x[:, 0] += 30   # one input per row far out: LayerNorm(x) / scale past 127 (clamped)
    x = x.to(x_dtype)
    ln_w = (1 + 0.1 * torch.randn(K, generator=g)).to(x_dtype)
    ln_b = (0.1 * torch.randn(K, generator=g)).to(x_dtype)
    w = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8)
    w_clip = (torch.rand(N, generator=g) + 0.5) * 0.1
    out_clip = 40.0 if out_dtype == torch.int8 else None
    layer = G.Int8Linear(w.to(device), w_clip=w_clip.to(device), x_clip=3.0,   # LN(x) ~ N(0, 1): some clamped
                         bias=torch.randn(N, generator=g).to(device), activation=activation, out_dtype=out_dtype,
                         out_clip=out_clip)
    res = (torch.randn(M, N, generator=g) * 4).to(device, out_dtype) if out_dtype.is_floating_point else None
    return x.to(device), ln_w.to(device), ln_b.to(device), layer, res


def _check_q(q, q_ref, rate):
    d = (q.int() - q_ref.int()).abs()
    assert int(d.max()) <= 1, "an int8 input more than one level away from LayerNorm-quantize's"
    assert float((d > 0).float().mean()) <= rate, f"{int((d > 0).sum())} of {d.numel()} int8 inputs differ"


def _check_y(y, want, res=None):
    assert y.dtype == want.dtype and y.shape == want.shape
    if y.dtype == torch.bfloat16 and not y.is_cuda:
        # the interpreter rounds to bf16 with numpy: an ulp of the product before the residual's add (which may
        # cancel: an ulp of the residual's size), and one of the sum
        size = want.float().abs() + (res.float().abs() if res is not None else 0)
        assert ((y.float() - want.float()).abs() <= 2 * torch.finfo(torch.bfloat16).eps * size).all()
    else:
        assert torch.equal(y, want)


CASES = [  # x dtype, output dtype, activation, with a residual
    (torch.float32, torch.float32, "none", True), (torch.float16, torch.float16, "none", False),
    (torch.float16, torch.int8, "relu", False), (torch.bfloat16, torch.bfloat16, "none", True)]


@pytest.mark.parametrize("x_dtype,out_dtype,act,with_res", CASES)
@pytest.mark.parametrize("M,N,K", [(1, 40, 40), (7, 33, 200), (17, 64, 96)])
def test_fused_kernel_in_the_interpreter(triton_interpreter, x_dtype, out_dtype, act, with_res, M, N, K):
    x, ln_w, ln_b, layer, res = _case(M, N, K, x_dtype, out_dtype, act)
    res = res if with_res else None
    q = torch.empty(M, K, dtype=torch.int8)
    y = triton_interpreter.int8_ln_linear_triton(x, ln_w, ln_b, EPS, layer.x_inv_t, layer.weight, layer.alpha,
                                                 layer.bias32, G.ACTIVATIONS[act], out_dtype, layer.out_inv_t,
                                                 INTERP_CONFIG, res, q)
    # the interpreter rounds LayerNorm(x) to bf16 with numpy, not as cvt.rn does: a bf16 ulp is 1/3 of an int8
    # step here, so bf16 inputs are held to one level, not to the rate (the cuda test holds bf16 to 0.2%)
    _check_q(q, ops.layer_norm_quant(x, ln_w, ln_b, EPS, layer.x_clip_t, float_out=False)[1],
             0.1 if x_dtype == torch.bfloat16 else 0.01)
    assert int((q.abs() == 127).sum()) >= M and int((q.abs() < 127).sum()) > 0   # clamped and in-range inputs
    _check_y(y, layer(q, residual=res), res)


def test_tile_config_does_not_change_the_values(triton_interpreter):
    """The statistics walk K in chunks set by K alone: two tile configs give the same int8 input and output."""
    x, ln_w, ln_b, layer, _ = _case(5, 40, 200, torch.float32, torch.float32, seed=3)
    ys, qs = [], []
    for cfg in (INTERP_CONFIG, dict(INTERP_CONFIG, BLOCK_M=32, BLOCK_N=16, BLOCK_K=64)):
        qs.append(torch.empty(5, 200, dtype=torch.int8))
        ys.append(triton_interpreter.int8_ln_linear_triton(x, ln_w, ln_b, EPS, layer.x_inv_t, layer.weight,
                                                           layer.alpha, layer.bias32, 0, torch.float32, None, cfg,
                                                           None, qs[-1]))
    assert torch.equal(qs[0], qs[1]) and torch.equal(ys[0], ys[1])


def test_ln_call_on_the_cpu_is_layer_norm_quant_then_the_layer():
    x, ln_w, ln_b, layer, res = _case(5, 24, 48, torch.float32, torch.float32)
    x = x.view(5, 1, 48)
    q = torch.empty(5, 1, 48, dtype=torch.int8)
    y = layer.ln_call(x, ln_w, ln_b, EPS, residual=res.view(5, 1, 24), q_out=q)
    want_q = ops.layer_norm_quant(x, ln_w, ln_b, EPS, layer.x_clip_t, float_out=False)[1]
    assert torch.equal(q, want_q)
    assert torch.equal(y, layer(want_q, residual=res.view(5, 1, 24)))


def test_ln_call_checks_its_input():
    x, ln_w, ln_b, layer, _ = _case(3, 24, 48, torch.float32, torch.float16)
    with pytest.raises(ValueError, match="48"):
        layer.ln_call(x[:, :40], ln_w[:40], ln_b[:40])
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        layer.ln_call(x.to(torch.int32), ln_w, ln_b)
    raw = G.Int8Linear(layer.weight, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="scaled output"):
        raw.ln_call(x, ln_w, ln_b)


def test_ln_fused_follows_the_environment(monkeypatch):
    monkeypatch.delenv("LSQUANT_LN_GEMM", raising=False)
    assert not G.ln_fused()                                   # opt-in
    monkeypatch.setenv("LSQUANT_LN_GEMM", "1")
    from lsquant.inference import gemm_triton
    assert G.ln_fused() == gemm_triton.available()


def test_ln_config_keeps_the_prologue_in_registers():
    """The fused kernel's tiles: the tuned tiled choice if at most 64 x 128 (taller ones spill the prologue's fp32
    tiles, compiled for sm_90), the default up to 64 rows, else the best-ranked tiled config within that bound;
    never a TMA or split-K config (another kernel)."""
    from lsquant.inference import gemm_triton as GT

    layer = G.Int8Linear(torch.zeros(32000, 512, dtype=torch.int8), w_clip=torch.ones(32000), x_clip=1.0,
                         out_dtype=torch.float16)
    assert layer.ln_config(8) == G.DEFAULT_TRITON_CONFIG
    for M in (128, 512, 4096):
        c = layer.ln_config(M)
        assert c.get("KERNEL", "tiled") == "tiled" and c["BLOCK_M"] <= 64 and c["BLOCK_M"] * c["BLOCK_N"] <= 8192, M
    small = GT.config_dict((16, 128, 128, 4, 5, 1))
    layer.choices[8] = {"backend": "triton", "config": small}
    assert layer.ln_config(8) == small
    layer.choices[512] = {"backend": "triton", "config": GT.config_dict((128, 128, 128, 4, 3, 8))}
    assert layer.ln_config(512)["BLOCK_M"] <= 64
    layer.choices[8] = {"backend": "triton", "config": GT.splitk_config_dict((16, 32, 256, 4, 3), 4)}
    assert layer.ln_config(8) == G.DEFAULT_TRITON_CONFIG


def test_fused_kernel_compiles_for_sm90():
    """The compiled path lowers the fused kernel for an H100 (PTX and ptxas, no GPU needed), fp16 and bf16, with
    the default tiled config the engines use; in a fresh process with an empty cache."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lsquant.inference import gemm, gemm_triton
k = gemm_triton._build(False)["ln_tiled"]
c = gemm.DEFAULT_TRITON_CONFIG
for dt, out, kind in (("fp16", "*fp16", 2), ("bf16", "*bf16", 2), ("fp16", "*i8", 1)):
    sig = dict(x_ptr="*" + dt, g_ptr="*" + dt, beta_ptr="*" + dt, xinv_ptr="*fp32", eps="fp32", w_ptr="*i8",
               out_ptr=out, alpha_ptr="*fp32", bias_ptr="*fp32", inv_ptr="*fp32", res_ptr=out, q_ptr="*i8",
               M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32", stride_om="i32", stride_rm="i32",
               HAS_BIAS="constexpr", ACT="constexpr", OUT_KIND="constexpr", HAS_RES="constexpr",
               WRITE_Q="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr",
               LN_BLOCK="constexpr")
    const = dict(HAS_BIAS=True, ACT=1 if kind == 1 else 0, OUT_KIND=kind, HAS_RES=kind == 2, WRITE_Q=False,
                 BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], LN_BLOCK=256)
    ck = triton.compile(ASTSource(k, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"], enable_fp_fusion=False))
    assert ck.asm["cubin"], dt
    # the statistics' divisions are IEEE (as layernorm.cu's), not Triton's default div.full.f32
    assert "div.rn.f32" in ck.asm["ptx"] and "div.full.f32" not in ck.asm["ptx"], dt
print("compiled")
"""
    compile_in_fresh_process(code)


# ---- CUDA ------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 7, 33, 64])
@pytest.mark.parametrize("N,K,out,act", [(1536, 512, "float", "none"), (2048, 512, "int8", "relu"),
                                         (1000, 1000, "float", "none"), (72, 1000, "int8", "relu")])
def test_fused_on_cuda(x_dtype, M, N, K, out, act, monkeypatch):
    """Odd shapes: M from 1 to the fused range's end, K not a multiple of the 256-wide K block, N not one of the
    32-wide column tiles; the residual with float outputs (the engines' attention-output and FFN2 use it)."""
    monkeypatch.setenv("LSQUANT_LN_GEMM", "1")
    assert G.ln_fused()
    out_dtype = x_dtype if out == "float" else torch.int8
    x, ln_w, ln_b, layer, res = _case(M, N, K, x_dtype, out_dtype, act, device="cuda", seed=M)
    x = x.view(M, 1, K)
    res = res.view(M, 1, N) if res is not None else None
    q = torch.empty(M, 1, K, dtype=torch.int8, device="cuda")
    y = layer.ln_call(x, ln_w, ln_b, EPS, residual=res, q_out=q)
    assert "ln_tiled" not in layer._failed
    _check_q(q, ops.layer_norm_quant(x, ln_w, ln_b, EPS, layer.x_clip_t, float_out=False)[1], 2e-3)
    _check_y(y, layer(q, residual=res))


@pytest.mark.cuda
def test_over_the_fused_range_on_cuda_is_the_two_kernels(monkeypatch):
    monkeypatch.setenv("LSQUANT_LN_GEMM", "1")
    M = G.LN_FUSED_MAX_M + 1
    x, ln_w, ln_b, layer, res = _case(M, 512, 512, torch.float16, torch.float16, device="cuda")
    q = torch.empty(M, 512, dtype=torch.int8, device="cuda")
    y = layer.ln_call(x, ln_w, ln_b, EPS, residual=res, q_out=q)
    want_q = ops.layer_norm_quant(x, ln_w, ln_b, EPS, layer.x_clip_t, float_out=False)[1]
    assert torch.equal(q, want_q)
    assert torch.equal(y, layer(want_q, residual=res))


# ---- the LayerNorm after the residual GEMM (Int8Linear.call_ln_next: the tail of the tiled / split-K kernels) ----

TAIL_CONFIGS = {   # two row blocks and several column tiles at the interpreter's sizes; split-K over 3 slices
    "tiled": dict(INTERP_CONFIG, GROUP_M=1),
    "splitk": {"KERNEL": "splitk", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2,
               "SPLIT_K": 3},
}


def _tail_case(M, N, K, dtype, device="cpu", seed=0):
    """A residual linear (K -> N, float output with a residual: the engine's attn_out / fc2) and the next
    sublayer's LayerNorm (N,) and input clip; the residual carries a large mean so LayerNorm's statistics matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8)
    layer = G.Int8Linear(w.to(device), w_clip=((torch.rand(N, generator=g) + 0.5) * 0.02).to(device), x_clip=2.0,
                         bias=torch.randn(N, generator=g).to(device), out_dtype=dtype)
    x = torch.randint(-127, 128, (M, K), generator=g).to(torch.int8).to(device)
    res = (torch.randn(M, N, generator=g) * 3 + 0.5).to(device, dtype)
    ln_w = (1 + 0.1 * torch.randn(N, generator=g)).to(device, dtype)
    ln_b = (0.1 * torch.randn(N, generator=g)).to(device, dtype)
    clip = torch.tensor([1.5], device=device)   # LayerNorm(y) ~ N(0, 1): ~13% of the values clamped
    return layer, x, res, ln_w, ln_b, clip


@pytest.mark.parametrize("kind", ["tiled", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 40, 72), (17, 70, 40), (33, 64, 100)])
def test_tail_kernel_in_the_interpreter(triton_interpreter, kind, dtype, M, N, K):
    """y is the plain kernel's bit for bit; q is LayerNorm-quantize of y but where a value sits within an ulp of a
    rounding boundary (a statistic summed in another order); every row block's counter is back at zero."""
    layer, x, res, ln_w, ln_b, clip = _tail_case(M, N, K, dtype, seed=M)
    cfg = TAIL_CONFIGS[kind]
    inv = scale_and_inv(clip)[1]
    plain = triton_interpreter.int8_linear_triton(x, layer.weight, layer.alpha, layer.bias32, 0, dtype, None, cfg, res)
    q = torch.full((M, N), 99, dtype=torch.int8)
    y = triton_interpreter.int8_linear_triton(x, layer.weight, layer.alpha, layer.bias32, 0, dtype, None, cfg, res,
                                              ln_next=(ln_w, ln_b, EPS, inv, q))
    assert torch.equal(y, plain)
    _check_y(y, layer(x, residual=res), res)
    _check_q(q, ops.layer_norm_quant(y, ln_w, ln_b, EPS, clip, float_out=False)[1], 0.01)
    assert int((q.abs() == 127).sum()) > 0 and int((q.abs() < 127).sum()) > 0
    cnt = triton_interpreter._splitk_ws.get(torch.device("cpu"), 1, 1)[1]
    assert int(cnt.abs().sum()) == 0


def test_tail_kernel_refuses_what_it_cannot_do(triton_interpreter):
    layer, x, res, ln_w, ln_b, clip = _tail_case(3, 40, 72, torch.float32)
    q = torch.empty(3, 40, dtype=torch.int8)
    inv = scale_and_inv(clip)[1]
    with pytest.raises(ValueError, match="float output"):
        triton_interpreter.int8_linear_triton(x, layer.weight, layer.alpha, None, 0, torch.int8, inv,
                                              INTERP_CONFIG, None, ln_next=(ln_w, ln_b, EPS, inv, q))
    with pytest.raises(ValueError, match=r"int8 \(3, 40\)"):
        triton_interpreter.int8_linear_triton(x, layer.weight, layer.alpha, None, 0, torch.float32, None,
                                              INTERP_CONFIG, None, ln_next=(ln_w, ln_b, EPS, inv, q[:2]))


def test_call_ln_next_on_the_cpu_is_the_layer_then_layer_norm_quant(monkeypatch):
    monkeypatch.setenv("LSQUANT_LN_TAIL", "1")
    layer, x, res, ln_w, ln_b, clip = _tail_case(5, 24, 48, torch.float32)
    y, q = layer.call_ln_next(x.view(5, 1, 48), ln_w, ln_b, EPS, clip, residual=res.view(5, 1, 24))
    want = layer(x, residual=res)
    assert torch.equal(y, want.view(5, 1, 24))
    assert torch.equal(q, ops.layer_norm_quant(want, ln_w, ln_b, EPS, clip, float_out=False)[1].view(5, 1, 24))
    int8_out = G.Int8Linear(layer.weight, w_clip=layer.w_clip, x_clip=2.0, out_dtype=torch.int8, out_clip=4.0)
    with pytest.raises(ValueError, match="float output"):
        int8_out.call_ln_next(x, ln_w, ln_b, EPS, clip)


def test_ln_tail_follows_the_environment(monkeypatch):
    monkeypatch.delenv("LSQUANT_LN_TAIL", raising=False)
    assert not G.ln_tail()                                    # opt-in
    monkeypatch.setenv("LSQUANT_LN_TAIL", "1")
    assert G.ln_tail()   # the engine takes the path; call_ln_next runs one kernel where Triton runs on CUDA


def test_tail_config_is_a_tiled_or_split_k_config():
    from lsquant.inference import gemm_triton as GT

    layer = G.Int8Linear(torch.zeros(512, 2048, dtype=torch.int8), w_clip=torch.ones(512), x_clip=1.0,
                         out_dtype=torch.float16)
    assert layer.tail_config(8) == G.DEFAULT_TRITON_CONFIG
    sk = GT.splitk_config_dict((16, 32, 256, 4, 3), 4)
    layer.choices[8] = {"backend": "triton", "config": sk}
    assert layer.tail_config(8) == sk
    layer.choices[8] = {"backend": "cublaslt", "algo": None}
    assert layer.tail_config(8) == G.DEFAULT_TRITON_CONFIG


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["default", "splitk"])
@pytest.mark.parametrize("M,N,K", [(1, 512, 512), (7, 1000, 2048), (33, 1024, 4096), (64, 72, 1000)])
def test_tail_on_cuda(dtype, kind, M, N, K, monkeypatch):
    """Odd shapes up to the tail's row bound, the default tiled config and a split-K one; twice in a row (the
    counters reset themselves) and replayed in a CUDA graph; y bit for bit the plain GEMM's, q LayerNorm-quantize
    of y within the fused contract."""
    from lsquant.inference import gemm_triton as GT
    from lsquant.inference.gemm_tuner import m_bucket

    monkeypatch.setenv("LSQUANT_LN_TAIL", "1")
    assert G.ln_tail()
    layer, x, res, ln_w, ln_b, clip = _tail_case(M, N, K, dtype, device="cuda", seed=M)
    if kind == "splitk":
        layer.choices[m_bucket(M)] = {"backend": "triton", "config": GT.splitk_config_dict((16, 32, 256, 4, 3), 4)}
    inv = scale_and_inv(clip)[1]
    for _ in range(2):
        y, q = layer.call_ln_next(x, ln_w, ln_b, EPS, clip, inv, residual=res)
        assert "ln_tail" not in layer._failed
        assert torch.equal(y, layer(x, residual=res))
        _check_q(q, ops.layer_norm_quant(y, ln_w, ln_b, EPS, clip, float_out=False)[1], 2e-3)
    want_y, want_q = y.clone(), q.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer.call_ln_next(x, ln_w, ln_b, EPS, clip, inv, residual=res)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gy, gq = layer.call_ln_next(x, ln_w, ln_b, EPS, clip, inv, residual=res)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gy, want_y) and torch.equal(gq, want_q)
