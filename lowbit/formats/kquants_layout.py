"""K-quant byte layout: llama.cpp's ``block_q2_K`` .. ``block_q6_K`` packed from / unpacked to codes and
:class:`KParams` (split from :mod:`lowbit.formats.kquants`, which re-exports every name)."""
from __future__ import annotations

from typing import Union

import torch

from lowbit.formats.kquants_types import (  # noqa: F401
    QK_K,
    _GROUP_MAX_EPS,
    KQuantType,
    KQUANT_TYPES,
    is_kquant,
    kquant_type,
    _check_rows,
    KParams,
)


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
