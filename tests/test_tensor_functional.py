"""Tensor primitives: affine / fp8 schemes against float64 references, granularity, state, bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lowbit
from lowbit.tensor.functional import affine_state, codes, schemes
from lowbit.tensor.state import QuantState

ALL = ["int8", "int4", "int3", "int2", "int8_asym", "int4_asym", "int3_asym", "int2_asym", "nf4", "fp4", "nf8",
       "dynamic8", "fp8_e4m3", "fp8_e5m2"]
GGUF = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def ref_affine_groups(x, bits, sym, g):
    """float64 reference of the documented affine rule on [R, K] groups of g (ragged last group)."""
    x = x.double()
    r, k = x.shape
    out = torch.empty_like(x)
    for gi in range(math.ceil(k / g)):
        blk = x[:, gi * g:(gi + 1) * g]
        if sym:
            qmax = 2 ** (bits - 1) - 1
            s = blk.abs().amax(1, keepdim=True).float().double() / qmax
            s = torch.where(s > 0, s, torch.ones_like(s)).float().double()
            q = torch.clamp(torch.round(blk / s) + 2 ** (bits - 1), 0, 2 ** bits - 1)
            out[:, gi * g:(gi + 1) * g] = (q - 2 ** (bits - 1)) * s
        else:
            lo = blk.amin(1, keepdim=True).clamp(max=0)
            hi = blk.amax(1, keepdim=True).clamp(min=0)
            s = ((hi - lo).float() / (2 ** bits - 1)).double()
            s = torch.where(s > 0, s, torch.ones_like(s))
            z = torch.clamp(torch.round(-lo / s), 0, 2 ** bits - 1)
            q = torch.clamp(torch.round(blk / s) + z, 0, 2 ** bits - 1)
            out[:, gi * g:(gi + 1) * g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g", [32, 128, 100])
def test_affine_group_matches_float64_reference(bits, sym, g):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(bits * 7 + g))
    st_ = lowbit.quantize(x, f"int{bits}" if sym else f"int{bits}_asym", group_size=g)
    y = lowbit.dequantize(st_)
    ref = ref_affine_groups(x, bits, sym, g)
    # float32 arithmetic versus float64: codes identical except at exact .5 ties (none in random data)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,kw", [((64, 96), {}), ((3, 5, 77), {}), ((1000,), {"block_size": 128}),
                                       ((40, 576), {"group_size": 128}), ((16, 33), {"axis": 0}),
                                       ((16, 33), {"axis": 1}), ((8, 8), {"block_size": None})])
def test_shape_dtype_roundtrip_and_error_bound(scheme, dtype, shape, kw):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    s = lowbit.quantize(x, scheme, **kw)
    y = lowbit.dequantize(s)
    assert y.shape == x.shape and y.dtype == dtype
    rel = ((y.float() - x.float()).norm() / x.float().norm()).item()
    bound = {8: 0.08, 4: 0.2, 3: 0.35, 2: 0.9}[s.bits]
    assert rel < bound, (scheme, rel)
    assert s.nbytes == sum(t.numel() * t.element_size() for t in (s.data, s.scales, s.zeros) if t is not None)


@pytest.mark.parametrize("scheme", GGUF)
@pytest.mark.parametrize("shape", [(4, 64), (3, 50), (2, 3, 96)])
def test_gguf_schemes(scheme, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    s = lowbit.quantize(x, scheme)
    y = lowbit.dequantize(s)
    assert y.shape == x.shape
    assert ((y - x).norm() / x.norm()).item() < (0.03 if scheme == "q8_0" else 0.2)
    with pytest.raises(ValueError, match="fixed blocks of 32"):
        lowbit.quantize(x, scheme, block_size=64)


def test_reference_figures_4096():
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    for scheme, mae, bpe in (("nf4", 0.0728, 0.5625), ("fp4", 0.0965, 0.5625), ("int8", 0.005, 1.0625)):
        s = lowbit.quantize(x, scheme, block_size=64)
        got = (lowbit.dequantize(s) - x).abs().mean().item()
        assert got == pytest.approx(mae, rel=0.03), scheme
        assert s.nbytes / x.numel() == bpe


def test_per_channel_scale_shapes_and_values():
    x = torch.randn(5, 7)
    s = lowbit.quantize(x, "int8", axis=1)
    assert s.scales.shape == (7,)
    torch.testing.assert_close(s.scales, x.abs().amax(0) / 127)
    s0 = lowbit.quantize(x, "int8", axis=0)
    torch.testing.assert_close(s0.scales, x.abs().amax(1) / 127)
    st = lowbit.quantize(x, "int8", block_size=None)
    assert st.scales.numel() == 1


def test_group_size_minus_one_is_per_row():
    x = torch.randn(5, 7)
    a = lowbit.dequantize(lowbit.quantize(x, "int4", group_size=-1))
    b = lowbit.dequantize(lowbit.quantize(x, "int4", axis=0))
    assert torch.equal(a, b)


def test_double_quant_bits_and_accuracy():
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    a = lowbit.quantize(x, "nf4", 64)
    b = lowbit.quantize(x, "nf4", 64, double_quant=True)
    assert b.scales is None and b.nested is not None and b.nested.data.dtype == torch.uint8
    assert b.bits_per_element < a.bits_per_element
    assert b.bits_per_element == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / x.numel(), abs=1e-9)
    ya, yb = lowbit.dequantize(a), lowbit.dequantize(b)
    assert (yb - x).abs().mean() < 1.02 * (ya - x).abs().mean()


def test_state_dict_roundtrip_and_repr(tmp_path):
    from safetensors.torch import load_file, save_file

    x = torch.randn(33, 65)
    for kw in ({"scheme": "nf4", "double_quant": True}, {"scheme": "int4_asym", "group_size": 32},
               {"scheme": "q4_1"}, {"scheme": "fp8"}, {"scheme": "int3", "axis": 1}):
        s = lowbit.quantize(x, **kw)
        sd = s.state_dict("w.")
        save_file(sd, tmp_path / "s.safetensors")
        s2 = QuantState.from_state_dict(load_file(tmp_path / "s.safetensors"), "w.")
        assert torch.equal(lowbit.dequantize(s2), lowbit.dequantize(s))
        assert s2.nbytes == s.nbytes
        assert kw["scheme"].split("_")[0] in repr(s)


def test_state_validation_names_problem():
    s = lowbit.quantize(torch.randn(8, 64), "int4", group_size=32)
    sd = s.state_dict()
    sd["data"] = sd["data"][:-1]
    with pytest.raises(ValueError, match="data has"):
        QuantState.from_state_dict(sd)
    sd = s.state_dict()
    sd["meta"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="corrupt"):
        QuantState.from_state_dict(sd)


def test_to_device_keeps_dtypes():
    s = lowbit.quantize(torch.randn(8, 64), "nf4", double_quant=True).to("cpu")
    assert s.data.dtype == torch.uint8 and s.nested.scales.dtype == torch.float32


def test_aliases():
    x = torch.randn(4, 64)
    assert torch.equal(lowbit.dequantize(lowbit.quantize(x, "int8_linear")), lowbit.dequantize(lowbit.quantize(x, "int8")))
    assert lowbit.quantize(x, "int4_linear").scheme == "int4"
    assert lowbit.quantize(x, "fp8").scheme == "fp8_e4m3"
    assert "nf4" in schemes()


# ---- bad input ---------------------------------------------------------------------------------

def test_unknown_scheme_lists_valid():
    with pytest.raises(ValueError, match="unknown scheme 'int5'.*nf4"):
        lowbit.quantize(torch.randn(4), "int5")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(bad):
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        lowbit.quantize(x, "nf4")


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating tensor"):
        lowbit.quantize(torch.arange(10), "int8")


@pytest.mark.parametrize("kw", [{"block_size": 0}, {"block_size": -3}, {"group_size": 0}, {"axis": 5}])
def test_bad_granularity(kw):
    with pytest.raises(ValueError):
        lowbit.quantize(torch.randn(4, 4), "int8", **kw)


@pytest.mark.parametrize("scheme", ALL + GGUF)
def test_zero_size_and_all_zero(scheme):
    e = lowbit.quantize(torch.empty(0, 64), scheme)
    assert lowbit.dequantize(e).shape == (0, 64)
    z = torch.zeros(4, 64)
    s = lowbit.quantize(z, scheme)
    y = lowbit.dequantize(s)
    assert torch.equal(y, z)


@pytest.mark.parametrize("scheme", ["int4", "int4_asym", "nf4", "fp8"])
def test_constant_block_is_finite(scheme):
    x = torch.full((2, 64), 3.25)
    y = lowbit.dequantize(lowbit.quantize(x, scheme, block_size=64))
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() <= 3.25 / 6


# ---- properties --------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), g=st.integers(1, 70), k=st.integers(1, 150),
       seed=st.integers(0, 1000))
def test_affine_error_within_half_step(bits, sym, g, k, seed):
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed)) * 3
    s = lowbit.quantize(x, f"int{bits}" if sym else f"int{bits}_asym", group_size=g)
    y = lowbit.dequantize(s)
    step = s.scales.repeat_interleave(g, dim=1)[:, :k]
    assert ((y - x).abs() <= step / 2 + 1e-5).all()


def test_affine_state_constructor():
    w = torch.randn(16, 100)
    ref = lowbit.quantize(w, "int4_asym", group_size=32)
    q = codes(ref)
    s = affine_state(q, ref.scales, ref.zeros, 4, 32)
    assert torch.equal(lowbit.dequantize(s), lowbit.dequantize(ref))
    with pytest.raises(ValueError, match="scales shape"):
        affine_state(q, ref.scales[:, :2], ref.zeros, 4, 32)


@pytest.mark.oracle
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_functional_api_is_byte_identical_to_bitsandbytes(quant_type, double_quant):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(577, 33, generator=torch.Generator().manual_seed(5)).half()  # odd count, ragged tail
    s = lowbit.quantize(x, quant_type, block_size=64, double_quant=double_quant)
    q, ref = bnbF.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(s.data, q.reshape(-1))
    if double_quant:
        assert torch.equal(s.nested.data, ref.absmax) and torch.equal(s.nested.scales, ref.state2.absmax)
        assert s.offset == float(ref.offset)
    else:
        assert torch.equal(s.scales, ref.absmax)
    assert torch.equal(lowbit.dequantize(s), bnbF.dequantize_4bit(q, ref))


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", GGUF)
def test_functional_api_is_byte_identical_to_gguf(qtype):
    gguf = pytest.importorskip("gguf")
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    s = lowbit.quantize(x, qtype)
    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    raw = gguf.quants.quantize(x.numpy(), t)
    assert s.data.numpy().tobytes() == raw.tobytes()
    assert torch.equal(lowbit.dequantize(s), torch.from_numpy(gguf.quants.dequantize(raw, t)))
