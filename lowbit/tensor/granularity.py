"""Granularity: per-tensor / per-channel / per-group / flat blockwise, resolved to one grouped 2-D view.

Every layout is a matrix ``[R, K]`` cut into groups of ``g`` consecutive elements along its last
dimension, the last group of each row possibly shorter (ragged):

* ``block``   -- the row-major flattened tensor as one row, ``g = block_size`` (bitsandbytes style)
* ``tensor``  -- the flattened tensor as one row, one group
* ``group``   -- ``[prod(shape[:-1]), shape[-1]]``, ``g = group_size`` (GPTQ/AWQ style, along the input dim)
* ``channel`` -- ``axis`` moved first, ``[shape[axis], rest]``, one group per row

Codes are stored in this view's row-major order. Ragged groups are padded for the statistics by
repeating the row's last element, which changes neither min, max nor absmax; the pad codes are
dropped before packing. This module is the only place that knows about ragged groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

LAYOUTS = ("tensor", "channel", "group", "block", "gguf")


@dataclass(frozen=True)
class Layout:
    kind: str
    block_size: Optional[int] = None  # group length for block/group layouts
    axis: Optional[int] = None        # for channel layout

    def view_shape(self, shape: Tuple[int, ...]) -> Tuple[int, int, int]:
        """(rows, row length, group length) of the grouped view of a tensor of ``shape``."""
        n = math.prod(shape)
        if self.kind in ("block",):
            return 1, n, self.block_size
        if self.kind == "tensor":
            return 1, n, max(n, 1)
        if self.kind in ("group", "gguf"):
            k = shape[-1] if shape else 1
            return (n // k if k else 0), k, self.block_size
        if self.kind == "channel":
            c = shape[self.axis]
            rest = n // c if c else 0
            return c, rest, max(rest, 1)
        raise ValueError(f"unknown layout {self.kind!r}; expected one of {LAYOUTS}")

    def n_groups(self, shape: Tuple[int, ...]) -> Tuple[int, int]:
        r, k, g = self.view_shape(shape)
        return r, (math.ceil(k / g) if k else 0)


def resolve_layout(shape: Tuple[int, ...], block_size, group_size, axis) -> Layout:
    """Pick the layout from the user's granularity arguments (exactly one may be given)."""
    given = [name for name, v in (("group_size", group_size), ("axis", axis)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass only one of group_size= and axis= (got {', '.join(given)})")
    if group_size is not None:
        if group_size == -1:
            return Layout("channel", axis=0) if len(shape) >= 1 else Layout("tensor")
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size={group_size!r}: must be a positive integer or -1")
        return Layout("group", block_size=group_size)
    if axis is not None:
        if not len(shape):
            raise ValueError(f"axis={axis!r}: a 0-d tensor has no axis; use block_size=None (one scale per tensor)")
        if not isinstance(axis, int) or isinstance(axis, bool) or not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis={axis!r}: out of range for a tensor of {len(shape)} dims")
        return Layout("channel", axis=axis % max(len(shape), 1))
    if block_size is None:
        return Layout("tensor")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r}: must be a positive integer or None (per-tensor)")
    return Layout("block", block_size=block_size)


def to_view(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The grouped 2-D view ``[R, K]`` of ``x`` (a copy only for the channel layout with axis != 0)."""
    r, k, _ = layout.view_shape(tuple(x.shape))
    if layout.kind == "channel" and layout.axis != 0:
        x = x.movedim(layout.axis, 0)
    return x.reshape(r, k)


def from_view(v: torch.Tensor, shape: Tuple[int, ...], layout: Layout) -> torch.Tensor:
    """Inverse of :func:`to_view`."""
    if layout.kind == "channel" and layout.axis != 0:
        moved = (shape[layout.axis],) + tuple(s for i, s in enumerate(shape) if i != layout.axis)
        return v.reshape(moved).movedim(0, layout.axis)
    return v.reshape(shape)


def pad_groups(v: torch.Tensor, g: int) -> torch.Tensor:
    """``[R, K] -> [R, G, g]``, the ragged last group padded with the row's last element."""
    r, k = v.shape
    pad = (-k) % g
    if pad:
        v = torch.cat([v, v[:, -1:].expand(r, pad)], dim=1)
    return v.reshape(r, -1, g)


def unpad_groups(vg: torch.Tensor, k: int) -> torch.Tensor:
    """``[R, G, g] -> [R, K]`` dropping the padding."""
    return vg.reshape(vg.shape[0], -1)[:, :k]
