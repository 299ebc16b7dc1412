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
    def to(self, device=None, copy=None, **kwargs) -> "QuantState":
        """Move every tensor to ``device`` (dtypes are kept: a state's storage types are part of it). ``copy``: a
        function ``tensor -> tensor on device`` used instead of ``tensor.to(device)`` (e.g. staged host copies)."""
        mv = copy if copy is not None else (lambda x: x.to(device))
        moved = {f: (mv(getattr(self, f)) if getattr(self, f) is not None else None) for f in _TENSOR_FIELDS}
        nested = self.nested.to(device, copy=copy) if self.nested is not None else None
        t = self.__dict__.get("_offset_t")
        if t is not None and self.__dict__.get("_offset") is None:  # a device offset moves unread
            moved["offset"] = mv(t)
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
        """Check that the fields agree with each other and with the declared shape/layout (no pass over the
        values); raise ValueError naming the field. :func:`lowbit.dequantize` calls it on every state."""
        from lowbit.tensor.functional import SCHEMES, expected_data_numel, expected_scales_numel
        from lowbit.tensor.granularity import LAYOUTS

        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid QuantState(scheme={self.scheme!r}, shape={tuple(self.shape)}): {msg}")

        if self.scheme not in SCHEMES:
            raise bad(f"unknown scheme; registered: {', '.join(SCHEMES.names())}")
        sch = SCHEMES.get(self.scheme)
        if not isinstance(self.shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in self.shape):
            raise bad("shape must be a tuple of non-negative integers")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise bad(f"dtype {self.dtype} is not a float dtype (float32, float16, bfloat16, float64)")
        if self.bits != sch.bits:
            raise bad(f"bits={self.bits}, but scheme {sch.name!r} has {sch.bits}")
        if self.layout not in LAYOUTS:
            raise bad(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        if (self.layout == "gguf") != (sch.kind == "gguf"):
            raise bad(f"layout {self.layout!r} does not fit a {sch.kind} scheme")
        if self.layout in ("block", "group", "gguf") and (
                not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0):
            raise bad(f"block_size={self.block_size!r}: layout {self.layout!r} needs a positive integer")
        if self.layout == "channel" and (not isinstance(self.axis, int) or not 0 <= self.axis < max(len(self.shape), 1)
                                         or not self.shape):
            raise bad(f"axis={self.axis!r} is not an axis of the shape")
        if not isinstance(self.data, torch.Tensor):
            raise bad(f"data must be a tensor, got {type(self.data).__name__}")
        want_dt = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(sch.name, torch.uint8)
        if self.data.dtype != want_dt:
            raise bad(f"data has dtype {self.data.dtype}, expected {want_dt}")
        for f in ("scales", "zeros", "code"):
            t = getattr(self, f)
            if t is not None and not isinstance(t, torch.Tensor):
                raise bad(f"{f} must be a tensor or None, got {type(t).__name__}")
        if self.scales is not None and not self.scales.is_floating_point():
            raise bad(f"scales have dtype {self.scales.dtype}, expected a float dtype")
        if self.numel and sch.kind != "gguf":
            if self.scales is None and self.nested is None:
                raise bad("scales are missing (neither scales nor a nested double-quant state)")
            if self.scales is not None and self.nested is not None:
                raise bad("both scales and a nested state are set")
            if self.nested is not None:
                if not isinstance(self.nested, QuantState):
                    raise bad(f"nested must be a QuantState, got {type(self.nested).__name__}")
                if self.__dict__.get("_offset_t") is not None and self.__dict__.get("_offset") is None:
                    pass  # a device offset not yet read (its finiteness is asserted on the device)
                elif not isinstance(self.offset, (int, float)) or not math.isfinite(self.offset):
                    raise bad(f"offset={self.offset!r}: a double-quantized state needs a finite float offset")
                self.nested.validate()
            if sch.kind == "affine" and not sch.symmetric and self.zeros is None:
                raise bad("an asymmetric state needs its zero points (zeros is missing)")
            if sch.kind == "codebook":
                if self.code is None:
                    raise bad("a codebook state needs its code table (code is missing)")
                if self.code.dim() != 1 or self.code.numel() != 1 << sch.bits or not self.code.is_floating_point():
                    raise bad(f"code must be a 1-D float table of {1 << sch.bits} values, got "
                              f"{self.code.dtype} {tuple(self.code.shape)}")
        if self.layout == "gguf" and self.data.dim() != 2:
            raise bad(f"GGUF data must be 2-D [rows, bytes], got shape {tuple(self.data.shape)}")
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
        if want is not None and self.zeros is not None and self.zeros.numel() != want:
            raise ValueError(
                f"QuantState({self.scheme}, shape={self.shape}): zeros have {self.zeros.numel()} elements, expected {want}"
            )

    # -- the double-quantization offset: a Python float, or a device tensor until first read --------------
    def offset_tensor(self, device=None) -> Optional[torch.Tensor]:
        """The offset as a float32 tensor of shape ``[1]`` on ``device`` (default: the data's device), or None.

        A state made by :func:`lowbit.kernels.quantize` on CUDA holds the offset as a device tensor (reading it
        as a float would synchronise with the host); this returns that tensor without a copy when it is on
        ``device``. Otherwise the tensor is made from the float (a host-to-device copy).
        """
        device = torch.device(device) if device is not None else self.device
        t = self.__dict__.get("_offset_t")
        if t is not None and t.device == device:
            return t
        v = self.offset
        if v is None:
            return None
        return torch.tensor([v], dtype=torch.float32).to(device)

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


def _get_offset(self) -> Optional[float]:
    # a device offset (kernels.quantize on CUDA) is read once, on first use (a host synchronisation), as the
    # float that a synchronous quantize would have stored: saved files are the same bytes
    d = self.__dict__
    if "_offset" not in d and "offset" in d:  # unpickled from a lowbit before the device offset (a plain attribute)
        return d["offset"]
    v = d.get("_offset")
    if v is None:
        t = d.get("_offset_t")
        if t is not None:
            v = float(t.reshape(-1)[0].item())
            self.__dict__["_offset"] = v
    return v


def _set_offset(self, value) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"offset tensor must hold one float value, got {value.dtype} {tuple(value.shape)}")
        self.__dict__["_offset_t"] = value.detach().reshape(1).to(torch.float32)
        self.__dict__["_offset"] = None
    else:
        self.__dict__["_offset"] = value
        self.__dict__["_offset_t"] = None


def _offset_key(state: "QuantState"):
    """What identifies the offset's value without reading a device offset (for caches of derived layouts)."""
    t = state.__dict__.get("_offset_t")
    if t is not None:
        return ("t", id(t), t._version)
    return state.offset  # a host float (or None): reading it does not synchronise


# ``offset`` stays a dataclass field (constructor, replace, fields) backed by the two attributes above
QuantState.offset = property(_get_offset, _set_offset, doc="The double-quantization offset (float or None).")
