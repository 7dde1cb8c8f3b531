"""int8 GEMM: the CPU reference, the epilogue arithmetic, the tuning cache (CPU), and on a GPU every backend
and every candidate the tuner can choose against the reference (bit-exact for int outputs)."""
from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

from lsquant.inference import gemm as G
from lsquant.inference import gemm_tuner as T
from lsquant.quant import ref as Q

from conftest import compile_in_fresh_process

ODD_M = [1, 3, 17, 100, 1000]
# K and N not multiples of 32 (and some not of 4 or 16: the padding paths)
ODD_NK = [(33, 100), (100, 67), (250, 1000), (1000, 90), (64, 4)]


def rand_i8(*shape, device="cpu", nonzero=False):
    v = torch.randint(-127, 128, shape, dtype=torch.int16)
    if nonzero:
        v = torch.where(v == 0, torch.ones_like(v), v)
    return v.to(torch.int8).to(device)


# ---------------------------------------------------------------- reference GEMM (CPU) ----

@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("N,K", ODD_NK)
def test_ref_gemm_exact_vs_int64(M, N, K):
    a, b = rand_i8(M, K), rand_i8(N, K)
    want = (a.to(torch.int64) @ b.to(torch.int64).t())
    got = G.int8_gemm_ref(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.to(torch.int64), want)


def test_ref_gemm_exact_at_extremes():
    # all +-127: the largest accumulators, |acc| = 16129 * K = 66 million at K = 4096 (past fp32's 2^24)
    K = 4096
    a = torch.full((3, K), 127, dtype=torch.int8)
    b = torch.full((2, K), -127, dtype=torch.int8)
    b[1, ::2] = 127
    got = G.int8_gemm_ref(a, b)
    assert got[0, 0].item() == -16129 * K
    assert got[0, 1].item() == 0
    a[1, 1] = 126  # one unit off: 127 of difference must show despite the 6.6e7 magnitude
    assert G.int8_gemm_ref(a, b)[1, 0].item() == -16129 * K + 127


def test_ref_gemm_rejects_bad_operands():
    with pytest.raises(TypeError):
        G.int8_gemm_ref(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError):
        G.int8_gemm_ref(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8))


# ---------------------------------------------------------------- epilogue math (CPU) ----

def test_alpha_uses_project_scales():
    x_clip = torch.tensor(2.5)
    w_clip = torch.tensor([0.5, 1.0, 3.0])
    alpha = G.gemm_alpha(x_clip, w_clip)
    xs, _ = Q.scale_and_inv(x_clip)
    ws, _ = Q.scale_and_inv(w_clip)
    assert alpha.dtype == torch.float32
    assert torch.equal(alpha, (xs * ws).float())


def test_epilogue_order_and_rounding():
    acc = torch.tensor([[3, -5, 1000, 0]], dtype=torch.int32)
    alpha = torch.tensor([0.1, 0.25, 1e-3, 1.0])
    bias = torch.tensor([1.0, 0.5, -2.0, -0.25])
    y = G.epilogue_ref(acc, alpha, bias, "none", torch.float32)
    # fp32(acc) * alpha, rounded, then + bias, rounded: written out with explicit fp32 tensors
    want = (acc.float() * alpha) + bias
    assert torch.equal(y, want)
    assert y[0, 1].item() == -0.75
    yr = G.epilogue_ref(acc, alpha, bias, "relu", torch.float32)
    assert torch.equal(yr, torch.relu(want))
    yg = G.epilogue_ref(acc, alpha, bias, "gelu", torch.float32)
    assert torch.allclose(yg, torch.nn.functional.gelu(want))
    yb = G.epilogue_ref(acc, alpha, bias, "none", torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, want.to(torch.bfloat16))


def test_epilogue_requantize_matches_quantize_ref():
    torch.manual_seed(1)
    acc = torch.randint(-50000, 50000, (7, 13), dtype=torch.int32)
    alpha = torch.rand(13) * 1e-3
    bias = torch.randn(13)
    clip = torch.tensor(3.0)
    q = G.epilogue_ref(acc, alpha, bias, "relu", torch.int8, clip)
    v = torch.relu(acc.float() * alpha + bias)
    assert torch.equal(q, Q.quantize_ref(v, clip))
    assert q.dtype == torch.int8 and q.min() >= -127 and q.max() <= 127


def test_epilogue_requantize_half_to_even_and_clamp():
    # out_clip 127 -> scale 1, inv 1: v = acc * 0.5 lands exactly on halves
    acc = torch.tensor([[1, 3, 5, -1, -3, 1000, -1000]], dtype=torch.int32)
    alpha = torch.full((7,), 0.5)
    q = G.epilogue_ref(acc, alpha, None, "none", torch.int8, 127.0)
    assert q.tolist() == [[0, 2, 2, 0, -2, 127, -127]]


def test_epilogue_arg_checks():
    acc = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="out_clip"):
        G.epilogue_ref(acc, torch.ones(2), None, "none", torch.int8)
    with pytest.raises(ValueError, match="activation"):
        G.epilogue_ref(acc, torch.ones(2), None, "swish", torch.float32)
    with pytest.raises(ValueError, match="int32"):
        G.epilogue_ref(acc, torch.ones(2), None, "relu", torch.int32)


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int8, torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_cpu_path(out_dtype):
    x = rand_i8(2, 5, 24)
    w = rand_i8(10, 24)
    w_clip = torch.rand(10) + 0.1
    bias = torch.randn(10)
    kw = {} if out_dtype == torch.int32 else dict(x_clip=1.5, w_clip=w_clip, bias=bias, activation="relu")
    out_clip = 4.0 if out_dtype == torch.int8 else None
    y = G.int8_linear(x, w, out_dtype=out_dtype, out_clip=out_clip, **kw)
    assert y.shape == (2, 5, 10) and y.dtype == out_dtype
    acc = (x.reshape(10, 24).long() @ w.long().t()).to(torch.int32)
    if out_dtype == torch.int32:
        assert torch.equal(y.reshape(10, 10), acc)
    else:
        want = G.epilogue_ref(acc, G.gemm_alpha(torch.tensor(1.5), w_clip), bias, "relu", out_dtype, out_clip)
        assert torch.equal(y.reshape(10, 10), want)


def test_int8_mm_cpu_and_layer_checks():
    a, b = rand_i8(3, 7), rand_i8(5, 7)
    assert torch.equal(G.int8_mm(a, b).long(), a.long() @ b.long().t())
    layer = G.Int8Linear(b, w_clip=torch.ones(5), x_clip=1.0)
    with pytest.raises(TypeError):
        layer(a.float())
    with pytest.raises(ValueError, match="features"):
        layer(rand_i8(3, 8))
    with pytest.raises(ValueError, match="x_clip"):
        G.Int8Linear(b)  # scaled output without clips
    with pytest.raises(ValueError, match="output channels"):
        G.Int8Linear(b, w_clip=torch.ones(4), x_clip=1.0)


def test_model_shapes_and_buckets():
    s = T.model_shapes(1024, 4096, 32000, 16)
    assert s == [("qkv", 3072, 1024), ("attn_out", 1024, 1024), ("ffn1", 4096, 1024), ("ffn2", 1024, 4096),
                 ("vocab", 32000, 1024)]
    with pytest.raises(ValueError):
        T.model_shapes(1000, heads=16)
    assert [T.m_bucket(m) for m in (0, 1, 2, 3, 17, 1000, 1024, 1025)] == [1, 1, 2, 4, 32, 1024, 1024, 2048]


# ---------------------------------------------------------------- tuning cache (CPU) ----

ENV = "NVIDIA H100 80GB HBM3|cuda13.0|cublasLt130002|triton3.6.0"
TRITON_CHOICE = {"backend": "triton", "config": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128,
                                                 "num_warps": 8, "num_stages": 3, "GROUP_M": 8}}
LT_CHOICE = {"backend": "cublaslt", "algo": [66, 20, 16, 1, 0, 0, 0, 0, 0]}


def test_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "tune.json"
    c = T.TuningCache(path, env=ENV)
    assert c.lookup(512, 4096, 1024, torch.bfloat16) is None  # missing file: default, silently
    c.put(512, 4096, 1024, torch.bfloat16, TRITON_CHOICE, ms=0.05)
    c.put(8, 1024, 4096, torch.int8, LT_CHOICE)
    c.save()
    c2 = T.TuningCache(path, env=ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c2.lookup(512, 4096, 1024, torch.bfloat16) == TRITON_CHOICE
        assert c2.lookup(300, 4096, 1024, torch.bfloat16) == TRITON_CHOICE  # same bucket (512)
        assert c2.lookup(5, 1024, 4096, torch.int8) == LT_CHOICE  # bucket 8
        assert c2.lookup(5, 1024, 4096, torch.int8, nearest=False) == LT_CHOICE
        assert c2.lookup(64, 1024, 4096, torch.int8, nearest=False) is None
        assert c2.lookup(64, 1024, 4096, torch.int8) == LT_CHOICE  # nearest tuned bucket
        assert c2.lookup(512, 4096, 1024, torch.float16) is None  # other output type
    data = json.loads(path.read_text())
    assert data["version"] == T.CACHE_VERSION and ENV in data["envs"]


def test_cache_save_merges_with_other_writers(tmp_path):
    path = tmp_path / "tune.json"
    a, b = T.TuningCache(path, env=ENV), T.TuningCache(path, env=ENV)
    a.load(), b.load()
    a.put(512, 4096, 1024, torch.bfloat16, TRITON_CHOICE)
    a.save()
    b.put(8, 1024, 4096, torch.int8, LT_CHOICE)
    b.save()  # must not drop a's entry
    c = T.TuningCache(path, env=ENV)
    assert c.lookup(512, 4096, 1024, torch.bfloat16, nearest=False) == TRITON_CHOICE
    assert c.lookup(8, 1024, 4096, torch.int8, nearest=False) == LT_CHOICE


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 999, "envs": {}}', "",
                                     '{"version": 1, "envs": {}}'])
def test_cache_corrupt_gives_warning_and_default(tmp_path, content):
    path = tmp_path / "tune.json"
    path.write_text(content)
    c = T.TuningCache(path, env=ENV)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert c.lookup(512, 4096, 1024, torch.bfloat16) is None
    # and it can be rebuilt over the corrupt file
    c.put(512, 4096, 1024, torch.bfloat16, TRITON_CHOICE)
    c.save()
    assert T.TuningCache(path, env=ENV).lookup(512, 4096, 1024, torch.bfloat16) == TRITON_CHOICE


def test_cache_malformed_entry_gives_default(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"version": T.CACHE_VERSION, "envs": {ENV: {
        T.entry_key(torch.bfloat16, 4096, 1024, 512): {"choice": "cublaslt"}}}}))
    with pytest.warns(RuntimeWarning, match="malformed"):
        assert T.TuningCache(path, env=ENV).lookup(512, 4096, 1024, torch.bfloat16) is None


def test_cache_other_gpu_is_stale(tmp_path):
    path = tmp_path / "tune.json"
    c = T.TuningCache(path, env=ENV)
    c.put(512, 4096, 1024, torch.bfloat16, TRITON_CHOICE)
    c.save()
    other = T.TuningCache(path, env="NVIDIA A100-SXM4-80GB|cuda13.0|cublasLt130002|triton3.6.0")
    with pytest.warns(RuntimeWarning, match="stale"):
        assert other.lookup(512, 4096, 1024, torch.bfloat16) is None
    newer = T.TuningCache(path, env=ENV.replace("cublasLt130002", "cublasLt130100"))
    with pytest.warns(RuntimeWarning, match="stale"):
        assert newer.lookup(512, 4096, 1024, torch.bfloat16) is None


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    c = T.TuningCache(path, env=ENV)
    c.put(512, 4096, 1024, torch.bfloat16, TRITON_CHOICE)
    c.save()
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    c.put(8, 1024, 4096, torch.int8, LT_CHOICE)
    monkeypatch.setattr(T.json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        c.save()
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["tune.json"]  # and no temporary file is left behind


def test_layer_uses_cache_on_cpu_without_lookup(tmp_path):
    # CPU tensors always take the reference path: a corrupt cache cannot matter there
    (tmp_path / "t.json").write_text("garbage")
    layer = G.Int8Linear(rand_i8(6, 8), w_clip=torch.ones(6), x_clip=1.0,
                         cache=T.TuningCache(tmp_path / "t.json", env=ENV))
    y = layer(rand_i8(3, 8))
    assert y.shape == (3, 6) and y.dtype == torch.bfloat16


def test_choice_names():
    assert G.choice_name(G.default_choice()) == "cublaslt:default"
    assert G.choice_name(LT_CHOICE) == "cublaslt:a66-t20-s16-k1"
    assert G.choice_name(TRITON_CHOICE) == "triton:128x256x128-w8-s3-g8"
    assert G.choice_name({"backend": "dequant"}) == "dequant"


def test_cli_tune_registered():
    from lsquant import cli

    assert cli._cmd_tune in cli.COMMANDS
    with pytest.raises(SystemExit) as e:
        cli.main(["tune", "--help"])
    assert e.value.code == 0


# ---------------------------------------------------------------- GPU ----

def _cuda_layer(N, K, out_dtype, activation="none", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8).cuda()
    if out_dtype == torch.int32:
        return G.Int8Linear(w, out_dtype=torch.int32)
    w_clip = (torch.rand(N, generator=g) + 0.5).cuda() * 0.1
    b = torch.randn(N, generator=g).cuda() if bias else None
    sigma = math.sqrt(K) / 3 * 2.0 * 0.1
    out_clip = 3 * sigma + 1 if out_dtype == torch.int8 else None
    return G.Int8Linear(w, w_clip=w_clip, x_clip=2.0, bias=b, activation=activation, out_dtype=out_dtype,
                        out_clip=out_clip)


def _ref(layer, x):
    acc = G.int8_gemm_ref(x.cpu(), layer.weight.cpu())
    return G.epilogue_ref(acc, None if layer.alpha is None else layer.alpha.cpu(),
                          None if layer.bias32 is None else layer.bias32.cpu(), layer.activation, layer.out_dtype,
                          None if layer.out_clip_t is None else layer.out_clip_t.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("N,K", ODD_NK + [(1024, 4096)])
def test_cuda_int32_bit_exact(M, N, K):
    a, b = rand_i8(M, K, device="cuda"), rand_i8(N, K, device="cuda")
    got = G.int8_mm(a, b)
    assert got.dtype == torch.int32 and got.shape == (M, N)
    assert torch.equal(got.cpu(), G.int8_gemm_ref(a.cpu(), b.cpu()))
    if M > 16 and K % 8 == 0 and N % 8 == 0:  # torch._int_mm's own restrictions
        assert torch.equal(got, torch._int_mm(a, b.t().contiguous()))


@pytest.mark.cuda
def test_cuda_unaligned_views():
    # a view starting 1 byte into its storage is not 16-byte aligned: it must be copied, not fail
    base = rand_i8(33, 129, device="cuda")
    a = base[1:, 1:]
    b = rand_i8(40, 128, device="cuda")
    assert torch.equal(G.int8_mm(a, b).cpu(), G.int8_gemm_ref(a.cpu(), b.cpu()))


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("M,N,K", [(1, 33, 100), (17, 250, 1000), (100, 1000, 90), (1000, 1536, 512)])
def test_cuda_default_epilogue(out_dtype, activation, M, N, K):
    layer = _cuda_layer(N, K, out_dtype, activation)
    x = rand_i8(M, K, device="cuda")
    y = layer(x, choice=G.default_choice()).cpu()
    want = _ref(layer, x)
    ok, detail = T.check_output(y, want, out_dtype, activation,
                                float_tol=2 * torch.finfo(out_dtype).eps * want.float().abs().max().item()
                                if out_dtype.is_floating_point else 0.0)
    assert ok, detail
    if out_dtype == torch.int8 and activation != "gelu":
        assert torch.equal(y, want)


def _all_candidates(M, N, K, out_dtype):
    return T.candidates(M, N, K, out_dtype)  # the tuner's own list, with its own limits


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int8, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(3, 100, 67), (100, 1000, 250), (1000, 3072, 1024)])
def test_cuda_every_candidate_verified(out_dtype, M, N, K):
    """Every kernel the tuner may choose, run directly and compared with the CPU reference; every backend
    must contribute at least one working candidate (no silently empty family)."""
    layer = _cuda_layer(N, K, out_dtype, "relu" if out_dtype != torch.int32 else "none")
    x = rand_i8(M, K, device="cuda", nonzero=True)
    want = _ref(layer, x)
    # the yardstick of float outputs: PyTorch's own fp16/bf16 GEMM on dequantized operands
    if out_dtype.is_floating_point:
        torch_err = (G.run_choice(layer, x, {"backend": "dequant"}).cpu().float() - want.float()).abs().max().item()
        tol = max(2 * torch_err, 4 * torch.finfo(out_dtype).eps * want.float().abs().max().item())
    else:
        tol = 0.0
    families, failures = set(), []
    for cand in _all_candidates(M, N, K, out_dtype):
        y = G.run_choice(layer, x, cand).cpu()
        ok, detail = T.check_output(y, want, out_dtype, layer.activation, tol)
        if not ok:
            failures.append((G.choice_name(cand), detail))
        families.add(cand["backend"])
    assert not failures, failures
    assert "cublaslt" in families
    from lsquant.inference import gemm_triton

    if gemm_triton.available():
        assert "triton" in families


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_cuda_triton_epilogues(out_dtype):
    from lsquant.inference import gemm_triton

    if not gemm_triton.available():
        pytest.fail("Triton is expected on the GPU machine")
    for activation in ("none", "relu", "gelu"):
        layer = _cuda_layer(200, 300, out_dtype, activation)
        x = rand_i8(77, 300, device="cuda")
        want = _ref(layer, x)
        for cfg in gemm_triton.candidate_configs(77, 200, 300, limit=2):
            y = G.run_choice(layer, x, {"backend": "triton", "config": cfg}).cpu()
            if out_dtype == torch.int8 and activation != "gelu":
                assert torch.equal(y, want), (cfg, activation)
            else:
                tol = 2 * torch.finfo(out_dtype).eps * want.float().abs().max().item() if out_dtype.is_floating_point \
                    else 0
                ok, detail = T.check_output(y, want, out_dtype, activation, tol)
                assert ok, (cfg, activation, detail)


@pytest.mark.cuda
def test_cuda_tuning_leaves_no_memory_behind():
    """Tuning more shapes keeps no more memory: PyTorch keeps a cuBLAS workspace (32 MiB on Hopper) for every stream
    that ran a cuBLAS call (the dequantize candidate does), so timings that warmed up on a new stream each left
    one behind for good (a tuned engine left ~300 MB)."""
    import gc

    T.tune_shape(64, 512, 512, torch.float16)  # the first tuning sets up what is kept on purpose (workspaces)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for N in (768, 1024, 1536):
        T.tune_shape(64, N, 512, torch.float16)
    gc.collect()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown < 16 << 20, f"tuning three more shapes left {grown >> 20} MiB allocated"


@pytest.mark.cuda
def test_cuda_tune_and_cache_round_trip(tmp_path):
    cache = T.TuningCache(tmp_path / "tune.json")
    r = T.tune_shape(100, 1000, 250, torch.bfloat16, "gelu")
    assert r.ms > 0 and r.name in r.timings and not math.isnan(r.default_ms)
    cache.put(100, 1000, 250, torch.bfloat16, r.choice, ms=r.ms)
    cache.save()
    fresh = T.TuningCache(tmp_path / "tune.json")
    assert fresh.lookup(100, 1000, 250, torch.bfloat16) == r.choice
    layer = _cuda_layer(1000, 250, torch.bfloat16, "gelu")
    layer.cache = fresh
    x = rand_i8(100, 250, device="cuda")
    y = layer(x)
    assert layer.choices[128] == r.choice
    want = _ref(layer, x)
    assert (y.cpu().float() - want.float()).abs().max().item() <= 0.05 * want.float().abs().max().item()


@pytest.mark.cuda
def test_cuda_broken_cached_kernel_falls_back(tmp_path):
    layer = _cuda_layer(64, 128, torch.int8)
    bad = {"backend": "cublaslt", "algo": [99999, 0, 0, 1, 0, 0, 0, 0, 0]}
    layer.choices[T.m_bucket(5)] = bad
    x = rand_i8(5, 128, device="cuda")
    with pytest.warns(RuntimeWarning, match="failed"):
        y = layer(x)
    assert torch.equal(y.cpu(), _ref(layer, x))
    # the next kernel of the chain: the default of M (the Triton kernel for M <= 64 where Triton is there)
    assert layer.choices[T.m_bucket(5)] == G.default_choice(5)
    for M in (5, 100):  # a broken cached kernel above M = 64 falls back to the cuBLASLt default
        layer.choices[T.m_bucket(M)] = bad
        x = rand_i8(M, 128, device="cuda")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="lsquant int8 GEMM")  # warned once per kernel name already
            y = layer(x)
        assert torch.equal(y.cpu(), _ref(layer, x))
        assert layer.choices[T.m_bucket(M)] == G.default_choice(M)


def test_tuner_keeps_fastest_verified_candidate(monkeypatch):
    """The selection logic on the CPU with stand-in kernels: a wrong output, a crash and a slow kernel are
    rejected or lose; the fastest correct one wins; the default is always timed."""
    prob = T.Problem(40, 24, 64, torch.int8, "relu", True, n_sets=2, device="cpu")

    def fake_run(layer, x, choice, residual=None):
        kind = choice.get("fake")
        if kind == "crash":
            raise RuntimeError("kernel launch failed")
        y = layer(x, residual=residual)  # the CPU reference path
        if kind == "wrong":
            y = y.clone()
            y[0, 0] = y[0, 0] + 1 if y[0, 0] < 127 else y[0, 0] - 1
        return y

    speeds = {"cublaslt:default": 3.0, "fast-but-wrong": 0.1, "crash": 0.1, "slow": 9.0, "fast": 1.0}
    cands = [G.default_choice(), {"backend": "wrong", "fake": "wrong"}, {"backend": "crash", "fake": "crash"},
             {"backend": "slow", "fake": "slow"}, {"backend": "fast", "fake": "fast"}]
    names = {"wrong": "fast-but-wrong", "crash": "crash", "slow": "slow", "fast": "fast"}

    from lsquant.inference import gemm_triton

    monkeypatch.setattr(gemm_triton, "available", lambda: False)  # the default: cuBLASLt's, on any machine
    monkeypatch.setattr(T, "candidates", lambda *a, **k: cands)
    monkeypatch.setattr(T, "run_choice", fake_run)
    monkeypatch.setattr(T, "choice_name", lambda c: names.get(c["backend"], G.choice_name(c)))
    monkeypatch.setattr(T, "time_fn", lambda fn, args, **k: speeds[T.choice_name(args[0][2])])
    r = T.tune_shape(40, 24, 64, torch.int8, "relu", problem=prob)
    assert r.name == "fast" and r.choice["fake"] == "fast"
    assert r.ms == 1.0 and r.default_ms == 3.0 and r.speedup_vs_default == 3.0
    assert "fast-but-wrong" in r.rejected and "wrong output" in r.rejected["fast-but-wrong"]
    assert "crash" in r.rejected and "kernel launch failed" in r.rejected["crash"]
    assert "slow" in r.timings


def test_tuner_verifies_and_times_with_the_residual(monkeypatch):
    """has_residual: every candidate runs with the problem's residual (a kernel that drops it is rejected as
    wrong), is timed with it, and the reference includes it; only float outputs take one."""
    prob = T.Problem(24, 40, 64, torch.float32, "relu", True, n_sets=2, device="cpu", has_residual=True)
    assert all(r is not None and r.shape == (24, 40) and r.dtype == torch.float32 for r in prob.residuals)
    layer, x, r = prob.layers[0], prob.xs[0], prob.residuals[0]
    assert torch.equal(prob.reference(0), layer(x, residual=r))
    seen = []

    def fake_run(layer, x, choice, residual=None):
        seen.append(residual is not None)
        return layer(x, residual=None if choice.get("fake") == "drops" else residual)

    cands = [G.default_choice(), {"backend": "drops", "fake": "drops"}, {"backend": "keeps", "fake": "keeps"}]
    names = {"drops": "drops", "keeps": "keeps"}
    timed = []
    from lsquant.inference import gemm_triton

    monkeypatch.setattr(gemm_triton, "available", lambda: False)
    monkeypatch.setattr(T, "candidates", lambda *a, **k: cands)
    monkeypatch.setattr(T, "run_choice", fake_run)
    monkeypatch.setattr(T, "choice_name", lambda c: names.get(c["backend"], G.choice_name(c)))
    monkeypatch.setattr(T, "time_fn", lambda fn, args, **k: timed.append(all(a[3] is not None for a in args))
                        or {"keeps": 1.0}.get(T.choice_name(args[0][2]), 2.0))
    res = T.tune_shape(24, 40, 64, torch.float32, "relu", problem=prob)
    assert res.name == "keeps" and "drops" in res.rejected and "wrong output" in res.rejected["drops"]
    assert all(seen) and timed and all(timed)
    with pytest.raises(ValueError, match="float output"):
        T.Problem(8, 16, 32, torch.int8, n_sets=1, device="cpu", has_residual=True)


def test_problem_reference_is_exact_cpu():
    prob = T.Problem(17, 30, 100, torch.int32, n_sets=2, device="cpu")
    for i in range(2):
        want = prob.xs[i].long() @ prob.layers[i].weight.long().t()
        assert torch.equal(prob.reference(i).long(), want)
        assert (prob.xs[i] != 0).all()  # non-zero inputs: a dropped K tile always shows


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.int8, torch.bfloat16])
def test_cuda_chunked_cublaslt_exact(out_dtype):
    """The L2-resident variant (row chunks through one int32 buffer), forced to small chunks with a partial
    last one, equals the unchunked kernel bit for bit."""
    layer = _cuda_layer(300, 200, out_dtype, "relu")
    x = rand_i8(1000, 200, device="cuda")
    whole = G.run_choice(layer, x, G.default_choice())
    for chunk in (128, 384):
        y = G.run_choice(layer, x, {"backend": "cublaslt", "algo": None, "chunk_m": chunk})
        assert torch.equal(y, whole), chunk
    if out_dtype == torch.int8:
        assert torch.equal(whole.cpu(), _ref(layer, x))
    assert T.chunked_candidates(8192, 4096, [])  # offered where the accumulator exceeds 24 MB
    assert not T.chunked_candidates(512, 1024, [])


class _FakeExt:
    """Stands in for the CUDA extension on the CPU with the bindings' contracts (shapes, in-place int32 out,
    the epilogue's optional out), so the Python plumbing of the cuBLASLt path (K/N padding, row chunks,
    argument order) is tested without a GPU. Checks what csrc/bindings.cpp and the launcher check."""

    def __init__(self):
        self.calls = []

    def gemm_int8_i32(self, a, b, out, algo, workspace):
        assert a.dtype == b.dtype == torch.int8 and out.dtype == torch.int32
        assert a.is_contiguous() and b.is_contiguous() and out.is_contiguous()
        assert a.shape[1] == b.shape[1] and a.shape[1] % 4 == 0 and out.shape[1] % 4 == 0
        assert out.shape[0] == a.shape[0] and out.shape[1] >= b.shape[0]
        assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
        self.calls.append(("gemm", a.shape[0], list(algo)))
        out[:, :b.shape[0]] = G.int8_gemm_ref(a, b)

    def gemm_int8_algos(self, M, N, K, ldc, workspace_bytes, max_algos, enumerate_):
        return [[1] * 11]  # one algorithm, id 1

    def gemm_int8_epilogue(self, acc, N, alpha, bias, act, dtype, out_clip, out=None):
        assert acc.is_contiguous() and acc.shape[1] >= N and alpha.numel() == N
        y = G.epilogue_ref(acc[:, :N], alpha, bias, ["none", "relu", "gelu"][act], dtype, out_clip)
        self.calls.append(("epilogue", acc.shape[0], out is not None))
        if out is not None:
            assert out.is_contiguous() and out.shape == y.shape and out.dtype == dtype
            out.copy_(y)
            return out
        return y


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int8, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 33, 100), (300, 70, 67), (1000, 64, 32)])
def test_cublaslt_path_plumbing_cpu(monkeypatch, out_dtype, M, N, K):
    import importlib

    build = importlib.import_module("lsquant.ops.build")  # (lsquant.ops.build is also a function's name)
    fake = _FakeExt()
    monkeypatch.setattr(build, "load", lambda *a, **k: fake)
    monkeypatch.setattr(G, "_workspace", lambda device: torch.empty(16, dtype=torch.uint8))
    w = rand_i8(N, K)
    kw = {} if out_dtype == torch.int32 else dict(w_clip=torch.rand(N) + 0.1, x_clip=3.0, bias=torch.randn(N),
                                                  activation="relu")
    layer = G.Int8Linear(w, out_dtype=out_dtype, out_clip=5.0 if out_dtype == torch.int8 else None, **kw)
    x = rand_i8(M, K)
    want = layer(x)  # CPU tensors: the reference path
    assert layer.w_padded().shape == (G._round_up(N, 4), G._round_up(K, 16))
    for choice in ({"backend": "cublaslt", "algo": None}, {"backend": "cublaslt", "algo": [1] * 9, "chunk_m": 128}):
        fake.calls.clear()
        y = G.run_choice(layer, x, choice)
        assert torch.equal(y, want), choice
        n_gemm = sum(c[0] == "gemm" for c in fake.calls)
        chunked = choice.get("chunk_m") and M > 128 and out_dtype != torch.int32
        assert n_gemm == (-(-M // 128) if chunked else 1)
        if choice.get("algo"):
            assert all(c[2] == [1] * 9 for c in fake.calls if c[0] == "gemm")


def test_cublaslt_refuses_an_algorithm_id_it_does_not_offer(monkeypatch):
    """A stale cache entry's algorithm id is refused in Python (cuBLASLt segfaulted on one) and Int8Linear
    falls back to the default kernel with a warning."""
    import importlib

    build = importlib.import_module("lsquant.ops.build")
    fake = _FakeExt()
    monkeypatch.setattr(build, "load", lambda *a, **k: fake)
    monkeypatch.setattr(G, "_workspace", lambda device: torch.empty(16, dtype=torch.uint8))
    monkeypatch.setattr(G, "_ALGO_IDS", {})
    w, x = rand_i8(64, 128), rand_i8(5, 128)
    with pytest.raises(ValueError, match="id 99999 is not offered"):
        G.cublaslt_i32(x, G.Int8Linear(w, out_dtype=torch.int32).w_padded(), [99999] + [0] * 8)
    assert not any(c[0] == "gemm" for c in fake.calls)


# ---------------------------------------------------------------- Triton kernels, interpreted (CPU) ----
# Triton's CPU interpreter (TRITON_INTERPRET=1) runs the same kernel source, TMA descriptors included (it
# zero-fills loads and clips stores past the tensor as TMA does). It says nothing of warp specialization,
# pipelining or atomics' memory order (programs run one after another): the cuda tests below cover those.
# Its bf16 conversion is numpy's, not the GPU's cvt.rn, so bf16 outputs are held to 1 ulp here and to bit
# equality with the tiled kernel on the GPU.

# the triton_interpreter fixture is in conftest.py


# small tiles keep the interpreter fast; each kind of kernel, TMA with both epilogue forms
INTERP_CONFIGS = {
    "tiled": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "GROUP_M": 2},
    # the epilogue's inputs loaded after the main loop (LSQUANT_EARLY_EPI=0; before it is the default)
    "tiled-late": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "GROUP_M": 2,
                   "EARLY_EPI": False},
    "tma-e2": {"KERNEL": "tma", "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3,
               "GROUP_M": 2, "EPI_SUBTILE": 2, "WARP_SPECIALIZE": False},
    "tma-ws": {"KERNEL": "tma", "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3,
               "GROUP_M": 1, "EPI_SUBTILE": 1, "WARP_SPECIALIZE": True},
    "splitk": {"KERNEL": "splitk", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2,
               "GROUP_M": 1, "SPLIT_K": 4},
    "splitk-late": {"KERNEL": "splitk", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4,
                    "num_stages": 2, "GROUP_M": 1, "SPLIT_K": 4, "EARLY_EPI": False},
}


def _triton_case(M, N, K, out_dtype, activation, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8)
    x = torch.randint(-127, 128, (M, K), generator=g).to(torch.int8)
    if out_dtype == torch.int32:
        return G.Int8Linear(w, out_dtype=torch.int32), x
    w_clip = (torch.rand(N, generator=g) + 0.5) * 0.1
    sigma = math.sqrt(K) / 3 * 2.0 * 0.1
    layer = G.Int8Linear(w, w_clip=w_clip, x_clip=2.0, bias=torch.randn(N, generator=g), activation=activation,
                         out_dtype=out_dtype, out_clip=3 * sigma + 1 if out_dtype == torch.int8 else None)
    return layer, x


def _run_triton(gt, layer, x, cfg):
    return gt.int8_linear_triton(x, layer.weight, layer.alpha, layer.bias32, G.ACTIVATIONS[layer.activation],
                                 layer.out_dtype, layer.out_inv_t, cfg)


def _assert_matches_reference(y, want, out_dtype, activation, what):
    assert y.dtype == want.dtype and y.shape == want.shape, what
    if activation == "gelu" and out_dtype != torch.int32:
        # erf differs by an ulp between numpy and PyTorch: a few ulps of the output, or 1 int8 step
        tol = 1 if out_dtype == torch.int8 else 4 * torch.finfo(out_dtype).eps * want.float().abs().max().item()
        assert (y.float() - want.float()).abs().max().item() <= tol, what
    elif out_dtype == torch.bfloat16:
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
        assert ((y.float() - want.float()).abs() <= ulp).all(), what
    else:
        assert torch.equal(y, want), what  # int32, int8, fp16, fp32: bit-exact


@pytest.mark.parametrize("kernel", list(INTERP_CONFIGS))
@pytest.mark.parametrize("M,N,K", [(37, 72, 96), (100, 33, 160), (3, 40, 224)])
def test_triton_kernels_interpreted_int_exact(triton_interpreter, kernel, M, N, K):
    """int32 and int8 outputs of every kernel equal the reference bit for bit on odd shapes: M, N not tile
    multiples, N = 33 (no TMA store: 33 bf16 rows are not 16-byte strided), several tiles per persistent
    program (the interpreter runs 4), K split into 4 with a partial last split."""
    cfg = INTERP_CONFIGS[kernel]
    for out_dtype, act in ((torch.int32, "none"), (torch.int8, "relu"), (torch.int8, "none")):
        layer, x = _triton_case(M, N, K, out_dtype, act)
        y = _run_triton(triton_interpreter, layer, x, cfg)
        assert torch.equal(y, layer(x)), (kernel, out_dtype, act)


@pytest.mark.parametrize("kernel", list(INTERP_CONFIGS))
def test_triton_kernels_interpreted_float_epilogue(triton_interpreter, kernel):
    """Float outputs: the reference epilogue's fp32 operations in the same order (fp32 and fp16 exact)."""
    cfg = INTERP_CONFIGS[kernel]
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for act in ("none", "relu", "gelu"):
            layer, x = _triton_case(45, 64, 96, out_dtype, act, seed=1)
            y = _run_triton(triton_interpreter, layer, x, cfg)
            _assert_matches_reference(y, layer(x), out_dtype, act, (kernel, out_dtype, act))


def test_triton_splitk_leaves_workspace_zeroed(triton_interpreter):
    """The split-K kernel's last program per tile takes the sum and resets it: the workspace is zero after
    each call, so back-to-back calls on one workspace stay exact."""
    cfg = INTERP_CONFIGS["splitk"]
    layer, x = _triton_case(5, 70, 200, torch.int32, "none")
    for _ in range(2):
        assert torch.equal(_run_triton(triton_interpreter, layer, x, cfg), layer(x))
    ws, cnt = triton_interpreter._splitk_ws.get(torch.device("cpu"), 1, 1)
    assert not ws.any() and not cnt.any()


def test_triton_tma_config_with_unaligned_k_uses_pointer_loads(triton_interpreter):
    """K % 16 != 0 (rows not 16-byte strided: no TMA descriptor): a TMA config runs the tiled kernel with
    its tiles instead of failing."""
    layer, x = _triton_case(20, 50, 67, torch.int8, "relu")
    assert torch.equal(_run_triton(triton_interpreter, layer, x, INTERP_CONFIGS["tma-e2"]), layer(x))


def test_triton_variant_configs_cpu():
    """Which persistent TMA / split-K configs the tuner gets (pure Python: no Triton needed)."""
    from lsquant.inference import gemm_triton as GT

    for out_bytes in (1, 2, 4):
        cfgs = GT.variant_configs(8192, 4096, 1024, out_bytes=out_bytes)
        tma = [c for c in cfgs if c["KERNEL"] == "tma"]
        assert 1 <= len(tma) <= 5 and all(GT.smem_bytes(c, out_bytes) <= GT.SMEM_LIMIT for c in tma)
        assert sum(c["WARP_SPECIALIZE"] for c in tma) == 1
        assert not any(c["KERNEL"] == "splitk" for c in cfgs)
    # int32 output: a 128x256 tile with 4 stages does not fit (192 KiB + 64 KiB staging)
    assert not any(c["BLOCK_M"] == 128 and c["BLOCK_N"] == 256 and c["num_stages"] == 4
                   for c in GT.variant_configs(8192, 4096, 1024, out_bytes=4, n_tma=10))
    assert not [c for c in GT.variant_configs(8192, 4096, 1000) if c["KERNEL"] == "tma"]  # K % 16 != 0
    assert not GT.variant_configs(8192, 4096, 1024, tma=False)
    # decoding: split-K where the tiles alone leave SMs idle, each split at least one K block
    dec = GT.variant_configs(1, 1024, 4096)
    assert dec and all(c["KERNEL"] == "splitk" and c["SPLIT_K"] > 1 for c in dec)
    for c in dec:
        tiles = -(-1 // c["BLOCK_M"]) * -(-1024 // c["BLOCK_N"])
        assert tiles * c["SPLIT_K"] >= 0.9 * 132 or 2 * c["SPLIT_K"] * c["BLOCK_K"] > 4096
        assert c["SPLIT_K"] * c["BLOCK_K"] <= 4096
    assert not GT.variant_configs(8, 32000, 1024)  # 500 column tiles already fill the SMs
    # mid-size M (large-batch decoding): wgmma-sized split-K tiles where the tiles leave SMs idle
    mid = [c for c in GT.variant_configs(512, 1536, 512, tma=False)]
    assert mid and all(c["KERNEL"] == "splitk" and c["BLOCK_M"] >= 64 and c["SPLIT_K"] > 1 for c in mid)
    assert not GT.variant_configs(512, 32000, 512, tma=False)     # 1,000 tiles: no split
    assert not GT.variant_configs(2048, 1536, 512, tma=False)     # over SPLITK_MID_MAX_M
    # names: the tiled kernel keeps gemm.choice_name's; the others say which kernel they are, all distinct
    names = [GT.config_name(c) for c in GT.variant_configs(8192, 4096, 1024, n_tma=10, n_ws=5)]
    names += [GT.config_name(c) for c in GT.variant_configs(1, 1024, 4096, n_splitk=10)]
    assert len(set(names)) == len(names)
    assert all(n.startswith(("triton-tma:", "triton-splitk")) for n in names)
    tiled = GT.candidate_configs(8192, 4096, 1024)
    assert [GT.config_name(c) for c in tiled] == [G.choice_name({"backend": "triton", "config": c}) for c in tiled]


def test_tuner_names_triton_kernels_apart():
    """A TMA config with the tiled kernel's tile shape must not be deduplicated away by the tuner."""
    tiled = TRITON_CHOICE
    tma = {"backend": "triton", "config": {**TRITON_CHOICE["config"], "KERNEL": "tma", "EPI_SUBTILE": 2,
                                           "WARP_SPECIALIZE": False}}
    assert T.choice_name(tiled) == G.choice_name(tiled) == "triton:128x256x128-w8-s3-g8"
    assert T.choice_name(tma) == "triton-tma:128x256x128-w8-s3-g8-e2"
    assert T.choice_name(LT_CHOICE) == G.choice_name(LT_CHOICE)


def test_early_epilogue_switch(monkeypatch):
    """LSQUANT_EARLY_EPI: unset, a config's EARLY_EPI decides and a config without one loads its epilogue's inputs
    first; a config that loads them last is named apart; "1" / "0" force every call one way; the tuner offers
    each config once."""
    from lsquant.inference import gemm_triton as GT

    tiled = GT.candidate_configs(32, 1536, 512, limit=3)
    splitk = dict(tiled[0], KERNEL="splitk", SPLIT_K=4)
    late = [dict(c, EARLY_EPI=False) for c in (tiled[0], splitk)]
    monkeypatch.delenv("LSQUANT_EARLY_EPI", raising=False)
    assert GT.early_epilogue() is None
    assert GT._early(tiled[0]) and GT._early(splitk) and GT._early(dict(tiled[0], EARLY_EPI=True))
    assert not GT._early(late[0]) and not GT._early(late[1])
    assert GT.config_name(late[0]) == GT.config_name(tiled[0]) + "-late"
    assert GT.config_name(late[1]) == GT.config_name(splitk) + "-late"
    assert GT.config_name(dict(tiled[0], EARLY_EPI=True)) == GT.config_name(tiled[0])
    assert not hasattr(GT, "early_variants")
    for value, forced in (("1", True), ("on", True), ("0", False), ("off", False)):
        monkeypatch.setenv("LSQUANT_EARLY_EPI", value)
        assert GT.early_epilogue() is forced
        assert GT._early(late[0]) is forced and GT._early(tiled[0]) is forced


# ---------------------------------------------------------------- Triton kernels (GPU) ----

def _variant_cases(M, N, K, out_dtype):
    """Every Triton variant the tuner may offer for this shape (whatever the ranking limits), and the tiled
    kernel with the first tile config (the yardstick: same epilogue code, so float outputs equal it)."""
    from lsquant.inference import gemm_triton as GT

    ob = torch.empty((), dtype=out_dtype).element_size()
    cfgs = GT.variant_configs(M, N, K, num_sms=GT.num_sms(), out_bytes=ob, n_tma=20, n_ws=5, n_splitk=10,
                              tma=GT.tma_available(), ws=GT.warp_specialize_available())
    return GT.candidate_configs(M, N, K, limit=1)[0], cfgs


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int8, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 1024, 4096), (7, 100, 640), (77, 200, 304), (1000, 3072, 1024),
                                   (300, 1000, 250), (200, 1536, 512)])
def test_cuda_triton_variants_exact(out_dtype, M, N, K):
    """Persistent TMA (plain and warp-specialized) and split-K kernels, and the tiled and split-K ones with
    their epilogue's loads after the main loop, on the GPU: int outputs equal the CPU reference bit for bit; every output (float and GELU included) equals the tiled kernel's bit for bit
    (one epilogue, compiled without FMA contraction)."""
    from lsquant.inference import gemm_triton as GT

    if not GT.available():
        pytest.fail("Triton is expected on the GPU machine")
    act = "none" if out_dtype == torch.int32 else "gelu"
    layer = _cuda_layer(N, K, out_dtype, act)
    x = rand_i8(M, K, device="cuda", nonzero=True)
    base_cfg, cfgs = _variant_cases(M, N, K, out_dtype)
    # the tiled and split-K kernels with their epilogue's loads last (LSQUANT_EARLY_EPI=0; first is the default)
    cfgs = cfgs + [dict(c, EARLY_EPI=False) for c in [base_cfg] + cfgs if c.get("KERNEL", "tiled") != "tma"]
    if M <= 64 and N >= 1000:
        assert any(c["KERNEL"] == "splitk" for c in cfgs), "split-K offered for decoding"
    if M > 64 and K % 16 == 0 and GT.tma_available():
        assert any(c["KERNEL"] == "tma" for c in cfgs), "TMA offered on sm_90"
    base = G.run_choice(layer, x, {"backend": "triton", "config": base_cfg})
    want = _ref(layer, x)
    if out_dtype in (torch.int32, torch.int8):
        ok, detail = T.check_output(base.cpu(), want, out_dtype, act, 0.0)
        assert ok, detail
    for cfg in cfgs:
        y = G.run_choice(layer, x, {"backend": "triton", "config": cfg})
        y2 = G.run_choice(layer, x, {"backend": "triton", "config": cfg})  # split-K: the workspace reset
        torch.cuda.synchronize()
        assert torch.equal(y, base), (GT.config_name(cfg), (y.float() - base.float()).abs().max().item())
        assert torch.equal(y2, base), GT.config_name(cfg)


@pytest.mark.cuda
def test_cuda_triton_variants_in_cuda_graph_and_unaligned():
    """Split-K and TMA kernels replayed from a CUDA graph (how engines and the tuner run them) with inputs
    rewritten in place, and a TMA config fed an operand view that is not 16-byte aligned."""
    from lsquant.inference import gemm_triton as GT

    layer = _cuda_layer(1024, 2048, torch.int8, "relu")
    for M in (5, 300):
        _, cfgs = _variant_cases(M, 1024, 2048, torch.int8)
        for cfg in cfgs:
            x = rand_i8(M, 2048, device="cuda")
            choice = {"backend": "triton", "config": cfg}
            G.run_choice(layer, x, choice)  # eager first: compiles, sizes the split-K workspace
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                G.run_choice(layer, x, choice)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = G.run_choice(layer, x, choice)
            for seed in range(3):
                x.copy_(rand_i8(M, 2048, device="cuda"))
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(y.cpu(), _ref(layer, x)), (GT.config_name(cfg), seed)
    if GT.tma_available():
        base = rand_i8(300, 2048 + 16, device="cuda")
        xv = base[:, 1:2049]  # rows 2064 bytes apart, first element 1 byte past an aligned address
        cfg = next(c for c in GT.variant_configs(300, 1024, 2048) if c["KERNEL"] == "tma")
        y = G.run_choice(layer, xv, {"backend": "triton", "config": cfg})
        assert torch.equal(y.cpu(), _ref(layer, xv))


# ---------------------------------------------------------------- residual add (CPU) ----
# out = round_out(fp32(residual) + fp32(round_out(v))): bit-identical to `residual + layer(x)` in PyTorch

FLOATS = [torch.float16, torch.bfloat16, torch.float32]
# (activation, bias): the plain output, and each activation with a bias
EPILOGUES = [("none", False), ("relu", True), ("gelu", True)]


def _residual_like(y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A residual of y's dtype and shape, of y's magnitude: values that cancel it, add to it, and dwarf it, so
    the sum's rounding is exercised (not just exact small-integer sums)."""
    g = torch.Generator().manual_seed(seed)
    scale = y.float().abs().max().clamp_min(1.0)
    r = torch.randn(y.shape, generator=g) * scale
    r.view(-1)[::7] = -y.float().reshape(-1)[::7]  # exact cancellation (to the last bit of the output type)
    r.view(-1)[::11] *= 1000.0
    return r.to(y.dtype)


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("activation,has_bias", EPILOGUES)
def test_residual_reference_is_ref_plus_residual(out_dtype, activation, has_bias):
    """Reference with a residual == reference + residual in PyTorch, bit for bit: epilogue_ref,
    int8_linear_ref, Int8Linear on the CPU and int8_linear, with leading dimensions."""
    x, w = rand_i8(2, 3, 40), rand_i8(37, 40)
    w_clip, bias = torch.rand(37) + 0.1, (torch.randn(37) * 5 if has_bias else None)
    kw = dict(x_clip=2.5, w_clip=w_clip, bias=bias, activation=activation, out_dtype=out_dtype)
    y = G.int8_linear_ref(x, w, **kw)
    r = _residual_like(y)
    r_before = r.clone()
    want = r + y
    assert torch.equal(G.int8_linear_ref(x, w, residual=r, **kw), want)
    assert torch.equal(G.int8_linear(x, w, residual=r, **kw), want)
    layer = G.Int8Linear(w, **kw)
    assert torch.equal(layer(x, residual=r), want)
    acc = G.int8_gemm_ref(x.reshape(-1, 40), w)
    alpha = G.gemm_alpha(torch.tensor(2.5), w_clip)
    e = G.epilogue_ref(acc, alpha, bias, activation, out_dtype, residual=r.reshape(6, 37))
    assert torch.equal(e, want.reshape(6, 37))
    # the documented formula, written out: round_out(fp32(r) + fp32(round_out(v)))
    v = G.epilogue_ref(acc, alpha, bias, activation, torch.float32)
    formula = (r.reshape(6, 37).float() + v.to(out_dtype).float()).to(out_dtype)
    assert torch.equal(e, formula)
    assert torch.equal(r, r_before)  # the residual is read, never written
    # a residual that is a strided view (rows not contiguous) is taken as is
    big = torch.zeros(2, 3, 50, dtype=out_dtype)
    big[..., :37] = r
    assert torch.equal(layer(x, residual=big[..., :37]), want)


def test_residual_errors():
    x, w = rand_i8(4, 16), rand_i8(8, 16)
    kw = dict(x_clip=1.0, w_clip=torch.ones(8))
    bf = G.Int8Linear(w, out_dtype=torch.bfloat16, **kw)
    with pytest.raises(ValueError, match=r"float outputs only.*int8"):
        G.Int8Linear(w, out_dtype=torch.int8, out_clip=3.0, **kw)(x, residual=torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"float outputs only.*int32"):
        G.Int8Linear(w, out_dtype=torch.int32)(x, residual=torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"shape \(4, 7\), expected \(4, 8\)"):
        bf(x, residual=torch.zeros(4, 7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"shape \(32,\), expected \(4, 8\)"):
        bf(x, residual=torch.zeros(32, dtype=torch.bfloat16))  # same numel, other shape: refused too
    with pytest.raises(ValueError, match=r"torch.float16, expected torch.bfloat16"):
        bf(x, residual=torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"torch.float32, expected torch.float16"):
        G.int8_linear(x, w, out_dtype=torch.float16, residual=torch.zeros(4, 8), **kw)
    with pytest.raises(ValueError, match="expected"):
        G.int8_linear_ref(x, w, out_dtype=torch.float32, residual=torch.zeros(4, 9), **kw)
    with pytest.raises(ValueError, match="float outputs only"):
        G.epilogue_ref(torch.zeros(4, 8, dtype=torch.int32), torch.ones(8), None, "none", torch.int8, 1.0,
                       residual=torch.zeros(4, 8))
    with pytest.raises(TypeError, match="tensor"):
        bf(x, residual=[[0.0] * 8] * 4)


def test_residual_errors_triton_launcher():
    """int8_linear_triton checks the residual before anything is compiled or launched."""
    pytest.importorskip("triton")
    from lsquant.inference import gemm_triton as GT

    x, w = rand_i8(4, 16), rand_i8(8, 16)
    cfg = GT.config_dict(GT.CONFIGS[0])
    ones = torch.ones(8)
    with pytest.raises(ValueError, match="float outputs only"):
        GT.int8_linear_triton(x, w, ones, None, 0, torch.int8, torch.ones(1), cfg, torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"residual is torch.float32, expected torch.float16"):
        GT.int8_linear_triton(x, w, ones, None, 0, torch.float16, None, cfg, torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"residual has shape \(8, 4\), expected \(4, 8\)"):
        GT.int8_linear_triton(x, w, ones, None, 0, torch.float32, None, cfg, torch.zeros(8, 4))


def _fake_ext(monkeypatch):
    import importlib

    build = importlib.import_module("lsquant.ops.build")
    fake = _FakeExt()
    monkeypatch.setattr(build, "load", lambda *a, **k: fake)
    monkeypatch.setattr(G, "_workspace", lambda device: torch.empty(16, dtype=torch.uint8))
    return fake


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("clip_scale", [1.0, 1e-3])
def test_dequant_backend_is_within_its_rounding_bound_cpu(out_dtype, activation, clip_scale):
    """The dequant fallback (x_q cast, the weight scaled by alpha) against the exact reference, element by
    element within 2 ulps of the output dtype over the sum of |terms| and |bias|: the rounding of the scaled
    weight (1/2 ulp per term) and of the output. A misapplied scale would be off by orders of magnitude."""
    M, N, K = 37, 70, 300
    # clip_scale 1e-3: alpha ~ 1e-7, where folding it into an fp16 weight would land among subnormals
    w_clip, bias, x_clip = (torch.rand(N) + 0.1) * clip_scale, torch.randn(N) * clip_scale, 3.0 * clip_scale
    layer = G.Int8Linear(rand_i8(N, K), w_clip=w_clip, x_clip=x_clip, bias=bias, activation=activation,
                         out_dtype=out_dtype)
    if out_dtype == torch.bfloat16 or clip_scale < 1.0:   # bf16 always folds; fp16 never at alpha ~ 1e-7
        assert layer.w_dequant(out_dtype)[2] == (out_dtype == torch.bfloat16)
    x = rand_i8(M, K)
    ref = G.int8_linear_ref(x, layer.weight, x_clip, w_clip, bias, activation, out_dtype).float()
    y = G.run_choice(layer, x, {"backend": "dequant"}).float()
    eps = torch.finfo(out_dtype).eps
    terms = x.double().abs() @ (layer.weight.double().abs() * layer.alpha.double().reshape(-1, 1)).t()
    bound = 2 * eps * (terms + layer.bias32.double().abs()) + 1e-6
    assert (y.double() - ref.double()).abs().le(bound).all()


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("M", [1, 17, 300])
def test_residual_cublaslt_fallback_dequant_plumbing_cpu(monkeypatch, out_dtype, M):
    """The cuBLASLt path (plain and in row chunks), the fallback and the dequant backend add the residual
    after their result with one PyTorch add: bit-identical to their own output + residual (with a stand-in
    extension on the CPU)."""
    fake = _fake_ext(monkeypatch)
    N, K = 70, 67
    layer = G.Int8Linear(rand_i8(N, K), w_clip=torch.rand(N) + 0.1, x_clip=3.0, bias=torch.randn(N),
                         activation="relu", out_dtype=out_dtype)
    x = rand_i8(M, K)
    want_plain = layer(x)
    r = _residual_like(want_plain, seed=M)
    r_before = r.clone()
    want = layer(x, residual=r)
    assert torch.equal(want, r + want_plain)
    for choice in ({"backend": "cublaslt", "algo": None}, {"backend": "cublaslt", "algo": [1] * 9, "chunk_m": 128}):
        assert torch.equal(G.run_choice(layer, x, choice, r), want), choice
    fake.calls.clear()
    assert torch.equal(G._run_fallback(layer, x, r), want)
    assert fake.calls  # M < 32: the padded cuBLASLt path; else the fp64 GEMM + the epilogue kernel
    if out_dtype != torch.float32:
        deq = G.run_choice(layer, x, {"backend": "dequant"})
        assert torch.equal(G.run_choice(layer, x, {"backend": "dequant"}, r), r + deq)
    assert torch.equal(r, r_before)
    with pytest.raises(ValueError, match="expected"):
        G.run_choice(layer, x, {"backend": "cublaslt", "algo": None}, r[:, :-1])


# ---------------------------------------------------------------- residual add, Triton interpreted (CPU) ----

def _assert_residual_matches(y, want, plain, out_dtype, activation, what):
    """y: a Triton kernel's output with a residual; want: the reference's; plain: the reference without the
    residual (v rounded to out_dtype). fp16 and fp32 are bit-exact. GELU: erf differs in its last ulp between
    numpy and PyTorch, so v may differ by a few ulps of the output's largest value (as in
    _assert_matches_reference: where 1 + erf cancels, an absolute, not a relative, error), and the sum's
    rounding may then flip once (an ulp of the sum). bf16 (interpreter only): its fp32 -> bf16 conversion
    truncates instead of rounding to nearest (bit-exact on the GPU: the cuda tests), so v and the sum each
    lose < 1 ulp."""
    assert y.dtype == want.dtype and y.shape == want.shape, what
    eps = torch.finfo(out_dtype).eps
    if activation == "gelu":
        tol = 4 * eps * plain.float().abs().max() + 2 * eps * want.float().abs()
    elif out_dtype == torch.bfloat16:
        tol = eps * (plain.float().abs() + 2 * want.float().abs())
    else:
        assert torch.equal(y, want), what
        return
    err = (y.float() - want.float()).abs()
    assert (err <= tol).all(), (what, err.max().item())


@pytest.mark.parametrize("kernel", list(INTERP_CONFIGS))
@pytest.mark.parametrize("M", [1, 3, 17])
def test_triton_kernels_interpreted_residual(triton_interpreter, kernel, M):
    """Every kernel with a residual, odd shapes (M 1, 3, 17; N and K not multiples of 32; N = 72 lets the TMA
    kernel store by TMA, N = 70 does not: the residual is loaded with pointers either way), fp16 / bf16 /
    fp32, with and without bias and activation, against the reference; the residual a strided view."""
    cfg = INTERP_CONFIGS[kernel]
    gt = triton_interpreter
    for N, K in ((72, 112), (70, 80)):
        for out_dtype in FLOATS:
            for activation, has_bias in EPILOGUES:
                layer, x = _triton_case(M, N, K, out_dtype, activation, seed=M + N)
                if not has_bias:
                    layer = G.Int8Linear(layer.weight, w_clip=layer.w_clip, x_clip=layer.x_clip,
                                         activation=activation, out_dtype=out_dtype)
                plain = layer(x)
                big = torch.zeros(M, N + 9, dtype=out_dtype)
                big[:, 3:N + 3] = _residual_like(plain, seed=N)
                r = big[:, 3:N + 3]  # row stride N + 9, not 16-byte aligned
                want = layer(x, residual=r)
                y = gt.int8_linear_triton(x, layer.weight, layer.alpha, layer.bias32,
                                          G.ACTIVATIONS[activation], out_dtype, layer.out_inv_t, cfg, r)
                what = (kernel, M, N, K, out_dtype, activation, has_bias)
                _assert_residual_matches(y, want, plain, out_dtype, activation, what)
                if out_dtype != torch.bfloat16 and activation != "gelu":
                    # and the kernel's own output + residual in PyTorch, bit for bit
                    y0 = gt.int8_linear_triton(x, layer.weight, layer.alpha, layer.bias32,
                                               G.ACTIVATIONS[activation], out_dtype, layer.out_inv_t, cfg)
                    assert torch.equal(y, r + y0), what
    assert not big[:, :3].any() and not big[:, N + 3:].any()  # nothing written outside the residual


def test_triton_interpreted_residual_through_layer(triton_interpreter, monkeypatch):
    """Int8Linear's GPU dispatch (run on CPU tensors through _dispatch) hands the residual to the Triton
    kernel: the Triton default for small M."""
    from lsquant.inference import gemm_triton as GT

    monkeypatch.setattr(GT, "available", lambda: True)
    layer, x = _triton_case(3, 72, 112, torch.float16, "relu", seed=2)
    layer.cache = T.TuningCache("/nonexistent/lsquant-test-cache.json", env=ENV)
    r = _residual_like(layer(x))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lsquant int8 GEMM")
        y = layer._dispatch(x, None, r)
    assert layer.choices[T.m_bucket(3)] == G.default_choice(3) and G.default_choice(3)["backend"] == "triton"
    assert torch.equal(y, layer(x, residual=r))


# ---------------------------------------------------------------- default kernel and fallback chain (CPU) ----

def test_default_choice_small_m_is_triton(monkeypatch, tmp_path):
    from lsquant.inference import gemm_triton as GT

    lt = {"backend": "cublaslt", "algo": None}
    assert G.default_choice() == lt  # the original signature: cuBLASLt's default
    # the Triton default is one of the tiled kernel's configs, the one the H100 tuner chose
    cfg = G.DEFAULT_TRITON_CONFIG
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"],
            cfg["GROUP_M"]) in GT.CONFIGS
    monkeypatch.setattr(GT, "available", lambda: True)
    for M in (1, 2, 17, 64):
        c = G.default_choice(M)
        assert c == {"backend": "triton", "config": cfg}, M
        assert G.choice_name(c) == T.choice_name(c) == "triton:16x32x256-w4-s4-g1"
        c["config"]["BLOCK_M"] = 999  # a copy: callers cannot change the default
    assert G.DEFAULT_TRITON_CONFIG["BLOCK_M"] == 16
    for M in (65, 128, 8192):
        assert G.default_choice(M) == lt, M
    assert G.default_choice() == lt
    # Int8Linear.choice_for: no cache entry -> the default of M, memoised per bucket
    layer = G.Int8Linear(rand_i8(40, 32), w_clip=torch.ones(40), x_clip=1.0,
                         cache=T.TuningCache(tmp_path / "none.json", env=ENV))
    assert layer.choice_for(5)["backend"] == "triton" and layer.choice_for(100) == lt
    assert set(layer.choices) == {8, 128}
    # the tuner's candidates start with the default, then cuBLASLt's default
    monkeypatch.setattr(T, "cublaslt_candidates", lambda *a, **k: [])
    monkeypatch.setattr(T, "triton_candidates", lambda *a, **k: [])
    assert T.candidates(8, 1024, 1024, torch.bfloat16)[:2] == [G.default_choice(8), lt]
    assert T.candidates(512, 1024, 1024, torch.bfloat16)[0] == lt
    # without Triton on a CUDA device: cuBLASLt for every M
    monkeypatch.setattr(GT, "available", lambda: False)
    assert all(G.default_choice(M) == lt for M in (1, 64, 65))
    assert T.candidates(8, 1024, 1024, torch.bfloat16)[:2] == [lt, {"backend": "dequant"}]


def test_fallback_chain_order(monkeypatch):
    from lsquant.inference import gemm_triton as GT

    lt = G.default_choice()
    tri = {"backend": "triton", "config": dict(G.DEFAULT_TRITON_CONFIG)}
    cached = {"backend": "cublaslt", "algo": [7] * 9}
    monkeypatch.setattr(GT, "available", lambda: True)
    assert G.fallback_chain(cached, 5) == [cached, tri, lt]
    assert G.fallback_chain(tri, 5) == [tri, lt]
    assert G.fallback_chain(lt, 5) == [lt]  # never back up to the Triton default
    assert G.fallback_chain(cached, 100) == [cached, lt]
    assert G.fallback_chain(tri, 100) == [tri, lt]


class _Runner:
    """Stands in for run_choice / _run_fallback: records what ran, fails for the backends in ``fail``."""

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.calls = []

    def name(self, choice):
        return "triton-default" if choice == {"backend": "triton", "config": G.DEFAULT_TRITON_CONFIG} \
            else G.choice_name(choice)

    def run(self, layer, x2, choice, residual=None):
        n = self.name(choice)
        self.calls.append((n, residual is not None))
        if n in self.fail:
            raise RuntimeError(f"{n} cannot run here")
        y = layer(x2)  # the CPU reference
        return y if residual is None else y + residual

    def fallback(self, layer, x2, residual=None):
        self.calls.append(("fallback", residual is not None))
        y = layer(x2)
        return y if residual is None else y + residual


def _chain_setup(monkeypatch, fail):
    from lsquant.inference import gemm_triton as GT

    monkeypatch.setattr(GT, "available", lambda: True)
    runner = _Runner(fail)
    monkeypatch.setattr(G, "run_choice", runner.run)
    monkeypatch.setattr(G, "_run_fallback", runner.fallback)
    layer = G.Int8Linear(rand_i8(24, 32), w_clip=torch.rand(24) + 0.1, x_clip=2.0, out_dtype=torch.float16,
                         cache=T.TuningCache("/nonexistent/lsquant-test-cache.json", env=ENV))
    return runner, layer


def _call_counting_warnings(layer, x, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = layer._dispatch(x, **kw)
    return y, [w for w in rec if issubclass(w.category, RuntimeWarning)]


def test_failing_triton_default_falls_back_to_cublaslt(monkeypatch):
    runner, layer = _chain_setup(monkeypatch, fail={"triton-default"})
    x = rand_i8(5, 32)
    r = torch.randn(5, 24).half()
    y, warned = _call_counting_warnings(layer, x, residual=r)
    assert torch.equal(y, layer(x, residual=r))
    assert runner.calls == [("triton-default", True), ("cublaslt:default", True)]
    assert len(warned) == 1 and "triton:16x32x256-w4-s4-g1 failed" in str(warned[0].message)
    assert "using cublaslt:default" in str(warned[0].message)
    assert layer.choices[8] == G.default_choice()
    runner.calls.clear()
    y, warned = _call_counting_warnings(layer, x)  # memoised: the Triton default is not tried again
    assert runner.calls == [("cublaslt:default", False)] and not warned
    # another bucket tries its own chain once (a failure may be shape-specific), without a second warning
    runner.calls.clear()
    y, warned = _call_counting_warnings(layer, rand_i8(40, 32))
    assert runner.calls == [("triton-default", False), ("cublaslt:default", False)] and not warned
    assert layer.choices[64] == G.default_choice()


def test_failing_defaults_reach_the_fallback_without_recursion(monkeypatch):
    runner, layer = _chain_setup(monkeypatch, fail={"triton-default", "cublaslt:default"})
    x = rand_i8(3, 32)
    y, warned = _call_counting_warnings(layer, x)
    assert torch.equal(y, layer(x))
    assert runner.calls == [("triton-default", False), ("cublaslt:default", False), ("fallback", False)]
    assert len(warned) == 1  # one warning naming both kernels
    msg = str(warned[0].message)
    assert "triton:16x32x256-w4-s4-g1 failed" in msg and "cublaslt:default failed" in msg and "fallback" in msg
    assert layer.choices[4] == G.default_choice()
    for _ in range(3):  # from then on: cuBLASLt default (failing) -> fallback, silently
        runner.calls.clear()
        y, warned = _call_counting_warnings(layer, x)
        assert runner.calls == [("cublaslt:default", False), ("fallback", False)] and not warned
    # an explicitly requested Triton default does not loop either
    runner.calls.clear()
    y, warned = _call_counting_warnings(layer, x, choice=G.default_choice(3))
    assert runner.calls == [("triton-default", False), ("cublaslt:default", False), ("fallback", False)]


def test_failing_cached_kernel_chain(monkeypatch):
    bad = {"backend": "cublaslt", "algo": [99999] + [0] * 8}
    bad_name = G.choice_name(bad)
    runner, layer = _chain_setup(monkeypatch, fail={bad_name})
    for M, want_calls, want_choice in (
            (5, [bad_name, "triton-default"], G.default_choice(5)),
            (100, [bad_name, "cublaslt:default"], G.default_choice())):
        layer.choices[T.m_bucket(M)] = bad
        runner.calls.clear()
        x = rand_i8(M, 32)
        y, warned = _call_counting_warnings(layer, x)
        assert torch.equal(y, layer(x))
        assert [c[0] for c in runner.calls] == want_calls
        assert layer.choices[T.m_bucket(M)] == want_choice
        assert len(warned) == (1 if M == 5 else 0)  # once per kernel name
    # an explicit choice that fails leaves the memoised choice alone
    layer.choices[8] = G.default_choice(5)
    runner.calls.clear()
    y, _ = _call_counting_warnings(layer, rand_i8(5, 32), choice=bad)
    assert [c[0] for c in runner.calls] == [bad_name, "triton-default"]
    assert layer.choices[8] == G.default_choice(5)


# ---------------------------------------------------------------- residual and default kernel (GPU) ----

def _residual_choices(M, N, K, out_dtype):
    """One choice of every backend and kernel: cuBLASLt default, in row chunks, one heuristic algorithm; the
    Triton default, the first tiled candidate, the first persistent TMA config (M > 64) and the first
    split-K config (M <= 64) offered; dequant (fp16/bf16)."""
    from lsquant.inference import gemm_triton as GT

    choices = [G.default_choice(), {"backend": "cublaslt", "algo": None, "chunk_m": 128}]
    choices += T.cublaslt_candidates(M, N, K, n_heuristic=1, n_enumerated=0)
    if GT.available():
        choices.append({"backend": "triton", "config": dict(G.DEFAULT_TRITON_CONFIG)})
        base_cfg, variants = _variant_cases(M, N, K, out_dtype)
        choices.append({"backend": "triton", "config": base_cfg})
        for kind in ("tma", "splitk"):
            first = [c for c in variants if c["KERNEL"] == kind and not c.get("WARP_SPECIALIZE")][:1]
            choices += [{"backend": "triton", "config": c} for c in first]
    if out_dtype != torch.float32:
        choices.append({"backend": "dequant"})
    return choices


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("activation,has_bias", [("none", False), ("gelu", True)])
@pytest.mark.parametrize("M,N,K", [(1, 33, 100), (3, 1024, 4096), (17, 250, 1000), (300, 1000, 256)])
def test_cuda_residual_every_backend(out_dtype, activation, has_bias, M, N, K):
    """Every backend with a residual equals its own output + residual in PyTorch bit for bit (the fused
    Triton epilogue: tiled, TMA and split-K kernels), and the reference + residual (bit for bit without
    GELU; with GELU within a few ulps)."""
    from lsquant.inference import gemm_triton as GT

    layer = _cuda_layer(N, K, out_dtype, activation, bias=has_bias)
    x = rand_i8(M, K, device="cuda", nonzero=True)
    plain_ref = _ref(layer, x)
    r = _residual_like(plain_ref, seed=M).cuda()
    r_before = r.clone()
    want = r.cpu() + plain_ref
    choices = _residual_choices(M, N, K, out_dtype)
    if GT.available():
        kinds = {c["config"].get("KERNEL", "tiled") for c in choices if c["backend"] == "triton"}
        assert "tiled" in kinds and ("splitk" in kinds or M > 64 or N < 1000)
        assert "tma" in kinds or M <= 64 or K % 16 or not GT.tma_available()
    failures = []
    for choice in choices:
        name = T.choice_name(choice)
        try:
            y0 = G.run_choice(layer, x, choice)
            y = G.run_choice(layer, x, choice, r)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - collected: every backend must work
            failures.append((name, f"{type(e).__name__}: {e}"))
            continue
        if not torch.equal(y, r + y0):
            failures.append((name, "!= own output + residual", (y.float() - (r + y0).float()).abs().max().item()))
        if choice["backend"] != "dequant":
            if activation != "gelu" and not torch.equal(y.cpu(), want):
                failures.append((name, "!= reference + residual"))
            tol = 4 * torch.finfo(out_dtype).eps * want.float().abs().max().item()
            if (y.cpu().float() - want.float()).abs().max().item() > tol:
                failures.append((name, "far from reference + residual"))
    assert torch.equal(r, r_before)
    assert not failures, failures
    # the layer's own dispatch (the default of M: Triton for M <= 64 where available) and _run_fallback
    layer.cache = T.TuningCache("/nonexistent/lsquant-test-cache.json", env="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lsquant int8 GEMM")
        assert torch.equal(layer(x, residual=r), r + layer(x))
    assert torch.equal(G._run_fallback(layer, x, r), r + G._run_fallback(layer, x))


@pytest.mark.cuda
def test_cuda_residual_errors_and_graph():
    layer = _cuda_layer(256, 512, torch.bfloat16, "relu")
    layer.cache = T.TuningCache("/nonexistent/lsquant-test-cache.json", env="none")
    x = rand_i8(5, 512, device="cuda")
    with pytest.raises(ValueError, match="expected cuda"):
        layer(x, residual=torch.zeros(5, 256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expected"):
        layer(x, residual=torch.zeros(5, 256, dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="float outputs only"):
        _cuda_layer(256, 512, torch.int8)(x, residual=torch.zeros(5, 256, device="cuda"))
    # replayed from a CUDA graph (how engines run it), residual rewritten in place between replays
    r = torch.zeros(5, 256, dtype=torch.bfloat16, device="cuda")
    layer(x, residual=r)  # eager first: the kernel compiles, the choice is memoised
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x, residual=r)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x, residual=r)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        r.copy_((torch.randn(5, 256, generator=g) * 50).to(torch.bfloat16))
        x.copy_(rand_i8(5, 512, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, r + layer(x)), seed


@pytest.mark.cuda
def test_cuda_default_choice_small_m():
    """On the GPU with Triton: M <= 64 without a cache entry runs the Triton default (no warning), exactly."""
    from lsquant.inference import gemm_triton as GT

    if not GT.available():
        pytest.fail("Triton is expected on the GPU machine")
    for out_dtype in (torch.int8, torch.bfloat16, torch.int32):
        layer = _cuda_layer(1024, 1024, out_dtype, "none" if out_dtype == torch.int32 else "relu")
        layer.cache = T.TuningCache("/nonexistent/lsquant-test-cache.json", env="none")
        for M in (1, 7, 64, 65):
            x = rand_i8(M, 1024, device="cuda")
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="lsquant int8 GEMM")
                y = layer(x)
            assert layer.choices[T.m_bucket(M)] == G.default_choice(M)
            assert layer.choices[T.m_bucket(M)]["backend"] == ("triton" if M <= 64 else "cublaslt")
            assert torch.equal(y.cpu(), _ref(layer, x)), (out_dtype, M)  # no GELU: bit-exact, floats too


@pytest.mark.cuda
def test_cuda_failing_triton_default_falls_back(monkeypatch):
    """A Triton default that cannot run (here: its launcher raising) falls back to the cuBLASLt default with
    one warning, and the layer keeps working."""
    from lsquant.inference import gemm_triton as GT

    def broken(*a, **k):
        raise RuntimeError("triton compile failed")

    monkeypatch.setattr(GT, "available", lambda: True)
    monkeypatch.setattr(GT, "int8_linear_triton", broken)
    layer = _cuda_layer(300, 256, torch.float16, "relu")
    layer.cache = T.TuningCache("/nonexistent/lsquant-test-cache.json", env="none")
    x = rand_i8(9, 256, device="cuda")
    r = torch.randn(9, 300, device="cuda").half()
    with pytest.warns(RuntimeWarning, match="triton:16x32x256-w4-s4-g1 failed"):
        y = layer(x, residual=r)
    assert torch.equal(y, r + G.run_choice(layer, x, G.default_choice()))
    assert layer.choices[T.m_bucket(9)] == G.default_choice()


def test_triton_pointer_kernels_compile_for_sm90():
    """The tiled and split-K kernels (pointer loads; the TMA kernel needs a GPU's descriptors) lower for an H100
    with float and int8 epilogues, a residual, and the LayerNorm tail (ln_next), each with its epilogue's loads
    after and before its main loop (EARLY_EPI): PTX and ptxas, no GPU needed."""
    compile_in_fresh_process("""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lsquant.inference import gemm_triton
k = gemm_triton._build(False)
ptrs = dict(x_ptr="*i8", w_ptr="*i8", alpha_ptr="*fp32", bias_ptr="*fp32", inv_ptr="*fp32", ws_ptr="*i32",
            cnt_ptr="*i32", ln_qinv_ptr="*fp32", ln_q_ptr="*i8", ln_cnt_ptr="*i32", ln_eps="fp32")
for out, kind, act, res, tail in (("*bf16", 2, 1, True, False), ("*bf16", 2, 0, True, True), ("*i8", 1, 2, False, False)):
    for name, const in (("tiled", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, EVEN_K=False, EARLY_EPI=False)),
                        ("tiled", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, EVEN_K=False, EARLY_EPI=True)),
                        ("splitk", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, EVEN_K=True, EARLY_EPI=False)),
                        ("splitk", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, EVEN_K=True, EARLY_EPI=True))):
        fn = k[name]
        const = dict(const, HAS_BIAS=True, ACT=act, OUT_KIND=kind, HAS_RES=res, LN_TAIL=tail, LN_BLOCK=256)
        sig = {a: "constexpr" if a in const else ptrs.get(a, out if a in ("out_ptr", "res_ptr", "ln_g_ptr",
               "ln_b_ptr") else "i32") for a in fn.arg_names}
        c = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=2, enable_fp_fusion=False))
        assert c.asm["cubin"], (name, out)
print("compiled")
""")
