"""Histogram observer: the clipping range that minimises the expected quantization error.

The observer accumulates a histogram of ``bins`` bins per channel (the range grows when a batch
exceeds it; old counts are re-binned at their bin centres). ``range()`` then searches candidate
clipping ranges and returns the one whose quantize-dequantize error, summed over the histogram
(bin centre, squared error, weighted by the count), is smallest -- the criterion of torch.ao's
``HistogramObserver`` (L2 norm of the quantization error, Krishnamoorthi 2018), evaluated
directly with lowbit's quantizers rather than with its closed-form noise model:

* symmetric and fp8 targets: ranges ``[-t, t]`` with ``t = f * absmax``, ``f`` on a grid in (0, 1];
* asymmetric targets: ranges ``[a * min, b * max]`` with ``a, b`` on a grid in (0, 1].
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lowbit.observers.base import OBSERVERS, Observer, fake_quantize_with_range


@OBSERVERS.register("histogram")
class HistogramObserver(Observer):
    """Range minimising the histogram-weighted squared quantization error.

    Example::

        >>> o = HistogramObserver("int8")
        >>> o.update(torch.cat([torch.randn(100000), torch.tensor([80.0])]))
        >>> lo, hi = o.range(); float(hi) < 80.0
        True
    """

    name = "histogram"

    def __init__(self, scheme="int8", axis: Optional[int] = None, bins: int = 2048, grid: int = 100) -> None:
        if not isinstance(bins, int) or bins < 16:
            raise ValueError(f"bins={bins!r}: must be an integer >= 16")
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid={grid!r}: must be an integer >= 2")
        self.bins = bins
        self.grid = grid
        super().__init__(scheme, axis)

    def reset(self) -> None:
        super().reset()
        self.hist: Optional[torch.Tensor] = None  # [C, bins] float64 counts
        self.lo: Optional[torch.Tensor] = None  # [C]
        self.hi: Optional[torch.Tensor] = None

    # -- accumulation ------------------------------------------------------------------------------
    def _bin_index(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        width = (hi - lo) / self.bins
        width = torch.where(width > 0, width, torch.ones_like(width))
        idx = torch.floor((x - lo.unsqueeze(1)) / width.unsqueeze(1)).long()
        return idx.clamp_(0, self.bins - 1)

    def _scatter(self, idx: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        c = idx.shape[0]
        flat = (idx + torch.arange(c, device=idx.device).unsqueeze(1) * self.bins).reshape(-1)
        w = None if weights is None else weights.reshape(-1)
        return torch.bincount(flat, weights=w, minlength=c * self.bins).reshape(c, self.bins).double()

    def centers(self) -> torch.Tensor:
        width = (self.hi - self.lo) / self.bins
        j = torch.arange(self.bins, dtype=torch.float32, device=self.lo.device)
        return self.lo.unsqueeze(1) + (j + 0.5) * width.unsqueeze(1)

    def _update(self, v: torch.Tensor) -> None:
        bmin, bmax = v.amin(dim=1), v.amax(dim=1)
        if self.hist is None:
            self.lo, self.hi = bmin, bmax
            self.hist = self._scatter(self._bin_index(v, bmin, bmax), None)
            return
        lo, hi = torch.minimum(self.lo, bmin), torch.maximum(self.hi, bmax)
        if not (torch.equal(lo, self.lo) and torch.equal(hi, self.hi)):
            # re-bin the old counts at their old bin centres
            old_idx = self._bin_index(self.centers(), lo, hi)
            self.hist = self._scatter(old_idx, self.hist.float())
            self.lo, self.hi = lo, hi
        self.hist += self._scatter(self._bin_index(v, lo, hi), None)

    # -- range search -----------------------------------------------------------------------------
    def _error(self, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Histogram-weighted squared error per channel of quantizing the bin centres with ``[lo, hi]``."""
        fq = fake_quantize_with_range(c, lo.unsqueeze(1), hi.unsqueeze(1), self.scheme)
        return ((fq - c).double() ** 2 * self.hist).sum(dim=1)

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        c = self.centers()
        fracs = torch.linspace(1.0 / self.grid, 1.0, self.grid, device=c.device)
        best_err = None
        best_lo, best_hi = self.lo, self.hi
        if self.symmetric or self.kind == "fp8":
            absmax = torch.maximum(self.lo.abs(), self.hi.abs())
            cands = [(-f * absmax, f * absmax) for f in fracs]
        else:
            g = max(2, int(round(self.grid ** 0.5)) * 2)
            sub = torch.linspace(1.0 / g, 1.0, g, device=c.device)
            cands = [(a * self.lo, b * self.hi) for a in sub for b in sub]
        for lo, hi in cands:
            err = self._error(c, lo, hi)
            if best_err is None:
                best_err, best_lo, best_hi = err, lo, hi
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi
