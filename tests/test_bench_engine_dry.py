"""bench/bench_engine.py's loop on the CPU: a tiny model, the CUDA calls it makes replaced by host stand-ins, so
that which engine is built for which row (batch, method, source length) is checked before GPU time is spent.
The numbers it writes mean nothing here."""
import csv
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


class _Event:
    def __init__(self, **kw):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


@pytest.fixture
def bench(monkeypatch):
    randint = torch.randint
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch, "randint", lambda *a, device=None, **k: randint(*a, **k))
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    import bench_engine as BE

    monkeypatch.setattr(BE, "warm_gpu", lambda *a, **k: None)
    monkeypatch.setattr(BE, "MODELS", {"base": dict(hidden_size=32, intermediate_size=64, nhead=4)})
    monkeypatch.setattr(BE, "VOCAB", 100)
    monkeypatch.setattr(BE, "NEW", 4)
    return BE


@pytest.mark.parametrize("engine_src", ["max", "each"])
def test_rows_and_the_engines_they_were_measured_on(bench, monkeypatch, tmp_path, engine_src):
    out = tmp_path / "r.csv"
    monkeypatch.setattr(sys, "argv", ["bench_engine.py", "--models", "base", "--batches", "1", "2", "--src-lens", "3",
                                      "5", "--graph", "off", "--tune", "off", "--impls", "lsquant_int8",
                                      "pytorch_fp16", "--engine-src", engine_src, "--out", str(out)])
    bench.main()
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 2 * 2 * 2          # implementations x batches x methods x source lengths
    for r in rows:
        assert r["note"] == "" and float(r["tokens_per_s"]) > 0, r
        if r["impl"] == "lsquant_int8":
            assert r["engine_beams"] == ("4" if r["method"] == "beam" else "1")
            assert r["engine_max_src"] == (r["src_len"] if engine_src == "each" else "5")
        else:
            assert r["engine_beams"] == r["engine_max_src"] == ""
