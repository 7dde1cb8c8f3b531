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
   fp16 / bf16 (nearest even) or kept in fp32; int32 output: ``acc`` itself (no epilogue);
6. optional residual (float outputs only; ``layer(x_q, residual=r)``, ``r`` of the output's dtype and shape
   (..., N)): ``out = round_out(fp32(r) + fp32(round_out(v)))``, where ``round_out`` is step 5's rounding to
   the output dtype: one fp32 add, one rounding, so the result is bit-identical to ``r + layer(x_q)`` in
   PyTorch (which adds fp16 / bf16 in fp32 and rounds once; fp32 has more than twice their precision + 2
   bits, so that equals the correctly rounded fp16 / bf16 sum) with one kernel fewer. The Triton kernels
   do it in their epilogue; cuBLASLt and the fallbacks add the residual with one PyTorch add afterwards.

Exactness: int32 and int8 outputs are bit-exact across backends (GELU aside: its erf differs by an ulp
between libraries, so an int8 output after GELU may differ by 1 where ``v * out_inv_scale`` lies within an
ulp of a rounding boundary; measured and bounded in the tests). Float outputs differ only by the last
rounding of GELU. The "dequant" backend (an fp16/bf16 GEMM of the int8 levels, cast, and the weight scaled by
alpha) is not exact: it is the fallback for float outputs, held to twice PyTorch's own fp16/bf16 error.

On the CPU the reference runs (:func:`int8_linear_ref`), so engines and tests run without a GPU. On CUDA
the kernel comes from the tuning cache (:mod:`lsquant.inference.gemm_tuner`), else the default
(:func:`default_choice`): for M <= 64 (decoding, small batches) where Triton is available, the fused Triton
tiled kernel with 16x32x256 tiles (one kernel, epilogue fused; on an H100 without a cache entry the
cuBLASLt default ran at 0.61-0.75x bf16 at M <= 64 and Transformer shapes, and the tuner chose this config
for most M <= 64 shapes at 1.2-1.9x it: bench/results/gemm_nvidia_h100_80gb_hbm3.csv); otherwise cuBLASLt
with its heuristic algorithm and the CUDA epilogue (two kernels). A kernel that fails to run gives one
warning and falls back: a cached choice to the default, the Triton default to the cuBLASLt default, that
one to :func:`_run_fallback` (exact, never failing).
"""
from __future__ import annotations

import math
import os
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
                 out_clip: torch.Tensor | float | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The epilogue of the module docstring, in plain PyTorch. acc: int32 (M, N); alpha: fp32 (N,); bias:
    (N,) any float dtype or None; out_clip: the output's per-tensor clip (int8 output only); residual: (M, N)
    of out_dtype (float outputs only) -> (M, N) of out_dtype. Separate torch ops, so each fp32 step rounds
    once, as the kernels do."""
    _check_epilogue_args(activation, out_dtype, out_clip)
    _check_residual(residual, out_dtype, tuple(acc.shape))
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
    y = v.to(out_dtype)
    if residual is not None:
        # step 6: the rounded output and the residual added in fp32, rounded once
        y = (residual.to(torch.float32) + y.to(torch.float32)).to(out_dtype)
    return y


def int8_linear_ref(x_q: torch.Tensor, w_q: torch.Tensor, x_clip=None, w_clip: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, activation: str = "none",
                    out_dtype: torch.dtype = torch.bfloat16, out_clip=None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`int8_linear`: x_q int8 (..., K), w_q int8 (N, K) -> (..., N) of out_dtype;
    residual: (..., N) of out_dtype (float outputs) added as step 6 of the module docstring."""
    lead = x_q.shape[:-1]
    N = w_q.shape[0]
    _check_residual(residual, out_dtype, (*lead, N))
    acc = int8_gemm_ref(x_q.reshape(-1, x_q.shape[-1]), w_q)
    alpha = None if out_dtype == torch.int32 else gemm_alpha(x_clip, w_clip.to(acc.device))
    res2 = residual.reshape(-1, N) if residual is not None else None
    y = epilogue_ref(acc, alpha, bias, activation, out_dtype, out_clip, res2)
    return y.reshape(*lead, N)


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


FLOAT_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_residual(residual, out_dtype: torch.dtype, shape: tuple, device=None) -> None:
    """A residual is a tensor of the output's dtype (a float one) and shape (and device, if given)."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a tensor, got {type(residual).__name__}")
    name = OUT_NAMES.get(out_dtype, str(out_dtype))
    if out_dtype not in FLOAT_OUT_DTYPES:
        raise ValueError(f"a residual is added to float outputs only (fp16/bf16/fp32), not to an {name} output")
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {tuple(shape)} (the output's)")
    if residual.dtype != out_dtype:
        raise ValueError(f"residual is {residual.dtype}, expected {out_dtype} (the output dtype, {name})")
    if device is not None and residual.device != device:
        raise ValueError(f"residual is on {residual.device}, expected {device} (the input's device)")


# ------------------------------------------------------------------------------------------------------
# Kernel choices and the prepared layer
# ------------------------------------------------------------------------------------------------------

# The default of small M (decoding): the Triton tiled kernel's (16, 32, 256, w4, s4, g1) config of
# gemm_triton.CONFIGS, which the tuner chose for most M <= 64 Transformer shapes on an H100 (1.2-1.9x the
# cuBLASLt default: bench/results/gemm_nvidia_h100_80gb_hbm3.csv)
DEFAULT_TRITON_MAX_M = 64
DEFAULT_TRITON_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "GROUP_M": 1}


# the fused LayerNorm + GEMM (Int8Linear.ln_call) for decoding's row counts: batch x beams <= 64 (the default
# Triton tiled kernel's range); LSQUANT_LN_GEMM_MAX_M sets another bound (read at import, for comparisons)
LN_FUSED_MAX_M = int(os.environ.get("LSQUANT_LN_GEMM_MAX_M", "64"))


def ln_fused() -> bool:
    """Whether Int8Linear.ln_call fuses the LayerNorm into the GEMM on CUDA: the environment variable
    LSQUANT_LN_GEMM=1 and Triton available. Opt-in until its speed is measured on a GPU (the kernel is tested
    in Triton's interpreter and compiled for sm_90 on the CPU; bench/NOTES_engine.md has the pending run)."""
    if os.environ.get("LSQUANT_LN_GEMM", "0") != "1":
        return False
    from . import gemm_triton

    return gemm_triton.available()


# the residual GEMM with the next sublayer's LayerNorm + quantize in its last programs (Int8Linear.call_ln_next):
# decoding's row counts, as the prologue fusion; LSQUANT_LN_TAIL_MAX_M sets another bound (read at import)
LN_TAIL_MAX_M = int(os.environ.get("LSQUANT_LN_TAIL_MAX_M", "64"))


def ln_tail() -> bool:
    """Whether the int8 engine's decoder step hands each sublayer's LayerNorm to the residual GEMM before it
    (Int8Linear.call_ln_next: one kernel on CUDA with Triton, the two kernels elsewhere): LSQUANT_LN_TAIL=1.
    Opt-in: measured slower on an H100 than the separate LayerNorm under PDL (0.73-0.89x tokens/s at batch 1-8,
    bench/NOTES_engine.md, run G)."""
    return os.environ.get("LSQUANT_LN_TAIL", "0") == "1"


def default_choice(M: int | None = None) -> dict:
    """The kernel used without a tuning-cache entry for M rows (tokens).

    ``M <= 64`` where Triton is available on a CUDA device (:func:`lsquant.inference.gemm_triton.available`):
    the fused Triton tiled kernel with :data:`DEFAULT_TRITON_CONFIG` (one kernel). Otherwise, and without M
    (the original signature), cuBLASLt's heuristic algorithm + the CUDA epilogue (two kernels), which is
    also the first fallback of a failing Triton default."""
    if M is not None and M <= DEFAULT_TRITON_MAX_M:
        from . import gemm_triton

        if gemm_triton.available():
            return {"backend": "triton", "config": dict(DEFAULT_TRITON_CONFIG)}
    return {"backend": "cublaslt", "algo": None}


def fallback_chain(choice: dict, M: int) -> list[dict]:
    """The kernels tried, in order, for a call whose chosen kernel is ``choice``: the choice, then (if it is
    neither) :func:`default_choice` of M, then the cuBLASLt default; after them :func:`_run_fallback`. Each
    step only goes down the list, so a failing default never leads back to itself."""
    lt = default_choice()
    chain = [choice]
    if choice != lt:
        d = default_choice(M)
        if d not in chain:
            chain.append(d)
        if lt not in chain:
            chain.append(lt)
    return chain


def choice_name(choice: dict) -> str:
    """Short, stable name of a kernel choice (CSV column, summary table)."""
    b = choice.get("backend")
    if b == "cublaslt":
        a = choice.get("algo")
        chunk = f"-m{choice['chunk_m']}" if choice.get("chunk_m") else ""
        if not a:
            return "cublaslt:default" + chunk
        return f"cublaslt:a{a[0]}-t{a[1]}-s{a[2]}-k{a[3]}" + (f"-c{a[8]}" if len(a) > 8 and a[8] else "") + chunk
    if b == "cutlass":
        from .gemm_cutlass import CONFIGS

        return f"cutlass:{CONFIGS[choice['config']]}"
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


_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device=None) -> torch.cuda.Stream:
    """The one side stream per device on which the tuner's timings and every engine warm up and capture their
    CUDA graphs. PyTorch keeps a cuBLAS workspace (32 MiB on Hopper) for each stream that ran a cuBLAS call, for
    the life of the process, and the split-K kernel a scratch buffer per stream: a new stream per timing left
    ~300 MB behind per tuned engine (scripts/diag_leak.py), and one per engine a workspace per engine built.
    (Engines are not meant to be driven from several threads at once.)"""
    idx = torch.device(device).index if device is not None else None
    idx = torch.cuda.current_device() if idx is None else idx
    with _ws_lock:
        s = _side_streams.get(idx)
        if s is None:
            s = _side_streams[idx] = torch.cuda.Stream(idx)
    return s


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

    ``layer(x_q, residual=None)``: x_q int8 (..., K) -> (..., N) of out_dtype; ``residual`` (float outputs
    only): a tensor of out_dtype and shape (..., N) added to the output (step 6 of the module docstring,
    bit-identical to ``residual + layer(x_q)``). The kernel for each M bucket is looked up once in the tuning
    cache (``cache``: a :class:`~lsquant.inference.gemm_tuner.TuningCache`, default the process-wide one)
    and memoised; without an entry, :func:`default_choice` (M). If a kernel fails to run (say, a Triton
    version change), one warning is given and the next of :func:`fallback_chain` is used from then on.
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
            self.w_scale_t = scale_and_inv(w_clip)[0]   # (N,): the dequant fallback's unfolded weight scale
            # on the device: no host copy per call (CUDA graphs)
            self.x_scale_t, self.x_inv_t = (t.reshape(1).contiguous() for t in scale_and_inv(x_clip))
            self.x_clip_t = x_clip.reshape(1).contiguous()
        else:
            self.alpha = self.w_scale_t = None
            self.x_scale_t = self.x_inv_t = self.x_clip_t = None
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

    def w_dequant(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(weight in dtype (N, K), bias in dtype or None, folded), made once, for the dequant fallback. folded:
        the weight is w_q * alpha[n] (alpha = w_scale[n] * x_scale), so x is the int8 levels themselves (exact in
        fp16 / bf16): one cast of x, no scaling pass. In fp16 only where every w_q * alpha stays a normal number
        (alpha >= 2^-14): with small clips the product would land among fp16's subnormals (alpha ~ 1e-7 measured
        5x the error of scaling x); otherwise the weight is w_q * w_scale[n] and x is scaled by x_scale."""
        if self._w_deq is None or self._w_deq[0].dtype != dtype:
            folded = dtype != torch.float16 or bool(self.alpha.abs().min() >= 2.0 ** -14)
            scale = self.alpha if folded else self.w_scale_t
            w = (self.weight.float() * scale.reshape(-1, 1)).to(dtype).contiguous()
            self._w_deq = (w, self.bias32.to(dtype) if self.bias32 is not None else None, folded)
        return self._w_deq

    # -- dispatch --

    def __call__(self, x_q: torch.Tensor, choice: dict | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        if x_q.dtype != torch.int8:
            raise TypeError(f"x_q must be int8, got {x_q.dtype}: quantize the activations first")
        if x_q.shape[-1] != self.K:
            raise ValueError(f"x_q has {x_q.shape[-1]} features, the weight expects {self.K}")
        if x_q.device != self.weight.device:
            raise ValueError(f"x_q is on {x_q.device}, the weight on {self.weight.device}")
        lead = x_q.shape[:-1]
        _check_residual(residual, self.out_dtype, (*lead, self.N), x_q.device)
        x2 = x_q.reshape(-1, self.K)
        res2 = residual.reshape(-1, self.N) if residual is not None else None
        if not x_q.is_cuda:
            acc = int8_gemm_ref(x2, self.weight)
            y = epilogue_ref(acc, self.alpha, self.bias32, self.activation, self.out_dtype, self.out_clip_t, res2)
            return y.reshape(*lead, self.N)
        M = x2.shape[0]
        if M == 0:
            return torch.empty(*lead, self.N, dtype=self.out_dtype, device=x_q.device)
        return self._dispatch(x2, choice, res2).reshape(*lead, self.N)

    def ln_call(self, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-5,
                residual: torch.Tensor | None = None, q_out: torch.Tensor | None = None) -> torch.Tensor:
        """``layer(quantize(LayerNorm(x), x_clip), residual)`` (a pre-LN sublayer's first linear), the values of
        ``ops.layer_norm_quant`` then ``layer``: x float (..., K), ln_weight / ln_bias (K,) of x's dtype.

        On CUDA with at most :data:`LN_FUSED_MAX_M` rows (decoding), where :func:`ln_fused` (opt-in:
        LSQUANT_LN_GEMM=1), one Triton kernel does both: the LayerNorm and the quantize in the GEMM's prologue,
        no int8 tensor in memory, one launch fewer. Its statistics are summed in another order than the
        LayerNorm kernel's, so an input within an ulp of a rounding boundary may land on the neighbouring int8
        level (measured in the tests); the GEMM and epilogue are the tiled kernel's. Otherwise, and if the fused kernel fails (one
        warning), the two kernels. q_out: int8 (..., K), given the quantized input as computed (tests)."""
        if x.shape[-1] != self.K:
            raise ValueError(f"x has {x.shape[-1]} features, the weight expects {self.K}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
        if self.out_dtype == torch.int32:
            raise ValueError("ln_call needs a scaled output (x_clip): the input is quantized with it")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.K)
        M = x2.shape[0]
        if x.is_cuda and 0 < M <= LN_FUSED_MAX_M and ln_fused() and "ln_tiled" not in self._failed:
            from .gemm_triton import int8_ln_linear_triton

            _check_residual(residual, self.out_dtype, (*lead, self.N), x.device)
            try:
                y = int8_ln_linear_triton(
                    x2, ln_weight, ln_bias, eps, self.x_inv_t, self.weight, self.alpha, self.bias32,
                    ACTIVATIONS[self.activation], self.out_dtype, self.out_inv_t, self.ln_config(M),
                    residual.reshape(-1, self.N) if residual is not None else None,
                    q_out.view(-1, self.K) if q_out is not None else None)
                return y.reshape(*lead, self.N)
            except Exception as e:   # as _dispatch: a kernel that cannot run here must not take the engine down
                warnings.warn(f"lsquant int8 LayerNorm + GEMM for M={M}, N={self.N}, K={self.K} failed "
                              f"({type(e).__name__}: {e}); using LayerNorm, then the GEMM", RuntimeWarning,
                              stacklevel=2)
                self._failed.add("ln_tiled")
        from lsquant import ops

        from . import pdl   # the LayerNorm between two PDL-launched GEMMs keeps the chain (lsquant.inference.pdl)

        q = ops.layer_norm_quant(x, ln_weight, ln_bias, eps, self.x_clip_t, float_out=False,
                                 pdl=pdl.layernorm(x.device))[1]
        if q_out is not None:
            q_out.copy_(q)
        return self(q, residual=residual)

    def call_ln_next(self, x_q: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                     next_clip: torch.Tensor, next_inv: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, q)``: y = ``layer(x_q, residual)`` (a float output: the residual stream of a pre-LN model) and
        q = ``quantize(LayerNorm(y), next_clip)`` int8, the next sublayer's first linear's input, the values of
        ``ops.layer_norm_quant`` (ln_weight / ln_bias (N,) of y's dtype; next_inv: next_clip's 1/scale, fp32 (1,)).

        On CUDA with at most :data:`LN_TAIL_MAX_M` rows, where :func:`ln_tail` (LSQUANT_LN_TAIL=1): one Triton
        kernel, the tiled or split-K GEMM whose last program of each row block normalizes and quantizes the
        block's finished rows (no LayerNorm launch between two GEMMs). Its statistics are summed in another order
        than the LayerNorm kernel's, so a q within an ulp of a rounding boundary may sit one level away (the
        contract of :meth:`ln_call`'s fusion, measured in the tests); y is the plain kernel's, bit for bit.
        Otherwise, and if the kernel fails (one warning), the GEMM, then the LayerNorm-quantize kernel."""
        if self.out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"call_ln_next needs a float output, this layer's is {self.out_dtype}")
        lead = x_q.shape[:-1]
        M = x_q.reshape(-1, self.K).shape[0] if x_q.shape[-1] == self.K else 0
        from . import gemm_triton

        if x_q.is_cuda and x_q.dtype == torch.int8 and 0 < M <= LN_TAIL_MAX_M and ln_tail() \
                and "ln_tail" not in self._failed and gemm_triton.available():
            from .gemm_triton import int8_linear_triton

            _check_residual(residual, self.out_dtype, (*lead, self.N), x_q.device)
            if next_inv is None:
                next_inv = scale_and_inv(torch.as_tensor(next_clip, dtype=torch.float32,
                                                         device=x_q.device).reshape(1))[1]
            q = torch.empty(M, self.N, dtype=torch.int8, device=x_q.device)
            try:
                y = int8_linear_triton(
                    x_q.reshape(M, self.K), self.weight, self.alpha, self.bias32, ACTIVATIONS[self.activation],
                    self.out_dtype, self.out_inv_t, self.tail_config(M),
                    residual.reshape(M, self.N) if residual is not None else None,
                    ln_next=(ln_weight, ln_bias, eps, next_inv, q))
                return y.reshape(*lead, self.N), q.reshape(*lead, self.N)
            except Exception as e:   # as _dispatch: a kernel that cannot run here must not take the engine down
                warnings.warn(f"lsquant int8 GEMM + LayerNorm for M={M}, N={self.N}, K={self.K} failed "
                              f"({type(e).__name__}: {e}); using the GEMM, then LayerNorm", RuntimeWarning,
                              stacklevel=2)
                self._failed.add("ln_tail")
        from lsquant import ops

        from . import pdl

        y = self(x_q, residual=residual)
        q = ops.layer_norm_quant(y, ln_weight, ln_bias, eps, next_clip, float_out=False,
                                 pdl=pdl.layernorm(y.device))[1]
        return y, q

    def tail_config(self, M: int) -> dict:
        """call_ln_next's kernel config for M rows: the tuned choice of M's bucket where that is a Triton tiled
        or split-K config (the tail adds no registers to the loop), else :data:`DEFAULT_TRITON_CONFIG`."""
        c = self.choice_for(M)
        if c.get("backend") == "triton" and c["config"].get("KERNEL", "tiled") in ("tiled", "splitk"):
            return c["config"]
        return DEFAULT_TRITON_CONFIG

    def ln_config(self, M: int) -> dict:
        """The fused LayerNorm + GEMM kernel's tiles for M rows: the tuned choice of M's bucket where that is
        the tiled Triton kernel with tiles of at most 64 x 128 (the same loop over K, plus the prologue); else, up
        to 64 rows, the default tiled config, and beyond, the best-ranked tiled config of at most 64 x 128.
        Compiled for sm_90 as launched (K and strides divisible by 16), the fused kernel takes 96 registers at
        16 x 32 x 256, 168 at 32 x 64 x 256, 180-255 at 64 x 128 x 128, all without spilling; 64 x 256 x 128
        spills 248 bytes a thread and 128 x 128 x 128 ~2 KB (the prologue's fp32 tiles next to the accumulator), so
        tiles over 64 x 128 are not used."""
        def fits(cfg):
            return cfg["BLOCK_M"] <= 64 and cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 64 * 128

        c = self.choice_for(M)
        if c.get("backend") == "triton" and c["config"].get("KERNEL", "tiled") == "tiled" and fits(c["config"]):
            return c["config"]
        if M <= DEFAULT_TRITON_MAX_M:
            return DEFAULT_TRITON_CONFIG
        from .gemm_triton import CONFIGS, candidate_configs

        ranked = [c for c in candidate_configs(M, self.N, self.K, len(CONFIGS)) if fits(c)]
        return ranked[0] if ranked else DEFAULT_TRITON_CONFIG

    def _dispatch(self, x2: torch.Tensor, choice: dict | None = None, residual: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """The GPU path of a call: x2 int8 (M, K), M > 0 -> (M, N). Runs ``choice`` (default: the memoised
        choice of M's bucket) and, if it fails, the rest of :func:`fallback_chain`, then
        :func:`_run_fallback`: one warning for the kernels that failed (once per kernel name), and the
        bucket's memoised choice moves to the kernel that ran. A loop over a finite list, no recursion."""
        M = x2.shape[0]
        memoised = choice is None
        if choice is None:
            choice = self.choice_for(M)
        try:
            return run_choice(self, x2, choice, residual)  # the hot path: nothing else per call
        except Exception as e:  # a kernel that cannot run here must not take the engine down
            failed = [(choice, e)]
        y = used = None
        for c in fallback_chain(choice, M)[1:]:  # (a failure may be shape-specific: each bucket tries its chain)
            try:
                y = run_choice(self, x2, c, residual)
                used = c
                break
            except Exception as e:
                failed.append((c, e))
        new = [(c, e) for c, e in failed if choice_name(c) not in self._failed]
        if new:
            what = "; ".join(f"kernel {choice_name(c)} failed ({type(e).__name__}: {e})" for c, e in new)
            instead = choice_name(used) if used is not None else "a fallback (exact, slow)"
            warnings.warn(f"lsquant int8 GEMM for M={M}, N={self.N}, K={self.K}: {what}; using {instead}",
                          RuntimeWarning, stacklevel=3)
            self._failed.update(choice_name(c) for c, _ in new)
        if memoised:
            from .gemm_tuner import m_bucket

            # from now on this bucket starts where this call ended (the cuBLASLt default, whose failure leads
            # to the fallback, if nothing worked)
            self.choices[m_bucket(M)] = used if used is not None else default_choice()
        if y is None:
            y = _run_fallback(self, x2, residual)
        return y

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
            c = cache.lookup(M, self.N, self.K, self.out_dtype) or default_choice(M)
            self.choices[b] = c
        return c


def run_choice(layer: Int8Linear, x2: torch.Tensor, choice: dict, residual: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Run one kernel choice. x2: int8 (M, K) CUDA -> (M, N) of layer.out_dtype; residual: (M, N) of
    layer.out_dtype (float outputs) added as step 6 of the module docstring (fused into the Triton kernels'
    epilogue, one PyTorch add after the other backends)."""
    _check_residual(residual, layer.out_dtype, (x2.shape[0], layer.N), x2.device)
    backend = choice.get("backend")
    if backend == "cublaslt":
        return _run_cublaslt(layer, x2, choice.get("algo"), choice.get("chunk_m"), residual)
    if backend == "triton":
        from .gemm_triton import int8_linear_triton

        return int8_linear_triton(x2, layer.weight, layer.alpha, layer.bias32, ACTIVATIONS[layer.activation],
                                  layer.out_dtype, layer.out_inv_t, choice["config"], residual)
    if backend == "dequant":
        return _run_dequant(layer, x2, residual)
    if backend == "cutlass":
        from .gemm_cutlass import int8_gemm_cutlass

        y = int8_gemm_cutlass(x2, layer.weight, layer.alpha, layer.bias32, ACTIVATIONS[layer.activation],
                              layer.out_dtype, choice["config"])
        return _add_residual(y, residual)
    raise ValueError(f"unknown int8 GEMM backend {backend!r}")


def _add_residual(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """y + residual, in place in y (a fresh output): PyTorch's add, fp32 arithmetic rounded once (step 6)."""
    return y if residual is None else y.add_(residual)


_ALGO_IDS: dict = {}  # (M bucket, N_pad, K_pad) -> cuBLASLt algorithm ids offered for that shape


def _check_algo_id(ext, algo, M: int, N: int, K: int) -> None:
    """Refuse an algorithm id that cuBLASLt does not offer for this shape (heuristic or enumerated lists):
    passed from a stale or foreign cache file, such an id crashed cuBLASLt (a segfault) instead of failing."""
    # the offered algorithms depend on M as well (an enumeration at M = 32 lacked ids the tuner found at M = 4
    # on an H100, and the check then refused them as stale): one list per M bucket
    key = (1 << (max(int(M), 1) - 1).bit_length(), N, K)
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


def _run_cublaslt(layer: Int8Linear, x2: torch.Tensor, algo, chunk_m: int | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """cuBLASLt int32 GEMM + the CUDA epilogue (+ the residual, one PyTorch add). With chunk_m, rows go in
    chunks of chunk_m through one int32 buffer small enough to stay in L2 (50 MB): each chunk's accumulator
    is rewritten before it is evicted, so it never makes the round trip to HBM (at 8192 x 4096 that round
    trip is 268 MB, ~80 us, more than the bf16 GEMM's whole time)."""
    return _add_residual(_cublaslt_result(layer, x2, algo, chunk_m), residual)


def _cublaslt_result(layer: Int8Linear, x2: torch.Tensor, algo, chunk_m: int | None = None) -> torch.Tensor:
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


def _run_fallback(layer: Int8Linear, x2: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Where cuBLASLt's default refuses a shape: M padded to 32 rows (torch._int_mm, on the same library,
    refuses M <= 16), else the exact fp64 GEMM (every int8 partial sum is an integer below 2^53) + the
    epilogue kernel, else everything in PyTorch; then the residual (one PyTorch add). Slow but exact: never
    a failure."""
    return _add_residual(_fallback_result(layer, x2), residual)


def _fallback_result(layer: Int8Linear, x2: torch.Tensor) -> torch.Tensor:
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


def _run_dequant(layer: Int8Linear, x2: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """fp16/bf16 GEMM on dequantized operands (float outputs only): PyTorch's own precision; then the
    residual (one PyTorch add)."""
    if layer.out_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("the dequant backend produces fp16/bf16 outputs only")
    dt = layer.out_dtype
    w, bias, folded = layer.w_dequant(dt)
    x = x2.to(dt)   # the int8 levels, exact in fp16 / bf16; the scales are in w (folded) or applied here
    if not folded:
        x = x * layer.x_scale_t.to(dt)
    if layer.activation == "relu" and bias is not None and x.is_cuda:
        # bias and ReLU in cuBLASLt's epilogue (relu(round(v)) == round(relu(v))): one kernel
        y = torch._addmm_activation(bias, x, w.t())
    else:
        y = F.linear(x, w, bias)
        if layer.activation == "relu":
            y = torch.relu(y)
        elif layer.activation == "gelu":
            y = F.gelu(y)   # erf GELU (cuBLASLt's GELU epilogue is the tanh approximation)
    return _add_residual(y, residual)


# ------------------------------------------------------------------------------------------------------
# Functional API
# ------------------------------------------------------------------------------------------------------

def int8_linear(x_q: torch.Tensor, weight: torch.Tensor, x_clip=None, w_clip: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, activation: str = "none",
                out_dtype: torch.dtype = torch.bfloat16, out_clip=None, choice: dict | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """int8 linear with a fused epilogue (see the module docstring for the arithmetic).

    x_q: int8 (..., K); weight: int8 (N, K); x_clip: activation clip (scalar); w_clip: fp32 (N,); bias:
    (N,) or None; activation: "none" | "relu" | "gelu"; out_dtype: torch.int32 | int8 | float16 | bfloat16
    | float32; out_clip: the output clip (int8 output); residual: (..., N) of out_dtype (float outputs
    only), added to the output (bit-identical to ``residual + int8_linear(...)``). Returns (..., N) of
    out_dtype. CPU tensors use the reference; CUDA tensors the tuned kernel (or ``choice``). Layers called
    repeatedly should build an :class:`Int8Linear` once instead (weight padding and scales are then prepared
    once).
    """
    layer = Int8Linear(weight, w_clip=w_clip, x_clip=x_clip, bias=bias, activation=activation,
                       out_dtype=out_dtype, out_clip=out_clip)
    return layer(x_q, choice=choice, residual=residual)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: int8 (M, K), b: int8 (N, K) -> int32 (M, N) = a @ b.T, exact, any shape (like torch._int_mm with
    b transposed, without its M > 16 and multiple-of-8 restrictions)."""
    _check_int8_operands(a, b)
    return int8_linear(a, b, out_dtype=torch.int32)


def tops(M: int, N: int, K: int, ms: float) -> float:
    """Tera-operations per second of an (M, N, K) GEMM taking ms milliseconds (2 ops per multiply-add)."""
    return 2.0 * M * N * K / (ms * 1e-3) / 1e12 if ms > 0 and math.isfinite(ms) else float("nan")
