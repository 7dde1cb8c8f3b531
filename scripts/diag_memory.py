"""Where the int8 engine's GPU memory goes at one batch size, source length by source length: the engine's
allocated bytes after construction and after each request, the peak during it, and after each source length the
live blocks summed by the memory pool and the Python frames that allocated them (torch.cuda.memory snapshots).

    python scripts/diag_memory.py [--model base] [--batch 128] [--src-lens 16 32 64] [--method beam]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_engine import NEW, VOCAB, make_files  # noqa: E402

from lsquant.inference.transformer_engine import QuantTransformer  # noqa: E402

MB = 2 ** 20


def largest_blocks(snapshot: dict, n: int) -> list[tuple[float, int, str]]:
    """The live blocks of a memory snapshot summed by where they were allocated (the memory pool and the
    innermost lsquant / bench frames): the n largest sums as (MB, blocks, where)."""
    sums: dict = {}
    for seg in snapshot["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            frames = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in blk.get("frames", [])
                      if "lsquant" in f["filename"] or "bench" in f["filename"]]
            where = f"pool {seg.get('segment_pool_id')} | " + " < ".join(frames[:4])
            mb, k = sums.get(where, (0.0, 0))
            sums[where] = (mb + blk["size"] / MB, k + 1)
    return sorted(((mb, k, w) for w, (mb, k) in sums.items()), reverse=True)[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base", choices=["base", "big"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--src-lens", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--method", default="beam", choices=["beam", "sample"])
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--tune", action="store_true", help="tune the GEMMs for the batch and source lengths first "
                    "(into a temporary cache; as bench_engine.py does)")
    a = ap.parse_args()
    _, _, _, int8_file = make_files(a.model, Path(tempfile.mkdtemp()))
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=100000)
    base = torch.cuda.memory_allocated() / MB
    eng = QuantTransformer(int8_file, max_batch_size=a.batch, beam_size=4, max_tgt_len=NEW,
                           max_src_len=max(a.src_lens))
    print(f"built: {torch.cuda.memory_allocated() / MB - base:.1f} MB allocated", flush=True)
    if a.tune:
        from lsquant.inference.gemm_tuner import TuningCache, set_global_cache

        cache = TuningCache(Path(tempfile.mkdtemp()) / "tuning.json")
        set_global_cache(cache)
        for S in a.src_lens:
            eng.tune([a.batch], S, cache=cache, progress=False)
        print(f"tuned: {torch.cuda.memory_allocated() / MB - base:.1f} MB allocated", flush=True)
    with torch.inference_mode():
        for S in a.src_lens:
            src = torch.randint(4, VOCAB, (a.batch, S), device="cuda")
            for rep in range(2):   # the first captures the graphs, the second replays them
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                eng.infer(src, a.method, max_len=NEW, min_len=NEW, top_k=4)
                torch.cuda.synchronize()
                print(f"S={S} call {rep}: allocated {torch.cuda.memory_allocated() / MB - base:.1f} MB, peak "
                      f"{torch.cuda.max_memory_allocated() / MB - base:.1f} MB, reserved "
                      f"{torch.cuda.memory_reserved() / MB:.1f} MB", flush=True)
            for mb, k, where in largest_blocks(torch.cuda.memory._snapshot(), a.top):
                print(f"   {mb:8.1f} MB in {k:3d} blocks  {where}")


if __name__ == "__main__":
    main()
