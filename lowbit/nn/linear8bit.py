"""LLM.int8() Linear (Dettmers et al. 2022, arXiv:2208.07339), bitsandbytes ``Linear8bitLt`` semantics.

The weight is quantized row-wise to int8 (``CB``, with the row absmax ``SCB``) from its fp16 copy,
as ``bitsandbytes.nn.Int8Params`` does. In forward the input is cast to fp16 and quantized
row-wise; input columns holding a value with ``|x| >= threshold`` (6.0) are outliers, multiplied in
the input's dtype with the dequantized weight columns, and the rest goes through an exact int8 x
int8 -> int32 product (``torch._int_mm`` on CUDA, an exact emulation elsewhere). The numerics are
those of :mod:`lowbit.formats.llm_int8` (bit-identical to bitsandbytes on CPU).

A frozen module stores ``weight`` (int8 ``[out, in]``) and ``SCB`` (float32 ``[out]``) buffers: the
bitsandbytes / transformers checkpoint layout. Before ``freeze`` the float weight is quantized on
the fly in every forward (same numbers); gradients flow to the input (``grad @ dequant(W)``, as
bitsandbytes' ``MatMul8bitLt``) and, before freeze, straight through to the float weight.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from lowbit.formats.llm_int8 import (
    int8_matmul_int32,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)
from lowbit.nn.base import QModuleMixin
from lowbit.tensor.state import QuantState


def _int8_matmul(CA: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``CA @ CB.T``: ``torch._int_mm`` on CUDA when the shapes allow it, else emulated."""
    m, k = CA.shape
    n = CB.shape[0]
    if CA.is_cuda and k % 8 == 0 and n % 8 == 0 and k > 0:
        if m <= 16:  # _int_mm needs more than 16 rows: pad
            CA = torch.cat([CA, CA.new_zeros(17 - m, k)], 0)
        return torch._int_mm(CA, CB.t())[:m]
    if CA.device.type == "cpu" and k > 0 and _cpu_int8_exact():
        return torch._int_mm(CA.contiguous(), CB.t())  # exact int32 (oneDNN s8s8 with VNNI)
    return int8_matmul_int32(CA, CB)


def _cpu_int8_exact() -> bool:
    from lowbit.kernels import select
    from lowbit.kernels.linear import cpu_has_vnni

    return cpu_has_vnni() and select.get_backend("int8_linear") == "auto"


def int8_linear(x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """LLM.int8() forward (no autograd); equal to ``lowbit.formats.llm_int8.int8_mixed_matmul``."""
    A = x.reshape(-1, x.shape[-1])
    CA, SCA, outlier_cols = int8_vectorwise_quant(A.to(torch.float16), threshold)
    out = int8_mm_dequant(_int8_matmul(CA, CB), SCA, SCB, dtype=A.dtype, bias=bias)
    if outlier_cols is not None and outlier_cols.numel():
        sub_a = A[:, outlier_cols]
        sub_w = int8_vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype).t()
        out = out.addmm(sub_a, sub_w)
    return out.reshape(*x.shape[:-1], CB.shape[0])


class _MatMul8bitLt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, CB, SCB, bias, threshold):
        ctx.save_for_backward(x, CB, SCB)
        return int8_linear(x, CB, SCB, threshold, bias)

    @staticmethod
    def backward(ctx, grad):
        x, CB, SCB = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = int8_vectorwise_dequant(CB, SCB).to(grad.dtype)
            grad_x = (g2 @ w).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, None, None, grad_b, None


class Linear8bitLt(QModuleMixin, nn.Linear):
    """LLM.int8() linear layer.

    Example::

        >>> m = Linear8bitLt(576, 1536, threshold=6.0); m.freeze()
        >>> m.weight.dtype, m.SCB.shape
        (torch.int8, torch.Size([1536]))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 device=None, dtype=None) -> None:
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise ValueError(f"threshold={threshold!r}: must be a non-negative number (0 disables outliers)")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.threshold = float(threshold)
        self.weights = "int8_rowwise"
        self.activations = None

    @classmethod
    def from_module(cls, module: nn.Linear, **config: Any) -> "Linear8bitLt":
        with torch.device("meta"):
            q = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    dtype=module.weight.dtype, **config)
        q.weight = module.weight
        if module.bias is not None:
            q.bias = module.bias
        return q

    def quant_config(self) -> Dict[str, Any]:
        return {"threshold": self.threshold}

    # -- quantization -------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return "SCB" in self._buffers

    def quantize_param(self, name: str, w: torch.Tensor) -> QuantState:
        CB, SCB, _ = int8_vectorwise_quant(w.detach().to(torch.float16))
        return self._as_state(CB, SCB, w.dtype)

    @staticmethod
    def _as_state(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> QuantState:
        # lowbit's canonical int8 convention (codes 0..255 around 128, w = (q - 128) * s), s = SCB/127
        return QuantState(scheme="int8", bits=8, shape=tuple(CB.shape), dtype=dtype, layout="channel", axis=0,
                          data=(CB.to(torch.int16) + 128).to(torch.uint8).reshape(-1),
                          scales=SCB.float() * (1.0 / 127), extra={"source": "llm_int8"})

    @property
    def qstate(self) -> Optional[QuantState]:
        """A lowbit QuantState view of ``(weight, SCB)`` (None before freeze), for size accounting."""
        if not self.frozen:
            return None
        return self._as_state(self._buffers["weight"], self._buffers["SCB"], self._orig_dtype())

    def quant_states(self):
        return {"weight": self.qstate} if self.frozen else {}

    def _orig_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    def freeze(self) -> None:
        if self.frozen:
            return
        w = self._parameters["weight"]
        if w.device.type == "meta":
            raise RuntimeError("cannot freeze Linear8bitLt: the weight is on the meta device")
        CB, SCB, _ = int8_vectorwise_quant(w.detach().to(torch.float16))
        del self._parameters["weight"]
        self.register_buffer("weight", CB)
        self.register_buffer("SCB", SCB)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "SCB" in state_dict and not self.frozen:
            # a frozen checkpoint into a float module (requantize): switch to the int8 layout first
            p = self._parameters.pop("weight", None)
            dev = p.device if p is not None else None
            self.register_buffer("weight", torch.empty(self.out_features, self.in_features, dtype=torch.int8,
                                                       device=dev))
            self.register_buffer("SCB", torch.empty(self.out_features, dtype=torch.float32, device=dev))
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.frozen:
            CB, SCB, w = self._buffers["weight"], self._buffers["SCB"], None
        else:
            w = self._parameters["weight"]
            CB, SCB, _ = int8_vectorwise_quant(w.detach().to(torch.float16))
        if torch.is_grad_enabled() and (x.requires_grad or (w is not None and w.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            return _MatMul8bitLt.apply(x, w, CB, SCB, bias, self.threshold)
        return int8_linear(x, CB, SCB, self.threshold, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"
