"""The functions modules call: quantize / dequantize / 4-bit, int8 and fp8 linear, with kernel selection.

Each function takes a canonical :class:`~lowbit.tensor.state.QuantState` (or plain tensors), picks a
backend with :mod:`lowbit.kernels.select` and runs it. Fast layouts are *derived* from the canonical
state on first use (:func:`prepare_4bit`, :func:`prepare_int8`, :func:`prepare_fp8`), cached on the
state object and invalidated when ``state.data`` is replaced or modified in place; they dequantize to
exactly what :func:`lowbit.dequantize` gives. Call the ``prepare_*`` function once before capturing a
CUDA graph (preparation allocates and may synchronise).

Eagerly the launchers are called directly (a thin Python path); under ``torch.compile`` the same
work goes through the ``torch.ops.lowbit`` custom ops of :mod:`lowbit.kernels.ops`.

Example::

    >>> import torch, lowbit
    >>> from lowbit import kernels
    >>> s = kernels.quantize(torch.randn(128, 256), "nf4", 64)
    >>> kernels.linear_4bit(torch.randn(3, 256), s).shape
    torch.Size([3, 128])
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from lowbit.kernels import reference, select
from lowbit.tensor.state import QuantState, _offset_key

_FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32)
_CODEBOOK4 = ("nf4", "fp4")
_AFFINE = {"int4": (4, True), "int4_asym": (4, False), "int8": (8, True), "int8_asym": (8, False)}
_CACHE_ATTR = "_lowbit_kernel_cache"


# ---------------------------------------------------------------------------------------------
# small helpers


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _flat_group(state: QuantState) -> Optional[int]:
    """The block length when the state's groups tile the flattened tensor (else None)."""
    if state.layout == "block" and state.block_size is not None:
        return state.block_size
    if state.layout == "group" and state.block_size and state.shape and state.shape[-1] % state.block_size == 0:
        return state.block_size
    return None


def _decoded_scales(state: QuantState) -> torch.Tensor:
    """float32 scales (double quantization decoded exactly as the reference does)."""
    if state.nested is not None:
        from lowbit.formats import codebook

        n = state.nested
        return codebook.double_dequantize(n.data, n.scales, state.offset_tensor(n.data.device).reshape(()),
                                          blocksize=n.block_size).reshape(-1)
    return state.scales.reshape(-1).float()


def _cached(state: QuantState, key: str):
    cache = state.__dict__.get(_CACHE_ATTR)
    if not cache:
        return None
    entry = cache.get(key)
    if entry is None:
        return None
    ptr, version, value = entry
    if torch.compiler.is_compiling():  # traced: layouts are prepared eagerly first (no pointer checks in graphs)
        return value
    if ptr != state.__dict__["data"].data_ptr() or version != _versions(state):
        return None
    return value


def _store(state: QuantState, key: str, value):
    cache = state.__dict__.setdefault(_CACHE_ATTR, {})
    cache[key] = (state.__dict__["data"].data_ptr(), _versions(state), value)
    return value


def _versions(state: QuantState) -> tuple:
    """In-place versions of every tensor of a state (an in-place edit of scales invalidates derived layouts).
    The stored ``data`` tensor is read from the instance dict: on a state whose blocks live in a kernel layout
    (:class:`lowbit.kernels.linear.ResidentState`) it is that layout's tensor (reading ``state.data`` would give
    the blocks back)."""
    s, z = state.scales, state.zeros
    v = (state.__dict__["data"]._version, -1 if s is None else s._version, -1 if z is None else z._version)
    n = state.nested
    if n is not None:
        v = v + (n.data._version, -1 if n.scales is None else n.scales._version, _offset_key(state))
    return v


@lru_cache(maxsize=None)
def _sorted_mids(name: str, device: str) -> Tuple[torch.Tensor, int, bool, int]:
    """float32 midpoints of the sorted code, the sorted->index permutation packed in nibbles,
    whether it is not the identity, and the padding code of an odd count (the code of 0.0)."""
    from lowbit.formats import codebook

    code = codebook.get_code(name)
    order = torch.argsort(code, stable=True)
    s = code[order]
    mids = (s[:-1] + s[1:]) / 2
    packed = sum(int(o) << (4 * i) for i, o in enumerate(order.tolist()))
    if packed >= 1 << 63:
        packed -= 1 << 64
    permute = not torch.equal(order, torch.arange(code.numel()))
    return mids.to(device), packed, permute, codebook.zero_code(code)


@lru_cache(maxsize=None)
def _dynamic_tables(device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from lowbit.formats import codebook

    code = codebook.dynamic_map()
    return code.to(device), codebook.lut_table(code).to(device)


@lru_cache(maxsize=None)
def _code_table(name: str, device: str) -> torch.Tensor:
    """The codebook of ``name`` on ``device`` (a cached master copy: states get a device-side clone)."""
    from lowbit.formats import codebook

    return codebook.get_code(name).to(device)


def strict_mode(strict: Optional[bool] = None) -> bool:
    """Whether quantize checks its input synchronously: ``strict`` when given, else ``LOWBIT_STRICT=1``."""
    if strict is not None:
        return bool(strict)
    import os

    return os.environ.get("LOWBIT_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


NON_FINITE_DEVICE_MSG = ("lowbit.kernels.quantize: the input holds non-finite values (NaN/Inf), so a block scale "
                         "is not finite; rerun with LOWBIT_STRICT=1 (or strict=True) for a ValueError with the counts")


# ---------------------------------------------------------------------------------------------
# dequantize


def _triton_dequant_ok(state: QuantState, out_dtype: torch.dtype) -> bool:
    G = _flat_group(state)
    if G is None or not _is_pow2(G) or not 16 <= G <= 4096 or out_dtype not in _FLOAT_OUT:
        return False
    if state.scheme in _CODEBOOK4 or state.scheme in ("nf8", "dynamic8"):
        ok = state.code is not None
    else:
        ok = state.scheme in _AFFINE
    if state.nested is not None:
        ok = ok and state.nested.scheme == "dynamic8" and state.nested.layout == "block"
    return ok and state.data.is_cuda


def dequantize(state: QuantState, out_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> torch.Tensor:
    """The tensor ``state`` stands for, in ``out_dtype`` (default: the state's dtype).

    Values are the reference float32 products rounded once to ``out_dtype``; the Triton kernel covers
    NF4/FP4/NF8/dynamic8 and int4/int8 (sym and asym) blockwise or group states whose groups tile the
    rows, with or without double quantization, and everything else falls back to the reference.

    Example::

        >>> s = quantize(torch.randn(64, 64), "int4", 64)
        >>> dequantize(s, torch.float16).shape
        torch.Size([64, 64])
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize expects a QuantState, got {type(state).__name__}")
    out_dtype = out_dtype or state.dtype
    which = select.resolve("dequantize", state.device, backend)
    if which != "triton" or state.numel == 0 or not _triton_dequant_ok(state, out_dtype):
        return reference.dequantize(state, out_dtype)
    from lowbit.kernels.triton import blockwise as bw

    G = _flat_group(state)
    dev = str(state.device)
    if state.scheme in _AFFINE:
        bits, sym = _AFFINE[state.scheme]
        kind, zero, code = (bw.SYM if sym else bw.ASYM), (1 << (bits - 1) if sym else 0), None
    else:
        bits, kind, zero, code = state.bits, bw.CODEBOOK, 0, state.code.float().to(state.device)
    nested = None
    scales = None
    if state.nested is not None:
        # device copies made once per state (no host-to-device copy per call: graph-capturable)
        nested = _cached(state, "nested")
        if nested is None:
            dyn, _ = _dynamic_tables(dev)
            nb = state.nested
            off_t = state.offset_tensor(state.device)  # kernels.quantize's device offset: no copy, no sync
            nested = _store(state, "nested", (nb.data, nb.scales.float(), dyn, off_t, nb.block_size))
    else:
        scales = state.scales.reshape(-1).float()
    zeros = state.zeros.reshape(-1) if state.zeros is not None else None
    flat = bw.dequantize(state.data, scales, zeros, code, state.numel, G, bits, kind, zero, out_dtype, nested)
    return flat.reshape(state.shape)


# ---------------------------------------------------------------------------------------------
# quantize


def _triton_quant_ok(x: torch.Tensor, scheme: str, block_size, double_quant: bool) -> bool:
    return (
        x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.numel() > 0
        and isinstance(block_size, int) and _is_pow2(block_size) and 16 <= block_size <= 4096
        and (scheme in _CODEBOOK4 or scheme in _AFFINE)
    )


def quantize(x: torch.Tensor, scheme: str = "nf4", block_size: int = 64, *, double_quant: bool = False,
             backend: Optional[str] = None, strict: Optional[bool] = None) -> QuantState:
    """Blockwise quantization (bitsandbytes flat blocks), identical codes to ``lowbit.quantize``.

    Triton covers ``nf4``, ``fp4``, ``int4``, ``int4_asym``, ``int8``, ``int8_asym`` with power-of-two
    blocks of 16..4096 and double quantization (8-bit dynamic map, blocks of 256, mean offset).
    The double-quantization offset is the float64 mean of the absmax rounded to float32.

    On CUDA the call does not synchronise with the host: a non-finite input (its block scale is then not
    finite) fails a device-side assertion (``torch._assert_async``, raised at the next synchronisation;
    it poisons the CUDA context, as every device assertion does), and the double-quantization offset
    stays a device tensor on the state until ``state.offset`` is first read. ``strict=True`` (default:
    the ``LOWBIT_STRICT=1`` environment variable) checks synchronously instead and raises ValueError
    with the count of non-finite values. The CPU path always checks synchronously.

    Example::

        >>> s = quantize(torch.randn(1000), "fp4", 64, double_quant=True)
        >>> s.nested.scheme
        'dynamic8'
    """
    from lowbit.tensor.functional import SCHEMES

    name = SCHEMES.get(scheme).name
    which = select.resolve("quantize", x.device, backend)
    if which != "triton" or not _triton_quant_ok(x, name, block_size, double_quant):
        return reference.quantize(x, name, block_size, double_quant)
    from lowbit.kernels.triton import blockwise as bw

    dev = str(x.device)
    strict = strict_mode(strict)
    xc = x.contiguous()
    if name in _AFFINE:
        bits, sym = _AFFINE[name]
        qmax = (1 << (bits - 1)) - 1
        q, s, z = bw.quantize(xc, block_size, bits, bw.SYM if sym else bw.ASYM, qmax=qmax,
                              zero=(1 << (bits - 1)) if sym else 0, levels=(1 << bits) - 1)
        code = None
    else:
        mids, order, permute, pad = _sorted_mids(name, dev)
        q, s, z = bw.quantize(xc, block_size, 4, bw.CODEBOOK, mids=mids, order=order, permute=permute, pad=pad)
        bits, code = 4, _code_table(name, dev).clone()
    if strict:
        if not bool(torch.isfinite(s).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"cannot quantize a tensor with non-finite values ({bad} NaN/Inf)")
    elif not double_quant:  # with double quantization the mean of the scales below is checked instead
        torch._assert_async(torch.isfinite(s).all(), NON_FINITE_DEVICE_MSG)
    state = QuantState(scheme=name, bits=bits, shape=tuple(x.shape), dtype=x.dtype, layout="block",
                       block_size=block_size, data=q, scales=s, zeros=z, code=code)
    if double_quant:
        dyn, lut = _dynamic_tables(dev)
        off_t = s.mean(dtype=torch.float64).to(torch.float32).reshape(1)
        if not strict:  # scales are >= 0 or NaN/Inf: their float64 mean is finite exactly when all of them are
            torch._assert_async(torch.isfinite(off_t).reshape(()), NON_FINITE_DEVICE_MSG)
        qa, a2 = bw.quantize_lut(s, off_t, lut, 256)
        state.nested = QuantState(scheme="dynamic8", bits=8, shape=tuple(s.shape), dtype=torch.float32,
                                  layout="block", block_size=256, data=qa, scales=a2, code=dyn.clone())
        state.scales = None
        state.offset = off_t  # a device tensor; read as a float (one sync) only when state.offset is read
    return state


# ---------------------------------------------------------------------------------------------
# 4-bit linear


@dataclasses.dataclass
class Prepared4bit:
    """Derived layout of a 4-bit ``[N, K]`` weight for the fused kernels (no copy of the codes).

    ``qweight [N, K/2]`` uint8 (a view of ``state.data``), ``scales`` float32 ``[N, K/G]``, ``zeros`` ``[N, K/G]``
    (uint8 as the state stores them, or float32),
    ``values`` float32 ``[16]`` (value of each code before zero and scale), ``kind`` 0 codebook,
    1 symmetric int4, 2 asymmetric int4.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    values: torch.Tensor
    kind: int
    n: int
    k: int
    group: int
    configs: dict
    zeros_u8: Optional[torch.Tensor] = None
    launch_cache: dict = dataclasses.field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight from the derived layout (plain torch): equals ``lowbit.dequantize``."""
        return reference.gemm_4bit(torch.eye(self.k, dtype=torch.float32, device=self.qweight.device),
                                   self.qweight, self.scales, self.zeros, self.values, None, self.group).T.to(dtype)


def _values_4bit(scheme: str, code: Optional[torch.Tensor]) -> torch.Tensor:
    if scheme in _CODEBOOK4:
        return code.float().cpu()
    if scheme == "int4":
        return torch.arange(16, dtype=torch.float32) - 8
    return torch.arange(16, dtype=torch.float32)


_KIND4 = {"nf4": 0, "fp4": 0, "int4": 1, "int4_asym": 2}


def make_prepared_4bit(qweight, scales, zeros, values, kind: int, group: int) -> Prepared4bit:
    """A :class:`Prepared4bit` from its tensors (used by the custom op under ``torch.compile``)."""
    from lowbit.kernels.triton_configs import configs_4bit

    N, K = qweight.shape[0], qweight.shape[1] * 2
    return Prepared4bit(qweight, scales, zeros, values, kind, N, K, group,
                        configs_4bit("codebook" if kind == 0 else "int4", group),
                        zeros.to(torch.uint8).reshape(-1) if zeros is not None else None)


def prepare_4bit(state: QuantState) -> Optional[Prepared4bit]:
    """The fused-kernel layout of a 2-D 4-bit state, or None when the fused path does not apply.

    Applies to ``nf4``/``fp4``/``int4``/``int4_asym`` states of shape ``[N, K]`` whose scale groups
    tile the rows (``K % G == 0``; blockwise or group layout, with or without double quantization).
    """
    got = _cached(state, "4bit")
    if got is not None:
        return got
    if state.zeros is not None and state.zeros.is_floating_point():  # float zero points (HQQ): not uint8
        return None
    G = _flat_group(state)
    if (len(state.shape) != 2 or G is None or G % 2 or state.shape[1] % G
            or not (state.scheme in _CODEBOOK4 or state.scheme in ("int4", "int4_asym"))):
        return None
    N, K = state.shape
    dev = state.device
    values = _values_4bit(state.scheme, state.code).to(dev)
    # zero points stay the state's uint8 tensor (kernels widen them when loaded): no float copy on the device
    zeros = state.zeros.reshape(N, K // G) if state.zeros is not None else None
    scales = _decoded_scales(state).to(dev).reshape(N, K // G).contiguous()
    p = make_prepared_4bit(state.data.view(N, K // 2), scales, zeros, values, _KIND4[state.scheme], G)
    return _store(state, "4bit", p)


def linear_4bit(x: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """``x @ dequantize(state).T + bias`` with a fused 4-bit kernel where it applies.

    ``x [..., K]`` fp16/bf16 on CUDA runs what the quantized modules run (:func:`lowbit.kernels.linear.
    prepared_linear`: the Triton GEMV at M <= 4, the tensor-core GEMM or dequantize + ``F.linear`` above, as
    tuned); otherwise the reference.

    Example::

        >>> s = quantize(torch.randn(32, 128), "int4", 64)
        >>> linear_4bit(torch.randn(2, 128), s).shape
        torch.Size([2, 32])
    """
    if torch.compiler.is_compiling():
        # traced: use the layout prepared eagerly (call prepare_4bit before compiling) through the op
        cache = state.__dict__.get(_CACHE_ATTR) or {}
        entry = cache.get("4bit")
        if entry is None:
            return reference.linear_4bit(x, state, bias)
        p = entry[2]
        y = torch.ops.lowbit.gemm_4bit(x.reshape(-1, p.k), p.qweight, p.scales, p.zeros, p.values, bias, p.group,
                                       p.kind)
        return y.reshape(*x.shape[:-1], p.n)
    p = prepare_4bit(state)
    if p is None or not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) \
            or select.resolve("gemm_4bit", x.device, backend) != "triton":
        return reference.linear_4bit(x, state, bias)
    # the modules' path (lowbit.kernels.linear): GEMV at M <= 4, tensor-core GEMM or dequantize + cuBLAS above
    from lowbit.kernels.linear import prepare_linear, prepared_linear

    pl = prepare_linear(state)
    if pl is not None:
        return prepared_linear(x, pl, bias)
    return _gemm_4bit_triton(x, p, bias)


def _gemm_4bit_triton(x: torch.Tensor, p: Prepared4bit, bias: Optional[torch.Tensor]) -> torch.Tensor:
    from lowbit.kernels.triton import gemm_4bit as gk

    x2 = x.reshape(-1, p.k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    cfg = p.configs.get(gk.m_bucket(x2.shape[0]))
    if cfg is None or cfg[0] == "dequant":
        w = _dequant_prepared(p, x.dtype)
        y = F.linear(x2, w, bias)
    else:
        y = gk.launch(x2, p.qweight, p.scales, p.zeros, p.values, bias, p.n, p.k, p.group, p.kind, cfg,
                      p.launch_cache)
    return y.reshape(*x.shape[:-1], p.n)


def _dequant_prepared(p: Prepared4bit, dtype: torch.dtype) -> torch.Tensor:
    from lowbit.kernels.triton import blockwise as bw

    if p.zeros is None:
        flat = bw.dequantize(p.qweight, p.scales, None, p.values, p.n * p.k, p.group, 4, bw.CODEBOOK, 0, dtype)
    else:
        flat = bw.dequantize(p.qweight, p.scales, p.zeros_u8, None, p.n * p.k, p.group, 4,
                             bw.ASYM, 0, dtype)
    return flat.view(p.n, p.k)


# ---------------------------------------------------------------------------------------------
# int8 / fp8 linear with dynamic per-token activations


def _check_channel_state(state: QuantState, scheme: str, what: str) -> None:
    """ValueError unless ``state`` is a 2-D ``scheme`` state with per-output-channel (axis 0) scales."""
    if state.scheme != scheme or state.layout != "channel" or state.axis != 0 or len(state.shape) != 2:
        raise ValueError(
            f"{what} per-channel (axis=0) 2-D state, got scheme={state.scheme!r} "
            f"layout={state.layout!r} axis={state.axis} shape={state.shape}"
        )


def _channel_weights(state: QuantState, key: str, scheme: str, what: str, weight=None):
    """``(weight(codes [N, K]), scale float32 [N])`` of a per-output-channel ``scheme`` state, cached under ``key``
    (:func:`_cached`); ``weight`` None: the stored codes themselves (a view)."""
    got = _cached(state, key)
    if got is not None:
        return got
    _check_channel_state(state, scheme, what)
    N, K = state.shape
    codes = state.data.view(N, K)
    return _store(state, key, (codes if weight is None else weight(codes),
                               _decoded_scales(state).to(state.device).contiguous()))


def prepare_int8(state: QuantState) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(w int8 [N, K], scale float32 [N])`` from a symmetric int8 per-output-channel state.

    lowbit's symmetric codes are ``q + 128`` (implicit zero 128), so the int8 weight is ``code - 128``.
    """
    return _channel_weights(state, "int8", "int8", "int8 linear needs a symmetric int8",
                            lambda codes: (codes.to(torch.int16) - 128).to(torch.int8))


def int8_codes(state: QuantState) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [N, K], scale float32 [N])`` of a symmetric int8 per-output-channel state: the stored codes
    themselves (a view, no copy: the int8 weight is ``code - 128``, i.e. the code with bit 7 flipped, which the
    Triton GEMM does in registers) and the scales. What the quantized modules use; :func:`prepare_int8` makes the
    signed copy for callers that want one (``torch._int_mm``)."""
    return _channel_weights(state, "int8u", "int8", "int8 linear needs a symmetric int8")


def signed_int8(w: torch.Tensor) -> torch.Tensor:
    """``w`` as int8: int8 as it is; lowbit's uint8 codes (implicit zero 128) as ``code - 128`` (a new tensor)."""
    if w.dtype == torch.uint8:
        return torch.bitwise_xor(w, 128).view(torch.int8)
    return w


def prepare_fp8(state: QuantState) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(w float8_e4m3fn [N, K], scale float32 [N])`` from an fp8_e4m3 per-output-channel state."""
    return _channel_weights(state, "fp8", "fp8_e4m3", "fp8 linear needs an fp8_e4m3")


def _weights(state_or_pair, prepare):
    if isinstance(state_or_pair, QuantState):
        return prepare(state_or_pair)
    w, s = state_or_pair
    return w, s


def int8_linear_dynamic(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None,
                        backend: Optional[str] = None) -> torch.Tensor:
    """W8A8: per-token dynamic int8 activations x int8 per-channel weights, rescale fused.

    ``weight`` is an int8 per-channel QuantState (its stored codes are read as they are: no int8 copy is kept),
    a prepared ``(w int8 [N, K], scale [N])`` pair, or ``(codes uint8 [N, K], scale [N])`` as
    :func:`int8_codes` gives (weight ``code - 128``). ``torch._int_mm`` (backend ``native``) takes int8 only:
    there uint8 codes are converted per call (a transient copy of the weight).
    Numerics: :func:`lowbit.kernels.reference.int8_linear_dynamic`.

    Example::

        >>> st = lowbit.quantize(torch.randn(64, 128), "int8", axis=0)
        >>> int8_linear_dynamic(torch.randn(4, 128), st).shape
        torch.Size([4, 64])
    """
    w, s = _weights(weight, int8_codes)
    which = select.resolve("int8_linear", x.device, backend)
    M = x.numel() // x.shape[-1]
    if which == "native" and M <= 16:
        which = "triton" if select.available("triton", x.device) else "reference"  # _int_mm needs M > 16
    if which == "reference" or not x.is_cuda:
        return reference.int8_linear_dynamic(x, signed_int8(w), s, bias)
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.int8_linear_dynamic(x, w, s, bias)
    if which == "native":
        from lowbit.kernels import native

        return native.int8_linear_dynamic(x, signed_int8(w), s, bias)
    return _scaled_linear_triton(x, w, s, bias, fp8=False)


def fp8_linear_dynamic(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """fp8 e4m3 row-wise: per-token dynamic fp8 activations x fp8 per-channel weights.

    ``native`` (default on CUDA) is ``torch._scaled_mm`` with row-wise scales and fast accumulation
    (bf16 output only); ``triton`` is lowbit's fp8 GEMM with the scales in its epilogue.
    """
    w, s = _weights(weight, prepare_fp8)
    which = select.resolve("fp8_linear", x.device, backend)
    if which == "native" and x.dtype != torch.bfloat16:
        which = "triton" if select.available("triton", x.device) else "reference"
    if which == "reference" or not x.is_cuda:
        return reference.fp8_linear_dynamic(x, w, s, bias)
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.fp8_linear_dynamic(x, w, s, bias)
    if which == "native":
        from lowbit.kernels import native

        return native.fp8_linear_dynamic(x, w, s, bias)
    return _scaled_linear_triton(x, w, s, bias, fp8=True)


def _scaled_linear_triton(x, w, s, bias, fp8: bool):
    from lowbit.kernels.triton import scaled_gemm as sg
    from lowbit.kernels.triton_configs import config_scaled

    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    q, sx = sg.quantize_rows(x2, fp8)
    y = sg.scaled_gemm(q, w, sx, s, bias, x.dtype, config_scaled("fp8" if fp8 else "int8", x2.shape[0]))
    return y.reshape(*x.shape[:-1], w.shape[0])

