"""The int8 GEMM through CUTLASS 3 on Hopper (csrc/cutlass/int8_gemm_sm90.cu): warp-specialized ping-pong and
cooperative kernels with lsquant's epilogue (per-channel scale, bias, optional ReLU; bf16 / fp16 output), one of
the tuner's candidates (backend "cutlass").

Optional at every step: it needs an sm_90 GPU, nvcc and the CUTLASS headers (``pip install nvidia-cutlass``,
which ships them in ``cutlass_library``, or ``LSQUANT_CUTLASS_DIR`` pointing at a CUTLASS checkout). The source is
compiled once (~1.5 minutes, one nvcc process) into a shared library cached under
``~/.cache/lsquant/cutlass`` (``LSQUANT_CUTLASS_CACHE``), named by a hash of the source and the flags, written to a
temporary file and renamed into place; it is called through ctypes with raw pointers on the current stream.
Where anything is missing, :func:`available` is False and the tuner offers no cutlass candidate.

The epilogue's arithmetic is gemm.py's (multiply, add, ReLU, one rounding each; the file is compiled with
-fmad=false), so its outputs equal the other backends' bit for bit; the cuda tests check it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

# config id -> name (the order of the switch in the source)
CONFIGS = ("pingpong-64x128x128", "pingpong-128x128x128", "coop-128x256x128", "pingpong-128x128x128-c2x1",
           "coop-128x256x128-c2x1")
# -gencode, not the -arch=sm_90a shorthand: with some nvcc versions the shorthand also runs a plain sm_90 pass,
# which rejects wgmma and setmaxnreg
_FLAGS = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-fmad=false", "--expt-relaxed-constexpr",
          "-DNDEBUG", "-shared", "-Xcompiler", "-fPIC"]
_ERRORS = {1: "cannot implement this shape (K % 16, N % 8 or alignment)", 2: "workspace too small",
           3: "initialize failed", 4: "launch failed", 5: "unknown config", 6: "unsupported output or activation"}


class CutlassError(RuntimeError):
    """The CUTLASS kernel cannot run here or for these operands."""


def source() -> Path:
    from lsquant.ops.build import source_dir

    return source_dir() / "cutlass" / "int8_gemm_sm90.cu"


def include_dirs() -> list[str] | None:
    """CUTLASS's include/ and tools/util/include/: from LSQUANT_CUTLASS_DIR, else the nvidia-cutlass wheel."""
    root = os.environ.get("LSQUANT_CUTLASS_DIR")
    if root:
        base = Path(root)
    else:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        base = Path(list(spec.submodule_search_locations)[0]) / "source"
    dirs = [base / "include", base / "tools" / "util" / "include"]
    return [str(d) for d in dirs] if all((d / "cutlass").is_dir() for d in dirs) else None


def nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc (or $CUDA_PATH's), else nvcc on PATH. Not torch.utils.cpp_extension.CUDA_HOME: a CPU
    build of PyTorch leaves that None, and the sm_90a compile test runs on CPU machines."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def available(device=None) -> bool:
    """An sm_90 CUDA device, nvcc, the CUTLASS headers and the source are all here (the build itself may still
    fail: :func:`library` raises then, and the tuner rejects the candidates)."""
    if not torch.cuda.is_available() or os.environ.get("LSQUANT_CUTLASS", "1") == "0":
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return include_dirs() is not None and nvcc() is not None and source().is_file()


def build_command(out: str) -> list[str]:
    return [nvcc(), *_FLAGS, *[f"-I{d}" for d in include_dirs()], str(source()), "-o", out]


def library_path() -> Path:
    """Where the built library is cached: named by the source, the flags, the include dirs and nvcc's version."""
    h = hashlib.sha256(source().read_bytes())
    h.update(" ".join(_FLAGS + include_dirs()).encode())
    h.update(subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout.encode())
    cache = Path(os.environ.get("LSQUANT_CUTLASS_CACHE", Path.home() / ".cache" / "lsquant" / "cutlass"))
    return cache / f"int8_gemm_sm90-{h.hexdigest()[:16]}.so"


_build_error: list = []   # the first build failure of this process: raised again without another 1.5-minute try


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled library (built on first use if not cached). Raises CutlassError if it cannot be built, then
    on every later call in this process without trying again."""
    if _build_error:
        raise CutlassError(_build_error[0])
    try:
        return _load()
    except (CutlassError, OSError) as e:
        _build_error.append(str(e))
        raise CutlassError(str(e)) from e


def _load() -> ctypes.CDLL:
    if include_dirs() is None or nvcc() is None:
        raise CutlassError("the CUTLASS kernels need nvcc and the CUTLASS headers (pip install nvidia-cutlass)")
    path = library_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            r = subprocess.run(build_command(tmp), capture_output=True, text=True)
            if r.returncode != 0:
                raise CutlassError(f"nvcc failed to build {source().name}:\n{r.stderr[-3000:]}")
            os.replace(tmp, path)   # a half-written library never sits under the final name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    lib.lsq_cutlass_int8_gemm.restype = ctypes.c_int
    lib.lsq_cutlass_int8_gemm.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3
                                          + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    return lib


def int8_gemm_cutlass(x2: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias32: torch.Tensor | None,
                      act: int, out_dtype: torch.dtype, config: int) -> torch.Tensor:
    """x2 int8 (M, K) times w int8 (N, K) -> (M, N) bf16 / fp16 = act(fp32(acc) * alpha + bias) (gemm.py's
    epilogue); act 0 none / 1 relu. Raises CutlassError where the kernel cannot take the operands (int8 / int32
    / fp32 outputs, GELU, K % 16, N % 8, unaligned pointers) or fails."""
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise CutlassError(f"the CUTLASS kernel writes bf16 or fp16, not {out_dtype}")
    if act not in (0, 1):
        raise CutlassError("the CUTLASS kernel's epilogue has no GELU")
    if alpha is None:
        raise CutlassError("the CUTLASS kernel needs the output scale (alpha)")
    if not 0 <= config < len(CONFIGS):
        raise CutlassError(f"CUTLASS config {config} not in [0, {len(CONFIGS)})")
    x2, w = x2.contiguous(), w.contiguous()
    M, K = x2.shape
    N = w.shape[0]
    if K % 16 or N % 8:
        raise CutlassError(f"the CUTLASS kernel needs K % 16 == 0 and N % 8 == 0, got N={N}, K={K}")
    out = torch.empty(M, N, dtype=out_dtype, device=x2.device)
    if any(t.data_ptr() % 16 for t in (x2, w, out)):
        raise CutlassError("the CUTLASS kernel needs 16-byte aligned operands")
    from .gemm import _workspace

    ws = _workspace(x2.device)   # cuBLASLt's, per device: calls on one stream run one after another
    with torch.cuda.device(x2.device):   # the library launches on the current device
        rc = library().lsq_cutlass_int8_gemm(
            config, 0 if out_dtype == torch.bfloat16 else 1, act, x2.data_ptr(), w.data_ptr(), out.data_ptr(),
            alpha.data_ptr(), bias32.data_ptr() if bias32 is not None else None, M, N, K, ws.data_ptr(),
            ws.numel(), torch.cuda.current_stream(x2.device).cuda_stream)
    if rc:
        raise CutlassError(f"CUTLASS int8 GEMM {CONFIGS[config]} M={M} N={N} K={K}: {_ERRORS.get(rc, rc)}")
    return out
