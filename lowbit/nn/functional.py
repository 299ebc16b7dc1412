"""Fake quantization with straight-through estimators (Bengio et al. 2013; Jacob et al. 2018, QAT).

``ste(x, q)`` returns exactly ``q`` in the forward pass and passes the gradient to ``x``
unchanged: ``(x - x.detach())`` is exactly zero for finite ``x``, so adding it to ``q`` keeps the
values bit-identical to the frozen (packed) path, which is what makes outputs identical before
and after ``freeze``. No custom autograd.Function is needed, so ``torch.compile`` traces it.

Activation quantization is symmetric: ``x_q = clamp(round(x / s), -qmax, qmax) * s`` for qint8
(``qmax = 127``) and ``clamp(x / s, -448, 448)`` cast to float8 e4m3fn for qfloat8. The scale is
static (one per tensor, from calibration) or dynamic (one per token, computed at run time).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from lowbit.config import QType
from lowbit.tensor.functional import dequantize, quantize_tensor
from lowbit.tensor.state import QuantState


def dequantize_state(state: QuantState) -> torch.Tensor:
    """``lowbit.dequantize(state)``, resolving double-quantized scales with the state's own stored code.

    Bit-identical to :func:`lowbit.dequantize`; it exists so that ``torch.compile`` traces the
    forward of a double-quantized module without rebuilding the 8-bit dynamic map in the graph.
    """
    n = state.nested
    if n is not None and n.code is not None and n.layout == "block":
        from lowbit.formats.codebook import dequantize_blockwise

        base = dequantize_blockwise(n.data, n.scales, n.code, n.block_size, torch.float32)
        scales = base + torch.tensor(state.offset, dtype=torch.float32, device=base.device)
        state = dataclasses.replace(state, scales=scales.reshape(n.shape), nested=None, offset=None)
    return dequantize(state)


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``q``, the gradient of the identity w.r.t. ``x``.

    Example::

        >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
        >>> y = ste(x, torch.round(x.detach()))
        >>> y.sum().backward(); y.tolist(), x.grad.tolist()
        ([0.0, 2.0], [1.0, 1.0])
    """
    if not x.requires_grad:
        return q
    return (x - x.detach()) + q.detach()


def quantize_activation(x: torch.Tensor, qtype: QType, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` symmetrically with ``scale`` (broadcast against ``x``); same dtype as ``x``."""
    xf = x.float()
    s = scale.float()
    if qtype.fp8_dtype is not None:
        m = qtype.qmax
        y = torch.clamp(xf / s, -m, m).to(qtype.fp8_dtype).float() * s
    else:
        m = qtype.qmax
        y = torch.clamp(torch.round(xf / s), -m, m) * s
    return y.to(x.dtype)


def dynamic_scale(x: torch.Tensor, qtype: QType, dim: int = -1) -> torch.Tensor:
    """Per-token scale ``absmax / qmax`` reduced over ``dim`` (keepdim); an all-zero token gets 1."""
    amax = x.detach().abs().amax(dim=dim, keepdim=True).float()
    s = amax / qtype.qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def fake_quantize_activation(
    x: torch.Tensor, qtype: Optional[QType], scale: Optional[torch.Tensor] = None, *, dynamic: bool = False,
    dim: int = -1,
) -> torch.Tensor:
    """Fake-quantize an activation with an STE; identity when ``qtype`` is None or no scale is known.

    ``dynamic=True``: per-token scales over ``dim``; otherwise the static ``scale`` (a value of 0
    means "not calibrated yet" and leaves ``x`` untouched).
    """
    if qtype is None:
        return x
    if dynamic:
        s = dynamic_scale(x, qtype, dim)
    else:
        if scale is None:
            return x
        s = scale
    q = quantize_activation(x.detach(), qtype, s)
    if not dynamic and scale is not None:
        # uncalibrated static scale (0): pass through; torch.where keeps this traceable
        q = torch.where(scale > 0, q, x.detach())
    return ste(x, q)


def fake_quantize_weight(w: torch.Tensor, scheme: str, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(w))`` with an STE: bit-identical to the frozen weight, gradient to ``w``."""
    state = quantize_tensor(w.detach(), scheme, **kwargs)
    return ste(w, dequantize(state))


def quant_kwargs_for(weights: Union[str, QType], shape, group_size: Optional[int] = None,
                     per_channel: bool = True) -> dict:
    """Tensor-level arguments (scheme and granularity) for quantizing a ``[out, in]`` weight.

    * ``qint8`` -> ``int8`` symmetric, one scale per output channel (``per_channel=False``: one
      scale for the whole tensor);
    * ``qfloat8`` -> ``fp8_e4m3`` per output channel (or per tensor);
    * ``qint4`` / ``qint2`` -> ``int4_asym`` / ``int2_asym`` groups along the input dimension:
      ``group_size`` if given, else 128 reduced by 32 until it divides the input features
      (optimum-quanto's rule), else one group per output channel;
    * any lowbit scheme name (``"nf4"``, ``"int3_asym"``, ``"q4_0"`` ...) -> that scheme with
      ``group_size`` (default 64; GGUF schemes use their own blocks of 32).

    Example::

        >>> quant_kwargs_for("qint4", (64, 576))
        {'scheme': 'int4_asym', 'group_size': 96}
    """
    from lowbit.config import QTYPES
    from lowbit.tensor.functional import SCHEMES

    name = weights.name if isinstance(weights, QType) else str(weights)
    in_features = shape[-1]
    if name.lower() in QTYPES:
        qt = QTYPES[name.lower()]
        if qt.fp8_dtype is not None or qt.bits == 8:
            if group_size is not None:
                return {"scheme": qt.scheme, "group_size": group_size}
            if not per_channel:
                return {"scheme": qt.scheme, "block_size": None}
            return {"scheme": qt.scheme, "axis": 0}
        scheme = f"int{qt.bits}_asym"
        if group_size is None:
            g = 128
            while g >= 32 and in_features % g:
                g -= 32
            if g < 32:
                return {"scheme": scheme, "axis": 0}
            group_size = g
        return {"scheme": scheme, "group_size": group_size}
    sch = SCHEMES.get(name)  # raises listing the known schemes
    if sch.kind == "gguf":
        return {"scheme": sch.name}
    return {"scheme": sch.name, "group_size": group_size or 64}


def state_matches(state: QuantState, shape) -> bool:
    """True when ``state`` stands for a tensor of ``shape``."""
    return tuple(state.shape) == tuple(shape)


class _FrozenWeightLinear(torch.autograd.Function):
    """``F.linear(x, weight_fn(), bias)`` that keeps no float weight for backward.

    The weight is frozen (a packed QuantState): the input gradient ``grad @ W`` re-dequantizes it in
    backward instead of saving the float copy, as bitsandbytes' 4-bit matmul does. Without this, autograd
    holds one dequantized float weight per layer until backward, and a QLoRA step on a quantized base
    needs as much memory as on the float model.
    """

    @staticmethod
    def forward(ctx, x, bias, weight_fn):
        with torch.no_grad():
            w = weight_fn()
        ctx.weight_fn = weight_fn
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            with torch.no_grad():
                w = ctx.weight_fn()
            grad_x = grad_out @ w.to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_b, None


def frozen_linear(x: torch.Tensor, bias: Optional[torch.Tensor], weight_fn) -> torch.Tensor:
    """``F.linear`` with a frozen weight produced by ``weight_fn()`` (see :class:`_FrozenWeightLinear`).

    Under ``no_grad`` or when nothing upstream needs a gradient it is a plain ``F.linear``.

    >>> x = torch.randn(3, 4, requires_grad=True); w = torch.randn(5, 4)
    >>> y = frozen_linear(x, None, lambda: w); y.sum().backward()
    >>> torch.allclose(x.grad, w.sum(0).expand(3, 4))
    True
    """
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenWeightLinear.apply(x, bias, weight_fn)
    return torch.nn.functional.linear(x, weight_fn(), bias)


def needs_grad(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a forward must record autograd (then modules take the dequantize + ``F.linear`` path)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def kernel_linear(x: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor], act: Optional[str] = None):
    """``lowbit.kernels.linear.state_linear`` (the fastest kernel for the device, dtype and M), or None."""
    f = _kernel_entry[0]
    if f is None:  # imported on first use (lowbit.nn does not import the kernels package at import time)
        from lowbit.kernels.linear import state_linear as f

        _kernel_entry[0] = f
    return f(x, state, bias, act)


_kernel_entry = [None]


def fast_dequantize(state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight in ``dtype`` for the autograd path: the Triton dequantize on CUDA (same values as
    :func:`dequantize_state` rounded once), :func:`dequantize_state` elsewhere."""
    # under torch.compile the plain-torch dequantize is traced (the kernel selection reads the environment)
    if state.data.is_cuda and state.layout != "gguf" and not torch.compiler.is_compiling():
        from lowbit.kernels import api

        return api.dequantize(state, dtype)
    w = dequantize_state(state)
    return w if w.dtype == dtype else w.to(dtype)
