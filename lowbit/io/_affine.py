"""The integer weight every checkpoint format agrees on, and the int32 bit packing they share.

GPTQ, AWQ, compressed-tensors and lowbit all store a Linear weight ``W [out, in]`` as unsigned
codes ``q`` with per-group scales ``s`` and zero points ``z``:

    W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)]

with ``g(i) = i // group_size`` or, for GPTQ act-order checkpoints, ``g(i) = g_idx[i]``.
:class:`AffineWeight` (:mod:`lowbit.tensor.integer`, re-exported here) holds exactly that (codes, scales in
their stored dtype, zero points, ``g_idx``); every importer produces one and every exporter consumes one, so
the formats differ only in how they pack it (``shared/docs/formats-checkpoints.md``).

:func:`pack_int32` / :func:`unpack_int32` implement the dense little-endian bit stream used by
both GPTQ (``qweight``/``qzeros``, packed along ``in`` / ``out``) and compressed-tensors
(``weight_packed``/``weight_zero_point``): value ``k`` of each run of 32 occupies bits
``k*b .. k*b+b-1`` of the run's ``b`` int32 words, the first value in the least significant bits
(for b = 2, 4, 8 this is "``32/b`` values per word, lowest index lowest"; for b = 3, GPTQ's 3-word
layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from lowbit.tensor.integer import AffineWeight, UnsupportedWeight, exact_cast  # noqa: F401  (the integer weight)


# ---------------------------------------------------------------------------------------------
# int32 bit streams


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_int32(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values of a 2-D tensor along ``dim`` into int32 words (LSB first).

    Lines are padded with zeros to a multiple of 32 values; the result has
    ``ceil(n * bits / 32)`` words along ``dim``.

    Example::

        >>> pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)
        tensor([[-2023406815]], dtype=torch.int32)        # 0x87654321
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: must be between 1 and 8")
    if values.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(values.shape)}")
    v = values.to(torch.int64)
    if bool((v < 0).any()) or bool((v >= (1 << bits)).any()):
        raise ValueError(f"values must be in 0..{(1 << bits) - 1} to pack {bits}-bit codes")
    if dim in (0, -2):
        v = v.t()
    lines, n = v.shape
    n32 = -(-n // 32) * 32
    if n32 != n:
        v = torch.nn.functional.pad(v, (0, n32 - n))
    v = v.reshape(lines, n32 // 32, 32)
    out = torch.zeros(lines, n32 // 32, bits, dtype=torch.int64, device=v.device)
    start = torch.arange(32, device=v.device) * bits
    word, off = start // 32, start % 32
    out.scatter_add_(2, word.expand(lines, n32 // 32, 32), (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32
    if bool(spill.any()):
        idx = (word[spill] + 1).expand(lines, n32 // 32, int(spill.sum()))
        out.scatter_add_(2, idx, v[..., spill] >> (32 - off[spill]))
    out = out.reshape(lines, -1)[:, : math.ceil(n * bits / 32)]
    out = _to_int32(out)
    return out.t().contiguous() if dim in (0, -2) else out.contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` values per line along ``dim`` as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: must be between 1 and 8")
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"expected a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim in (0, -2):
        w = w.t()
    lines, nw = w.shape
    need = math.ceil(n * bits / 32)
    if nw != need:
        raise ValueError(f"{nw} int32 words per line, expected {need} for {n} values of {bits} bits")
    n32 = -(-n // 32) * 32
    total = n32 // 32 * bits
    if total != nw:
        w = torch.nn.functional.pad(w, (0, total - nw))
    w = w.reshape(lines, n32 // 32, bits)
    start = torch.arange(32, device=w.device) * bits
    word, off = start // 32, start % 32
    lo = w[..., word] >> off
    spill = off + bits > 32
    nxt = torch.zeros_like(lo)
    if bool(spill.any()):
        nxt[..., spill] = w[..., word[spill] + 1] << (32 - off[spill])
    vals = ((lo | nxt) & ((1 << bits) - 1)).reshape(lines, n32)[:, :n].to(torch.uint8)
    return vals.t().contiguous() if dim in (0, -2) else vals


# ---------------------------------------------------------------------------------------------
# model traversal shared by the exporters


def quantized_linears(model: torch.nn.Module):
    """``{name: (module, state)}`` for every frozen lowbit module holding a 2-D ``weight`` QuantState."""
    from lowbit.nn import QModuleMixin

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            st = m.quant_states().get("weight")
            if st is not None:
                out[name] = (m, st)
    return out


def plain_tensors(model: torch.nn.Module, skip_modules) -> dict:
    """``state_dict`` entries of ``model`` outside the modules in ``skip_modules`` (their own prefix)."""
    skip = sorted(skip_modules, key=len, reverse=True)
    out = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(s + ".") for s in skip if s):
            continue
        out[k] = v
    return out
