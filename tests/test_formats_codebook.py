"""lowbit.formats.codebook against bitsandbytes 0.50.2 on CPU (bit-exact) and reference figures.

Oracle tests compare with ``bitsandbytes.functional`` as it runs on this CPU: ``quantize_4bit`` /
``dequantize_4bit`` (pure-PyTorch default backend for quantization, native kernels for
dequantization) and ``quantize_blockwise`` / ``dequantize_blockwise`` (native 65,536-entry
lookup-table kernel, also used for the nested absmax of ``compress_statistics=True``).
"""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import codebook as cb
from lowbit.tensor.packing import pack_bits, unpack_bits


@pytest.fixture(scope="module")
def F():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    # bnb wraps its pure-PyTorch fallbacks (e.g. dequantize_4bit for an odd last dim) in
    # torch.compile, which recompiles per shape (~50 s each on 2 cores); run them eagerly.
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield F
    torch._dynamo.config.disable = old


def _sample(n: int, blocksize: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal data with a zero block, exact zeros, tiny values and a large outlier (flat, float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.05
    if n >= 3 * blocksize:
        x[blocksize : 2 * blocksize] = 0.0  # an all-zero full block
    x[:: 97] = 0.0
    x[5::131] *= 1e-4  # tiny values (FP4's wrong-sign-zero region)
    x[n // 2] = 3.0
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# tables


@pytest.mark.oracle
def test_tables_bit_identical(F):
    assert torch.equal(cb.NF4.view(torch.int32), F.get_4bit_type("nf4", device="cpu").view(torch.int32))
    assert torch.equal(cb.FP4.view(torch.int32), F.get_4bit_type("fp4", device="cpu").view(torch.int32))
    assert torch.equal(cb.dynamic_map().view(torch.int32), F.create_dynamic_map().view(torch.int32))
    assert torch.equal(cb.get_code("dynamic8"), F.create_dynamic_map())


def test_normal_map_reproduces_nf4_and_nf8_shape():
    # the NF8 builder is the NF4 construction: 4 bits with bnb's offset give bnb's hard-coded table
    assert torch.equal(cb.normal_map(4, 0.9677083), cb.NF4)
    c = cb.nf8_code()
    assert c.dtype == torch.float32 and c.numel() == 256
    assert bool((c[1:] > c[:-1]).all())  # strictly increasing: 256 distinct levels
    assert c[127].item() == 0.0 and c[-1].item() == 1.0 and c[0].item() == -1.0
    assert int((c > 0).sum()) == 128 and int((c < 0).sum()) == 127
    # quantiles of N(0,1): the positive side at probability offset..0.5 (float64 check of one value)
    off = 1 - 0.5 * (1 / 510 + 1 / 512)
    p = torch.linspace(off, 0.5, 129)[:-1].double()
    q = torch.special.ndtri(p)
    assert torch.allclose(c[128:].double().flip(0), (q / q[0]), atol=1e-7)
    assert torch.equal(cb.get_code("nf8"), c)


def test_get_code_and_errors():
    assert torch.equal(cb.get_code("NF4"), cb.NF4)
    assert cb.get_code("fp4")[3].item() == 1.0
    with pytest.raises(ValueError, match="unknown codebook 'nf3'"):
        cb.get_code("nf3")
    with pytest.raises(ValueError, match="blocksize=0"):
        cb.quantize_blockwise(torch.randn(8), cb.NF4, 0)
    with pytest.raises(TypeError, match="floating-point"):
        cb.quantize_blockwise(torch.arange(8), cb.NF4, 4)
    with pytest.raises(ValueError, match="absmax has 1 entries; 2 expected"):
        cb.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(1), cb.NF4, 8)
    with pytest.raises(ValueError, match="sorted"):
        cb.quantize_blockwise_lut(torch.randn(8), cb.FP4, 8)
    assert (cb.zero_code(cb.NF4), cb.zero_code(cb.FP4), cb.zero_code(cb.dynamic_map())) == (7, 0, 127)


def test_pack_4bit_layout():
    q = torch.tensor([1, 2, 3, 4, 15], dtype=torch.uint8)
    assert cb.pack_4bit(q, cb.NF4).tolist() == [0x12, 0x34, 0xF7]
    assert cb.pack_4bit(q, cb.FP4).tolist() == [0x12, 0x34, 0xF0]
    assert torch.equal(cb.pack_4bit(q[:4]), pack_bits(q[:4], 4))
    assert torch.equal(cb.unpack_4bit(cb.pack_4bit(q, cb.NF4), 5), q)
    assert torch.equal(unpack_bits(cb.pack_4bit(q, cb.NF4), 4, 5), q)


# ---------------------------------------------------------------------------------------------
# 4-bit: quantize_4bit / dequantize_4bit


def _bnb_dequantize_4bit(F, packed, st, blocksize: int) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit, from the kernel that is defined the same on every processor.

    For blocksize >= 2048 bnb's native CPU kernel is inaccurate with AVX-512 code (bnb's own comment in
    ``backends/cpu/ops.py``); bnb falls back to its pure-PyTorch kernel only when torch reports AVX512, so
    which kernel runs depends on the CPU and on ATEN_CPU_CAPABILITY (with ``avx2`` forced on an AVX-512
    machine the inaccurate kernel runs). There, compare with that pure-PyTorch kernel (the one bnb itself
    uses on AVX-512), fed with the absmax bnb's dequantize_4bit reconstructs."""
    if blocksize < 2048:
        return F.dequantize_4bit(packed, st)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    code = _get_4bit_code(st.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax.float(), code, blocksize,
                                    st.shape, st.dtype)


def _check_4bit(F, x: torch.Tensor, quant_type: str, blocksize: int, compress: bool) -> None:
    code = cb.get_code(quant_type)
    packed_ref, st = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=compress, quant_type=quant_type)
    codes, absmax = cb.quantize_blockwise(x, code, blocksize)
    n = x.numel()
    assert codes.shape == (n,) and absmax.dtype == torch.float32
    assert torch.equal(cb.pack_4bit(codes, code), packed_ref.reshape(-1))
    if n % 2 == 0:  # the canonical packing is bnb's layout (bnb pads an odd count with code(0.0))
        assert torch.equal(pack_bits(codes, 4), packed_ref.reshape(-1))
    if compress:
        q, absmax2, offset = cb.double_quantize(absmax, blocksize=256)
        assert torch.equal(q, st.absmax)
        assert torch.equal(absmax2, st.state2.absmax)
        assert torch.equal(offset, st.offset) and offset.dim() == 0
        used = cb.double_dequantize(q, absmax2, offset, blocksize=256)
    else:
        assert torch.equal(absmax, st.absmax)
        used = absmax
    out = cb.dequantize_blockwise(codes, used, code, blocksize, x.dtype).reshape(x.shape)
    ref = _bnb_dequantize_4bit(F, packed_ref, st, blocksize)
    assert ref.dtype == out.dtype == x.dtype
    # bnb's native CPU kernel returns [1, n] for a 1-D shape; compare the values
    assert torch.equal(out.reshape(-1), ref.reshape(-1))


@pytest.mark.oracle
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1000,), (577, 33), (48, 256)])
def test_quantize_4bit_matches_bnb(F, quant_type, blocksize, dtype, shape):
    x = _sample(math.prod(shape), blocksize, dtype, seed=blocksize + len(shape)).reshape(shape)
    _check_4bit(F, x, quant_type, blocksize, compress=False)


@pytest.mark.oracle
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_4bit_double_quant_matches_bnb(F, quant_type, blocksize, dtype):
    # 300 x 577 = 173,100 values: 2,705 blocks of 64 -> 11 nested blocks of 256, ragged at both levels
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(300, 577, generator=g) * torch.rand(300, 1, generator=g)).to(dtype)
    x[3:5] = 0  # zero blocks: absmax 0 below the mean offset
    _check_4bit(F, x, quant_type, blocksize, compress=True)


@pytest.mark.oracle
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_all_zero_and_tiny_tensors(F, quant_type, compress):
    _check_4bit(F, torch.zeros(999), quant_type, 64, compress)  # ragged all-zero tail: absmax 1e-38
    _check_4bit(F, torch.zeros(128, dtype=torch.bfloat16), quant_type, 64, compress)
    _check_4bit(F, torch.full((130,), 1e-30), quant_type, 64, compress)


@pytest.mark.oracle
def test_fp4_wrong_sign_zero_and_nf4_ties(F):
    # FP4 on bnb's default path: (-1/384, 0] -> code 0, (0, 1/384] -> code 8 (sign reversed)
    tiny = torch.tensor([1 / 384, -1 / 384, 1 / 400, -1 / 400, 1e-6, -1e-6, 0.0, -0.0, 1 / 380, -1 / 380])
    x = torch.cat([torch.ones(1), tiny, torch.zeros(64 - 1 - tiny.numel())])
    codes, _ = cb.quantize_blockwise(x, cb.FP4, 64)
    assert codes[3:7].tolist() == [8, 0, 8, 0]
    _check_4bit(F, x, "fp4", 64, False)
    # NF4: a value exactly on a float32 midpoint goes to the lower code
    mids = (cb.NF4[:-1] + cb.NF4[1:]) / 2
    x = torch.cat([torch.ones(1), mids, -mids, torch.zeros(64 - 1 - 2 * mids.numel())])
    codes, _ = cb.quantize_blockwise(x, cb.NF4, 64)
    assert codes[1:16].tolist() == list(range(15))
    assert codes[8].item() == 7  # 0.03979015 -> code 7 (0.0), as the format doc states
    _check_4bit(F, x, "nf4", 64, False)


# ---------------------------------------------------------------------------------------------
# 8-bit dynamic map: quantize_blockwise / dequantize_blockwise (native CPU lookup table)


@pytest.mark.oracle
@pytest.mark.parametrize("blocksize", [4096, 256, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dynamic8_matches_bnb_quantize_blockwise(F, blocksize, dtype):
    x = _sample(20_011, blocksize, dtype, seed=blocksize).reshape(-1)
    code = cb.dynamic_map()
    q_ref, st = F.quantize_blockwise(x, blocksize=blocksize)
    q, absmax = cb.quantize_blockwise_lut(x, code, blocksize)
    assert torch.equal(q, q_ref.reshape(-1))
    assert torch.equal(absmax, st.absmax)
    out = cb.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    assert torch.equal(out, F.dequantize_blockwise(q_ref, st))


@pytest.mark.oracle
def test_bnb_cpu_uses_lookup_table_not_exact_nearest(F):
    """bnb 0.50.2 on CPU takes the native table path: the exact rule disagrees on ~0.15% of codes."""
    x = torch.randn(2**18, generator=torch.Generator().manual_seed(1))
    code = cb.dynamic_map()
    q_ref, st = F.quantize_blockwise(x, blocksize=256)
    q_lut, _ = cb.quantize_blockwise_lut(x, code, 256)
    q_exact, absmax = cb.quantize_blockwise(x, code, 256)
    assert torch.equal(q_lut, q_ref)
    assert torch.equal(absmax, st.absmax)
    frac = (q_exact != q_ref).float().mean().item()
    assert 0.0005 < frac < 0.005, frac
    # the table rounds the scaled value to a 2/65535 grid first: its error exceeds the exact one by
    # at most one grid step
    s = x / absmax.repeat_interleave(256)
    err_lut = (code[q_lut.long()] - s).abs()
    err_exact = (code[q_exact.long()] - s).abs()
    assert bool((err_exact <= err_lut).all())
    assert float((err_lut - err_exact).max()) <= 2 / 65535


def test_lut_edges_zero_block():
    # all-zero block -> code 0 everywhere (not the code of 0.0); its dequantized value is still 0
    x = torch.cat([torch.zeros(64), torch.randn(64)])
    q, absmax = cb.quantize_blockwise_lut(x, cb.dynamic_map(), 64)
    assert q[:64].eq(0).all() and absmax[0].item() == 0.0
    assert cb.dequantize_blockwise(q, absmax, cb.dynamic_map(), 64)[:64].eq(0).all()
    code = cb.dynamic_map()
    t = cb.lut_table(code)
    assert t.numel() == 65536 and t[0].item() == 0 and t[-1].item() == 255
    # entry k is the nearest code to v_k = -1 + 2k/65535 (float64 brute force)
    v = -1 + 2 * torch.arange(65536, dtype=torch.float64) / 65535
    nearest = (v[:, None] - code.double()[None, :]).abs().argmin(dim=1)
    assert torch.equal(t.long(), nearest)
    # no entry is exactly 0: an exact 0.0 lands on v_32768 = +1.5e-5, a small positive code
    q0, _ = cb.quantize_blockwise_lut(torch.tensor([1.0, 0.0]), code, 2)
    assert q0[1].item() == t[32768].item() > 127


@pytest.mark.oracle
def test_double_quantize_large(F):
    absmax = torch.rand(70_001, generator=torch.Generator().manual_seed(3)) * 0.2
    x = torch.randn(70_001 * 64, generator=torch.Generator().manual_seed(4)) * absmax.repeat_interleave(64)
    _, st = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, am = cb.quantize_blockwise(x, cb.NF4, 64)
    q, a2, off = cb.double_quantize(am)
    assert torch.equal(q, st.absmax) and torch.equal(a2, st.state2.absmax) and torch.equal(off, st.offset)
    ref = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    assert torch.equal(cb.double_dequantize(q, a2, off), ref)
    assert torch.equal(cb.double_dequantize(q, a2, float(off)), ref)


# ---------------------------------------------------------------------------------------------
# reference figures (float math, no oracle needed)


@pytest.mark.parametrize("name,expected", [("nf4", 0.0728), ("fp4", 0.0965)])
def test_reference_mae_4096x4096(name, expected):
    """Block-64 MAE on a 4096x4096 standard normal matches the published bnb figures within 2%."""
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    code = cb.get_code(name)
    q, absmax = cb.quantize_blockwise(x, code, 64)
    mae = (cb.dequantize_blockwise(q, absmax, code, 64) - x.reshape(-1)).abs().mean().item()
    assert abs(mae - expected) / expected < 0.02, mae


def test_nf8_and_dynamic8_error_levels():
    """8-bit codebooks are far finer than 4-bit: MAE on normal data an order of magnitude lower."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2))
    maes = {}
    for name in ("nf4", "nf8", "dynamic8"):
        code = cb.get_code(name)
        q, a = cb.quantize_blockwise(x, code, 64)
        maes[name] = (cb.dequantize_blockwise(q, a, code, 64) - x.reshape(-1)).abs().mean().item()
    assert maes["nf8"] < maes["nf4"] / 10
    assert maes["dynamic8"] < maes["nf4"] / 5
    assert maes["nf8"] < maes["dynamic8"]  # NF8 is built for normal data
