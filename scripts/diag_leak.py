"""Which CUDA tensors stay alive after an int8 engine built and tuned as bench/bench_engine.py does it is dropped
(the bench's memory floor rose by ~500 MB after the first such engine). python scripts/diag_leak.py (GPU)."""
import collections
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_engine import make_files  # noqa: E402

from lsquant.inference.gemm_tuner import TuningCache  # noqa: E402
from lsquant.inference.transformer_engine import QuantTransformer  # noqa: E402

tmp = Path(tempfile.mkdtemp())
cfg, _, _, int8_file = make_files("base", tmp)
gc.collect()
print("after make_files", torch.cuda.memory_allocated() >> 20, "MB")
cache = TuningCache(tmp / "t.json")
eng = QuantTransformer(int8_file, max_batch_size=1, beam_size=4, max_tgt_len=32, max_src_len=64)
print("built", torch.cuda.memory_allocated() >> 20, "MB")
eng.tune([1], 16, cache=cache, progress=False)
print("tuned", torch.cuda.memory_allocated() >> 20, "MB")
src = torch.randint(4, 32000, (1, 16), device="cuda")
eng.infer(src, "beam", max_len=32, min_len=32)
print("served", torch.cuda.memory_allocated() >> 20, "MB")
del eng
gc.collect()
torch.cuda.empty_cache()
print("dropped", torch.cuda.memory_allocated() >> 20, "MB")
live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda]
live.sort(key=lambda t: -t.untyped_storage().nbytes())
print(len(live), "live CUDA tensors,", sum(t.untyped_storage().nbytes() for t in live) >> 20, "MB (views counted twice)")
by = collections.Counter()
for t in live:
    by[(tuple(t.shape), str(t.dtype))] += t.untyped_storage().nbytes()
for k, v in by.most_common(12):
    print(f"  {v >> 20:6d} MB  {k}")
for t in live[:4]:
    print("tensor", tuple(t.shape), t.dtype)
    for r in gc.get_referrers(t):
        if r is live:
            continue
        desc = type(r).__name__
        if isinstance(r, dict):
            owners = [type(o).__name__ for o in gc.get_referrers(r) if o is not live][:4]
            desc += f" keys={list(r)[:5]} owners={owners}"
        elif isinstance(r, (list, tuple)):
            owners = [type(o).__name__ for o in gc.get_referrers(r) if o is not live][:4]
            desc += f" len={len(r)} owners={owners}"
        print("   <-", desc[:300])
