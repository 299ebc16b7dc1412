"""Integer affine quantization, 2..8 bits, symmetric (absmax) and asymmetric (min/max + zero point).

Convention used across lowbit: codes are unsigned integers ``0 .. 2**bits - 1`` and

    w = (q - z) * s

Symmetric (absmax): ``s = absmax / (2**(b-1) - 1)`` and the zero point is implicit, ``z = 2**(b-1)``
(so int8 codes span 1..255 around 128, like bitsandbytes' row-wise int8 shifted by 128).
Asymmetric: the range is extended to include 0 (so that 0 is exact, as GPTQ/AWQ require),
``s = (max - min) / (2**b - 1)``, ``z = clamp(round(-min / s), 0, 2**b - 1)`` stored as uint8.
A block whose range is 0 gets ``s = 1`` so codes stay finite and dequantize to exactly 0.
Rounding is round-half-to-even (``torch.round``).
"""
from __future__ import annotations

import torch


def qmax_symmetric(bits: int) -> int:
    """Largest positive level of the symmetric absmax grid (127 for 8 bits, 7 for 4 bits)."""
    return (1 << (bits - 1)) - 1


def implicit_zero(bits: int) -> int:
    """The zero point of symmetric codes (2**(bits-1))."""
    return 1 << (bits - 1)


def _placeholder(scale: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
    """Scale 1 for an all-zero block; the smallest float32 subnormal for a nonzero block whose scale underflows
    (|x| < ~1e-43: the codes still resolve it, where a scale of 1 would flush it and pollute double quant)."""
    if not scale.is_cuda and bool((scale > 0).all()):  # CUDA: no host sync (the where below is a no-op then)
        return scale
    tiny = torch.full_like(scale, 2.0 ** -149)
    return torch.where(scale > 0, scale, torch.where(nonzero, tiny, torch.ones_like(scale)))


def affine_qparams(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point for the range [xmin, xmax] (elementwise over groups).

    Returns ``(scale fp32, zero)``; ``zero`` is uint8 (asymmetric) or a 0-d int tensor ``2**(b-1)``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: must be between 2 and 8")
    xmin = xmin.float()
    xmax = xmax.float()
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = _placeholder(absmax / qmax_symmetric(bits), absmax > 0)
        return scale, torch.tensor(implicit_zero(bits), dtype=torch.int32)
    lo = torch.clamp(xmin, max=0.0)
    hi = torch.clamp(xmax, min=0.0)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    wide = torch.isinf(scale)
    # max - min beyond float32 (|x| near 3.4e38): the scale itself still fits. On CUDA without asking the host
    # (a device sync per call, in GPTQ's per-group fits), the same values either way
    if scale.is_cuda or bool(wide.any()):
        scale = torch.where(wide, ((hi.double() - lo.double()) / levels).float(), scale)
    scale = _placeholder(scale, hi > lo)
    zero = torch.clamp(torch.round(-lo / scale), 0, levels).to(torch.uint8)
    return scale, zero


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(x / s) + z, 0, 2**b - 1)`` as uint8 (scale/zero broadcast against x)."""
    q = torch.round(x.float() / scale) + zero.to(torch.float32)
    return torch.clamp(q, 0, (1 << bits) - 1).to(torch.uint8)


def dequantize_affine(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in float32."""
    return (codes.to(torch.float32) - zero.to(torch.float32)) * scale.float()
