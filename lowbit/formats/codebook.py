"""Codebook (lookup-table) quantization with bitsandbytes-identical numerics.

References:
    * QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the 4-bit NormalFloat (NF4) table and double
      quantization of the block absmax ("compress_statistics").
    * 8-bit optimizers via block-wise quantization (Dettmers et al. 2021, arXiv:2110.02861): the
      8-bit dynamic map and block-wise absmax scaling.
    * bitsandbytes 0.50.2: ``functional.get_4bit_type`` / ``create_dynamic_map`` / ``quantize_4bit``,
      the pure-PyTorch kernels in ``backends/default/ops.py`` and the native CPU kernel
      ``quantize_cpu_impl`` in ``csrc/cpu_ops.cpp`` (see ``shared/docs/formats-bnb-gguf.md`` Part A).

Two rounding rules exist in bitsandbytes and both are reproduced bit for bit:

* :func:`quantize_blockwise` is the exact nearest-code rule of the default (PyTorch) backend, which
  bitsandbytes uses for ``quantize_4bit`` on every non-CUDA device: fp32 cast, full blocks scaled by a
  reciprocal multiply, the ragged last block by true division, ``bucketize`` against float32
  midpoints of the sorted code (a value on a midpoint goes to the lower code).
* :func:`quantize_blockwise_lut` is the native CPU 8-bit path (a 65,536-entry lookup table over
  [-1, 1]); bitsandbytes takes it for ``quantize_blockwise`` on CPU whenever its native library is
  loaded, and therefore for the nested absmax of double quantization (:func:`double_quantize`).

Codes are returned unpacked (one uint8 per element); ``lowbit.tensor.packing.pack_bits(codes, 4)``
gives bitsandbytes' nibble layout (first element in the high nibble). :func:`pack_4bit` also
reproduces bitsandbytes' padding nibble for an odd element count (the code of 0.0).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = [
    "NF4",
    "FP4",
    "normal_map",
    "nf8_code",
    "dynamic_map",
    "get_code",
    "CODE_NAMES",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_blockwise_lut",
    "lut_table",
    "double_quantize",
    "double_dequantize",
    "zero_code",
    "pack_4bit",
    "unpack_4bit",
]

# ---------------------------------------------------------------------------------------------
# tables

# bitsandbytes get_4bit_type("nf4"): create_normal_map(offset=0.9677083, use_extra_value=True),
# hard-coded there as Python floats; float32, sorted, 0.0 at index 7.
NF4: torch.Tensor = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)


def _fp4_table() -> torch.Tensor:
    # bitsandbytes get_4bit_type("fp4"): e2m1 magnitudes by the three low bits, bit 3 = sign, then
    # divided (in float32) by the absolute maximum 12. bnb writes index 8 as the int -0, so it is +0.0.
    raw = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    t = torch.tensor(raw + [0.0] + [-v for v in raw[1:]], dtype=torch.float32)
    return t.div_(t.abs().max())


FP4: torch.Tensor = _fp4_table()


def normal_map(bits: int, offset: float | None = None) -> torch.Tensor:
    """NormalFloat table with ``2**(bits-1)`` positive, ``2**(bits-1)-1`` negative values and 0.

    Built like bitsandbytes ``create_normal_map(offset, use_extra_value=True)``: standard-normal
    quantiles at ``linspace(offset, 0.5, 2**(bits-1)+1)[:-1]`` (positive side) and
    ``linspace(offset, 0.5, 2**(bits-1))[:-1]`` (negative side, mirrored), plus an exact zero,
    rounded to float32, sorted and divided by the maximum so the table spans [-1, 1]. ``ndtri`` in
    float64 replaces scipy's ``norm.ppf``.

    ``offset`` defaults to the QLoRA choice ``1 - (1/(2(2^b-1)) + 1/(2*2^b)) / 2`` (0.96770833
    for 4 bits, which bitsandbytes truncates to the literal 0.9677083).

    Example::

        >>> torch.equal(normal_map(4, 0.9677083), NF4)
        True
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: must be an integer in 2..8")
    n = 2**bits
    if offset is None:
        offset = 1.0 - 0.5 * (1.0 / (2 * (n - 1)) + 1.0 / (2 * n))
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset={offset!r}: must lie in (0.5, 1)")
    half = n // 2
    # bnb: torch.linspace (float32) handed to scipy (float64), results kept as Python floats
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float()
    values = values.sort().values
    return values / values.max()


@lru_cache(maxsize=None)
def _nf8() -> torch.Tensor:
    return normal_map(8)


def nf8_code() -> torch.Tensor:
    """8-bit NormalFloat table: 127 negative, 0.0 (index 127), 128 positive, float32 in [-1, 1].

    ``normal_map(8)``: the NF4 construction with 256 levels and the QLoRA offset formula for 8 bits
    (offset 0.998043). bitsandbytes ships no NF8 table, so there is no external oracle; the
    construction reproduces bitsandbytes' NF4 exactly when asked for 4 bits.

    Example::

        >>> c = nf8_code(); (c.numel(), float(c[127]), float(c[-1]))
        (256, 0.0, 1.0)
    """
    return _nf8().clone()


@lru_cache(maxsize=None)
def _dynamic(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    # Same float32 linspace / midpoint / scaling arithmetic as bitsandbytes create_dynamic_map, so the
    # table is bit-identical (values travel through Python floats and are sorted there, as in bnb).
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        exp = non_sign_bits - max_exponent_bits
        items = int(2 ** (i + exp) + 1 if signed else 2 ** (i + exp + 1) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic quantization map (``create_dynamic_map``), float32 [256], sorted.

    With the defaults: 127 negative values, 0.0 at index 127, 127 positive values and 1.0 at index
    255; ``code[0] = -0.99296875`` (float32: -0.9929687380...). This is the code of ``bitsandbytes.functional.quantize_blockwise``
    and of the nested absmax in double quantization.

    Example::

        >>> c = dynamic_map(); (round(float(c[0]), 8), float(c[127]), float(c[255]))
        (-0.99296874, 0.0, 1.0)
    """
    if total_bits < 2 or total_bits > 8 or max_exponent_bits >= total_bits:
        raise ValueError(
            f"total_bits={total_bits}, max_exponent_bits={max_exponent_bits}: need 2 <= total_bits <= 8 "
            "and max_exponent_bits < total_bits"
        )
    return _dynamic(bool(signed), int(max_exponent_bits), int(total_bits)).clone()


CODE_NAMES = ("nf4", "fp4", "nf8", "dynamic8")


def get_code(name: str) -> torch.Tensor:
    """The float32 codebook for ``name`` (``nf4``, ``fp4``, ``nf8``, ``dynamic8``/``dynamic``), a copy.

    Example::

        >>> get_code("nf4")[7].item()
        0.0
    """
    key = name.lower() if isinstance(name, str) else name
    if key == "nf4":
        return NF4.clone()
    if key == "fp4":
        return FP4.clone()
    if key == "nf8":
        return nf8_code()
    if key in ("dynamic8", "dynamic"):
        return dynamic_map()
    raise ValueError(f"unknown codebook {name!r}: expected one of {', '.join(CODE_NAMES)}")


def zero_code(code: torch.Tensor) -> int:
    """The code :func:`quantize_blockwise` gives an exact 0.0 (bitsandbytes' 4-bit padding nibble).

    7 for NF4, 0 for FP4, 127 for the dynamic map.
    """
    bounds, order = _bounds(code)
    i = int(torch.bucketize(torch.zeros(1, device=bounds.device), bounds)[0])
    return int(order[i])


# ---------------------------------------------------------------------------------------------
# exact nearest-code blockwise quantization (bitsandbytes default backend)


def _check_code(code: torch.Tensor) -> torch.Tensor:
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not 2 <= code.numel() <= 256:
        got = tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__
        raise ValueError(f"code: expected a 1-D tensor of 2..256 values, got {got}")
    return code.float()


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize <= 0:
        raise ValueError(f"blocksize={blocksize!r}: must be a positive integer")


def _bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    code = _check_code(code)
    # stable: FP4's two zeros (indices 0 and 8) keep index order, which is what bnb's argsort yields
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    return mids, order


def _flat_float(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() == 0:
        raise ValueError("x is empty: nothing to quantize")
    return x.reshape(-1).float()


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code blockwise quantization over the flattened tensor (bitsandbytes default backend).

    Returns ``(codes, absmax)``: uint8 ``[n]`` indices into ``code`` and float32 ``[ceil(n/blocksize)]``
    block absmax. Full blocks: ``clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``; the ragged last block
    uses its own absmax (stored clamped to >= 1e-38) and true division. The scaled value is
    bucketized against the float32 midpoints of the sorted code (ties go to the lower code) and
    mapped back to the code's own index order. This is bit-identical to
    ``bitsandbytes.functional.quantize_4bit`` codes (before packing) on CPU.

    Example::

        >>> q, absmax = quantize_blockwise(torch.randn(1000), NF4, 64)
        >>> q.shape, absmax.shape
        (torch.Size([1000]), torch.Size([16]))
    """
    _check_blocksize(blocksize)
    flat = _flat_float(x)
    bounds, order = _bounds(code.to(flat.device))
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().amax(dim=-1) if full else flat.new_zeros(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    idx = torch.bucketize(scaled, bounds)
    return order[idx].to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32, then cast to ``out_dtype``; flat ``[n]``.

    Identical to ``bitsandbytes.functional.dequantize_4bit`` / ``dequantize_blockwise`` (the CPU
    native kernels compute the same float32 product and round to bf16/fp16 to nearest even).

    Example::

        >>> x = torch.randn(300)
        >>> q, a = quantize_blockwise(x, NF4, 64)
        >>> dequantize_blockwise(q, a, NF4, 64).shape
        torch.Size([300])
    """
    _check_blocksize(blocksize)
    table = _check_code(code).to(codes.device)
    q = codes.reshape(-1)
    n = q.numel()
    nblocks = -(-n // blocksize)
    absmax = absmax.reshape(-1).float()
    if absmax.numel() != nblocks:
        raise ValueError(
            f"absmax has {absmax.numel()} entries; {nblocks} expected for {n} codes in blocks of {blocksize}"
        )
    vals = table[q.long()]
    pad = nblocks * blocksize - n
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    out = (vals.view(nblocks, blocksize) * absmax.view(-1, 1)).reshape(-1)[:n]
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# bitsandbytes native CPU 8-bit path: 65,536-entry lookup table

_LUT_SIZE = 65536


def lut_table(code: torch.Tensor) -> torch.Tensor:
    """The 65,536-entry table of bitsandbytes' native CPU quantizer for a sorted ``code``.

    Entry ``k`` stands for ``v_k = -1 + (2k)/65535`` (float32 arithmetic) and holds the number of
    float32 midpoints ``0.5 * (code[i] + code[i+1])`` that are strictly below ``v_k``.
    """
    c = _check_code(code)
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError("code must be sorted ascending for the lookup-table quantizer (as bitsandbytes assumes)")
    mids = 0.5 * (c[:-1] + c[1:])
    k = torch.arange(_LUT_SIZE, dtype=torch.float32, device=c.device)
    v = -1.0 + (2.0 * k) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids, v, right=False).to(torch.uint8)


def _lut_index(s: torch.Tensor) -> torch.Tensor:
    # C: (uint16)((clamp(s, -1, 1) + 1.0f) * 0.5f * 65535 + 0.5f), float32 throughout. Whether the
    # compiler fuses the last multiply-add into an FMA does not matter: 0.5 lies on the float32 grid
    # of the product, so both roundings give the same index (checked exhaustively near binade edges).
    t = (torch.clamp(s, -1.0, 1.0) + 1.0) * 0.5
    return (t * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, like the C cast


def quantize_blockwise_lut(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization exactly as bitsandbytes' native CPU kernel does it.

    ``bitsandbytes.functional.quantize_blockwise`` on CPU (native library loaded, fp32/fp16/bf16 input)
    computes per block ``absmax = max|x|`` (no clamp; every block, the ragged tail included, scales
    by ``x * (1/absmax)``), maps the scaled value to a 16-bit index of :func:`lut_table` and reads the
    code from it; an all-zero block gets code 0 everywhere. This differs from the exact nearest
    code (:func:`quantize_blockwise`) for ~0.15% of normal inputs. ``code`` must be sorted.

    Returns ``(codes uint8 [n], absmax float32 [ceil(n/blocksize)])``.

    Example::

        >>> q, a = quantize_blockwise_lut(torch.randn(5000), dynamic_map(), 4096)
        >>> q.dtype, a.shape
        (torch.uint8, torch.Size([2]))
    """
    _check_blocksize(blocksize)
    flat = _flat_float(x)
    table = lut_table(code.to(flat.device))
    n = flat.numel()
    nblocks = -(-n // blocksize)
    pad = nblocks * blocksize - n
    padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    blocks = padded.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=-1)  # zero padding cannot change a max of |x|
    inv = 1.0 / absmax  # float32; inf for an all-zero block (handled below)
    scaled = blocks * inv.view(-1, 1)
    sub = torch.isinf(inv) & (absmax > 0)
    if bool(sub.any()):  # subnormal absmax: 1/absmax overflows float32, divide instead (bnb's kernel yields garbage)
        scaled = torch.where(sub.view(-1, 1), blocks / torch.where(sub, absmax, torch.ones_like(absmax)).view(-1, 1),
                             scaled)
    q = table[_lut_index(scaled).clamp_(0, _LUT_SIZE - 1)]
    q = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].contiguous(), absmax


# ---------------------------------------------------------------------------------------------
# double quantization of the block absmax (bitsandbytes compress_statistics)


def double_quantize(
    absmax: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize first-level absmax as ``quantize_4bit(..., compress_statistics=True)`` does on CPU.

    ``offset = absmax.mean()`` (float32), then ``absmax - offset`` is quantized with the 8-bit
    dynamic map in blocks of ``blocksize`` (bitsandbytes uses 256) through the native CPU lookup-table
    path (:func:`quantize_blockwise_lut`). Returns ``(qabsmax uint8 [n], absmax2 float32
    [ceil(n/blocksize)], offset float32 0-d)`` = bnb's ``state.absmax``, ``state.state2.absmax`` and
    ``state.offset``.

    Example::

        >>> q, a2, off = double_quantize(torch.rand(1000))
        >>> q.dtype, a2.shape, off.shape
        (torch.uint8, torch.Size([4]), torch.Size([]))
    """
    am = absmax.reshape(-1).float()
    offset = am.mean()
    if not bool(torch.isfinite(offset)):  # the float32 sum overflows for absmax near 3.4e38
        offset = am.double().mean().float()
    q, absmax2 = quantize_blockwise_lut(am - offset, _dynamic(True, 7, 8).to(am.device), blocksize)
    return q, absmax2, offset


def double_dequantize(
    qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor | float, blocksize: int = 256
) -> torch.Tensor:
    """The float32 absmax bitsandbytes' ``dequantize_4bit`` reconstructs from a nested state.

    ``dynamic_map()[q] * absmax2[block]`` (float32), then ``+ offset`` (float32), two roundings.

    Example::

        >>> a = torch.rand(1000)
        >>> (double_dequantize(*double_quantize(a)) - a).abs().max() < 0.01
        tensor(True)
    """
    code = _dynamic(True, 7, 8).to(qabsmax.device)
    base = dequantize_blockwise(qabsmax, absmax2, code, blocksize, torch.float32)
    off = offset if isinstance(offset, torch.Tensor) else torch.tensor(offset, dtype=torch.float32)
    return base + off.to(device=base.device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# bitsandbytes 4-bit byte layout


def pack_4bit(codes: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
    """Pack 4-bit codes two per byte, first in the high nibble, as bitsandbytes stores them.

    For an odd count, bitsandbytes quantizes an appended 0.0, so the last low nibble is
    ``zero_code(code)`` (7 for NF4, 0 for FP4); pass ``code`` to reproduce that byte exactly
    (``pack_bits`` pads with 0). Returns uint8 ``[(n+1)//2]``.

    Example::

        >>> pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8), NF4).tolist()
        [18, 55]
    """
    q = codes.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        pad = zero_code(code) if code is not None else 0
        q = torch.cat([q, q.new_full((1,), pad)])
    if bool((q > 15).any()):
        raise ValueError("pack_4bit: codes must be < 16")
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``n`` codes (uint8)."""
    p = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    if p.numel() * 2 < n:
        raise ValueError(f"packed buffer holds {p.numel()} bytes, {math.ceil(n / 2)} needed for {n} codes")
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]
