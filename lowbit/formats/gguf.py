"""llama.cpp legacy block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, bit-exact, in plain PyTorch.

References:
    * ggml-org/llama.cpp ``ggml/src/ggml-quants.c`` (``quantize_row_q4_0_ref`` ... ``quantize_row_q8_0_ref``,
      ``dequantize_row_*``) and the block structs of ``ggml/src/ggml-common.h``.
    * gguf-py 0.19 ``gguf/quants.py`` (the numpy port used as the test oracle), see
      ``shared/docs/formats-bnb-gguf.md`` Part B2/B3.

Every format cuts each row (the last dimension, GGUF ``ne[0]``) into blocks of 32 values. A block
stores an fp16 scale ``d`` (and for the ``_1`` types an fp16 offset ``m``) followed by the codes:

======  =====  ==========================================  ===========================
type    bytes  layout                                      value of code ``q``
======  =====  ==========================================  ===========================
Q4_0    18     d, qs[16]                                   ``(q - 8) * d``
Q4_1    20     d, m, qs[16]                                ``q * d + m``
Q5_0    22     d, qh[4], qs[16]                            ``(q - 16) * d``
Q5_1    24     d, m, qh[4], qs[16]                         ``q * d + m``
Q8_0    34     d, qs[32] (int8)                            ``(q - 128) * d``
======  =====  ==========================================  ===========================

``qs[j]`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble; bit ``j`` of
the little-endian uint32 ``qh`` is bit 4 of element ``j``. Codes are exposed *unsigned* everywhere in
this module (the lowbit convention ``w = (q - z) * s``): Q4_0 codes are 0..15 with an implicit zero
point 8, Q5_0 0..31 with zero point 16, and Q8_0's signed int8 ``qs`` is exposed as ``q + 128``
(0..255, zero point 128), so that every possible int8 byte round-trips.

Reference quantization rules (what ``llama-quantize`` without an imatrix, and gguf-py, produce):

* ``_0`` types: ``max`` is the element of largest ``|x|`` (the first one on ties) *with its sign*,
  ``d = max / -2**(b-1)``, ``id = 1/d`` (0 when d == 0) in fp32, ``q = min(qmax, trunc(x*id + 2**(b-1) + 0.5))``.
* ``_1`` types: ``d = (max - min) / qmax``, ``id`` as above, ``q = min(qmax, trunc((x - min)*id + 0.5))``.
* Q8_0: ``d = max|x| / 127``, ``q = roundf(x * id)`` (half away from zero).
* Codes always come from the fp32 ``id``; ``d`` and ``m`` are cast to fp16 (round to nearest even)
  only when stored, and dequantization uses the fp16 values.

For error-compensated quantization (GPTQ/AWQ producing codes on the exact grid), the rule is split
into :func:`block_params` (the per-block scale, computed once per block of 32 columns) and
:func:`encode_values` (the code of any value for given block parameters); :func:`nearest_codes` is
the alternative that rounds to the nearest point of the stored (fp16) grid, and
:func:`decode_values` gives the value a code dequantizes to. Any codes are valid for
:func:`pack_blocks`, so a GGUF written from them holds exactly the optimised weights.

Known limits of bit-exactness (dequantized values are identical in every case):

* Non-finite inputs, and blocks whose fp32 ``1/d`` overflows (``|max| < ~1e-37``, subnormal scales),
  have implementation-defined codes in llama.cpp itself (a C cast of inf/NaN), so bytes may differ.
* The sign of a stored zero ``m`` for an all-zero Q4_1/Q5_1 block mixing ``0.0`` and ``-0.0``
  (C keeps the first zero it sees; lowbit follows torch.amin; numpy's SIMD reduction differs again).

Raw byte layouts assume a little-endian host (as GGUF files written by default are).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

__all__ = [
    "GGUFType",
    "GGUF_TYPES",
    "GGUF_BLOCK",
    "gguf_type",
    "BlockParams",
    "block_params",
    "encode_values",
    "nearest_codes",
    "decode_values",
    "quantize_codes",
    "quantize_rows",
    "dequantize_rows",
    "unpack_blocks",
    "pack_blocks",
]

GGUF_BLOCK = 32


@dataclass(frozen=True)
class GGUFType:
    """Description of one legacy GGUF block format.

    Attributes:
        name: llama.cpp name, e.g. ``"Q4_0"``.
        block: elements per block (32).
        type_size: bytes per block.
        bits: bits per code.
        asymmetric: True for the ``_1`` types (fp16 offset ``m`` per block).
        ggml_type: the ``GGMLQuantizationType`` integer id.
    """

    name: str
    block: int
    type_size: int
    bits: int
    asymmetric: bool
    ggml_type: int

    @property
    def qmax(self) -> int:
        """Largest unsigned code (15, 31 or 255)."""
        return (1 << self.bits) - 1

    @property
    def zero(self) -> int:
        """Implicit zero point of the unsigned codes (8, 16, 128; 0 for the asymmetric types)."""
        return 0 if self.asymmetric else 1 << (self.bits - 1)

    @property
    def has_qh(self) -> bool:
        """True for the 5-bit types, which store the fifth bits in a uint32 ``qh``."""
        return self.bits == 5


GGUF_TYPES: dict[str, GGUFType] = {
    "q4_0": GGUFType("Q4_0", 32, 18, 4, False, 2),
    "q4_1": GGUFType("Q4_1", 32, 20, 4, True, 3),
    "q5_0": GGUFType("Q5_0", 32, 22, 5, False, 6),
    "q5_1": GGUFType("Q5_1", 32, 24, 5, True, 7),
    "q8_0": GGUFType("Q8_0", 32, 34, 8, False, 8),
}


def gguf_type(qtype: Union[str, int, GGUFType]) -> GGUFType:
    """Look a type up by name (any case, ``"Q4_0"`` or ``"q4_0"``), ggml id (2) or pass a GGUFType through.

    Example:
        >>> gguf_type("Q4_0").type_size
        18
    """
    if isinstance(qtype, GGUFType):
        return qtype
    if isinstance(qtype, int):  # also GGMLQuantizationType, an IntEnum
        for t in GGUF_TYPES.values():
            if t.ggml_type == int(qtype):
                return t
        raise ValueError(f"ggml type id {int(qtype)}: not one of the supported legacy types "
                         f"{ {t.name: t.ggml_type for t in GGUF_TYPES.values()} }")
    key = str(qtype).lower()
    if key not in GGUF_TYPES:
        raise ValueError(f"qtype={qtype!r}: expected one of {sorted(t.name for t in GGUF_TYPES.values())}")
    return GGUF_TYPES[key]


def _check_rows(x: torch.Tensor, what: str = "x") -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D [rows, K], got shape {tuple(x.shape)}")
    r, k = x.shape
    if k % GGUF_BLOCK:
        raise ValueError(f"K={k}: the row length must be a multiple of {GGUF_BLOCK} for GGUF block formats "
                         f"(pad the rows, or store the tensor as F16)")
    return r, k


# ---------------------------------------------------------------------------------------------
# the reference rule, split into per-block parameters and per-value codes


class BlockParams(NamedTuple):
    """Per-block parameters of the reference rule, each ``[R, K // 32]``.

    ``d``/``m`` are what is stored (fp16; ``m`` is None for symmetric types); ``inv`` (fp32 ``1/d``
    before the fp16 cast, 0 for a zero block) and ``base`` (fp32 block minimum, None for symmetric
    types) are what the reference uses to compute codes.
    """

    d: torch.Tensor
    m: Optional[torch.Tensor]
    inv: torch.Tensor
    base: Optional[torch.Tensor]


def _fp32_div(a: torch.Tensor, divisor: float) -> torch.Tensor:
    # a true elementwise IEEE division (never a reciprocal multiply by a scalar)
    return a / torch.full_like(a, divisor)


def block_params(x: torch.Tensor, qtype: Union[str, GGUFType]) -> BlockParams:
    """The scale (and offset) llama.cpp's reference quantizer chooses for each block of 32.

    Args:
        x: ``[R, K]`` values (cast to fp32), K a multiple of 32.
        qtype: "q4_0", "q4_1", "q5_0", "q5_1" or "q8_0" (any case).

    Example (GPTQ-style use, fixing the scale of a block before quantizing its columns one by one):
        >>> w = torch.randn(4, 64)
        >>> p = block_params(w[:, :32], "q4_0")          # scale from the current block
        >>> q = encode_values(w[:, 3], p.inv[:, 0], None, "q4_0")
        >>> wq = decode_values(q, p.d[:, 0], None, "q4_0")
    """
    t = gguf_type(qtype)
    r, k = _check_rows(x)
    xb = x.float().reshape(r, k // GGUF_BLOCK, GGUF_BLOCK)
    if t.asymmetric:
        hi = xb.amax(-1)
        lo = xb.amin(-1)
        d = _fp32_div(hi - lo, float(t.qmax))
        base = lo
    elif t.bits == 8:
        d = _fp32_div(xb.abs().amax(-1), 127.0)
        base = None
    else:
        imax = xb.abs().argmax(-1, keepdim=True)  # first index of the largest |x|
        signed_max = torch.gather(xb, -1, imax).squeeze(-1)
        d = _fp32_div(signed_max, -float(1 << (t.bits - 1)))
        base = None
    inv = torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))
    d16 = d.half()
    m16 = None if base is None else base.half()
    _check_fp16_params(xb, d16, m16, t)
    return BlockParams(d16, m16, inv, base)


def _check_fp16_params(xb: torch.Tensor, d16: torch.Tensor, m16: Optional[torch.Tensor], t: GGUFType) -> None:
    """A clear error when a block's fp16 ``d`` (or ``m``) overflows: the format cannot hold the block."""
    bad = torch.isinf(d16)
    if m16 is not None:
        bad = bad | torch.isinf(m16)
    if not bool(bad.any()):
        return
    row, blk = (int(i) for i in torch.nonzero(bad)[0])
    amax = float(xb[row, blk].abs().max())
    if t.asymmetric:
        limit = f"|x| <= 65,504 and max - min <= {65504 * t.qmax:,} per block (fp16 d and m)"
    elif t.bits == 8:
        limit = f"|x| <= {65504 * 127:,} (fp16 d = max|x| / 127)"
    else:
        limit = f"|x| <= {65504 << (t.bits - 1):,} (fp16 d = max|x| / {1 << (t.bits - 1)})"
    raise ValueError(
        f"{t.name} cannot represent this tensor: {int(bad.sum())} block(s) overflow the format's float16 block "
        f"scale, the first at row {row}, block {blk} (columns {blk * GGUF_BLOCK}..{blk * GGUF_BLOCK + GGUF_BLOCK - 1}, "
        f"max |x| = {amax:.6g}); {t.name} needs {limit}. Scale the tensor down or keep it as F16/F32"
    )


def _roundf(v: torch.Tensor) -> torch.Tensor:
    # C roundf (half away from zero), written exactly as gguf-py's np_roundf
    a = v.abs()
    fl = torch.floor(a)
    a.sub_(fl)  # the exact fractional part
    return fl.add_((a >= 0.5).to(fl.dtype)).copysign_(v)


def encode_values(
    x: torch.Tensor,
    inv: torch.Tensor,
    base: Optional[torch.Tensor],
    qtype: Union[str, GGUFType],
) -> torch.Tensor:
    """Unsigned codes of ``x`` under the reference rule for given block parameters.

    ``inv`` and ``base`` (see :class:`BlockParams`) must broadcast against ``x``; ``base`` is ignored
    by the symmetric types. Returns uint8 codes of ``x``'s shape.

    Example:
        >>> p = block_params(torch.tensor([[1.0] * 31 + [-2.0]]), "q4_0")
        >>> encode_values(torch.tensor([-2.0, 1.0]), p.inv[0], None, "q4_0").tolist()
        [0, 12]
    """
    t = gguf_type(qtype)
    x = x.float()
    inv = inv.float()
    if t.bits == 8:
        return _roundf(x * inv).clamp_(-128, 127).add_(128).to(torch.uint8)
    if t.asymmetric:
        v = (x - base.float()).mul_(inv).add_(0.5)
    else:
        v = (x * inv).add_(t.zero + 0.5)
    # trunc == the C (int8_t)/(uint8_t) cast; the argument is >= 0 up to fp32 rounding
    return v.trunc_().clamp_(0, t.qmax).to(torch.uint8)


def nearest_codes(
    x: torch.Tensor,
    d: torch.Tensor,
    m: Optional[torch.Tensor],
    qtype: Union[str, GGUFType],
) -> torch.Tensor:
    """Codes of the nearest point of the *stored* grid ``decode_values(q, d, m)`` (ties to even).

    An alternative to :func:`encode_values` for error-compensating algorithms, which may prefer to
    round against the fp16 scale that dequantization actually uses. ``d``/``m`` broadcast against x.

    Example:
        >>> nearest_codes(torch.tensor([0.26]), torch.tensor([0.25]).half(), None, "q4_0").tolist()
        [9]
    """
    t = gguf_type(qtype)
    x = x.float()
    df = d.float()
    safe = torch.where(df == 0, torch.ones_like(df), df)
    if t.asymmetric:
        q = torch.round((x - m.float()) / safe)
    else:
        q = torch.round(x / safe) + t.zero
    q = torch.where(df == 0, torch.full_like(q, t.zero), q)
    return q.clamp(0, t.qmax).to(torch.uint8)


def decode_values(
    codes: torch.Tensor,
    d: torch.Tensor,
    m: Optional[torch.Tensor],
    qtype: Union[str, GGUFType],
) -> torch.Tensor:
    """fp32 values of unsigned codes with fp16 ``d`` (and ``m``), computed as llama.cpp/gguf-py do.

    ``(q - z) * d`` for the symmetric types, ``q * d + m`` (multiply, then add) for Q4_1/Q5_1.
    ``d``/``m`` must broadcast against ``codes``.

    Example:
        >>> decode_values(torch.tensor([0, 15], dtype=torch.uint8), torch.tensor(0.5).half(), None, "q4_0")
        tensor([-4.0000,  3.5000])
    """
    t = gguf_type(qtype)
    df = d.float()
    if t.asymmetric:
        return df * codes.float() + m.float()
    return df * (codes.to(torch.int32) - t.zero).float()


def quantize_codes(x: torch.Tensor, qtype: Union[str, GGUFType]):
    """Reference quantization of ``[R, K]`` rows to ``(codes uint8 [R, K], d fp16, m fp16 | None)``.

    ``pack_blocks(*quantize_codes(x, t), t)`` equals :func:`quantize_rows`.

    Example:
        >>> codes, d, m = quantize_codes(torch.randn(2, 64), "q4_1")
        >>> codes.shape, d.shape, m.shape
        (torch.Size([2, 64]), torch.Size([2, 2]), torch.Size([2, 2]))
    """
    t = gguf_type(qtype)
    r, k = _check_rows(x)
    p = block_params(x, t)
    xb = x.float().reshape(r, k // GGUF_BLOCK, GGUF_BLOCK)
    base = None if p.base is None else p.base.unsqueeze(-1)
    codes = encode_values(xb, p.inv.unsqueeze(-1), base, t).reshape(r, k)
    return codes, p.d, p.m


# ---------------------------------------------------------------------------------------------
# byte layout


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    # fp16 [R, nb] -> uint8 [R, nb, 2] (little-endian)
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)


def pack_blocks(
    codes: torch.Tensor,
    d: torch.Tensor,
    m: Optional[torch.Tensor],
    qtype: Union[str, GGUFType],
) -> torch.Tensor:
    """Assemble raw GGUF block bytes from unsigned codes and fp16 scales (exact inverse of unpack_blocks).

    Args:
        codes: uint8 ``[R, K]`` unsigned codes (see the module docstring; Q8_0 codes are ``int8 + 128``).
        d: ``[R, K // 32]`` scales; cast to fp16 (pass fp16 to keep them exact).
        m: ``[R, K // 32]`` offsets for Q4_1/Q5_1, None otherwise.
        qtype: the block format.

    Returns:
        uint8 ``[R, K // 32 * type_size]``.

    Example:
        >>> raw = quantize_rows(torch.randn(3, 64), "q5_1")
        >>> torch.equal(pack_blocks(*unpack_blocks(raw, "q5_1"), "q5_1"), raw)
        True
    """
    t = gguf_type(qtype)
    r, k = _check_rows(codes, "codes")
    nb = k // GGUF_BLOCK
    if tuple(d.shape) != (r, nb):
        raise ValueError(f"d has shape {tuple(d.shape)}, expected {(r, nb)} for codes of shape {(r, k)}")
    if t.asymmetric and (m is None or tuple(m.shape) != (r, nb)):
        got = None if m is None else tuple(m.shape)
        raise ValueError(f"{t.name} needs m of shape {(r, nb)}, got {got}")
    q = codes.to(torch.uint8).reshape(r, nb, GGUF_BLOCK)
    if codes.dtype != torch.uint8 or (t.bits < 8 and bool((q > t.qmax).any())):
        raise ValueError(f"codes must be uint8 in 0..{t.qmax} for {t.name} (dtype {codes.dtype})")
    parts = [_half_bytes(d.to(torch.float16))]
    if t.asymmetric:
        parts.append(_half_bytes(m.to(torch.float16)))
    if t.bits == 8:
        parts.append((q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        if t.has_qh:
            bits = ((q >> 4) & 1).to(torch.int32).reshape(r, nb, 4, 8)
            weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=q.device)
            parts.append((bits * weights).sum(-1).to(torch.uint8))
        lo = q[..., :16] & 0x0F
        hi = q[..., 16:] & 0x0F
        parts.append(lo | (hi << 4))
    return torch.cat(parts, dim=-1).reshape(r, nb * t.type_size)


def _check_raw(raw: torch.Tensor, t: GGUFType) -> tuple[int, int]:
    if raw.dim() != 2 or raw.dtype != torch.uint8:
        raise ValueError(f"raw must be a 2-D uint8 tensor [rows, nbytes], got {raw.dtype} {tuple(raw.shape)}")
    r, n = raw.shape
    if n % t.type_size:
        raise ValueError(f"raw row length {n} bytes is not a multiple of the {t.name} block size "
                         f"({t.type_size} bytes)")
    return r, n // t.type_size


def unpack_blocks(raw: torch.Tensor, qtype: Union[str, GGUFType]):
    """Split raw GGUF block bytes into ``(codes uint8 [R, K], d fp16 [R, K//32], m fp16 [R, K//32] | None)``.

    Lossless: ``pack_blocks(*unpack_blocks(raw, t), t)`` returns ``raw`` byte for byte.

    Example:
        >>> codes, d, m = unpack_blocks(quantize_rows(torch.randn(2, 32), "q8_0"), "q8_0")
        >>> codes.shape, d.dtype, m
        (torch.Size([2, 32]), torch.float16, None)
    """
    t = gguf_type(qtype)
    r, nb = _check_raw(raw, t)
    b = raw.reshape(r, nb, t.type_size)
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(r, nb)
    off = 2
    m = None
    if t.asymmetric:
        m = b[..., 2:4].contiguous().view(torch.float16).reshape(r, nb)
        off = 4
    if t.bits == 8:
        q = (b[..., off:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return q.reshape(r, nb * GGUF_BLOCK), d, m
    qh = None
    if t.has_qh:
        qh = b[..., off:off + 4]
        off += 4
    qs = b[..., off:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    if qh is not None:
        shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)
        hb = ((qh.unsqueeze(-1) >> shifts) & 1).reshape(r, nb, GGUF_BLOCK)
        q = q | (hb << 4)
    return q.reshape(r, nb * GGUF_BLOCK), d, m


# ---------------------------------------------------------------------------------------------
# row-level entry points (used by lowbit.tensor.functional for the q4_0 .. q8_0 schemes)


def scale_rows(raw: torch.Tensor, qtype: Union[str, GGUFType], factor: torch.Tensor) -> torch.Tensor:
    """Raw blocks of the rows ``W / factor[:, None]``: every block's ``d`` (and ``m``) divided by its row's factor.

    The codes are kept; ``d``/``m`` are re-rounded to fp16 as stored (so the result is what a file
    holds, not exactly ``W / factor``). Used to fold AWQ's input scales into an upstream GGUF linear.
    K-quant types (``"q4_k"`` ...): every super-block's fp16 ``d`` (and ``dmin``) divided, the 4/6-bit
    sub-block scale integers and the codes kept.

    Example:
        >>> raw = quantize_rows(torch.randn(2, 32), "q4_0")
        >>> torch.equal(scale_rows(raw, "q4_0", torch.ones(2)), raw)
        True
    """
    from lowbit.formats.kquants import is_kquant

    if is_kquant(qtype):  # K-quant super-blocks: their fp16 d (and dmin); sub-block integers kept
        from lowbit.formats.kquants import KParams, pack_kblocks, unpack_kblocks

        codes, p = unpack_kblocks(raw, qtype)
        f = _row_factor(factor, raw, codes.shape[0])
        return pack_kblocks(codes, KParams((p.d.float() / f).half(),
                                           None if p.dmin is None else (p.dmin.float() / f).half(), p.sc, p.m),
                            qtype)
    t = gguf_type(qtype)
    codes, d, m = unpack_blocks(raw, t)
    f = _row_factor(factor, raw, codes.shape[0])
    d = (d.float() / f).half()
    m = None if m is None else (m.float() / f).half()
    return pack_blocks(codes, d, m, t)


def _row_factor(factor: torch.Tensor, raw: torch.Tensor, rows: int) -> torch.Tensor:
    f = factor.to(device=raw.device, dtype=torch.float32).reshape(-1, 1)
    if f.shape[0] != rows:
        raise ValueError(f"factor has {f.shape[0]} entries, the blocks have {rows} rows")
    if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
        raise ValueError("factor must be finite and positive")
    return f


def quantize_rows(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize ``[R, K]`` rows to raw GGUF block bytes, identical to ``gguf.quants.quantize``.

    Args:
        x: ``[R, K]`` tensor of any float dtype (cast to fp32 first, as gguf-py does); K % 32 == 0.
        qtype: "q4_0", "q4_1", "q5_0", "q5_1" or "q8_0" (any case).

    Returns:
        uint8 ``[R, K // 32 * type_size]``.

    Example:
        >>> quantize_rows(torch.randn(4, 64), "q4_0").shape
        torch.Size([4, 36])
    """
    t = gguf_type(qtype)
    return pack_blocks(*quantize_codes(x, t), t)


def dequantize_rows(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """fp32 ``[R, K]`` values of raw GGUF block bytes, identical to ``gguf.quants.dequantize``.

    Example:
        >>> x = torch.randn(4, 64)
        >>> (dequantize_rows(quantize_rows(x, "q8_0"), "q8_0") - x).abs().max() < 0.05
        tensor(True)
    """
    t = gguf_type(qtype)
    r, nb = _check_raw(raw, t)
    codes, d, m = unpack_blocks(raw, t)
    qb = codes.reshape(r, nb, GGUF_BLOCK)
    out = decode_values(qb, d.unsqueeze(-1), None if m is None else m.unsqueeze(-1), t)
    return out.reshape(r, nb * GGUF_BLOCK)
