"""Min/max observers: the running extremes, or their exponential moving average.

``MovingAverageObserver`` follows optimum-quanto's ``Calibration(momentum=0.9)`` convention
(``optimum/quanto/calibrate.py``): the first batch sets the range, later batches update it as
``old * momentum + new * (1 - momentum)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lowbit.observers.base import OBSERVERS, Observer


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """Range = running min and max of everything observed.

    Example::

        >>> o = MinMaxObserver("int8_asym"); o.update(torch.tensor([-1.0, 3.0]))
        >>> o.range()
        (tensor([-1.]), tensor([3.]))
    """

    name = "minmax"

    def reset(self) -> None:
        super().reset()
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None

    def _update(self, v: torch.Tensor) -> None:
        lo, hi = v.amin(dim=1), v.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


@OBSERVERS.register("moving_average")
class MovingAverageObserver(MinMaxObserver):
    """Range = exponential moving average of per-batch min and max (``momentum`` weights the past)."""

    name = "moving_average"

    def __init__(self, scheme="int8", axis: Optional[int] = None, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}: must be in [0, 1)")
        self.momentum = float(momentum)
        super().__init__(scheme, axis)

    def _update(self, v: torch.Tensor) -> None:
        lo, hi = v.amin(dim=1), v.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = self.min_val * m + lo * (1 - m)
            self.max_val = self.max_val * m + hi * (1 - m)
