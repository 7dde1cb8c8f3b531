"""Timing and CSV helpers shared by the benchmark scripts (bench/*.py).

Timing: CUDA events around each call, after warm-up, median of the repeats; inputs rotate among several
sets so that a working set smaller than L2 (50 MB on H100) does not flatter memory-bound kernels.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
from pathlib import Path

import torch


def env_info() -> dict:
    """GPU name and versions, written into every CSV row."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda or "",
            "driver_capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else ""}


def warm_gpu(seconds: float = 1.0) -> None:
    """Run matrix products for a while so that clocks have ramped up before the first timed kernel (the
    first kernel timed on a cold H200 came out 40% slower than the same kernel later in the run)."""
    import time

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def time_cuda(fn, inputs: list, warmup: int = 10, repeat: int = 50) -> float:
    """Median milliseconds of fn(*inputs[i % len(inputs)]) over `repeat` calls, each timed by CUDA events."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cuda_graph(fn, inputs: list, warmup: int = 3, repeat: int = 50) -> float:
    """time_cuda for GPU work without the host's launches: fn(*inputs[i]) captured once per input set in a CUDA
    graph (as the engines run their steps), median milliseconds of one replay by CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(warmup):
            fn(*inputs[i % len(inputs)])
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for args in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        graphs.append(g)
    return time_cuda(torch.cuda.CUDAGraph.replay, [(g,) for g in graphs], warmup=len(graphs), repeat=repeat)


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def start_gpu_bench(script: str, csv_prefix: str, out: str | None) -> tuple[str, dict]:
    """What a GPU benchmark does first: exit with a clear message without a GPU, resolve the CSV path (default
    bench/results/<csv_prefix>_<gpu>.csv), and warm the GPU up. -> (CSV path, env_info() for its rows)."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    out = out or f"bench/results/{csv_prefix}_{gpu_slug()}.csv"
    info = env_info()
    warm_gpu()
    return out, info


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows to a CSV (header written when the file is new). A file whose header names other columns is
    left as it is (ValueError): appended rows would sit under the wrong column names."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(rows[0].keys()):
            raise ValueError(f"{path} has the columns {header}, these rows {list(rows[0].keys())}: write them to "
                             "a new file (--out)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)
