"""``torch.library`` custom ops for the hot kernels, with fake (meta) implementations.

Declared once here; each implementation dispatches through :mod:`lowbit.kernels.select` to the
Triton/native launchers on CUDA and to :mod:`lowbit.kernels.reference` elsewhere, so CPU CI runs the
same op as the GPU and ``torch.compile`` traces through the fakes (checked with
``torch.library.opcheck`` in tests/test_kernels.py).

Ops (all functional, no mutation):

* ``lowbit::dequantize_blockwise(data, scales, zeros?, values, numel, group, bits, kind, dtype)``
  flat blockwise dequantization; ``kind`` 0 codebook (``values[q] * s``), 1 symmetric int
  (``(q - 2**(b-1)) * s``), 2 asymmetric int (``(q - z) * s``); scales float32 ``[nblocks]``.
* ``lowbit::quantize_blockwise(x, scheme, blocksize) -> (codes, scales, zeros)`` (``zeros`` is
  empty for symmetric and codebook schemes).
* ``lowbit::gemm_4bit(x, qweight, scales, zeros?, values, bias?, group, kind)`` = ``x @ dequant(W).T + b``.
* ``lowbit::int8_linear_dynamic(x, w, w_scale, bias?)`` and ``lowbit::fp8_linear_dynamic(...)``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from lowbit.kernels import reference, select


def _dequant_ref(data, scales, zeros, values, numel, group, bits, kind, dtype):
    from lowbit.tensor.packing import unpack_bits

    q = unpack_bits(data, bits, numel).long()
    nb = -(-numel // group)
    pad = nb * group - numel
    if kind == 0:
        v = values.float().to(data.device)[q]
    elif kind == 1:
        v = q.float() - float(1 << (bits - 1))
    else:
        v = q.float()
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    v = v.view(nb, group)
    if kind == 2:
        v = v - zeros.reshape(nb, 1).float()
    return (v * scales.reshape(nb, 1).float()).reshape(-1)[:numel].to(dtype)


@torch.library.custom_op("lowbit::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(data: Tensor, scales: Tensor, zeros: Optional[Tensor], values: Tensor, numel: int,
                         group: int, bits: int, kind: int, dtype: torch.dtype) -> Tensor:
    if data.is_cuda and select.resolve("dequantize", data.device) == "triton" and group & (group - 1) == 0 \
            and 16 <= group <= 4096:
        from lowbit.kernels.triton import blockwise as bw

        zero = (1 << (bits - 1)) if kind == 1 else 0
        return bw.dequantize(data, scales.float(), zeros, values.float() if kind == 0 else None, numel, group,
                             bits, kind, zero, dtype)
    return _dequant_ref(data, scales, zeros, values, numel, group, bits, kind, dtype)


@dequantize_blockwise.register_fake
def _(data, scales, zeros, values, numel, group, bits, kind, dtype):
    return data.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("lowbit::quantize_blockwise", mutates_args=())
def quantize_blockwise(x: Tensor, scheme: str, blocksize: int) -> Tuple[Tensor, Tensor, Tensor]:
    from lowbit.kernels import api

    st = api.quantize(x, scheme, blocksize)
    zeros = st.zeros if st.zeros is not None else torch.empty(0, dtype=torch.uint8, device=x.device)
    return st.data, st.scales.float(), zeros


@quantize_blockwise.register_fake
def _(x, scheme, blocksize):
    from lowbit.tensor.functional import SCHEMES

    sch = SCHEMES.get(scheme)
    n = x.numel()
    nb = -(-n // blocksize)
    nz = 0 if sch.symmetric or sch.kind != "affine" else nb
    return (x.new_empty(((n * sch.bits + 7) // 8,), dtype=torch.uint8), x.new_empty((nb,), dtype=torch.float32),
            x.new_empty((nz,), dtype=torch.uint8))


_PREPARED: dict = {}


@torch.library.custom_op("lowbit::gemm_4bit", mutates_args=())
def gemm_4bit(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], values: Tensor,
              bias: Optional[Tensor], group: int, kind: int) -> Tensor:
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and select.resolve("gemm_4bit", x.device) == "triton":
        from lowbit.kernels import api

        key = (qweight.data_ptr(), scales.data_ptr(), tuple(qweight.shape), group, kind)
        p = _PREPARED.get(key)
        if p is None:
            if len(_PREPARED) > 4096:
                _PREPARED.clear()
            p = _PREPARED[key] = api.make_prepared_4bit(qweight, scales, zeros, values, kind, group)
        return api._gemm_4bit_triton(x, p, bias)
    return reference.gemm_4bit(x, qweight, scales, zeros, values, bias, group)


@gemm_4bit.register_fake
def _(x, qweight, scales, zeros, values, bias, group, kind):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("lowbit::int8_linear_dynamic", mutates_args=())
def int8_linear_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from lowbit.kernels import api

    which = select.resolve("int8_linear", x.device)
    if which == "reference" or not x.is_cuda:
        return reference.int8_linear_dynamic(x, api.signed_int8(w), w_scale, bias)
    return api._scaled_linear_triton(x, w, w_scale, bias, fp8=False)


@int8_linear_dynamic.register_fake
def _(x, w, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("lowbit::fp8_linear_dynamic", mutates_args=())
def fp8_linear_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from lowbit.kernels import api

    which = select.resolve("fp8_linear", x.device)
    if which == "reference" or not x.is_cuda:
        return reference.fp8_linear_dynamic(x, w, w_scale, bias)
    if which == "native" and x.dtype == torch.bfloat16:
        from lowbit.kernels import native

        return native.fp8_linear_dynamic(x, w, w_scale, bias)
    return api._scaled_linear_triton(x, w, w_scale, bias, fp8=True)


@fp8_linear_dynamic.register_fake
def _(x, w, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _gemv_ref(x, words, scales, zeros, table, bias, n, k, bits, group, kind, zero):
    from lowbit.kernels.linear import PreparedLinear

    p = PreparedLinear(words, scales, zeros, table, bits, group, kind, zero, n, k)
    return torch.nn.functional.linear(x, p.dequantize(x.dtype), bias)


@torch.library.custom_op("lowbit::gemv_lowbit", mutates_args=())
def gemv_lowbit(x: Tensor, words: Tensor, scales: Tensor, zeros: Optional[Tensor], table: Optional[Tensor],
                bias: Optional[Tensor], n: int, k: int, bits: int, group: int, kind: int, zero: float,
                config: List[int]) -> Tensor:
    """Fused low-bit GEMV (``lowbit.kernels.triton.gemv``) on CUDA; the plain-torch dequantize elsewhere."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and select.resolve("gemm_4bit", x.device) == "triton":
        from lowbit.kernels.triton import gemv as gv

        return gv.gemv(x.contiguous(), words, scales, zeros, table, bias, n, k, bits, group, kind, zero,
                       tuple(config), None)
    return _gemv_ref(x, words, scales, zeros, table, bias, n, k, bits, group, kind, zero)


@gemv_lowbit.register_fake
def _(x, words, scales, zeros, table, bias, n, k, bits, group, kind, zero, config):
    return x.new_empty((x.shape[0], n))


_MM_PREPARED: dict = {}


@torch.library.custom_op("lowbit::mm_lowbit", mutates_args=())
def mm_lowbit(x: Tensor, words: Tensor, scales: Tensor, zeros: Optional[Tensor], table: Optional[Tensor],
              bias: Optional[Tensor], n: int, k: int, bits: int, group: int, kind: int, zero: float) -> Tensor:
    """Fused low-bit matmul v2 (``lowbit.kernels.triton.lowbit_mm`` through ``lowbit.kernels.linear``) on CUDA;
    the plain-torch dequantize + ``F.linear`` elsewhere. ``table`` is the 16-entry code (codebook kind)."""
    from lowbit.kernels.linear import PreparedLinear, prepared_linear

    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and select.resolve("gemm_4bit", x.device) == "triton":
        key = (words.data_ptr(), scales.data_ptr(), tuple(words.shape), bits, group, kind)
        p = _MM_PREPARED.get(key)
        if p is None:
            if len(_MM_PREPARED) > 4096:
                _MM_PREPARED.clear()
            p = _MM_PREPARED[key] = PreparedLinear(words, scales, zeros, table, bits, group, kind, zero, n, k)
        return prepared_linear(x, p, bias)
    return _gemv_ref(x, words, scales, zeros, table, bias, n, k, bits, group, kind, zero)


@mm_lowbit.register_fake
def _(x, words, scales, zeros, table, bias, n, k, bits, group, kind, zero):
    return x.new_empty((*x.shape[:-1], n))
