"""``lsquant.calibrate(model, batches)``: one call from a float model to calibrated clips."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .calib import METHODS
from .quantizer import CALIBRATE, TensorQuantizer


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every TensorQuantizer of the tree by qualified name (the name also goes into its error messages)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            m._lsquant_name = name or "TensorQuantizer"
            found[name] = m
    return found


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, batches: Iterable, method: str | None = None, percentile: float = 99.99,
              num_bins: int = 2048, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` with every quantizer collecting |x|, then set the clips.

    Args:
        model: any module containing TensorQuantizers (QuantLinear, lsquant layers).
        batches: an iterable of inputs; a tuple/list is passed as positional arguments, a dict as keyword
            arguments, anything else as the one argument.
        method: "max", "percentile" or "mse" for every quantizer; None uses each quantizer's own default.
        percentile, num_bins: for the histogram methods.
    Returns:
        {quantizer name: clip} for the calibrated (non-dynamic) quantizers. Each quantizer goes back to the
        mode it had before (so a model calibrated in float mode stays float until ``enable_quant``).
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    qs = quantizers(model)
    if not qs:
        raise ValueError("the model has no TensorQuantizer to calibrate: build it from lsquant layers or "
                         "QuantLinear (lsquant.QuantLinear.from_linear)")
    previous = {name: q.mode for name, q in qs.items()}
    was_training = model.training
    for q in qs.values():
        q.set_quant_mode(CALIBRATE, method=method, percentile=percentile, num_bins=num_bins)
    model.eval()
    n = 0
    try:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for batch in tqdm(batches, desc=f"calibrating ({method or 'default'})", disable=not progress,
                              unit="batch"):
                _run(model, batch)
                n += 1
        if n == 0:
            raise ValueError("calibrate got no batches: pass a non-empty iterable of model inputs")
        clips = {}
        for name, q in qs.items():
            if q.dynamic:
                continue
            clip = q.load_calibration()
            clips[name] = clip
    finally:
        for name, q in qs.items():
            q.calibrator = None
            q.set_quant_mode(previous[name])
        model.train(was_training)
    return clips
