"""Shared fixtures. Tests marked ``cuda`` run only where PyTorch sees a GPU (they build the extension on
first use) and are skipped cleanly elsewhere."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (runs on the device machine via scripts/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# modules whose Triton kernels are built per interpret mode (a functools.lru_cache named _build)
TRITON_MODULES = ("lsquant.inference.gemm_triton", "lsquant.inference.attention", "lsquant.inference.embed_step",
                  "lsquant.inference.beam_update", "lsquant.inference.rough_topk", "lsquant.inference.path_update")


@pytest.fixture
def triton_interpreter():
    """Run Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1): the same kernel source, programs
    run one after another; nothing about pipelining, warp specialization or atomics' memory order (the cuda
    tests cover those). Yields lsquant.inference.gemm_triton."""
    with interpreter_mode() as gemm_triton:
        yield gemm_triton


@contextlib.contextmanager
def interpreter_mode():
    """The triton_interpreter fixture as a context manager: on exit the process compiles kernels again, as if
    the interpreter had never run."""
    import importlib

    pytest.importorskip("triton")
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        # NumPy >= 2.4 refuses int() of a 1-element array, which the interpreter does for range() bounds
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    mods = [importlib.import_module(m) for m in TRITON_MODULES]
    with pytest.MonkeyPatch.context() as mp, triton_language_restored():
        mp.setattr(interp, "_patch_lang_tensor", patched)
        # Triton's own @jit functions (tl.cdiv, ...) were decorated for compilation when triton was imported
        # without TRITON_INTERPRET: called from an interpreted kernel, they are interpreted too
        mp.setattr(JITFunction, "__call__", lambda self, *a, **k: interp.InterpretedFunction(self.fn)(*a, **k))
        mp.setenv("TRITON_INTERPRET", "1")
        for m in mods:
            m._build.cache_clear()
        try:
            yield mods[0]
        finally:
            for m in mods:
                m._build.cache_clear()  # the next (compiled) caller rebuilds its own kernels


@contextlib.contextmanager
def triton_language_restored():
    """Put triton.language back as it was on exit. Triton 3.6's interpreter patches the language for each
    interpreted jit function a kernel calls (tl.max, tl.cumsum: functions whose globals hold triton.language.core)
    and never restores those patches, so a kernel compiled for the GPU later in the same process lowers through the
    interpreter's builder and fails ('ir.value' object has no attribute 'dtype')."""
    import triton.language as tl

    # what the interpreter's _patch_lang patches: the language modules, the tensor classes and tl.math
    saved = [(obj, dict(vars(obj))) for obj in (tl, tl.core, tl.core.tensor, tl.math, tl.core.tensor_descriptor_base)]
    try:
        yield
    finally:
        for obj, attrs in saved:
            for name in [n for n in vars(obj) if n not in attrs]:
                delattr(obj, name)
            for name, value in attrs.items():
                if vars(obj).get(name, _MISSING) is not value:
                    setattr(obj, name, value)


_MISSING = object()


def compile_in_fresh_process(code: str) -> None:
    """Run ``code`` (Triton compiles for sm_90 there, no GPU needed; it prints "compiled" at its end) in a fresh
    Python without TRITON_INTERPRET and with every kernel compiled, not taken from Triton's cache; fail with its
    stderr if it does not finish."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_ALWAYS_COMPILE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
