"""Shared fixtures. Tests marked ``cuda`` run only where PyTorch sees a GPU (they build the extension on
first use) and are skipped cleanly elsewhere."""
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
                  "lsquant.inference.beam_update", "lsquant.inference.rough_topk")


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1): the same kernel source, programs
    run one after another; nothing about pipelining, warp specialization or atomics' memory order (the cuda
    tests cover those). Yields lsquant.inference.gemm_triton."""
    import importlib

    pytest.importorskip("triton")
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        # NumPy >= 2.4 refuses int() of a 1-element array, which the interpreter does for range() bounds
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
    # Triton's own @jit functions (tl.cdiv, ...) were decorated for compilation when triton was imported
    # without TRITON_INTERPRET: called from an interpreted kernel, they are interpreted too
    monkeypatch.setattr(JITFunction, "__call__", lambda self, *a, **k: interp.InterpretedFunction(self.fn)(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mods = [importlib.import_module(m) for m in TRITON_MODULES]
    for m in mods:
        m._build.cache_clear()
    yield mods[0]
    for m in mods:
        m._build.cache_clear()  # the next (compiled) caller rebuilds its own kernels
