"""The integer weight: the one type beside :class:`~lowbit.tensor.state.QuantState` for affine integer weights.

Every producer and consumer of integer ``[out, in]`` weights speaks :class:`AffineWeight`::

    W[o, i] = (codes[o, i] - zeros[o, g(i)]) * scales[o, g(i)]

with ``g(i) = i // group_size`` or, for GPTQ act-order checkpoints, ``g(i) = g_idx[i]``. The conversions are
exact (the same codes, scales in their stored dtype, zero points):

* QuantState <-> AffineWeight: :meth:`AffineWeight.from_state` / :meth:`AffineWeight.to_state`
  (``group``, ``channel``, ``tensor`` and row-aligned ``block`` layouts; GGUF Q4_0 / Q8_0 blocks);
* the PTQ grids' ``(codes, scales, zeros)`` output: :meth:`AffineWeight.from_grid`
  (:func:`lowbit.algorithms.grid.to_state` is ``AffineWeight.from_grid(...).to_state(...)``);
  ``GPTQResult.weight``;
* the checkpoint formats: GPTQ / AWQ / compressed-tensors pack and unpack it (:mod:`lowbit.io.gptq`,
  :mod:`lowbit.io.compressed_tensors`), GGUF blocks come from it (:func:`lowbit.io.convert.affine_to_gguf`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from lowbit.formats import affine
from lowbit.tensor.functional import SCHEMES, _scales, affine_state, codes as state_codes
from lowbit.tensor.granularity import Grouping
from lowbit.tensor.state import QuantState

__all__ = ["AffineWeight", "UnsupportedWeight", "exact_cast"]


class UnsupportedWeight(ValueError):
    """A weight that a format cannot represent (the message says why)."""


@dataclass
class AffineWeight:
    """``W = (codes - zeros[:, g]) * scales[:, g]`` for a ``[out, in]`` weight.

    Attributes:
        codes: uint8 ``[out, in]``, unsigned ``0 .. 2**bits - 1``.
        scales: ``[out, G]`` in the dtype they are stored in (fp16 for GPTQ/AWQ).
        zeros: uint8 ``[out, G]``, or None for the implicit symmetric zero ``2**(bits-1)``.
        bits: code width (2..8).
        group_size: columns per group (``in`` for one group per row); groups are consecutive
            unless ``g_idx`` says otherwise.
        g_idx: optional int64 ``[in]`` group of every input column (GPTQ act-order).
        dtype: dtype of the original float weight.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    g_idx: Optional[torch.Tensor] = None
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in], got {tuple(self.codes.shape)}")
        out_f, in_f = self.codes.shape
        self.group_size = Grouping.of_columns(in_f, self.group_size).stored_group_size  # -1/None: one group per row
        G = self.n_groups
        if self.g_idx is not None:
            if tuple(self.g_idx.shape) != (in_f,):
                raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({in_f},)")
            G = self.scales.shape[1]
            if in_f and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= G):
                raise ValueError(f"g_idx values must lie in 0..{G - 1} (one per row of scales), got "
                                 f"{int(self.g_idx.min())}..{int(self.g_idx.max())}")
        if tuple(self.scales.shape) != (out_f, G):
            raise ValueError(f"scales have shape {tuple(self.scales.shape)}, expected {(out_f, G)}")
        if self.zeros is not None and tuple(self.zeros.shape) != (out_f, G):
            raise ValueError(f"zeros have shape {tuple(self.zeros.shape)}, expected {(out_f, G)}")

    # -- shape -----------------------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self.codes.shape)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.codes.shape[1] / self.group_size) if self.codes.shape[1] else 0

    @property
    def symmetric(self) -> bool:
        """True when every zero point is the implicit ``2**(bits-1)``."""
        return self.zeros is None or bool((self.zeros.to(torch.int32) == affine.implicit_zero(self.bits)).all())

    def group_index(self) -> torch.Tensor:
        """int64 ``[in]``: the group of every input column."""
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size

    def has_trivial_g_idx(self) -> bool:
        if self.g_idx is None:
            return True
        return bool(torch.equal(self.g_idx.to(torch.int64).cpu(),
                                torch.arange(self.codes.shape[1]) // self.group_size))

    def zeros_or_implicit(self) -> torch.Tensor:
        """uint8 ``[out, G]`` zero points (the implicit symmetric one filled in)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(tuple(self.scales.shape), affine.implicit_zero(self.bits), dtype=torch.uint8,
                          device=self.codes.device)

    # -- values ----------------------------------------------------------------------------------
    def column_params(self):
        """``(scales fp32 [out, in], zeros fp32 [out, in])`` of every weight."""
        gi = self.group_index()
        return self.scales.float()[:, gi], self.zeros_or_implicit().float()[:, gi]

    def dequantize(self) -> torch.Tensor:
        """fp32 ``(q - z) * s``: the same operations, hence the same bits, as :func:`lowbit.dequantize`."""
        s, z = self.column_params()
        return (self.codes.float() - z) * s

    @classmethod
    def from_grid(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
                  group_size, sym: bool, dtype: torch.dtype = torch.float32) -> "AffineWeight":
        """The PTQ grids' output (``codes [out, in]``, float ``scales``/``zeros`` ``[out, G]``, the zero points
        integer-valued) as an integer weight: fp32 scales, uint8 zero points (None when ``sym``)."""
        out_f, in_f = codes.shape
        z = None if sym else zeros.round().clamp(0, 255).to(torch.uint8)
        g = Grouping.of_columns(in_f, group_size, out_f).stored_group_size
        return cls(codes=codes.to(torch.uint8), scales=scales.float().contiguous(), zeros=z, bits=bits,
                   group_size=g, dtype=dtype)

    def to_state(self, symmetric: Optional[bool] = None) -> QuantState:
        """An exactly equivalent QuantState (scales kept in their dtype), in the canonical layout: ``group``, or
        ``channel`` (axis 0) for one group per row.

        ``symmetric``: None detects it (zero points all ``2**(bits-1)`` give the symmetric scheme and no stored
        zeros); True / False states it (False keeps the zero points even where they all equal the implicit one).

        Act-order (``g_idx`` not ``i // group_size``) is re-grouped into the coarsest consecutive
        groups on which ``g_idx`` is constant -- exact, but down to one column per group for a
        random column order (then every weight carries its own scale).
        """
        codes, scales, zeros, g = self.codes, self.scales, self.zeros, self.group_size
        if not self.has_trivial_g_idx():
            gi = self.g_idx.to(torch.int64).cpu()
            change = torch.nonzero(gi[1:] != gi[:-1]).flatten() + 1
            g = codes.shape[1]
            for c in change.tolist():
                g = math.gcd(g, c)
            starts = torch.arange(0, codes.shape[1], g)
            sel = gi[starts].to(scales.device)
            scales = scales[:, sel].contiguous()
            zeros = None if zeros is None else zeros[:, sel].contiguous()
        if symmetric is None and zeros is not None and \
                bool((zeros.to(torch.int32) == affine.implicit_zero(self.bits)).all()):
            zeros = None
        return affine_state(codes.to(torch.uint8), scales, zeros, self.bits, g, dtype=self.dtype,
                            symmetric=symmetric, canonical=True)

    @classmethod
    def from_state(cls, state: QuantState) -> "AffineWeight":
        """The integer weight of an affine ``int2..int8`` (sym or asym) QuantState of a 2-D weight.

        Supported layouts: ``group``, ``channel`` (axis 0), ``tensor``, and ``block`` when the block
        size divides the row length; GGUF ``q4_0``/``q8_0`` blocks (symmetric groups of 32 with fp16
        scales and the implicit zero 8 / 128: exactly an int4/int8 group-32 weight). Raises
        :class:`UnsupportedWeight` otherwise.
        """
        if not isinstance(state, QuantState):
            raise TypeError(f"expected a QuantState, got {type(state).__name__}")
        if state.layout == "gguf":
            return cls._from_gguf(state)
        if state.scheme not in SCHEMES or SCHEMES.get(state.scheme).kind != "affine":
            raise UnsupportedWeight(f"scheme {state.scheme!r} is not an integer affine scheme (int2..int8, "
                                    "symmetric or asymmetric)")
        if len(state.shape) != 2:
            raise UnsupportedWeight(f"QuantState of shape {tuple(state.shape)}: only 2-D [out, in] weights")
        out_f, in_f = state.shape
        scales = _scales(state)
        zeros = state.zeros
        if zeros is not None and zeros.is_floating_point():
            if not bool((zeros == zeros.round()).all()) or bool(((zeros < 0) | (zeros > 255)).any()):
                raise UnsupportedWeight("fractional (float) zero points, as HQQ's zero_rounding='float' (the "
                                        "default of method='hqq' with an asymmetric grid) stores them, have no "
                                        "integer zero-point layout; quantize with zero_rounding='round' (CLI: "
                                        "--zero-rounding round) for one")
        if state.layout == "group":
            g = state.block_size
            codes = state_codes(state)
        elif state.layout == "channel":
            if state.axis != 0:
                raise UnsupportedWeight(f"per-channel layout along axis {state.axis}: only axis 0 (output channels)")
            g = in_f
            codes = state_codes(state)
        elif state.layout == "tensor":
            g = in_f
            codes = state_codes(state).reshape(out_f, in_f)
            scales = scales.reshape(1, 1).expand(out_f, 1)
            zeros = None if zeros is None else zeros.reshape(1, 1).expand(out_f, 1)
        elif state.layout == "block":
            g = state.block_size
            if in_f % g:
                raise UnsupportedWeight(f"flat blocks of {g} do not align with rows of {in_f}; "
                                        "quantize with group_size= instead")
            codes = state_codes(state).reshape(out_f, in_f)
        else:
            raise UnsupportedWeight(f"layout {state.layout!r} is not an integer group layout")
        G = math.ceil(in_f / g) if in_f else 0
        scales = scales.reshape(out_f, G).contiguous()
        if zeros is not None:
            zeros = zeros.reshape(out_f, G).to(torch.uint8).contiguous()
        return cls(codes=codes.reshape(out_f, in_f), scales=scales, zeros=zeros, bits=state.bits, group_size=g,
                   dtype=state.dtype)

    @classmethod
    def _from_gguf(cls, state: QuantState) -> "AffineWeight":
        """Q4_0 / Q8_0 blocks as an int4 / int8 group-32 weight (fp16 scales, implicit zero)."""
        from lowbit.formats.gguf import unpack_blocks

        if state.scheme not in ("q4_0", "q8_0"):
            why = ("its offset m gives a fractional zero point -m/d, which integer zero points cannot hold"
                   if state.scheme in ("q4_1", "q5_1") else "5-bit codes have no integer checkpoint layout here")
            raise UnsupportedWeight(f"GGUF {state.scheme.upper()} blocks have no exact integer affine form: {why} "
                                    "(Q4_0 and Q8_0 have one)")
        codes, d, _ = unpack_blocks(state.data, state.scheme)
        codes = codes[:, :state.shape[-1]]  # a ragged row: the last block's padding is not part of the weight
        return cls(codes=codes.contiguous(), scales=d.contiguous(), zeros=None, bits=state.bits, group_size=32,
                   dtype=state.dtype)


def exact_cast(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when ``t`` converts to ``dtype`` and back without changing a single value."""
    c = t.to(dtype)
    return bool(torch.equal(c.to(t.dtype), t)) and bool(torch.isfinite(c).all() or not torch.isfinite(t).all())
