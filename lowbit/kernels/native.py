"""Matmul paths through PyTorch's own low-precision GEMMs: ``torch._int_mm`` and ``torch._scaled_mm``.

Same numerics contract as :mod:`lowbit.kernels.reference` (per-token dynamic activation scales,
per-channel weight scales); the activation quantization runs in the Triton row kernel when it is
available and in plain torch otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowbit import _deps
from lowbit.kernels import reference


def _quantize_rows(x2: torch.Tensor, fp8: bool):
    if x2.is_cuda and _deps.available("triton"):
        from lowbit.kernels.triton import scaled_gemm

        return scaled_gemm.quantize_rows(x2.contiguous(), fp8)
    return reference.quantize_rows(x2, fp8)


def int8_linear_dynamic(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch._int_mm`` (int32 result, CUDA, M > 16) with the rescale in float32 afterwards."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = _quantize_rows(x2, fp8=False)
    acc = torch._int_mm(q, w_int8.t())
    out = acc.float().mul_(sx[:, None]).mul_(w_scale.float()[None, :])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


def fp8_linear_dynamic(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, fast_accum: bool = True) -> torch.Tensor:
    """``torch._scaled_mm`` with row-wise scales (``[M, 1]`` x ``[1, N]``), bias and output dtype fused."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = _quantize_rows(x2, fp8=True)
    out = torch._scaled_mm(q, w_fp8.t(), scale_a=sx[:, None], scale_b=w_scale.float()[None, :],
                           bias=bias.to(x.dtype) if bias is not None else None, out_dtype=x.dtype,
                           use_fast_accum=fast_accum)
    return out.reshape(*x.shape[:-1], w_fp8.shape[0])
