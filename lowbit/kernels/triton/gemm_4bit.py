"""Fused 4-bit weight x fp16/bf16 activation matmul: ``y = x @ dequant(W).T (+ bias)``.

Weight format: the canonical lowbit 4-bit bytes of a ``[N, K]`` weight (row-major, two codes a byte,
the even element in the high nibble: bitsandbytes' NF4/FP4 layout and lowbit's int4 packing), one
scale per ``G`` consecutive elements along K (``K % G == 0``): NF4/FP4 ``block_size=64`` states and
``int4``/``int4_asym`` ``group_size=128`` states. No repacking: the derived fast layout is only the
float32 scales (double-quantized absmax decoded once), an optional float32 zero point and a
256-entry "pair" table mapping a byte to the two float32 values of its nibbles (the code value for
NF4/FP4, ``q - 8`` for symmetric int4, ``q`` for asymmetric int4), so one table load serves two
weights and the weight is rebuilt as ``(value - zero) * scale`` exactly as the reference dequantizes.

Two kernels (QLoRA, arXiv:2305.14314, for the format; the split-K / register-dequant structure as in
gemlite's GEMV kernels, mobiusml/gemlite):

* ``_gemv_kernel`` for M <= 4: CUDA-core FMAs, no shared memory; split-K over a grid
  ``(N / BN, SPLIT_K)`` with float32 partials summed afterwards.
* ``_gemm_kernel`` for larger M: the weight tile is dequantized in registers to the activation
  dtype and fed to ``tl.dot`` (tensor cores), optional split-K likewise.

x: ``[M, K]`` fp16/bf16 contiguous; output ``[M, N]`` in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, lut_ptr, offs_n, nmask, k0, K,
                 G: tl.constexpr, HAS_Z: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """float32 dequantized weights of one [BN, BK] tile, as (even, odd) halves [BN, BK // 2]."""
    NG: tl.constexpr = BK // G if BK >= G else 1
    GS2: tl.constexpr = (G if BK >= G else BK) // 2
    j = tl.arange(0, BK // 2)
    b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=nmask[:, None], other=0)
    pair = tl.load(lut_ptr + b.to(tl.int32))
    ve = pair.to(tl.int32).to(tl.float32, bitcast=True)
    vo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    g = k0 // G + tl.arange(0, NG)
    sidx = offs_n[:, None] * (K // G) + g[None, :]
    s = tl.load(s_ptr + sidx, mask=nmask[:, None], other=0.0)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BN, NG, GS2)), (BN, BK // 2))
    if HAS_Z:
        z = tl.load(z_ptr + sidx, mask=nmask[:, None], other=0.0)
        z = tl.reshape(tl.broadcast_to(z[:, :, None], (BN, NG, GS2)), (BN, BK // 2))
        ve = ve - z
        vo = vo - z
    return ve * s, vo * s


@triton.jit(do_not_specialize=["M", "k_split"])
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, k_split,
    G: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    acc = tl.zeros((BM, BN), tl.float32)
    k_lo = pid_k * k_split
    for i in range(0, k_split // BK):
        k0 = k_lo + i * BK
        we, wo = _weight_tile(w_ptr, s_ptr, z_ptr, lut_ptr, offs_n, nmask, k0, K, G, HAS_Z, BN, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + tl.arange(0, BK)[None, :],
                    mask=mmask[:, None], other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x, (BM, BK // 2, 2)))
        acc += tl.sum(we[None, :, :] * xe[:, None, :] + wo[None, :, :] * xo[:, None, :], axis=2)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    # y is either the output (one split) or float32 partials [SPLIT_K, M, N]
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["M", "k_split"])
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, k_split,
    G: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BM, BN), tl.float32)
    k_lo = pid_k * k_split
    for i in range(0, k_split // BK):
        k0 = k_lo + i * BK
        we, wo = _weight_tile(w_ptr, s_ptr, z_ptr, lut_ptr, offs_n, nmask, k0, K, G, HAS_Z, BN, BK)
        w = tl.reshape(tl.join(we, wo), (BN, BK)).to(x_ptr.dtype.element_ty)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + tl.arange(0, BK)[None, :],
                    mask=mmask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _splitk_reduce_kernel(ws_ptr, y_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + i * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launcher; configs live in lowbit/kernels/triton_configs.py

M_BUCKETS = (1, 2, 4, 16, 32, 64, 128)


def m_bucket(M: int) -> int:
    for b in M_BUCKETS:
        if M <= b:
            return b
    return 0  # larger: dequantize + F.linear


def _split(K: int, BK: int, split_k: int) -> tuple:
    """A split of K into equal multiples of BK (largest split <= split_k that divides K // BK)."""
    steps = K // BK
    s = max(1, min(split_k, steps))
    while steps % s:
        s -= 1
    return s, (steps // s) * BK


def launch(x2, qweight, scales, zeros, lut, bias, N, K, G, config):
    """Run one config on ``x2 [M, K]``; returns ``[M, N]`` in x's dtype."""
    kind, BN, BK, split_k, warps, stages = config
    M = x2.shape[0]
    BK = min(BK, K)
    split, k_split = _split(K, BK, split_k)
    out_dtype = x2.dtype
    y = torch.empty((M, N), dtype=out_dtype, device=x2.device) if split == 1 else \
        torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    has_z = zeros is not None
    z = zeros if has_z else scales
    b = bias if bias is not None else scales
    if kind == "gemv":
        BM = 1 if M == 1 else (2 if M == 2 else 4)
        grid = (triton.cdiv(N, BN), split)
        _gemv_kernel[grid](x2, qweight, scales, z, lut, b, y, M, N, K, x2.stride(0), k_split,
                           G=G, HAS_Z=has_z, HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK,
                           num_warps=warps, num_stages=stages)
    else:
        BM = 16 if M <= 16 else (32 if M <= 32 else (64 if M <= 64 else 128))
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), split)
        _gemm_kernel[grid](x2, qweight, scales, z, lut, b, y, M, N, K, x2.stride(0), k_split,
                           G=G, HAS_Z=has_z, HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, GROUP_M=8,
                           num_warps=warps, num_stages=stages)
    if split > 1:
        out = torch.empty((M, N), dtype=out_dtype, device=x2.device)
        _splitk_reduce_kernel[(triton.cdiv(M * N, 1024),)](y, out, M * N, SPLIT=split, BLOCK=1024, num_warps=4)
        y = out
    return y
