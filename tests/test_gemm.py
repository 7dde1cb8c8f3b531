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


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 999, "envs": {}}', ""])
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
    assert layer.choices[T.m_bucket(5)] == G.default_choice()


def test_tuner_keeps_fastest_verified_candidate(monkeypatch):
    """The selection logic on the CPU with stand-in kernels: a wrong output, a crash and a slow kernel are
    rejected or lose; the fastest correct one wins; the default is always timed."""
    prob = T.Problem(40, 24, 64, torch.int8, "relu", True, n_sets=2, device="cpu")

    def fake_run(layer, x, choice):
        kind = choice.get("fake")
        if kind == "crash":
            raise RuntimeError("kernel launch failed")
        y = layer(x)  # the CPU reference path
        if kind == "wrong":
            y = y.clone()
            y[0, 0] = y[0, 0] + 1 if y[0, 0] < 127 else y[0, 0] - 1
        return y

    speeds = {"cublaslt:default": 3.0, "fast-but-wrong": 0.1, "crash": 0.1, "slow": 9.0, "fast": 1.0}
    cands = [G.default_choice(), {"backend": "wrong", "fake": "wrong"}, {"backend": "crash", "fake": "crash"},
             {"backend": "slow", "fake": "slow"}, {"backend": "fast", "fake": "fast"}]
    names = {"wrong": "fast-but-wrong", "crash": "crash", "slow": "slow", "fast": "fast"}

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

@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    import triton.runtime.interpreter as interp

    from lsquant.inference import gemm_triton

    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        # NumPy >= 2.4 refuses int() of a 1-element array, which the interpreter does for range() bounds
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
    # Triton's own @jit functions (tl.cdiv, ...) were decorated for compilation when triton was imported
    # without TRITON_INTERPRET: called from an interpreted kernel, they are interpreted too
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(JITFunction, "__call__", lambda self, *a, **k: interp.InterpretedFunction(self.fn)(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gemm_triton._build.cache_clear()
    yield gemm_triton
    gemm_triton._build.cache_clear()  # the next (compiled) caller rebuilds its own kernels


# small tiles keep the interpreter fast; each kind of kernel, TMA with both epilogue forms
INTERP_CONFIGS = {
    "tiled": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "GROUP_M": 2},
    "tma-e2": {"KERNEL": "tma", "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3,
               "GROUP_M": 2, "EPI_SUBTILE": 2, "WARP_SPECIALIZE": False},
    "tma-ws": {"KERNEL": "tma", "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3,
               "GROUP_M": 1, "EPI_SUBTILE": 1, "WARP_SPECIALIZE": True},
    "splitk": {"KERNEL": "splitk", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2,
               "GROUP_M": 1, "SPLIT_K": 4},
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
                                   (300, 1000, 250)])
def test_cuda_triton_variants_exact(out_dtype, M, N, K):
    """Persistent TMA (plain and warp-specialized) and split-K kernels on the GPU: int outputs equal the CPU
    reference bit for bit; every output (float and GELU included) equals the tiled kernel's bit for bit
    (one epilogue, compiled without FMA contraction)."""
    from lsquant.inference import gemm_triton as GT

    if not GT.available():
        pytest.fail("Triton is expected on the GPU machine")
    act = "none" if out_dtype == torch.int32 else "gelu"
    layer = _cuda_layer(N, K, out_dtype, act)
    x = rand_i8(M, K, device="cuda", nonzero=True)
    base_cfg, cfgs = _variant_cases(M, N, K, out_dtype)
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
