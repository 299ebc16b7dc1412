"""Fused 4-bit weight x fp16/bf16 activation matmul: ``y = x @ dequant(W).T (+ bias)``.

Weight format: the canonical lowbit 4-bit bytes of a ``[N, K]`` weight (row-major, two codes a byte,
the even element in the high nibble: bitsandbytes' NF4/FP4 layout and lowbit's int4 packing) with
one scale per ``G`` consecutive elements along K (``K % G == 0``): NF4/FP4 ``block_size=64`` and
``int4``/``int4_asym`` ``group_size=128`` states. The codes are used as stored (no repacking); the
derived layout holds only float32 scales (double-quantized absmax decoded once) and float32 zero
points. A weight is ``(v - z) * s`` with ``v = code[q]`` (``KIND`` 0, a 16-entry float32 table),
``q - 8`` (1, symmetric int4) or ``q`` (2, asymmetric), the integer cases converted with the float32
magic-number trick (``bitcast(q | 0x4B000000) - 2**23``), no table.

Kernels (QLoRA arXiv:2305.14314 for NF4; split-K and dequantization in registers as in gemlite):

* ``_gemv3_kernel`` / ``_gemv_kernel`` (M <= 4): CUDA-core FMAs, one accumulator per row, scales applied once per group
  (``acc += s * sum_k v_k x_k``); grid ``(N / BN, SPLIT_K)``, float32 partials reduced afterwards.
* ``_gemm3_kernel`` / ``_gemm_kernel``: each group of ``G`` columns is dequantized to the activation dtype exactly as
  the reference does (``((v - z) * s)`` rounded once) and fed to ``tl.dot``; optional split-K.

Each iteration handles ``NSUB`` groups; a group's bytes ``[BN, G/2]`` are split into high and low
nibbles and re-interleaved in registers (``join`` + ``reshape``) so x is read contiguously.
x: ``[M, K]`` fp16/bf16, unit stride along K; output ``[M, N]`` in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

@triton.jit
def _group_values(w_ptr, code_ptr, z_ptr, offs_n, nmask, k0, K, G: tl.constexpr, KIND: tl.constexpr,
                  zidx):
    """(v - z) of one group: float32 [BN, G] in K order."""
    j = tl.arange(0, G // 2)
    b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=nmask[:, None], other=0)
    b = b.to(tl.int32)
    hi = b >> 4
    lo = b & 15
    if KIND == 0:
        vh = tl.load(code_ptr + hi)
        vl = tl.load(code_ptr + lo)
    else:
        vh = (hi | 0x4B000000).to(tl.float32, bitcast=True)
        vl = (lo | 0x4B000000).to(tl.float32, bitcast=True)
        if KIND == 1:
            vh = vh - (8388608.0 + 8.0)
            vl = vl - (8388608.0 + 8.0)
        else:
            z = tl.load(z_ptr + zidx, mask=nmask, other=0).to(tl.float32) + 8388608.0
            vh = vh - z[:, None]
            vl = vl - z[:, None]
    return tl.reshape(tl.join(vh, vl), (vh.shape[0], G))


@triton.jit(do_not_specialize=["M", "k_split"])
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, k_split,
    G: tl.constexpr, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NSUB: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    kg = tl.arange(0, G)
    acc0 = tl.zeros((BN,), tl.float32)
    acc1 = tl.zeros((BN,), tl.float32)
    acc2 = tl.zeros((BN,), tl.float32)
    acc3 = tl.zeros((BN,), tl.float32)
    k_lo = pid_k * k_split
    srow = offs_n * (K // G)
    for it in range(0, k_split // (G * NSUB)):
        for sub in tl.static_range(NSUB):
            k0 = k_lo + (it * NSUB + sub) * G
            gi = srow + k0 // G
            v = _group_values(w_ptr, code_ptr, z_ptr, offs_n, nmask, k0, K, G, KIND, gi)
            s = tl.load(s_ptr + gi, mask=nmask, other=0.0)
            x0 = tl.load(x_ptr + k0 + kg).to(tl.float32)
            acc0 += tl.sum(v * x0[None, :], axis=1) * s
            if BM > 1:
                x1 = tl.load(x_ptr + stride_xm + k0 + kg, mask=(kg < K) & (M > 1), other=0.0).to(tl.float32)
                acc1 += tl.sum(v * x1[None, :], axis=1) * s
            if BM > 2:
                x2 = tl.load(x_ptr + 2 * stride_xm + k0 + kg, mask=(kg < K) & (M > 2), other=0.0).to(tl.float32)
                acc2 += tl.sum(v * x2[None, :], axis=1) * s
            if BM > 3:
                x3 = tl.load(x_ptr + 3 * stride_xm + k0 + kg, mask=(kg < K) & (M > 3), other=0.0).to(tl.float32)
                acc3 += tl.sum(v * x3[None, :], axis=1) * s
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc0 += bias
        acc1 += bias
        acc2 += bias
        acc3 += bias
    # y is either the output (one split) or float32 partials [SPLIT_K, M, N]
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_n
    ty = y_ptr.dtype.element_ty
    tl.store(yp, acc0.to(ty), mask=nmask)
    if BM > 1:
        tl.store(yp + N, acc1.to(ty), mask=nmask & (M > 1))
    if BM > 2:
        tl.store(yp + 2 * N, acc2.to(ty), mask=nmask & (M > 2))
    if BM > 3:
        tl.store(yp + 3 * N, acc3.to(ty), mask=nmask & (M > 3))


@triton.jit(do_not_specialize=["M", "k_split"])
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, k_split,
    G: tl.constexpr, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NSUB: tl.constexpr, GROUP_M: tl.constexpr,
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
    kg = tl.arange(0, G)
    acc = tl.zeros((BM, BN), tl.float32)
    k_lo = pid_k * k_split
    srow = offs_n * (K // G)
    xrow = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    for it in range(0, k_split // (G * NSUB)):
        for sub in tl.static_range(NSUB):
            k0 = k_lo + (it * NSUB + sub) * G
            gi = srow + k0 // G
            v = _group_values(w_ptr, code_ptr, z_ptr, offs_n, nmask, k0, K, G, KIND, gi)
            s = tl.load(s_ptr + gi, mask=nmask, other=0.0)
            w = (v * s[:, None]).to(x_ptr.dtype.element_ty)
            x = tl.load(xrow + k0 + kg[None, :], mask=mmask[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _group_split(w_ptr, code_ptr, z_ptr, offs_n, nmask, k0, K, G: tl.constexpr, KIND: tl.constexpr, zidx):
    """(v - z) of one group as even / odd halves, float32 [BN, G/2] each (no interleaving)."""
    j = tl.arange(0, G // 2)
    b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=nmask[:, None], other=0)
    b = b.to(tl.int32)
    hi = b >> 4
    lo = b & 15
    if KIND == 0:
        vh = tl.load(code_ptr + hi)
        vl = tl.load(code_ptr + lo)
    else:
        vh = (hi | 0x4B000000).to(tl.float32, bitcast=True)
        vl = (lo | 0x4B000000).to(tl.float32, bitcast=True)
        if KIND == 1:
            vh = vh - (8388608.0 + 8.0)
            vl = vl - (8388608.0 + 8.0)
        else:
            z = tl.load(z_ptr + zidx, mask=nmask, other=0).to(tl.float32) + 8388608.0
            vh = vh - z[:, None]
            vl = vl - z[:, None]
    return vh, vl


@triton.jit
def _x_split(ptr, G: tl.constexpr):
    x = tl.load(ptr + tl.arange(0, G)).to(tl.float32)
    return tl.split(tl.reshape(x, (G // 2, 2)))


@triton.jit(do_not_specialize=["M", "k_split"])
def _gemv3_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, k_split,
    G: tl.constexpr, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NSUB: tl.constexpr,
):
    # element-wise float32 accumulators [BN, G/2], reduced across K once at the end
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    acc0 = tl.zeros((BN, G // 2), tl.float32)
    acc1 = tl.zeros((BN, G // 2), tl.float32)
    acc2 = tl.zeros((BN, G // 2), tl.float32)
    acc3 = tl.zeros((BN, G // 2), tl.float32)
    k_lo = pid_k * k_split
    srow = offs_n * (K // G)
    for it in range(0, k_split // (G * NSUB)):
        for sub in tl.static_range(NSUB):
            k0 = k_lo + (it * NSUB + sub) * G
            gi = srow + k0 // G
            vh, vl = _group_split(w_ptr, code_ptr, z_ptr, offs_n, nmask, k0, K, G, KIND, gi)
            s = tl.load(s_ptr + gi, mask=nmask, other=0.0)[:, None]
            vh = vh * s
            vl = vl * s
            xe, xo = _x_split(x_ptr + k0, G)
            acc0 += vh * xe[None, :] + vl * xo[None, :]
            if BM > 1:
                xe, xo = _x_split(x_ptr + tl.minimum(M - 1, 1) * stride_xm + k0, G)
                acc1 += vh * xe[None, :] + vl * xo[None, :]
            if BM > 2:
                xe, xo = _x_split(x_ptr + tl.minimum(M - 1, 2) * stride_xm + k0, G)
                acc2 += vh * xe[None, :] + vl * xo[None, :]
            if BM > 3:
                xe, xo = _x_split(x_ptr + tl.minimum(M - 1, 3) * stride_xm + k0, G)
                acc3 += vh * xe[None, :] + vl * xo[None, :]
    bias = tl.zeros((BN,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_n
    ty = y_ptr.dtype.element_ty
    tl.store(yp, (tl.sum(acc0, axis=1) + bias).to(ty), mask=nmask)
    if BM > 1:
        tl.store(yp + N, (tl.sum(acc1, axis=1) + bias).to(ty), mask=nmask & (M > 1))
    if BM > 2:
        tl.store(yp + 2 * N, (tl.sum(acc2, axis=1) + bias).to(ty), mask=nmask & (M > 2))
    if BM > 3:
        tl.store(yp + 3 * N, (tl.sum(acc3, axis=1) + bias).to(ty), mask=nmask & (M > 3))


@triton.jit(do_not_specialize=["M", "k_split"])
def _gemm3_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, k_split,
    G: tl.constexpr, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NSUB: tl.constexpr, GROUP_M: tl.constexpr,
):
    # two dots per group (even and odd K), the weight rounded once to x's dtype as the reference does
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
    j = tl.arange(0, G // 2)
    acc = tl.zeros((BM, BN), tl.float32)
    k_lo = pid_k * k_split
    srow = offs_n * (K // G)
    xrow = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    dt = x_ptr.dtype.element_ty
    for it in range(0, k_split // (G * NSUB)):
        for sub in tl.static_range(NSUB):
            k0 = k_lo + (it * NSUB + sub) * G
            gi = srow + k0 // G
            vh, vl = _group_split(w_ptr, code_ptr, z_ptr, offs_n, nmask, k0, K, G, KIND, gi)
            s = tl.load(s_ptr + gi, mask=nmask, other=0.0)[:, None]
            xe = tl.load(xrow + k0 + 2 * j[None, :], mask=mmask[:, None], other=0.0)
            xo = tl.load(xrow + k0 + 2 * j[None, :] + 1, mask=mmask[:, None], other=0.0)
            acc = tl.dot(xe, tl.trans((vh * s).to(dt)), acc)
            acc = tl.dot(xo, tl.trans((vl * s).to(dt)), acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
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
# launcher; configs live in lowbit/kernels/triton_configs.py. A config is
# (kernel, BN, K per iteration, split_k, num_warps, num_stages); "dequant" is handled by the caller.

M_BUCKETS = (1, 2, 4, 16, 32, 64, 128)


def m_bucket(M: int) -> int:
    for b in M_BUCKETS:
        if M <= b:
            return b
    return 0  # larger: dequantize + F.linear


def _split(K: int, step: int, split_k: int) -> tuple:
    """A split of K into equal multiples of ``step`` (largest split <= split_k dividing K // step)."""
    steps = K // step
    s = max(1, min(split_k, steps))
    while steps % s:
        s -= 1
    return s, (steps // s) * step


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index)


def _launch(fn, cache, key, grid, args, constexprs, warps, stages):
    """Launch through Triton the first time, then straight through the compiled kernel (thin path).

    ``key`` must capture everything Triton specialises on that can change between calls: the
    activation's alignment and row stride, the dtype, bias presence; the weight's tensors are fixed.
    """
    ck = cache.get(key) if cache is not None else None
    if ck is None:
        ck = fn[grid](*args, **constexprs, num_warps=warps, num_stages=stages)
        if cache is not None:
            cache[key] = ck
        return
    full = args + tuple(constexprs.values())
    stream = _stream(args[0].device)
    from triton import knobs

    enter = knobs.runtime.launch_enter_hook
    meta = ck.launch_metadata(grid, stream, *full) if enter is not None else None
    ck.run(grid[0], grid[1], 1, stream, ck.function, ck.packed_metadata, meta, enter,
           knobs.runtime.launch_exit_hook, *full)


def launch(x2, qweight, scales, zeros, values, bias, N, K, G, kind, config, cache=None):
    """Run one config on ``x2 [M, K]``; returns ``[M, N]`` in x's dtype."""
    name, BN, kstep, split_k, warps, stages = config
    M = x2.shape[0]
    nsub = max(1, min(kstep, K) // G)
    split, k_split = _split(K, G * nsub, split_k)
    out_dtype = x2.dtype
    if split == 1:
        y = torch.empty((M, N), dtype=out_dtype, device=x2.device)
    else:
        y = torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    args = (x2, qweight, scales, z, values, b, y, M, N, K, x2.stride(0), k_split)
    key = (config, x2.dtype, x2.data_ptr() % 16, x2.stride(0) % 16,
           None if bias is None else (bias.dtype, bias.data_ptr() % 16), split > 1)
    if name in ("gemv", "gemv3"):
        BM = 1 if M == 1 else (2 if M == 2 else 4)
        key = key + (BM,)
        grid = (triton.cdiv(N, BN), split)
        _launch(_gemv_kernel if name == "gemv" else _gemv3_kernel, cache, key, grid, args,
                dict(G=G, KIND=kind, HAS_BIAS=bias is not None, BM=BM, BN=BN, NSUB=nsub), warps, stages)
    else:
        BM = 16 if M <= 16 else (32 if M <= 32 else (64 if M <= 64 else 128))
        key = key + (BM,)
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), split)
        _launch(_gemm_kernel if name == "gemm" else _gemm3_kernel, cache, key, grid, args,
                dict(G=G, KIND=kind, HAS_BIAS=bias is not None, BM=BM, BN=BN, NSUB=nsub, GROUP_M=8), warps, stages)
    if split > 1:
        out = torch.empty((M, N), dtype=out_dtype, device=x2.device)
        _launch(_splitk_reduce_kernel, cache, ("reduce", split, out_dtype, (M * N) % 16, M * N == 1),
                (triton.cdiv(M * N, 1024), 1),
                (y, out, M * N), dict(SPLIT=split, BLOCK=1024), 4, 1)
        y = out
    return y
