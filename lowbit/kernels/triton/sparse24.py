"""The Triton glue around the 2:4 int8 sparse GEMM (cuSPARSELt): one kernel in, one kernel out.

* :func:`quantize_rows_padded`: per-token dynamic int8 quantization of ``x [M, K]`` (fp16/bf16/fp32,
  any row stride, unit column stride) straight into the ``[Mp, K]`` row-major int8 operand that
  ``torch._cslt_sparse_mm`` reads through a transposed view (``Mp`` = ``M`` rounded up to cuSPARSELt's
  row alignment; the pad rows are zeros), plus the float32 scales ``sx [M]``. Numerics of
  :func:`lowbit.kernels.reference.quantize_rows` (the same as lowbit's dense W8A8 kernel):
  ``amax = max(max|x_row|, 1e-12)``, ``sx = amax / 127``, ``q = clamp(rint(x * (127 / amax)), -127, 127)``,
  both divisions IEEE float32, no fused multiply-add. Rows longer than one block are read twice (the
  amax pass, then the quantization pass, which finds the row in L2).
* :func:`rescale_tokens`: ``out[m, n] = y[m, n] * sx[m] (+ bias[n])`` in float32 (no fused multiply-add:
  torch's rounding), rounded once to the
  output dtype, from the sparse GEMM's output ``y`` (the per-channel weight scales already applied by
  cuSPARSELt's alpha vector) in either layout (row-major, or the column-major result of
  ``transpose_result=False`` seen as a transposed view), written row-major: in place for a row-major
  ``y``, into a new contiguous tensor otherwise (the transpose is free: one read, one write either way).
  cuSPARSELt's alpha vector scales the rows of the sparse operand (output channels); the per-token scale
  runs along the other dimension and has no slot in its epilogue, hence this one memory pass.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 8192


@triton.jit
def _rint(x):
    # round half to even for |x| < 2**22 (float32 magic number; the launch disables fp contraction)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _scale_of(amax):
    amax = tl.maximum(amax, 1e-12)
    qmax = tl.full((), 127.0, tl.float32)
    return tl.math.div_rn(qmax, amax), tl.math.div_rn(amax, qmax)  # (1 / scale, scale), IEEE divisions


@triton.jit
def _q8(v):
    return tl.minimum(tl.maximum(_rint(v), -127.0), 127.0).to(tl.int8)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, NCHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    xrow = x_ptr + row * stride_xm
    qrow = q_ptr + row * stride_qm
    if NCHUNK == 1:  # the row in registers: one read
        mask = offs < K
        x = tl.load(xrow + offs, mask=mask, other=0.0).to(tl.float32)
        inv, scale = _scale_of(tl.max(tl.abs(x), axis=0))
        tl.store(s_ptr + row, scale)
        tl.store(qrow + offs, _q8(x * inv), mask=mask)
    else:  # amax over the chunks, then quantize them (the second read finds the row in L2)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NCHUNK):
            o = c * BLOCK + offs
            acc = tl.maximum(acc, tl.abs(tl.load(xrow + o, mask=o < K, other=0.0).to(tl.float32)))
        inv, scale = _scale_of(tl.max(acc, axis=0))
        tl.store(s_ptr + row, scale)
        for c in range(NCHUNK):
            o = c * BLOCK + offs
            v = tl.load(xrow + o, mask=o < K, other=0.0).to(tl.float32)
            tl.store(qrow + o, _q8(v * inv), mask=o < K)


def _blocking(K: int) -> Tuple[int, int]:
    """(BLOCK, NCHUNK): one block per row up to 8192 columns; longer rows in chunks of the largest power of
    two (<= 8192, >= 1024) dividing K, so that no lane is masked (K = 28672 -> 7 x 4096)."""
    if K <= _MAX_BLOCK:
        return triton.next_power_of_2(K), 1
    b = _MAX_BLOCK
    while b > 1024 and K % b:
        b //= 2
    return b, triton.cdiv(K, b)


def quantize_rows_padded(x2: torch.Tensor, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x2 [M, K]`` -> ``(q [rows, K] int8, sx [M] float32)``, ``rows >= M``; rows ``M..rows-1`` of ``q`` are 0."""
    M, K = x2.shape
    if rows < M:
        raise ValueError(f"quantize_rows_padded: rows={rows} < M={M}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    q = torch.empty((rows, K), dtype=torch.int8, device=x2.device)
    s = torch.empty(M, dtype=torch.float32, device=x2.device)
    if rows > M:
        q[M:].zero_()
    if M:
        block, nchunk = _blocking(K)
        _quant_rows_kernel[(M,)](x2, q, s, K, x2.stride(0), q.stride(0), BLOCK=block, NCHUNK=nchunk,
                                 num_warps=8 if block >= 4096 else 4, enable_fp_fusion=False)
    return q, s


@triton.jit
def _rescale_kernel(y_ptr, s_ptr, b_ptr, o_ptr, M, N, stride_ym, stride_yn, stride_om,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    mm = offs_m < M
    mn = offs_n < N
    mask = mm[:, None] & mn[None, :]
    y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs_m, mask=mm, other=0.0)
    out = y.to(tl.float32) * s[:, None]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)


def rescale_tokens(y: torch.Tensor, sx: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                   ) -> torch.Tensor:
    """``y [M, N]`` (any strides; row-major or a transposed column-major view) times ``sx [M]`` per row,
    plus ``bias [N]``, as a contiguous ``[M, N]`` tensor of ``out_dtype`` (in place when ``y`` is row-major
    with unit column stride and already of ``out_dtype``)."""
    M, N = y.shape
    inplace = y.dtype == out_dtype and y.stride(1) == 1 and y.stride(0) == N
    out = y if inplace else torch.empty((M, N), dtype=out_dtype, device=y.device)
    if M == 0 or N == 0:
        return out
    col_major = y.stride(0) == 1 and y.stride(1) != 1
    BM, BN = (128, 64) if col_major else (32, 128)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    b = bias if bias is not None else sx
    _rescale_kernel[grid](y, sx, b, out, M, N, y.stride(0), y.stride(1), out.stride(0), HAS_BIAS=bias is not None,
                          BM=BM, BN=BN, num_warps=4, enable_fp_fusion=False)
    return out


__all__ = ["quantize_rows_padded", "rescale_tokens"]
