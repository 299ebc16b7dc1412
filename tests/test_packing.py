import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.tensor.packing import pack_bits, packed_nbytes, unpack_bits


def test_4bit_is_bnb_layout_high_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_bits(codes, 4)
    assert packed.tolist() == [0x12, 0xF0, 0x70]


def test_2bit_and_3bit_hand_vectors():
    assert pack_bits(torch.tensor([3, 0, 1, 2, 1], dtype=torch.uint8), 2).tolist() == [0b11000110, 0b01000000]
    # 3-bit: 0b101, 0b011, 0b111 -> 101 011 11|1 0000000
    assert pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b10101111, 0b10000000]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_roundtrip(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_errors():
    with pytest.raises(ValueError, match="bits=9"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 5)
