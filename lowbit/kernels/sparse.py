"""2:4 semi-structured sparse matmuls on the sparse tensor cores (cuSPARSELt), with dense fallbacks.

A weight ``W [N, K]`` with at most 2 non-zeros in every group of 4 consecutive input columns is
compressed once (:func:`prepare_24`: ``torch._cslt_compress``, the same packing
``torch.sparse.to_sparse_semi_structured`` uses on its cuSPARSELt backend: the kept values plus
2-bit indices) and multiplied with ``torch._cslt_sparse_mm``:

* :func:`sparse24_linear`: fp16 / bf16 ``y = x W^T + b``;
* :func:`sparse24_int8_linear_dynamic`: W8A8, int8 weights with per-output-channel scales, int8
  activations quantized per token at run time (the row kernel of :mod:`lowbit.kernels.native`);
  the weight scales are applied inside the sparse GEMM (cuSPARSELt's per-row alpha vector) and the
  output is written in the activation dtype; the per-token scale and the bias follow in one
  elementwise pass. Where this cuSPARSELt build refuses the alpha vector, an int32 product and a
  float32 rescale (the numerics of :func:`lowbit.kernels.reference.int8_linear_dynamic`) are used.

Dispatch by the number of rows ``M`` of the input (tokens): sparse kernels pay for the sparse
metadata and their tile shapes at small ``M``, where the dense path (``F.linear`` /
lowbit's dense int8 kernel) is as fast or faster. :data:`MIN_M` holds the crossover per kind,
measured on the H200 (``bench/results/sparsity.md``); ``backend="sparse" | "dense"`` forces a path.
Off CUDA (or without cuSPARSELt, or with shapes cuSPARSELt does not take) the dense reference runs:
``F.linear`` on the pruned weight, :func:`lowbit.kernels.reference.int8_linear_dynamic` for int8.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from lowbit.kernels import reference

#: smallest M (tokens) for which the sparse kernel is used under backend "auto", per kind ("fp", "int8")
MIN_M: Dict[str, int] = {"fp": 256, "int8": 64}
BACKENDS = ("auto", "sparse", "dense", "reference")
# cuSPARSELt operand alignment: rows/cols of the compressed matrix, rows of the dense operand
_ALIGN = {torch.float16: (16, 16, 8), torch.bfloat16: (16, 16, 8), torch.int8: (32, 32, 16)}
_fused_alpha_ok: Dict[str, bool] = {}
#: pick cuSPARSELt's algorithm per weight and M bucket with its own search (``torch._cslt_sparse_mm_search``,
#: once, cached) instead of algorithm 0. On the H200 the searched algorithm ran the bf16 2:4 GEMM at M=4096
#: 1.6x faster than algorithm 0 (bench/results/sparsity.md); opt-in (``LOWBIT_CSLT_SEARCH=1`` or
#: ``alg_search=True``) until the full module path with it has been measured there.
ALG_SEARCH = os.environ.get("LOWBIT_CSLT_SEARCH", "0") == "1"
_ALG: Dict[tuple, int] = {}


def _sparse_mm(packed: torch.Tensor, b: torch.Tensor, alg_search: Optional[bool], **kw) -> torch.Tensor:
    """``torch._cslt_sparse_mm(packed, b, **kw)`` with the (optionally searched, cached) algorithm id."""
    search = ALG_SEARCH if alg_search is None else alg_search
    if not search:
        return torch._cslt_sparse_mm(packed, b, **kw)
    M = b.shape[1]
    key = (packed.data_ptr(), packed.numel(), 1 << max(M - 1, 0).bit_length(), b.dtype, kw.get("out_dtype"),
           kw.get("alpha") is not None)
    aid = _ALG.get(key)
    if aid is None:
        try:
            aid = torch._cslt_sparse_mm_search(packed, b, **kw)
            aid = int(aid[0] if isinstance(aid, (tuple, list)) else aid)
        except (RuntimeError, TypeError, AttributeError):
            aid = 0
        _ALG[key] = aid
    try:
        return torch._cslt_sparse_mm(packed, b, alg_id=aid, **kw)
    except RuntimeError:
        if aid == 0:
            raise
        _ALG[key] = 0
        return torch._cslt_sparse_mm(packed, b, **kw)


def cusparselt_available(device: Optional[torch.device] = None) -> bool:
    """Whether cuSPARSELt can run on ``device`` (a CUDA device with PyTorch's cuSPARSELt build)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    be = getattr(torch.backends, "cusparselt", None)
    return bool(be is not None and be.is_available())


def shape_ok(w: torch.Tensor) -> bool:
    """Whether cuSPARSELt takes ``w [N, K]`` (dtype and alignment)."""
    al = _ALIGN.get(w.dtype)
    return al is not None and w.dim() == 2 and w.shape[0] % al[0] == 0 and w.shape[1] % al[1] == 0


def prepare_24(w: torch.Tensor) -> Optional[torch.Tensor]:
    """Compress a 2:4-sparse CUDA weight ``[N, K]`` (fp16, bf16 or int8) for the sparse GEMM; None
    where cuSPARSELt cannot take it (CPU, no cuSPARSELt, shape or dtype)."""
    if not (w.is_cuda and cusparselt_available(w.device) and shape_ok(w)):
        return None
    return torch._cslt_compress(w.contiguous())


def _use_sparse(kind: str, M: int, packed: Optional[torch.Tensor], x: torch.Tensor, backend: Optional[str]) -> bool:
    b = backend or "auto"
    if b not in BACKENDS:
        raise ValueError(f"unknown sparse backend {b!r}; expected one of {', '.join(BACKENDS)}")
    if b in ("dense", "reference") or packed is None or not x.is_cuda:
        if b == "sparse" and (packed is None or not x.is_cuda):
            raise RuntimeError("backend='sparse' needs a CUDA input and a weight compressed by prepare_24 "
                               "(cuSPARSELt available, fp16/bf16/int8, aligned shape)")
        return False
    return b == "sparse" or M >= MIN_M[kind]


def _pad_rows(x2: torch.Tensor, mult: int) -> torch.Tensor:
    pad = (-x2.shape[0]) % mult
    return F.pad(x2, (0, 0, 0, pad)) if pad else x2


def sparse24_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    packed: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                    alg_search: Optional[bool] = None) -> torch.Tensor:
    """``x @ w.T + bias`` for a 2:4-pruned fp16/bf16 ``w [N, K]``; ``packed`` = :func:`prepare_24` (w)."""
    K = x.shape[-1]
    M = x.numel() // K
    if not _use_sparse("fp", M, packed, x, backend) or x.dtype != w.dtype:
        wd = w if w.dtype == x.dtype else w.to(x.dtype)
        b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        return F.linear(x, wd, b)
    x2 = _pad_rows(x.reshape(M, K), _ALIGN[w.dtype][2])
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    y = _sparse_mm(packed, x2.t(), alg_search, bias=b, transpose_result=True)
    return y[:M].reshape(*x.shape[:-1], w.shape[0])


def _int8_linear_cpu(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`lowbit.kernels.reference.int8_linear_dynamic`, bit for bit, faster on the CPU: the integer
    products are summed in float32 over chunks of 1024 input columns (|sum| <= 1024 * 127 * 127 < 2**24,
    so every partial sum is exact), the chunks in float64 (exact), then rounded once to float32."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = reference.quantize_rows(x2, fp8=False)
    K = q.shape[1]
    qf, wf = q.float(), w_int8.float()
    acc = None
    for a in range(0, K, 1024):
        part = (qf[:, a:a + 1024] @ wf[:, a:a + 1024].T).double()
        acc = part if acc is None else acc + part
    out = reference._rescale(acc.float(), sx, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


def sparse24_int8_linear_dynamic(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                                 bias: Optional[torch.Tensor] = None, packed: Optional[torch.Tensor] = None,
                                 backend: Optional[str] = None, alg_search: Optional[bool] = None) -> torch.Tensor:
    """W8A8 with a 2:4-pruned int8 ``w_int8 [N, K]`` and per-channel ``w_scale [N]``; per-token
    dynamic int8 activations. ``packed`` = :func:`prepare_24` (w_int8)."""
    K = x.shape[-1]
    M = x.numel() // K
    N = w_int8.shape[0]
    if backend == "reference":
        return reference.int8_linear_dynamic(x, w_int8, w_scale, bias)
    if not x.is_cuda:
        return _int8_linear_cpu(x, w_int8, w_scale, bias)
    if not _use_sparse("int8", M, packed, x, backend):
        from lowbit.kernels import api

        return api.int8_linear_dynamic(x, (w_int8, w_scale), bias)
    from lowbit.kernels.native import _quantize_rows

    x2 = x.reshape(M, K)
    q, sx = _quantize_rows(x2.contiguous(), fp8=False)
    qp = _pad_rows(q, _ALIGN[torch.int8][2])
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    key = f"{out_dtype}"
    if _fused_alpha_ok.get(key, True):
        try:
            y = _sparse_mm(packed, qp.t(), alg_search, alpha=w_scale.float().contiguous(), out_dtype=out_dtype,
                           transpose_result=True)[:M]
            y.mul_(sx.to(y.dtype)[:, None])  # y is the GEMM's own fresh output
            if bias is not None:
                y.add_(bias.to(y.dtype))
            return y.to(x.dtype).reshape(*x.shape[:-1], N)
        except RuntimeError:
            _fused_alpha_ok[key] = False  # this cuSPARSELt build: int32 product + float32 rescale
    acc = _sparse_mm(packed, qp.t(), alg_search, out_dtype=torch.int32, transpose_result=True)[:M]
    out = acc.float().mul_(sx[:, None]).mul_(w_scale.float()[None, :])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


__all__ = ["prepare_24", "sparse24_linear", "sparse24_int8_linear_dynamic", "cusparselt_available", "shape_ok",
           "MIN_M", "BACKENDS", "ALG_SEARCH"]
