"""Observer base class: running statistics of a tensor -> (scale, zero_point) for a target scheme.

An observer reduces every observed tensor to a 2-D view ``[C, N]`` (``C = 1`` per-tensor, or the
size of ``axis`` per-channel), keeps running statistics, and turns them into quantization
parameters with the numeric rules of :mod:`lowbit.formats`:

* integer schemes (``int8``, ``int4``, ``int8_asym`` ...): ``affine_qparams`` (symmetric absmax
  with the implicit zero point ``2**(b-1)``, or asymmetric with the range extended to include 0);
* float8 schemes (``fp8_e4m3``, ``fp8_e5m2``): ``scale = absmax / fmax``, zero point 0.

The QTypes ``qint8`` / ``qfloat8`` are accepted for ``scheme`` (symmetric int8 / fp8 e4m3).
Observers are plain objects (not modules) usable on their own::

    >>> obs = MinMaxObserver("int8")
    >>> obs.update(torch.tensor([-1.0, 0.5])); obs.update(torch.tensor([2.0]))
    >>> scale, zero = obs.calculate_qparams()      # absmax 2 -> scale 2/127, zero 128
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from lowbit._registry import Registry
from lowbit.formats import affine, fp8

OBSERVERS: Registry[type] = Registry("observer")


def resolve_scheme(scheme) -> Tuple[str, str, int, bool]:
    """``(name, kind, bits, symmetric)`` of an observer target (a scheme name or a QType)."""
    from lowbit.config import QType, get_qtype

    if isinstance(scheme, QType) or (isinstance(scheme, str) and scheme.lower().startswith("q")):
        scheme = get_qtype(scheme).scheme
    from lowbit.tensor.functional import SCHEMES

    sch = SCHEMES.get(scheme)
    if sch.kind not in ("affine", "fp8"):
        raise ValueError(f"observer target scheme {sch.name!r} ({sch.kind}) has no (scale, zero_point) form; "
                         "use an integer (int2..int8, *_asym) or fp8 scheme")
    return sch.name, sch.kind, sch.bits, sch.symmetric


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, scheme) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32, zero_point int32) for the value range ``[xmin, xmax]`` (elementwise).

    Example::

        >>> qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), "int8_asym")
        (tensor(0.0157), tensor(64, dtype=torch.int32))
    """
    name, kind, bits, symmetric = resolve_scheme(scheme)
    xmin = torch.as_tensor(xmin, dtype=torch.float32)
    xmax = torch.as_tensor(xmax, dtype=torch.float32)
    if kind == "fp8":
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = fp8.fp8_scale(absmax, fp8.FP8_DTYPES[name])
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale, zero = affine.affine_qparams(xmin, xmax, bits, symmetric)
    zero = zero.to(torch.int32).to(scale.device).expand_as(scale).clone()
    return scale, zero


def fake_quantize_with_range(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, scheme) -> torch.Tensor:
    """Quantize-dequantize ``x`` with the parameters of ``[xmin, xmax]`` (broadcast), in float32."""
    name, kind, bits, _ = resolve_scheme(scheme)
    scale, zero = qparams_from_range(xmin, xmax, scheme)
    if kind == "fp8":
        dt = fp8.FP8_DTYPES[name]
        return fp8.dequantize_fp8(fp8.quantize_fp8(x, scale, dt), scale)
    return affine.dequantize_affine(affine.quantize_affine(x, scale, zero, bits), scale, zero)


class Observer:
    """Base class: ``update(x)`` accumulates statistics, ``calculate_qparams()`` returns (scale, zero_point).

    ``axis=None`` gives 0-d results (per-tensor); ``axis=k`` gives one value per index of
    dimension ``k`` of the observed tensors (per-channel).
    """

    name = "observer"

    def __init__(self, scheme: Union[str, object] = "int8", axis: Optional[int] = None) -> None:
        self.scheme = scheme
        self.scheme_name, self.kind, self.bits, self.symmetric = resolve_scheme(scheme)
        if axis is not None and not isinstance(axis, int):
            raise TypeError(f"axis={axis!r}: must be an int or None")
        self.axis = axis
        self.reset()

    # -- to override ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.count = 0

    def _update(self, v: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """The clipping range ``(min, max)`` chosen from the statistics (shape ``[C]``)."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def _view(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if self.axis is None:
            return x.reshape(1, -1)
        if not -x.dim() <= self.axis < max(x.dim(), 1):
            raise ValueError(f"axis={self.axis}: out of range for a tensor of {x.dim()} dims")
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    def update(self, x: torch.Tensor) -> None:
        """Accumulate the statistics of ``x``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"observer expects a tensor, got {type(x).__name__}")
        if x.numel() == 0:
            return
        v = self._view(x)
        self._update(v)
        self.count += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return x

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.axis is None else t

    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) for the target scheme: 0-d per-tensor, ``[C]`` per-channel."""
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__}: no data observed yet; call update(x) first")
        lo, hi = self.range()
        scale, zero = qparams_from_range(lo, hi, self.scheme)
        return self._out(scale), self._out(zero)

    def __repr__(self) -> str:
        gran = "per-tensor" if self.axis is None else f"axis={self.axis}"
        return f"{type(self).__name__}({self.scheme_name}, {gran}, {self.count} batches)"


def create_observer(name: str, scheme="int8", axis: Optional[int] = None, **options) -> Observer:
    """Instantiate a registered observer by name (``minmax``, ``moving_average``, ``percentile``, ``histogram``)."""
    import lowbit.observers  # noqa: F401  (registers the built-ins)

    cls = OBSERVERS.get(name)
    return cls(scheme, axis, **options)
