"""Reference (plain PyTorch, any device) implementation of every hot op in :mod:`lowbit.kernels.ops`.

Written against :mod:`lowbit.formats` and :mod:`lowbit.tensor.functional`: this is the numeric
truth the Triton kernels are tested against, and the path taken on CPU or when Triton is missing.

Dynamic activation quantization (W8A8, LLM.int8() arXiv:2208.07339 / SmoothQuant arXiv:2211.10438;
fp8 row-wise per the OCP FP8 spec) is defined here, per row of ``x [M, K]``::

    amax = max(max|x_row|, 1e-12);  sx = amax / QMAX;  v = x * (QMAX / amax)
    int8: q = clamp(round_half_even(v), -127, 127)        (QMAX = 127)
    fp8:  q = clamp(v, -448, 448).to(float8_e4m3fn)        (QMAX = 448, round to nearest even)
    y   = (q @ Wq.T) * sx[:, None] * sw[None, :] + bias    (float32, one rounding to x's dtype)
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from lowbit.tensor.functional import dequantize as _dequantize_state
from lowbit.tensor.functional import quantize_tensor
from lowbit.tensor.state import QuantState

INT8_QMAX = 127.0
FP8_QMAX = 448.0
AMAX_EPS = 1e-12


def dequantize(state: QuantState, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``lowbit.dequantize(state)`` computed in float32 and rounded once to ``out_dtype``.

    Example::

        >>> s = quantize_tensor(torch.randn(64, 64), "nf4", 64)
        >>> dequantize(s, torch.bfloat16).dtype
        torch.bfloat16
    """
    out_dtype = out_dtype or state.dtype
    full = _dequantize_state(dataclasses.replace(state, dtype=torch.float32))
    return full.to(out_dtype)


def quantize(x: torch.Tensor, scheme: str, block_size: int = 64, double_quant: bool = False) -> QuantState:
    """Blockwise quantization through :func:`lowbit.tensor.functional.quantize_tensor`."""
    return quantize_tensor(x, scheme, block_size, double_quant=double_quant)


def linear_4bit(x: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ dequantize(state).T + bias`` with the weight rounded to x's dtype first."""
    return F.linear(x, dequantize(state, x.dtype), bias)


def quantize_rows(x2: torch.Tensor, fp8: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantization -> ``(q [M, K] int8 | float8_e4m3fn, sx [M] float32)``."""
    xf = x2.float()
    qmax = FP8_QMAX if fp8 else INT8_QMAX
    amax = xf.abs().amax(dim=-1).clamp(min=AMAX_EPS)
    q_t = torch.full_like(amax, qmax)
    inv = torch.div(q_t, amax)  # IEEE division (``qmax / tensor`` is a reciprocal times qmax in torch)
    sx = torch.div(amax, q_t)
    v = xf * inv[:, None]
    if fp8:
        q = v.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    else:
        q = torch.round(v).clamp(-qmax, qmax).to(torch.int8)
    return q, sx


def _rescale(acc: torch.Tensor, sx, sw, bias, out_dtype) -> torch.Tensor:
    out = acc * sx[:, None] * sw.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_linear_dynamic(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 linear: per-token int8 activations x per-channel int8 weights ``[N, K]``, scales ``[N]``."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = quantize_rows(x2, fp8=False)
    acc = (q.double() @ w_int8.double().T).float()  # exact integer sums, then float32
    return _rescale(acc, sx, w_scale, bias, x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


def fp8_linear_dynamic(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp8 e4m3 row-wise linear: per-token fp8 activations x per-channel fp8 weights ``[N, K]``."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = quantize_rows(x2, fp8=True)
    acc = (q.double() @ w_fp8.double().T).float()
    return _rescale(acc, sx, w_scale, bias, x.dtype).reshape(*x.shape[:-1], w_fp8.shape[0])


def gemm_4bit(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
              values: torch.Tensor, bias: Optional[torch.Tensor], group: int) -> torch.Tensor:
    """Prepared-layout 4-bit linear (see :class:`lowbit.kernels.api.Prepared4bit`), plain torch.

    ``qweight [N, K/2]`` uint8 (even element in the high nibble), ``scales``/``zeros`` float32
    ``[N, K/group]``, ``values`` float32 ``[16]`` (the value of each code before zero and scale).
    """
    N = qweight.shape[0]
    K = qweight.shape[1] * 2
    codes = torch.stack([qweight >> 4, qweight & 15], dim=-1).reshape(N, K).long()
    v = values.float().to(x.device)[codes].view(N, K // group, group)
    if zeros is not None:
        v = v - zeros.float()[..., None]
    w = (v * scales.float()[..., None]).reshape(N, K).to(x.dtype)
    return F.linear(x, w, bias)
