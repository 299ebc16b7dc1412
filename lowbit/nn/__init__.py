"""Quantized modules: QLinear / QConv2d (quanto-style), Linear4bit / Linear8bitLt (bitsandbytes-style),
dynamic int8 LSTM / GRU, and the fake-quantization helpers used for quantization-aware training.

Every module keeps float weights (fake-quantized in forward) until ``freeze()``, then holds packed
QuantStates exposed as ``.qstate``.
"""
from lowbit.nn.base import QModuleMixin, QuantStateDict, quantized_modules, quantized_nbytes
from lowbit.nn.functional import fake_quantize_activation, fake_quantize_weight, ste
from lowbit.nn.qlinear import QConv2d, QLinear

__all__ = [
    "QModuleMixin",
    "QuantStateDict",
    "QLinear",
    "QConv2d",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "quantized_modules",
    "quantized_nbytes",
    "ste",
]
