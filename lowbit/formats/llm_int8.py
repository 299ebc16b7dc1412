"""LLM.int8(): row-wise absmax int8 quantization and the mixed-precision (outlier) matmul.

Reference: Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(arXiv:2208.07339); numerics of bitsandbytes 0.50.2 (``functional.int8_vectorwise_quant`` and the
default kernels ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` / ``int8_scaled_mm`` /
``int8_mixed_scaled_mm`` in ``bitsandbytes/_ops.py`` and ``backends/default/ops.py``, used by
``Linear8bitLt`` in eval mode).

Rules (``shared/docs/formats-bnb-gguf.md`` A4):

* quantize: per row ``row_stats = max|A|`` (float32) and ``CB = round(A * (127 / row_stats))`` (round half
  to even, float32 arithmetic). With ``threshold > 0`` the elements with ``|A| >= threshold`` are
  outliers: they are zeroed before the row statistics, and every column holding one is zeroed in
  ``CB`` (when there is more than one row).
* dequantize: ``CB * row_stats * (1/127)``.
* matmul: ``x`` (cast to fp16, as bitsandbytes does) is quantized row-wise with the threshold, the int8
  product is accumulated exactly in int32 and rescaled by ``SCA * SCB * 6.200124e-05`` (bitsandbytes'
  constant, 1.8e-5 larger than ``1/127^2``); the outlier columns
  of ``x`` (kept in ``x``'s own dtype) are multiplied with the dequantized weight columns and added.
  bitsandbytes' Linear8bitLt quantizes its weight from fp16 (``Int8Params``); that is the caller's
  choice here.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "INV_127",
    "INV_127_SQ",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_matmul_int32",
    "int8_mm_dequant",
    "int8_mixed_matmul",
]

INV_127 = 7.874015718698502e-3  # bitsandbytes' literal for 1/127
# bitsandbytes' literal for 1/127**2. Note it is NOT 1/16129 = 6.2000124e-05: the digits are
# transposed, so every int8 product comes out 1.8e-5 (relative) too large. Kept for bit-identity.
INV_127_SQ = 6.200124e-05


def _rows(A: torch.Tensor) -> torch.Tensor:
    if not isinstance(A, torch.Tensor) or not A.is_floating_point():
        raise TypeError(f"A: expected a floating-point tensor, got {getattr(A, 'dtype', type(A).__name__)}")
    if A.dim() == 0 or A.shape[-1] == 0:
        raise ValueError(f"A has shape {tuple(A.shape)}: need at least one dimension with a non-zero last dim")
    return A.reshape(-1, A.shape[-1])


def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Row-wise int8 quantization, identical to ``bitsandbytes.functional.int8_vectorwise_quant``.

    ``A`` is treated as rows of its last dimension. Returns ``(CB, row_stats, outlier_cols)``: int8 codes
    in ``A``'s shape, float32 ``[rows]`` absmax, and (only when ``threshold > 0``) the int64 indices of
    the columns holding an outlier (empty when there is none); ``None`` for ``threshold == 0``.
    ``A`` is not modified. Rows that are all zero (or all outliers) get zero codes and a zero stat.

    Example::

        >>> CB, s, cols = int8_vectorwise_quant(torch.tensor([[1.0, -2.0, 8.0]]), threshold=6.0)
        >>> CB.tolist(), s.tolist(), cols.tolist()
        ([[64, -127, 0]], [2.0], [2])
    """
    if threshold < 0:
        raise ValueError(f"threshold={threshold!r}: must be >= 0 (0 disables the outlier decomposition)")
    A2 = _rows(A)
    rows = A2.shape[0]
    outlier_cols = None
    if threshold > 0.0:
        outliers = A2.abs() >= threshold
        outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        A2 = A2.masked_fill(outliers, 0)
    row_stats = A2.abs().amax(dim=1).float()
    # bnb: round(A * (127 / row_stats)); a zero row gives 0 * inf = NaN there, which x86 converts to 0
    inv = torch.where(row_stats > 0, 127.0 / row_stats, torch.zeros_like(row_stats))
    CB = torch.round(A2 * inv.unsqueeze(-1)).to(torch.int8)
    if rows > 1 and outlier_cols is not None and outlier_cols.numel():
        CB[:, outlier_cols] = 0
    return CB.reshape(A.shape), row_stats, outlier_cols


def int8_vectorwise_dequant(CB: torch.Tensor, row_stats: torch.Tensor) -> torch.Tensor:
    """``CB * row_stats * (1/127)`` in float32 (bitsandbytes ``int8_vectorwise_dequant``).

    Example::

        >>> int8_vectorwise_dequant(torch.tensor([[127, -64]], dtype=torch.int8), torch.tensor([2.0]))
        tensor([[ 2.0000, -1.0079]])
    """
    if CB.dtype != torch.int8:
        raise TypeError(f"CB: expected torch.int8 codes, got {CB.dtype}")
    C2 = CB.reshape(-1, CB.shape[-1])
    if row_stats.numel() != C2.shape[0]:
        raise ValueError(f"row_stats has {row_stats.numel()} entries; {C2.shape[0]} rows expected")
    return (C2 * row_stats.reshape(-1, 1).float() * INV_127).reshape(CB.shape)


def int8_matmul_int32(CA: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
    """Exact ``CA @ CB.T`` for int8 ``CA [M, K]`` and ``CB [N, K]``, accumulated as int32.

    Computed in float64, which is exact for ``K < 2**53 / 127**2``; the int32 accumulator itself cannot
    overflow below ``K = 133,144``. (bitsandbytes' CPU fallback multiplies in float32, which agrees
    while partial sums stay below ``2**24``.)

    Example::

        >>> a = torch.tensor([[127, -127]], dtype=torch.int8); int8_matmul_int32(a, a).item()
        32258
    """
    if CA.dtype != torch.int8 or CB.dtype != torch.int8:
        raise TypeError(f"int8 operands expected, got {CA.dtype} and {CB.dtype}")
    if CA.shape[-1] != CB.shape[-1]:
        raise ValueError(f"inner dimensions differ: CA {tuple(CA.shape)} vs CB {tuple(CB.shape)}")
    if CA.shape[-1] >= 133_144:
        raise ValueError(f"K={CA.shape[-1]}: int32 accumulation of int8 products may overflow (K < 133144)")
    return torch.matmul(CA.double(), CB.double().t()).to(torch.int32)


def int8_mm_dequant(
    acc: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    dtype: torch.dtype = torch.float16,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rescale an int32 product: ``acc * (row_stats * col_stats) / 127^2 (+ bias)``, float32, then ``dtype``.

    bitsandbytes ``int8_mm_dequant`` (default backend), operation for operation.
    """
    if acc.dtype != torch.int32:
        raise TypeError(f"acc: expected torch.int32, got {acc.dtype}")
    out = acc * (row_stats.reshape(-1, 1).float() * col_stats.reshape(1, -1).float()) * INV_127_SQ
    if bias is not None:
        out += bias
    return out.to(dtype)


def int8_mixed_matmul(
    x: torch.Tensor,
    CB_w: torch.Tensor,
    SCB_w: torch.Tensor,
    threshold: float = 6.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LLM.int8() forward ``x @ W.T (+ bias)`` with ``W ~ CB_w * SCB_w / 127``, as bitsandbytes computes it.

    ``x [..., K]`` is cast to fp16 and quantized row-wise (:func:`int8_vectorwise_quant` with
    ``threshold``); ``CB_w [N, K]`` int8 and ``SCB_w [N]`` float32 are the weight's codes and row
    absmax. The int8 product is exact (int32), rescaled in float32 and cast to ``x.dtype``; with
    ``threshold > 0`` the outlier columns of ``x`` (in ``x.dtype``) are multiplied by the dequantized
    weight columns (in ``x.dtype``) and added (``addmm``). Bit-identical to ``Linear8bitLt`` in eval
    mode on CPU (pass ``bias`` in ``x.dtype``, as that module does). Returns ``[..., N]`` in ``x.dtype``.

    Example::

        >>> w = torch.randn(8, 16); CB, SCB, _ = int8_vectorwise_quant(w.half())
        >>> int8_mixed_matmul(torch.randn(3, 16), CB, SCB, threshold=6.0).shape
        torch.Size([3, 8])
    """
    if CB_w.dtype != torch.int8 or CB_w.dim() != 2:
        raise ValueError(f"CB_w: expected a 2-D int8 weight [N, K], got {CB_w.dtype} {tuple(CB_w.shape)}")
    if x.shape[-1] != CB_w.shape[1]:
        raise ValueError(f"x has last dim {x.shape[-1]}, the weight expects K={CB_w.shape[1]}")
    if SCB_w.numel() != CB_w.shape[0]:
        raise ValueError(f"SCB_w has {SCB_w.numel()} entries; {CB_w.shape[0]} weight rows expected")
    A = _rows(x)
    CA, SCA, outlier_cols = int8_vectorwise_quant(A.to(torch.float16), threshold)
    out = int8_mm_dequant(int8_matmul_int32(CA, CB_w), SCA, SCB_w, dtype=A.dtype, bias=bias)
    if outlier_cols is not None and outlier_cols.numel():
        subA = A[:, outlier_cols]
        subB = int8_vectorwise_dequant(CB_w[:, outlier_cols].contiguous(), SCB_w).to(A.dtype).t()
        out = out.addmm(subA, subB)
    return out.reshape(*x.shape[:-1], CB_w.shape[0])
