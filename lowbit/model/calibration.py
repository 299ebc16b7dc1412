"""``Calibration``: record activation ranges of quantized modules and switch on static activation quantization.

optimum-quanto's workflow (``optimum/quanto/calibrate.py``)::

    lowbit.quantize(model, weights=lowbit.qint8, activations=lowbit.qint8)
    with lowbit.Calibration(momentum=0.9):
        model(samples)          # inputs of every QLinear/QConv2d are observed
    lowbit.freeze(model)        # activation scales are now fixed buffers (``input_scale``)

While the context is open, every module with static activation quantization observes its input
(with one of the :mod:`lowbit.observers`) and computes in float activations; at exit its
``input_scale`` is set from the observer, which switches activation quantization on. Modules
with dynamic (per-token) activation scales need no calibration and are left alone. The hook is a
global forward pre-hook, so the context works on any model without being told which one.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch import nn

from lowbit.observers import create_observer

logger = logging.getLogger(__name__)


class Calibration:
    """Context manager recording activation ranges for static activation quantization.

    Args:
        momentum: weight of the past in the moving average of per-batch ranges (quanto: 0.9);
            used by the ``moving_average`` observer.
        observer: ``moving_average`` (default), ``minmax``, ``percentile`` or ``histogram``.
        percentile: for the ``percentile`` observer.
        bins: for the ``histogram`` observer.

    Example::

        >>> lowbit.quantize(model, weights="qint8", activations="qint8")
        >>> with lowbit.Calibration(momentum=0.9):
        ...     model(batch)
        >>> model[0].input_scale  # doctest: +SKIP
        tensor(0.0213)
    """

    def __init__(self, momentum: float = 0.9, observer: str = "moving_average", percentile: float = 99.99,
                 bins: int = 2048) -> None:
        opts: Dict[str, object] = {}
        if observer == "moving_average":
            opts["momentum"] = momentum
        elif observer == "percentile":
            opts["percentile"] = percentile
        elif observer == "histogram":
            opts["bins"] = bins
        # validate now (unknown name or bad option) rather than on the first forward
        create_observer(observer, "int8", None, **opts)
        self.observer = observer
        self.options = opts
        self._handle = None
        self._modules: Dict[int, nn.Module] = {}

    def _pre_hook(self, module: nn.Module, args) -> None:
        from lowbit.nn.qlinear import _ActivationQuantMixin

        if not isinstance(module, _ActivationQuantMixin) or module.activation_qtype is None or module.act_dynamic:
            return
        if id(module) not in self._modules:
            module._observer = create_observer(self.observer, module.activation_qtype, None, **self.options)
            self._modules[id(module)] = module

    def __enter__(self) -> "Calibration":
        if self._handle is not None:
            raise RuntimeError("this Calibration context is already active")
        self._modules = {}
        self._handle = nn.modules.module.register_module_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.remove()
        self._handle = None
        n = 0
        for module in self._modules.values():
            obs = module._observer
            module._observer = None
            if exc_type is not None or obs is None or obs.count == 0:
                continue
            scale, _ = obs.calculate_qparams()
            with torch.no_grad():
                module.input_scale.copy_(scale.to(module.input_scale.device, module.input_scale.dtype))
            n += 1
        self._modules = {}
        if exc_type is None:
            logger.info("calibrated activation scales of %d modules", n)
            if n == 0:
                logger.warning("Calibration recorded no module: quantize the model with activations= first")

    @property
    def active(self) -> bool:
        return self._handle is not None


def calibrated(module: nn.Module) -> Optional[bool]:
    """True/False for a module with static activation quantization (scale recorded or not), else None."""
    scale = getattr(module, "input_scale", None)
    if scale is None:
        return None
    return bool((scale > 0).all())
