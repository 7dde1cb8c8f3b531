"""Lazy JIT build of csrc/ (the CUDA kernels and their one torch binding file).

Nothing here runs at import: the extension is compiled with ninja on the first CUDA call (or by
``lsquant build``) and cached by torch under ``TORCH_EXTENSIONS_DIR``. It is built for the running GPU's
architecture only (sm_90 on H100/H200), which keeps a cold build to about a minute; ``MAX_JOBS`` sets
ninja's parallelism, as in torch.utils.cpp_extension.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from importlib import resources
from pathlib import Path

_lock = threading.Lock()
_module = None
EXTENSION_NAME = "lsquant_C"


class BuildError(RuntimeError):
    """The CUDA extension cannot be built here; the message says why and what to install."""


def source_dir() -> Path:
    """csrc/ of the installed package (lsquant.csrc), or of the source checkout when lsquant is imported from one
    without being installed (the checkout's own folder shadows an installed package's mapped subpackages)."""
    try:
        return Path(str(resources.files("lsquant.csrc")))
    except ModuleNotFoundError:
        here = Path(__file__).resolve().parents[2] / "csrc"
        if (here / "bindings.cpp").is_file():
            return here
        raise


def sources() -> list[str]:
    root = source_dir()
    kernels = sorted(str(p) for p in (root / "kernels").glob("*.cu"))
    return [str(root / "bindings.cpp")] + kernels


def _arch_list() -> str:
    """'9.0' for the running GPU (or LSQUANT_CUDA_ARCH, e.g. '9.0a' for wgmma)."""
    import torch

    if os.environ.get("LSQUANT_CUDA_ARCH"):
        return os.environ["LSQUANT_CUDA_ARCH"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def check_toolchain() -> None:
    """Raise BuildError unless a CUDA GPU and nvcc are both here."""
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise BuildError(
            "lsquant's CUDA kernels need an NVIDIA GPU, and PyTorch sees none here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). On a CPU machine every lsquant "
            "layer and engine runs through its PyTorch reference path instead; nothing needs building.")
    has_ninja = shutil.which("ninja") is not None or _has_ninja_module()
    if cpp_extension.CUDA_HOME is None or not has_ninja:
        raise BuildError(
            "building lsquant's CUDA kernels needs nvcc and ninja: install the CUDA toolkit matching "
            f"PyTorch's CUDA {torch.version.cuda} (set CUDA_HOME if it is not in /usr/local/cuda) and "
            "`pip install ninja`.")


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + str(Path(ninja.BIN_DIR))  # type: ignore[attr-defined]
    return True


def load(verbose: bool = False):
    """Build (first call) or load the extension and return it. Thread-safe; cheap after the first call."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        check_toolchain()
        from torch.utils import cpp_extension

        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
        root = source_dir()
        try:
            _module = cpp_extension.load(
                name=EXTENSION_NAME,
                sources=sources(),
                extra_include_paths=[str(root)],
                # No --use_fast_math: quantization relies on IEEE division and rintf to match PyTorch bit
                # for bit.
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
                extra_ldflags=["-lcublasLt"],
                verbose=verbose,
            )
        except Exception as e:  # compiler output is in the exception text
            raise BuildError(
                f"building lsquant's CUDA extension failed ({type(e).__name__}). The compiler's output is "
                f"above or in the message below; set MAX_JOBS=2 if the machine ran out of memory.\n{e}"
            ) from e
        return _module


def build(verbose: bool = True) -> float:
    """Build now (``lsquant build``); return the seconds it took (a cached build returns quickly)."""
    start = time.perf_counter()
    load(verbose=verbose)
    return time.perf_counter() - start


def is_built() -> bool:
    return _module is not None
