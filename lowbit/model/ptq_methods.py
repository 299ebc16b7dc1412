"""Registers the weight-only PTQ algorithms (``rtn``, ``awq``, ``gptq``, ``hqq``) in the method
dispatcher, so that ``lowbit.quantize(model, method="gptq", bits=4, group_size=64, sym=False,
calib_dataset="valid.txt", tokenizer=tok, n_samples=128, seq_len=512)`` works.

Every method takes the options of :func:`lowbit.model.sequential.quantize_model_ptq`
(``bits``, ``group_size``, ``sym``, ``include``, ``exclude``, ``calib_dataset``, ``tokenizer``,
``n_samples``, ``seq_len``, ``seed``, ``device``, ``progress``) plus its algorithm's own options.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from lowbit.model.methods import register_method
from lowbit.model.sequential import quantize_model_ptq


def _make(name: str, doc: str):
    def method(model: nn.Module, **kwargs: Any) -> nn.Module:
        return quantize_model_ptq(model, method=name, **kwargs)

    method.__name__ = f"ptq_{name}"
    method.__doc__ = doc
    return method


register_method("rtn", description="round-to-nearest weight-only quantization (no data)")(
    _make("rtn", "Round-to-nearest weight-only quantization."))
register_method("hqq", description="HQQ half-quadratic weight-only quantization (no data)")(
    _make("hqq", "Half-quadratic quantization (Badri & Shaji, 2023)."))
register_method("gptq", description="GPTQ weight-only quantization (calibrated, block by block)")(
    _make("gptq", "GPTQ (Frantar et al., 2023) on the block-by-block pipeline."))
register_method("awq", description="AWQ activation-aware weight-only quantization (calibrated)")(
    _make("awq", "AWQ (Lin et al., 2024) on the block-by-block pipeline."))
