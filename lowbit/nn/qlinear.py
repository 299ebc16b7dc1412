"""Generic quantized Linear and Conv2d (optimum-quanto's ``QLinear`` / ``QConv2d`` workflow).

Weights: ``qint2 | qint4 | qint8 | qfloat8`` (see :func:`lowbit.nn.functional.quant_kwargs_for`
for the scheme and granularity each maps to) or any lowbit scheme name. Activations (the module
input): ``qint8 | qfloat8``, either with a static per-tensor scale recorded by
:class:`lowbit.Calibration` (the ``input_scale`` buffer; 0 means "not calibrated", and the input
then passes through unquantized) or with dynamic per-token scales (``act_dynamic=True``).

Before ``freeze()`` the float weight is fake-quantized in every forward (QAT with a
straight-through estimator); after it, the packed QuantState is dequantized instead, giving the
same numbers. Forward is ``F.linear(quant(x), dequant(W), bias)`` in the input's dtype.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ACTIVATION_QTYPES, QType, get_qtype
from lowbit.nn.base import QModuleMixin
from lowbit.nn.functional import (
    _kernel_entry,
    fake_quantize_activation,
    fast_dequantize,
    frozen_linear,
    kernel_linear,
    quant_kwargs_for,
)
from lowbit.tensor.functional import quantize_tensor
from lowbit.tensor.state import QuantState


def _weights_label(weights: Union[str, QType, None]) -> Optional[str]:
    if weights is None:
        return None
    if isinstance(weights, QType):
        return weights.name
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a qtype, a scheme name or None, got {type(weights).__name__}")
    if weights.lower() == "none":
        return None
    return weights.lower()


class _ActivationQuantMixin:
    """Input quantization shared by QLinear and QConv2d (static calibrated or dynamic per token)."""

    _act_dim = -1  # the feature dimension reduced for dynamic per-token scales

    def _init_activations(self, activations, act_dynamic: bool, device) -> None:
        qt = get_qtype(activations)
        if qt is not None and qt.name not in ACTIVATION_QTYPES:
            raise ValueError(f"activations={qt.name!r}: expected one of {', '.join(ACTIVATION_QTYPES)} or None")
        self.activation_qtype = qt
        self.activations = qt.name if qt is not None else None
        self.act_dynamic = bool(act_dynamic)
        self._observer = None  # set by lowbit.Calibration while calibrating
        if qt is not None and not self.act_dynamic:
            self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=device))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        obs = self._observer
        if obs is not None:
            obs.update(x.detach())
            return x
        qt = self.activation_qtype
        if qt is None:
            return x
        if self.act_dynamic:
            return fake_quantize_activation(x, qt, dynamic=True, dim=self._act_dim)
        return fake_quantize_activation(x, qt, self.input_scale)


class QLinear(QModuleMixin, _ActivationQuantMixin, nn.Linear):
    """Linear layer with quantized weights and optionally quantized inputs.

    Example::

        >>> m = QLinear(64, 32, weights="qint4", activations="qint8", act_dynamic=True)
        >>> y = m(torch.randn(2, 64)); m.freeze(); torch.equal(y, m(x)) # doctest: +SKIP
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 weights: Union[str, QType, None] = "qint8", activations: Union[str, QType, None] = None,
                 group_size: Optional[int] = None, act_dynamic: bool = False, per_channel: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weights = _weights_label(weights)
        self.group_size = group_size
        self.per_channel = bool(per_channel)
        self._wkw = (quant_kwargs_for(self.weights, (out_features, in_features), group_size, self.per_channel)
                     if self.weights else None)
        self._init_activations(activations, act_dynamic, device)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Linear, **config: Any) -> "QLinear":
        """Wrap an existing ``nn.Linear`` (its parameters are shared, not copied)."""
        with torch.device("meta"):
            q = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    dtype=module.weight.dtype, **config)
        q.weight = module.weight
        if module.bias is not None:
            q.bias = module.bias
        if "input_scale" in q._buffers:
            q.input_scale = torch.zeros((), dtype=torch.float32, device=module.weight.device)
        return q

    @classmethod
    def from_quant_state(cls, linear: nn.Linear, state: QuantState, **config: Any) -> "QLinear":
        """A frozen weight-only QLinear computing ``F.linear(x, dequantize(state), linear.bias)``.

        Used by the PTQ algorithms (RTN, AWQ, GPTQ, HQQ), which produce the state themselves.

        Example::

            >>> lin = nn.Linear(128, 64)
            >>> st = lowbit.quantize(lin.weight.detach(), "int4_asym", group_size=32)
            >>> q = QLinear.from_quant_state(lin, st)
            >>> torch.equal(q(x), F.linear(x, lowbit.dequantize(st), lin.bias))  # doctest: +SKIP
        """
        if not isinstance(state, QuantState):
            raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"QuantState shape {tuple(state.shape)} does not match the Linear's weight "
                             f"{(linear.out_features, linear.in_features)}")
        q = cls.from_module(linear, weights=state.scheme, **config)
        q.set_quant_state("weight", state)
        return q

    def quant_config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this module (JSON-able; see ``quantization_map``)."""
        return {"weights": self.weights, "activations": self.activations, "group_size": self.group_size,
                "act_dynamic": self.act_dynamic, "per_channel": self.per_channel}

    # -- quantization -----------------------------------------------------------------------------
    def quantized_param_names(self):
        return ("weight",) if self.weights else ()

    def quantize_param(self, name: str, w: torch.Tensor) -> QuantState:
        return quantize_tensor(w, **self._wkw)

    def _kernel_act(self) -> Optional[str]:
        """The dynamic activation format the kernels fuse ("int8" / "fp8"), None for weight-only."""
        qt = self.activation_qtype
        if qt is None or not self.act_dynamic:
            return None
        return "fp8" if qt.fp8_dtype is not None else "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _frozen_weight() inline (QLinear quantizes "weight" alone, when it has weights)
        states = self.__dict__.get("_lowbit_qstates")
        state = states.get("weight") if states and self.weights else None
        if state is not None and self._observer is None:
            # _bias(), needs_grad(x, b), _kernel_act(), quantize_input and kernel_linear inline: this is the per-token
            # hot path of decode, where every Python call counts (measured on SmolLM2's 210 linears per token)
            params = self._parameters
            b = params["bias"] if "bias" in params else getattr(self, "bias", None)
            if not (torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad))):
                # inference on a packed weight: the kernels of lowbit.kernels.linear (layout prepared once)
                qt = self.activation_qtype
                if qt is None:  # weight-only: the input as given
                    act, xin = None, x
                elif self.act_dynamic:  # dynamic activations: quantized inside the kernel path
                    act, xin = ("fp8" if qt.fp8_dtype is not None else "int8"), x
                else:  # static calibrated scale
                    act, xin = None, self.quantize_input(x)
                f = _kernel_entry[0]
                y = f(xin, state, b, act) if f is not None else kernel_linear(xin, state, b, act)
                if y is not None:
                    return y
        x = self.quantize_input(x)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if self.weights and self.frozen:  # packed weight: backward re-dequantizes it (no float copy kept)
            state = self._qstates["weight"]

            def weight():
                return fast_dequantize(state, x.dtype)

            return frozen_linear(x, b, weight)
        w = self.dequantized_weight() if self.weights else self.weight
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", weights={self.weights}"
        if self.activations:
            s += f", activations={self.activations}{' (dynamic)' if self.act_dynamic else ''}"
        return s + (", frozen" if self.frozen and self.weights else "")


class QConv2d(QModuleMixin, _ActivationQuantMixin, nn.Conv2d):
    """Conv2d with quantized weights and optionally quantized inputs.

    The weight ``[out, in/groups, kh, kw]`` is quantized as the matrix ``[out, in/groups*kh*kw]``
    (per output channel for qint8/qfloat8, groups along the flattened input for qint4/qint2), so
    ``.qstate.shape`` is 2-D. Dynamic activation scales are per (sample, pixel), over channels.
    """

    _act_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 weights: Union[str, QType, None] = "qint8", activations: Union[str, QType, None] = None,
                 group_size: Optional[int] = None, act_dynamic: bool = False, per_channel: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.weights = _weights_label(weights)
        self.group_size = group_size
        k = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self._wshape2d = (out_channels, k)
        self.per_channel = bool(per_channel)
        self._wkw = (quant_kwargs_for(self.weights, self._wshape2d, group_size, self.per_channel)
                     if self.weights else None)
        self._init_activations(activations, act_dynamic, device)

    @classmethod
    def from_module(cls, module: nn.Conv2d, **config: Any) -> "QConv2d":
        with torch.device("meta"):
            q = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                    padding=module.padding, dilation=module.dilation, groups=module.groups,
                    bias=module.bias is not None, padding_mode=module.padding_mode, dtype=module.weight.dtype,
                    **config)
        q.weight = module.weight
        if module.bias is not None:
            q.bias = module.bias
        if "input_scale" in q._buffers:
            q.input_scale = torch.zeros((), dtype=torch.float32, device=module.weight.device)
        return q

    def quant_config(self) -> Dict[str, Any]:
        return {"weights": self.weights, "activations": self.activations, "group_size": self.group_size,
                "act_dynamic": self.act_dynamic, "per_channel": self.per_channel}

    def quantized_param_names(self):
        return ("weight",) if self.weights else ()

    def param_shape(self, name: str):
        return self._wshape2d

    def _state_to_param(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def quantize_param(self, name: str, w: torch.Tensor) -> QuantState:
        return quantize_tensor(w.reshape(self._wshape2d), **self._wkw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        w = self.dequantized_weight() if self.weights else self.weight
        b = self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return self._conv_forward(x, w, b)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", weights={self.weights}"
        if self.activations:
            s += f", activations={self.activations}{' (dynamic)' if self.act_dynamic else ''}"
        return s
