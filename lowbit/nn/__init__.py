"""Quantized modules: QLinear / QConv2d (quanto-style), Linear4bit / Linear8bitLt (bitsandbytes-style),
dynamic int8 LSTM / GRU, and the fake-quantization helpers used for quantization-aware training.

Every module keeps float weights (fake-quantized in forward) until ``freeze()``, then holds packed
QuantStates exposed as ``.qstate``.
"""
from lowbit.nn.base import QModuleMixin, QuantStateDict, quantized_modules, quantized_nbytes
from lowbit.nn.functional import fake_quantize_activation, fake_quantize_weight, ste
from lowbit.nn.linear4bit import Linear4bit
from lowbit.nn.qlinear import QConv2d, QLinear
from lowbit.nn.rnn import DynamicQuantGRU, DynamicQuantLSTM
from lowbit.nn.sparse import SparseLinear

__all__ = [
    "QModuleMixin",
    "QuantStateDict",
    "QLinear",
    "QConv2d",
    "SparseLinear",
    "Linear4bit",
    "Linear8bitLt",
    "DynamicQuantLSTM",
    "DynamicQuantGRU",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "quantized_modules",
    "quantized_nbytes",
    "ste",
]


def __getattr__(name: str):
    # Linear8bitLt depends on lowbit.formats.llm_int8; loaded on first use
    if name == "Linear8bitLt":
        from lowbit.nn.linear8bit import Linear8bitLt

        return Linear8bitLt
    raise AttributeError(f"module 'lowbit.nn' has no attribute {name!r}")
