"""lsquant.inference.gemm_cutlass: the CUTLASS sm_90a int8 GEMM (csrc/cutlass/int8_gemm_sm90.cu) as a tuner
candidate. On the CPU: the source compiles for sm_90a (nvcc and the nvidia-cutlass headers), the candidates
appear only where the kernel can run, bad operands are refused before anything is built. On the GPU: its
outputs equal the reference epilogue bit for bit, and the tuner times and checks it."""
from __future__ import annotations

import ctypes

import pytest
import torch

from lsquant.inference import gemm as G
from lsquant.inference import gemm_cutlass as C
from lsquant.inference import gemm_tuner as T


def test_candidates_only_where_the_kernel_runs(monkeypatch):
    monkeypatch.setattr(C, "available", lambda device=None: True)
    names = [G.choice_name(c) for c in T.cutlass_candidates(2048, 1024, 512, torch.bfloat16)]
    assert names == [f"cutlass:{c}" for c in C.CONFIGS]
    for M, N, K, out in ((2048, 1024, 512, torch.int8), (64, 1024, 512, torch.bfloat16),
                         (2048, 1024, 520, torch.float16), (2048, 1020, 512, torch.float16)):
        assert not T.cutlass_candidates(M, N, K, out), (M, N, K, out)
    monkeypatch.setattr(C, "available", lambda device=None: False)
    assert not T.cutlass_candidates(2048, 1024, 512, torch.bfloat16)


def test_unavailable_without_an_sm90_gpu():
    if not torch.cuda.is_available():
        assert not C.available()


@pytest.mark.parametrize("kw,match", [(dict(out_dtype=torch.float32), "bf16 or fp16"),
                                      (dict(act=2), "GELU"), (dict(config=7), "config 7"),
                                      (dict(K=520), "K % 16")])
def test_bad_operands_are_refused_before_any_build(kw, match, monkeypatch):
    monkeypatch.setattr(C, "library", lambda: pytest.fail("built"))
    K = kw.pop("K", 512)
    args = dict(x2=torch.zeros(4, K, dtype=torch.int8), w=torch.zeros(8, K, dtype=torch.int8),
                alpha=torch.ones(8), bias32=None, act=0, out_dtype=torch.bfloat16, config=0) | kw
    with pytest.raises(C.CutlassError, match=match):
        C.int8_gemm_cutlass(**args)


def test_source_compiles_for_sm90a(tmp_path):
    """nvcc builds the library (every config, bf16 / fp16, ReLU or not) for sm_90a, no GPU needed (~1.5 min)."""
    if C.include_dirs() is None or C.nvcc() is None:
        pytest.skip("needs nvcc and the CUTLASS headers (pip install --no-deps nvidia-cutlass)")
    import subprocess

    out = tmp_path / "lib.so"
    r = subprocess.run(C.build_command(str(out)), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(out))
    assert lib.lsq_cutlass_num_configs() == len(C.CONFIGS)


# ---- CUDA ------------------------------------------------------------------------------------------------------

def _layer(N, K, out_dtype, activation, bias, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8)
    w_clip = (torch.rand(N, generator=g) + 0.5) * 0.1
    b = torch.randn(N, generator=g) if bias else None
    return G.Int8Linear(w.to(device), w_clip=w_clip.to(device), x_clip=2.0,
                        bias=b.to(device) if b is not None else None, activation=activation, out_dtype=out_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("config", range(len(C.CONFIGS)))
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(128, 1024, 512), (257, 264, 784), (1000, 3072, 1024)])
def test_equals_the_reference_epilogue_on_cuda(config, out_dtype, M, N, K):
    """Bit for bit: fp32(acc) * alpha + bias, ReLU, one rounding each, on odd M and N (partial tiles)."""
    if not C.available():
        pytest.skip("no sm_90 GPU, nvcc or CUTLASS headers here")
    for activation, bias in (("none", True), ("relu", True), ("none", False)):
        layer = _layer(N, K, out_dtype, activation, bias, "cuda", seed=M + config)
        # the reference's scales are computed on the CPU: equal to the GPU's (lsquant.quant.ref.scale_and_inv
        # divides correctly rounded on both), so this also checks that the engine's scales do not depend on
        # the device
        ref = _layer(N, K, out_dtype, activation, bias, "cpu", seed=M + config)
        x = torch.randint(-127, 128, (M, K), generator=torch.Generator().manual_seed(M), dtype=torch.int8)
        y = G.run_choice(layer, x.cuda(), {"backend": "cutlass", "config": config})
        assert torch.equal(y.cpu(), ref(x)), (C.CONFIGS[config], activation, bias)
    r = torch.randn(M, N).to(out_dtype)
    y = G.run_choice(layer, x.cuda(), {"backend": "cutlass", "config": config}, residual=r.cuda())
    assert torch.equal(y.cpu(), ref(x, residual=r))


@pytest.mark.cuda
def test_the_tuner_times_and_checks_it():
    if not C.available():
        pytest.skip("no sm_90 GPU, nvcc or CUTLASS headers here")
    r = T.tune_shape(2048, 1024, 512, torch.bfloat16, backends=("cutlass",))
    names = [f"cutlass:{c}" for c in C.CONFIGS]
    assert not [n for n in names if n in r.rejected], r.rejected
    assert all(n in r.timings for n in names)


def test_a_failed_build_is_not_retried(monkeypatch, tmp_path):
    """One nvcc failure per process: later calls raise the same error at once (the tuner asks per candidate)."""
    calls = []
    monkeypatch.setattr(C, "_build_error", [])
    monkeypatch.setattr(C, "include_dirs", lambda: [str(tmp_path)])
    monkeypatch.setattr(C, "nvcc", lambda: "/bin/false")
    monkeypatch.setattr(C, "library_path", lambda: tmp_path / "lib.so")
    monkeypatch.setattr(C, "build_command", lambda out: calls.append(out) or ["/bin/false"])
    C.library.cache_clear()
    try:
        for _ in range(3):
            with pytest.raises(C.CutlassError, match="nvcc failed"):
                C.library()
    finally:
        C.library.cache_clear()
    assert len(calls) == 1
    assert not (tmp_path / "lib.so").exists() and not list(tmp_path.glob("*.so"))   # no half-written library
