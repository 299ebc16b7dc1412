"""Fused low-bit GEMV for small M (1..4 rows): ``y = x @ dequant(W).T (+ bias)``, split-K.

Reads the canonical lowbit bytes of a ``[N, K]`` weight directly as 32-bit words (no repacked copy):

* 4-bit: two codes a byte, the even element in the high nibble (bitsandbytes NF4/FP4 and lowbit's int4
  packing); a little-endian word holds elements ``0..7`` at bit offsets ``4, 0, 12, 8, 20, 16, 28, 24``.
* 8-bit: one code a byte (lowbit's symmetric int8 codes ``q + 128``); offsets ``0, 8, 16, 24``.

A weight element is ``(v - z) * s`` (``KIND`` 0: ``v = table[q]``, ``z = 0``; 1: ``v = q``, ``z = ZERO``
constant; 2: ``v = q``, ``z`` a float per group) or ``q * s + m`` (``KIND`` 3, GGUF Q4_1 style), with one
float32 scale per ``G`` consecutive elements along K. Each loop step covers ``BK`` elements of one scale
group (``G % BK == 0``), so the scale is applied once per step and row:

* integer kinds use the bit trick ``f = bitcast((q << (23 - BITS)) | 0x3F800000) = 1 + q / 2**BITS`` (a shift
  and one logic op per element, no int-to-float conversion) and ``sum (q - z) x = 2**BITS * sum f x -
  (2**BITS + z) * sum x``;
* the codebook kind reads the 16-entry float32 table (L1-resident) per element.

The grid is ``(N / BN, SPLIT_K)``; with ``SPLIT_K > 1`` float32 partials ``[SPLIT_K, M, N]`` are summed by
a second small kernel. Configurations per (format, M, N, K) bucket live in
:mod:`lowbit.kernels.triton_configs`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton import lowbit_mm as _lm  # the direct launcher shared with the v2 kernels


@triton.jit
def _values(words, SH, BITS: tl.constexpr, KIND: tl.constexpr, t_ptr):
    # words [BN, BKW] int32 -> values [BN, BKW, PER] float32 (trick form 1 + q/2**BITS for integer kinds)
    MASK: tl.constexpr = (1 << BITS) - 1
    q = (words[:, :, None] >> SH[None, None, :]) & MASK
    if KIND == 0:
        v = tl.load(t_ptr + q)
    else:
        v = ((q << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _row_update(acc, v, xr, s, z, KIND: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr):
    P = tl.sum(tl.sum(v * xr, axis=2), axis=1)
    if KIND == 0:
        acc += s * P
    else:
        SC: tl.constexpr = 1 << BITS
        X = tl.sum(tl.sum(xr, axis=2), axis=1)
        if KIND == 1:
            acc += s * (SC * P - (SC + ZERO) * X)
        elif KIND == 2:
            acc += s * (SC * P - (SC + z) * X)
        else:
            acc += s * (SC * P - SC * X) + z * X
    return acc


@triton.jit
def _weights_ew(v, s, z, KIND: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr):
    # element weights [BN, BKW, PER] from values and per-row scale / zero of this group: one FMA each
    SC: tl.constexpr = 1 << BITS
    s3 = s[:, None, None]
    if KIND == 0:
        return v * s3
    if KIND == 1:
        return v * (SC * s3) - (SC + ZERO) * s3
    z3 = z[:, None, None]
    if KIND == 2:
        return v * (SC * s3) - (SC + z3) * s3
    return v * (SC * s3) + (z3 - SC * s3)


@triton.jit(do_not_specialize=["M", "k_split", "n_iter"])
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, k_split, n_iter,
    BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EW: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // PER
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_n = tl.where(nmask, offs_n, 0)
    KW = K // PER
    NG = K // G
    j = tl.arange(0, PER)
    if BITS == 4:
        SH = 8 * (j // 2) + 4 * (1 - (j % 2))
    else:
        SH = 8 * j
    kw = tl.arange(0, BKW)
    k3 = (kw[:, None] * PER + j[None, :])[None, :, :]  # [1, BKW, PER] element offsets in K order
    wrow = w_ptr + offs_n[:, None].to(tl.int64) * KW + kw[None, :]
    srow = offs_n.to(tl.int64) * NG
    k_lo = pid_k * k_split
    if EW:
        # element-wise float32 accumulators, reduced once after the loop (no shuffles inside it)
        e0 = tl.zeros((BN, BKW, PER), tl.float32)
        e1 = tl.zeros((BN, BKW, PER), tl.float32)
        e2 = tl.zeros((BN, BKW, PER), tl.float32)
        e3 = tl.zeros((BN, BKW, PER), tl.float32)
        for it in range(0, n_iter):
            kb = k_lo + it * BK
            words = tl.load(wrow + kb // PER)
            v = _values(words, SH, BITS, KIND, t_ptr)
            gi = srow + kb // G
            s = tl.load(s_ptr + gi)
            if KIND >= 2:
                z = tl.load(z_ptr + gi).to(tl.float32)
            else:
                z = s
            w = _weights_ew(v, s, z, KIND, BITS, ZERO)
            e0 += w * tl.load(x_ptr + kb + k3).to(tl.float32)
            if BM > 1:
                e1 += w * tl.load(x_ptr + stride_xm + kb + k3).to(tl.float32)
            if BM > 2:
                e2 += w * tl.load(x_ptr + 2 * stride_xm + kb + k3).to(tl.float32)
            if BM > 3:
                e3 += w * tl.load(x_ptr + 3 * stride_xm + kb + k3).to(tl.float32)
        acc0 = tl.sum(tl.sum(e0, axis=2), axis=1)
        acc1 = tl.sum(tl.sum(e1, axis=2), axis=1)
        acc2 = tl.sum(tl.sum(e2, axis=2), axis=1)
        acc3 = tl.sum(tl.sum(e3, axis=2), axis=1)
    else:
        acc0 = tl.zeros((BN,), tl.float32)
        acc1 = tl.zeros((BN,), tl.float32)
        acc2 = tl.zeros((BN,), tl.float32)
        acc3 = tl.zeros((BN,), tl.float32)
        for it in range(0, n_iter):
            kb = k_lo + it * BK
            words = tl.load(wrow + kb // PER)
            v = _values(words, SH, BITS, KIND, t_ptr)
            gi = srow + kb // G
            s = tl.load(s_ptr + gi)
            if KIND >= 2:
                z = tl.load(z_ptr + gi).to(tl.float32)
            else:
                z = s
            xr = tl.load(x_ptr + kb + k3).to(tl.float32)
            acc0 = _row_update(acc0, v, xr, s, z, KIND, BITS, ZERO)
            if BM > 1:
                xr = tl.load(x_ptr + stride_xm + kb + k3).to(tl.float32)
                acc1 = _row_update(acc1, v, xr, s, z, KIND, BITS, ZERO)
            if BM > 2:
                xr = tl.load(x_ptr + 2 * stride_xm + kb + k3).to(tl.float32)
                acc2 = _row_update(acc2, v, xr, s, z, KIND, BITS, ZERO)
            if BM > 3:
                xr = tl.load(x_ptr + 3 * stride_xm + kb + k3).to(tl.float32)
                acc3 = _row_update(acc3, v, xr, s, z, KIND, BITS, ZERO)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc0 += bias
        acc1 += bias
        acc2 += bias
        acc3 += bias
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_n
    ty = y_ptr.dtype.element_ty
    tl.store(yp, acc0.to(ty), mask=nmask)
    if BM > 1:
        tl.store(yp + N, acc1.to(ty), mask=nmask)
    if BM > 2:
        tl.store(yp + 2 * N, acc2.to(ty), mask=nmask)
    if BM > 3:
        tl.store(yp + 3 * N, acc3.to(ty), mask=nmask)


@triton.jit
def _reduce_kernel(ws_ptr, y_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + i * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _split(K: int, step: int, split_k: int):
    steps = K // step
    s = max(1, min(split_k, steps))
    while steps % s:
        s -= 1
    return s, (steps // s) * step


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index)


def _launch(fn, cache, key, grid, args, constexprs, warps, stages):
    """First call through Triton's launcher; later calls straight into the compiled kernel (thin path)."""
    ck = cache.get(key) if cache is not None else None
    if ck is None:
        ck = fn[grid](*args, **constexprs, num_warps=warps, num_stages=stages)
        if cache is not None and ck is not None and hasattr(ck, "run"):
            cache[key] = ck
        return
    full = args + tuple(constexprs.values())
    stream = _stream(args[0].device)
    from triton import knobs

    enter = knobs.runtime.launch_enter_hook
    meta = ck.launch_metadata(grid, stream, *full) if enter is not None else None
    ck.run(grid[0], grid[1], 1, stream, ck.function, ck.packed_metadata, meta, enter,
           knobs.runtime.launch_exit_hook, *full)


def gemv(x2, words, scales, zeros, table, bias, N, K, bits, G, kind, zero, config, cache=None):
    """``x2 [M <= 4, K]`` fp16/bf16 (unit stride along K) -> ``[M, N]`` in x's dtype.

    ``config = (BN, BK, split_k, num_warps, num_stages[, EW])``; ``G % BK == 0`` and ``K % G == 0`` required.
    ``EW`` (default 1): element-wise accumulators (one FMA per weight and row, reduced after the loop);
    0: per-step reductions with the ``1 + q / 2**BITS`` trick (fewer registers).
    """
    BN, BK, split_k, warps, stages = config[:5]
    ew = config[5] if len(config) > 5 else 1
    BK = min(BK, G)
    M = x2.shape[0]
    split, k_split = _split(K, BK, split_k)
    if split == 1:
        y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    else:
        y = torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    z = zeros if zeros is not None else scales
    t = table if table is not None else scales
    b = bias if bias is not None else scales
    args = (x2, words, scales, z, t, b, y, M, N, K, x2.stride(0), k_split, k_split // BK)
    key = (config, M, x2.dtype, x2.data_ptr() % 16, x2.stride(0) % 16,
           None if bias is None else (bias.dtype, bias.data_ptr() % 16), split)
    grid = (triton.cdiv(N, BN), split)
    _launch(_gemv_kernel, cache, key, grid, args,
            dict(BITS=bits, G=G, KIND=kind, ZERO=float(zero), HAS_BIAS=bias is not None, BM=M, BN=BN, BK=BK, EW=bool(ew)),
            warps, stages)
    if split > 1:
        out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        _launch(_reduce_kernel, cache, ("reduce", split, x2.dtype, M * N), (triton.cdiv(M * N, 1024), 1),
                (y, out, M * N), dict(SPLIT=split, BLOCK=1024), 4, 1)
        y = out
    return y


class GemvPlan:
    """One launch shape of the v1 GEMV for one weight, computed once (config, grid, constexprs, the compiled
    kernels once known, the float32 split-K workspace per stream): :meth:`run` is the thin host path that
    ``lowbit.kernels.linear.prepared_linear`` takes for TUNED_MM rows ``("v1",)`` at M <= 4. Same kernel, same
    config and arguments as :func:`gemv` (identical results); only the per-call Python work differs."""

    __slots__ = ("grid", "split", "k_split", "n_iter", "consts", "cvals", "warps", "stages", "compiled", "reduce",
                 "ws", "rgrid", "rconsts", "rvals")

    def __init__(self, M, N, K, bits, G, kind, zero, has_bias, config):
        BN, BK, split_k, warps, stages = config[:5]
        ew = config[5] if len(config) > 5 else 1
        BK = min(BK, G)
        self.split, self.k_split = _split(K, BK, split_k)
        self.n_iter = self.k_split // BK
        self.grid = (triton.cdiv(N, BN), self.split)
        self.consts = dict(BITS=bits, G=G, KIND=kind, ZERO=float(zero), HAS_BIAS=has_bias, BM=M, BN=BN, BK=BK,
                           EW=bool(ew))
        self.cvals = tuple(self.consts.values())
        self.warps, self.stages = warps, stages
        self.compiled = None
        self.reduce = None
        self.ws = {}
        self.rgrid = (triton.cdiv(M * N, 1024), 1)
        self.rconsts = dict(SPLIT=self.split, BLOCK=1024)
        self.rvals = tuple(self.rconsts.values())

    def run(self, x2, p, bias):
        """``x2 [M, K]`` (unit stride along K) through the v1 GEMV on the prepared layout ``p`` -> ``[M, N]``."""
        launch = _lm._launch
        M = x2.shape[0]
        N = p.n
        dev = x2.device
        stream = _lm._stream(dev) if self.compiled is not None else 0
        out = torch.empty((M, N), dtype=x2.dtype, device=dev)
        if self.split == 1:
            y = out
        else:
            y = self.ws.get(stream)
            if y is None or self.compiled is None:
                y = torch.empty((self.split, M, N), dtype=torch.float32, device=dev)
                if self.compiled is not None:
                    self.ws[stream] = y  # every program overwrites its slice before the reduction reads it
        s = p.scales
        args = (x2, p.words, s, p.zeros if p.zeros is not None else s, p.table if p.table is not None else s,
                bias if bias is not None else s, y, M, N, p.k, x2.stride(0), self.k_split, self.n_iter)
        ck = launch(_gemv_kernel, self.compiled, self.grid, args, self.consts, self.cvals, self.warps, self.stages,
                    stream)
        if self.compiled is None and _lm._knobs is not None:
            self.compiled = ck
        if self.split > 1:
            rk = launch(_reduce_kernel, self.reduce, self.rgrid, (y, out, M * N), self.rconsts, self.rvals, 4, 1,
                        stream)
            if self.reduce is None and _lm._knobs is not None:
                self.reduce = rk
        return out
