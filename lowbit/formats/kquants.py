"""llama.cpp K-quant super-block formats Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, bit-exact, in plain PyTorch.

References (read for the facts; this is an independent vectorised implementation):
    * ggml-org/llama.cpp ``ggml/src/ggml-quants.c``: ``quantize_row_q{2..6}_K_ref`` and the helpers
      ``nearest_int``, ``make_qkx2_quants``, ``make_q3_quants``, ``make_qx_quants``; the block structs
      of ``ggml/src/ggml-common.h``. ``llama_model_quantize`` without an importance matrix calls exactly
      these reference functions (``quantize_qX_K`` with ``quant_weights == NULL``).
    * gguf-py 0.19 ``gguf/quants.py`` (``Q2_K`` ... ``Q6_K.dequantize_blocks``: the dequantization oracle).

Every type cuts each row (GGUF ``ne[0]``, the last dimension) into super-blocks of 256 values:

=====  =====  ==========  ==================================================  ================================
type   bytes  sub-blocks  layout (in file order)                              value of code ``q``
=====  =====  ==========  ==================================================  ================================
Q2_K   84     16 x 16     scales[16] (4-bit scale | 4-bit min << 4), qs[64],  ``d*sc*q - dmin*m``  (q 0..3)
                          d, dmin
Q3_K   110    16 x 16     hmask[32], qs[64], scales[12] (6-bit, offset 32),   ``d*(sc-32)*(q-4)``  (q 0..7)
                          d
Q4_K   144    8 x 32      d, dmin, scales[12] (6-bit scales and mins), qs[128] ``d*sc*q - dmin*m`` (q 0..15)
Q5_K   176    8 x 32      d, dmin, scales[12], qh[32], qs[128]                ``d*sc*q - dmin*m`` (q 0..31)
Q6_K   210    16 x 16     ql[128], qh[64], scales[16] (int8), d               ``d*sc*(q-32)``      (q 0..63)
=====  =====  ==========  ==================================================  ================================

``d``/``dmin`` are fp16. Codes are exposed *unsigned* (as above); sub-block scales/mins as the small
integers stored in the block (Q3_K's as 0..63 with the implicit offset 32, Q6_K's as signed int8).

The reference quantizers are iterative searches whose result depends on the exact fp32 operation order.
This module reproduces them operation for operation: every accumulation is a sequential fp32 sum in
element order (as the C loops; never a pairwise/SIMD reduction), products are evaluated left to right
as written in C (no fused multiply-add: llama.cpp compiles ``ggml-quants.c`` into ``ggml-base`` without
``-march`` flags, so the x86-64 build has no FMA contraction), ``nearest_int`` is the 1.5*2**23
magic-number rounding of ``ggml-quants.c`` bit for bit (round half to even in its valid range, and
the same garbage outside it), fp16 stores round to nearest even, ``uint8_t``/``int8_t`` stores wrap.
Blocks are independent, so all of a tensor's sub-blocks are processed at once (vectorised across
sub-blocks, sequential only along the 16 or 32 elements of one sub-block).

For error-compensating algorithms the stored parameters and codes are exposed separately:
:func:`quantize_params` (what the reference stores per super-block: ``d``, ``dmin``, integer sub-block
scales/mins), :func:`subblock_scale_min` (the effective fp32 step and offset of each sub-block, as
dequantization computes them), :func:`pack_kblocks` / :func:`unpack_kblocks` (lossless byte layout).

Raw byte layouts assume a little-endian host (as GGUF files written by default are).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

__all__ = [
    "QK_K",
    "KQuantType",
    "KQUANT_TYPES",
    "kquant_type",
    "is_kquant",
    "KParams",
    "quantize_params",
    "quantize_rows",
    "dequantize_rows",
    "pack_kblocks",
    "unpack_kblocks",
    "subblock_scale_min",
    "decode_codes",
    "nearest_int",
    "KQUANT_FALLBACK",
    "kquant_fallback",
]
from lowbit.formats.kquants_types import (  # noqa: E402,F401  (moved; importable from here as before)
    QK_K,
    _GROUP_MAX_EPS,
    KQuantType,
    KQUANT_TYPES,
    is_kquant,
    kquant_type,
    _check_rows,
    KParams,
)
from lowbit.formats.kquants_layout import (  # noqa: E402,F401  (moved; importable from here as before)
    _half_bytes,
    _bits_to_bytes,
    _pack_scales_k4,
    _unpack_scales_k4,
    pack_kblocks,
    unpack_kblocks,
)


# ---------------------------------------------------------------------------------------------
# exact scalar primitives of ggml-quants.c, elementwise


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """``nearest_int`` of ggml-quants.c, bit for bit: ``bits(fp32(v + 12582912)) & 0x7fffff - 0x400000``.

    Round half to even for ``|v| <= 4194303`` (int32 result); outside that range the same value as the
    C code (which only asserts the range in debug builds).

    >>> nearest_int(torch.tensor([0.5, 1.5, -2.5, 3.49])).tolist()
    [0, 2, -2, 3]
    """
    val = v.float() + torch.tensor(12582912.0, dtype=torch.float32, device=v.device)
    return (val.view(torch.int32) & 0x007FFFFF) - 0x00400000


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(np.float32(x), dtype=torch.float32)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sequential fp32 sum over the first dimension ``t[0] + t[1] + ...`` (the C loop order)."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value with the largest |x| (first one on ties, strict ``>`` from 0), that |x|) along dim 0."""
    ax = x.abs()
    amax = ax.amax(0)
    # first index reaching the max; a C scan starting from amax=0 with '>' keeps max=0 when all are 0
    idx = (ax == amax.unsqueeze(0)).to(torch.uint8).argmax(0)
    val = torch.gather(x, 0, idx.unsqueeze(0))[0]
    return torch.where(amax > 0, val, torch.zeros_like(val)), amax


# ---------------------------------------------------------------------------------------------
# the three searches (inputs transposed: [n, G], one column per sub-block)


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants``: (scale [G], the_min [G] (stored positive), L uint8 [n, G])."""
    n = x.shape[0]
    zero = torch.zeros((), dtype=torch.float32)
    mn = x.amin(0)
    mx = x.amax(0)
    mn = torch.where(mn > 0, zero, mn)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    rng = mx - mn
    xm = x - mn  # x[i] - min, fp32
    iscale = torch.full_like(rng, float(nmax)) / rng
    scale = torch.ones_like(iscale) / iscale

    def err_of(s, m, L):
        diff = s * L + m - x
        diff = diff.abs() if use_mad else diff * diff
        return _seqsum(w * diff)

    L = nearest_int(iscale * xm).clamp_(0, nmax).float()
    best = err_of(scale, mn, L)
    for i_s in range(nstep + 1):
        # the C loop reads ``min`` as updated by the previous accepted candidate
        rng = mx - mn
        xm = x - mn
        c = np.float32(np.float32(rmin) + np.float32(np.float32(rdelta) * np.float32(i_s))) + np.float32(nmax)
        iscale = torch.full_like(rng, float(np.float32(c))) / rng
        la = nearest_int(iscale * xm).clamp_(0, nmax).float()
        wl = w * la
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * la)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, zero, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err_of(this_scale, this_min, la)
        upd = (D > 0) & (cur < best)
        L = torch.where(upd, la, L)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    scale = torch.where(flat, zero, scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale, -mn, L.to(torch.uint8)


def _make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)``: (scale [G], L uint8 [n, G])."""
    mx, amax = _first_absmax(x)
    allzero = amax < torch.from_numpy(np.array(_GROUP_MAX_EPS))
    zero = torch.zeros((), dtype=torch.float32)
    w = x * x
    wx = w * x

    def sums(iscale):
        l = nearest_int(iscale * x).clamp_(-nmax, nmax - 1).float()
        return l, _seqsum(wx * l), _seqsum((w * l) * l)

    l, sumlx, suml2 = sums(torch.full_like(mx, float(-nmax)) / mx)
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, zero)
    best = scale * sumlx
    for i_s in range(-9, 10):
        if i_s == 0:
            continue
        c = np.float32(np.float32(nmax) + np.float32(np.float32(0.1) * np.float32(i_s)))
        iscale = torch.full_like(mx, float(-c)) / mx
        l, sumlx, suml2 = sums(iscale)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(upd, l + nmax, L)
        s_new = sumlx / suml2
        scale = torch.where(upd, s_new, scale)
        best = torch.where(upd, s_new * sumlx, best)
    scale = torch.where(allzero, zero, scale)
    L = torch.where(allzero, torch.zeros_like(L), L)
    return scale, L.to(torch.uint8)


def _make_q3(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: (scale [G], L uint8 [n, G])."""
    n = x.shape[0]
    mx, amax = _first_absmax(x)
    allzero = amax < torch.from_numpy(np.array(_GROUP_MAX_EPS))
    zero = torch.zeros((), dtype=torch.float32)
    iscale = torch.full_like(mx, float(-nmax)) / mx
    L = nearest_int(iscale * x).clamp_(-nmax, nmax - 1).float()  # [n, G], signed
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum((w * L) * L)
    for _ in range(5):
        # a sub-block without changes in a pass would repeat the same pass: running all five is exact
        for i in range(n):
            Li = L[i]
            slx = sumlx - wx[i] * Li
            cand = slx > 0
            sl2 = suml2 - (w[i] * Li) * Li
            new_l = nearest_int((x[i] * sl2) / slx).clamp_(-nmax, nmax - 1).float()
            ch = cand & (new_l != Li)
            slx2 = slx + wx[i] * new_l
            sl22 = sl2 + (w[i] * new_l) * new_l
            acc = ch & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(acc, new_l, Li)
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, zero)
    L = L + nmax
    scale = torch.where(allzero, zero, scale)
    L = torch.where(allzero, torch.zeros_like(L), L)
    return scale, L.to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# super-block parameters


def _wrap_u8(v: torch.Tensor) -> torch.Tensor:
    return v & 0xFF


def _wrap_i8(v: torch.Tensor) -> torch.Tensor:
    return ((v + 128) & 0xFF) - 128


def _max_pos(v: torch.Tensor) -> torch.Tensor:
    # C: m = 0; for j: if (v[j] > m) m = v[j];   (+0.0 unless some v[j] > 0)
    m = v.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _reference(x: torch.Tensor, t: KQuantType):
    """The reference quantizer: (codes uint8 [R, K], KParams)."""
    r, k = _check_rows(x)
    nsb = k // QK_K
    x = x.float().contiguous()
    G = r * k // t.sub
    xs = x.reshape(G, t.sub).t().contiguous()  # [sub, G]
    if t.name in ("Q4_K", "Q5_K"):
        x2 = _seqsum(xs * xs)
        # sqrtf is correctly rounded; torch's fp32 sqrt kernel is not always (1 ulp off), so take the
        # float64 root of the fp32 quotient and round it once (exact: 53 >= 2*24 + 2 bits)
        av_x = torch.sqrt((x2 / torch.full_like(x2, 32.0)).double()).float()
        wts = av_x + xs.abs()
        if t.name == "Q4_K":
            scales, mins, L = _make_qkx2(xs, wts, 15, -1.0, 0.1, 20, False)
        else:
            scales, mins, L = _make_qkx2(xs, wts, 31, -0.5, 0.1, 15, False)
    elif t.name == "Q2_K":
        scales, mins, L = _make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
    elif t.name == "Q3_K":
        scales, L = _make_q3(xs, 4)
        mins = None
    else:  # Q6_K
        scales, L = _make_qx(xs, 32)
        mins = None
    L = L.t().reshape(r, nsb, t.n_sub, t.sub)
    xb = x.reshape(r, nsb, t.n_sub, t.sub)
    scales = scales.reshape(r, nsb, t.n_sub)
    zero = torch.zeros((), dtype=torch.float32)

    if t.has_min:
        mins = mins.reshape(r, nsb, t.n_sub)
        max_scale = _max_pos(scales)
        max_min = _max_pos(mins)
        if t.name == "Q2_K":
            q4 = _f32(15.0)
            ok_s = max_scale > 0
            isc = torch.where(ok_s, q4 / max_scale, zero)
            ls = torch.where(ok_s.unsqueeze(-1), _wrap_u8(nearest_int(isc.unsqueeze(-1) * scales)), 0)
            d = _fp16(torch.where(ok_s, max_scale / q4, zero))
            ok_m = max_min > 0
            imn = torch.where(ok_m, q4 / max_min, zero)
            lm_raw = nearest_int(imn.unsqueeze(-1) * mins)
            byte = torch.where(ok_m.unsqueeze(-1), _wrap_u8(ls | (lm_raw << 4)), ls)
            dmin = _fp16(torch.where(ok_m, max_min / q4, zero))
            sc_eff, m_eff = byte & 0xF, byte >> 4
        else:
            c63 = _f32(63.0)
            inv_s = torch.where(max_scale > 0, c63 / max_scale, zero)
            inv_m = torch.where(max_min > 0, c63 / max_min, zero)
            sc_eff = _wrap_u8(nearest_int(inv_s.unsqueeze(-1) * scales)).clamp_max(63)
            m_eff = _wrap_u8(nearest_int(inv_m.unsqueeze(-1) * mins)).clamp_max(63)
            d = _fp16(max_scale / c63)
            dmin = _fp16(max_min / c63)
        dl = d.float().unsqueeze(-1) * sc_eff.float()
        ml = dmin.float().unsqueeze(-1) * m_eff.float()
        l = nearest_int((xb + ml.unsqueeze(-1)) / dl.unsqueeze(-1)).clamp_(0, t.qmax)
        codes = torch.where((dl != 0).unsqueeze(-1), l.to(torch.uint8), L)
        return codes.reshape(r, k), KParams(d.reshape(r, nsb), dmin.reshape(r, nsb),
                                            sc_eff.to(torch.int16).reshape(r, -1),
                                            m_eff.to(torch.int16).reshape(r, -1))

    # symmetric types: the scale with the largest |scale| (first on ties) keeps its sign
    max_scale, amax = _first_absmax(scales.permute(2, 0, 1))
    if t.name == "Q3_K":
        ok = max_scale != 0
        isc = torch.where(ok, _f32(-32.0) / max_scale, zero)
        l = _wrap_i8(nearest_int(isc.unsqueeze(-1) * scales)).clamp(-32, 31) + 32
        sc = torch.where(ok.unsqueeze(-1), l, 0)
        d = _fp16(torch.where(ok, torch.ones_like(isc) / isc, zero))
        dl = d.float().unsqueeze(-1) * (sc - 32).float()
        q = nearest_int(xb / dl.unsqueeze(-1)).clamp_(-4, 3) + 4
        codes = torch.where((dl != 0).unsqueeze(-1), q.to(torch.uint8), L)
        return codes.reshape(r, k), KParams(d.reshape(r, nsb), None, sc.to(torch.int16).reshape(r, -1), None)
    # Q6_K
    ok = ~(amax < torch.from_numpy(np.array(_GROUP_MAX_EPS)))
    isc = torch.where(ok, _f32(-128.0) / max_scale, zero)
    d = _fp16(torch.where(ok, torch.ones_like(isc) / isc, zero))
    sc = torch.where(ok.unsqueeze(-1), nearest_int(isc.unsqueeze(-1) * scales).clamp_max(127), 0)
    dl = d.float().unsqueeze(-1) * sc.float()
    q = nearest_int(xb / dl.unsqueeze(-1)).clamp_(-32, 31) + 32
    codes = torch.where((dl != 0).unsqueeze(-1), q.to(torch.uint8), L)
    codes = torch.where(ok.reshape(r, nsb, 1, 1), codes, torch.zeros_like(codes))  # memset block
    return codes.reshape(r, k), KParams(d.reshape(r, nsb), None, sc.to(torch.int16).reshape(r, -1), None)


def quantize_params(x: torch.Tensor, qtype: Union[str, KQuantType]):
    """llama.cpp's reference quantization of ``[R, K]`` rows: ``(codes uint8 [R, K], KParams)``.

    ``pack_kblocks(codes, params, qtype)`` equals :func:`quantize_rows`.

    Example:
        >>> codes, p = quantize_params(torch.randn(2, 256), "q4_k")
        >>> codes.shape, p.d.shape, p.sc.shape
        (torch.Size([2, 256]), torch.Size([2, 1]), torch.Size([2, 8]))
    """
    t = kquant_type(qtype)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot quantize non-finite values to {t.name}")
    with torch.no_grad():
        return _reference(x.detach().cpu(), t)


# ---------------------------------------------------------------------------------------------
# values


def subblock_scale_min(params: KParams, qtype: Union[str, KQuantType]):
    """Per-sub-block fp32 ``(step, offset)`` ``[R, K/sub]``, as gguf-py computes them.

    A code ``q`` of sub-block ``j`` dequantizes to ``step_j * q - offset_j`` (mins types; ``q`` unsigned)
    or ``step_j * (q - zero)`` (Q3_K, Q6_K; ``offset`` is None).
    """
    t = kquant_type(qtype)
    R = params.d.shape[0]
    d = params.d.float().repeat_interleave(t.n_sub, 1)
    if t.name == "Q3_K":
        return d * (params.sc.float() - 32.0), None
    step = d * params.sc.float()
    if not t.has_min:
        return step, None
    dm = params.dmin.float().repeat_interleave(t.n_sub, 1)
    return step, dm * params.m.float()


def decode_codes(codes: torch.Tensor, params: KParams, qtype: Union[str, KQuantType]) -> torch.Tensor:
    """fp32 ``[R, K]`` values of unsigned codes and parameters (bit-equal to gguf-py's dequantize)."""
    t = kquant_type(qtype)
    r, k = codes.shape
    step, off = subblock_scale_min(params, t)
    qv = codes.reshape(r, -1, t.sub)
    if t.has_min:
        out = step.unsqueeze(-1) * qv.float() - off.unsqueeze(-1)
    else:
        out = step.unsqueeze(-1) * (qv.to(torch.int32) - t.zero).float()
    return out.reshape(r, k)


def quantize_rows(x: torch.Tensor, qtype: Union[str, KQuantType]) -> torch.Tensor:
    """Quantize ``[R, K]`` rows (K % 256 == 0) to raw super-block bytes, identical to llama.cpp's
    ``quantize_row_qX_K_ref`` (what ``llama-quantize`` writes without an imatrix).

    Example:
        >>> quantize_rows(torch.randn(4, 512), "q4_k").shape
        torch.Size([4, 288])
    """
    t = kquant_type(qtype)
    codes, p = quantize_params(x, t)
    return pack_kblocks(codes, p, t)


def dequantize_rows(raw: torch.Tensor, qtype: Union[str, KQuantType]) -> torch.Tensor:
    """fp32 ``[R, K]`` values of raw super-block bytes, identical to ``gguf.quants.dequantize``.

    Example:
        >>> x = torch.randn(2, 256)
        >>> float((dequantize_rows(quantize_rows(x, "q6_k"), "q6_k") - x).abs().max()) < 0.1
        True
    """
    t = kquant_type(qtype)
    codes, p = unpack_kblocks(raw, t)
    return decode_codes(codes, p, t)


# llama.cpp's ``tensor_type_fallback`` (src/llama-quant.cpp): the type written for a K-quant whose rows
# are not a multiple of 256
KQUANT_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def kquant_fallback(qtype: str, ncols: int) -> str:
    """The GGUF type llama.cpp writes for a ``qtype`` tensor whose rows hold ``ncols`` values: ``qtype``
    itself (upper case) when it fits, else its 32-block fallback (F16 when even that does not fit).
    Non-K types are returned unchanged (upper case).

    >>> kquant_fallback("q4_k", 1536), kquant_fallback("Q4_K", 576), kquant_fallback("Q6_K", 100)
    ('Q4_K', 'Q5_0', 'F16')
    """
    up = str(qtype).upper()
    if not is_kquant(up) or ncols % QK_K == 0:
        return up
    out = KQUANT_FALLBACK[up]
    return out if ncols % 32 == 0 else "F16"
