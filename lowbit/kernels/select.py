"""Kernel selection: which implementation runs an op, by op name, device and format.

Backends: ``reference`` (plain torch, every device), ``triton`` (CUDA + Triton), ``native``
(``torch._int_mm`` / ``torch._scaled_mm``, CUDA). ``auto`` picks the fastest one available for the
device and falls back to ``reference`` when CUDA or Triton is missing; an explicit choice that cannot
run raises an error naming what is missing. The environment variable ``LOWBIT_KERNELS`` (e.g.
``reference``) sets the default preference for every op.

Example::

    >>> from lowbit.kernels import select
    >>> select.resolve("gemm_4bit", torch.device("cpu"))
    'reference'
    >>> with select.use("reference"):
    ...     pass
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional

import torch

from lowbit import _deps

OPS = ("dequantize", "quantize", "gemm_4bit", "int8_linear", "fp8_linear")
BACKENDS = ("auto", "reference", "triton", "native")
# what "auto" prefers on CUDA, best first (measured on the H100, bench/results/gpu.md)
_AUTO_CUDA = {
    "dequantize": ("triton", "reference"),
    "quantize": ("triton", "reference"),
    "gemm_4bit": ("triton", "reference"),
    "int8_linear": ("triton", "native", "reference"),
    "fp8_linear": ("native", "triton", "reference"),
}
_SUPPORTS = {
    "reference": set(OPS),
    "triton": set(OPS),
    "native": {"int8_linear", "fp8_linear"},
}
_preference: Dict[str, str] = {}


def _check(op: str, backend: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; expected one of {', '.join(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto" and op not in _SUPPORTS[backend]:
        raise ValueError(f"backend {backend!r} does not implement op {op!r}")


def set_backend(backend: str, op: Optional[str] = None) -> None:
    """Prefer ``backend`` for ``op`` (or for every op when ``op`` is None)."""
    for o in ([op] if op else OPS):
        _check(o, backend)
        _preference[o] = backend


def env_backend() -> str:
    """``LOWBIT_KERNELS`` (``auto`` when unset), read on every call without ``os.environ.get``'s exception
    path for a missing key (2 us; the kernels' hot path asks once per linear)."""
    if _ENV_DATA is not None:
        v = _ENV_DATA.get(_ENV_KEY)
        return "auto" if v is None else _ENV_DECODE(v)
    return os.environ.get("LOWBIT_KERNELS", "auto")


try:  # CPython's os.environ keeps its (encoded) variables in one dict, updated by every assignment
    _ENV_DATA, _ENV_KEY, _ENV_DECODE = os.environ._data, os.environ.encodekey("LOWBIT_KERNELS"), \
        os.environ.decodevalue
    if not isinstance(_ENV_DATA, dict):
        raise AttributeError
except AttributeError:  # pragma: no cover - other Pythons: the plain lookup
    _ENV_DATA = _ENV_KEY = _ENV_DECODE = None


def get_backend(op: str) -> str:
    """The configured preference for ``op`` (``auto`` unless set or given by ``LOWBIT_KERNELS``)."""
    _check(op, "auto")
    return _preference.get(op) or env_backend()


@contextlib.contextmanager
def use(backend: str, op: Optional[str] = None) -> Iterator[None]:
    """Temporarily prefer ``backend`` (for ``op`` or every op)."""
    saved = dict(_preference)
    set_backend(backend, op)
    try:
        yield
    finally:
        _preference.clear()
        _preference.update(saved)


def available(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on ``device`` here."""
    if backend == "reference":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if backend == "triton":
        return _deps.available("triton")
    return backend == "native"


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The concrete backend that runs ``op`` on ``device`` (``backend`` overrides the preference)."""
    want = backend or get_backend(op)
    _check(op, want)
    if want == "auto":
        if device.type != "cuda":
            return "reference"
        for b in _AUTO_CUDA[op]:
            if available(b, device):
                return b
        return "reference"
    if not available(want, device):
        missing = "Triton" if want == "triton" and device.type == "cuda" else f"a CUDA device (got {device})"
        raise RuntimeError(f"kernel backend {want!r} for {op!r} needs {missing}; use backend='auto' or 'reference'")
    return want
