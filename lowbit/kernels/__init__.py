"""Kernels: fast quantize / dequantize and low-bit matmuls, selected per op and device.

Public functions (see :mod:`lowbit.kernels.api`): :func:`quantize`, :func:`dequantize`,
:func:`linear_4bit`, :func:`int8_linear_dynamic`, :func:`fp8_linear_dynamic`, the ``prepare_*``
helpers for derived layouts, and :mod:`lowbit.kernels.select` for the backend preference. The custom
ops in :mod:`lowbit.kernels.ops` are registered on first use of a matmul function (or on import of
``lowbit.kernels.ops``). Importing this package never imports Triton or initialises CUDA.
"""
from __future__ import annotations

import importlib

_API = ("quantize", "dequantize", "linear_4bit", "int8_linear_dynamic", "fp8_linear_dynamic",
        "prepare_4bit", "prepare_int8", "prepare_fp8", "Prepared4bit")
__all__ = sorted(_API + ("select", "ops", "reference", "native", "api"))


def __getattr__(name: str):
    if name in _API:
        importlib.import_module("lowbit.kernels.ops")  # registers torch.ops.lowbit.*
        value = getattr(importlib.import_module("lowbit.kernels.api"), name)
        globals()[name] = value
        return value
    if name in ("select", "ops", "reference", "native", "api"):
        return importlib.import_module(f"lowbit.kernels.{name}")
    raise AttributeError(f"module 'lowbit.kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
