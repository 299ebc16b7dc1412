"""QuantState: the one currency of lowbit -- algorithms produce it, modules hold it, io serialises it.

A dataclass of declared tensor fields plus plain attributes. ``state_dict()`` flattens it into
tensors only (the attributes travel as a small JSON blob stored in a uint8 tensor under ``meta``),
so a state saves with safetensors and loads without executing code.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch

from lowbit.tensor.granularity import Layout

STATE_VERSION = 1
_TENSOR_FIELDS = ("data", "scales", "zeros", "code")
_DTYPES = {
    str(d).replace("torch.", ""): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
              torch.int32, torch.float8_e4m3fn, torch.float8_e5m2)
}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@dataclass
class QuantState:
    """Quantized representation of one tensor.

    Example::

        >>> import torch, lowbit
        >>> s = lowbit.quantize(torch.randn(64, 64), scheme="nf4", block_size=64)
        >>> s.bits_per_element
        4.5
        >>> lowbit.dequantize(s).shape
        torch.Size([64, 64])
    """

    scheme: str
    bits: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    layout: str
    data: torch.Tensor
    block_size: Optional[int] = None
    axis: Optional[int] = None
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None
    code: Optional[torch.Tensor] = None
    nested: Optional["QuantState"] = None
    offset: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    # -- derived -----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def layout_obj(self) -> Layout:
        return Layout(self.layout, self.block_size, self.axis)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed data, scales, zero points and nested scale state.

        Codebooks are shared constants (16 or 256 floats) and are not counted, as bitsandbytes does.
        """
        total = self.data.numel() * self.data.element_size()
        for t in (self.scales, self.zeros):
            if t is not None:
                total += t.numel() * t.element_size()
        if self.nested is not None:
            total += self.nested.nbytes
            total += 4 if self.offset is not None else 0
        return total

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    # -- movement ----------------------------------------------------------------------------
    def to(self, device=None, **kwargs) -> "QuantState":
        """Move every tensor to ``device`` (dtypes are kept: a state's storage types are part of it)."""
        moved = {f: (getattr(self, f).to(device) if getattr(self, f) is not None else None) for f in _TENSOR_FIELDS}
        nested = self.nested.to(device) if self.nested is not None else None
        return replace(self, nested=nested, **moved)

    def cpu(self) -> "QuantState":
        return self.to("cpu")

    def cuda(self, device=None) -> "QuantState":
        return self.to(device or "cuda")

    # -- serialisation -----------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "version": STATE_VERSION,
            "scheme": self.scheme,
            "bits": self.bits,
            "shape": list(self.shape),
            "dtype": _dtype_name(self.dtype),
            "layout": self.layout,
            "block_size": self.block_size,
            "axis": self.axis,
            "offset": self.offset,
            "extra": self.extra,
        }

    def state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """Tensors only: ``{prefix}data``, ``{prefix}scales``, ..., ``{prefix}meta`` (JSON as uint8)."""
        out: Dict[str, torch.Tensor] = {}
        for f in _TENSOR_FIELDS:
            t = getattr(self, f)
            if t is not None:
                out[prefix + f] = t
        out[prefix + "meta"] = torch.tensor(list(json.dumps(self._meta(), sort_keys=True).encode()), dtype=torch.uint8)
        if self.nested is not None:
            out.update(self.nested.state_dict(prefix + "nested."))
        return out

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor], prefix: str = "") -> "QuantState":
        key = prefix + "meta"
        if key not in sd:
            raise KeyError(f"not a QuantState: {key!r} missing")
        try:
            meta = json.loads(bytes(sd[key].to(torch.uint8).cpu().tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt QuantState metadata at {key!r}: {e}") from None
        if meta.get("version", 0) > STATE_VERSION:
            raise ValueError(f"QuantState version {meta['version']} is newer than this lowbit ({STATE_VERSION})")
        if prefix + "data" not in sd:
            raise KeyError(f"QuantState at {prefix!r}: tensor {prefix + 'data'!r} missing")
        nested = None
        if any(k.startswith(prefix + "nested.") for k in sd):
            nested = cls.from_state_dict(sd, prefix + "nested.")
        state = cls(
            scheme=meta["scheme"],
            bits=int(meta["bits"]),
            shape=tuple(meta["shape"]),
            dtype=_DTYPES[meta["dtype"]],
            layout=meta["layout"],
            block_size=meta["block_size"],
            axis=meta["axis"],
            offset=meta["offset"],
            extra=meta.get("extra", {}),
            nested=nested,
            **{f: sd.get(prefix + f) for f in _TENSOR_FIELDS},
        )
        state.validate()
        return state

    def validate(self) -> None:
        """Check that the tensors agree with the declared shape/layout; raise ValueError naming the field."""
        from lowbit.tensor.functional import expected_data_numel, expected_scales_numel

        want = expected_data_numel(self)
        if want is not None and self.data.numel() != want:
            raise ValueError(
                f"QuantState({self.scheme}, shape={self.shape}): data has {self.data.numel()} elements, expected {want}"
            )
        want = expected_scales_numel(self)
        have = self.scales.numel() if self.scales is not None else (self.nested.numel if self.nested else None)
        if want is not None and have != want:
            raise ValueError(
                f"QuantState({self.scheme}, shape={self.shape}): scales have {have} elements, expected {want}"
            )

    def __repr__(self) -> str:
        gran = {
            "block": f"block_size={self.block_size}",
            "group": f"group_size={self.block_size}",
            "channel": f"axis={self.axis}",
            "tensor": "per-tensor",
            "gguf": f"gguf blocks of {self.block_size}",
        }.get(self.layout, self.layout)
        dq = ", double_quant" if self.nested is not None else ""
        return (
            f"QuantState(scheme={self.scheme!r}, shape={tuple(self.shape)}, dtype={_dtype_name(self.dtype)}, "
            f"{gran}{dq}, {self.bits_per_element:.3f} bits/elem, {self.nbytes} bytes, device={self.device})"
        )
