"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

Why: a decoder step of Transformer-base at batch 8 is ~100 small kernels of ~3 us each (the profile in
bench/NOTES_engine.md: 9.7 ms of GPU time in 3,316 kernels a request), and each one pays its launch, its blocks'
scheduling and its first loads before any arithmetic, in series with the kernel before it. With PDL a kernel is
launched while the previous one still runs: its blocks are scheduled early, issue what does not depend on the
previous kernel (an L2 prefetch of the GEMM's weight slab: the weights are constants), then wait at
``griddepcontrol.wait`` until the previous kernel has completed and its writes are visible.

The rule every kernel launched this way follows (``USE_PDL`` constexpr): ``gdc_wait()`` comes first, in every
program, before any load of a value another kernel writes and before any store; the L2 prefetch of constant
weights is the only access before it. ``gdc_launch_dependents()`` follows at once: the next kernel may then be
scheduled as soon as every program of this one has started, and it waits in turn. Because every program waits,
a kernel that completes implies that the one before it completed: the order of the stream is kept through any
chain. A kernel launched without the attribute (cuBLAS, PyTorch's own) waits for everything before it, as ever.

On by default where it can run (``LSQUANT_PDL=0`` turns it off): measured on an H200 (bench/NOTES_engine.md,
run E), Transformer-base int8 beam 4 gained 5% at batch 1 and 12% at batch 8, sampling 8% and 7%, and batches
32-128 moved by -4% to +7%; never under Triton's CPU interpreter, never below compute capability 9.0. The first
use on a device runs a probe (three dependent launches, eagerly and replayed from a CUDA graph, their result
checked): where the driver, CUDA or Triton cannot launch or capture PDL kernels correctly, one warning and the
ordinary launches, never an error in the engine.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


@functools.lru_cache(maxsize=8)
def _supported(index: int) -> bool:
    try:
        if torch.cuda.get_device_capability(index)[0] < 9:
            return False
        import triton.language as tl

        return hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def _probe_kernel():
    global triton, tl, _pdl_enter   # the kernel resolves names in this module's globals
    import triton
    import triton.language as tl

    from . import gemm_triton

    gemm_triton._build(False)
    _pdl_enter = gemm_triton._pdl_enter

    @triton.jit
    def pdl_probe_kernel(x_ptr, y_ptr, n, MUL: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:
            _pdl_enter()
        i = tl.program_id(0) * 1024 + tl.arange(0, 1024)
        m = i < n
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=m) * MUL + 1, mask=m)

    return pdl_probe_kernel


def _run_probe(device: torch.device) -> bool:
    """Three dependent PDL launches (x -> y -> z -> y), eagerly, then captured in a CUDA graph and replayed on
    new input; True if every result is right. Runs on a side stream (never inside the caller's capture)."""
    k = _probe_kernel()
    n = 1 << 16
    x = torch.arange(n, dtype=torch.float32, device=device)
    y, z = torch.empty_like(x), torch.empty_like(x)

    def chain():
        grid = (n // 1024,)
        k[grid](x, y, n, MUL=2, USE_PDL=True, launch_pdl=True)
        k[grid](y, z, n, MUL=3, USE_PDL=True, launch_pdl=True)
        k[grid](z, y, n, MUL=1, USE_PDL=True, launch_pdl=True)

    def expect():
        return (x * 2 + 1) * 3 + 1 + 1

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        chain()
        ok = torch.equal(y, expect())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            chain()
        x.add_(7.0)
        graph.replay()
        ok = ok and torch.equal(y, expect())
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    return bool(ok)


_probed: dict = {}


def _probe(index: int) -> bool:
    """The probe's verdict for device ``index``, run once (not while the current stream is capturing a graph:
    then the kernels are launched with PDL and the verdict waits for an eager call)."""
    hit = _probed.get(index)
    if hit is not None:
        return hit
    device = torch.device("cuda", index)
    try:
        if torch.cuda.is_current_stream_capturing():
            return True
        ok = _run_probe(device)
        why = "a wrong result"
    except Exception as e:   # a driver or Triton without PDL launches or their capture
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"programmatic dependent launch failed its probe on cuda:{index} ({why}); "
                      "launching kernels without it (LSQUANT_PDL=0 skips the probe)", RuntimeWarning, stacklevel=3)
    _probed[index] = ok
    return ok


def requested() -> bool:
    """Whether the environment asks for PDL: on unless LSQUANT_PDL=0."""
    return os.environ.get("LSQUANT_PDL", "1") != "0"


def enabled(device: torch.device) -> bool:
    """Whether kernels on this device are launched with PDL: LSQUANT_PDL not 0, a CUDA device of compute
    capability >= 9.0, a Triton with grid dependency control, not Triton's interpreter, and the probe passed."""
    if not requested() or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _supported(index) and _probe(index)


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel with a ``USE_PDL`` constexpr: its constexpr and Triton's
    ``launch_pdl`` option where PDL is enabled, else nothing (the kernel's default USE_PDL=False)."""
    if enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {}


def layernorm(device: torch.device) -> bool:
    """Whether the decode step's LayerNorm kernels (CUDA C++, csrc/kernels/layernorm.cu) are launched with PDL:
    :func:`enabled`, unless LSQUANT_PDL_LN=0 (a comparison switch: the LayerNorm with ordinary launches, the
    other kernels with PDL). Between two PDL-launched int8 GEMMs an ordinary launch waits for everything before
    it and breaks the chain."""
    return enabled(device) and os.environ.get("LSQUANT_PDL_LN", "1") != "0"
