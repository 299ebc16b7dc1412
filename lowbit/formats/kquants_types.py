"""K-quant types (Q2_K .. Q6_K: super-blocks of 256, sub-block sizes, byte sizes) and the super-block
parameters :class:`KParams` (split from :mod:`lowbit.formats.kquants`, which re-exports every name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import numpy as np
import torch



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
