"""RTN: round-to-nearest weight quantization, no calibration data.

Every group of ``group_size`` input columns of each output row gets its own affine grid
(:mod:`lowbit.algorithms.grid`): from its min/max (``search="minmax"``, the naive baseline) or from
a shrink-factor search minimising the group's squared error (``search="mse"``), then every weight is
rounded to the nearest level.

Example::

    >>> state = rtn_quantize(torch.randn(64, 576), bits=4, group_size=128, sym=False)
    >>> lowbit.dequantize(state).shape
    torch.Size([64, 576])
"""
from __future__ import annotations

import torch

from lowbit.algorithms.grid import AffineGrid, quantize_groups, to_state


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                 search: str = "minmax", gguf_type=None, **grid_options):
    """Round-to-nearest quantization of ``weight [out, in]`` -> group-layout ``QuantState``.

    ``group_size=-1`` means one group per output row; the last group may be ragged.
    ``gguf_type`` (``"Q4_0"`` ... ``"Q8_0"``): llama.cpp's own reference quantization into that
    block format instead (byte-identical to gguf-py; ``bits``/``group_size``/``sym`` are the format's).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if gguf_type is not None:
        from lowbit.tensor.functional import quantize_tensor as quantize

        if weight.shape[1] % 32:
            raise ValueError(f"GGUF {gguf_type} blocks need in_features divisible by 32, got {weight.shape[1]}")
        return quantize(weight.detach(), scheme=str(gguf_type).lower())
    grid = AffineGrid(bits=bits, sym=sym, search=search, **grid_options)
    codes, scales, zeros = quantize_groups(weight.detach(), grid, group_size)
    return to_state(codes, scales, zeros, bits, group_size, sym, dtype=weight.dtype)
