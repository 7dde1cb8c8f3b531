"""Token batching: the padded-size limit, bucketing, seeds, exact resume, sharding, collate."""
import itertools
import random

import numpy as np
import pytest
import torch

from lsquant.recipes.mt.batching import TokenBatchSampler, collate, length_sorted_batches
from lsquant.recipes.mt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def _pairs(n=997, seed=0):
    """Encoded-looking pairs with awkward lengths (1 .. 97 pieces)."""
    r = random.Random(seed)
    src = [[r.randrange(4, 500) for _ in range(r.randint(1, 97))] + [EOS_ID] for _ in range(n)]
    tgt = [[BOS_ID] + [r.randrange(4, 500) for _ in range(max(1, len(s) + r.randint(-5, 5)))] + [EOS_ID]
           for s in src]
    return src, tgt


def _round(n, m):
    return -(-n // m) * m


@pytest.mark.parametrize("max_tokens,multiple", [(256, 1), (1000, 8), (4096, 8)])
def test_batches_respect_padded_budget_and_cover_epoch(max_tokens, multiple):
    src, tgt = _pairs()
    s = TokenBatchSampler.for_pairs(src, tgt, max_tokens, seed=1, pad_to_multiple=multiple)
    batches = s.batches(0)
    assert sorted(itertools.chain(*batches)) == list(range(len(src)))  # every example exactly once
    for b in batches:
        t = collate([src[i] for i in b], [tgt[i] for i in b], pad_to_multiple=multiple)
        padded = t["src_ids"].numel() + t["tgt_in"].numel()  # what the GPU computes on
        assert padded <= max_tokens
        assert t["src_ids"].shape[1] % multiple == 0
    # bucketing: similar lengths share a batch, so padding is small (random batching would waste ~40%)
    real = sum(len(x) for x in src) + sum(len(x) - 1 for x in tgt)
    padded = sum(len(b) * (_round(max(len(src[i]) for i in b), multiple) +
                           _round(max(len(tgt[i]) - 1 for i in b), multiple)) for b in batches)
    assert real / padded > 0.75


def test_seed_and_epoch_change_order_deterministically():
    src, tgt = _pairs()
    a = TokenBatchSampler.for_pairs(src, tgt, 2048, seed=5)
    b = TokenBatchSampler.for_pairs(src, tgt, 2048, seed=5)
    c = TokenBatchSampler.for_pairs(src, tgt, 2048, seed=6)
    assert a.batches(0) == b.batches(0) and a.batches(3) == b.batches(3)
    assert a.batches(0) != a.batches(1) and a.batches(0) != c.batches(0)
    no_shuffle = TokenBatchSampler.for_pairs(src, tgt, 2048, shuffle=False)
    assert no_shuffle.batches(0) == no_shuffle.batches(1)


def test_iteration_advances_epochs():
    src, tgt = _pairs(200)
    s = TokenBatchSampler.for_pairs(src, tgt, 1024, seed=0)
    n0 = len(s)
    first = list(s)
    assert len(first) == n0 and s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 0
    assert list(itertools.islice(s.forever(), n0 + 2)) == s.batches(1) + s.batches(2)[:2]


@pytest.mark.parametrize("stop", [0, 1, 17, "end_of_epoch", 60])
def test_resume_is_exact(stop):
    """Consume k batches, save the state (as a checkpoint would, through torch.save), rebuild a sampler,
    restore: the remaining stream equals the uninterrupted one."""
    src, tgt = _pairs(400)
    ref = TokenBatchSampler.for_pairs(src, tgt, 1500, seed=3, pad_to_multiple=8)
    n = len(ref)
    stop = n if stop == "end_of_epoch" else stop
    full = list(itertools.islice(ref.forever(), 3 * n))
    run = TokenBatchSampler.for_pairs(src, tgt, 1500, seed=3, pad_to_multiple=8)
    it = run.forever()
    done = [next(it) for _ in range(stop)]
    state = run.state_dict()
    del run, it  # the process dies here
    resumed = TokenBatchSampler.for_pairs(src, tgt, 1500, seed=3, pad_to_multiple=8)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed.forever(), 3 * n - stop))
    assert done + rest == full


def test_resume_with_other_data_or_settings_is_refused():
    src, tgt = _pairs(100)
    s = TokenBatchSampler.for_pairs(src, tgt, 1024, seed=0)
    state = s.state_dict()
    with pytest.raises(ValueError, match="differ from the checkpointed run"):
        TokenBatchSampler.for_pairs(src, tgt, 2048, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="differ from the checkpointed run"):
        TokenBatchSampler.for_pairs(src[:-1], tgt[:-1], 1024, seed=0).load_state_dict(state)


def test_oversize_example_and_bad_arguments():
    with pytest.raises(ValueError, match="do not fit in max_batch_tokens=100"):
        TokenBatchSampler([60, 10], [50, 10], 100)
    with pytest.raises(ValueError, match="equal length"):
        TokenBatchSampler([1, 2], [1], 100)
    with pytest.raises(ValueError, match="shard_id"):
        TokenBatchSampler([1], [1], 100, num_shards=2, shard_id=2)


def test_max_batch_size_and_shards():
    src, tgt = _pairs(300)
    s = TokenBatchSampler.for_pairs(src, tgt, 10**6, seed=0, max_batch_size=7)
    assert max(len(b) for b in s.batches(0)) == 7
    shards = [TokenBatchSampler.for_pairs(src, tgt, 3000, seed=2, num_shards=3, shard_id=k) for k in range(3)]
    parts = [sh.batches(4) for sh in shards]
    assert len({len(p) for p in parts}) == 1  # every rank steps equally often
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen))  # no example on two ranks


def test_collate_shapes_and_shift():
    src = [[5, 6, EOS_ID], [7, EOS_ID]]
    tgt = [[BOS_ID, 8, 9, 10, EOS_ID], [BOS_ID, 11, EOS_ID]]
    b = collate(src, tgt)
    assert b["src_ids"].tolist() == [[5, 6, EOS_ID], [7, EOS_ID, PAD_ID]]
    assert b["src_lengths"].tolist() == [3, 2]
    assert b["tgt_in"].tolist() == [[BOS_ID, 8, 9, 10], [BOS_ID, 11, PAD_ID, PAD_ID]]
    assert b["tgt_out"].tolist() == [[8, 9, 10, EOS_ID], [11, EOS_ID, PAD_ID, PAD_ID]]
    assert int(b["ntokens"]) == 6 and b["src_ids"].dtype == torch.long
    assert collate([[1, 2]], pad_to_multiple=8)["src_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_length_sorted_inference_batches():
    lens = np.array([3, 9, 1, 9, 4, 7, 2])
    batches = length_sorted_batches(lens, max_batch_size=3, max_batch_tokens=20)
    assert sorted(itertools.chain(*batches)) == list(range(7))
    assert all(len(b) <= 3 and len(b) * max(lens[b]) <= 20 for b in batches)
    assert batches[0][:2] == [1, 3]  # longest first, stable
