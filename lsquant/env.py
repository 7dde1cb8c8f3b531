"""What this machine offers lsquant (``lsquant env``): versions, the GPU, which kernels can run, the tuning cache and
the LSQUANT_* settings in force. For bug reports and for checking a GPU machine before a benchmark. Builds and
launches nothing (the CUDA extension is reported as built or not, and PDL's probe runs on first use, not here)."""
from __future__ import annotations

import importlib
import os
import platform
import shutil

import torch

# the environment variables lsquant reads, with what they switch
SETTINGS = {
    "LSQUANT_GEMM_CACHE": "the GEMM tuning cache file",
    "LSQUANT_LN_GEMM": "1: LayerNorm fused into the int8 GEMM at decoding's row counts",
    "LSQUANT_LN_GEMM_MAX_M": "the fused LayerNorm's row bound (default 64)",
    "LSQUANT_LN_TAIL": "1: the decoder's LayerNorm computed by the residual GEMM before it (int8 engine)",
    "LSQUANT_LN_TAIL_MAX_M": "the LayerNorm tail's row bound (default 64)",
    "LSQUANT_PDL": "0: no programmatic dependent launch of the decode step's Triton kernels (on by default, sm_90+)",
    "LSQUANT_EARLY_EPI": "0: the tiled and split-K int8 GEMMs load their epilogue's inputs after the main loop (before: the default)",
    "LSQUANT_CROSS_BEAMS": "1: beam search's cross-attention one program per (sentence, head) instead of per row (slower on an H100)",
    "LSQUANT_PDL_LN": "0: the decode step's LayerNorm kernel launched without PDL, the rest with it (comparisons)",
    "LSQUANT_ROUGH_TOPK": "0: beam search ranks with log-softmax + topk",
    "LSQUANT_ROUGH_SLICES": "programs per row of the rough top-k",
    "LSQUANT_FUSED_BEAM": "0: beam search's bookkeeping in PyTorch ops",
    "LSQUANT_FUSED_PATH": "0: greedy / sampling update in PyTorch ops",
    "LSQUANT_ATTN_TILE": "warps,keys of the decode attention kernel (default 2,32)",
    "LSQUANT_CUTLASS": "0: no CUTLASS GEMM candidates",
    "LSQUANT_TRITON_WS": "1: offer warp-specialized Triton GEMMs on sm_90",
    "LSQUANT_CUTLASS_DIR": "a CUTLASS checkout for the sm90 GEMM's headers",
    "LSQUANT_CUTLASS_CACHE": "where the built CUTLASS GEMM library is kept",
    "LSQUANT_CUDA_ARCH": "the CUDA extension's architecture (default: the GPU's)",
    "LSQUANT_DATA": "the recipes' default data folder",
}


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return "not installed"


def _extension() -> str:
    """Whether the CUDA extension can be (or has been) built here, without building it."""
    build = importlib.import_module("lsquant.ops.build")
    try:
        build.check_toolchain()
    except build.BuildError as e:
        return "not buildable here: " + str(e).split(". ")[0]
    try:
        from torch.utils import cpp_extension

        d = cpp_extension._get_build_directory(build.EXTENSION_NAME, False)
        if any(f.endswith(".so") for f in os.listdir(d)):
            return f"built, cached in {d}"
    except Exception:
        pass
    return "not built yet (`lsquant build` compiles it, ~1-3 min)"


def report() -> list[tuple[str, str]]:
    """(item, value) rows, in the order ``lsquant env`` prints them."""
    from lsquant import __version__

    rows = [("lsquant", __version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("triton", _version("triton")), ("h5py", _version("h5py")), ("transformers", _version("transformers"))]
    cuda = torch.cuda.is_available()
    rows.append(("CUDA (PyTorch build)", str(torch.version.cuda)))
    rows.append(("nvcc", shutil.which("nvcc") or "not found"))
    if not cuda:
        rows.append(("GPU", "none: the CPU reference path runs (engines, layers, tests)"))
    else:
        cap = torch.cuda.get_device_capability()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        rows.append(("GPU", f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}, {props.multi_processor_count} SMs, "
                            f"{props.total_memory / 2**30:.0f} GiB)"))
    rows.append(("CUDA extension", _extension()))
    from lsquant.inference import gemm_cutlass, gemm_triton, pdl

    rows.append(("Triton int8 GEMM", "yes" if gemm_triton.available() else "no (needs Triton and a GPU)"))
    rows.append(("Triton TMA GEMM", "yes" if gemm_triton.tma_available() else "no (needs sm_90+)"))
    rows.append(("CUTLASS sm90 GEMM", "yes" if gemm_cutlass.available() else
                 "no (needs sm_90, nvcc and the nvidia-cutlass headers)"))
    pdl_ok = cuda and pdl._supported(torch.cuda.current_device())
    on = pdl.requested()
    rows.append(("programmatic dependent launch",
                 ("supported; " + ("on (LSQUANT_PDL=0 turns it off)" if on else "off (LSQUANT_PDL=0)")) if pdl_ok
                 else "not available (needs sm_90+ and a Triton with grid dependency control)"))
    from lsquant.inference.gemm_tuner import TuningCache, default_cache_path

    path = default_cache_path()
    if not path.exists():
        rows.append(("GEMM tuning cache", f"{path} (none yet: `lsquant tune` fills it)"))
    else:
        envs = TuningCache(path).load()["envs"]
        gpu = torch.cuda.get_device_name() if cuda else "cpu"
        mine = sum(len(v) for k, v in envs.items() if k.startswith(gpu))
        rows.append(("GEMM tuning cache", f"{path}: {mine} shapes for this GPU, "
                                          f"{sum(len(v) for v in envs.values())} in all"))
    for name, what in SETTINGS.items():
        if name in os.environ:
            rows.append((name, f"{os.environ[name]} ({what})"))
    return rows


def format_report(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
