"""Token-based batching for translation: bucketing by length, seeded shuffling, exact resume.

Training loop shape (single process; collate in the main process so the sampler's state is exactly what has
been consumed; a DataLoader with workers would prefetch ahead of it)::

    sampler = TokenBatchSampler.for_pairs(src_ids, tgt_ids, max_batch_tokens=8192, seed=1)
    sampler.load_state_dict(ckpt["data_state"])          # on resume
    for indices in sampler.forever():
        batch = collate([src_ids[i] for i in indices], [tgt_ids[i] for i in indices])
        ...                                              # step; checkpoints store sampler.state_dict()
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np
import torch

from .tokenizer import PAD_ID

STATE_VERSION = 1


def _round_up(n, multiple: int):
    return -(-n // multiple) * multiple


class TokenBatchSampler:
    """Yields lists of example indices whose padded size fits ``max_batch_tokens``.

    Cost of a batch of ``b`` examples: ``b * (pad(max src len) + pad(max tgt len))`` where ``pad`` rounds up
    to ``pad_to_multiple``: the number of positions in the padded source and target tensors, i.e. what the
    GPU actually computes and stores, not just the real tokens.

    Each epoch (deterministic in ``(seed, epoch)`` alone, so a resumed run rebuilds the same epoch):
    shuffle the examples, stable-sort them by (target length, source length) so equal-length examples keep
    a random order (bucketing: a batch holds similar lengths, so little padding), pack greedily into batches
    under the cost limit, then shuffle the order of the batches. With ``num_shards`` > 1 each shard
    (data-parallel rank) takes every ``num_shards``-th batch, after trimming so all shards get equally many.

    State (``state_dict``): the epoch and the position (batches already yielded in that epoch).

    src_lens, tgt_lens: per-example lengths of the tensors the batch will hold (ints, shape [n]); use
    :meth:`for_pairs` to get them consistent with :func:`collate`.
    """

    def __init__(self, src_lens: Sequence[int], tgt_lens: Sequence[int], max_batch_tokens: int, *,
                 seed: int = 0, shuffle: bool = True, pad_to_multiple: int = 1,
                 max_batch_size: int | None = None, num_shards: int = 1, shard_id: int = 0):
        self.src_lens = np.asarray(src_lens, dtype=np.int64)
        self.tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
        if self.src_lens.ndim != 1 or self.src_lens.shape != self.tgt_lens.shape:
            raise ValueError(f"src_lens and tgt_lens must be 1-D of equal length, got shapes "
                             f"{self.src_lens.shape} and {self.tgt_lens.shape}")
        if len(self.src_lens) == 0:
            raise ValueError("TokenBatchSampler: no examples")
        if max_batch_tokens <= 0 or pad_to_multiple <= 0 or (max_batch_size is not None and max_batch_size <= 0):
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}), pad_to_multiple ({pad_to_multiple}) "
                             f"and max_batch_size ({max_batch_size}) must be positive")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}")
        self.max_batch_tokens, self.seed, self.shuffle = int(max_batch_tokens), int(seed), bool(shuffle)
        self.pad_to_multiple, self.max_batch_size = int(pad_to_multiple), max_batch_size
        self.num_shards, self.shard_id = int(num_shards), int(shard_id)
        single = _round_up(self.src_lens, pad_to_multiple) + _round_up(self.tgt_lens, pad_to_multiple)
        over = np.flatnonzero(single > self.max_batch_tokens)
        if len(over):
            raise ValueError(f"{len(over)} examples do not fit in max_batch_tokens={max_batch_tokens} on their "
                             f"own (largest padded size {single.max()}, e.g. example {over[0]}); raise "
                             "max_batch_tokens or drop/truncate long sentences (MTTokenizer.encode(max_len=...))")
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    @classmethod
    def for_pairs(cls, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], max_batch_tokens: int,
                  **kw) -> "TokenBatchSampler":
        """Sampler for encoded pairs as :func:`collate` will pad them: source length ``len(src)``, target
        length ``len(tgt) - 1`` (decoder input and labels are the target shifted by one)."""
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        return cls([len(s) for s in src_ids], [len(t) - 1 for t in tgt_ids], max_batch_tokens, **kw)

    def fingerprint(self) -> str:
        """Hash of the lengths and the settings that shape the batches: a resume must see the same one."""
        h = hashlib.sha1()
        h.update(self.src_lens.tobytes())
        h.update(self.tgt_lens.tobytes())
        h.update(repr((self.max_batch_tokens, self.seed, self.shuffle, self.pad_to_multiple, self.max_batch_size,
                       self.num_shards, self.shard_id)).encode())
        return h.hexdigest()[:16]

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, for this shard, in the order they are yielded (lists of indices)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        # One generator per (seed, epoch): epoch k never depends on how far earlier epochs were consumed.
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.src_lens)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[np.lexsort((self.src_lens[order], self.tgt_lens[order]))]  # stable: ties stay shuffled
        m = self.pad_to_multiple
        src_p = _round_up(self.src_lens[order], m).tolist()
        tgt_p = _round_up(self.tgt_lens[order], m).tolist()
        out, start, ms, mt = [], 0, 0, 0
        cap = self.max_batch_size or n
        for k in range(n):  # greedy packing; about 20 ms for Multi30k's 29k examples
            s, t = max(ms, src_p[k]), max(mt, tgt_p[k])
            if k > start and ((k - start + 1) * (s + t) > self.max_batch_tokens or k - start >= cap):
                out.append(order[start:k].tolist())
                start, s, t = k, src_p[k], tgt_p[k]
            ms, mt = s, t
        out.append(order[start:].tolist())
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        if self.num_shards > 1:
            usable = len(out) - len(out) % self.num_shards
            if usable == 0:
                raise ValueError(f"{len(out)} batches cannot be shared by {self.num_shards} shards; lower "
                                 "max_batch_tokens or use fewer shards")
            out = out[self.shard_id:usable:self.num_shards]
        self._cache = (epoch, out)
        return out

    def __len__(self) -> int:
        """Batches per epoch for this shard."""
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch, from the saved position; then the epoch counter advances."""
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1  # before the yield: the state counts a batch as consumed once handed out
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def forever(self) -> Iterator[list[int]]:
        """Batches across epochs without end (step-based training)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved sampler stopped. Raises ValueError when the data or the
        batching settings differ from the saved run (the batches would not be the same)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"batch sampler state version {state.get('version')}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint():
            raise ValueError("the data or the batching settings (max_batch_tokens, seed, pad_to_multiple, "
                             "max_batch_size, shards) differ from the checkpointed run, so it cannot resume "
                             "exactly; use the same data and settings, or start a new run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if not 0 <= self.position <= len(self.batches(self.epoch)):
            raise ValueError(f"position {self.position} outside epoch {self.epoch}'s "
                             f"{len(self.batches(self.epoch))} batches")


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, pad_to_multiple: int) -> torch.Tensor:
    width = _round_up(max(len(s) for s in seqs), pad_to_multiple)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]] | None = None, *, pad_id: int = PAD_ID,
            pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded int64 tensors for one batch.

    src: B encoded sources (``</s>``-terminated). tgt: B encoded targets (``<s> ... </s>``), or None for
    inference. Returns ``src_ids`` [B, S], ``src_lengths`` [B]; with targets also ``tgt_in`` [B, T]
    (``<s> y``: decoder input), ``tgt_out`` [B, T] (``y </s>``: labels, ``pad_id`` where padded) and
    ``ntokens`` (scalar: non-pad labels). S, T are rounded up to ``pad_to_multiple``.
    """
    if len(src) == 0:
        raise ValueError("collate: empty batch")
    batch = {"src_ids": _pad(src, pad_id, pad_to_multiple),
             "src_lengths": torch.tensor([len(s) for s in src], dtype=torch.long)}
    if tgt is not None:
        if len(tgt) != len(src):
            raise ValueError(f"collate: {len(src)} sources but {len(tgt)} targets")
        if min(len(t) for t in tgt) < 2:
            raise ValueError("collate: a target needs at least <s> and </s>")
        batch["tgt_in"] = _pad([t[:-1] for t in tgt], pad_id, pad_to_multiple)
        batch["tgt_out"] = _pad([t[1:] for t in tgt], pad_id, pad_to_multiple)
        batch["ntokens"] = (batch["tgt_out"] != pad_id).sum()
    return batch


def length_sorted_batches(lens: Sequence[int], max_batch_size: int,
                          max_batch_tokens: int | None = None) -> list[list[int]]:
    """Inference batches: indices sorted by length (longest first, so a too-large batch fails at once), cut at
    ``max_batch_size`` sentences and, if given, ``max_batch_tokens`` padded tokens. Put outputs back in
    corpus order with the indices."""
    if max_batch_size <= 0:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    lens = np.asarray(lens, dtype=np.int64)
    order = np.argsort(-lens, kind="stable").tolist()
    out, cur = [], []
    for i in order:
        width = lens[cur[0]] if cur else lens[i]  # longest first: the first one sets the padded width
        if cur and (len(cur) >= max_batch_size or
                    (max_batch_tokens is not None and (len(cur) + 1) * width > max_batch_tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out
