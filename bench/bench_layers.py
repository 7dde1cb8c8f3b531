"""Benchmark of the Transformer-layer kernels and layers (issue 3). Writes CSV rows to --out.

Per kernel (forward, forward+backward): lsquant's fused kernel vs the same computation in PyTorch eager and
under torch.compile; time (median of CUDA-event timings after warm-up) and GB/s from the bytes each kernel must
move (see bench/NOTES_layers.md). Per layer (forward+backward, batch tokens 4096/8192/16384, hidden 512/1024):
lsquant's TransformerEncoderLayer (float and QAT; eager and captured in CUDA graphs with lsquant.layers.graphed)
vs torch.nn.TransformerEncoderLayer under AMP (eager, torch.compile, torch.compile mode="reduce-overhead", and
under torch.cuda.make_graphed_callables) and vs a PyTorch fake-quant layer; wall time (CUDA events), GPU time
(sum of kernel times from the profiler) and peak memory.

    python bench/bench_layers.py [--quick] [--no-compile] [--out bench/results/layers_<gpu>.csv]

Every measurement is independent: a failure writes a row with status=error and the run goes on.
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, gpu_slug, time_cuda, warm_gpu  # noqa: E402

import lsquant  # noqa: E402
from lsquant import ops  # noqa: E402
from lsquant.layers import TransformerEncoderLayer, graphed  # noqa: E402

FIELDS = ["gpu", "torch", "cuda", "lsquant", "kind", "name", "impl", "dtype", "shape", "tokens", "hidden",
          "wall_ms", "gpu_ms", "gbps", "peak_mb", "speedup_vs_eager", "status", "note"]


# ---- timing (CUDA-event medians: bench/common.py) -------------------------------------------------------------

def cuda_time_ms(fn, warmup=5, iters=20) -> float:
    """Median of per-iteration CUDA-event times after warm-up (bench/common.py's time_cuda)."""
    return time_cuda(fn, [()], warmup=warmup, repeat=iters)


def gpu_kernel_ms(fn, iters=5) -> float:
    """GPU time alone: the sum of device time of all kernels per iteration, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    except Exception as e:  # e.g. no CUPTI: keep the wall times, report no GPU time
        print(f"profiler unavailable ({type(e).__name__}: {e}); gpu_ms = nan", flush=True)
        return float("nan")
    total = 0.0
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        total += t
    return total / iters / 1000.0  # us -> ms


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


class Writer:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=FIELDS)
        if new:
            self.w.writeheader()
        info = env_info()
        self.common = {"gpu": info["gpu"], "torch": info["torch"], "cuda": info["cuda"], "lsquant": lsquant.__version__}

    def row(self, **kw):
        r = dict(self.common, status="ok")
        r.update(kw)
        for k, v in r.items():
            if isinstance(v, float):
                r[k] = f"{v:.4g}"
        self.w.writerow(r)
        self.f.flush()
        print(", ".join(f"{k}={r.get(k, '')}" for k in ("kind", "name", "impl", "dtype", "shape", "wall_ms",
                                                          "gpu_ms", "gbps", "peak_mb", "speedup_vs_eager",
                                                          "status", "note") if r.get(k, "") != ""), flush=True)


def guarded(writer: Writer, what: dict, fn):
    try:
        return fn()
    except Exception as e:  # one failure must not stop the rest
        traceback.print_exc()
        writer.row(status="error", note=f"{type(e).__name__}: {str(e)[:200]}", **what)
        torch.cuda.empty_cache()
        return None


# ---- kernels -------------------------------------------------------------------------------------------------

def kernel_cases(dtype, quick: bool):
    """(name, shape text, bytes fwd, bytes fwd+bwd, make) where make() -> (lsquant_fn, eager_fn, inputs)."""
    b = torch.tensor([], dtype=dtype).element_size()
    dev = "cuda"
    T, H, I, V = (8192, 1024, 4096, 32000)
    if quick:
        T, V = 4096, 8192
    p = 0.1
    # the dropout seed as the layers pass it: a device tensor the kernels read (an int would be copied to the
    # device at every call: a pageable host-to-device copy, which syncs)
    seed = torch.tensor([1], dtype=torch.int64, device=dev)

    def rnd(*s, grad=True):
        return torch.randn(*s, device=dev, dtype=dtype).requires_grad_(grad)

    cases = []

    def ln():
        x, w, bb = rnd(T, H), rnd(H), rnd(H)
        return (lambda: ops.layer_norm(x, w, bb)), (lambda: F.layer_norm(x, (H,), w, bb)), x

    cases.append(("layer_norm", f"{T}x{H}", 2 * T * H * b, 5 * T * H * b, ln))

    def ln_fq():
        x, w, bb = rnd(T, H), rnd(H), rnd(H)
        clip = torch.tensor(3.0, device=dev, requires_grad=True)

        def eager():
            y = F.layer_norm(x, (H,), w, bb)
            return torch._fake_quantize_learnable_per_tensor_affine(
                y, (clip / 127).reshape(1), torch.zeros(1, device=dev), -127, 127, 1.0)

        return (lambda: ops.layer_norm_fake_quant(x, w, bb, 1e-5, clip)[1]), eager, x

    cases.append(("layer_norm+fake_quant", f"{T}x{H}", 3 * T * H * b, 8 * T * H * b, ln_fq))

    def bias_act():
        x, bb = rnd(T, I), rnd(I)
        return (lambda: ops.bias_act_dropout(x, bb, "gelu", p, seed)), (lambda: F.dropout(F.gelu(x + bb), p)), x

    cases.append(("bias_gelu_dropout", f"{T}x{I}", 2 * T * I * b, 5 * T * I * b, bias_act))

    def bias_act_fq():
        x, bb = rnd(T, I), rnd(I)
        clip = torch.tensor(3.0, device=dev, requires_grad=True)

        def eager():
            y = F.dropout(F.gelu(x + bb), p)
            return torch._fake_quantize_learnable_per_tensor_affine(
                y, (clip / 127).reshape(1), torch.zeros(1, device=dev), -127, 127, 1.0)

        return (lambda: ops.bias_act_dropout_fake_quant(x, bb, "gelu", p, seed, clip)), eager, x

    cases.append(("bias_gelu_dropout+fake_quant", f"{T}x{I}", 2 * T * I * b, 5 * T * I * b, bias_act_fq))

    def bdr():
        x, bb, r = rnd(T, H), rnd(H), rnd(T, H)
        return (lambda: ops.bias_dropout_residual(x, bb, r, p, seed)), (lambda: r + F.dropout(x + bb, p)), x

    cases.append(("bias_dropout_residual", f"{T}x{H}", 3 * T * H * b, 5 * T * H * b, bdr))

    B, nH, L = T // 256, 16, 256

    def softmax():
        s = rnd(B, nH, L, L)
        mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        mask[::2, L - L // 8:] = True
        scale = 0.125

        def eager():
            z = (s * scale).masked_fill(mask[:, None, None, :], float("-inf"))
            return F.dropout(torch.softmax(z, -1), p)

        return (lambda: ops.masked_softmax(s, mask, False, p, seed, scale=scale)), eager, s

    n = B * nH * L * L
    cases.append(("masked_softmax_dropout", f"{B}x{nH}x{L}x{L}", 3 * n * b, 6 * n * b, softmax))

    def emb():
        Bt, Lt = T // 256, 256
        tok = torch.randint(1, V, (Bt, Lt), device=dev)
        table, pos = rnd(V, H), rnd(1024, H, grad=False)
        sc = math.sqrt(H)

        def eager():
            e = F.embedding(tok, table) * sc + pos[:Lt]
            return F.dropout(e.masked_fill((tok == 0)[..., None], 0), p)

        return (lambda: ops.embedding(tok, table, pos, sc, 0, 0, p, seed)), eager, table

    cases.append(("embedding", f"{T}x{H} V={V}", 2 * T * H * b, 2 * T * H * b + T * H * (b + 4) + V * H * 6, emb))

    def ce():
        x = rnd(T, V)
        t = torch.randint(1, V, (T,), device=dev)
        return ((lambda: ops.cross_entropy(x, t, 0.1, 0)[0]),
                (lambda: F.cross_entropy(x, t, label_smoothing=0.1, ignore_index=0, reduction="none")), x)

    cases.append(("cross_entropy", f"{T}x{V}", T * V * b, 3 * T * V * b, ce))

    Bh, Lh, nHh = T // 256, 256, 16  # the attention's head split with the QKV bias, and the merge after it

    def split():
        qkv, bb = rnd(Bh, Lh, 3 * H), rnd(3 * H)

        def eager():
            t = (qkv + bb).view(Bh, Lh, 3, nHh, H // nHh).permute(2, 0, 3, 1, 4)
            return tuple(u.contiguous() for u in t.unbind(0))

        return (lambda: ops.split_heads(qkv, bb, nHh, 3)), eager, qkv

    # forward: read qkv, write q, k, v (6 T H b); backward: read their grads, write qkv's (+ the bias's column sum)
    cases.append(("split_heads+bias", f"{Bh}x{Lh}x3x{H} heads={nHh}", 6 * T * H * b, 12 * T * H * b, split))

    def merge():
        ctx = rnd(Bh, nHh, Lh, H // nHh)
        return (lambda: ops.merge_heads(ctx)), (lambda: ctx.transpose(1, 2).reshape(Bh, Lh, H)), ctx

    cases.append(("merge_heads", f"{Bh}x{nHh}x{Lh}x{H // nHh}", 2 * T * H * b, 4 * T * H * b, merge))
    return cases


def bench_kernels(writer: Writer, dtypes, quick: bool, compile_: bool, names=None):
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for name, shape, bytes_f, bytes_fb, make in kernel_cases(dtype, quick):
            if names and name not in names:
                continue
            what = dict(kind="kernel", name=name, dtype=dname, shape=shape)
            made = guarded(writer, dict(what, impl="setup"), make)
            if made is None:
                continue
            ours, eager, leaf = made
            impls = [("eager", eager), ("lsquant", ours)]   # eager first: the others' speedup_vs_eager
            if compile_ and dtype == torch.bfloat16:  # compile time: bf16 only (~5 s per kernel and phase)
                impls.append(("compile", torch.compile(eager)))
            eager_ms = {}
            for impl, fn in impls:
                for phase, nbytes in (("fwd", bytes_f), ("fwd+bwd", bytes_fb)):
                    def step(fn=fn, phase=phase):
                        y = fn()
                        if phase == "fwd+bwd":
                            ys = y if isinstance(y, tuple) else (y,)
                            torch.autograd.backward(ys, [torch.ones_like(t) for t in ys])
                            leaf.grad = None

                    def measure(impl=impl, phase=phase, nbytes=nbytes, step=step):
                        with torch.no_grad() if phase == "fwd" else torch.enable_grad():
                            ms = cuda_time_ms(step)
                            gms = gpu_kernel_ms(step)
                        if impl == "eager":
                            eager_ms[phase] = ms
                        sp = eager_ms.get(phase, float("nan")) / ms if impl != "eager" else 1.0
                        writer.row(name=f"{name} {phase}", impl=impl, wall_ms=ms, gpu_ms=gms,
                                   gbps=nbytes / gms / 1e6 if gms > 0 else float("nan"), speedup_vs_eager=sp,
                                   **{k: v for k, v in what.items() if k not in ("name", "kind", "impl")}, kind="kernel")

                    guarded(writer, dict(what, impl=impl, name=f"{name} {phase}"), measure)
            del made, ours, eager, leaf, impls
            torch.cuda.empty_cache()


# ---- layers --------------------------------------------------------------------------------------------------

class TorchFakeQuantEncoderLayer(nn.Module):
    """The same layer in PyTorch ops with torch's fake quantization: per-tensor learnable input clips
    (torch._fake_quantize_learnable_per_tensor_affine) and per-channel weight fake-quant from the weight's
    range (torch.fake_quantize_per_channel_affine) on the four linears; SDPA attention; pre-LN."""

    def __init__(self, H, nH, I, p):
        super().__init__()
        self.nH, self.p = nH, p
        self.qkv, self.out, self.fc1, self.fc2 = nn.Linear(H, 3 * H), nn.Linear(H, H), nn.Linear(H, I), nn.Linear(I, H)
        self.ln1, self.ln2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.scales = nn.Parameter(torch.full((4,), 4.0 / 127))
        self.register_buffer("zp", torch.zeros(1))

    def _lin(self, i, lin, x):
        x = torch._fake_quantize_learnable_per_tensor_affine(x, self.scales[i:i + 1], self.zp, -127, 127, 1.0)
        w = lin.weight
        s = (w.detach().abs().amax(1).float() / 127).clamp(min=1e-8)
        w = torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0, -127, 127)
        return F.linear(x, w, lin.bias)

    def forward(self, x, key_padding_mask=None):
        B, L, H = x.shape
        h = self.ln1(x)
        q, k, v = (t.view(B, L, self.nH, -1).transpose(1, 2) for t in self._lin(0, self.qkv, h).chunk(3, -1))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + F.dropout(self._lin(1, self.out, a.transpose(1, 2).reshape(B, L, H)), self.p, self.training)
        h = F.dropout(F.relu(self._lin(2, self.fc1, self.ln2(x))), self.p, self.training)
        return x + F.dropout(self._lin(3, self.fc2, h), self.p, self.training)


class _TorchLayerPadded(nn.Module):
    """nn.TransformerEncoderLayer called as f(x, key_padding_mask): make_graphed_callables takes tensor arguments
    only, in forward's positional order (the mask is torch's third argument)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, key_padding_mask):
        return self.layer(x, src_key_padding_mask=key_padding_mask)


def layer_impls(H, nH, I, dtype, p, compile_: bool, x_amp, mask):
    """name -> (build, autocast?, captured per shape?). A captured implementation is built for one input shape
    (CUDA graphs have fixed shapes): build(x, mask) -> callable; the others build() -> module, reused across token
    counts. The torch graph variants run in bf16 only (to keep the run near 5 minutes)."""
    cfg = TransformerEncoderLayer.get_config(max_batch_tokens=16384, max_seq_len=256, hidden_size=H,
                                             intermediate_size=I, nhead=nH, attn_prob_dropout_ratio=p,
                                             activation_dropout_ratio=p, hidden_dropout_ratio=p, pre_layer_norm=True)
    impls = {}

    def ours():
        return TransformerEncoderLayer(cfg).to("cuda", dtype).train()

    def ours_qat():
        m = ours()
        lsquant.calibrate(m, [(x_amp.to(dtype), mask)], progress=False)
        m.apply(lsquant.qat_mode)
        return m

    def torch_layer():
        return nn.TransformerEncoderLayer(H, nH, I, dropout=p, batch_first=True, norm_first=True).cuda().train()

    def ours_graph(x, mask):
        return graphed(ours(), (x.to(dtype).requires_grad_(), mask))

    def ours_qat_graph(x, mask):
        return graphed(ours_qat(), (x.to(dtype).requires_grad_(), mask))

    def torch_graph(x, mask):
        # autocast must not cache casts across a capture (make_graphed_callables refuses it); the step runs under
        # the same autocast(cache_enabled=False)
        m = _TorchLayerPadded(torch_layer())
        with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            return torch.cuda.make_graphed_callables(m, (x.clone().requires_grad_(), mask))

    def torch_compile_ro():
        # cudagraph trees: one graph per shape, recorded on the first calls of that shape
        return torch.compile(torch_layer(), mode="reduce-overhead")

    # baselines first, so that each lsquant row can quote its speedups
    impls["torch_amp"] = (torch_layer, True, False)
    if compile_:
        impls["torch_amp_compile"] = (lambda: torch.compile(torch_layer()), True, False)
    if dtype == torch.bfloat16:
        impls["torch_amp_graph"] = (torch_graph, True, True)
        if compile_:
            impls["torch_amp_compile_ro"] = (torch_compile_ro, True, False)
    impls["torch_fakequant_amp"] = (lambda: TorchFakeQuantEncoderLayer(H, nH, I, p).cuda().train(), True, False)
    impls["lsquant"] = (ours, False, False)
    impls["lsquant_qat"] = (ours_qat, False, False)
    impls["lsquant_graph"] = (ours_graph, False, True)
    impls["lsquant_qat_graph"] = (ours_qat_graph, False, True)

    def ours_no_attn_dropout():  # attention through SDPA (no probability dropout): the other attention path
        c = TransformerEncoderLayer.get_config(**{**cfg.to_dict(), "attn_prob_dropout_ratio": 0.0})
        return TransformerEncoderLayer(c).to("cuda", dtype).train()

    impls["lsquant_attn_p0"] = (ours_no_attn_dropout, False, False)
    return impls


def _note(impl: str, ms: float, times: dict, first: float) -> str:
    """The comparisons each row's note quotes (the issue's targets), from the rows measured before it."""
    note = f"first call {first:.1f}s"

    def vs(other, label, inverse=False):
        t = times.get(other)
        if t:
            return f"; {label} {(ms / t) if inverse else (t / ms):.2f}x"
        return ""

    if impl in ("lsquant", "lsquant_graph"):
        note += vs("torch_amp_compile", "vs torch.compile")
    if impl == "lsquant_graph":
        note += vs("torch_amp_compile_ro", "vs torch.compile reduce-overhead")
        note += vs("torch_amp_graph", "vs torch AMP graphed")
        note += vs("lsquant", "vs lsquant eager")
    if impl == "lsquant_qat":
        note += vs("lsquant", "QAT/float time", inverse=True)
        note += vs("torch_fakequant_amp", "vs torch fake-quant")
    if impl == "lsquant_qat_graph":
        note += vs("lsquant_graph", "QAT/float time", inverse=True)
        note += vs("torch_fakequant_amp", "vs torch fake-quant")
        note += vs("torch_amp", "vs torch AMP eager")
    return note


def bench_layers(writer: Writer, dtypes, quick: bool, compile_: bool):
    sizes = [(512, 8, 2048), (1024, 16, 4096)]
    token_counts = [4096, 8192, 16384]
    if quick:
        sizes, token_counts = sizes[:1], [4096]
    L, p = 256, 0.1
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for H, nH, I in sizes:
            # one module per implementation, reused across token counts (torch.compile then recompiles once,
            # with a dynamic batch dimension, instead of once per shape)
            modules, impls = {}, None
            for T in token_counts:
                B = T // L
                x = torch.randn(B, L, H, device="cuda")
                mask = torch.zeros(B, L, dtype=torch.bool, device="cuda")
                mask[::2, L - L // 8:] = True  # half the sequences padded by 1/8
                gy = torch.randn(B, L, H, device="cuda", dtype=dtype)
                if impls is None:
                    impls = layer_impls(H, nH, I, dtype, p, compile_ and dtype == torch.bfloat16, x, mask)
                shape = f"B={B} L={L} H={H} I={I} heads={nH} p={p}"
                times = {}
                for impl, (build, amp, per_shape) in impls.items():
                    what = dict(kind="layer", name="encoder fwd+bwd", impl=impl, dtype=dname, shape=shape,
                                tokens=T, hidden=H)

                    def run(build=build, amp=amp, per_shape=per_shape, impl=impl, what=what, x=x, mask=mask,
                            gy=gy):
                        base_mem = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        t0 = time.perf_counter()
                        if per_shape:  # captured for this shape; the capture's warm-up steps give the peak
                            m = build(x if amp else x.to(dtype), mask)
                            torch.cuda.synchronize()
                            capture_peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
                        elif impl not in modules:
                            modules[impl] = build()
                        if not per_shape:
                            m = modules[impl]
                        xin = (x if amp else x.to(dtype)).requires_grad_()
                        torch_api = impl in ("torch_amp", "torch_amp_compile", "torch_amp_compile_ro")
                        ro = impl == "torch_amp_compile_ro"
                        params = list(m.parameters())

                        def step():
                            if ro:  # a new step for cudagraph trees: the previous step's outputs are dead
                                torch.compiler.cudagraph_mark_step_begin()
                            with torch.autocast("cuda", dtype=dtype, enabled=amp, cache_enabled=not per_shape):
                                y = m(xin, src_key_padding_mask=mask) if torch_api else m(xin, mask)
                            y.backward(gy.to(y.dtype))
                            xin.grad = None
                            for q in params:
                                q.grad = None

                        step()  # first call (compiles; for graphs: the first replay)
                        first = time.perf_counter() - t0
                        ms = cuda_time_ms(step, warmup=3, iters=10)
                        gms = gpu_kernel_ms(step, iters=3)
                        mem = capture_peak if per_shape else peak_mb(step)
                        times[impl] = ms
                        base = times.get("torch_amp")
                        writer.row(wall_ms=ms, gpu_ms=gms if gms > 0 else float("nan"), peak_mb=mem,
                                   speedup_vs_eager=(base / ms) if base else float("nan"),
                                   note=_note(impl, ms, times, first), **what)

                    guarded(writer, what, run)
                    gc.collect()  # a graphed module and its forward refer to each other: free its graph memory now
                    torch.cuda.empty_cache()
            del modules


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="CSV file (appended); default "
                    "bench/results/layers_<gpu>.csv")
    ap.add_argument("--quick", action="store_true", help="one shape per kernel, one layer size, bf16 only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--only", choices=["kernels", "layers"], default=None)
    ap.add_argument("--kernels", nargs="+", default=None, help="only these kernel cases (names as in the CSV, "
                    "without the phase), e.g. split_heads+bias merge_heads")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_layers: needs a CUDA GPU", file=sys.stderr)
        return 2
    out = args.out or Path(__file__).resolve().parent / "results" / f"layers_{gpu_slug()}.csv"
    writer = Writer(out)
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]
    t0 = time.time()
    ops.load()  # build once up front so that the first measurement does not include it
    print(f"extension ready in {time.time() - t0:.1f}s; writing {out}", flush=True)
    warm_gpu()
    if not args.no_compile:
        # every compiled kernel, layer size and mode adds cache entries for the same code objects (the default
        # limit of 8 would silently run the later ones eagerly)
        import importlib

        dynamo = importlib.import_module("torch._dynamo")  # (`import torch._dynamo` would make torch local)
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    if args.only in (None, "kernels"):
        bench_kernels(writer, dtypes, args.quick, not args.no_compile, args.kernels)
    if args.only in (None, "layers"):
        bench_layers(writer, dtypes, args.quick, not args.no_compile)
    print(f"done in {time.time() - t0:.0f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
