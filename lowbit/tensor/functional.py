"""The primitive API: ``quantize(tensor, scheme, ...) -> QuantState`` and ``dequantize(state)``.

Schemes register by name in :data:`SCHEMES`; each one quantizes the grouped 2-D view from
:mod:`lowbit.tensor.granularity` with the numeric rules of :mod:`lowbit.formats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowbit._registry import Registry
from lowbit.formats import affine, fp8
from lowbit.tensor.granularity import Grouping, Layout, from_view, pad_groups, resolve_layout, to_view, unpad_groups
from lowbit.tensor.packing import pack_bits, packed_nbytes, unpack_bits
from lowbit.tensor.state import QuantState

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Scheme:
    """A registered quantization scheme: ``kind`` selects the numeric family in ``formats/``."""

    name: str
    kind: str  # affine | codebook | fp8 | gguf
    bits: int
    symmetric: bool = True
    description: str = ""


SCHEMES: Registry[Scheme] = Registry("scheme")


@dataclass(frozen=True)
class SchemeKind:
    """A numeric family of schemes: how its states are made from and turned back into floats.

    ``quantize(tensor, scheme, layout, scale_dtype) -> QuantState`` quantizes the grouped view of
    :mod:`lowbit.tensor.granularity` (``layout`` already resolved); ``dequantize(state, layout) -> fp32 [R, K]``
    returns the values of that view (the caller saturates them to the state's dtype and restores the shape);
    ``data_numel(state)`` the number of elements of ``state.data`` (default: the bit-packed codes).
    """

    name: str
    quantize: Callable[..., QuantState]
    dequantize: Callable[..., torch.Tensor]
    data_numel: Optional[Callable[[QuantState], int]] = None


KINDS: Registry[SchemeKind] = Registry("scheme kind")


def _add(scheme: Scheme, aliases=()) -> None:
    SCHEMES.add(scheme.name, scheme, aliases=aliases)


def register_scheme(name: str, kind: str, bits: int, symmetric: bool = True, description: str = "",
                    aliases: tuple = (), overwrite: bool = False) -> Scheme:
    """Register a scheme ``name`` of a registered kind (``lowbit.quantize(t, name)`` then works)."""
    if kind not in KINDS and kind != "gguf":
        raise ValueError(f"scheme {name!r}: unknown scheme kind {kind!r}; registered: {', '.join(KINDS.names())}")
    sch = Scheme(name, kind, bits, symmetric, description)
    return SCHEMES.add(name, sch, aliases=aliases, overwrite=overwrite)


def register_scheme_kind(name: str, *, quantize: Callable[..., QuantState], dequantize: Callable[..., torch.Tensor],
                         data_numel: Optional[Callable[[QuantState], int]] = None, schemes=(),
                         overwrite: bool = False) -> SchemeKind:
    """Register a scheme kind (see :class:`SchemeKind`) and, in the same call, its schemes: ``schemes`` is a
    sequence of ``(name, bits)`` or ``(name, bits, symmetric)`` tuples.

    Example (a 1-bit sign kind from outside the package, ``tests/test_extending.py``)::

        register_scheme_kind("sign", quantize=q, dequantize=dq, schemes=[("sign1", 1)])
    """
    kind = KINDS.add(name, SchemeKind(name, quantize, dequantize, data_numel), overwrite=overwrite)
    for entry in schemes:
        register_scheme(entry[0], name, *entry[1:], overwrite=overwrite)
    return kind


for _b in (8, 4, 3, 2):
    _add(Scheme(f"int{_b}", "affine", _b, True, f"{_b}-bit symmetric absmax integers"),
         aliases=(f"int{_b}_sym",) + ((f"int{_b}_linear",) if _b in (8, 4) else ()))
    _add(Scheme(f"int{_b}_asym", "affine", _b, False, f"{_b}-bit asymmetric integers with a zero point"))
_add(Scheme("nf4", "codebook", 4, description="4-bit NormalFloat (bitsandbytes)"))
_add(Scheme("fp4", "codebook", 4, description="4-bit float e2m1 (bitsandbytes FP4)"), aliases=("fp4_e2m1",))
_add(Scheme("nf8", "codebook", 8, description="8-bit NormalFloat"))
_add(Scheme("dynamic8", "codebook", 8, description="bitsandbytes 8-bit dynamic map (quantize_blockwise)"))
_add(Scheme("fp8_e4m3", "fp8", 8, description="float8 e4m3fn with per-block scales"), aliases=("fp8", "fp8_e4m3fn"))
_add(Scheme("fp8_e5m2", "fp8", 8, description="float8 e5m2 with per-block scales"))
for _q, _bits in (("q4_0", 4), ("q4_1", 4), ("q5_0", 5), ("q5_1", 5), ("q8_0", 8)):
    _add(Scheme(_q, "gguf", _bits, _q.endswith("_0"), f"llama.cpp {_q.upper()} blocks of 32"))
for _q, _bits in (("q2_k", 2), ("q3_k", 3), ("q4_k", 4), ("q5_k", 5), ("q6_k", 6)):  # K-quants (formats/kquants)
    _add(Scheme(_q, "gguf", _bits, _q in ("q3_k", "q6_k"), f"llama.cpp {_q.upper()} super-blocks of 256"))


def schemes() -> list:
    """Names of the registered schemes (aliases included)."""
    return SCHEMES.names()


class _Default:
    def __repr__(self) -> str:
        return "64"


_DEFAULT_BLOCK = _Default()
GGUF_BLOCK = 32


# ---------------------------------------------------------------------------------------------
# validation


def _check_input(tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_meta:
        raise ValueError(f"cannot quantize a tensor on the meta device (shape {tuple(tensor.shape)}): it holds no "
                         "values; materialise it first (e.g. load the weights)")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"quantize expects a floating tensor (float32, float16, bfloat16 or float64), got {tensor.dtype}"
        )
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise ValueError(f"cannot quantize a tensor with non-finite values ({n_nan} NaN, {n_inf} Inf)")
    if tensor.dtype == torch.float64 and tensor.numel():
        amax = float(tensor.abs().max())
        if amax > _F32_MAX:
            n_big = int((tensor.abs() > _F32_MAX).sum())
            raise ValueError(
                f"cannot quantize a float64 tensor with values beyond the float32 range ({n_big} of "
                f"{tensor.numel()} values, max |x| = {amax:.4g} > {_F32_MAX:.4g}): lowbit quantizes in float32"
            )


def _store_scales(scale: torch.Tensor, scale_dtype: torch.dtype, what: str = "scale") -> torch.Tensor:
    """``scale`` (fp32, >= 0) cast to ``scale_dtype``; a clear error when a scale overflows or a nonzero one flushes to 0."""
    if scale_dtype == torch.float32:
        return scale
    stored = scale.to(scale_dtype)
    over = torch.isinf(stored)
    under = (stored == 0) & (scale != 0)
    if bool(over.any()) or bool(under.any()):
        fi = torch.finfo(scale_dtype)
        parts = []
        if bool(over.any()):
            parts.append(f"{int(over.sum())} block {what}(s) up to {float(scale[over].max()):.4g} exceed its largest "
                         f"value {fi.max:.4g}")
        if bool(under.any()):
            parts.append(f"{int(under.sum())} nonzero block {what}(s) down to {float(scale[under].min()):.4g} round to "
                         f"0 in it (its smallest normal value is {fi.tiny:.4g})")
        raise ValueError(f"scale_dtype={scale_dtype} cannot hold this tensor's scales: {'; '.join(parts)}. "
                         "Use scale_dtype=torch.float32 (or rescale the tensor)")
    return stored


def _codebook(name: str) -> torch.Tensor:
    from lowbit.formats import codebook

    return codebook.dynamic_map() if name == "dynamic8" else codebook.get_code(name)


# ---------------------------------------------------------------------------------------------
# quantize


def quantize_tensor(
    tensor: torch.Tensor,
    scheme: str = "nf4",
    block_size=_DEFAULT_BLOCK,
    *,
    group_size: Optional[int] = None,
    axis: Optional[int] = None,
    double_quant: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    double_quant_block_size: int = 256,
) -> QuantState:
    """Quantize ``tensor`` with ``scheme`` at the requested granularity.

    Granularity: ``group_size=g`` groups of ``g`` along the last dim (``-1``: one per row);
    ``axis=a`` one scale per index along ``a``; ``block_size=None`` one scale for the tensor;
    otherwise blocks of ``block_size`` over the flattened tensor (default 64, as bitsandbytes).
    Ragged last groups are handled. ``double_quant=True`` quantizes the fp32 scales once more
    (bitsandbytes ``compress_statistics``: 8-bit dynamic map, blocks of 256, mean offset).

    Example::

        >>> s = quantize_tensor(torch.randn(128, 576), "int4_asym", group_size=128)
        >>> dequantize(s).shape
        torch.Size([128, 576])
    """
    _check_input(tensor)
    sch = SCHEMES.get(scheme)
    shape = tuple(tensor.shape)
    explicit_block = block_size is not _DEFAULT_BLOCK
    if not explicit_block:
        block_size = 64
    if sch.kind == "gguf":
        blk = _gguf_format(sch.name)[0]
        if (explicit_block and block_size not in (None, blk)) or group_size not in (None, blk) or axis is not None:
            raise ValueError(f"scheme {sch.name!r} has fixed blocks of {blk} along the last dimension; "
                             "do not pass another block_size, group_size or axis")
        if double_quant:
            raise ValueError(f"double_quant does not apply to GGUF scheme {sch.name!r} (its scales are fp16 in-block)")
        return _quantize_gguf(tensor, sch)
    layout = resolve_layout(shape, block_size, group_size, axis)
    if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"scale_dtype={scale_dtype}: must be torch.float32, float16 or bfloat16")
    if double_quant and scale_dtype != torch.float32:
        raise ValueError("double_quant=True quantizes fp32 scales; it cannot be combined with scale_dtype != float32")
    if not isinstance(double_quant_block_size, int) or double_quant_block_size <= 0:
        raise ValueError(f"double_quant_block_size={double_quant_block_size!r}: must be a positive integer")
    state = KINDS.get(sch.kind).quantize(tensor, sch, layout, scale_dtype)
    if double_quant and state.scales is not None and state.scales.numel():
        zero_groups = None
        if sch.kind in ("affine", "fp8"):  # their all-zero blocks hold a placeholder scale of 1
            r, k, g = layout.view_shape(shape)
            zero_groups = pad_groups(to_view(tensor.float(), layout), g).abs().amax(-1).reshape(-1) == 0
        state = _double_quantize(state, double_quant_block_size, zero_groups)
    return state


def _new_state(sch: Scheme, tensor: torch.Tensor, layout: Layout, data, scales=None, zeros=None, code=None, bits=None):
    r, g_count = layout.n_groups(tuple(tensor.shape))
    if scales is not None and layout.kind != "group":
        scales = scales.reshape(-1)
        if zeros is not None:
            zeros = zeros.reshape(-1)
    return QuantState(
        scheme=sch.name, bits=bits or sch.bits, shape=tuple(tensor.shape), dtype=tensor.dtype,
        layout=layout.kind, block_size=layout.block_size, axis=layout.axis,
        data=data, scales=scales, zeros=zeros, code=code,
    )


def _quantize_affine(tensor, sch: Scheme, layout: Layout, scale_dtype) -> QuantState:
    v = to_view(tensor.float(), layout)
    r, k, g = layout.view_shape(tuple(tensor.shape))
    if v.numel() == 0:
        return _new_state(sch, tensor, layout, torch.empty(0, dtype=torch.uint8, device=tensor.device),
                          scales=torch.empty(0, dtype=scale_dtype, device=tensor.device))
    vg = pad_groups(v, g)
    scale, zero = affine.affine_qparams(vg.amin(-1), vg.amax(-1), sch.bits, sch.symmetric)
    scale = _store_scales(scale, scale_dtype)  # quantize against the scale that will be stored
    z = zero.to(vg.device) if sch.symmetric else zero.unsqueeze(-1)
    codes = affine.quantize_affine(vg, scale.float().unsqueeze(-1), z, sch.bits)
    data = pack_bits(unpad_groups(codes, k), sch.bits)
    return _new_state(sch, tensor, layout, data, scales=scale, zeros=None if sch.symmetric else zero)


def _quantize_codebook(tensor, sch: Scheme, layout: Layout, scale_dtype) -> QuantState:
    from lowbit.formats import codebook

    code = _codebook(sch.name).to(tensor.device)
    r, k, g = layout.view_shape(tuple(tensor.shape))
    if tensor.numel() == 0:
        return _new_state(sch, tensor, layout, torch.empty(0, dtype=torch.uint8, device=tensor.device),
                          scales=torch.empty(0, dtype=scale_dtype, device=tensor.device), code=code)
    quant = codebook.quantize_blockwise_lut if sch.name == "dynamic8" else codebook.quantize_blockwise
    if layout.kind == "block":
        # bitsandbytes' own blocking: flat tensor, ragged tail block (bit-identical path)
        codes, absmax = quant(tensor.reshape(-1), code, g)
    else:
        v = pad_groups(to_view(tensor.float(), layout), g, fill="zero")
        codes, absmax = quant(v.reshape(-1), code, g)
        codes = codes.reshape(r, -1)[:, :k]
        absmax = absmax.reshape(r, -1)
    absmax = _store_scales(absmax, scale_dtype, "absmax")
    if sch.bits == 4:  # an odd count ends in the code of 0.0, as bitsandbytes pads it
        data = codebook.pack_4bit(codes.reshape(-1), code)
    else:
        data = pack_bits(codes.reshape(-1), sch.bits)
    return _new_state(sch, tensor, layout, data, scales=absmax, code=code)


def _quantize_fp8(tensor, sch: Scheme, layout: Layout, scale_dtype) -> QuantState:
    dt = fp8.FP8_DTYPES[sch.name]
    v = to_view(tensor.float(), layout)
    r, k, g = layout.view_shape(tuple(tensor.shape))
    if v.numel() == 0:
        return _new_state(sch, tensor, layout, torch.empty(0, dtype=dt, device=tensor.device),
                          scales=torch.empty(0, dtype=scale_dtype, device=tensor.device))
    vg = pad_groups(v, g)
    scale = _store_scales(fp8.fp8_scale(vg.abs().amax(-1), dt), scale_dtype)
    data = fp8.quantize_fp8(vg, scale.float().unsqueeze(-1), dt)
    return _new_state(sch, tensor, layout, unpad_groups(data, k).reshape(-1), scales=scale)


def _gguf_view(shape):
    k = shape[-1] if len(shape) else 1
    r = math.prod(shape) // k if k else 0
    return r, k


def _gguf_format(name: str):
    """(block, type_size, module with quantize_rows/dequantize_rows) of a legacy or K-quant GGUF scheme."""
    from lowbit.formats import gguf, kquants

    if name in kquants.KQUANT_TYPES:
        return kquants.QK_K, kquants.KQUANT_TYPES[name].type_size, kquants
    return GGUF_BLOCK, gguf.GGUF_TYPES[name].type_size, gguf


def _quantize_gguf(tensor, sch: Scheme) -> QuantState:
    block, type_size, fmt = _gguf_format(sch.name)
    shape = tuple(tensor.shape)
    r, k = _gguf_view(shape)
    kp = k + (-k) % block
    if tensor.numel() == 0:
        raw = torch.empty(r, kp // block * type_size, dtype=torch.uint8)
    else:
        v = tensor.float().reshape(r, k)
        if kp != k:
            v = torch.cat([v, v.new_zeros(r, kp - k)], dim=1)
        raw = fmt.quantize_rows(v, sch.name)
    return QuantState(scheme=sch.name, bits=sch.bits, shape=shape, dtype=tensor.dtype, layout="gguf",
                      block_size=block, data=raw)


def _double_quantize(state: QuantState, blocksize: int, zero_groups: Optional[torch.Tensor] = None) -> QuantState:
    from lowbit.formats import codebook

    flat = state.scales.reshape(-1).float()
    if zero_groups is not None and bool(zero_groups.any()):
        # an all-zero block dequantizes to 0 whatever its scale: its placeholder 1 must not widen the nested
        # range of the others (it used to cost blocks of small values most of their precision)
        flat = torch.where(zero_groups, torch.zeros_like(flat), flat)
    q, absmax2, offset = codebook.double_quantize(flat, blocksize=blocksize)
    nested = QuantState(
        scheme="dynamic8", bits=8, shape=tuple(state.scales.shape), dtype=torch.float32, layout="block",
        block_size=blocksize, data=q, scales=absmax2, code=codebook.dynamic_map().to(q.device),
    )
    state.scales = None
    state.nested = nested
    state.offset = float(offset)
    return state


# ---------------------------------------------------------------------------------------------
# dequantize


def _scales(state: QuantState) -> torch.Tensor:
    if state.nested is not None:
        from lowbit.formats import codebook

        n = state.nested
        flat = codebook.double_dequantize(n.data, n.scales, torch.tensor(state.offset, dtype=torch.float32),
                                          blocksize=n.block_size)
        # first-level scales are >= 0: a nested reconstruction error must not flip signs or overflow
        return flat.clamp(0, _F32_MAX).reshape(n.shape)
    return state.scales


def codes(state: QuantState) -> torch.Tensor:
    """Unpacked codes ``[R, K]`` in the grouped-view order (uint8); GGUF states return raw blocks."""
    if state.layout == "gguf":
        return state.data
    r, k, _ = state.layout_obj.view_shape(tuple(state.shape))
    if state.scheme.startswith("fp8"):
        return state.data.reshape(r, k)
    return unpack_bits(state.data, state.bits, r * k).reshape(r, k)


def dequantize(state: QuantState) -> torch.Tensor:
    """The float tensor a QuantState stands for, in its original shape and dtype."""
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize expects a QuantState, got {type(state).__name__}")
    state.validate()
    shape = tuple(state.shape)
    if state.numel == 0:
        return torch.empty(shape, dtype=state.dtype, device=state.device)
    sch = SCHEMES.get(state.scheme)
    if sch.kind == "gguf":
        r, k = _gguf_view(shape)
        rows = _gguf_format(sch.name)[2].dequantize_rows(state.data, sch.name)[:, :k]
        return _saturate(rows, state.dtype).reshape(shape)
    layout = state.layout_obj
    out = KINDS.get(sch.kind).dequantize(state, layout)
    return from_view(_saturate(out, state.dtype), shape, layout)


def _dequantize_fp8(state: QuantState, layout: Layout) -> torch.Tensor:
    r, k, g = layout.view_shape(tuple(state.shape))
    scales = _scales(state).float().reshape(r, -1, 1)
    vals = state.data.reshape(r, k).float()
    return unpad_groups(pad_groups(vals, g) * scales, k)


def _dequantize_codebook(state: QuantState, layout: Layout) -> torch.Tensor:
    r, k, g = layout.view_shape(tuple(state.shape))
    scales = _scales(state).float().reshape(r, -1, 1)
    vals = state.code.float()[codes(state).long()]
    return unpad_groups(pad_groups(vals, g) * scales, k)


def _dequantize_affine(state: QuantState, layout: Layout) -> torch.Tensor:
    r, k, g = layout.view_shape(tuple(state.shape))
    scales = _scales(state).float().reshape(r, -1, 1)
    q = codes(state)
    if state.zeros is not None:
        zero = state.zeros.reshape(r, -1, 1).float()
    else:
        zero = torch.tensor(float(affine.implicit_zero(state.bits)), device=q.device)
    return unpad_groups((pad_groups(q, g).float() - zero) * scales, k)


def _saturate(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast fp32 values to ``dtype``, clamped to its finite range (a grid point may lie just beyond the
    largest value of the input's dtype; float32 arithmetic may overflow by an ulp near 3.4e38)."""
    fmax = float(torch.finfo(dtype).max) if dtype in (torch.float16, torch.bfloat16) else _F32_MAX
    return out.clamp(-fmax, fmax).to(dtype)


# ---------------------------------------------------------------------------------------------
# constructors and size checks used by algorithms and io


def affine_state(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
                 group_size, dtype: torch.dtype = torch.float32, symmetric: Optional[bool] = None, *,
                 canonical: bool = False) -> QuantState:
    """Build a group-layout QuantState from codes ``[out, in]``, scales/zeros ``[out, n_groups]``.

    Used by the PTQ algorithms, whose codes follow ``w = (q - z) * s``. ``zeros=None`` means
    symmetric (implicit zero ``2**(bits-1)``). ``group_size=-1`` means one group per row; a
    :class:`~lowbit.tensor.granularity.Grouping` is taken as resolved. ``canonical=True`` stores one group
    per row as the ``channel`` layout (axis 0), the one layout of a per-channel weight
    (:func:`~lowbit.tensor.granularity.canonical_layout`).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    grouping = group_size if isinstance(group_size, Grouping) else Grouping.of_columns(in_f, group_size, out_f)
    group_size = grouping.stored_group_size
    n_groups = grouping.n_groups
    if scales.shape != (out_f, n_groups):
        raise ValueError(f"scales shape {tuple(scales.shape)}: expected {(out_f, n_groups)} for group_size={group_size}")
    if zeros is not None and zeros.shape != (out_f, n_groups):
        raise ValueError(f"zeros shape {tuple(zeros.shape)}: expected {(out_f, n_groups)}")
    sym = zeros is None if symmetric is None else symmetric
    if sym and zeros is not None:
        raise ValueError("symmetric=True but zeros were given")
    name = f"int{bits}" if sym else f"int{bits}_asym"
    zeros = None if zeros is None else zeros.to(torch.uint8)
    if canonical and n_groups == 1 and in_f:
        return QuantState(scheme=name, bits=bits, shape=(out_f, in_f), dtype=dtype, layout="channel", axis=0,
                          data=pack_bits(codes.reshape(-1), bits), scales=scales.reshape(-1),
                          zeros=None if zeros is None else zeros.reshape(-1))
    return QuantState(
        scheme=name, bits=bits, shape=(out_f, in_f), dtype=dtype, layout="group", block_size=group_size,
        data=pack_bits(codes.reshape(-1), bits), scales=scales, zeros=zeros,
    )


def expected_data_numel(state: QuantState) -> Optional[int]:
    if state.scheme not in SCHEMES:
        return None
    sch = SCHEMES.get(state.scheme)
    if sch.kind == "gguf":
        block, type_size, _ = _gguf_format(sch.name)
        r, k = _gguf_view(tuple(state.shape))
        return r * math.ceil(k / block) * type_size
    kind = KINDS.get(sch.kind) if sch.kind in KINDS else None
    if kind is not None and kind.data_numel is not None:
        return kind.data_numel(state)
    return packed_nbytes(state.numel, state.bits)


def expected_scales_numel(state: QuantState) -> Optional[int]:
    if state.layout == "gguf" or state.numel == 0:
        return None
    r, g = state.layout_obj.n_groups(tuple(state.shape))
    return r * g


# ---------------------------------------------------------------------------------------------
# the built-in scheme kinds (GGUF block schemes are quantized whole-row before any layout, above)

register_scheme_kind("affine", quantize=_quantize_affine, dequantize=_dequantize_affine)
register_scheme_kind("codebook", quantize=_quantize_codebook, dequantize=_dequantize_codebook)
register_scheme_kind("fp8", quantize=_quantize_fp8, dequantize=_dequantize_fp8, data_numel=lambda st: st.numel)
