"""GPTQ / AWQ tensor packing: ``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one integer weight (split from
:mod:`lowbit.io.gptq`, which re-exports every name)."""
from __future__ import annotations

import logging
import re
from typing import Dict, Optional

import torch

from lowbit.io._affine import (
    AffineWeight,
    UnsupportedWeight,
    pack_int32,
    unpack_int32,
)
from lowbit.io._files import (
    CheckpointError,
)


logger = logging.getLogger(__name__)


GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output channel 8c + AWQ_ORDER[i]
_BLOCK_RE = re.compile(r"^(.*\.(?:layers|h|blocks|block|decoder\.layers)\.\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# tensor-level packing


def _v1_correction_word(bits: int) -> int:
    """The per-word constant GPTQModel subtracts (v2 -> v1) / adds (v1 -> v2), for 2, 4, 8 bits."""
    return sum(1 << (k * bits) for k in range(32 // bits))


def pack_gptq(w: AffineWeight, checkpoint_format: str = "gptq", scale_dtype: torch.dtype = torch.float16
              ) -> Dict[str, torch.Tensor]:
    """``{"qweight", "qzeros", "scales", "g_idx"}`` of one Linear weight.

    Args:
        w: the integer weight (2, 3, 4 or 8 bits; ``in`` and ``out`` multiples of 32).
        checkpoint_format: ``"gptq"`` (v1: ``qzeros`` holds ``z - 1``) or ``"gptq_v2"`` (``z``).
        scale_dtype: dtype of ``scales`` (fp16 in every GPTQ writer).

    Example::

        >>> w = AffineWeight(torch.full((32, 32), 8, dtype=torch.uint8), torch.ones(32, 1), None, 4, 32)
        >>> hex(pack_gptq(w)["qzeros"][0, 0].item() & 0xFFFFFFFF)
        '0x77777777'
    """
    if w.bits not in GPTQ_BITS:
        raise UnsupportedWeight(f"{w.bits}-bit codes: GPTQ packs {GPTQ_BITS} bits")
    out_f, in_f = w.shape
    if in_f % 32 or out_f % 32:
        raise UnsupportedWeight(f"weight of shape {w.shape}: GPTQ packing needs in and out features that are "
                                "multiples of 32")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: expected 'gptq' or 'gptq_v2'")
    zeros = w.zeros_or_implicit().to(torch.int64)  # [out, G]
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise UnsupportedWeight("a zero point of 0 cannot be stored in GPTQ v1 (z - 1 = -1 borrows into the "
                                    "neighbouring field); write checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    qweight = pack_int32(w.codes.t(), w.bits, dim=0)  # [in*b/32, out]
    qzeros = pack_int32(zeros.t(), w.bits, dim=1)  # [G, out*b/32]
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": w.scales.t().to(scale_dtype).contiguous(),
        "g_idx": w.group_index().to(torch.int32).contiguous(),
    }


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
                bits: Optional[int] = None, checkpoint_format: str = "gptq", group_size: Optional[int] = None,
                dtype: torch.dtype = torch.float16) -> AffineWeight:
    """The :class:`AffineWeight` of one GPTQ Linear (scales kept in their stored dtype).

    ``bits`` defaults to what the shapes imply (``qweight`` rows ``= in * bits / 32``, with ``in``
    from ``g_idx``). v1 zero points are restored the way GPTQModel does (adding ``0x11111111``-style
    constants word by word for 2/4/8 bits, which also undoes a borrow; field by field for 3 bits).
    """
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    G, out_f = scales.shape
    if qweight.shape[1] != out_f:
        raise CheckpointError(f"qweight has {qweight.shape[1]} output columns, scales {out_f}")
    if g_idx is not None:
        in_f = g_idx.numel()
    elif bits is not None:
        in_f = qweight.shape[0] * 32 // bits
    else:
        raise CheckpointError("unpack_gptq needs g_idx or bits to know the input features")
    if bits is None:
        bits = qweight.shape[0] * 32 // in_f
    if bits not in GPTQ_BITS or qweight.shape[0] * 32 != in_f * bits:
        raise CheckpointError(f"qweight of shape {tuple(qweight.shape)} does not hold {in_f} input features at "
                              f"{bits} bits (expected {in_f * bits // 32} rows)")
    if tuple(qzeros.shape) != (G, out_f * bits // 32):
        raise CheckpointError(f"qzeros has shape {tuple(qzeros.shape)}, expected {(G, out_f * bits // 32)}")
    codes = unpack_int32(qweight, bits, in_f, dim=0).t().contiguous()  # [out, in]
    zw = qzeros
    if checkpoint_format == "gptq":
        if bits == 3:
            z = (unpack_int32(zw, bits, out_f, dim=1).to(torch.int64) + 1) & 7
        else:
            words = (zw.to(torch.int64) + _v1_correction_word(bits)) & 0xFFFFFFFF
            words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
            z = unpack_int32(words, bits, out_f, dim=1).to(torch.int64)
    elif checkpoint_format == "gptq_v2":
        z = unpack_int32(zw, bits, out_f, dim=1).to(torch.int64)
    else:
        raise CheckpointError(f"checkpoint_format {checkpoint_format!r}: expected 'gptq' or 'gptq_v2'")
    zeros = z.t().to(torch.uint8).contiguous()  # [out, G]
    gi = None if g_idx is None else g_idx.to(torch.int64)
    if group_size in (None, -1):
        group_size = in_f if G <= 1 else -(-in_f // G)
    return AffineWeight(codes=codes, scales=scales.t().contiguous(), zeros=zeros, bits=bits, group_size=group_size,
                        g_idx=gi, dtype=dtype)


def pack_awq(w: AffineWeight, scale_dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """AWQ GEMM ``{"qweight", "qzeros", "scales"}`` of a 4-bit weight with consecutive groups."""
    if w.bits != 4:
        raise UnsupportedWeight(f"{w.bits}-bit codes: AWQ GEMM stores 4-bit weights only")
    out_f, in_f = w.shape
    if out_f % 8 or in_f % w.group_size:
        raise UnsupportedWeight(f"weight of shape {w.shape} with group_size {w.group_size}: AWQ needs out % 8 == 0 "
                                "and groups that divide in")
    if not w.has_trivial_g_idx():
        raise UnsupportedWeight("AWQ has no g_idx: act-order weights cannot be stored")
    pos2ch = torch.tensor([8 * (j // 8) + AWQ_ORDER[j % 8] for j in range(out_f)])
    qweight = pack_int32(w.codes.t()[:, pos2ch], 4, dim=1)  # [in, out/8]
    qzeros = pack_int32(w.zeros_or_implicit().t()[:, pos2ch], 4, dim=1)  # [G, out/8]
    return {"qweight": qweight, "qzeros": qzeros, "scales": w.scales.t().to(scale_dtype).contiguous()}


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float16) -> AffineWeight:
    """The :class:`AffineWeight` of one AWQ GEMM Linear."""
    G, out_f = scales.shape
    in_f = qweight.shape[0]
    if qweight.shape[1] * 8 != out_f or tuple(qzeros.shape) != (G, out_f // 8):
        raise CheckpointError(f"AWQ tensors of shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                              f"scales {tuple(scales.shape)} do not agree")
    pos2ch = torch.tensor([8 * (j // 8) + AWQ_ORDER[j % 8] for j in range(out_f)])
    ch2pos = torch.argsort(pos2ch)
    codes = unpack_int32(qweight, 4, out_f, dim=1)[:, ch2pos].t().contiguous()
    zeros = unpack_int32(qzeros, 4, out_f, dim=1)[:, ch2pos].t().contiguous()
    return AffineWeight(codes=codes, scales=scales.t().contiguous(), zeros=zeros, bits=4,
                        group_size=in_f // G if G else in_f, dtype=dtype)
