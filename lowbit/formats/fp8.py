"""FP8 scaling (OCP FP8: e4m3fn max 448, e5m2 max 57344) with saturation.

Values are divided by a per-block scale ``s = absmax / fmax`` (fp32), clamped to ±fmax **before**
the cast (a plain cast is not guaranteed to saturate), and cast to the float8 dtype with PyTorch's
round-to-nearest-even. Dequantization is ``fp8.float() * s``. A block of zeros gets ``s = 1``.
"""
from __future__ import annotations

import torch

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def fp8_scale(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    absmax = absmax.float()
    s = absmax / fp8_max(dtype)
    if bool((s > 0).all()):
        return s
    # 1 for an all-zero block; the smallest float32 subnormal where a nonzero block's scale underflows
    return torch.where(s > 0, s, torch.where(absmax > 0, torch.full_like(s, 2.0 ** -149), torch.ones_like(s)))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = fp8_max(dtype)
    return torch.clamp(x.float() / scale, -m, m).to(dtype)


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.float() * scale.float()
