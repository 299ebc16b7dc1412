"""Fused low-bit weight x fp16/bf16 activation matmul for small M (v2): ``y = x @ dequant(W).T (+ bias)``.

Reads the canonical lowbit bytes of a ``[N, K]`` weight as 32-bit words (``words`` int32 ``[N, K * BITS / 32]``,
a view of the codes; nothing repacked, nothing written back). In a little-endian word of 4-bit codes element
``e`` (0..7) sits at bit ``8 (e // 2) + 4 (1 - e % 2)`` (the even element in the high nibble: bitsandbytes
NF4/FP4, lowbit int4, GGUF Q4 after the prepare-time block unpacking); 8-bit element ``e`` at bit ``8 e``.

**K is walked in "planes".** A dot product does not depend on the order of K, so instead of re-interleaving
the nibbles of a word back into K order (a layout conversion through shared memory), each loop step takes a
tile of ``BKW`` words per row and treats element ``e`` of every word as one plane: plane ``e`` of word ``kw``
is K index ``8 kw + e`` and is multiplied with ``x[..., 8 kw + e]`` (a strided, L1-resident load of x). All
planes keep the words' register layout, so no layout conversion happens inside the loop.

Dequantisation by bit tricks, scales once per word (a word never straddles a scale group):

* integer codes (``KIND`` 1: ``(q - ZERO) s``; 2: ``(q - z) s`` with a float zero per group; 3: ``q s + m``,
  GGUF Q4_1): ``f = bitcast((q << (23 - BITS)) | 0x3F800000) = 1 + q / 2**BITS`` (one shift and one
  and-or per element, no int-to-float conversion), ``p = sum_e f_e x_e`` and ``X = sum_e x_e`` per word,
  then ``sum_e (q_e - z) x_e = 2**BITS p - (2**BITS + z) X``;
* 4-bit tables held in registers (``SHFL``, the shipped NF4 / FP4 path at M <= 4, also tuned for some int4
  shapes): lane ``l`` of every warp holds ``table[l % 16]`` (built once per program from the lane id and 16
  uniform scalars, so no layout conversion moves it between threads), and each weight is one ``shfl.sync.idx``
  on its code (the shuffle reads the low 5 bits, so a code needs only a shift): exact float32 values with no
  memory access per weight (SASS on sm_90: 294 instructions per 64 weights per thread in the loop, against 845
  for a table read from memory). Codebooks use their code values (``s * sum v x``); integer codes the 16 exact
  code values ``q - ZERO`` (kind 1) or ``q`` (``s (sum q x - z sum x)``, ``s sum q x + m sum x``);
* 4-bit codebooks from memory: a 256-entry table of *byte -> (value of the high nibble, value of the low
  nibble)* as two float32 in one int64 (``PAIRT``), or the 16-entry float32 table, one L1 load per weight
  (both slower than the v1 GEMV on the H200);
* bf16 activations are read two at a time as 32-bit words and widened by a shift / a mask.

``gemvg`` (M <= 4, the shipped GEMV): one scale group (or a divisor of it) per step; the scale (zero point) of
row n and group g read at ``n * ssn + g * ssg``: from the state's own ``[N, K / G]`` tensors (the default: no
copy on the device; uint8 zero points widened when loaded) or from a transposed ``[K / G, N]`` copy derived
once (config suffix "t": coalesced along N, 0-13% faster at M = 1 on the H200, see
``bench/results/gemv_sweep.md``); 4-16 words per row and step so that a warp spans 8-32 rows and every
activation load serves all of them; split-K partials summed in the kernel by the last program to arrive.

``gemvq`` (M <= 4, the shipped M = 1 GEMV): 1, 2 or 4 scale groups per step (sub-tiles of one group each, a
scale / zero per row and sub-tile); integer codes decoded exactly with about one integer op per weight (``_qval``:
five of the eight nibbles of a word masked in place into the mantissa of 1.0, whose bits sit in a register, three
from ``w >> 12``; then one exact FFMA to ``q - zero``) and one FFMA per weight into the word's dot; codebooks by
warp shuffles; options: register prefetch one or two steps ahead ("f" / "ff"), the words through TMA tensor
descriptors with the loop pipelined ``stages`` deep ("m", for sub-tiles of 16 words or more), 16-bit activation
loads ("x"). 4.1 SASS instructions per weight for int4 g128 asym against 5.7 for ``gemvg`` (see
``bench/results/gemv_sweep.md`` runs 6-7).

``gemv`` (M <= 4, run 1's layout): CUDA-core FMAs into float32 accumulators shaped like the word tile, reduced once after the
loop; grid ``(N / BN, SPLIT_K)`` so that small N x K still fills all multiprocessors; split partials (float32
``[SPLIT_K, M, N]``) summed by a second tiny kernel.

``gemm`` (M > 4; measured slower than dequantize + cuBLAS at every M on the H200, so no default uses it): per plane the dequantised weight ``((v - z) s)`` rounded once to the activation dtype (the
reference's rounding) feeds ``tl.dot`` (tensor cores) with the matching strided x plane; optional split-K.

``tc`` (4 < M <= 256, :func:`_tc_kernel`): the tensor-core GEMM with the packed weight dequantized in registers as the
MMA's A operand (configs "tc"; "tcb": two weights per inline-PTX op in the activation dtype, :func:`packed_asm` /
:func:`packed_table_asm`; "tcbd": "tcb" with one MMA per 128-K step), split-K summed in the kernel.

Configurations per (bits, kind class, M bucket, N x K) live in :mod:`lowbit.kernels.triton_configs`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _trick(words, POS: tl.constexpr, BITS: tl.constexpr):
    # 1 + q / 2**BITS as float32, q = the BITS-bit field of ``words`` at bit POS
    TB: tl.constexpr = 23 - BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    if POS <= TB:
        t = words << (TB - POS)
    else:
        t = words >> (POS - TB)
    return ((t & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _exact(words, POS: tl.constexpr, BITS: tl.constexpr):
    # q as an exact float32 (magic number 2**23)
    MASK: tl.constexpr = (1 << BITS) - 1
    return (((words >> POS) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _pair_table(words, B: tl.constexpr, t_ptr):
    # values of the high / low nibble of byte B (elements 2B, 2B+1) from the byte-pair table
    pair = tl.load(t_ptr + ((words >> (8 * B)) & 0xFF))
    v0 = pair.to(tl.int32).to(tl.float32, bitcast=True)
    v1 = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return v0, v1


@triton.jit
def _lane_values(t_ptr, BN: tl.constexpr, BKW: tl.constexpr):
    # per element of a [BN, BKW] tile: table[laneid % 16] as float32 bits (int32), the source register of
    # _shfl_lookup; every element a thread holds carries its own lane's entry, so a warp holds the table twice.
    # Built only from the lane id and 16 uniform scalars (no tensor load): the compiler can rematerialize it in the
    # layout of the codes it meets instead of moving it between threads (which would break the lane invariant).
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.zeros((BN, BKW), tl.int32)],
                                     dtype=tl.int32, is_pure=True, pack=1) & 15
    tv = tl.zeros((BN, BKW), tl.float32)
    for i in tl.static_range(16):
        tv = tl.where(lane == i, tl.load(t_ptr + i), tv)
    return tv.to(tl.int32, bitcast=True)


@triton.jit
def _shfl_lookup(tv, idx):
    # table[idx & 15] from the registers of the warp: lane (idx & 31) holds table[idx & 15] (``shfl.idx`` reads the
    # low 5 bits of idx only, so a code needs no mask: the bit above it picks lanes 16-31, which hold the same
    # table). One warp shuffle per weight, no memory access, exact float32 table values.
    v = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, 0xffffffff;", "=r,r,r", [tv, idx],
                                  dtype=tl.int32, is_pure=False, pack=1)
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _xpair(xi_ptr, offs, X_BF16: tl.constexpr):
    # two consecutive activations (elements 2i, 2i+1) from one 32-bit load
    xb = tl.load(xi_ptr + offs)
    if X_BF16:
        x0 = (xb << 16).to(tl.float32, bitcast=True)
        x1 = (xb & -65536).to(tl.float32, bitcast=True)
    else:
        x0 = (xb & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x1 = (xb >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return x0, x1


@triton.jit
def _word_update(acc, p, X, s, z, KIND: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr,
                 EXACT: tl.constexpr = False):
    # EXACT: p = sum_e v_e x_e with the exact code values of the shuffle table (kind 1: q - ZERO, kinds 2 / 3: q)
    SC: tl.constexpr = 1 << BITS
    if KIND == 0:
        acc += s * p
    elif EXACT:
        if KIND == 1:
            acc += s * p
        elif KIND == 2:
            acc += s * (p - z * X[None, :])
        else:
            acc += s * p + z * X[None, :]
    elif KIND == 1:
        acc += s * (SC * p - (SC + ZERO) * X[None, :])
    elif KIND == 2:
        acc += s * (SC * p - (SC + z) * X[None, :])
    else:
        acc += s * (SC * p - SC * X[None, :]) + z * X[None, :]
    return acc


@triton.jit(do_not_specialize=["M", "kw_split", "n_iter"])
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr,
    M, N, KW, NG, sxm, kw_split, n_iter,
    BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_n = tl.where(nmask, offs_n, 0)  # clamped rows: loads need no mask
    kw = tl.arange(0, BKW)
    wrow = w_ptr + offs_n[:, None].to(tl.int64) * KW + kw[None, :]
    srow = offs_n[:, None].to(tl.int64) * NG
    xi_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    sx2 = sxm // 2
    kw_lo = pid_k * kw_split
    acc0 = tl.zeros((BN, BKW), tl.float32)
    acc1 = tl.zeros((BN, BKW), tl.float32)
    acc2 = tl.zeros((BN, BKW), tl.float32)
    acc3 = tl.zeros((BN, BKW), tl.float32)
    for it in range(0, n_iter):
        kwb = kw_lo + it * BKW
        words = tl.load(wrow + kwb)
        gi = srow + ((kwb + kw) // (G // PER))[None, :]
        s = tl.load(s_ptr + gi)
        if KIND >= 2:
            z = tl.load(z_ptr + gi).to(tl.float32)
        else:
            z = s
        xo = (kwb + kw) * HALF
        p0 = tl.zeros((BN, BKW), tl.float32)
        p1 = tl.zeros((BN, BKW), tl.float32)
        p2 = tl.zeros((BN, BKW), tl.float32)
        p3 = tl.zeros((BN, BKW), tl.float32)
        X0 = tl.zeros((BKW,), tl.float32)
        X1 = tl.zeros((BKW,), tl.float32)
        X2 = tl.zeros((BKW,), tl.float32)
        X3 = tl.zeros((BKW,), tl.float32)
        for b in tl.static_range(HALF):
            if KIND == 0:
                v0, v1 = _pair_table(words, b, t_ptr)
            else:
                if BITS == 4:
                    v0 = _trick(words, 8 * b + 4, BITS)
                    v1 = _trick(words, 8 * b, BITS)
                else:
                    v0 = _trick(words, 16 * b, BITS)
                    v1 = _trick(words, 16 * b + 8, BITS)
            x0, x1 = _xpair(xi_ptr, xo + b, X_BF16)
            p0 += v0 * x0[None, :] + v1 * x1[None, :]
            X0 += x0 + x1
            if BM > 1:
                x0, x1 = _xpair(xi_ptr, sx2 + xo + b, X_BF16)
                p1 += v0 * x0[None, :] + v1 * x1[None, :]
                X1 += x0 + x1
            if BM > 2:
                x0, x1 = _xpair(xi_ptr, 2 * sx2 + xo + b, X_BF16)
                p2 += v0 * x0[None, :] + v1 * x1[None, :]
                X2 += x0 + x1
            if BM > 3:
                x0, x1 = _xpair(xi_ptr, 3 * sx2 + xo + b, X_BF16)
                p3 += v0 * x0[None, :] + v1 * x1[None, :]
                X3 += x0 + x1
        acc0 = _word_update(acc0, p0, X0, s, z, KIND, BITS, ZERO)
        if BM > 1:
            acc1 = _word_update(acc1, p1, X1, s, z, KIND, BITS, ZERO)
        if BM > 2:
            acc2 = _word_update(acc2, p2, X2, s, z, KIND, BITS, ZERO)
        if BM > 3:
            acc3 = _word_update(acc3, p3, X3, s, z, KIND, BITS, ZERO)
    r0 = tl.sum(acc0, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        r0 += bias
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_n
    ty = y_ptr.dtype.element_ty
    tl.store(yp, r0.to(ty), mask=nmask)
    if BM > 1:
        r1 = tl.sum(acc1, axis=1)
        if HAS_BIAS:
            r1 += bias
        tl.store(yp + N, r1.to(ty), mask=nmask)
    if BM > 2:
        r2 = tl.sum(acc2, axis=1)
        if HAS_BIAS:
            r2 += bias
        tl.store(yp + 2 * N, r2.to(ty), mask=nmask)
    if BM > 3:
        r3 = tl.sum(acc3, axis=1)
        if HAS_BIAS:
            r3 += bias
        tl.store(yp + 3 * N, r3.to(ty), mask=nmask)


@triton.jit(do_not_specialize=["M", "kw_split", "n_iter"])
def _gemvg_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr, o_ptr, c_ptr,
    M, N, KW, NG, sxm, kw_split, n_iter, ssn, ssg,
    BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, PAIRT: tl.constexpr = False,
    PF: tl.constexpr = False, FIX: tl.constexpr = False, SHFL: tl.constexpr = False,
):
    # GEMV with one scale group (or a divisor of one) per step: the scale (zero) of row n and group g at
    # s_ptr + n * ssn + g * ssg (the state's own [N, NG] layout: ssn = NG, ssg = 1, no copy; or a transposed
    # [NG, N] copy: ssn = 1, ssg = N, coalesced along N), loaded once per row and step (uint8 zero points are
    # read as they are stored); few words per row and step so that a warp spans many rows (every activation load
    # serves them all). Codebooks: the 16-entry float32 table read per weight (SHFL = False, PAIRT = False), the
    # byte-pair table (PAIRT) or the table held in registers across the warp and read by a shuffle (SHFL). SHFL
    # with integer codes: the 16 exact code values (kind 1: q - ZERO; kinds 2 / 3: q) from the same kind of table,
    # in place of the 1 + q / 16 bit trick (t_ptr is then PreparedLinear.itable).
    PER: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_n = tl.where(nmask, offs_n, 0)
    kw = tl.arange(0, BKW)
    wrow = w_ptr + offs_n[:, None].to(tl.int64) * KW + kw[None, :]
    srow = offs_n.to(tl.int64) * ssn
    xi_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    sx2 = sxm // 2
    kw_lo = pid_k * kw_split
    acc0 = tl.zeros((BN, BKW), tl.float32)
    acc1 = tl.zeros((BN, BKW), tl.float32)
    acc2 = tl.zeros((BN, BKW), tl.float32)
    acc3 = tl.zeros((BN, BKW), tl.float32)
    if SHFL:  # the codebook in registers: element e of a thread holds table[laneid % 16] (loaded once)
        tv = _lane_values(t_ptr, BN, BKW)
    if PF:  # register prefetch: the next step's words / scales / zeros are loaded before this step's math
        words_n = tl.load(wrow + kw_lo)
        g0 = (kw_lo * PER) // G
        s_n = tl.load(s_ptr + g0.to(tl.int64) * ssg + srow)[:, None]
        if KIND >= 2:
            z_n = tl.load(z_ptr + g0.to(tl.int64) * ssg + srow).to(tl.float32)[:, None]
        else:
            z_n = s_n
    for it in range(0, n_iter):
        kwb = kw_lo + it * BKW
        if PF:
            words = words_n
            s = s_n
            z = z_n
            kwn = kw_lo + tl.minimum(it + 1, n_iter - 1) * BKW  # the last step re-loads its own tile
            words_n = tl.load(wrow + kwn)
            gn = (kwn * PER) // G
            s_n = tl.load(s_ptr + gn.to(tl.int64) * ssg + srow)[:, None]
            if KIND >= 2:
                z_n = tl.load(z_ptr + gn.to(tl.int64) * ssg + srow).to(tl.float32)[:, None]
            else:
                z_n = s_n
        else:
            words = tl.load(wrow + kwb)
            g = (kwb * PER) // G
            s = tl.load(s_ptr + g.to(tl.int64) * ssg + srow)[:, None]
            if KIND >= 2:
                z = tl.load(z_ptr + g.to(tl.int64) * ssg + srow).to(tl.float32)[:, None]
            else:
                z = s
        xo = (kwb + kw) * HALF
        p0 = tl.zeros((BN, BKW), tl.float32)
        p1 = tl.zeros((BN, BKW), tl.float32)
        p2 = tl.zeros((BN, BKW), tl.float32)
        p3 = tl.zeros((BN, BKW), tl.float32)
        X0 = tl.zeros((BKW,), tl.float32)
        X1 = tl.zeros((BKW,), tl.float32)
        X2 = tl.zeros((BKW,), tl.float32)
        X3 = tl.zeros((BKW,), tl.float32)
        for b in tl.static_range(HALF):
            if SHFL:  # codes at bits 8b + 4 (even element) and 8b; the shuffle reads the low 5 bits only
                v0 = _shfl_lookup(tv, words >> (8 * b + 4))
                v1 = _shfl_lookup(tv, words >> (8 * b))
            elif KIND == 0:
                if PAIRT:  # byte-pair table: one 8-byte load per two weights
                    v0, v1 = _pair_table(words, b, t_ptr)
                else:
                    v0 = tl.load(t_ptr + ((words >> (8 * b + 4)) & 15))
                    v1 = tl.load(t_ptr + ((words >> (8 * b)) & 15))
            else:
                if BITS == 4:
                    v0 = _trick(words, 8 * b + 4, BITS)
                    v1 = _trick(words, 8 * b, BITS)
                else:
                    v0 = _trick(words, 16 * b, BITS)
                    v1 = _trick(words, 16 * b + 8, BITS)
            x0, x1 = _xpair(xi_ptr, xo + b, X_BF16)
            p0 += v0 * x0[None, :] + v1 * x1[None, :]
            X0 += x0 + x1
            if BM > 1:
                x0, x1 = _xpair(xi_ptr, sx2 + xo + b, X_BF16)
                p1 += v0 * x0[None, :] + v1 * x1[None, :]
                X1 += x0 + x1
            if BM > 2:
                x0, x1 = _xpair(xi_ptr, 2 * sx2 + xo + b, X_BF16)
                p2 += v0 * x0[None, :] + v1 * x1[None, :]
                X2 += x0 + x1
            if BM > 3:
                x0, x1 = _xpair(xi_ptr, 3 * sx2 + xo + b, X_BF16)
                p3 += v0 * x0[None, :] + v1 * x1[None, :]
                X3 += x0 + x1
        acc0 = _word_update(acc0, p0, X0, s, z, KIND, BITS, ZERO, SHFL)
        if BM > 1:
            acc1 = _word_update(acc1, p1, X1, s, z, KIND, BITS, ZERO, SHFL)
        if BM > 2:
            acc2 = _word_update(acc2, p2, X2, s, z, KIND, BITS, ZERO, SHFL)
        if BM > 3:
            acc3 = _word_update(acc3, p3, X3, s, z, KIND, BITS, ZERO, SHFL)
    r0 = tl.sum(acc0, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        r0 += bias
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_n
    ty = y_ptr.dtype.element_ty
    tl.store(yp, r0.to(ty), mask=nmask)
    if BM > 1:
        r1 = tl.sum(acc1, axis=1)
        if HAS_BIAS:
            r1 += bias
        tl.store(yp + N, r1.to(ty), mask=nmask)
    if BM > 2:
        r2 = tl.sum(acc2, axis=1)
        if HAS_BIAS:
            r2 += bias
        tl.store(yp + 2 * N, r2.to(ty), mask=nmask)
    if BM > 3:
        r3 = tl.sum(acc3, axis=1)
        if HAS_BIAS:
            r3 += bias
        tl.store(yp + 3 * N, r3.to(ty), mask=nmask)
    if FIX:
        # split-K without a second launch: y holds the float32 partials; the program that arrives last at this
        # N tile's counter (acq_rel atomic after a CTA barrier: every thread's partial store is ordered before it)
        # sums the partials in split order, writes the output in o's dtype and re-arms the counter (0 between
        # launches, so the buffers are reused as they are, CUDA-graph replays included)
        tl.debug_barrier()
        cnt = tl.atomic_add(c_ptr + pid_n, 1, sem="acq_rel")
        nsplit = tl.num_programs(1)
        if cnt == nsplit - 1:
            to = o_ptr.dtype.element_ty
            for mi in tl.static_range(BM):
                tot = tl.zeros((BN,), tl.float32)
                for i in range(0, nsplit):
                    tot += tl.load(y_ptr + (i * M + mi) * N + offs_n, mask=nmask, other=0.0,
                                   cache_modifier=".cg")
                tl.store(o_ptr + mi * N + offs_n, tot.to(to), mask=nmask)
            tl.atomic_xchg(c_ptr + pid_n, 0)


@triton.jit
def _qval(src, P: tl.constexpr, BITS: tl.constexpr, ZB: tl.constexpr, one):
    # (q - ZB) as an exact float32, q = the BITS-bit field of ``src`` at bit P (P + BITS <= 23), without a shift:
    # f = bitcast((src & (mask << P)) | one) = 1 + q 2**(P - 23) (one AND-OR: a single LOP3 when ``one``, the bits
    # of 1.0, sits in a register), then f 2**(23 - P) - (2**(23 - P) + ZB) = q - ZB exactly (one FFMA)
    MASK: tl.constexpr = ((1 << BITS) - 1) << P
    SC: tl.constexpr = (1 << (23 - P)) * 1.0
    OFF: tl.constexpr = SC + ZB
    f = ((src & MASK) | one).to(tl.float32, bitcast=True)
    return f * SC - OFF


@triton.jit
def _xpair2(xi_ptr, offs, X_BF16: tl.constexpr, X16: tl.constexpr):
    # activations (2i, 2i + 1) as float32: one 32-bit load (_xpair), or (X16) two 16-bit loads, which the loop
    # pipeliner leaves in registers (cp.async moves 4 bytes or more): the TMA configs keep their activation reads
    # as plain L1 loads instead of staging them through shared memory behind a barrier
    if X16:
        xh = xi_ptr.to(tl.pointer_type(tl.int16), bitcast=True) + 2 * offs
        x0 = tl.load(xh).to(tl.int32)
        x1 = tl.load(xh + 1).to(tl.int32)
        if X_BF16:
            x0 = (x0 << 16).to(tl.float32, bitcast=True)
            x1 = (x1 << 16).to(tl.float32, bitcast=True)
        else:
            x0 = x0.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x1 = x1.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x0, x1 = _xpair(xi_ptr, offs, X_BF16)
    return x0, x1


@triton.jit
def _qpair(p0, p1, p2, p3, X0, X1, X2, X3, va, vb, xi_ptr, off, sx2, BM: tl.constexpr, X_BF16: tl.constexpr,
           X16: tl.constexpr):
    # two elements of every word (code values va, vb) times activations (2i, 2i + 1) of each of the BM rows
    # (``off`` in int32 units): one FFMA per weight, accumulated right away (few values live at a time)
    xa, xb = _xpair2(xi_ptr, off, X_BF16, X16)
    p0 = p0 + va * xa[None, :]
    p0 = p0 + vb * xb[None, :]
    X0 = X0 + (xa + xb)
    if BM > 1:
        xa, xb = _xpair2(xi_ptr, sx2 + off, X_BF16, X16)
        p1 = p1 + va * xa[None, :]
        p1 = p1 + vb * xb[None, :]
        X1 = X1 + (xa + xb)
    if BM > 2:
        xa, xb = _xpair2(xi_ptr, 2 * sx2 + off, X_BF16, X16)
        p2 = p2 + va * xa[None, :]
        p2 = p2 + vb * xb[None, :]
        X2 = X2 + (xa + xb)
    if BM > 3:
        xa, xb = _xpair2(xi_ptr, 3 * sx2 + off, X_BF16, X16)
        p3 = p3 + va * xa[None, :]
        p3 = p3 + vb * xb[None, :]
        X3 = X3 + (xa + xb)
    return p0, p1, p2, p3, X0, X1, X2, X3


@triton.jit
def _qcode(words, u, E: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, SHFL: tl.constexpr,
           tv, t_ptr, one):
    # value of element E of every word: codebooks (kind 0, 4-bit: element 2b at bit 8b + 4, 2b + 1 at 8b) by warp
    # shuffle or the 16-entry table; integer codes exactly by _qval (kind 1: q - ZERO; kinds 2 / 3: q), 4-bit
    # elements 0-3 and 5 read in place from ``words``, 4, 6, 7 from u = words >> 12; 8-bit elements 0, 1 in place,
    # 2, 3 from u = words >> 16
    if KIND == 0:
        SH: tl.constexpr = 8 * (E // 2) + 4 * (1 - E % 2)
        if SHFL:
            if SH == 0:
                v = _shfl_lookup(tv, words)
            else:
                v = _shfl_lookup(tv, words >> SH)
        else:
            v = tl.load(t_ptr + ((words >> SH) & 15))
    else:
        ZB: tl.constexpr = ZERO if KIND == 1 else 0.0
        if BITS == 4:
            POS: tl.constexpr = 8 * (E // 2) + 4 * (1 - E % 2)
            if POS <= 16:
                v = _qval(words, POS, 4, ZB, one)
            else:
                v = _qval(u, POS - 12, 4, ZB, one)
        else:
            if E < 2:
                v = _qval(words, 8 * E, 8, ZB, one)
            else:
                v = _qval(u, 8 * E - 16, 8, ZB, one)
    return v


@triton.jit
def _qtile(acc0, acc1, acc2, acc3, words, s, z, xi_ptr, xo, sx2, tv, t_ptr, one,
           BITS: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, BM: tl.constexpr, X_BF16: tl.constexpr,
           SHFL: tl.constexpr, X16: tl.constexpr):
    # one [BN, WPG] word tile of one scale group, every activation row: p = sum_e v_e x_e per word, X = sum_e x_e
    # per word column, then acc += s p (kinds 0 / 1), s (p - z X) (kind 2), s p + z X (kind 3)
    PER: tl.constexpr = 32 // BITS
    if BITS == 4:
        u = words >> 12
    else:
        u = words >> 16
    p0 = tl.zeros(words.shape, tl.float32)
    p1 = p0
    p2 = p0
    p3 = p0
    X0 = tl.zeros(xo.shape, tl.float32)
    X1 = X0
    X2 = X0
    X3 = X0
    for b in tl.static_range(PER // 2):
        va = _qcode(words, u, 2 * b, BITS, KIND, ZERO, SHFL, tv, t_ptr, one)
        vb = _qcode(words, u, 2 * b + 1, BITS, KIND, ZERO, SHFL, tv, t_ptr, one)
        p0, p1, p2, p3, X0, X1, X2, X3 = _qpair(p0, p1, p2, p3, X0, X1, X2, X3, va, vb, xi_ptr, xo + b, sx2, BM,
                                                X_BF16, X16)
    acc0 = _word_update(acc0, p0, X0, s, z, KIND, BITS, ZERO, True)
    if BM > 1:
        acc1 = _word_update(acc1, p1, X1, s, z, KIND, BITS, ZERO, True)
    if BM > 2:
        acc2 = _word_update(acc2, p2, X2, s, z, KIND, BITS, ZERO, True)
    if BM > 3:
        acc3 = _word_update(acc3, p3, X3, s, z, KIND, BITS, ZERO, True)
    return acc0, acc1, acc2, acc3


@triton.jit
def _qload(w_ptr, wrow, n0, kwb, s_ptr, z_ptr, srow, ssg, PER: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr,
           TMA: tl.constexpr):
    # one sub-tile's words [BN, WPG] (a tensor-descriptor load where TMA) and its scales / zeros [BN, 1]
    if TMA:
        words = w_ptr.load([n0, kwb])
    else:
        words = tl.load(wrow + kwb)
    g = ((kwb * PER) // G).to(tl.int64) * ssg
    s = tl.load(s_ptr + g + srow)[:, None]
    if KIND >= 2:
        z = tl.load(z_ptr + g + srow).to(tl.float32)[:, None]
    else:
        z = s
    return words, s, z


@triton.jit(do_not_specialize=["M", "kw_split", "n_iter", "one"])
def _gemvq_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr, o_ptr, c_ptr,
    M, N, KW, NG, sxm, kw_split, n_iter, ssn, ssg, one,
    BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, WPG: tl.constexpr,
    PF: tl.constexpr, FIX: tl.constexpr, SHFL: tl.constexpr, TMA: tl.constexpr, LS: tl.constexpr,
    X16: tl.constexpr = False,
):
    # GEMV (M <= 4) stepping BKW words per row: GPS = BKW / WPG sub-tiles of WPG words, each inside one scale group
    # (several groups per step: more bytes in flight per program and longer runs per row). Integer codes decoded
    # exactly by _qval (about 1 integer op per weight instead of 3: no shift for five of eight nibbles, the AND-OR
    # one LOP3 with 1.0's bits in a register, ``one`` = 0x3F800000 passed at launch so it is not folded to an
    # immediate); codebooks by warp shuffles (SHFL) or the 16-entry table; one FFMA per weight. PF: register
    # prefetch of the next step's sub-tiles (PF = 2: of the next two steps, one sub-tile per step). X16: activations
    # read 16 bits at a time (kept out of the loop pipeliner's shared-memory staging). TMA: ``w_ptr`` is a tensor descriptor of the words ([N, KW], block
    # [BN, WPG]): the loop's loads go through the bulk copy engine into shared memory, ``num_stages`` deep (rows past
    # N read as zeros). Split-K partials summed in the kernel (FIX) as in _gemvg_kernel.
    PER: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER // 2
    GPS: tl.constexpr = BKW // WPG
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    nmask = offs_n < N
    offs_n = tl.where(nmask, offs_n, 0)
    kw = tl.arange(0, WPG)
    if TMA:
        wrow = w_ptr
    else:
        wrow = w_ptr + offs_n[:, None].to(tl.int64) * KW + kw[None, :]
    srow = offs_n.to(tl.int64) * ssn
    xi_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    sx2 = sxm // 2
    kw_lo = pid_k * kw_split
    acc0 = tl.zeros((BN, WPG), tl.float32)
    acc1 = tl.zeros((BN, WPG), tl.float32)
    acc2 = tl.zeros((BN, WPG), tl.float32)
    acc3 = tl.zeros((BN, WPG), tl.float32)
    if SHFL:
        tv = _lane_values(t_ptr, BN, WPG)
    else:
        tv = acc0
    if PF:
        wa_n, sa_n, za_n = _qload(w_ptr, wrow, n0, kw_lo, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
        if GPS > 1:
            wb_n, sb_n, zb_n = _qload(w_ptr, wrow, n0, kw_lo + WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
        if GPS > 2:
            wc_n, sc_n, zc_n = _qload(w_ptr, wrow, n0, kw_lo + 2 * WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
            wd_n, sd_n, zd_n = _qload(w_ptr, wrow, n0, kw_lo + 3 * WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
        if PF == 2:  # (one sub-tile per step) the step after next in the b slot
            wb_n, sb_n, zb_n = _qload(w_ptr, wrow, n0, kw_lo + tl.minimum(n_iter - 1, 1) * BKW, s_ptr, z_ptr, srow,
                                      ssg, PER, G, KIND, TMA)
    for it in tl.range(0, n_iter, num_stages=LS):
        kwb = kw_lo + it * BKW
        if PF == 2:  # two steps ahead: a <- next, next <- b, b <- load(it + 2) (clamped to the last step)
            wa, sa, za = wa_n, sa_n, za_n
            wa_n, sa_n, za_n = wb_n, sb_n, zb_n
            kwn = kw_lo + tl.minimum(it + 2, n_iter - 1) * BKW
            wb_n, sb_n, zb_n = _qload(w_ptr, wrow, n0, kwn, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
        elif PF:
            wa, sa, za = wa_n, sa_n, za_n
            kwn = kw_lo + tl.minimum(it + 1, n_iter - 1) * BKW  # the last step re-loads its own tiles
            wa_n, sa_n, za_n = _qload(w_ptr, wrow, n0, kwn, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
            if GPS > 1:
                wb, sb, zb = wb_n, sb_n, zb_n
                wb_n, sb_n, zb_n = _qload(w_ptr, wrow, n0, kwn + WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
            if GPS > 2:
                wc, sc, zc = wc_n, sc_n, zc_n
                wd, sd, zd = wd_n, sd_n, zd_n
                wc_n, sc_n, zc_n = _qload(w_ptr, wrow, n0, kwn + 2 * WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
                wd_n, sd_n, zd_n = _qload(w_ptr, wrow, n0, kwn + 3 * WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
        else:
            wa, sa, za = _qload(w_ptr, wrow, n0, kwb, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
            if GPS > 1:
                wb, sb, zb = _qload(w_ptr, wrow, n0, kwb + WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
            if GPS > 2:
                wc, sc, zc = _qload(w_ptr, wrow, n0, kwb + 2 * WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
                wd, sd, zd = _qload(w_ptr, wrow, n0, kwb + 3 * WPG, s_ptr, z_ptr, srow, ssg, PER, G, KIND, TMA)
        xo = (kwb + kw) * HALF
        acc0, acc1, acc2, acc3 = _qtile(acc0, acc1, acc2, acc3, wa, sa, za, xi_ptr, xo, sx2, tv, t_ptr, one,
                                        BITS, KIND, ZERO, BM, X_BF16, SHFL, X16)
        if GPS > 1:
            acc0, acc1, acc2, acc3 = _qtile(acc0, acc1, acc2, acc3, wb, sb, zb, xi_ptr, xo + WPG * HALF, sx2, tv,
                                            t_ptr, one, BITS, KIND, ZERO, BM, X_BF16, SHFL, X16)
        if GPS > 2:
            acc0, acc1, acc2, acc3 = _qtile(acc0, acc1, acc2, acc3, wc, sc, zc, xi_ptr, xo + 2 * WPG * HALF, sx2, tv,
                                            t_ptr, one, BITS, KIND, ZERO, BM, X_BF16, SHFL, X16)
            acc0, acc1, acc2, acc3 = _qtile(acc0, acc1, acc2, acc3, wd, sd, zd, xi_ptr, xo + 3 * WPG * HALF, sx2, tv,
                                            t_ptr, one, BITS, KIND, ZERO, BM, X_BF16, SHFL, X16)
    r0 = tl.sum(acc0, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        r0 += bias
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_n
    ty = y_ptr.dtype.element_ty
    tl.store(yp, r0.to(ty), mask=nmask)
    if BM > 1:
        r1 = tl.sum(acc1, axis=1)
        if HAS_BIAS:
            r1 += bias
        tl.store(yp + N, r1.to(ty), mask=nmask)
    if BM > 2:
        r2 = tl.sum(acc2, axis=1)
        if HAS_BIAS:
            r2 += bias
        tl.store(yp + 2 * N, r2.to(ty), mask=nmask)
    if BM > 3:
        r3 = tl.sum(acc3, axis=1)
        if HAS_BIAS:
            r3 += bias
        tl.store(yp + 3 * N, r3.to(ty), mask=nmask)
    if FIX:  # as _gemvg_kernel: the last program to arrive at this N tile sums the split partials
        tl.debug_barrier()
        cnt = tl.atomic_add(c_ptr + pid_n, 1, sem="acq_rel")
        nsplit = tl.num_programs(1)
        if cnt == nsplit - 1:
            to = o_ptr.dtype.element_ty
            for mi in tl.static_range(BM):
                tot = tl.zeros((BN,), tl.float32)
                for i in range(0, nsplit):
                    tot += tl.load(y_ptr + (i * M + mi) * N + offs_n, mask=nmask, other=0.0,
                                   cache_modifier=".cg")
                tl.store(o_ptr + mi * N + offs_n, tot.to(to), mask=nmask)
            tl.atomic_xchg(c_ptr + pid_n, 0)


@triton.jit
def _plane_weight(v, s, z, KIND: tl.constexpr, ZERO: tl.constexpr, ty: tl.constexpr):
    # the reference's element value, rounded once to the activation dtype
    if KIND == 0:
        w = v * s
    elif KIND == 1:
        w = (v - ZERO) * s
    elif KIND == 2:
        w = (v - z) * s
    else:
        w = v * s + z
    return w.to(ty)


@triton.jit
def _plane_dot(acc, xrow, xmask, kx, v, s, z, E: tl.constexpr, PER: tl.constexpr, KIND: tl.constexpr,
               ZERO: tl.constexpr):
    ty: tl.constexpr = xrow.dtype.element_ty
    w = _plane_weight(v, s, z, KIND, ZERO, ty)
    xe = tl.load(xrow + (kx * PER + E)[None, :], mask=xmask, other=0.0)
    return tl.dot(xe, tl.trans(w), acc)


@triton.jit(do_not_specialize=["M", "kw_split", "n_iter"])
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr,
    M, N, KW, NG, sxm, kw_split, n_iter,
    BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, GROUP_M: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    grp = pid // width
    first_m = grp * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    offs_nc = tl.where(nmask, offs_n, 0)
    kw = tl.arange(0, BKW)
    wrow = w_ptr + offs_nc[:, None].to(tl.int64) * KW + kw[None, :]
    srow = offs_nc[:, None].to(tl.int64) * NG
    xrow = x_ptr + offs_m[:, None].to(tl.int64) * sxm
    xmask = mmask[:, None]
    acc = tl.zeros((BM, BN), tl.float32)
    kw_lo = pid_k * kw_split
    for it in range(0, n_iter):
        kwb = kw_lo + it * BKW
        kx = kwb + kw
        words = tl.load(wrow + kwb)
        gi = srow + (kx // (G // PER))[None, :]
        s = tl.load(s_ptr + gi)
        if KIND >= 2:
            z = tl.load(z_ptr + gi).to(tl.float32)
        else:
            z = s
        for b in tl.static_range(PER // 2):
            if KIND == 0:
                v0, v1 = _pair_table(words, b, t_ptr)
            else:
                if BITS == 4:
                    v0 = _exact(words, 8 * b + 4, BITS)
                    v1 = _exact(words, 8 * b, BITS)
                else:
                    v0 = _exact(words, 16 * b, BITS)
                    v1 = _exact(words, 16 * b + 8, BITS)
            acc = _plane_dot(acc, xrow, xmask, kx, v0, s, z, 2 * b, PER, KIND, ZERO)
            acc = _plane_dot(acc, xrow, xmask, kx, v1, s, z, 2 * b + 1, PER, KIND, ZERO)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _reduce_kernel(ws_ptr, y_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for i in tl.static_range(1, SPLIT):
        acc += tl.load(ws_ptr + i * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side: a plan per (weight, M, dtype, bias) computed once, then a direct launch


def split_words(KW: int, BKW: int, split_k: int):
    """``(split, words per split)`` with every split a whole number of ``BKW`` steps (``KW % BKW == 0``)."""
    steps = KW // BKW
    s = max(1, min(split_k, steps))
    while steps % s:
        s -= 1
    return s, (steps // s) * BKW


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index)


class Plan:
    """One launch shape of one weight: kernel, grid, constexprs, the compiled kernels once known, and the
    float32 split-K workspace per stream (reused: the kernel overwrites all of it before the reduction)."""

    __slots__ = ("fn", "grid", "split", "kw_split", "n_iter", "consts", "cvals", "warps", "stages", "compiled",
                 "reduce", "gemm", "ws", "rgrid", "rconsts", "tr", "pair", "fix", "tsc", "q", "tma", "descs", "alt")
    run = None  # the v1 plans of lowbit.kernels.linear carry a run method; this one goes through run_plan
    tc = False  # (TcPlan: True)

    def __init__(self, fn, grid, split, kw_split, n_iter, consts, warps, stages, gemm):
        self.fn, self.grid, self.split, self.kw_split, self.n_iter = fn, grid, split, kw_split, n_iter
        self.consts, self.warps, self.stages, self.gemm = consts, warps, stages, gemm
        self.cvals = tuple(consts.values())
        self.compiled = None
        self.reduce = None
        self.ws = {}
        self.rgrid = None
        self.rconsts = None
        self.q = fn is _gemvq_kernel  # the multi-group GEMV (the arguments of _gemvg_kernel + ``one``)
        self.tr = fn is _gemvg_kernel or self.q  # group-step GEMVs (scale strides, output + counters, 16-entry table)
        self.tma = bool(consts.get("TMA", False))  # words through a tensor descriptor (built per words tensor)
        self.descs = {}
        self.alt = None  # (TMA) the same config through plain loads, for words not 16-byte aligned
        self.pair = bool(consts.get("PAIRT", False))  # ... or the byte-pair table (``table2``)
        self.fix = bool(consts.get("FIX", False))  # split-K partials summed in-kernel (no reduction launch)
        self.tsc = False  # scales / zeros read from a transposed [K / G, N] copy (else the state's [N, K / G])


def shuffle_supported() -> bool:
    """Whether the warp-shuffle codebook lookup (inline PTX) can run: NVIDIA GPUs, not Triton's CPU interpreter
    (``TRITON_INTERPRET=1``) nor ROCm; elsewhere "s" configs read the 16-entry table from memory instead."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") != "1" and not getattr(torch.version, "hip", None)


def is_gemvg(name: str) -> bool:
    """Whether ``name`` is a group-step GEMV config name: "gemvg" + any of the suffix letters p, s, f, t."""
    return name.startswith("gemvg") and set(name[5:]) <= set("psft") and not ("p" in name[5:] and "s" in name[5:])


def is_gemvq(name: str) -> bool:
    """Whether ``name`` is a multi-group GEMV config name: "gemvq" + any of the suffix letters s (codebook held in
    registers, read by warp shuffles), f (register prefetch of the next step; ff: of the next two steps, one scale
    group sub-tile per step), m (tensor-descriptor (TMA) loads of the words; not with f), x (activations read 16 bits
    at a time, kept out of the pipeliner's shared-memory staging). A gemvq config's ``stages`` is the software-pipelining depth of its loop (``tl.range(num_stages=)``):
    1 = none; above 1 the loads run stages - 1 steps ahead through shared memory (TMA for "m", cp.async else)."""
    sfx = name[5:]
    return (name.startswith("gemvq") and set(sfx) <= set("sfmx") and not ("f" in sfx and "m" in sfx)
            and sfx.count("f") <= 2 and all(sfx.count(c) <= 1 for c in "smx"))


def gemvq_tiles(KW: int, G: int, per: int, BKW: int):
    """``(BKW, WPG)`` of a multi-group GEMV step: WPG words per sub-tile (a power of two dividing the words of a
    scale group, at most BKW), 1, 2 or 4 sub-tiles per step, and the step dividing the row's KW words."""
    wg = G // per
    wpg = 1
    while wpg * 2 <= min(BKW, wg) and wg % (wpg * 2) == 0 and KW % (wpg * 2) == 0:
        wpg *= 2
    gps = 4 if BKW >= 4 * wpg else (2 if BKW >= 2 * wpg else 1)
    while gps > 1 and KW % (gps * wpg):
        gps //= 2
    return gps * wpg, wpg


def _make_gemvq(M, N, K, bits, G, kind, zero, x_dtype, has_bias, config) -> Plan:
    suffix = config[0][len("gemvq"):]
    shfl, pf, tma, x16 = "s" in suffix, suffix.count("f"), "m" in suffix, "x" in suffix
    if kind == 0 and bits != 4:
        raise ValueError(f"{config[0]}: codebooks are 4-bit; got bits={bits}")
    if shfl and kind != 0:
        raise ValueError(f"{config[0]}: suffix s (shuffle codebook) is for codebooks only (kind 0); got kind={kind}")
    if shfl and not shuffle_supported():  # the 16-entry table read from memory instead (same results)
        shfl = False
    _, BN, BKW, split_k, warps, stages = config
    per = 32 // bits
    KW = K // per
    BKW, WPG = gemvq_tiles(KW, G, per, BKW)
    if tma and (KW % 4 or WPG < TMA_MIN_WORDS or BN > 256):
        # TMA needs 16-byte rows; below 16-word (64-byte) boxes it measured slower than register prefetch on the
        # H200 (GGUF Q4_0, 4 words: 120.6 vs 97.0 us; NF4 b64, 8 words: 83.7 vs 78.3 us at 28672 x 8192, run 7 of
        # bench/results/gemv_sweep.md): such weights take the config's plain-load twin (register prefetch, no
        # pipelining), so that one table row serves every group size of its class
        return _make_gemvq(M, N, K, bits, G, kind, zero, x_dtype, has_bias, _plain_twin(config))
    if pf == 2:  # two steps ahead: one sub-tile per step
        BKW = WPG
    split, kw_split = split_words(KW, BKW, split_k)
    consts = dict(BITS=bits, G=G, KIND=kind, ZERO=float(zero), HAS_BIAS=has_bias, X_BF16=x_dtype == torch.bfloat16,
                  BM=M, BN=BN, BKW=BKW, WPG=WPG, PF=pf, FIX=split > 1, SHFL=shfl, TMA=tma, LS=max(1, stages),
                  X16=x16)
    plan = Plan(_gemvq_kernel, (-(-N // BN), split), split, kw_split, kw_split // BKW, consts, warps, stages, False)
    if tma:  # for words that are not 16-byte aligned
        plan.alt = _make_gemvq(M, N, K, bits, G, kind, zero, x_dtype, has_bias, _plain_twin(config))
    return plan


TMA_MIN_WORDS = 16  # smallest sub-tile row (32-bit words) that a "gemvq...m" config reads through TMA


def _plain_twin(config):
    """The TMA config ``config`` ("gemvq...m") as register prefetch through plain loads ("f", no pipelining)."""
    sfx = config[0][len("gemvq"):].replace("m", "")
    return ("gemvq" + sfx + ("" if "f" in sfx else "f"),) + tuple(config[1:5]) + (1,)


def make_plan(M, N, K, bits, G, kind, zero, x_dtype, has_bias, config) -> Plan:
    """``config``: GEMV ``("gemv" | "gemvg<suffix>", BN, BKW, split_k, warps, stages)`` (M <= 4; "gemvg" = the
    group-step GEMV; suffix letters: "p" a codebook read through the byte-pair table, "s" a codebook held in
    registers and read by warp shuffles, "f" register prefetch of the next step's words and scales, "t" scales /
    zeros read from a transposed copy; e.g. "gemvgsf") or GEMM ``("gemm", BM, BN, BKW, split_k, warps, stages)``."""
    if is_gemvq(config[0]):
        return _make_gemvq(M, N, K, bits, G, kind, zero, x_dtype, has_bias, config)
    per = 32 // bits
    KW = K // per
    pair = pf = shfl = tsc = False
    if is_gemvg(config[0]):
        suffix = config[0][len("gemvg"):]
        pair, pf, shfl, tsc = "p" in suffix, "f" in suffix, "s" in suffix, "t" in suffix
        if (pair and kind != 0) or ((pair or shfl) and bits != 4):
            raise ValueError(f"{config[0]} reads a 4-bit table (suffix p: codebooks only); got bits={bits}, "
                             f"kind={kind}")
        if shfl and not shuffle_supported():  # the same config reading the table from memory (same results)
            shfl = False
        config = ("gemvg",) + tuple(config[1:])
    if config[0] in ("gemv", "gemvg"):
        _, BN, BKW, split_k, warps, stages = config
        BM = M
    else:
        _, BM, BN, BKW, split_k, warps, stages = config
    BKW = min(BKW, KW)
    while KW % BKW or (config[0] == "gemvg" and G % (BKW * per)):
        BKW //= 2
    split, kw_split = split_words(KW, BKW, split_k)
    consts = dict(BITS=bits, G=G, KIND=kind, ZERO=float(zero), HAS_BIAS=has_bias)
    if config[0] in ("gemv", "gemvg"):
        consts.update(X_BF16=x_dtype == torch.bfloat16, BM=M, BN=BN, BKW=BKW)
        if config[0] == "gemvg":  # every constexpr explicit, in signature order: the direct launch passes cvals
            consts.update(PAIRT=pair, PF=pf, FIX=split > 1, SHFL=shfl)
        plan = Plan(_gemv_kernel if config[0] == "gemv" else _gemvg_kernel, (-(-N // BN), split), split, kw_split,
                    kw_split // BKW, consts, warps, stages, False)
        plan.tsc = tsc
    else:
        consts.update(BM=BM, BN=BN, BKW=BKW, GROUP_M=8)
        plan = Plan(_gemm_kernel, (-(-M // BM) * -(-N // BN), split), split, kw_split, kw_split // BKW, consts,
                    warps, stages, True)
    if split > 1:
        plan.rgrid = (-(-(M * N) // 1024), 1)
        plan.rconsts = dict(SPLIT=split, BLOCK=1024)
    return plan


def _launch(fn, compiled, grid, args, consts, cvals, warps, stages, stream):
    """First call through Triton's launcher (compiles); later calls straight into the compiled kernel."""
    if compiled is None:
        ck = fn[grid](*args, **consts, num_warps=warps, num_stages=stages)
        return ck if hasattr(ck, "run") and hasattr(ck, "packed_metadata") else None
    enter = _knobs.runtime.launch_enter_hook
    full = args + cvals
    meta = compiled.launch_metadata(grid, stream, *full) if enter is not None else None
    compiled.run(grid[0], grid[1], grid[2] if len(grid) > 2 else 1, stream, compiled.function, compiled.packed_metadata, meta, enter,
                 _knobs.runtime.launch_exit_hook, *full)
    return compiled


try:
    from triton import knobs as _knobs
except ImportError:  # older Triton: no direct launches (every call through the launcher)
    _knobs = None


def _split_workspace(plan, stream, M: int, N: int, dev, counters: int):
    """``(partial sums float32 [split, M, N], arrival counters int32 [counters] or None)`` of a split-K launch: the
    in-kernel fixup's per-tile counters start at zero and the kernel re-arms them, so a compiled plan keeps one
    pair per stream (reused by every call, CUDA-graph replays included); the first call (which compiles) gets a
    fresh pair."""
    got = plan.ws.get(stream)
    if got is not None and plan.compiled is not None:
        return got
    y = torch.empty((plan.split, M, N), dtype=torch.float32, device=dev)
    cnt = torch.zeros(counters, dtype=torch.int32, device=dev) if counters else None
    if plan.compiled is not None:
        plan.ws[stream] = (y, cnt)
    return y, cnt


def _descriptor(plan: Plan, words, N: int, KW: int):
    """The host tensor descriptor of ``words`` ([N, KW] int32, block [BN, WPG]) for a TMA plan, cached per words
    tensor; None where the words are not 16-byte aligned (TMA's requirement)."""
    ptr = words.data_ptr()
    got = plan.descs.get(ptr)
    if got is not None and got.base is words:
        return got
    if ptr % 16 or words.stride(0) != KW or words.stride(1) != 1:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    got = TensorDescriptor(words, [N, KW], [KW, 1], [plan.consts["BN"], plan.consts["WPG"]])
    if len(plan.descs) > 16:
        plan.descs.clear()
    plan.descs[ptr] = got
    return got


def run_plan(plan: Plan, x2, words, scales, zeros, table, bias, N, K, NG, per):
    """Launch ``plan`` on ``x2 [M, K]`` (unit stride along K, even row stride) -> ``[M, N]`` in x's dtype.
    ``scales`` / ``zeros``: ``[N, NG]``, or ``[NG, N]`` where ``plan.tsc``."""
    M = x2.shape[0]
    dev = x2.device
    stream = _stream(dev) if plan.compiled is not None else 0
    out = torch.empty((M, N), dtype=x2.dtype, device=dev)
    y, cnt = (out, None) if plan.split == 1 else _split_workspace(plan, stream, M, N, dev,
                                                                     plan.grid[0] if plan.fix else 0)
    z = zeros if zeros is not None else scales
    t = table if table is not None else scales
    b = bias if bias is not None else scales
    if plan.tr:  # the group-step GEMV also takes the output and the counters (fixup; unused without a split)
        ssn, ssg = (1, N) if plan.tsc else (NG, 1)
        w = words
        if plan.tma:
            w = _descriptor(plan, words, N, K // per)
            if w is None:  # not 16-byte aligned: the config's plain-load twin (register prefetch)
                return run_plan(plan.alt, x2, words, scales, zeros, table, bias, N, K, NG, per)
        args = (x2, w, scales, z, t, b, y, out, cnt if cnt is not None else scales, M, N, K // per, NG,
                x2.stride(0), plan.kw_split, plan.n_iter, ssn, ssg)
        if plan.q:
            args = args + (0x3F800000,)  # the bits of 1.0 (a runtime value, kept in a register)
    else:
        args = (x2, words, scales, z, t, b, y, M, N, K // per, NG, x2.stride(0), plan.kw_split, plan.n_iter)
    ck = _launch(plan.fn, plan.compiled, plan.grid, args, plan.consts, plan.cvals, plan.warps, plan.stages, stream)
    if plan.compiled is None and _knobs is not None:
        plan.compiled = ck
    if plan.split > 1 and not plan.fix:
        rk = _launch(_reduce_kernel, plan.reduce, plan.rgrid, (y, out, M * N), plan.rconsts,
                     (plan.split, 1024), 4, 1, stream)
        if plan.reduce is None and _knobs is not None:
            plan.reduce = rk
    return out


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, t_ptr, out_ptr, N, KW, NG,
                    BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr,
                    BN: tl.constexpr, BKW: tl.constexpr):
    # the whole weight [N, K] in out's dtype (for large M: dequantize once per call, then cuBLAS)
    PER: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_nc = tl.where(nmask, offs_n, 0)
    kx = tl.program_id(1) * BKW + tl.arange(0, BKW)
    words = tl.load(w_ptr + offs_nc[:, None].to(tl.int64) * KW + kx[None, :])
    gi = offs_nc[:, None].to(tl.int64) * NG + (kx // (G // PER))[None, :]
    s = tl.load(s_ptr + gi)
    if KIND >= 2:
        z = tl.load(z_ptr + gi).to(tl.float32)
    else:
        z = s
    ty: tl.constexpr = out_ptr.dtype.element_ty
    orow = out_ptr + offs_nc[:, None].to(tl.int64) * (KW * PER) + (kx * PER)[None, :]
    for b in tl.static_range(PER // 2):
        if KIND == 0:
            v0, v1 = _pair_table(words, b, t_ptr)
        else:
            if BITS == 4:
                v0 = _exact(words, 8 * b + 4, BITS)
                v1 = _exact(words, 8 * b, BITS)
            else:
                v0 = _exact(words, 16 * b, BITS)
                v1 = _exact(words, 16 * b + 8, BITS)
        tl.store(orow + 2 * b, _plane_weight(v0, s, z, KIND, ZERO, ty), mask=nmask[:, None])
        tl.store(orow + 2 * b + 1, _plane_weight(v1, s, z, KIND, ZERO, ty), mask=nmask[:, None])


def dequantize(words, scales, zeros, table, N, K, NG, bits, G, kind, zero, dtype):
    """The weight ``[N, K]`` in ``dtype`` from the word layout (values as the reference, rounded once)."""
    per = 32 // bits
    KW = K // per
    BKW = 32
    while KW % BKW:
        BKW //= 2
    out = torch.empty((N, K), dtype=dtype, device=words.device)
    z = zeros if zeros is not None else scales
    t = table if table is not None else scales
    _dequant_kernel[(triton.cdiv(N, 32), KW // BKW)](words, scales, z, t, out, N, KW, NG, BITS=bits, G=G,
                                                     KIND=kind, ZERO=float(zero), BN=32, BKW=BKW, num_warps=4)
    return out


@triton.jit
def _dequant_bytes_kernel(b_ptr, s_ptr, z_ptr, t_ptr, out_ptr, N, K, NG,
                          BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr):
    # the whole weight [N, K] in out's dtype, written row-contiguous (coalesced stores): 8-bit codes one byte per
    # element; 4-bit bytes split into the high (even element) and low nibble, the two halves interleaved back into
    # K order in registers (join + reshape). Element values as _plane_weight (the reference's, rounded once).
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_nc = tl.where(nmask, offs_n, 0).to(tl.int64)
    ty: tl.constexpr = out_ptr.dtype.element_ty
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    kmask = k < K
    if BITS == 8:
        q = tl.load(b_ptr + offs_nc[:, None] * K + k[None, :], mask=kmask[None, :], other=0).to(tl.int32)
        v = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        gi = offs_nc[:, None] * NG + (k // G)[None, :]
        s = tl.load(s_ptr + gi, mask=kmask[None, :], other=0.0)
        if KIND >= 2:
            z = tl.load(z_ptr + gi, mask=kmask[None, :], other=0).to(tl.float32)
        else:
            z = s
        w = _plane_weight(v, s, z, KIND, ZERO, ty)
    else:
        HB: tl.constexpr = BK // 2
        j = tl.program_id(1) * HB + tl.arange(0, HB)
        jmask = j < K // 2
        b = tl.load(b_ptr + offs_nc[:, None] * (K // 2) + j[None, :], mask=jmask[None, :], other=0).to(tl.int32)
        hi = (b >> 4) & 15
        lo = b & 15
        if KIND == 0:
            vh = tl.load(t_ptr + hi)
            vl = tl.load(t_ptr + lo)
        else:
            vh = (hi | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            vl = (lo | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        gi = offs_nc[:, None] * NG + ((2 * j) // G)[None, :]  # G is even: both nibbles of a byte share a group
        s = tl.load(s_ptr + gi, mask=jmask[None, :], other=0.0)
        if KIND >= 2:
            z = tl.load(z_ptr + gi, mask=jmask[None, :], other=0).to(tl.float32)
        else:
            z = s
        wh = _plane_weight(vh, s, z, KIND, ZERO, ty)
        wl = _plane_weight(vl, s, z, KIND, ZERO, ty)
        w = tl.reshape(tl.join(wh, wl), (BN, BK))
    tl.store(out_ptr + offs_nc[:, None] * K + k[None, :], w, mask=nmask[:, None] & kmask[None, :])


def dequantize_rows(wbytes, scales, zeros, table, N, K, NG, bits, G, kind, zero, dtype, cache=None):
    """The weight ``[N, K]`` in ``dtype`` from the canonical bytes ``wbytes`` (uint8 ``[N, K * bits / 8]``; a
    byte view of the word layout), values as the reference rounded once, written row-contiguous. ``cache``
    (a dict kept with the weight) holds the compiled kernel per dtype: later calls launch it directly."""
    out = torch.empty((N, K), dtype=dtype, device=wbytes.device)
    BN, BK = 16, 256
    grid = (triton.cdiv(N, BN), triton.cdiv(K, BK))
    z = zeros if zeros is not None else scales
    t = table if table is not None else scales
    consts = dict(BITS=bits, G=G, KIND=kind, ZERO=float(zero), BN=BN, BK=BK)
    ck = cache.get(dtype) if cache is not None else None
    stream = _stream(wbytes.device) if ck is not None else 0
    got = _launch(_dequant_bytes_kernel, ck, grid, (wbytes, scales, z, t, out, N, K, NG), consts,
                  tuple(consts.values()), 4, 1, stream)
    if ck is None and cache is not None and _knobs is not None and got is not None:
        cache[dtype] = got
    return out


# ---------------------------------------------------------------------------------------------
# "tc": tensor-core GEMM for 4 < M <= a few hundred rows (issue 15, helper kern4)


@triton.jit(do_not_specialize=["M", "kw_split", "n_iter"])
def _tc_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, b_ptr, y_ptr, o_ptr, c_ptr,
    M, N, KW, NG, sxm, kw_split, n_iter,
    BITS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SHFL: tl.constexpr, FIX: tl.constexpr,
    TASM: tl.constexpr = "", ASM: tl.constexpr = False, PASM: tl.constexpr = "",
    MAG: tl.constexpr = 128.0, ONEDOT: tl.constexpr = False,
):
    # Computes the transposed output tile acc[n, m] = sum_k W[n, k] x[m, k] (the weight is the MMA's A operand,
    # held in registers: wgmma takes A from registers, B = the activation tile from shared memory; a weight tile
    # of BN >= 64 rows fills the instruction's M even when the activations have 16 rows). K walked in planes as
    # the GEMV: plane e of a [BN, BKW] word tile is K index PER * kw + e, dequantised in place (the reference's
    # value, rounded once to the activation dtype) and multiplied with the matching strided x plane [BKW, BM].
    # Every dequantisation op is elementwise on the word tile (NF4 / FP4: a unary inline-asm warp shuffle, TASM),
    # so Triton converts the packed words (not the bf16 weights) to the MMA operand layout once per step.
    # Configs "tcb" / "tcbd" (issue 15, helper tc5). PASM (4-bit kinds; codebooks: packed_table_asm): the 8 planes
    # of two neighbouring words dequantized by one inline-PTX op on packed pairs (pack=2: the MMA operand holds the
    # K-neighbours kw, kw + 1 in one 32-bit register); integer codes: per plane one lop3 puts both nibbles under
    # the activation dtype's magic exponent (bf16 128 + q / fp16 1024 + q, exact), one packed FMA subtracts
    # magic + zero, one multiplies by the scale in the activation dtype (kind 3: one FMA adds the minimum), about
    # 2 SASS instructions per weight where the float32 path spends 4.5. ONEDOT ("tcbd"): the 8 planes joined into
    # one [BN, 8 BKW] operand (a register renaming: plane e is the e-th K16 chunk, matching x's plane-major order)
    # and ONE tl.dot per step, so that Triton keeps up to 7 wgmma groups in flight (warp_group_dot_wait
    # pendings = 7) instead of waiting for each plane's. tcbd is not selected by default: one variant gave wrong
    # results under load on the H200 (int4 g32 sym on 28672 x 8192; see packed_ok), cause not found.
    PER: tl.constexpr = 32 // BITS
    ONE: tl.constexpr = G % (BKW * PER) == 0  # one scale group per row and step: one scale per row
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_nc = tl.where(nmask, offs_n, 0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < M
    offs_mc = tl.where(mmask, offs_m, 0)  # clamped rows: loads need no mask (their outputs are not stored)
    kw = tl.arange(0, BKW)
    wrow = w_ptr + offs_nc[:, None].to(tl.int64) * KW + kw[None, :]
    xcol = x_ptr + offs_mc[None, :].to(tl.int64) * sxm
    srow = offs_nc.to(tl.int64) * NG
    ty: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros((BN, BM), tl.float32)
    kw_lo = tl.multiple_of(pid_k * kw_split, BKW)
    if ONE and KIND >= 2:  # zero points (uint8: too narrow for the async copies) prefetched a step ahead
        z_n = tl.load(z_ptr + srow + (kw_lo * PER) // G)
    for it in range(0, n_iter):
        kwb = tl.multiple_of(kw_lo + it * BKW, BKW)  # split boundaries are whole steps: aligned vector loads
        words = tl.load(wrow + kwb)
        if ONE:
            g = (kwb * PER) // G
            s = tl.load(s_ptr + srow + g)[:, None]
            if KIND >= 2:
                z = z_n.to(tl.float32)[:, None]
                z_n = tl.load(z_ptr + srow + ((kw_lo + tl.minimum(it + 1, n_iter - 1) * BKW) * PER) // G)
            else:
                z = s
        elif PASM != "" and (BKW * PER) % G == 0:
            # "tcb", several whole groups per step: a [BN, groups] tile of scales (zeros) widened to the word tile by
            # broadcast + reshape (Triton keeps it in the MMA operand layout; the per-word gather below costs a
            # 4-byte async copy per word and twice the shared memory)
            NGS: tl.constexpr = (BKW * PER) // G
            g0 = (kwb * PER) // G
            gt = srow[:, None] + g0 + tl.arange(0, NGS)[None, :]
            s = tl.reshape(tl.broadcast_to(tl.load(s_ptr + gt)[:, :, None], (BN, NGS, BKW // NGS)), (BN, BKW))
            if KIND >= 2:
                z = tl.reshape(tl.broadcast_to(tl.load(z_ptr + gt).to(tl.float32)[:, :, None], (BN, NGS, BKW // NGS)),
                               (BN, BKW))
            else:
                z = s
        else:
            gi = srow[:, None] + ((kwb + kw) // (G // PER))[None, :]
            s = tl.load(s_ptr + gi)
            if KIND >= 2:
                z = tl.load(z_ptr + gi).to(tl.float32)
            else:
                z = s
        SC: tl.constexpr = 1 << BITS
        # integer codes as f = 1 + q / 2**BITS (a shift and one and-or per weight: with ASM a unary inline-PTX lop3,
        # so that ptxas keeps the two constants in registers and Triton still hoists the layout conversion above
        # it; plain Triton ops elsewhere, e.g. in the interpreter), then one FMA per weight:
        # f (SC s) - (1 + z / SC) (SC s) = (q - z) s up to float32 rounding of the per-row bias (kind 3: + m)
        if KIND == 0:
            s16 = s
        else:
            s16 = s * SC
        if KIND == 1:
            bb = -(1.0 + ZERO / SC) * s16
        elif KIND == 2:
            bb = -(1.0 + z * (1.0 / SC)) * s16
        elif KIND == 3:
            bb = z - s16
        else:
            bb = s16
        kx = kwb * PER + kw  # x is plane-major per step (run_tc): plane e of this step at kx + e * BKW
        if PASM != "":  # packed pairs (4-bit kinds): the 8 planes from one inline-PTX op per word pair
            # MAG: the magic number of the activation dtype (make_tc_plan); cp: -(MAG + zero) (kinds 1, 2) or the
            # minimum (kind 3), both rounded to the activation dtype (exact for integer zeros); kind 0: unused
            sp = tl.broadcast_to(s.to(ty), (BN, BKW))
            if KIND == 0:
                cp = sp
            elif KIND == 1:
                cp = tl.full((BN, BKW), -(MAG + ZERO), tl.float32).to(ty)
            elif KIND == 2:
                cp = tl.broadcast_to((-(z + MAG)).to(ty), (BN, BKW))
            else:
                cp = tl.broadcast_to(z.to(ty), (BN, BKW))
            tyd = x_ptr.dtype.element_ty
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                PASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, sp, cp],
                dtype=(tyd, tyd, tyd, tyd, tyd, tyd, tyd, tyd), is_pure=True, pack=2)
            if ONEDOT:  # the 8 planes as one [BN, 8 BKW] operand (K index e * BKW + kw: x's plane-major order)
                j3 = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
                wall = tl.reshape(tl.permute(j3, (0, 2, 3, 4, 1)), (BN, 8 * BKW))
                acc = tl.dot(wall, tl.load(xcol + (kwb * PER + tl.arange(0, 8 * BKW))[:, None]), acc)
            else:
                acc = tl.dot(w0, tl.load(xcol + (kx + 0 * BKW)[:, None]), acc)
                acc = tl.dot(w1, tl.load(xcol + (kx + 1 * BKW)[:, None]), acc)
                acc = tl.dot(w2, tl.load(xcol + (kx + 2 * BKW)[:, None]), acc)
                acc = tl.dot(w3, tl.load(xcol + (kx + 3 * BKW)[:, None]), acc)
                acc = tl.dot(w4, tl.load(xcol + (kx + 4 * BKW)[:, None]), acc)
                acc = tl.dot(w5, tl.load(xcol + (kx + 5 * BKW)[:, None]), acc)
                acc = tl.dot(w6, tl.load(xcol + (kx + 6 * BKW)[:, None]), acc)
                acc = tl.dot(w7, tl.load(xcol + (kx + 7 * BKW)[:, None]), acc)
        for e in tl.static_range(PER if PASM == "" else 0):
            POS = 8 * (e // 2) + 4 * (1 - e % 2) if BITS == 4 else 8 * e
            if SHFL:
                v = tl.inline_asm_elementwise(TASM, "=r,r", [words >> POS], dtype=tl.int32, is_pure=True,
                                              pack=1).to(tl.float32, bitcast=True)
                w = (v * s16).to(ty)
            elif KIND == 0:
                v = tl.load(t_ptr + ((words >> POS) & 15))
                w = (v * s16).to(ty)
            else:
                TB = 23 - BITS
                if POS <= TB:
                    t = words << (TB - POS)
                else:
                    t = words >> (POS - TB)
                if ASM:
                    if BITS == 4:
                        f = tl.inline_asm_elementwise(
                            "{ .reg .b32 m, o; mov.b32 m, 0x00780000; mov.b32 o, 0x3F800000; "
                            "lop3.b32 $0, $1, m, o, 0xEA; }", "=r,r", [t], dtype=tl.int32, is_pure=True, pack=1)
                    else:
                        f = tl.inline_asm_elementwise(
                            "{ .reg .b32 m, o; mov.b32 m, 0x007F8000; mov.b32 o, 0x3F800000; "
                            "lop3.b32 $0, $1, m, o, 0xEA; }", "=r,r", [t], dtype=tl.int32, is_pure=True, pack=1)
                    f = f.to(tl.float32, bitcast=True)
                else:
                    MASK: tl.constexpr = ((1 << BITS) - 1) << TB
                    f = ((t & MASK) | 0x3F800000).to(tl.float32, bitcast=True)
                w = (f * s16 + bb).to(ty)
            xe = tl.load(xcol + (kx + e * BKW)[:, None])
            acc = tl.dot(w, xe, acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_nc, mask=nmask & (pid_k == 0), other=0.0).to(tl.float32)
        acc += bias[:, None]
    omask = nmask[:, None] & mmask[None, :]
    orow = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    if FIX:
        # split-K in one launch (as _gemvg_kernel): float32 partials, the last program to arrive at this tile's
        # counter sums them in split order, writes the output and re-arms the counter
        yp = y_ptr + pid_k.to(tl.int64) * M * N + orow
        tl.store(yp, acc, mask=omask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        cnt = tl.atomic_add(c_ptr + tile, 1, sem="acq_rel")
        nsplit = tl.num_programs(2)
        if cnt == nsplit - 1:
            tot = tl.zeros((BN, BM), tl.float32)
            for i in range(0, nsplit):
                tot += tl.load(y_ptr + i * M * N + orow, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(o_ptr + orow, tot.to(o_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(c_ptr + tile, 0)
    else:
        tl.store(o_ptr + orow, acc.to(o_ptr.dtype.element_ty), mask=omask)


class TcPlan:
    """Launch of :func:`_tc_kernel` for one weight shape, M, dtype and bias (computed once, then direct launches)."""

    __slots__ = ("grid", "split", "kw_split", "n_iter", "consts", "cvals", "warps", "stages", "compiled", "ws",
                 "shfl", "pdt")
    run = None
    tr = False
    tc = True

    def __init__(self, grid, split, kw_split, n_iter, consts, warps, stages):
        self.grid, self.split, self.kw_split, self.n_iter = grid, split, kw_split, n_iter
        self.consts, self.warps, self.stages = consts, warps, stages
        self.cvals = tuple(consts.values())
        self.compiled = None
        self.ws = {}
        self.shfl = bool(consts["SHFL"])
        # the activation dtype a packed-pair ("tcb") plan was built for (its magic number and PTX), else None
        self.pdt = (torch.bfloat16 if consts["MAG"] == 128.0 else torch.float16) if consts.get("PASM") else None


def table_asm(table) -> str:
    """PTX of a unary 16-entry lookup by warp shuffle with the table's float32 values as immediates: each lane
    selects ``table[laneid % 16]`` (loop-invariant: computed once per kernel after ptxas' common-subexpression
    elimination), then ``shfl.idx`` by the code (low 5 bits read; lanes 16-31 hold the same table). Unary, so
    Triton hoists layout conversions above it (binary inline asm is not)."""
    bits = torch.as_tensor(table, dtype=torch.float32).reshape(-1).cpu().view(torch.int32).tolist()
    if len(bits) != 16:
        raise ValueError(f"table_asm needs a 16-entry table, got {len(bits)}")
    imm = [f"0x{b & 0xFFFFFFFF:08X}" for b in bits]
    lines = ["{", ".reg .u32 l;", ".reg .b32 t;", ".reg .pred p;", "mov.u32 l, %laneid;", "and.b32 l, l, 15;",
             f"mov.b32 t, {imm[0]};"]
    for i in range(1, 16):
        lines += [f"setp.eq.u32 p, l, {i};", f"selp.b32 t, {imm[i]}, t, p;"]
    lines += ["shfl.sync.idx.b32 $0, t, $1, 31, 0xffffffff;", "}"]
    return " ".join(lines)


def packed_table_asm(table, bf16: bool) -> str:
    """PTX of the "tcb" codebook lookup (NF4 / FP4) on two neighbouring words ``$8`` (K index kw), ``$9`` (kw + 1):
    per plane one warp shuffle per weight from the 16-entry table held in registers (as :func:`table_asm`), the two
    float32 values packed into one pair of the activation dtype by one ``cvt.rn`` and multiplied by the scale pair
    ``$10`` (rounded to the activation dtype) by one packed ``fma.rn``: 6 instructions per 2 weights where the
    float32 path spends 7 (a weight can differ from the reference's by about one unit of its last place)."""
    bits = torch.as_tensor(table, dtype=torch.float32).reshape(-1).cpu().view(torch.int32).tolist()
    if len(bits) != 16:
        raise ValueError(f"packed_table_asm needs a 16-entry table, got {len(bits)}")
    imm = [f"0x{b & 0xFFFFFFFF:08X}" for b in bits]
    t = "bf16x2" if bf16 else "f16x2"
    lines = ["{", ".reg .u32 l;", ".reg .b32 t, ia, ib, va, vb, p, nz;", ".reg .pred q;", "mov.u32 l, %laneid;",
             "and.b32 l, l, 15;", f"mov.b32 t, {imm[0]};"]
    for i in range(1, 16):
        lines += [f"setp.eq.u32 q, l, {i};", f"selp.b32 t, {imm[i]}, t, q;"]
    lines.append("mov.b32 nz, 0x80008000;")
    for e in range(8):
        pos = 8 * (e // 2) + 4 * (1 - e % 2)
        ia, ib = ("$8", "$9") if pos == 0 else ("ia", "ib")
        if pos:
            lines += [f"shr.u32 ia, $8, {pos};", f"shr.u32 ib, $9, {pos};"]
        lines += [f"shfl.sync.idx.b32 va, t, {ia}, 31, 0xffffffff;", f"shfl.sync.idx.b32 vb, t, {ib}, 31, 0xffffffff;",
                  f"cvt.rn.{t}.f32 p, vb, va;", f"fma.rn.{t} ${e}, p, $10, nz;"]
    lines.append("}")
    return " ".join(lines)


def packed_asm(kind: int, bf16: bool) -> str:
    """PTX of the "tcb" dequantisation of two neighbouring words ``$8`` (K index kw) and ``$9`` (kw + 1) of 4-bit
    integer codes into the 8 planes ``$0..$7`` as packed pairs of the activation dtype (low half: word kw): the low /
    high 16 bits of both words gathered by ``prmt``, each nibble pair put under the magic exponent by one ``lop3``
    (bf16 ``128 + q``, fp16 ``1024 + q``: exact), then ``fma.rn`` on pairs: kinds 1 / 2 ``(v + $11) * $10`` with
    ``$11 = -(magic + zero)`` (exact: integer), kind 3 ``(v - magic) * $10 + $11`` (``$11`` the minimum). The scale
    ``$10`` and the minimum are rounded to the activation dtype first, so a weight can differ from the reference's
    (rounded once from float32) by about one unit of its last place."""
    if kind not in (1, 2, 3):
        raise ValueError(f"packed_asm: integer kinds 1-3 only, got {kind}")
    t = "bf16x2" if bf16 else "f16x2"
    one, negmag, nzero = ("0x3F803F80", "0xC300C300", "0x80008000") if bf16 else ("0x3C003C00", "0xE400E400",
                                                                                   "0x80008000")
    magic = "0x43004300" if bf16 else "0x64006400"
    lines = ["{", ".reg .b32 lo, hi, t, q, v, one, c0, c1;", "prmt.b32 lo, $8, $9, 0x5410;",
             "prmt.b32 hi, $8, $9, 0x7632;", f"mov.b32 one, {one};"]
    if kind == 3:
        lines += [f"mov.b32 c0, {negmag};", "mov.b32 c1, $11;"]
    else:
        lines += ["mov.b32 c0, $11;", f"mov.b32 c1, {nzero};"]
    for e in range(8):
        pos = 8 * (e // 2) + 4 * (1 - e % 2)
        src, sh = ("lo", pos) if pos < 16 else ("hi", pos - 16)
        if sh:
            lines.append(f"shr.u32 t, {src}, {sh};")
            src = "t"
        lines += [f"lop3.b32 q, {src}, 0x000F000F, {magic}, 0xEA;", f"fma.rn.{t} v, q, one, c0;",
                  f"fma.rn.{t} ${e}, v, $10, c1;"]
    lines.append("}")
    return " ".join(lines)


def packed_ok(G: int, BKW: int, bits: int) -> bool:
    """Whether the packed-pair ("tcb" / "tcbd") path is used for scale groups of ``G`` elements and steps of ``BKW``
    words: one group per row and step (``G`` a multiple of the step), or exactly two whole groups per step (NF4 / FP4
    b64, int4 g64 at 128-element steps). Steps spanning more groups (int4 g32, GGUF Q4_0 / Q4_1) keep the "tc" path:
    with 4 groups per step "tcbd" gave wrong results on the H200 on 28672 x 8192 (int4 g32 sym, M = 64; and
    14336 x 4096, M = 200) while passing on small weights, and "tcb" passed there (bench/results/tc_sweep.md,
    raw/cuda_tests_tc5_final.log, raw/diag_tc5_tcbd_g32.log); the cause was not found, so neither is used for them.
    """
    step = BKW * (32 // bits)
    return G % step == 0 or (step % G == 0 and step // G == 2)


def tc_fits(K: int, bits: int, G: int) -> bool:
    """Whether the tensor-core GEMM takes this weight: it steps over at least 16 packed 32-bit words per row
    (``K * bits / 32`` divisible by 16) and every scale group is whole words."""
    per = 32 // bits
    return (K // per) % 16 == 0 and G % per == 0


def make_tc_plan(M, N, K, bits, G, kind, zero, has_bias, config, table=None, dtype=None) -> TcPlan:
    """``config`` = ``("tc" | "tcb", BM, BN, BKW, split_k, warps, stages)``: a ``[BN, BM]`` output tile per program
    (BN weight rows x BM activation rows), ``BKW`` 32-bit words per row and step (at least 16: the MMA's K per
    plane; halved while it does not divide ``K * bits / 32``), split-K summed in the kernel. NF4 / FP4 read their
    codebook through warp shuffles where supported (the 16-entry table from memory elsewhere). "tcb": 4-bit
    codes dequantized in packed pairs of the activation ``dtype`` (bf16 / fp16, default bf16) by inline PTX where
    supported (:func:`packed_asm`, codebooks :func:`packed_table_asm`); elsewhere (8 bits, the interpreter) the
    same as "tc", and where :func:`packed_ok` refuses the scale groups. "tcbd": "tcb" with the step's 8 planes as one
    MMA operand (one dot per step: no wait per plane)."""
    name, BM, BN, BKW, split_k, warps, stages = config
    if name not in ("tc", "tcb", "tcbd"):
        raise ValueError(f"make_tc_plan: config kernel must be 'tc', 'tcb' or 'tcbd', got {name!r}")
    per = 32 // bits
    KW = K // per
    if not tc_fits(K, bits, G):
        raise ValueError(f"tc GEMM needs K * bits / 32 divisible by 16 and whole words per group; got K={K}, "
                         f"bits={bits}, group={G}")
    BKW = max(16, 1 << (min(BKW, KW).bit_length() - 1))  # a power of two (tl.arange) dividing K's words
    while KW % BKW:
        BKW //= 2
    split, kw_split = split_words(KW, BKW, split_k)
    shfl = bits == 4 and kind == 0 and table is not None and shuffle_supported()
    bf16 = dtype is None or dtype == torch.bfloat16
    pasm = ""
    if name in ("tcb", "tcbd") and bits == 4 and shuffle_supported() and packed_ok(G, BKW, bits):
        if kind in (1, 2, 3):
            pasm = packed_asm(kind, bf16)
        elif kind == 0 and table is not None:
            pasm = packed_table_asm(table, bf16)
            shfl = False
    consts = dict(BITS=bits, G=G, KIND=kind, ZERO=float(zero), HAS_BIAS=has_bias, BM=BM, BN=BN, BKW=BKW,
                  SHFL=shfl, FIX=split > 1, TASM=table_asm(table) if shfl else "", ASM=shuffle_supported(),
                  PASM=pasm, MAG=128.0 if bf16 else 1024.0, ONEDOT=name == "tcbd" and pasm != "")
    grid = (-(-N // BN), -(-M // BM), split)
    return TcPlan(grid, split, kw_split, kw_split // BKW, consts, warps, stages)


def run_tc(plan: TcPlan, x2, words, scales, zeros, table, bias, N, K, NG, per):
    """Launch ``plan`` on ``x2 [M, K]`` (unit stride along K) -> ``[M, N]`` in x's dtype. ``table``: the float32
    16-entry codebook (kind 0) or None."""
    M = x2.shape[0]
    dev = x2.device
    if plan.pdt is not None and x2.dtype != plan.pdt:
        raise ValueError(f"run_tc: this 'tcb' plan was made for {plan.pdt} activations, got {x2.dtype}")
    stream = _stream(dev) if plan.compiled is not None else 0
    out = torch.empty((M, N), dtype=x2.dtype, device=dev)
    y, cnt = (out, scales) if plan.split == 1 else _split_workspace(plan, stream, M, N, dev,
                                                                       plan.grid[0] * plan.grid[1])
    z = zeros if zeros is not None else scales
    t = table if table is not None else scales
    b = bias if bias is not None else scales
    # the activations plane-major per step of BKW words: column j * BKW * per + e * BKW + kw holds x[:, (j * BKW +
    # kw) * per + e], so that plane e of a step is a contiguous [BKW, BM] tile (one small copy per call)
    bk = plan.consts["BKW"]
    xp = x2.reshape(M, K // (bk * per), bk, per).transpose(2, 3).contiguous()
    args = (xp, words, scales, z, t, b, y, out, cnt, M, N, K // per, NG, K, plan.kw_split, plan.n_iter)
    if plan.compiled is None:
        ck = _tc_kernel[plan.grid](*args, **plan.consts, num_warps=plan.warps, num_stages=plan.stages)
        if _knobs is not None and hasattr(ck, "run") and hasattr(ck, "packed_metadata"):
            plan.compiled = ck
        return out
    _launch(_tc_kernel, plan.compiled, plan.grid, args, plan.consts, plan.cvals, plan.warps, plan.stages, stream)
    return out
