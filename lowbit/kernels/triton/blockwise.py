"""Triton blockwise quantize / dequantize for 4- and 8-bit codes (bitsandbytes-style flat blocks).

Reference numerics: :mod:`lowbit.formats.codebook` (NF4/FP4: bitsandbytes default-backend nearest-code
rule, ``dynamic8`` double quantization: bitsandbytes' native 65,536-entry lookup-table rule) and
:mod:`lowbit.formats.affine` (``int4``/``int8`` symmetric absmax, ``*_asym`` with a zero point).

Shapes and dtypes
    input ``x``: any shape, fp16/bf16/fp32, flattened row-major; ``n`` elements in ``nblocks =
    ceil(n / G)`` blocks of ``G`` (a power of two, 16..4096), the last one possibly ragged.
    codes: uint8, 4-bit packed two per byte with the first element in the high nibble (``n`` odd: the
    last low nibble is 0, as :func:`lowbit.tensor.packing.pack_bits` pads), or one byte per element.
    scales: fp32 ``[nblocks]`` (codebook: the block absmax); zeros: uint8 ``[nblocks]`` (asym only).

Every division that the reference does in IEEE float32 is ``div_rn`` here (Triton's ``/`` is an
approximate division), rounding is half-to-even (``rint``) and the kernels are compiled without
floating-point contraction, so codes are bit-identical to the CPU path and dequantized values are
the same float32 products rounded once to the output dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

# kinds of code (constexpr KIND)
CODEBOOK, SYM, ASYM = 0, 1, 2
_CODEBOOK = tl.constexpr(CODEBOOK)
_ASYM = tl.constexpr(ASYM)
_SYM = tl.constexpr(SYM)


@triton.jit
def _rint(x):
    # round half to even for |x| < 2**22 (float32 magic number; the kernels disable fp contraction)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, z_ptr, code_ptr, qa_ptr, a2_ptr, dyn_ptr, off_ptr, out_ptr,
    n, nblocks, pid0,
    G: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr, ZERO: tl.constexpr,
    NESTED: tl.constexpr, NB2: tl.constexpr, EVEN: tl.constexpr = False,
):
    # EVEN: every program of this launch is full (no masks: loads and stores vectorise); the remainder (at
    # most one program, from ``pid0``) is a second launch with EVEN=False. Offsets inside a program are int32.
    pid = tl.program_id(0).to(tl.int64) + pid0
    base = pid * (ROWS * G)
    rl = tl.arange(0, ROWS)
    rows = pid * ROWS + rl
    rmask = rows < nblocks
    rem = tl.minimum(n - base, ROWS * G).to(tl.int32)
    if NESTED:
        # scale = dynamic_map[qabsmax] * absmax2[block // 256] + offset, two float32 roundings
        qa = tl.load(qa_ptr + rows, mask=rmask, other=0).to(tl.int32)
        a2 = tl.load(a2_ptr + rows // NB2, mask=rmask, other=0.0)
        s = tl.load(dyn_ptr + qa) * a2 + tl.load(off_ptr)
    else:
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    if KIND == _ASYM:
        zf = tl.load(z_ptr + rows, mask=rmask, other=0).to(tl.float32)
    else:
        zf = tl.full([ROWS], ZERO, tl.float32)
    if BITS == 4:
        j = tl.arange(0, G // 2)
        lb = rl[:, None] * (G // 2) + j[None, :]
        if EVEN:
            b = tl.load(q_ptr + base // 2 + lb).to(tl.int32)
        else:
            b = tl.load(q_ptr + base // 2 + lb, mask=2 * lb < rem, other=0).to(tl.int32)
        hi = b >> 4
        lo = b & 15
        if KIND == _CODEBOOK:
            vh = tl.load(code_ptr + hi)
            vl = tl.load(code_ptr + lo)
        else:
            vh = hi.to(tl.float32) - zf[:, None]
            vl = lo.to(tl.float32) - zf[:, None]
        vh = vh * s[:, None]
        vl = vl * s[:, None]
        v = tl.reshape(tl.join(vh, vl), (ROWS, G))
    else:
        le = rl[:, None] * G + tl.arange(0, G)[None, :]
        if EVEN:
            c = tl.load(q_ptr + base + le).to(tl.int32)
        else:
            c = tl.load(q_ptr + base + le, mask=le < rem, other=0).to(tl.int32)
        if KIND == _CODEBOOK:
            v = tl.load(code_ptr + c)
        else:
            v = c.to(tl.float32) - zf[:, None]
        v = v * s[:, None]
    le = rl[:, None] * G + tl.arange(0, G)[None, :]
    if EVEN:
        tl.store(out_ptr + base + le, v.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + base + le, v.to(out_ptr.dtype.element_ty), mask=le < rem)


@triton.jit
def _codebook_index(scaled, mids_ptr, order, NCODE: tl.constexpr, PERMUTE: tl.constexpr, GATHER: tl.constexpr = False):
    # bucketize(right=False) against the sorted midpoints = number of midpoints strictly below
    if NCODE == 16 and GATHER:
        # the binary search below with the midpoint of each step read from the 60-byte table (one cache
        # line: a broadcast-like L1 gather) instead of selected in registers
        b8 = scaled > tl.load(mids_ptr + 7)
        idx = tl.where(b8, 8, 0)
        idx += tl.where(scaled > tl.load(mids_ptr + idx + 3), 4, 0)
        idx += tl.where(scaled > tl.load(mids_ptr + idx + 1), 2, 0)
        idx += tl.where(scaled > tl.load(mids_ptr + idx), 1, 0)
    elif NCODE == 16:
        # the same count by a 4-step binary search (``scaled > mid`` holds on a prefix of the sorted
        # midpoints, so the prefix length is found exactly): 4 compares and 11 selects per element
        # instead of 15 compares and adds
        m0 = tl.load(mids_ptr + 0)
        m1 = tl.load(mids_ptr + 1)
        m2 = tl.load(mids_ptr + 2)
        m3 = tl.load(mids_ptr + 3)
        m4 = tl.load(mids_ptr + 4)
        m5 = tl.load(mids_ptr + 5)
        m6 = tl.load(mids_ptr + 6)
        m7 = tl.load(mids_ptr + 7)
        m8 = tl.load(mids_ptr + 8)
        m9 = tl.load(mids_ptr + 9)
        m10 = tl.load(mids_ptr + 10)
        m11 = tl.load(mids_ptr + 11)
        m12 = tl.load(mids_ptr + 12)
        m13 = tl.load(mids_ptr + 13)
        m14 = tl.load(mids_ptr + 14)
        b8 = scaled > m7
        b4 = scaled > tl.where(b8, m11, m3)
        b2 = scaled > tl.where(b8, tl.where(b4, m13, m9), tl.where(b4, m5, m1))
        t1 = tl.where(b8, tl.where(b4, tl.where(b2, m14, m12), tl.where(b2, m10, m8)),
                      tl.where(b4, tl.where(b2, m6, m4), tl.where(b2, m2, m0)))
        b1 = scaled > t1
        idx = b8.to(tl.int32) * 8 + b4.to(tl.int32) * 4 + b2.to(tl.int32) * 2 + b1.to(tl.int32)
    else:
        idx = tl.zeros(scaled.shape, tl.int32)
        for i in tl.static_range(NCODE - 1):
            idx += (scaled > tl.load(mids_ptr + i)).to(tl.int32)
    if PERMUTE:
        # sorted position -> code index, a 16-entry permutation packed in nibbles of an int64
        idx = ((order >> (4 * idx).to(tl.int64)) & 15).to(tl.int32)
    return idx


@triton.jit
def _affine_codes(x, scale, zero, LEVELS: tl.constexpr):
    r = _rint(tl.math.div_rn(x, scale[:, None])) + zero
    return tl.minimum(tl.maximum(r, 0.0), LEVELS).to(tl.int32)


@triton.jit
def _quant_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, mids_ptr,
    n, nblocks, order,
    G: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr,
    NCODE: tl.constexpr, PERMUTE: tl.constexpr, PAD: tl.constexpr, QMAX: tl.constexpr, ZERO: tl.constexpr, LEVELS: tl.constexpr,
):
    # each block is read as its even and odd elements (two strided loads over the same sectors), so
    # the two nibbles of a byte come out in separate registers without a shuffle
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < nblocks
    j = tl.arange(0, G // 2)
    e0 = rows[:, None] * G + 2 * j[None, :]
    m0 = e0 < n
    m1 = e0 + 1 < n
    xe = tl.load(x_ptr + e0, mask=m0, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + e0 + 1, mask=m1, other=0.0).to(tl.float32)
    nan = tl.maximum(tl.max((xe != xe).to(tl.int32), axis=1), tl.max((xo != xo).to(tl.int32), axis=1)) > 0
    if KIND == _CODEBOOK:
        absmax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
        am = tl.maximum(absmax, tl.full([ROWS], 1e-38, tl.float32))
        # full blocks: x * (1 / absmax); the ragged last block: x / absmax (bitsandbytes default backend)
        tail = (rows == nblocks - 1) & (n - rows * G < G)
        inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), am)
        if (pid == tl.num_programs(0) - 1) & (n % G != 0):
            # only the last program holds the ragged block: the element-wise IEEE division runs there alone
            se = tl.where(tail[:, None], tl.math.div_rn(xe, am[:, None]), xe * inv[:, None])
            so = tl.where(tail[:, None], tl.math.div_rn(xo, am[:, None]), xo * inv[:, None])
        else:
            se = xe * inv[:, None]
            so = xo * inv[:, None]
        se = tl.minimum(tl.maximum(tl.where((absmax > 0)[:, None], se, 0.0), -1.0), 1.0)
        so = tl.minimum(tl.maximum(tl.where((absmax > 0)[:, None], so, 0.0), -1.0), 1.0)
        qe = _codebook_index(se, mids_ptr, order, NCODE, PERMUTE)
        qo = _codebook_index(so, mids_ptr, order, NCODE, PERMUTE)
        sc = tl.where(tail, am, absmax)
        tl.store(s_ptr + rows, tl.where(nan, float("nan"), sc), mask=rmask)
    elif KIND == _SYM:
        absmax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
        scale = tl.math.div_rn(absmax, tl.full([ROWS], QMAX, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        qe = _affine_codes(xe, scale, ZERO, LEVELS)
        qo = _affine_codes(xo, scale, ZERO, LEVELS)
        tl.store(s_ptr + rows, tl.where(nan, float("nan"), scale), mask=rmask)
    else:
        # masked lanes are 0, and the range is extended to include 0 anyway
        lo = tl.minimum(tl.minimum(tl.min(xe, axis=1), tl.min(xo, axis=1)), 0.0)
        hi = tl.maximum(tl.maximum(tl.max(xe, axis=1), tl.max(xo, axis=1)), 0.0)
        scale = tl.math.div_rn(hi - lo, tl.full([ROWS], LEVELS, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, scale)), 0.0), LEVELS)
        qe = _affine_codes(xe, scale, zero[:, None], LEVELS)
        qo = _affine_codes(xo, scale, zero[:, None], LEVELS)
        tl.store(s_ptr + rows, tl.where(nan, float("nan"), scale), mask=rmask)
        tl.store(z_ptr + rows, zero.to(tl.uint8), mask=rmask)
    qe = tl.where(m0, qe, PAD)
    qo = tl.where(m1, qo, PAD)  # the padding nibble of an odd count (bitsandbytes: the code of 0.0)
    if BITS == 4:
        tl.store(q_ptr + rows[:, None] * (G // 2) + j[None, :], ((qe << 4) | qo).to(tl.uint8), mask=m0)
    else:
        tl.store(q_ptr + e0, qe.to(tl.uint8), mask=m0)
        tl.store(q_ptr + e0 + 1, qo.to(tl.uint8), mask=m1)


@triton.jit
def _quant_kernel_c(
    x_ptr, q_ptr, s_ptr, z_ptr, mids_ptr,
    n, nblocks, order, pid0,
    G: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr,
    NCODE: tl.constexpr, PERMUTE: tl.constexpr, PAD: tl.constexpr, QMAX: tl.constexpr, ZERO: tl.constexpr, LEVELS: tl.constexpr,
    EVEN: tl.constexpr, GATHER: tl.constexpr = False,
):
    # the same codes as _quant_kernel from a contiguous (vectorised) read of [ROWS, G]: each thread holds a run
    # of consecutive elements of a block, so the block reductions are mostly in-thread and the per-block
    # division runs on fewer lanes; the two nibbles of a byte are split out of the run in registers.
    # EVEN: every program of this launch is full (no masks, so loads and stores vectorise); the remainder
    # (at most one program, from ``pid0``) is a second launch with EVEN=False.
    pid = tl.program_id(0).to(tl.int64) + pid0
    base = pid * (ROWS * G)
    rl = tl.arange(0, ROWS)
    rows = pid * ROWS + rl
    loc = rl[:, None] * G + tl.arange(0, G)[None, :]
    rem = tl.minimum(n - base, ROWS * G).to(tl.int32)
    m = loc < rem
    rmask = rows < nblocks
    if EVEN:
        x = tl.load(x_ptr + base + loc).to(tl.float32)
    else:
        x = tl.load(x_ptr + base + loc, mask=m, other=0.0).to(tl.float32)
    nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    if KIND == _CODEBOOK:
        absmax = tl.max(tl.abs(x), axis=1)
        am = tl.maximum(absmax, tl.full([ROWS], 1e-38, tl.float32))
        tail = (rows == nblocks - 1) & (n - rows * G < G)
        inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), am)
        if EVEN:
            sx = x * inv[:, None]
        elif n % G != 0:
            sx = tl.where(tail[:, None], tl.math.div_rn(x, am[:, None]), x * inv[:, None])
        else:
            sx = x * inv[:, None]
        sx = tl.minimum(tl.maximum(tl.where((absmax > 0)[:, None], sx, 0.0), -1.0), 1.0)
        q = _codebook_index(sx, mids_ptr, order, NCODE, PERMUTE, GATHER)
        sc = tl.where(tail, am, absmax)
        tl.store(s_ptr + rows, tl.where(nan, float("nan"), sc), mask=rmask)
    elif KIND == _SYM:
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(absmax, tl.full([ROWS], QMAX, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        q = _affine_codes(x, scale, ZERO, LEVELS)
        tl.store(s_ptr + rows, tl.where(nan, float("nan"), scale), mask=rmask)
    else:
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
        scale = tl.math.div_rn(hi - lo, tl.full([ROWS], LEVELS, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, scale)), 0.0), LEVELS)
        q = _affine_codes(x, scale, zero[:, None], LEVELS)
        tl.store(s_ptr + rows, tl.where(nan, float("nan"), scale), mask=rmask)
        tl.store(z_ptr + rows, zero.to(tl.uint8), mask=rmask)
    if not EVEN:
        q = tl.where(m, q, PAD)  # the padding nibble of an odd count (bitsandbytes: the code of 0.0)
    if BITS == 4:
        hi4, lo4 = tl.split(tl.reshape(q, (ROWS, G // 2, 2)))
        locq = rl[:, None] * (G // 2) + tl.arange(0, G // 2)[None, :]
        if EVEN:
            tl.store(q_ptr + base // 2 + locq, ((hi4 << 4) | lo4).to(tl.uint8))
        else:
            tl.store(q_ptr + base // 2 + locq, ((hi4 << 4) | lo4).to(tl.uint8), mask=locq < (rem + 1) // 2)
    elif EVEN:
        tl.store(q_ptr + base + loc, q.to(tl.uint8))
    else:
        tl.store(q_ptr + base + loc, q.to(tl.uint8), mask=m)


@triton.jit
def _quant_lut_kernel(
    x_ptr, off_ptr, lut_ptr, q_ptr, s_ptr, n, nblocks, G: tl.constexpr, ROWS: tl.constexpr,
):
    # bitsandbytes' native CPU 8-bit rule on (x - offset): index = trunc(((s + 1) / 2) * 65535 + 0.5)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < nblocks
    e = rows[:, None] * G + tl.arange(0, G)[None, :]
    emask = e < n
    x = tl.load(x_ptr + e, mask=emask, other=0.0) - tl.load(off_ptr)
    x = tl.where(emask, x, 0.0)
    absmax = tl.max(tl.abs(x), axis=1)
    safe = tl.where(absmax > 0, absmax, 1.0)
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), safe)
    s = tl.where((absmax > 0)[:, None], x * inv[:, None], 0.0)
    t = (tl.minimum(tl.maximum(s, -1.0), 1.0) + 1.0) * 0.5
    idx = (t * 65535.0 + 0.5).to(tl.int32)
    idx = tl.minimum(tl.maximum(idx, 0), 65535)
    q = tl.load(lut_ptr + idx)
    q = tl.where((absmax > 0)[:, None], q, 0)
    tl.store(q_ptr + e, q.to(tl.uint8), mask=emask)
    tl.store(s_ptr + rows, absmax, mask=rmask)


# ---------------------------------------------------------------------------------------------
# launchers (tensors already on one CUDA device; validation happens in lowbit.kernels.api)

import torch  # noqa: E402

# elements handled by one program and warps per program; bench/gpu.py sweeps these on the H100
DEQUANT_CONFIG = {"elems": 2048, "num_warps": 4, "even": True}  # even: full programs launched without masks
# read: "contiguous" (vectorised loads, full programs unmasked) | "strided" (even/odd loads); search (NF4/FP4 code
# index, contiguous read only): "gather" (midpoints read from the table; the default, also when absent: 108 µs
# on the H200, bench/results/blockwise_h200.md) | "select" (chosen in registers: 124 µs)
QUANT_CONFIG = {"elems": 2048, "num_warps": 4, "read": "contiguous", "search": "gather"}


def _rows(G: int, elems: int) -> int:
    return max(1, elems // G)


def dequantize(data, scales, zeros, code, n, G, bits, kind, zero, out_dtype, nested=None, config=None):
    """Flat dequantization ``[n]`` in ``out_dtype``; ``nested = (qabsmax, absmax2, dyn_code, offset_t, nb2)``."""
    cfg = config or DEQUANT_CONFIG
    out = torch.empty(n, dtype=out_dtype, device=data.device)
    nblocks = -(-n // G)
    rows = _rows(G, cfg["elems"])
    dummy = data
    if nested is not None:
        qa, a2, dyn, off_t, nb2 = nested
    else:
        qa = a2 = dyn = off_t = dummy
        nb2 = 1
    args = (data, scales if scales is not None else dummy, zeros if zeros is not None else dummy,
            code if code is not None else dummy, qa, a2, dyn, off_t, out, n, nblocks)
    kw = dict(G=G, BITS=bits, ROWS=rows, KIND=kind, ZERO=zero, NESTED=nested is not None, NB2=nb2,
              num_warps=cfg["num_warps"], enable_fp_fusion=False)
    if not cfg.get("even", True):  # the one masked launch of before
        _dequant_kernel[(triton.cdiv(nblocks, rows),)](*args, 0, **kw)
        return out
    full = n // (rows * G)  # programs whose ROWS blocks are all full: no masks
    if full:
        _dequant_kernel[(full,)](*args, 0, EVEN=True, **kw)
    if full * rows * G < n:
        _dequant_kernel[(1,)](*args, full, EVEN=False, **kw)
    return out


def quantize(x, G, bits, kind, mids=None, order=0, permute=False, pad=0, qmax=0, zero=0, levels=0, config=None):
    """Flat quantization of ``x`` -> ``(packed codes uint8, scales fp32 [nblocks], zeros uint8 or None)``."""
    cfg = config or QUANT_CONFIG
    flat = x.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // G)
    q = torch.empty((n * bits + 7) // 8, dtype=torch.uint8, device=x.device)
    s = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    z = torch.empty(nblocks, dtype=torch.uint8, device=x.device) if kind == ASYM else None
    rows = _rows(G, cfg["elems"])
    args = (flat, q, s, z if z is not None else s, mids if mids is not None else s, n, nblocks, order)
    kw = dict(G=G, BITS=bits, ROWS=rows, KIND=kind, NCODE=0 if mids is None else mids.numel() + 1,
              PERMUTE=permute, PAD=pad, QMAX=float(qmax), ZERO=float(zero), LEVELS=float(levels),
              num_warps=cfg["num_warps"], enable_fp_fusion=False)
    if cfg.get("read", "contiguous") == "strided":
        _quant_kernel[(triton.cdiv(nblocks, rows),)](*args, **kw)
        return q, s, z
    kw["GATHER"] = cfg.get("search", "gather") == "gather"
    full = n // (rows * G)  # programs whose ROWS blocks are all full: no masks
    if full:
        _quant_kernel_c[(full,)](*args, 0, EVEN=True, **kw)
    if full * rows * G < n:
        _quant_kernel_c[(1,)](*args, full, EVEN=False, **kw)
    return q, s, z


def quantize_lut(x, offset_t, lut, G):
    """bitsandbytes-native 8-bit quantization of ``x - offset`` (fp32, flat) -> ``(codes, absmax)``."""
    n = x.numel()
    nblocks = -(-n // G)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    s = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    rows = _rows(G, 2048)
    _quant_lut_kernel[(triton.cdiv(nblocks, rows),)](
        x, offset_t, lut, q, s, n, nblocks, G=G, ROWS=rows, num_warps=4, enable_fp_fusion=False,
    )
    return q, s
