"""Beam search's ranking step alone: LightSeq's rough top-k (lsquant.inference.rough_topk) with one program per row
and with the row split into slices, against PyTorch's log-softmax + topk (beam_topk_ref), side by side. Then the
whole search update of greedy decoding and top-k sampling (k = 4) over B rows: the one-kernel update
(lsquant.inference.path_update) against the PyTorch ops (LSQUANT_FUSED_PATH=0), rows with impl
"update_<method>_<pytorch|fused>".

    python bench/bench_search.py [--out bench/results/search_<gpu>.csv]

Rows N = batch x 4 beams for batch 1, 8, 32, 128; vocabulary 32000; fp16 logits ~ N(0, 3^2) (four input sets
rotated so that the 64 KB-per-row logits do not all sit in L2 between calls); median of CUDA-event timings after
warm-up, two ways: each call launched from Python (`us`: bench/common.time_cuda, which counts the host's launches
when they are slower than the GPU) and each call replayed from a CUDA graph as the engines run it (`graph_us`:
bench/common.time_cuda_graph, the GPU's time). The rough top-k includes its ranking of the collected slots
(rough_topk.rank, as beam_topk runs it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_gpu_bench, time_cuda, time_cuda_graph, write_rows  # noqa: E402

from lsquant.inference import decoding, rough_topk  # noqa: E402

EOS, V, K = 2, 32000, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    args = ap.parse_args()
    out, info = start_gpu_bench("bench_search.py", "search", args.out)
    rows = []
    for B in args.batches:
        N = B * K
        g = torch.Generator(device="cuda").manual_seed(B)
        sets = [(torch.randn(N, V, device="cuda", generator=g).mul_(3).half(),
                 torch.randn(B, K, device="cuda", generator=g) * 2 - 5) for _ in range(4)]
        t = torch.tensor([3], device="cuda")
        limits = torch.tensor([0, 64], device="cuda")
        auto = rough_topk.slices(N, V)
        impls = {"pytorch": lambda x, s: rough_topk.beam_topk_ref(x, s, t, limits, EOS, (0, 1), K),
                 "rough_1_slice": lambda x, s: rough_topk.rank(*rough_topk.row_candidates(
                     x, s, t, limits, EOS, (0, 1), K, num_slices=1)[:2], K, V),
                 f"rough_{auto}_slices": lambda x, s: rough_topk.beam_topk(x, s, t, limits, EOS, (0, 1), K)}
        if auto == 1:   # the automatic choice is one slice here: the row above is it
            del impls["rough_1_slices"]
        base = gbase = None
        for name, fn in impls.items():
            ms = time_cuda(fn, sets)
            gms = time_cuda_graph(fn, sets)
            base, gbase = base or ms, gbase or gms
            rows.append({**info, "rows": N, "batch": B, "beams": K, "vocab": V, "impl": name,
                         "slices": 1 if name == "rough_1_slice" else (auto if name.startswith("rough") else 0),
                         "us": round(ms * 1e3, 2), "speedup_vs_pytorch": round(base / ms, 3),
                         "graph_us": round(gms * 1e3, 2), "graph_speedup_vs_pytorch": round(gbase / gms, 3)})
            print(f"B={B:<4d} N={N:<4d} {name:16s} {ms * 1e3:9.2f} us  {base / ms:5.2f}x PyTorch   graphed "
                  f"{gms * 1e3:8.2f} us  {gbase / gms:5.2f}x PyTorch", flush=True)
        rows += update_rows(B, info)
    write_rows(out, rows)
    print(f"wrote {out}")


class _Decoder:
    max_steps = 64   # the search's state buffers: positions


def update_rows(B: int, info: dict) -> list[dict]:
    """The search update of greedy and top-k sampling over B rows, PyTorch ops against the fused kernel. Each call
    resets the position first (a one-element fill, in both) so that the state stays within its 64 positions."""
    g = torch.Generator(device="cuda").manual_seed(B + 1)
    sets = [(torch.randn(B, V, device="cuda", generator=g).mul_(3).half(),) for _ in range(4)]
    rows = []
    for method, sample in (("greedy", None), ("sample", (4, 1.0, 1.0, 0))):
        search = decoding._PathSearch(_Decoder(), B, 1, EOS, 0, 64, 0, "cuda", sample=sample)

        def step(x, search=search):
            search.t.zero_()
            search.update(x)

        base = gbase = None
        for name, flag in (("pytorch", "0"), ("fused", "1")):
            os.environ["LSQUANT_FUSED_PATH"] = flag
            ms, gms = time_cuda(step, sets), time_cuda_graph(step, sets)
            base, gbase = base or ms, gbase or gms
            impl = f"update_{method}_{name}"
            rows.append({**info, "rows": B, "batch": B, "beams": 1, "vocab": V, "impl": impl, "slices": 0,
                         "us": round(ms * 1e3, 2), "speedup_vs_pytorch": round(base / ms, 3),
                         "graph_us": round(gms * 1e3, 2), "graph_speedup_vs_pytorch": round(gbase / gms, 3)})
            print(f"B={B:<4d} N={B:<4d} {impl:22s} {ms * 1e3:9.2f} us  {base / ms:5.2f}x PyTorch   graphed "
                  f"{gms * 1e3:8.2f} us  {gbase / gms:5.2f}x PyTorch", flush=True)
        os.environ.pop("LSQUANT_FUSED_PATH", None)
    return rows


if __name__ == "__main__":
    main()
