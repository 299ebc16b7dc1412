"""Integrations with third-party libraries, imported lazily (nothing here loads at ``import lowbit``).

* :mod:`lowbit.integrations.transformers`: ``LowbitConfig`` and its ``HfQuantizer``, registered in
  transformers' quantizer registry under ``quant_method="lowbit"`` when the module is imported
  (``lowbit.LowbitConfig`` imports it), so that ``from_pretrained(..., quantization_config=LowbitConfig(...))``
  quantizes while loading and ``save_pretrained`` / ``from_pretrained`` round-trip a quantized model.
* :mod:`lowbit.integrations.peft`: LoRA layers over lowbit's quantized linears (QLoRA), recognised by
  ``peft.get_peft_model`` once the module is imported, and :func:`~lowbit.integrations.peft.merge_lora`.

Example::

    >>> import lowbit
    >>> cfg = lowbit.LowbitConfig(method="nf4")          # registers the transformers quantizer
    >>> import lowbit.integrations.peft                  # registers the LoRA layers with peft
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("transformers", "peft")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"lowbit.integrations.{name}")
    raise AttributeError(f"module 'lowbit.integrations' has no attribute {name!r}")
