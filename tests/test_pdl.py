"""Programmatic dependent launch (lsquant.inference.pdl) of the decode step's Triton kernels.

CPU: when it is on, and that every kernel, compiled for sm_90 with USE_PDL, waits (griddepcontrol.wait) before its
first global load, store or atomic, with the GEMMs' L2 prefetch of their weight rows the only access before it.
CUDA: with PDL (LSQUANT_PDL=1) the kernels and the engines give the same bits as without, eagerly and in CUDA graphs.
"""
from __future__ import annotations

import re

import pytest
import torch

from conftest import compile_in_fresh_process
from lsquant.inference import pdl


def test_off_with_zero_and_never_on_the_cpu(monkeypatch):
    monkeypatch.setenv("LSQUANT_PDL", "0")
    assert not pdl.enabled(torch.device("cuda", 0))
    assert pdl.launch_args(torch.device("cuda", 0)) == {}
    monkeypatch.setenv("LSQUANT_PDL", "1")
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_args(torch.device("cpu")) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))


def test_layernorm_follows_pdl_unless_switched_off(monkeypatch):
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    assert pdl.layernorm(dev)
    monkeypatch.setenv("LSQUANT_PDL_LN", "0")
    assert not pdl.layernorm(dev)
    monkeypatch.delenv("LSQUANT_PDL_LN")
    monkeypatch.setattr(pdl, "enabled", lambda device: False)
    assert not pdl.layernorm(dev)


# every decode-step kernel: (module, kernel, pointer argument types, float arguments, constexprs)
_KERNELS = """
from lsquant.inference import attention, beam_update, embed_step, gemm_triton, path_update, rough_topk
g = gemm_triton._build(False)
epi = dict(HAS_BIAS=True, ACT=1, OUT_KIND=2, HAS_RES=True)
gemm_ptrs = dict(x_ptr="*i8", w_ptr="*i8", out_ptr="*fp16", alpha_ptr="*fp32", bias_ptr="*fp32", inv_ptr="*fp32",
                 res_ptr="*fp16", ws_ptr="*i32", cnt_ptr="*i32", g_ptr="*fp16", beta_ptr="*fp16", xinv_ptr="*fp32",
                 q_ptr="*i8", ln_g_ptr="*fp16", ln_b_ptr="*fp16", ln_qinv_ptr="*fp32", ln_q_ptr="*i8",
                 ln_cnt_ptr="*i32")
th, cand, fin, rank = rough_topk._build(False)
topk_ptrs = dict(x_ptr="*fp16", t_ptr="*i64", lim_ptr="*i64", pmax_ptr="*fp32", pcm_ptr="*fp32", psum_ptr="*fp32",
                 key_ptr="*fp32", tok_ptr="*i32", cnt_ptr="*i32", scores_ptr="*fp32", val_ptr="*fp32",
                 count_ptr="*i32", top_s_ptr="*fp32", top_i_ptr="*i64")
KERNELS = [
    ("tiled", g["tiled"], gemm_ptrs, ("ln_eps",), dict(epi, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1,
     EVEN_K=True, LN_TAIL=False, LN_BLOCK=256, EARLY_EPI=False)),
    ("tiled_early", g["tiled"], gemm_ptrs, ("ln_eps",), dict(epi, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1,
     EVEN_K=True, LN_TAIL=False, LN_BLOCK=256, EARLY_EPI=True)),
    ("splitk", g["splitk"], gemm_ptrs, ("ln_eps",), dict(epi, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=4,
     EVEN_K=True, LN_TAIL=False, LN_BLOCK=256, EARLY_EPI=False)),
    ("splitk_early", g["splitk"], gemm_ptrs, ("ln_eps",), dict(epi, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=4,
     EVEN_K=True, LN_TAIL=False, LN_BLOCK=256, EARLY_EPI=True)),
    ("tiled_ln", g["tiled"], gemm_ptrs, ("ln_eps",), dict(epi, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1,
     EVEN_K=True, LN_TAIL=True, LN_BLOCK=256, EARLY_EPI=False)),
    ("splitk_ln", g["splitk"], gemm_ptrs, ("ln_eps",), dict(epi, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=4,
     EVEN_K=True, LN_TAIL=True, LN_BLOCK=256, EARLY_EPI=False)),
    ("ln_tiled", g["ln_tiled"], dict(gemm_ptrs, x_ptr="*fp16"), ("eps",),
     dict(epi, OUT_KIND=1, HAS_RES=False, WRITE_Q=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, LN_BLOCK=256)),
    ("cross_beams", attention._build(False)[1], dict(q_ptr="*fp16", kv_ptr="*fp16", mask_ptr="*u8", out_ptr="*i8",
     out_inv_ptr="*fp32"), ("sm_scale",), dict(D=64, BLOCK_D=64, BLOCK_B=16, BLOCK_J=16, OUT_INT8=True)),
    ("attention", attention._build(False)[0], dict(q_ptr="*fp16", new_ptr="*fp16", cache_ptr="*i8", anc_ptr="*i32",
     mask_ptr="*u8", t_ptr="*i64", kv_scale_ptr="*fp32", kv_inv_ptr="*fp32", out_ptr="*i8", out_inv_ptr="*fp32"),
     ("sm_scale",), dict(D=64, BLOCK_D=64, BLOCK_J=64, SELF=True, INT8_KV=True, OUT_INT8=True)),
    # cross-attention over int8 K/V (a model with quant_cross_kv), as the engine launches it: per row
    ("cross_int8kv", attention._build(False)[0], dict(q_ptr="*fp16", new_ptr="*fp16", cache_ptr="*i8",
     anc_ptr="*u8", mask_ptr="*u8", t_ptr="*u8", kv_scale_ptr="*fp32", kv_inv_ptr="*fp32", out_ptr="*i8",
     out_inv_ptr="*fp32"), ("sm_scale",), dict(D=64, BLOCK_D=64, BLOCK_J=32, SELF=False, INT8_KV=True, OUT_INT8=True)),
    ("threshold", th, topk_ptrs, (), dict(P=8, C=64, R=16)),
    ("candidates", cand, topk_ptrs, (), dict(K2=8, P=8, C=64, CAP=128, BLOCK=1024)),
    ("finish", fin, topk_ptrs, (), dict(K2=8, P=8, CAP=128, BLOCK=1024)),
    ("rank", rank, topk_ptrs, (), dict(K2=8, BLOCK_KW=4096)),
    ("beam_update", beam_update._build(False), dict(top_s_ptr="*fp32", top_i_ptr="*i64", scores_ptr="*fp32",
     seqs_ptr="*i64", fin_s_ptr="*fp64", fin_tok_ptr="*i64", count_ptr="*i64", norm_ptr="*fp64", t_ptr="*i64",
     rows_ptr="*i64", tokens_ptr="*i64", hist_ptr="*i32", sync_ptr="*i32"), (), dict(K=4, K2=8, KP=4, BLOCK_L=64, HIST=True)),
    ("embed_step", embed_step._build(False), dict(tok_ptr="*i64", rows_ptr="*i8", rscale_ptr="*fp32",
     pos_ptr="*fp16", t_ptr="*i64", out_ptr="*fp16"), ("scale",), dict(INT8=True, BLOCK_H=512)),
    ("path_update", path_update._build(False), dict(x_ptr="*fp16", t_ptr="*i64", lim_ptr="*i64", done_ptr="*i1",
     scores_ptr="*fp32", steps_ptr="*i64", out_ptr="*i64", tokens_ptr="*i64", u_ptr="*fp64", sync_ptr="*i32"),
     ("inv_temp",), dict(SAMPLE=True, TOP_K=4, KP=4, BLOCK=4096)),
]
"""


# the PTX scan, as source: the compile test runs it in a fresh process, the test after it here
_SCAN = r"""
import re


def memory_ops_before(ptx, marker):
    # the global loads, stores, atomics and cp.async copies in the kernel's PTX before marker
    body = ptx[ptx.index(".entry"):]
    head = body[:body.index(marker)]
    return re.findall(r"\b(?:ld|st|atom|red)\.[\w.]*global[\w.]*|\bcp\.async\.c[ag][\w.]*|\bcp\.async\.bulk\.tensor",
                      head)
"""
_scan: dict = {}
exec(_SCAN, _scan)


def test_pdl_kernels_wait_before_their_first_access_sm90():
    """The compiled kernels (sm_90, no GPU needed): with USE_PDL every program runs griddepcontrol.wait, then
    launch_dependents, before any global memory access but the weight prefetch (GEMMs with PREFETCH); without
    USE_PDL (the default) no grid dependency control at all."""
    compile_in_fresh_process(_KERNELS + _SCAN + r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for name, fn, ptrs, floats, const in KERNELS:
    for use in (False, True):
        c = dict(const, USE_PDL=use)
        if name in ("tiled", "tiled_early", "splitk", "splitk_early", "tiled_ln", "splitk_ln", "ln_tiled"):
            c["PREFETCH"] = use
        sig = {a: "constexpr" if a in c else ptrs.get(a, "fp32" if a in floats else "i32") for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=3, enable_fp_fusion=False))
        ptx = k.asm["ptx"]
        assert k.asm["cubin"], name
        if not use:
            assert "griddepcontrol" not in ptx, name
            continue
        wait, launch = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
        assert 0 < wait < launch, name
        early = memory_ops_before(ptx, "griddepcontrol.wait")
        assert not early, (name, early)
        pre = ptx.find("cp.async.bulk.prefetch.L2.global")
        if name in ("tiled", "tiled_early", "splitk", "splitk_early", "tiled_ln", "splitk_ln", "ln_tiled"):
            assert 0 < pre < wait, name       # the weight rows are asked for before the wait
        else:
            assert pre < 0, name
print("compiled")
''')


def test_memory_ops_before_finds_accesses():
    """The PTX scan of the test above finds what it looks for (a scan that finds nothing would pass anything)."""
    ptx = (".entry k(\n{\n\tld.global.b32 {%r1}, [%rd1];\n\tcp.async.cg.shared.global [%r2], [%rd2], 16;\n"
           "\tatom.global.add.u32 %r3, [%rd3], 1;\n\tgriddepcontrol.wait; // dummy\n\tst.global.b32 [%rd4], %r1;\n}")
    scan = _scan["memory_ops_before"]
    assert scan(ptx, "griddepcontrol.wait") == ["ld.global.b32", "cp.async.cg.shared.global",
                                                             "atom.global.add.u32"]
    assert scan(ptx.replace("\tld.global.b32 {%r1}, [%rd1];\n", ""), "griddepcontrol.wait") == [
        "cp.async.cg.shared.global", "atom.global.add.u32"]


# ---- CUDA ------------------------------------------------------------------------------------------------------

def _gemm_inputs(device):
    """Operands for odd decode shapes (weights with 16-byte rows: prefetched, and without), made on the CPU and
    copied once: a copy from pageable memory cannot be captured in a CUDA graph."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = []
    for M, N, K in ((1, 1536, 512), (7, 1000, 1024), (33, 72, 1000), (64, 2048, 512)):
        x = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8).to(device)
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device)
        alpha = (torch.rand(N, generator=gen) * 1e-3).to(device)
        bias = torch.randn(N, generator=gen).to(device)
        inv = torch.tensor([0.5], device=device)
        res = torch.randn(M, N, generator=gen).to(device, torch.float16)
        xf = torch.randn(M, K, generator=gen).to(device, torch.float16)
        g, b = torch.randn(K, generator=gen).to(device, torch.float16), torch.randn(K, generator=gen).to(device, torch.float16)
        x_inv = torch.tensor([127 / 3.0], device=device)
        cases.append((x, w, alpha, bias, inv, res, xf, g, b, x_inv))
    return cases


def _gemm_outputs(cases):
    """The tiled, split-K and fused-LayerNorm kernels, one after another as the engine chains them, int8 and float
    outputs."""
    from lsquant.inference import gemm_triton as GT

    outs = []
    tiled = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3, GROUP_M=1)
    for x, w, alpha, bias, inv, res, xf, g, b, x_inv in cases:
        outs.append(GT.int8_linear_triton(x, w, alpha, bias, 1, torch.int8, inv, tiled))
        outs.append(GT.int8_linear_triton(x, w, alpha, bias, 0, torch.float16, None, tiled, residual=res))
        outs.append(GT.int8_linear_triton(x, w, alpha, bias, 2, torch.float16, None,
                                          GT.splitk_config_dict((16, 32, 256, 4, 3), 4), residual=res))
        outs.append(GT.int8_ln_linear_triton(xf, g, b, 1e-5, x_inv, w, alpha, bias, 1, torch.int8, inv, tiled))
    return outs


@pytest.mark.cuda
def test_gemm_kernels_with_pdl_equal_without(monkeypatch):
    monkeypatch.setenv("LSQUANT_PDL", "0")
    cases = _gemm_inputs("cuda")
    ref = _gemm_outputs(cases)
    monkeypatch.setenv("LSQUANT_PDL", "1")
    assert pdl.enabled(torch.device("cuda", torch.cuda.current_device()))
    got = _gemm_outputs(cases)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), i
    # and replayed from a CUDA graph, the chain of PDL launches captured as programmatic edges
    _replays_equal(lambda: _gemm_outputs(cases), ref)


def _replays_equal(fn, ref):
    """fn (-> list of tensors) captured in a CUDA graph on a side stream, replayed three times: equal to ref."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            static = fn()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(static, ref)):
            assert torch.equal(a, b), i


def test_a_failed_probe_warns_once_and_turns_pdl_off(monkeypatch):
    """Where PDL launches (or their capture) do not work, the first use warns and every launch is an ordinary one."""
    calls = []

    def broken(device):
        calls.append(device)
        raise RuntimeError("CUDA_ERROR_NOT_SUPPORTED")

    monkeypatch.setattr(pdl, "_run_probe", broken)
    monkeypatch.setattr(pdl, "_probed", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.warns(RuntimeWarning, match="failed its probe on cuda:0.*CUDA_ERROR_NOT_SUPPORTED"):
        assert pdl._probe(0) is False
    assert pdl._probe(0) is False and len(calls) == 1       # once per device
    monkeypatch.setattr(pdl, "_run_probe", lambda device: False)
    with pytest.warns(RuntimeWarning, match="a wrong result"):
        assert pdl._probe(1) is False
    monkeypatch.setattr(pdl, "_run_probe", lambda device: True)
    assert pdl._probe(2) is True


def test_probe_kernel_compiles_for_sm90():
    compile_in_fresh_process("""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lsquant.inference import pdl
k = pdl._probe_kernel()
c = triton.compile(ASTSource(k, dict(x_ptr="*fp32", y_ptr="*fp32", n="i32", MUL="constexpr", USE_PDL="constexpr"),
                             constexprs=dict(MUL=2, USE_PDL=True)), target=GPUTarget("cuda", 90, 32))
assert "griddepcontrol.wait" in c.asm["ptx"]
print("compiled")
""")


@pytest.mark.cuda
def test_the_probe_passes_on_hopper(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    assert pdl._run_probe(torch.device("cuda", torch.cuda.current_device()))


# ---- the LayerNorm kernels (CUDA C++, csrc/kernels/layernorm.cu) ---------------------------------------------


def test_layernorm_forward_waits_before_its_first_access_sm90(tmp_path):
    """nvcc's PTX of layernorm.cu for sm_90 (no GPU needed): every forward kernel runs griddepcontrol.wait, then
    launch_dependents, before any global memory access (the clip's load included); the backward kernels, never
    launched with PDL, have neither."""
    import subprocess
    from pathlib import Path

    from lsquant.inference import gemm_cutlass

    nvcc = gemm_cutlass.nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    out = tmp_path / "ln.ptx"
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "--expt-relaxed-constexpr", "-O3", "-ptx",
                        f"-I{csrc}", str(csrc / "kernels" / "layernorm.cu"), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = out.read_text().split(".entry")[1:]
    fwd = [e for e in entries if "ln_fwd_kernel" in e.split("(")[0]]
    assert len(fwd) == 6   # float, half, bfloat16 x (training, int8 output)
    access = re.compile(r"\b(?:ld|st|atom|red)\.(?!param|shared|local|const)[\w.]*|\bcp\.async\.[\w.]*")
    for e in fwd:
        wait, launch = e.find("griddepcontrol.wait"), e.find("griddepcontrol.launch_dependents")
        assert 0 < wait < launch, e[:80]
        assert not access.findall(e[:wait]), (e[:80], access.findall(e[:wait]))
        assert access.findall(e[launch:])   # the scan finds the kernel's accesses after it
    for e in entries:
        if "ln_fwd_kernel" not in e.split("(")[0]:
            assert "griddepcontrol" not in e, e[:80]


@pytest.mark.cuda
def test_layernorm_with_pdl_equals_without(monkeypatch):
    """ops.layer_norm / layer_norm_quant launched with PDL give the same bits as without, eagerly and replayed
    from a CUDA graph in a chain of PDL launches (LayerNorm -> int8 GEMM -> LayerNorm, as in the decode step)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    from lsquant import ops
    from lsquant.inference import Int8Linear

    monkeypatch.setenv("LSQUANT_PDL", "1")
    assert pdl.enabled(torch.device("cuda", torch.cuda.current_device()))
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.float16, torch.bfloat16):
        for rows, H in ((1, 40), (7, 520), (33, 1000)):
            x = torch.randn(rows, H, device="cuda", dtype=dt, generator=g) * 3 + 0.5
            w = torch.randn(H, device="cuda", dtype=dt, generator=g)
            b = torch.randn(H, device="cuda", dtype=dt, generator=g)
            clip = torch.tensor([2.5], device="cuda")
            with torch.no_grad():
                want = (ops.layer_norm(x, w, b, 1e-5), *ops.layer_norm_quant(x, w, b, 1e-5, clip))
                got = (ops.layer_norm(x, w, b, 1e-5, pdl=True), *ops.layer_norm_quant(x, w, b, 1e-5, clip, pdl=True))
            for a, c in zip(got, want):
                assert torch.equal(a, c), (dt, rows, H)
    # the chain, captured
    H, N = 520, 264
    x = torch.randn(9, H, device="cuda", dtype=torch.float16, generator=g)
    w, b = torch.randn(H, device="cuda", dtype=torch.float16), torch.randn(H, device="cuda", dtype=torch.float16)
    clip = torch.tensor([2.0], device="cuda")
    wq = torch.randint(-127, 128, (N, H), device="cuda", dtype=torch.int8, generator=g)
    lin = Int8Linear(wq, w_clip=torch.full((N,), 0.05, device="cuda"), x_clip=clip,
                     bias=torch.randn(N, device="cuda"), out_dtype=torch.float16)
    w2, b2 = torch.randn(N, device="cuda", dtype=torch.float16), torch.randn(N, device="cuda", dtype=torch.float16)

    def chain(use):
        q = ops.layer_norm_quant(x, w, b, 1e-5, clip, float_out=False, pdl=use)[1]
        return ops.layer_norm(lin(q), w2, b2, 1e-5, pdl=use)

    with torch.no_grad():
        ref = chain(False)
        assert torch.equal(chain(True), ref)
        _replays_equal(lambda: [chain(True)], [ref])
