"""Calibration observers: ``minmax``, ``moving_average``, ``percentile``, ``histogram``.

Each observes tensors per-tensor or per-channel and returns ``(scale, zero_point)`` for a target
scheme (``int8``, ``int4_asym``, ``fp8_e4m3``, ``qint8``, ``qfloat8`` ...)::

    >>> from lowbit.observers import create_observer
    >>> obs = create_observer("percentile", "int8", axis=None, percentile=99.9)
    >>> obs.update(torch.randn(4, 128)); scale, zero = obs.calculate_qparams()
"""
from lowbit.observers.base import (
    OBSERVERS,
    Observer,
    create_observer,
    fake_quantize_with_range,
    qparams_from_range,
)
from lowbit.observers.histogram import HistogramObserver
from lowbit.observers.minmax import MinMaxObserver, MovingAverageObserver
from lowbit.observers.percentile import PercentileObserver

__all__ = [
    "OBSERVERS",
    "Observer",
    "MinMaxObserver",
    "MovingAverageObserver",
    "PercentileObserver",
    "HistogramObserver",
    "create_observer",
    "qparams_from_range",
    "fake_quantize_with_range",
]
