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

Off by default: turned on with ``LSQUANT_PDL=1`` (until the decode benchmarks have measured it, as the
LayerNorm-in-GEMM fusion); never under Triton's CPU interpreter, never below compute capability 9.0.
"""
from __future__ import annotations

import functools
import os

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


def enabled(device: torch.device) -> bool:
    """Whether kernels on this device are launched with PDL: LSQUANT_PDL=1, a CUDA device of compute
    capability >= 9.0, a Triton with grid dependency control, and not Triton's interpreter."""
    if os.environ.get("LSQUANT_PDL", "0") != "1" or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel with a ``USE_PDL`` constexpr: its constexpr and Triton's
    ``launch_pdl`` option where PDL is enabled, else nothing (the kernel's default USE_PDL=False)."""
    if enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {}
