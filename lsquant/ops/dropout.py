"""Counter-based dropout masks: the same (seed, offset, element index) gives the same mask on the CPU and in
every CUDA kernel (csrc/kernels/layer_common.cuh), so a kernel's forward and backward regenerate the mask instead of
storing it (saves 1 byte per element of every dropout), and the references check the kernels exactly.

The hash (uint32 arithmetic, "lowbias32" of C. Wellons, bias ~0.17 of an ideal mixer):

    mix(x)    = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    key       = mix(seed_lo ^ mix(seed_hi ^ 0x9e3779b9))
    c         = offset + i                               (uint64; i = flat element index)
    h         = mix(mix(c_lo + key) ^ c_hi)
    keep      = (h >> 8) >= thr,  thr = round(p * 2**24)  (an exact integer test: no float in the mask)
    y         = keep ? x * scale : 0,  scale = fp32(1 / (1 - p))

Seeds: each dropout call of a layer gets a fresh 62-bit seed (``new_seeds``), and no counter is kept in any
global state. On the CPU they are Python ints from torch's default CPU generator (``torch.manual_seed`` makes a
run reproducible). On CUDA they are drawn on the device by torch's CUDA generator into an int64 tensor that the
kernels read (a device pointer, never a by-value launch argument) and that the backward saves: no host sync, and
a layer captured in a CUDA graph (``torch.cuda.make_graphed_callables``) gets fresh seeds, hence fresh masks, at
every replay (a seed passed by value would be frozen into the graph). The ops accept either form: an int given
to a CUDA op becomes a one-element tensor (``seed_tensor``), a tensor given to a reference becomes an int
(``seed_int``); the same seed value gives the same mask everywhere.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def acc(x: torch.Tensor) -> torch.Tensor:
    """The references' compute precision: fp32 for fp16/bf16/fp32, fp64 kept (tests compare in fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


SEED_HIGH = 2**62  # seeds are drawn uniformly from [0, SEED_HIGH)


def new_seed() -> int:
    """A seed from torch's default CPU generator (no GPU sync)."""
    return int(torch.randint(0, SEED_HIGH, (), dtype=torch.int64).item())


def new_seeds(n: int, device) -> list:
    """n seeds for the dropout calls of one layer call, in one draw.

    CUDA device: n int64 tensors of one element (views of one (n,) tensor), drawn on the device by torch's CUDA
    generator: no host sync, graph-safe (a replay of a captured graph draws new ones). Elsewhere: n Python ints
    from the default CPU generator."""
    device = torch.device(device)
    if n <= 0:
        return []
    if device.type == "cuda":
        return list(torch.randint(0, SEED_HIGH, (n,), dtype=torch.int64, device=device).unbind(0))
    return torch.randint(0, SEED_HIGH, (n,), dtype=torch.int64).tolist()


def seed_int(seed) -> int:
    """A seed as a Python int: an int as is, a one-element integer tensor read (a host sync for a CUDA tensor:
    the references' business only)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(f"a seed tensor must hold one integer, got {seed.dtype} of shape {tuple(seed.shape)}")
        return int(seed.item())
    return int(seed)


def seed_tensor(seed, device) -> torch.Tensor:
    """A seed as the CUDA kernels read it: an int64 tensor of one element on ``device``. A tensor on that device
    passes through as is (no copy); an int (or a tensor elsewhere) is copied there, which is a host-to-device
    copy: layers pass device tensors from :func:`new_seeds` instead."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"a seed tensor must be int64 with one element, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}")
        return seed if seed.device == torch.device(device) else seed.to(device)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def dropout_params(p: float) -> tuple[int, float]:
    """p -> (thr, scale) as the kernels take them: keep iff (hash >> 8) >= thr; kept values times scale."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout ratio must be in [0, 1), got {p}")
    return int(round(p * (1 << 24))), float(1.0 / (1.0 - p))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 in int64 without overflow: split c in 16-bit halves (each partial product < 2^48)
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The kernels' seed_key: uint64 bits of the seed (a negative int64 reads as its two's complement)."""
    return _mix_int((seed & M32) ^ _mix_int(((seed >> 32) & M32) ^ 0x9E3779B9))


def keep_mask_ref(shape, p: float, seed, offset: int = 0, device=None) -> torch.Tensor:
    """bool tensor of ``shape``: True where the element is kept (element i of the flattened tensor). seed: an int
    or a one-element integer tensor."""
    thr, _ = dropout_params(p)
    n = 1
    for s in shape:
        n *= int(s)
    c = torch.arange(n, dtype=torch.int64, device=device) + int(offset)
    h = _mix(_mix(((c & M32) + seed_key(seed_int(seed))) & M32) ^ ((c >> 32) & M32))
    return ((h >> 8) >= thr).reshape(tuple(shape))


def apply_dropout_ref(y32: torch.Tensor, p: float, seed, offset: int = 0) -> torch.Tensor:
    """Dropout of an fp32 (or fp64) tensor, same dtype back; the identity when p == 0."""
    if p == 0.0:
        return y32
    _, scale = dropout_params(p)
    keep = keep_mask_ref(y32.shape, p, seed, offset, y32.device)
    return torch.where(keep, y32 * torch.tensor(scale, dtype=y32.dtype, device=y32.device),
                       torch.zeros((), dtype=y32.dtype, device=y32.device))


def dropout_ref(x: torch.Tensor, p: float, seed, offset: int = 0) -> torch.Tensor:
    """x (any float dtype, any shape) -> same dtype: keep ? x * scale : 0, computed in fp32."""
    return apply_dropout_ref(acc(x), p, seed, offset).to(x.dtype)
