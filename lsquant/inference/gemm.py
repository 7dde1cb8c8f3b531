"""int8 GEMM with a fused epilogue: the Python API, the CPU reference and the CUDA backends.

``y = epilogue(x_q @ w_q.T)``: activations ``x_q`` int8 ``(..., K)`` times weights ``w_q`` int8 ``(N, K)``
(the ``nn.Linear`` layout), accumulated exactly in int32, then the epilogue. The epilogue's arithmetic is
fixed here, so that every backend (cuBLASLt + the CUDA epilogue kernel, the fused Triton kernel, the CPU
reference) can be compared bit for bit:

1. ``alpha[n] = x_scale * w_scale[n]`` in fp32 (one rounding), with ``x_scale = x_clip / 127`` and
   ``w_scale = w_clip / 127`` from :func:`lsquant.quant.ref.scale_and_inv` (the project's quantization math);
2. ``v = fp32(acc[m, n]) * alpha[n]`` (int32 -> fp32 rounds to nearest even, then one fp32 rounding);
3. ``v = v + bias[n]`` (one fp32 rounding; bias is converted to fp32 first; never fused into an FMA);
4. ``v = relu(v)`` or ``gelu(v)`` (erf form, ``torch.nn.functional.gelu(approximate="none")``) or ``v``;
5. int8 output: ``q = clamp(round(v * out_inv_scale), -127, 127)`` with ``out_inv_scale = 1 / (out_clip /
   127)`` as in :func:`lsquant.quant.ref.quantize_ref` (round half to even); float output: ``v`` rounded to
   fp16 / bf16 (nearest even) or kept in fp32; int32 output: ``acc`` itself (no epilogue).

Exactness: int32 and int8 outputs are bit-exact across backends (GELU aside: its erf differs by an ulp
between libraries, so an int8 output after GELU may differ by 1 where ``v * out_inv_scale`` lies within an
ulp of a rounding boundary; measured and bounded in the tests). Float outputs differ only by the last
rounding of GELU. The "dequant" backend (an fp16/bf16 GEMM on dequantized operands) is not exact: it is the
fallback for float outputs, held to twice PyTorch's own fp16/bf16 error.

On the CPU the reference runs (:func:`int8_linear_ref`), so engines and tests run without a GPU. On CUDA
the kernel comes from the tuning cache (:mod:`lsquant.inference.gemm_tuner`), else the default: cuBLASLt
with its heuristic algorithm and the CUDA epilogue.
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from lsquant.quant.ref import QMAX, scale_and_inv

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}
OUT_DTYPES = (torch.int32, torch.int8, torch.float16, torch.bfloat16, torch.float32)
OUT_NAMES = {torch.int32: "int32", torch.int8: "int8", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float32: "fp32"}

# cuBLASLt's int8 kernels on Hopper need K, the leading dimensions and the int32 output's leading
# dimension in multiples of 4 and 16-byte aligned pointers; padding K to 16 keeps every row of an int8
# operand 16-byte aligned too (zeros in K change no dot product).
K_ALIGN = 16
N_ALIGN = 4
WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper


# ------------------------------------------------------------------------------------------------------
# Reference (CPU path and oracle)
# ------------------------------------------------------------------------------------------------------

def int8_gemm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: int8 (M, K), b: int8 (N, K) -> int32 (M, N) = a @ b.T, exact.

    Computed in fp64: every product is an integer of magnitude <= 127 * 127 = 16129 and every partial sum
    of K of them is below 16129 * K, exactly representable in fp64's 53-bit mantissa for K < 5.5e11, so
    the fp64 GEMM (fast BLAS, any summation order) is exact; the result is then range-checked into int32.
    """
    _check_int8_operands(a, b)
    acc = a.to(torch.float64) @ b.to(torch.float64).t()
    return acc.to(torch.int32) if acc.numel() == 0 or acc.abs().max() < 2 ** 31 else _overflow(acc)


def _overflow(acc):
    raise OverflowError(f"int8 GEMM accumulator {acc.abs().max().item():.0f} overflows int32 (K too large)")


def gemm_alpha(x_clip: torch.Tensor | float, w_clip: torch.Tensor) -> torch.Tensor:
    """Per-channel output scale alpha[n] = (x_clip / 127) * (w_clip[n] / 127), fp32 (N,).

    x_clip: per-tensor activation clip (scalar); w_clip: per-output-channel weight clips (N,).
    """
    x_clip = torch.as_tensor(x_clip, dtype=torch.float32, device=w_clip.device).reshape(())
    x_scale, _ = scale_and_inv(x_clip)
    w_scale, _ = scale_and_inv(w_clip.reshape(-1))
    return (x_scale * w_scale).to(torch.float32).contiguous()


def epilogue_ref(acc: torch.Tensor, alpha: torch.Tensor | None, bias: torch.Tensor | None = None,
                 activation: str = "none", out_dtype: torch.dtype = torch.bfloat16,
                 out_clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """The epilogue of the module docstring, in plain PyTorch. acc: int32 (M, N); alpha: fp32 (N,); bias:
    (N,) any float dtype or None; out_clip: the output's per-tensor clip (int8 output only) -> (M, N) of
    out_dtype. Separate torch ops, so each fp32 step rounds once, as the kernels do."""
    _check_epilogue_args(activation, out_dtype, out_clip)
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    v = acc.to(torch.float32) * alpha.to(torch.float32)
    if bias is not None:
        v = v + bias.to(torch.float32)
    if activation == "relu":
        v = torch.relu(v)
    elif activation == "gelu":
        v = F.gelu(v)
    if out_dtype == torch.int8:
        clip = torch.as_tensor(out_clip, dtype=torch.float32, device=v.device).reshape(())
        _, inv = scale_and_inv(clip)
        return torch.clamp(torch.round(v * inv), -QMAX, QMAX).to(torch.int8)
    return v.to(out_dtype)


def int8_linear_ref(x_q: torch.Tensor, w_q: torch.Tensor, x_clip=None, w_clip: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, activation: str = "none",
                    out_dtype: torch.dtype = torch.bfloat16, out_clip=None) -> torch.Tensor:
    """Reference of :func:`int8_linear`: x_q int8 (..., K), w_q int8 (N, K) -> (..., N) of out_dtype."""
    lead = x_q.shape[:-1]
    acc = int8_gemm_ref(x_q.reshape(-1, x_q.shape[-1]), w_q)
    alpha = None if out_dtype == torch.int32 else gemm_alpha(x_clip, w_clip.to(acc.device))
    y = epilogue_ref(acc, alpha, bias, activation, out_dtype, out_clip)
    return y.reshape(*lead, w_q.shape[0])


def _check_int8_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8 GEMM takes int8 operands, got {a.dtype} and {b.dtype}: quantize them first "
                        "(lsquant.quantize)")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8 GEMM shapes: a (M, K) and b (N, K) with the same K, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _check_epilogue_args(activation: str, out_dtype: torch.dtype, out_clip) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[OUT_NAMES[d] for d in OUT_DTYPES]}, got {out_dtype}")
    if out_dtype == torch.int8 and out_clip is None:
        raise ValueError("an int8 output is re-quantized: pass out_clip (the output's per-tensor clip)")
    if out_dtype == torch.int32 and activation != "none":
        raise ValueError("an int32 output is the raw accumulator: it has no activation")


# ------------------------------------------------------------------------------------------------------
# Kernel choices and the prepared layer
# ------------------------------------------------------------------------------------------------------

def default_choice() -> dict:
    """The kernel used without a tuning-cache entry: cuBLASLt's heuristic algorithm + the CUDA epilogue."""
    return {"backend": "cublaslt", "algo": None}


def choice_name(choice: dict) -> str:
    """Short, stable name of a kernel choice (CSV column, summary table)."""
    b = choice.get("backend")
    if b == "cublaslt":
        a = choice.get("algo")
        chunk = f"-m{choice['chunk_m']}" if choice.get("chunk_m") else ""
        if not a:
            return "cublaslt:default" + chunk
        return f"cublaslt:a{a[0]}-t{a[1]}-s{a[2]}-k{a[3]}" + (f"-c{a[8]}" if len(a) > 8 and a[8] else "") + chunk
    if b == "triton":
        c = choice["config"]
        return (f"triton:{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}-w{c['num_warps']}-s{c['num_stages']}"
                f"-g{c.get('GROUP_M', 8)}")
    return str(b)


_workspaces: dict[int, torch.Tensor] = {}
_ws_lock = threading.Lock()


def _workspace(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _ws_lock:
        ws = _workspaces.get(idx)
        if ws is None:
            ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            _workspaces[idx] = ws
    return ws


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _aligned16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


@dataclass(eq=False)
class Int8Linear:
    """A prepared int8 linear layer: what engines and layers build once at start-up and call per batch.

    weight: int8 (N, K); w_clip: fp32 (N,) per-output-channel clips; x_clip: the activation's per-tensor
    clip (static at inference); bias: (N,) or None; activation: "none" | "relu" | "gelu"; out_dtype: int32
    (raw accumulator, clips unused) | int8 (needs out_clip) | fp16 | bf16 | fp32.

    ``layer(x_q)``: x_q int8 (..., K) -> (..., N) of out_dtype. The kernel for each M bucket is looked up
    once in the tuning cache (``cache``: a :class:`~lsquant.inference.gemm_tuner.TuningCache`, default the
    process-wide one) and memoised; without an entry, :func:`default_choice`. If a cached kernel fails to
    run (say, a Triton version change), a warning is given and the default is used from then on.
    """

    weight: torch.Tensor
    w_clip: torch.Tensor | None = None
    x_clip: torch.Tensor | float | None = None
    bias: torch.Tensor | None = None
    activation: str = "none"
    out_dtype: torch.dtype = torch.bfloat16
    out_clip: torch.Tensor | float | None = None
    cache: object | None = None
    choices: dict = field(default_factory=dict)  # M bucket -> kernel choice (dict), memoised

    def __post_init__(self):
        w = self.weight
        if w.dtype != torch.int8 or w.dim() != 2:
            raise TypeError(f"weight must be int8 (N, K), got {w.dtype} {tuple(w.shape)}")
        _check_epilogue_args(self.activation, self.out_dtype, self.out_clip)
        self.N, self.K = w.shape
        self.weight = w.contiguous()
        dev = w.device
        if self.out_dtype != torch.int32:
            if self.w_clip is None or self.x_clip is None:
                raise ValueError("a scaled output needs x_clip (activation clip) and w_clip (N weight clips)")
            w_clip = torch.as_tensor(self.w_clip, dtype=torch.float32, device=dev).reshape(-1)
            if w_clip.numel() == 1:
                w_clip = w_clip.expand(self.N)
            if w_clip.numel() != self.N:
                raise ValueError(f"w_clip has {w_clip.numel()} values, the weight has {self.N} output channels")
            x_clip = torch.as_tensor(self.x_clip, dtype=torch.float32, device=dev).reshape(())
            self.alpha = gemm_alpha(x_clip, w_clip)
            self.x_scale_t = scale_and_inv(x_clip)[0]  # on the device: no host copy per call (CUDA graphs)
        else:
            self.alpha = None
            self.x_scale_t = None
        if self.bias is not None:
            if self.bias.numel() != self.N:
                raise ValueError(f"bias has {self.bias.numel()} values, expected {self.N}")
            self.bias32 = self.bias.detach().to(device=dev, dtype=torch.float32).reshape(-1).contiguous()
        else:
            self.bias32 = None
        self.out_clip_t = (torch.as_tensor(self.out_clip, dtype=torch.float32, device=dev).reshape(1).contiguous()
                           if self.out_dtype == torch.int8 else None)
        self.out_inv_t = (scale_and_inv(self.out_clip_t)[1].contiguous() if self.out_clip_t is not None else None)
        self._w_pad = None
        self._w_deq = None
        self._failed: set[str] = set()

    # -- operand preparation (once) --

    @property
    def K_pad(self) -> int:
        return _round_up(self.K, K_ALIGN)

    @property
    def N_pad(self) -> int:
        return _round_up(self.N, N_ALIGN)

    def w_padded(self) -> torch.Tensor:
        """int8 (N_pad, K_pad): zero rows and columns added for cuBLASLt's alignment rules."""
        if self._w_pad is None:
            w = self.weight
            if self.K_pad != self.K or self.N_pad != self.N or not _aligned16(w):
                w = F.pad(w, (0, self.K_pad - self.K, 0, self.N_pad - self.N)).contiguous()
            self._w_pad = w
        return self._w_pad

    def w_dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """(w_q * w_scale[n]) in dtype (N, K), for the dequant fallback; x_scale is applied on x."""
        if self._w_deq is None or self._w_deq.dtype != dtype:
            w_scale, _ = scale_and_inv(torch.as_tensor(self.w_clip, dtype=torch.float32,
                                                       device=self.weight.device).reshape(-1, 1))
            self._w_deq = (self.weight.float() * w_scale).to(dtype).contiguous()
        return self._w_deq

    # -- dispatch --

    def __call__(self, x_q: torch.Tensor, choice: dict | None = None) -> torch.Tensor:
        if x_q.dtype != torch.int8:
            raise TypeError(f"x_q must be int8, got {x_q.dtype}: quantize the activations first")
        if x_q.shape[-1] != self.K:
            raise ValueError(f"x_q has {x_q.shape[-1]} features, the weight expects {self.K}")
        if x_q.device != self.weight.device:
            raise ValueError(f"x_q is on {x_q.device}, the weight on {self.weight.device}")
        lead = x_q.shape[:-1]
        x2 = x_q.reshape(-1, self.K)
        if not x_q.is_cuda:
            acc = int8_gemm_ref(x2, self.weight)
            y = epilogue_ref(acc, self.alpha, self.bias32, self.activation, self.out_dtype, self.out_clip_t)
            return y.reshape(*lead, self.N)
        M = x2.shape[0]
        if M == 0:
            return torch.empty(*lead, self.N, dtype=self.out_dtype, device=x_q.device)
        if choice is None:
            choice = self.choice_for(M)
        try:
            y = run_choice(self, x2, choice)
        except Exception as e:  # a cached kernel that cannot run here must not take the engine down
            name = choice_name(choice)
            is_default = choice == default_choice()
            if name not in self._failed:
                warnings.warn(f"lsquant int8 GEMM: kernel {name} failed for M={M}, N={self.N}, K={self.K} "
                              f"({type(e).__name__}: {e}); using "
                              f"{'a fallback' if is_default else 'the default kernel'}", RuntimeWarning,
                              stacklevel=2)
                self._failed.add(name)
            if is_default:
                y = _run_fallback(self, x2)
            else:
                from .gemm_tuner import m_bucket

                self.choices[m_bucket(M)] = default_choice()
                y = self(x2)
        return y.reshape(*lead, self.N)

    def preload(self, tokens) -> dict:
        """Look up the kernels of several token counts now (engine start-up), so that no lookup happens
        while serving. Returns {M bucket: choice}."""
        if self.weight.is_cuda:
            for m in tokens:
                self.choice_for(int(m))
        return dict(self.choices)

    def choice_for(self, M: int) -> dict:
        from .gemm_tuner import global_cache, m_bucket

        b = m_bucket(M)
        c = self.choices.get(b)
        if c is None:
            cache = self.cache if self.cache is not None else global_cache()
            c = cache.lookup(M, self.N, self.K, self.out_dtype) or default_choice()
            self.choices[b] = c
        return c


def run_choice(layer: Int8Linear, x2: torch.Tensor, choice: dict) -> torch.Tensor:
    """Run one kernel choice. x2: int8 (M, K) CUDA -> (M, N) of layer.out_dtype."""
    backend = choice.get("backend")
    if backend == "cublaslt":
        return _run_cublaslt(layer, x2, choice.get("algo"), choice.get("chunk_m"))
    if backend == "triton":
        from .gemm_triton import int8_linear_triton

        return int8_linear_triton(x2, layer.weight, layer.alpha, layer.bias32, ACTIVATIONS[layer.activation],
                                  layer.out_dtype, layer.out_inv_t, choice["config"])
    if backend == "dequant":
        return _run_dequant(layer, x2)
    raise ValueError(f"unknown int8 GEMM backend {backend!r}")


_ALGO_IDS: dict = {}  # (N_pad, K_pad) -> cuBLASLt algorithm ids offered for that shape


def _check_algo_id(ext, algo, M: int, N: int, K: int) -> None:
    """Refuse an algorithm id that cuBLASLt does not offer for this shape (heuristic or enumerated lists):
    passed from a stale or foreign cache file, such an id crashed cuBLASLt (a segfault) instead of failing."""
    key = (N, K)
    if key not in _ALGO_IDS:
        ids: set[int] = set()
        for enumerate_, most in ((False, 32), (True, 2048)):
            try:
                ids.update(int(a[0]) for a in ext.gemm_int8_algos(M, N, K, N, WORKSPACE_BYTES, most, enumerate_))
            except Exception:  # noqa: BLE001 - no list: nothing can be checked against it
                pass
        _ALGO_IDS[key] = ids
    if int(algo[0]) not in _ALGO_IDS[key]:
        raise ValueError(f"cuBLASLt algorithm id {algo[0]} is not offered for N={N}, K={K} (offered: "
                         f"{sorted(_ALGO_IDS[key])}); the tuning cache entry is stale")


def cublaslt_i32(x2: torch.Tensor, w_pad: torch.Tensor, algo=None) -> torch.Tensor:
    """int32 (M, N_pad) = x2 (M, K) @ w_pad (N_pad, K_pad).T with cuBLASLt; x2 is padded to K_pad and
    copied to an aligned buffer when needed."""
    from lsquant.ops.build import load

    if algo:
        _check_algo_id(load(), algo, x2.shape[0], w_pad.shape[0], w_pad.shape[1])
    K_pad = w_pad.shape[1]
    if x2.shape[1] != K_pad:
        x2 = F.pad(x2, (0, K_pad - x2.shape[1]))
    if not x2.is_contiguous() or not _aligned16(x2):
        x2 = x2.contiguous() if _aligned16(x2.contiguous()) else x2.clone()
    acc = torch.empty(x2.shape[0], w_pad.shape[0], dtype=torch.int32, device=x2.device)
    load().gemm_int8_i32(x2, w_pad, acc, list(algo) if algo else [], _workspace(x2.device))
    return acc


def _run_cublaslt(layer: Int8Linear, x2: torch.Tensor, algo, chunk_m: int | None = None) -> torch.Tensor:
    """cuBLASLt int32 GEMM + the CUDA epilogue. With chunk_m, rows go in chunks of chunk_m through one int32
    buffer small enough to stay in L2 (50 MB): each chunk's accumulator is rewritten before it is evicted,
    so it never makes the round trip to HBM (at 8192 x 4096 that round trip is 268 MB, ~80 us, more than
    the bf16 GEMM's whole time)."""
    from lsquant.ops.build import load

    ext = load()
    act = ACTIVATIONS[layer.activation]
    M = x2.shape[0]
    if chunk_m is None or M <= chunk_m or layer.out_dtype == torch.int32:
        acc = cublaslt_i32(x2, layer.w_padded(), algo)
        if layer.out_dtype == torch.int32:
            return acc[:, :layer.N] if layer.N_pad != layer.N else acc
        return ext.gemm_int8_epilogue(acc, layer.N, layer.alpha, layer.bias32, act, layer.out_dtype,
                                      layer.out_clip_t, None)
    w = layer.w_padded()
    if x2.shape[1] != w.shape[1]:
        x2 = F.pad(x2, (0, w.shape[1] - x2.shape[1]))
    if not x2.is_contiguous() or not _aligned16(x2):
        x2 = x2.contiguous() if _aligned16(x2.contiguous()) else x2.clone()
    out = torch.empty(M, layer.N, dtype=layer.out_dtype, device=x2.device)
    buf = torch.empty(chunk_m, w.shape[0], dtype=torch.int32, device=x2.device)
    ws = _workspace(x2.device)
    for r0 in range(0, M, chunk_m):
        r1 = min(M, r0 + chunk_m)
        acc = buf[:r1 - r0]
        # row slices of contiguous tensors are contiguous; K_pad % 16 == 0 keeps them 16-byte aligned
        ext.gemm_int8_i32(x2[r0:r1], w, acc, list(algo) if algo else [], ws)
        ext.gemm_int8_epilogue(acc, layer.N, layer.alpha, layer.bias32, act, layer.out_dtype, layer.out_clip_t,
                               out[r0:r1])
    return out


def _run_fallback(layer: Int8Linear, x2: torch.Tensor) -> torch.Tensor:
    """Where cuBLASLt's default refuses a shape: M padded to 32 rows (torch._int_mm, on the same library,
    refuses M <= 16), else the exact fp64 GEMM (every int8 partial sum is an integer below 2^53) + the
    epilogue kernel, else everything in PyTorch. Slow but exact: never a failure."""
    from lsquant.ops.build import load

    M = x2.shape[0]
    if M < 32:
        try:
            return _run_cublaslt(layer, F.pad(x2, (0, 0, 0, 32 - M)), None)[:M]
        except Exception:
            pass
    acc = (x2.double() @ layer.weight.double().t()).to(torch.int32)
    if layer.out_dtype == torch.int32:
        return acc
    try:
        return load().gemm_int8_epilogue(acc, layer.N, layer.alpha, layer.bias32, ACTIVATIONS[layer.activation],
                                         layer.out_dtype, layer.out_clip_t, None)
    except Exception:
        return epilogue_ref(acc, layer.alpha, layer.bias32, layer.activation, layer.out_dtype, layer.out_clip_t)


def _run_dequant(layer: Int8Linear, x2: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 GEMM on dequantized operands (float outputs only): PyTorch's own precision."""
    if layer.out_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("the dequant backend produces fp16/bf16 outputs only")
    dt = layer.out_dtype
    x_deq = (x2.to(dt) * layer.x_scale_t.to(dt))  # int8 values are exact in fp16/bf16; one rounding by the scale
    bias = layer.bias32.to(dt) if layer.bias32 is not None else None
    y = F.linear(x_deq, layer.w_dequant(dt), bias)
    if layer.activation == "relu":
        y = torch.relu(y)
    elif layer.activation == "gelu":
        y = F.gelu(y)
    return y


# ------------------------------------------------------------------------------------------------------
# Functional API
# ------------------------------------------------------------------------------------------------------

def int8_linear(x_q: torch.Tensor, weight: torch.Tensor, x_clip=None, w_clip: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, activation: str = "none",
                out_dtype: torch.dtype = torch.bfloat16, out_clip=None, choice: dict | None = None) -> torch.Tensor:
    """int8 linear with a fused epilogue (see the module docstring for the arithmetic).

    x_q: int8 (..., K); weight: int8 (N, K); x_clip: activation clip (scalar); w_clip: fp32 (N,); bias:
    (N,) or None; activation: "none" | "relu" | "gelu"; out_dtype: torch.int32 | int8 | float16 | bfloat16
    | float32; out_clip: the output clip (int8 output). Returns (..., N) of out_dtype. CPU tensors use the
    reference; CUDA tensors the tuned kernel (or ``choice``). Layers called repeatedly should build an
    :class:`Int8Linear` once instead (weight padding and scales are then prepared once).
    """
    layer = Int8Linear(weight, w_clip=w_clip, x_clip=x_clip, bias=bias, activation=activation,
                       out_dtype=out_dtype, out_clip=out_clip)
    return layer(x_q, choice=choice)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: int8 (M, K), b: int8 (N, K) -> int32 (M, N) = a @ b.T, exact, any shape (like torch._int_mm with
    b transposed, without its M > 16 and multiple-of-8 restrictions)."""
    _check_int8_operands(a, b)
    return int8_linear(a, b, out_dtype=torch.int32)


def tops(M: int, N: int, K: int, ms: float) -> float:
    """Tera-operations per second of an (M, N, K) GEMM taking ms milliseconds (2 ops per multiply-add)."""
    return 2.0 * M * N * K / (ms * 1e-3) / 1e12 if ms > 0 and math.isfinite(ms) else float("nan")
