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

The user's words for a granularity are small frozen values -- :class:`PerTensor`, :class:`PerChannel`,
:class:`PerGroup` ``(g)``, :class:`PerBlock` ``(b)`` -- parsed and validated once by :func:`granularity`
(``group_size=-1`` is :class:`PerChannel`, always). Resolved against a shape they give a
:class:`Grouping`: the group count, the ragged tail, and how to pad / unpad / mask it, which the
algorithms (:mod:`lowbit.algorithms.grid`), the tensor layer and the exporters share. A 2-D weight with
one group per row has one canonical stored layout, ``channel`` along axis 0 (:func:`canonical_layout`).

Example::

    >>> gr = granularity(group_size=128).resolve((64, 576))
    >>> gr.n_groups, gr.tail, gr.pad
    (5, 64, 64)
    >>> granularity(group_size=-1)
    PerChannel(axis=0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

LAYOUTS = ("tensor", "channel", "group", "block", "gguf")


# ---------------------------------------------------------------------------------------------
# granularities (the user's words) and their resolution against a shape


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class _Granularity:
    def resolve(self, shape: Tuple[int, ...]) -> "Grouping":
        """This granularity against a tensor of ``shape``: its :class:`Grouping`."""
        shape = tuple(shape)
        return self.layout(shape).grouping(shape)


@dataclass(frozen=True)
class PerTensor(_Granularity):
    """One scale for the whole tensor."""

    def layout(self, shape: Tuple[int, ...] = ()) -> "Layout":
        return Layout("tensor")


@dataclass(frozen=True)
class PerChannel(_Granularity):
    """One scale per slice along ``axis`` (axis 0 of a ``[out, in]`` weight: per output channel)."""

    axis: int = 0

    def layout(self, shape: Tuple[int, ...] = ()) -> "Layout":
        return Layout("channel", axis=self.axis % len(shape) if len(shape) else self.axis)


@dataclass(frozen=True)
class PerGroup(_Granularity):
    """Groups of ``size`` consecutive elements along the last (input) dimension; the last may be ragged."""

    size: int

    def __post_init__(self) -> None:
        if not _positive_int(self.size):
            raise ValueError(f"group_size={self.size!r}: {GROUP_SIZE_RULE}")

    def layout(self, shape: Tuple[int, ...] = ()) -> "Layout":
        return Layout("group", block_size=self.size)


@dataclass(frozen=True)
class PerBlock(_Granularity):
    """Blocks of ``size`` consecutive elements of the flattened tensor (bitsandbytes style)."""

    size: int

    def __post_init__(self) -> None:
        if not _positive_int(self.size):
            raise ValueError(f"block_size={self.size!r}: must be a positive integer or None (per-tensor)")

    def layout(self, shape: Tuple[int, ...] = ()) -> "Layout":
        return Layout("block", block_size=self.size)


Granularity = Union[PerTensor, PerChannel, PerGroup, PerBlock]
GRANULARITIES = (PerTensor, PerChannel, PerGroup, PerBlock)

#: the one message for a bad ``group_size`` (every entry point validates through :func:`granularity`)
GROUP_SIZE_RULE = "must be a positive integer or -1 (one group per output channel)"


def granularity(group_size=None, *, block_size=None, axis=None) -> Granularity:
    """The granularity named by the user's arguments, validated once.

    ``group_size``: a positive integer (:class:`PerGroup`) or ``-1`` (:class:`PerChannel`, axis 0);
    ``axis``: :class:`PerChannel` along it; ``block_size``: :class:`PerBlock` (when neither of the others
    is given); nothing: :class:`PerTensor`. A granularity value passes through unchanged.

    >>> granularity(group_size=64), granularity(axis=1), granularity(block_size=64), granularity()
    (PerGroup(size=64), PerChannel(axis=1), PerBlock(size=64), PerTensor())
    """
    if isinstance(group_size, GRANULARITIES):
        return group_size
    given = [name for name, v in (("group_size", group_size), ("axis", axis)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass only one of group_size= and axis= (got {', '.join(given)})")
    if group_size is not None:
        if group_size == -1 and not isinstance(group_size, bool):
            return PerChannel(0)
        if not _positive_int(group_size):
            raise ValueError(f"group_size={group_size!r}: {GROUP_SIZE_RULE}")
        return PerGroup(group_size)
    if axis is not None:
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ValueError(f"axis={axis!r}: must be an integer")
        return PerChannel(axis)
    if block_size is None:
        return PerTensor()
    return PerBlock(block_size)


def column_granularity(group_size) -> Granularity:
    """The granularity of the PTQ algorithms' ``group_size`` (groups along the input dim of ``[out, in]``):
    ``-1`` and ``None`` are :class:`PerChannel`; a granularity passes through."""
    if group_size is None:
        return PerChannel(0)
    return granularity(group_size)


@dataclass(frozen=True)
class Grouping:
    """A granularity resolved against a shape: rows ``[R, K]`` cut into groups of ``group`` columns.

    ``n_groups`` groups per row, the last ``tail`` columns long (``tail == group`` when not ragged);
    ``pad`` columns complete the ragged last group. ``per_channel``: one group per row by the
    user's choice (``-1``), stored as the ``channel`` layout.
    """

    rows: int
    length: int
    group: int
    per_channel: bool = False

    @classmethod
    def of_columns(cls, in_features: int, group_size, rows: int = 0) -> "Grouping":
        """The grouping of a ``[rows, in_features]`` weight by the PTQ ``group_size`` (``-1``/None: one group
        per row; a :class:`Grouping` passes through)."""
        if isinstance(group_size, Grouping):
            return group_size
        gran = column_granularity(group_size)
        if isinstance(gran, PerChannel):
            return cls(rows, in_features, max(in_features, 1), per_channel=True)
        if not isinstance(gran, PerGroup):
            raise ValueError(f"group_size={group_size!r}: the PTQ algorithms group the input dimension "
                             f"(PerGroup or PerChannel), not {gran!r}")
        return cls(rows, in_features, gran.size)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.length / self.group) if self.length else 0

    @property
    def pad(self) -> int:
        return self.n_groups * self.group - self.length

    @property
    def tail(self) -> int:
        return self.group - self.pad if self.length else 0

    @property
    def ragged(self) -> bool:
        return self.pad != 0

    @property
    def one_group_per_row(self) -> bool:
        return self.n_groups <= 1

    @property
    def stored_group_size(self) -> int:
        """The group length a group-layout state records: ``length`` for one group per row."""
        return self.length if self.per_channel else self.group

    def bounds(self) -> List[Tuple[int, int]]:
        """``[(start, stop), ...]`` of the column groups, the last one possibly ragged."""
        g = self.group
        return [(a, min(a + g, self.length)) for a in range(0, self.length, g)]

    def group_index(self, device=None) -> torch.Tensor:
        """int64 ``[length]``: the group of every column."""
        return torch.arange(self.length, device=device) // self.group

    def pad_rows(self, v: torch.Tensor, fill: str = "edge") -> torch.Tensor:
        """``[R, K] -> [R, G, g]``; the ragged tail completed with the row's last element (``"edge"``: min,
        max and absmax unchanged) or with zeros (``"zero"``)."""
        r, k = v.shape
        if self.pad:
            extra = v[:, -1:].expand(r, self.pad) if fill == "edge" else v.new_zeros(r, self.pad)
            v = torch.cat([v, extra], dim=1)
        return v.reshape(r, -1, self.group)

    def unpad(self, vg: torch.Tensor) -> torch.Tensor:
        """``[R, G, g] -> [R, K]`` dropping the padding."""
        return vg.reshape(vg.shape[0], -1)[:, :self.length]

    def mask(self, device=None) -> Optional[torch.Tensor]:
        """``[G, g]`` float: 1 on real columns, 0 on the padding; None when nothing is padded."""
        if not self.pad:
            return None
        m = torch.ones(self.n_groups, self.group, device=device)
        m[-1, self.group - self.pad:] = 0
        return m

    def expand(self, params: torch.Tensor) -> torch.Tensor:
        """Per-group ``[R, G]`` parameters as per-column ``[R, K]``."""
        return params[:, self.group_index(params.device)]

    def layout(self) -> "Layout":
        """The stored layout of a 2-D weight with this grouping (:func:`canonical_layout`)."""
        return canonical_layout(self)


def canonical_layout(grouping: Grouping) -> "Layout":
    """One stored layout per granularity of a 2-D weight: per channel (``group_size=-1``) is ``channel``
    along axis 0, whatever path quantized it; groups are ``group`` with their length."""
    if grouping.per_channel:
        return Layout("channel", axis=0)
    return Layout("group", block_size=grouping.group)


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

    def grouping(self, shape: Tuple[int, ...]) -> Grouping:
        """This layout resolved against ``shape``: the :class:`Grouping` of its ``[R, K]`` view."""
        r, k, g = self.view_shape(shape)
        return Grouping(r, k, g, per_channel=self.kind == "channel")


def resolve_layout(shape: Tuple[int, ...], block_size, group_size, axis) -> Layout:
    """Pick the layout from the user's granularity arguments (exactly one may be given)."""
    if axis is not None and group_size is None:
        if not len(shape):
            raise ValueError(f"axis={axis!r}: a 0-d tensor has no axis; use block_size=None (one scale per tensor)")
        if not isinstance(axis, int) or isinstance(axis, bool) or not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis={axis!r}: out of range for a tensor of {len(shape)} dims")
    gran = granularity(group_size, block_size=block_size, axis=axis)
    if isinstance(gran, PerChannel) and not len(shape):
        return Layout("tensor")
    return gran.layout(shape)


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


def pad_groups(v: torch.Tensor, g: int, fill: str = "edge") -> torch.Tensor:
    """``[R, K] -> [R, G, g]``, the ragged last group padded with the row's last element (see
    :meth:`Grouping.pad_rows`)."""
    return Grouping(v.shape[0], v.shape[1], g).pad_rows(v, fill)


def unpad_groups(vg: torch.Tensor, k: int) -> torch.Tensor:
    """``[R, G, g] -> [R, K]`` dropping the padding."""
    return vg.reshape(vg.shape[0], -1)[:, :k]
