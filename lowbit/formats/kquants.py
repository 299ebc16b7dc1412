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

QK_K = 256
_GROUP_MAX_EPS = np.float32(1e-15)


@dataclass(frozen=True)
class KQuantType:
    """Description of one K-quant super-block format.

    Attributes:
        name: llama.cpp name, e.g. ``"Q4_K"``.
        ggml_type: the ``GGMLQuantizationType`` integer id.
        type_size: bytes per super-block of 256 values.
        bits: bits per code.
        sub: elements per sub-block (16 or 32).
        has_min: True when sub-blocks carry a min (Q2_K, Q4_K, Q5_K: ``d*sc*q - dmin*m``).
    """

    name: str
    ggml_type: int
    type_size: int
    bits: int
    sub: int
    has_min: bool
    block: int = QK_K

    @property
    def qmax(self) -> int:
        """Largest unsigned code."""
        return (1 << self.bits) - 1

    @property
    def n_sub(self) -> int:
        """Sub-blocks per super-block."""
        return QK_K // self.sub

    @property
    def zero(self) -> int:
        """Implicit zero point of the unsigned codes (4 for Q3_K, 32 for Q6_K, 0 with a min)."""
        return 0 if self.has_min else 1 << (self.bits - 1)

    @property
    def bpw(self) -> float:
        """Bits per weight, scales included."""
        return self.type_size * 8 / QK_K


KQUANT_TYPES: dict[str, KQuantType] = {
    "q2_k": KQuantType("Q2_K", 10, 84, 2, 16, True),
    "q3_k": KQuantType("Q3_K", 11, 110, 3, 16, False),
    "q4_k": KQuantType("Q4_K", 12, 144, 4, 32, True),
    "q5_k": KQuantType("Q5_K", 13, 176, 5, 32, True),
    "q6_k": KQuantType("Q6_K", 14, 210, 6, 16, False),
}


def is_kquant(qtype) -> bool:
    """True when ``qtype`` names a K-quant type (any case) or is a :class:`KQuantType`.

    >>> is_kquant("Q4_K"), is_kquant("q4_0")
    (True, False)
    """
    if isinstance(qtype, KQuantType):
        return True
    if isinstance(qtype, int):
        return any(t.ggml_type == int(qtype) for t in KQUANT_TYPES.values())
    return str(qtype).lower() in KQUANT_TYPES


def kquant_type(qtype: Union[str, int, KQuantType]) -> KQuantType:
    """Look a type up by name (any case), ggml id, or pass a KQuantType through.

    >>> kquant_type("Q4_K").type_size
    144
    """
    if isinstance(qtype, KQuantType):
        return qtype
    if isinstance(qtype, int):
        for t in KQUANT_TYPES.values():
            if t.ggml_type == int(qtype):
                return t
        raise ValueError(f"ggml type id {int(qtype)}: not a K-quant type "
                         f"{ {t.name: t.ggml_type for t in KQUANT_TYPES.values()} }")
    key = str(qtype).lower()
    if key not in KQUANT_TYPES:
        raise ValueError(f"qtype={qtype!r}: expected one of {sorted(t.name for t in KQUANT_TYPES.values())}")
    return KQUANT_TYPES[key]


def _check_rows(x: torch.Tensor, what: str = "x") -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D [rows, K], got shape {tuple(x.shape)}")
    r, k = x.shape
    if k % QK_K:
        raise ValueError(f"K={k}: the row length must be a multiple of {QK_K} for K-quant super-blocks "
                         f"(llama.cpp falls back to a 32-block type for such tensors)")
    return r, k


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


class KParams(NamedTuple):
    """What a K-quant super-block stores, besides the codes.

    ``d``/``dmin``: fp16 ``[R, K/256]`` (``dmin`` None for Q3_K/Q6_K); ``sc``: int16 ``[R, K/sub]`` the
    stored sub-block scale integers (Q2_K 0..15, Q3_K 0..63 with offset 32, Q4_K/Q5_K 0..63, Q6_K
    -128..127); ``m``: int16 ``[R, K/sub]`` sub-block min integers (None without mins).
    """

    d: torch.Tensor
    dmin: Optional[torch.Tensor]
    sc: torch.Tensor
    m: Optional[torch.Tensor]


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
# byte layout


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    return h.to(torch.float16).contiguous().view(torch.uint8).reshape(*h.shape, 2)


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8, n] 0/1 values (bit b in row b) -> [..., n] uint8."""
    w = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=bits.device).reshape(8, 1)
    return (bits.to(torch.int32) * w).sum(-2).to(torch.uint8)


def _pack_scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """6-bit scales/mins [S, 8] -> scales[12] (get_scale_min_k4 layout)."""
    sc = sc.to(torch.int32)
    m = m.to(torch.int32)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], 1).to(torch.uint8)


def _unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return sc.to(torch.int16), mn.to(torch.int16)


def pack_kblocks(codes: torch.Tensor, params: KParams, qtype: Union[str, KQuantType]) -> torch.Tensor:
    """Raw super-block bytes ``uint8 [R, K/256 * type_size]`` from unsigned codes and :class:`KParams`.

    Exact inverse of :func:`unpack_kblocks`; any codes/integers in range are valid.

    Example:
        >>> raw = quantize_rows(torch.randn(3, 256), "q3_k")
        >>> torch.equal(pack_kblocks(*unpack_kblocks(raw, "q3_k"), "q3_k"), raw)
        True
    """
    t = kquant_type(qtype)
    r, k = _check_rows(codes, "codes")
    nsb = k // QK_K
    S = r * nsb
    if codes.dtype != torch.uint8 or bool((codes > t.qmax).any()):
        raise ValueError(f"codes must be uint8 in 0..{t.qmax} for {t.name} (dtype {codes.dtype})")
    if tuple(params.d.shape) != (r, nsb):
        raise ValueError(f"d has shape {tuple(params.d.shape)}, expected {(r, nsb)}")
    if tuple(params.sc.shape) != (r, nsb * t.n_sub):
        raise ValueError(f"sc has shape {tuple(params.sc.shape)}, expected {(r, nsb * t.n_sub)}")
    if t.has_min and (params.m is None or params.dmin is None):
        raise ValueError(f"{t.name} needs sub-block mins m and dmin")
    q = codes.reshape(S, QK_K).to(torch.int32)
    sc = params.sc.reshape(S, t.n_sub).to(torch.int32)
    d = _half_bytes(params.d.reshape(S))
    if t.name == "Q2_K":
        m = params.m.reshape(S, t.n_sub).to(torch.int32)
        if bool(((sc < 0) | (sc > 15) | (m < 0) | (m > 15)).any()):
            raise ValueError("Q2_K sub-block scales and mins must be in 0..15")
        scales = (sc | (m << 4)).to(torch.uint8)
        qq = q.reshape(S, 2, 4, 32)  # element 128c + 32s + l -> bits 2s of byte 32c + l
        qs = (qq[:, :, 0] | (qq[:, :, 1] << 2) | (qq[:, :, 2] << 4) | (qq[:, :, 3] << 6)).reshape(S, 64)
        parts = [scales, qs.to(torch.uint8), d, _half_bytes(params.dmin.reshape(S))]
    elif t.name == "Q3_K":
        if bool(((sc < 0) | (sc > 63)).any()):
            raise ValueError("Q3_K sub-block scales must be in 0..63 (offset 32)")
        hmask = _bits_to_bytes((q >> 2 & 1).reshape(S, 8, 32))
        low = (q & 3).reshape(S, 2, 4, 32)
        qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(S, 64)
        lo4 = sc & 0xF
        scl = lo4[:, :8] | (lo4[:, 8:] << 4)
        hi2 = (sc >> 4).reshape(S, 4, 4)  # [j // 4, j % 4]
        sch = hi2[:, 0] | (hi2[:, 1] << 2) | (hi2[:, 2] << 4) | (hi2[:, 3] << 6)
        parts = [hmask, qs.to(torch.uint8), torch.cat([scl, sch], 1).to(torch.uint8), d]
    elif t.name in ("Q4_K", "Q5_K"):
        m = params.m.reshape(S, t.n_sub).to(torch.int32)
        if bool(((sc < 0) | (sc > 63) | (m < 0) | (m > 63)).any()):
            raise ValueError(f"{t.name} sub-block scales and mins must be in 0..63")
        qq = q.reshape(S, 4, 2, 32)
        qs = ((qq[:, :, 0] & 0xF) | ((qq[:, :, 1] & 0xF) << 4)).reshape(S, 128).to(torch.uint8)
        parts = [d, _half_bytes(params.dmin.reshape(S)), _pack_scales_k4(sc, m)]
        if t.name == "Q5_K":
            parts.append(_bits_to_bytes((q >> 4 & 1).reshape(S, 8, 32)))
        parts.append(qs)
    else:  # Q6_K
        if bool(((sc < -128) | (sc > 127)).any()):
            raise ValueError("Q6_K sub-block scales must be in -128..127")
        qq = q.reshape(S, 2, 4, 32)  # half h, quarter s, l
        ql = torch.cat([(qq[:, :, 0] & 0xF) | ((qq[:, :, 2] & 0xF) << 4),
                        (qq[:, :, 1] & 0xF) | ((qq[:, :, 3] & 0xF) << 4)], 2).reshape(S, 128)
        hb = qq >> 4
        qh = (hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)).reshape(S, 64)
        parts = [ql.to(torch.uint8), qh.to(torch.uint8), sc.to(torch.int8).view(torch.uint8), d]
    return torch.cat(parts, 1).reshape(r, nsb * t.type_size)


def unpack_kblocks(raw: torch.Tensor, qtype: Union[str, KQuantType]):
    """Split raw super-block bytes into ``(codes uint8 [R, K], KParams)``; lossless.

    Example:
        >>> codes, p = unpack_kblocks(quantize_rows(torch.randn(2, 512), "q6_k"), "q6_k")
        >>> codes.shape, p.sc.shape, p.dmin
        (torch.Size([2, 512]), torch.Size([2, 32]), None)
    """
    t = kquant_type(qtype)
    if raw.dim() != 2 or raw.dtype != torch.uint8:
        raise ValueError(f"raw must be a 2-D uint8 tensor [rows, nbytes], got {raw.dtype} {tuple(raw.shape)}")
    r, n = raw.shape
    if n % t.type_size:
        raise ValueError(f"raw row length {n} bytes is not a multiple of the {t.name} block size ({t.type_size})")
    nsb = n // t.type_size
    S = r * nsb
    b = raw.reshape(S, t.type_size)

    def half(off):
        return b[:, off:off + 2].contiguous().view(torch.float16).reshape(r, nsb)

    def bits_of(bytes_, nbits):  # [S, 32] bytes -> [S, nbits*32] element 32*bit + l
        sh = torch.arange(nbits, dtype=torch.int32, device=raw.device).reshape(1, nbits, 1)
        return ((bytes_.to(torch.int32).unsqueeze(1) >> sh) & 1).reshape(S, -1)

    dmin = m = None
    if t.name == "Q2_K":
        scales = b[:, :16].to(torch.int16)
        qs = b[:, 16:80].to(torch.int32).reshape(S, 2, 1, 32)
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
        q = ((qs >> sh) & 3).reshape(S, QK_K)
        d, dmin = half(80), half(82)
        sc, m = scales & 0xF, scales >> 4
    elif t.name == "Q3_K":
        h = bits_of(b[:, :32], 8)
        qs = b[:, 32:96].to(torch.int32).reshape(S, 2, 1, 32)
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
        q = ((qs >> sh) & 3).reshape(S, QK_K) | (h << 2)
        s12 = b[:, 96:108].to(torch.int32)
        lo = torch.cat([s12[:, :8] & 0xF, s12[:, :8] >> 4], 1)
        hi = ((s12[:, 8:12].unsqueeze(1) >> (2 * torch.arange(4).reshape(1, 4, 1))) & 3).reshape(S, 16)
        sc = (lo | (hi << 4)).to(torch.int16)
        d = half(108)
    elif t.name in ("Q4_K", "Q5_K"):
        d, dmin = half(0), half(2)
        sc, m = _unpack_scales_k4(b[:, 4:16])
        off = 16
        qh = None
        if t.name == "Q5_K":
            qh = bits_of(b[:, 16:48], 8)
            off = 48
        qs = b[:, off:off + 128].to(torch.int32).reshape(S, 4, 1, 32)
        q = ((qs >> torch.tensor([0, 4], dtype=torch.int32).reshape(1, 1, 2, 1)) & 0xF).reshape(S, QK_K)
        if qh is not None:
            q = q | (qh << 4)
    else:  # Q6_K
        ql = b[:, :128].to(torch.int32).reshape(S, 2, 1, 64)
        ql = ((ql >> torch.tensor([0, 4], dtype=torch.int32).reshape(1, 1, 2, 1)) & 0xF).reshape(S, 2, 128)
        qh = b[:, 128:192].to(torch.int32).reshape(S, 2, 1, 32)
        qh = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)) & 3).reshape(S, 2, 128)
        q = (ql | (qh << 4)).reshape(S, QK_K)
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.int16)
        d = half(208)
    codes = q.to(torch.uint8).reshape(r, nsb * QK_K)
    return codes, KParams(d, dmin, sc.reshape(r, -1), None if m is None else m.to(torch.int16).reshape(r, -1))


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
