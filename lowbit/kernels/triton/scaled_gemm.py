"""Dynamic per-token activation quantization and int8 / fp8 GEMM with the scales in the epilogue.

``y = (quant(x) @ Wq.T) * sx[:, None] * sw[None, :] (+ bias)``, the W8A8 scheme of
LLM.int8()/SmoothQuant (Dettmers et al. 2022, arXiv:2208.07339; Xiao et al. 2022, arXiv:2211.10438)
and the fp8 row-wise recipe (OCP FP8 e4m3, max 448).

Activation quantization (one program per row, ``x [M, K]`` fp16/bf16):
    ``amax = max(max|x_row|, 1e-12)``; ``sx = amax / QMAX``; ``q = x * (QMAX / amax)`` then int8:
    ``clamp(rint(q), -127, 127)``; fp8: ``clamp(q, -448, 448)`` cast with round-to-nearest-even.
    Both divisions are IEEE float32 (``div_rn``), as in :mod:`lowbit.kernels.reference`.

GEMM: ``a [M, K]`` int8/fp8 row-major, ``b [N, K]`` int8/fp8 row-major (the weight as stored),
int32 (int8) or float32 (fp8) accumulation on the tensor cores, then ``acc * sx * sw + bias`` in
float32 and one rounding to the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(x):
    # round half to even for |x| < 2**22 (float32 magic number; the kernels disable fp contraction)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
    qmax = tl.full((), QMAX, tl.float32)
    inv = tl.math.div_rn(qmax, amax)
    tl.store(s_ptr + row, tl.math.div_rn(amax, qmax))
    v = x * inv
    if IS_FP8:
        q = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(q_ptr.dtype.element_ty)
    else:
        q = tl.minimum(tl.maximum(_rint(v), -QMAX), QMAX).to(tl.int8)
    tl.store(q_ptr + row * K + offs, q, mask=mask)


def quantize_rows(x2: torch.Tensor, fp8: bool) -> tuple:
    """Per-row dynamic quantization of ``x2 [M, K]`` -> ``(q [M, K] int8|float8_e4m3fn, sx [M] fp32)``."""
    M, K = x2.shape
    qdt = torch.float8_e4m3fn if fp8 else torch.int8
    q = torch.empty((M, K), dtype=qdt, device=x2.device)
    s = torch.empty(M, dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(K)
    _act_quant_kernel[(M,)](x2, q, s, K, x2.stride(0), QMAX=448.0 if fp8 else 127.0, IS_FP8=fp8,
                            BLOCK=block, num_warps=8 if block >= 4096 else 4, enable_fp_fusion=False)
    return q, s


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, B_U8: tl.constexpr = False,
):
    pid = tl.program_id(0)
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
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BM), BM)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BN), BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = b_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BM, BN), tl.int32 if IS_INT else tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = rk[None, :] < K - k * BK
            a = tl.load(a_ptrs, mask=kmask, other=0)
            b = tl.load(b_ptrs, mask=kmask, other=0)
        if B_U8:  # lowbit's stored codes (uint8, implicit zero 128): the int8 weight is the code with bit 7 flipped
            b = (b ^ 0x80).to(tl.int8, bitcast=True)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=acc.dtype)
        a_ptrs += BK
        b_ptrs += BK
    sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_gemm_tma_kernel(
    a_desc, b_desc, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, B_U8: tl.constexpr = False,
):
    # the same GEMM with tiles fetched by the Hopper bulk tensor copy engine (host-built descriptors)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    off_m = pid_m * BM
    off_n = pid_n * BN
    acc = tl.zeros((BM, BN), tl.int32 if IS_INT else tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        a = a_desc.load([off_m, k * BK])
        b = b_desc.load([off_n, k * BK])
        if B_U8:
            b = (b ^ 0x80).to(tl.int8, bitcast=True)
        acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype)
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)


# (BM, BN, BK, GROUP_M, warps, stages[, "tma"]); bench/gpu.py --tune measures alternatives
DEFAULT_CONFIG = {"int8": (128, 256, 128, 8, 8, 3), "fp8": (128, 256, 128, 8, 8, 3)}


def scaled_gemm(a, b, sa, sb, bias, out_dtype, config=None):
    """``(a @ b.T) * sa[:, None] * sb[None, :] + bias`` with a/b int8 or float8_e4m3fn, row-major. With an int8
    ``a``, ``b`` may also be lowbit's stored uint8 codes (symmetric int8, implicit zero 128: the weight is
    ``code - 128``), read as they are (bit 7 flipped in registers; no signed copy of the weight)."""
    M, K = a.shape
    N = b.shape[0]
    is_int = a.dtype == torch.int8
    b_u8 = b.dtype == torch.uint8
    if b_u8 and not is_int:
        raise TypeError("scaled_gemm: uint8 weight codes need int8 activations")
    config = config or DEFAULT_CONFIG["int8" if is_int else "fp8"]
    BM, BN, BK, GM, warps, stages = config[:6]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    bias_arg = bias if bias is not None else sa
    if len(config) > 6 and config[6] == "tma" and K % 16 == 0 and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
        b_desc = TensorDescriptor.from_tensor(b, [BN, BK])
        _scaled_gemm_tma_kernel[grid](a_desc, b_desc, sa, sb, bias_arg, c, M, N, K, HAS_BIAS=bias is not None,
                                      IS_INT=is_int, BM=BM, BN=BN, BK=BK, GROUP_M=GM, B_U8=b_u8,
                                      num_warps=warps, num_stages=stages)
        return c
    _scaled_gemm_kernel[grid](a, b, sa, sb, bias_arg, c, M, N, K,
                              HAS_BIAS=bias is not None, IS_INT=is_int, EVEN_K=K % BK == 0, BM=BM, BN=BN, BK=BK,
                              GROUP_M=GM, B_U8=b_u8, num_warps=warps, num_stages=stages)
    return c
