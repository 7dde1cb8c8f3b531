"""Calibrators: collect |x| statistics over several batches and turn them into clips.

- ``max``: the largest |x| seen (per tensor or per channel).
- ``percentile``: the p-th percentile of |x| (default 99.99), from a histogram.
- ``mse``: the clip that minimises the expected squared error of fake_quantize over the histogram
  (each bin represented by its centre), searched over candidate clips.

Histograms have ``num_bins`` bins over [0, running max]; when a later batch has a larger |x|, the range
grows and the old counts are moved into the new bins by their centres (TensorRT's calibrators do the same).
Everything is per channel as well as per tensor: a [C, num_bins] histogram, C = 1 per tensor.
"""
from __future__ import annotations

import torch

from .ref import QMAX

METHODS = ("max", "percentile", "mse")


def _abs_by_channel(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """|x| as fp32 [C, n_per_channel]."""
    x = x.detach().float().abs()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(f"calibration data for {name} contains {kind}: a clip computed from it would be "
                         "meaningless. Check the model's inputs and float forward (e.g. fp16 overflow) before "
                         "calibrating.")


class Calibrator:
    """Collects |x| over batches for one quantizer. ``collect(x)`` then ``compute_clip()`` -> fp32 [C] or []."""

    def __init__(self, method: str = "max", axis: int | None = None, percentile: float = 99.99,
                 num_bins: int = 2048, name: str = "quantizer"):
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if num_bins < 16:
            raise ValueError(f"num_bins must be at least 16, got {num_bins}")
        self.method, self.axis, self.percentile, self.num_bins, self.name = method, axis, percentile, num_bins, name
        self.amax: torch.Tensor | None = None   # [C] running max of |x|
        self.hist: torch.Tensor | None = None   # [C, num_bins] counts (float64 to stay exact to 2^53)
        self.batches = 0

    def collect(self, x: torch.Tensor) -> None:
        _check_finite(x, self.name)
        a = _abs_by_channel(x, self.axis)
        if a.shape[1] == 0:
            return
        batch_max = a.amax(dim=1)
        if self.amax is not None and batch_max.shape != self.amax.shape:
            raise ValueError(f"{self.name}: calibration batches have {batch_max.numel()} channels after "
                             f"{self.amax.numel()} before; per-channel quantizers need a fixed channel count")
        new_amax = batch_max if self.amax is None else torch.maximum(self.amax, batch_max.to(self.amax.device))
        if self.method != "max":
            self._update_hist(a, new_amax)
        self.amax = new_amax
        self.batches += 1

    def _edges_width(self, amax: torch.Tensor) -> torch.Tensor:
        # a range of zero (all-zero channel) gets a tiny width so that binning stays defined
        return torch.clamp(amax.double(), min=1e-30) / self.num_bins

    def _update_hist(self, a: torch.Tensor, new_amax: torch.Tensor) -> None:
        C, B = a.shape[0], self.num_bins
        width = self._edges_width(new_amax).to(a.device)                     # [C]
        if self.hist is None:
            self.hist = torch.zeros(C, B, dtype=torch.float64, device=a.device)
        elif bool((new_amax.to(self.amax.device) > self.amax).any()):
            # move old counts to the new, wider bins by bin centre
            old_width = self._edges_width(self.amax).to(a.device)
            centres = (torch.arange(B, device=a.device, dtype=torch.float64) + 0.5) * old_width[:, None]
            idx = torch.clamp((centres / width[:, None]).long(), max=B - 1)
            moved = torch.zeros_like(self.hist)
            moved.scatter_add_(1, idx, self.hist)
            self.hist = moved
        idx = torch.clamp((a.double() / width[:, None]).long(), max=B - 1)   # [C, n]
        self.hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))

    def compute_clip(self) -> torch.Tensor:
        if self.amax is None:
            raise RuntimeError(f"{self.name} saw no data during calibration: is it on the path of the batches "
                               "that were run?")
        if self.method == "max":
            clip = self.amax
        elif self.method == "percentile":
            clip = self._percentile_clip()
        else:
            clip = self._mse_clip()
        # an all-zero channel has no range: give it a tiny positive clip (its values quantize to 0 exactly)
        clip = torch.where(clip > 0, clip.float(), torch.full_like(clip.float(), 1e-8))
        return clip.reshape(()) if self.axis is None else clip

    def _percentile_clip(self) -> torch.Tensor:
        cdf = torch.cumsum(self.hist, dim=1)
        total = cdf[:, -1:]
        target = total * (self.percentile / 100.0)
        idx = torch.searchsorted(cdf, target).clamp(max=self.num_bins - 1).squeeze(1)   # first bin reaching it
        width = self._edges_width(self.amax).to(self.hist.device)
        return ((idx.double() + 1) * width).float().to(self.amax.device)

    def _mse_clip(self, num_candidates: int = 256, chunk: int = 16) -> torch.Tensor:
        """argmin over candidate clips c of sum_b count_b * (fake_quantize(centre_b; c) - centre_b)^2."""
        B = self.num_bins
        width = self._edges_width(self.amax).to(self.hist.device)                      # [C]
        centres = (torch.arange(B, dtype=torch.float64, device=width.device) + 0.5)    # in units of width
        # candidates from 1/num_candidates of the range to all of it, in bin units
        cand = torch.linspace(B / num_candidates, B, num_candidates, dtype=torch.float64, device=width.device)
        best = []
        for lo in range(0, self.hist.shape[0], chunk):
            h = self.hist[lo:lo + chunk]                                               # [c, B]
            scale = cand / QMAX                                                        # [K]
            q = torch.clamp(torch.round(centres[None, :] / scale[:, None]), -QMAX, QMAX) * scale[:, None]  # [K, B]
            err = ((q - centres[None, :]) ** 2)                                        # [K, B]
            total = h @ err.T                                                          # [c, K]
            best.append(cand[total.argmin(dim=1)])
        return (torch.cat(best) * width).float().to(self.amax.device)
