"""Checkpoints: atomic writes survive a crash, damaged files are skipped, keep-last-N, exact resume of model,
optimizer, scheduler, RNGs and data order; the inverse-sqrt schedule."""
import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from lsquant.recipes import checkpoint as ck
from lsquant.recipes.checkpoint import CheckpointManager, load_checkpoint
from lsquant.recipes.mt.batching import TokenBatchSampler
from lsquant.recipes.schedule import InverseSqrt, inverse_sqrt_schedule


@dataclasses.dataclass
class Cfg:
    hidden: int = 8
    lr: float = 1e-3
    version: int = 2


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    # SGD with momentum: optimizer state to restore, without AdamW's one-off torch._dynamo import (~4 s)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = inverse_sqrt_schedule(opt, warmup_steps=3)
    sampler = TokenBatchSampler(list(range(1, 41)), list(range(1, 41)), 200, seed=seed)
    return model, opt, sched, sampler


def _train(model, opt, sched, sampler, it, steps):
    """Steps whose result depends on every piece of state: weights, momentum buffers, LR, dropout (torch RNG),
    the data order (sampler), and Python/NumPy RNG draws."""
    losses = []
    for _ in range(steps):
        idx = next(it)
        x = torch.tensor([[i, len(idx), random.random(), float(np.random.rand())] for i in idx], dtype=torch.float32)
        loss = model(x / 40).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_resume_continues_exactly(tmp_path):
    random.seed(1), np.random.seed(1)
    model, opt, sched, sampler = _setup()
    it = sampler.forever()
    full = _train(model, opt, sched, sampler, it, 12)

    random.seed(1), np.random.seed(1)
    model, opt, sched, sampler = _setup()
    it = sampler.forever()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    first = _train(model, opt, sched, sampler, it, 5)
    mgr.save(5, model, opt, sched, config=Cfg(), data_state=sampler.state_dict())
    _train(model, opt, sched, sampler, it, 2)  # work after the checkpoint is lost in the "crash"
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a new process has other RNG states

    model, opt, sched, sampler = _setup(seed=0)
    ckpt = mgr.load_latest()
    step = ck.restore_checkpoint(ckpt, model, opt, sched)
    sampler.load_state_dict(ckpt["data_state"])
    assert step == 5
    assert first + _train(model, opt, sched, sampler, sampler.forever(), 7) == full
    assert ckpt["config"] == {"hidden": 8, "lr": 1e-3, "version": 2} and ckpt["config_version"] == 2
    assert ckpt["config_class"].endswith("Cfg")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched, _ = _setup()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, model, opt, sched)
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, model, opt, sched)
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in mgr.checkpoints()] == [1]  # no file under a checkpoint name for step 2
    assert not list(tmp_path.glob(".tmp-*"))  # and the temp file is gone
    assert mgr.load_latest()["step"] == 1


def test_truncated_checkpoint_is_skipped_with_warning(tmp_path):
    model, opt, sched, _ = _setup()
    mgr = CheckpointManager(tmp_path)
    mgr.save(10, model, opt, sched)
    p20 = mgr.save(20, model, opt, sched)
    p20.write_bytes(p20.read_bytes()[: p20.stat().st_size // 2])  # e.g. a copy that ran out of disk
    (tmp_path / "checkpoint_00000030.pt").write_bytes(b"")  # and an empty one
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint") as rec:
        ckpt = mgr.load_latest()
    assert ["00000030" in str(w.message) for w in rec] == [True, False]  # newest first, then step 20
    assert "00000020" in str(rec[1].message)
    assert ckpt["step"] == 10 and ckpt["path"].endswith("checkpoint_00000010.pt")


def test_keep_last_and_fresh_dir(tmp_path):
    model, opt, sched, _ = _setup()
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    assert mgr.load_latest() is None  # a fresh run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".tmp-checkpoint_00000001.pt.abc").write_bytes(b"junk of an older crash")
    for step in (1, 2, 3, 4):
        mgr.save(step, model, opt, sched)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_00000003.pt", "checkpoint_00000004.pt"]


def test_not_a_checkpoint_and_weights_only(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an lsquant checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    model, opt, sched, _ = _setup()
    path = CheckpointManager(tmp_path).save(1, model, opt, sched, config=Cfg(), extra={"bleu": 1.5})
    ckpt = torch.load(path, weights_only=True)  # plain data only: safe to load
    assert ckpt["extra"] == {"bleu": 1.5} and ckpt["version"] == ck.VERSION


def test_rng_round_trip():
    state = ck.capture_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand(3))
    ck.restore_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def test_inverse_sqrt_schedule():
    f = InverseSqrt(4000)
    assert f(0) == pytest.approx(1 / 4000) and f(3999) == pytest.approx(1.0)
    assert f(15999) == pytest.approx(0.5)  # 1/sqrt decay: 4x the warm-up steps -> half the peak
    assert max(f(s) for s in range(20000)) == pytest.approx(1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = inverse_sqrt_schedule(opt, 10)
    for _ in range(40):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * math.sqrt(10 / 41))
    with pytest.raises(ValueError, match="warmup_steps"):
        InverseSqrt(0)


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "checkpoint_00000007.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(RuntimeError, match="none of the 1 checkpoints"):
        CheckpointManager(tmp_path).load_latest()
