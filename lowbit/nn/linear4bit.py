"""bitsandbytes-style 4-bit Linear (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

Weights are quantized over the row-major flattened matrix in blocks of ``block_size`` (64) with
one absmax per block (``nf4`` / ``fp4`` codebooks, bitsandbytes-identical numerics from
:mod:`lowbit.formats.codebook`, or symmetric ``int4``), optionally with double quantization of
the absmax (8-bit dynamic map, blocks of 256). Forward dequantizes on the fly and computes
``F.linear`` in ``compute_dtype`` (default: the input's dtype), returning the input's dtype, as
``bitsandbytes.nn.Linear4bit`` does. The frozen base has no trainable weight; gradients flow to
the input, so adapters on top (LoRA) train.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from lowbit.config import parse_dtype
from lowbit.nn.base import QModuleMixin
from lowbit.nn.functional import _kernel_entry, fast_dequantize, frozen_linear, kernel_linear, needs_grad
from lowbit.tensor.functional import quantize_tensor
from lowbit.tensor.state import QuantState

QUANT_TYPES = ("nf4", "fp4", "int4")


class Linear4bit(QModuleMixin, nn.Linear):
    """4-bit weight-only Linear.

    Example::

        >>> m = Linear4bit(576, 1536, quant_type="nf4", double_quant=True).quantize_weight(block_size=64)
        >>> round(m.qstate.bits_per_element, 3)
        4.127
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 compute_dtype: Union[str, torch.dtype, None] = None, double_quant: bool = False,
                 block_size: int = 64, device=None, dtype=None) -> None:
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size={block_size!r}: must be a positive integer")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant_type = quant_type
        self.compute_dtype = parse_dtype(compute_dtype, "compute_dtype")
        self.double_quant = bool(double_quant)
        self.block_size = block_size
        self.weights = quant_type
        self.activations = None

    @classmethod
    def from_module(cls, module: nn.Linear, **config: Any) -> "Linear4bit":
        """Wrap an ``nn.Linear`` (parameters shared) -- call ``quantize_weight()`` or ``freeze()`` to pack."""
        with torch.device("meta"):
            q = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    dtype=module.weight.dtype, **config)
        q.weight = module.weight
        if module.bias is not None:
            q.bias = module.bias
        return q

    def quant_config(self) -> Dict[str, Any]:
        cd = None if self.compute_dtype is None else str(self.compute_dtype).replace("torch.", "")
        return {"quant_type": self.quant_type, "compute_dtype": cd, "double_quant": self.double_quant,
                "block_size": self.block_size}

    def quantize_param(self, name: str, w: torch.Tensor) -> QuantState:
        return quantize_tensor(w, self.quant_type, block_size=self.block_size, double_quant=self.double_quant)

    def quantize_weight(self, block_size: Optional[int] = None) -> "Linear4bit":
        """Pack the float weight into 4-bit blocks (of ``block_size``, default the module's) in place."""
        if block_size is not None:
            if self.frozen and block_size != self.block_size:
                raise RuntimeError(f"weight already quantized with block_size={self.block_size}")
            if not isinstance(block_size, int) or block_size <= 0:
                raise ValueError(f"block_size={block_size!r}: must be a positive integer")
            self.block_size = block_size
        self.freeze()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        cd = self.compute_dtype or inp_dtype
        states = self.__dict__.get("_lowbit_qstates")
        state = states.get("weight") if states else None  # _frozen_weight() inline (one quantized parameter)
        if state is not None and cd == inp_dtype:  # hot path: inference in the input's dtype
            # _bias(), needs_grad and kernel_linear inline: the per-token path of eager decode (every call counts)
            params = self._parameters
            b = params["bias"] if "bias" in params else getattr(self, "bias", None)
            if (b is None or b.dtype == cd) and not (torch.is_grad_enabled() and (
                    x.requires_grad or (b is not None and b.requires_grad))):
                f = _kernel_entry[0]
                out = f(x, state, b, None) if f is not None else kernel_linear(x, state, b)
                if out is not None:
                    return out
        state = self._qstates.get("weight")

        def weight():
            if state is not None:
                return fast_dequantize(state, cd)
            w = self.dequantized_weight()
            return w if w.dtype == cd else w.to(cd)

        b = self.bias
        if b is not None and b.dtype != cd:
            b = b.to(cd)
        if x.dtype != cd:
            x = x.to(cd)
        if state is not None and not needs_grad(x, b):
            out = kernel_linear(x, state, b)  # fused / cached kernel, layout prepared once
            if out is not None:
                return out if out.dtype == inp_dtype else out.to(inp_dtype)
        # the weight is frozen: backward re-dequantizes it rather than keeping a float copy (QLoRA memory)
        out = frozen_linear(x, b, weight)
        return out if out.dtype == inp_dtype else out.to(inp_dtype)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", quant_type={self.quant_type}, block_size={self.block_size}"
        if self.double_quant:
            s += ", double_quant"
        if self.compute_dtype is not None:
            s += f", compute_dtype={self.compute_dtype}"
        return s
