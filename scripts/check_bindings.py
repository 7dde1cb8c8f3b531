"""Syntax-check csrc/bindings.cpp with g++ against the installed (CPU) PyTorch's headers and CUDA's.

The CPU wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in is enough
for a syntax check. Exits non-zero with the compiler's message on an error. Skips (exit 0) without CUDA
headers."""
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from torch.utils import cpp_extension

root = Path(__file__).resolve().parents[1]
cuda_inc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
if not (cuda_inc / "cuda_runtime_api.h").exists():
    print(f"  no CUDA headers in {cuda_inc}: skipped")
    sys.exit(0)
with tempfile.TemporaryDirectory() as stub:
    (Path(stub) / "c10/cuda/impl").mkdir(parents=True)
    (Path(stub) / "c10/cuda/impl/cuda_cmake_macros.h").write_text("")
    incs = cpp_extension.include_paths() + [str(cuda_inc), sysconfig.get_paths()["include"], stub, str(root / "csrc")]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=lsquant_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H"] + [f"-I{i}" for i in incs] + [str(root / "csrc/bindings.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
if r.returncode:
    print(r.stderr[-6000:])
    sys.exit(r.returncode)
print("  ok csrc/bindings.cpp")
