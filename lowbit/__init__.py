"""lowbit: PyTorch model quantization.

Tensor primitives (``quantize`` / ``dequantize`` / ``QuantState``), quantized modules, model-level
quantization (quanto-style workflow and a method dispatcher), PTQ algorithms, checkpoint formats,
evaluation and a CLI. ``import lowbit`` is light: heavy submodules load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily, PEP 562)
_LAZY = {
    "QuantState": "lowbit.tensor.state",
    "dequantize": "lowbit.tensor.functional",
    "SCHEMES": "lowbit.tensor.functional",
    "schemes": "lowbit.tensor.functional",
    # model API, modules, qtypes (issue 3)
    "Calibration": "lowbit.model.calibration",
    "freeze": "lowbit.model.api",
    "quantization_map": "lowbit.model.api",
    "requantize": "lowbit.model.api",
    "METHODS": "lowbit.model.methods",
    "register_method": "lowbit.model.methods",
    "list_methods": "lowbit.model.methods",
    # the method table's config classes and the PTQ registration (issue 16)
    "register_ptq_method": "lowbit.model.methods",
    "WeightOnlyConfig": "lowbit.config",
    "RTNConfig": "lowbit.config",
    "GPTQConfig": "lowbit.config",
    "AWQConfig": "lowbit.config",
    "HQQConfig": "lowbit.config",
    "QType": "lowbit.config",
    "qint2": "lowbit.config",
    "qint4": "lowbit.config",
    "qint8": "lowbit.config",
    "qfloat8": "lowbit.config",
    "qfloat8_e4m3fn": "lowbit.config",
    "qfloat8_e5m2": "lowbit.config",
    # transformers integration (issue 7): importing it registers quant_method="lowbit"
    "LowbitConfig": "lowbit.integrations.transformers",
    # native checkpoints (issue 6)
    "save": "lowbit.io.native",
    "load": "lowbit.io.native",
}
_SUBMODULES = {"metrics": "lowbit.eval.metrics"}

# peft's get_peft_model on lowbit modules uses lowbit's LoRA layers without any lowbit-specific call
from lowbit.integrations import _hooks as _integration_hooks  # noqa: E402

_integration_hooks.register()

__all__ = sorted(["quantize", *_LAZY])


def quantize(obj, *args, **kwargs):
    """Quantize a tensor (-> ``QuantState``) or a model (-> the same ``nn.Module``, modified in place).

    Tensor: ``lowbit.quantize(w, scheme="nf4", block_size=64)``; see
    :func:`lowbit.tensor.functional.quantize_tensor`.
    Model: ``lowbit.quantize(model, weights="qint4", activations="qint8")`` or
    ``lowbit.quantize(model, method="gptq", bits=4, ...)``; see :func:`lowbit.model.api.quantize_model`.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        from lowbit.tensor.functional import quantize_tensor

        return quantize_tensor(obj, *args, **kwargs)
    if isinstance(obj, torch.nn.Module):
        from lowbit.model.api import quantize_model

        return quantize_model(obj, *args, **kwargs)
    raise TypeError(f"lowbit.quantize expects a torch.Tensor or nn.Module, got {type(obj).__name__}")


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
        globals()[name] = value
        return value
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
