"""Training checkpoints: atomic, self-describing, resumable (any recipe, not only translation).

A checkpoint is one ``torch.save`` file ``{prefix}_{step:08d}.pt`` holding::

    {"format": "lsquant-checkpoint", "version": 1, "step": int,
     "model": state_dict, "optimizer": state_dict | None, "scheduler": state_dict | None,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor] | None, "python": tuple, "numpy": dict},
     "data_state": dict | None,          # e.g. TokenBatchSampler.state_dict()
     "config": dict | None, "config_class": "module.QualName" | None, "config_version": int | None,
     "extra": dict, "lsquant_version": str, "torch_version": str}

Writes go through :func:`lsquant.files.atomic_write` (temp file in the same directory, fsync,
``os.replace``), so a run killed at any moment leaves the previous checkpoint intact and never a partial
file under a checkpoint name. Loading picks the newest file that loads; a corrupt or truncated one is
skipped with a warning. Only plain types and tensors are stored, so loading uses ``weights_only=True``
(no arbitrary code runs from a checkpoint file).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsquant.files import TMP_PREFIX, atomic_write

FORMAT = "lsquant-checkpoint"
VERSION = 1


# -- RNG state ------------------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Every RNG a training step may draw from: torch CPU, CUDA (all devices, if initialised), Python's
    ``random`` and NumPy's global generator (its key as a tensor, so the checkpoint stays weights_only)."""
    np_state = np.random.get_state(legacy=False)
    np_state = {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                      "pos": int(np_state["state"]["pos"])}}
    return {"torch": torch.get_rng_state(),
            # Only when CUDA is already in use: querying it would initialise CUDA on CPU-only code paths.
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None,
            "python": random.getstate(),
            "numpy": np_state}


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only onto the same number of GPUs."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np_state["state"]["key"].numpy().astype(np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} GPUs, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored (dropout masks will differ)")


def _tuplify(x):
    """random.setstate needs tuples; a round trip through some serialisers turns them into lists."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- save / load ----------------------------------------------------------------------------------------------

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel (``.module``) or torch.compile (``._orig_mod``), so the
    saved keys have no wrapper prefix and load into an unwrapped model."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def config_to_dict(config: Any) -> tuple[dict | None, str | None, int | None]:
    """(fields as a dict, "module.QualName", its ``version`` field or attribute) of a config dataclass."""
    if config is None:
        return None, None, None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        cls = type(config)
        return dataclasses.asdict(config), f"{cls.__module__}.{cls.__qualname__}", getattr(config, "version", None)
    if isinstance(config, dict):
        return dict(config), None, config.get("version")
    raise TypeError(f"config must be a dataclass instance or a dict, got {type(config).__name__}")


def make_checkpoint(step: int, model: torch.nn.Module, optimizer=None, scheduler=None, *, config=None,
                    data_state: dict | None = None, extra: dict | None = None) -> dict:
    """The checkpoint dict (see the module docstring) of the current training state."""
    from lsquant import __version__

    cfg, cfg_class, cfg_version = config_to_dict(config)
    return {"format": FORMAT, "version": VERSION, "step": int(step),
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": capture_rng_state(), "data_state": data_state,
            "config": cfg, "config_class": cfg_class, "config_version": cfg_version,
            "extra": dict(extra or {}), "lsquant_version": __version__,
            "torch_version": str(torch.__version__)}  # str(): a TorchVersion object fails weights_only loading


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(checkpoint, f)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and check one checkpoint file. Raises ValueError when it is not a (compatible) lsquant
    checkpoint, and the torch error (RuntimeError, EOFError, ...) when the file is damaged."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lsquant checkpoint (no format={FORMAT!r} field)")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path} is checkpoint version {ckpt.get('version')}, this lsquant reads {VERSION}")
    return ckpt


def restore_checkpoint(ckpt: dict, model: torch.nn.Module, optimizer=None, scheduler=None,
                       restore_rng: bool = True, strict: bool = True) -> int:
    """Load the states of ``ckpt`` into the given objects (and the RNGs); returns the step to continue from.
    The data iterator is restored by the caller: ``sampler.load_state_dict(ckpt["data_state"])``."""
    _unwrap(model).load_state_dict(ckpt["model"], strict=strict)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise ValueError("checkpoint has no optimizer state; pass optimizer=None to load weights only")
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        if ckpt.get("scheduler") is None:
            raise ValueError("checkpoint has no scheduler state; pass scheduler=None")
        scheduler.load_state_dict(ckpt["scheduler"])
    if restore_rng:
        restore_rng_state(ckpt["rng"])
    return int(ckpt["step"])


class CheckpointManager:
    """The checkpoints of one run directory: ``save`` (atomic, keeps the newest ``keep_last``) and
    ``load_latest`` (newest that loads, skipping damaged ones with a warning).

    Assumes one writer per directory (rank 0 in data-parallel runs).
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, prefix: str = "checkpoint"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
            raise ValueError(f"prefix must be a plain file-name part, got {prefix!r}")
        self.directory, self.keep_last, self.prefix = Path(directory), keep_last, prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}_(\d+)\.pt")

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}_{step:08d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._pattern.fullmatch(p.name))]
        return sorted(found)

    def save(self, step: int, model: torch.nn.Module, optimizer=None, scheduler=None, **kw) -> Path:
        """Checkpoint the training state at ``step`` (keyword arguments as :func:`make_checkpoint`), then
        delete all but the newest ``keep_last`` checkpoints and any temp files of interrupted writes."""
        path = save_checkpoint(self.path_for(step), make_checkpoint(step, model, optimizer, scheduler, **kw))
        for _, old in self.checkpoints()[:-self.keep_last]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        for tmp in self.directory.glob(f"{TMP_PREFIX}{self.prefix}_*"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        """The newest checkpoint that loads (with ``"path"`` added), or None when there is none (a fresh run).
        Damaged files (a crash during a non-atomic copy, a full disk, a truncated transfer) are skipped with a
        warning. When checkpoints exist but none loads, raises RuntimeError rather than silently restarting
        from scratch (a systematic problem, e.g. a newer checkpoint version, must not look like step 0)."""
        errors = []
        for step, path in reversed(self.checkpoints()):
            try:
                ckpt = load_checkpoint(path, map_location)
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable", try the older one
                errors.append(f"{path.name}: {type(e).__name__}: {str(e)[:300]}")
                # warnings (not only logging): visible in any caller; setup_logging routes them to the log file
                warnings.warn(f"skipping unreadable checkpoint {path} ({type(e).__name__}: {str(e)[:200]})")
                continue
            if ckpt["step"] != step:
                warnings.warn(f"{path} holds step {ckpt['step']}, its name says {step}; using the stored step")
            ckpt["path"] = str(path)
            return ckpt
        if errors:
            raise RuntimeError(f"none of the {len(errors)} checkpoints in {self.directory} can be loaded; fix "
                               "the cause or move them away to start afresh:\n  " + "\n  ".join(errors))
        return None
