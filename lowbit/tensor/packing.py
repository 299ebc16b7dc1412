"""Canonical bit packing: b-bit unsigned codes into a dense, MSB-first byte stream.

The first code of the stream occupies the most significant bits of the first byte. For 4 bits
this is exactly bitsandbytes' layout (element 2i in the high nibble, 2i+1 in the low nibble); for
2 bits four codes per byte, first in bits 7-6; for 3 bits eight codes fill three bytes. A stream
whose bit length is not a multiple of 8 is padded with zero bits. ``unpack_bits`` needs the code
count ``n`` to drop the padding.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: must be one of {SUPPORTED_BITS}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of unsigned codes (< 2**bits) into uint8, MSB first."""
    _check(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        c = codes.view(-1, per).to(torch.int32)
        shifts = torch.arange(per - 1, -1, -1, device=c.device, dtype=torch.int32) * bits
        return (c << shifts).sum(dim=1).to(torch.uint8)
    # generic bit stream (3, 5, 6, 7 bits): expand to bits, group by 8
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device, dtype=torch.int32)
    bitstream = ((codes.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    if pad:
        bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
    weights = torch.arange(7, -1, -1, device=codes.device, dtype=torch.int32)
    return (bitstream.view(-1, 8) << weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as uint8."""
    _check(bits)
    packed = packed.reshape(-1).to(torch.uint8)
    need = packed_nbytes(n, bits)
    if packed.numel() < need:
        raise ValueError(f"packed buffer holds {packed.numel()} bytes, {need} needed for {n} {bits}-bit codes")
    if bits == 8:
        return packed[:n].clone()
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per - 1, -1, -1, device=p.device, dtype=torch.int32) * bits
        codes = (p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n].to(torch.uint8)
    shifts = torch.arange(7, -1, -1, device=p.device, dtype=torch.int32)
    bitstream = ((p.unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits].view(n, bits)
    weights = torch.arange(bits - 1, -1, -1, device=p.device, dtype=torch.int32)
    return (bitstream << weights).sum(dim=1).to(torch.uint8)
