"""Fuzzed tensors through lowbit.quantize/dequantize (issue 17): zero defects, and one regression test per
defect cause the fuzzing found. The harness and the derivation of every error bound: tests/fuzz_tensors.py.

Fast part (CI): 200 seeded inputs per scheme (3,800 in all, ~10 s). Long part (``--long``): 10,000 per scheme.
"""
import math

import pytest
import torch

import fuzz_tensors as F
import lowbit
from lowbit.formats import codebook

FAST_N = 200
LONG_N = 10_000


def _assert_no_defects(summary):
    assert summary.classes.get("clean", 0) > summary.n // 3, dict(summary.classes)  # the harness does test results
    assert not summary.causes, "\n".join(f"{c} x{n}: {summary.examples[c]}" for c, n in summary.causes.items())


@pytest.mark.parametrize("scheme", F.SCHEMES)
def test_fuzz_fast(scheme):
    with torch.no_grad():
        _assert_no_defects(F.fuzz_scheme(scheme, FAST_N))


@pytest.mark.long
@pytest.mark.parametrize("scheme", F.SCHEMES)
def test_fuzz_long(scheme):
    with torch.no_grad():
        _assert_no_defects(F.fuzz_scheme(scheme, LONG_N))


# ---- the harness can fail --------------------------------------------------------------------


def _first_cases(scheme, n=60):
    return [F.gen_case(scheme, i) for i in range(n)]


@pytest.mark.parametrize("scheme", ["int4", "nf4", "fp8_e4m3", "q4_0", "q4_1", "int4_asym"])
def test_harness_catches_an_out_of_bound_result(scheme, monkeypatch):
    real = lowbit.dequantize

    def off_by_a_bit(state):  # 3% too large: far outside every derived bound of a 4-/8-bit grid
        y = real(state)
        return (y.float() * 1.03 + 0.0).to(y.dtype) if y.numel() else y

    monkeypatch.setattr(F.lowbit, "dequantize", off_by_a_bit)
    outcomes = [F.run_case(c, check_roundtrip=False) for c in _first_cases(scheme)]
    assert any(o.cls == "defect" and "out of bound" in o.cause for o in outcomes), [o.cause for o in outcomes]


def test_harness_catches_unclear_errors_nan_and_sign_flips(monkeypatch):
    cases = _first_cases("int8", 40)
    real = lowbit.dequantize
    monkeypatch.setattr(F.lowbit, "dequantize", lambda s: (_ for _ in ()).throw(IndexError("tuple index out of range")))
    assert any(o.cause.startswith("unclear error (IndexError)") for o in map(F.run_case, cases))
    monkeypatch.setattr(F.lowbit, "dequantize", lambda s: real(s) * float("nan"))
    assert any(o.cls == "defect" and "non-finite" in o.cause for o in map(F.run_case, cases))
    monkeypatch.setattr(F.lowbit, "dequantize", lambda s: -real(s))
    assert any(o.cls == "defect" and "sign flip" in o.cause for o in map(F.run_case, cases))


def test_harness_bound_is_tight_for_int8():
    # the derived bound is half a step (plus rounding slack), not a blanket tolerance
    x = torch.tensor([[1.0, 0.5 + 0.5 / 127, -0.3]])
    case = F.Case("t", "int8", (1, 3), torch.float32, "normal", 1.0, None, {"block_size": None})
    b = F.element_bound(x, case)
    assert torch.all(b < 0.5 / 127 * 1.001)


# ---- one regression test per defect cause ----------------------------------------------------


@pytest.mark.parametrize("qtype,limit", [("q4_0", 524_032), ("q5_0", 1_048_064), ("q8_0", 8_319_008),
                                         ("q4_1", 65_504), ("q5_1", 65_504)])
def test_gguf_fp16_block_scale_overflow_is_a_clear_error(qtype, limit):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    sign = -1 if qtype.endswith("_1") else 1  # Q4_1/Q5_1 store the block minimum as fp16 m
    x[1, 40] = sign * limit * 1.01
    with pytest.raises(ValueError, match=rf"{qtype.upper()} cannot represent.*row 1, block 1.*{limit:,}"):
        lowbit.quantize(x, qtype)
    x[1, 40] = sign * limit * 0.99  # just inside: finite and within the derived bound
    y = lowbit.dequantize(lowbit.quantize(x, qtype))
    assert torch.isfinite(y).all()
    case = F.Case("t", qtype, tuple(x.shape), x.dtype, "normal", 1.0, None, {})
    assert ((y.double() - x.double()).abs() <= F.element_bound(x, case)).all()


def test_float64_beyond_float32_is_a_clear_error():
    x = torch.tensor([1.0, 1e39, -2.0], dtype=torch.float64)
    for scheme in ("int8", "nf4", "q8_0", "fp8_e4m3"):
        with pytest.raises(ValueError, match="beyond the float32 range"):
            lowbit.quantize(x, scheme)
    ok = torch.tensor([1.0, 3e38, -2.0], dtype=torch.float64)
    assert torch.isfinite(lowbit.dequantize(lowbit.quantize(ok, "int8"))).all()


@pytest.mark.parametrize("scheme", ["int8_asym", "int4_asym", "q8_0", "int8", "nf4", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output_is_saturated(scheme, dtype):
    fmax = torch.finfo(dtype).max
    top = 65504.0 if scheme == "q8_0" else fmax  # Q8_0's fp16 d holds |x| <= 8.3e6 only (a clear error above)
    x = torch.tensor([[top, -top, top * 0.7, 1.0] * 8], dtype=dtype)
    y = lowbit.dequantize(lowbit.quantize(x, scheme))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert y.float().abs().max() <= fmax


@pytest.mark.parametrize("scheme", ["int8", "int4_asym", "nf4", "fp8_e4m3"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_scale_dtype_overflow_and_underflow_are_clear_errors(scheme, scale_dtype):
    if scale_dtype == torch.float16:  # bfloat16 has float32's range: only underflow applies
        big = torch.full((4, 64), 1e9)
        with pytest.raises(ValueError, match=r"scale_dtype=torch\.float16 cannot hold.*exceed"):
            lowbit.quantize(big, scheme, scale_dtype=scale_dtype)
    small = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 1e-41
    if scale_dtype == torch.float16:
        small = small * 1e30  # ~1e-11: a float16 scale flushes to 0 (it used to give all zeros, or NaN for fp8)
    with pytest.raises(ValueError, match="round to 0"):
        lowbit.quantize(small, scheme, scale_dtype=scale_dtype)


def test_fp8_scale_underflow_in_float16_no_longer_gives_nan():
    x = torch.full((32,), 1e-9)
    with pytest.raises(ValueError, match="round to 0"):
        lowbit.quantize(x, "fp8_e4m3", scale_dtype=torch.float16)
    y = lowbit.dequantize(lowbit.quantize(x, "fp8_e4m3", scale_dtype=torch.float32))
    assert torch.isfinite(y).all() and torch.allclose(y, x, rtol=0.07)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_asymmetric_range_beyond_float32(bits):
    x = torch.tensor([[-3e38, 3e38, 1.0, -1.0] * 16])
    s = lowbit.quantize(x, f"int{bits}_asym", group_size=64)
    assert torch.isfinite(s.scales).all()
    y = lowbit.dequantize(s)
    assert torch.isfinite(y).all()
    case = F.Case("t", f"int{bits}_asym", tuple(x.shape), x.dtype, "huge", 1.0, None, {"group_size": 64})
    assert ((y.double() - x.double()).abs() <= F.element_bound(x, case)).all()


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8", "fp8_e4m3"])
def test_double_quant_offset_overflow(scheme):
    x = torch.full((8, 64), 3.3e38)
    x[::2] *= -1
    y = lowbit.dequantize(lowbit.quantize(x, scheme, block_size=64, double_quant=True))
    assert torch.isfinite(y).all()
    assert (torch.sign(y) == torch.sign(x)).all()


def test_zero_dim_with_axis_is_a_value_error():
    for scheme in ("int8", "nf4", "fp8_e4m3"):
        with pytest.raises(ValueError, match="0-d tensor has no axis"):
            lowbit.quantize(torch.tensor(1.5), scheme, axis=0)
    y = lowbit.dequantize(lowbit.quantize(torch.tensor(1.5), "int8", block_size=None))
    assert y.shape == () and abs(float(y) - 1.5) < 1e-6


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "nf8", "int4", "int8_asym", "fp8_e4m3"])
def test_double_quant_never_flips_signs(scheme):
    g = torch.Generator().manual_seed(3)
    # per-element scales (axis over a 1-D tensor) spanning five decades: small ones sit below the nested
    # reconstruction error, and reconstructed scales may not go negative
    x = torch.randn(257, generator=g) * 10 ** (torch.rand(257, generator=g) * 5 - 3)
    y = lowbit.dequantize(lowbit.quantize(x, scheme, axis=-1, double_quant=True, double_quant_block_size=64))
    assert not (x * y < 0).any()
    # subnormal first-level scales: bitsandbytes' lookup-table kernel overflows 1/absmax2 there
    xs = torch.randn(64, 64, generator=g) * 1e-39
    ys = lowbit.dequantize(lowbit.quantize(xs, scheme, block_size=64, double_quant=True))
    assert torch.isfinite(ys).all() and not (xs * ys < 0).any()


def test_lut_quantizer_handles_subnormal_absmax():
    x = torch.tensor([1e-40, -5e-41, 2.5e-41, 0.0])
    q, absmax = codebook.quantize_blockwise_lut(x, codebook.dynamic_map(), 4)
    deq = codebook.dequantize_blockwise(q, absmax, codebook.dynamic_map(), 4)
    assert (deq * x >= 0).all() and torch.equal(torch.sign(deq[:3]), torch.sign(x[:3]))
    assert ((deq - x).abs() <= 0.01 * 1e-40).all()


def test_in_range_results_unchanged_by_the_fixes():
    # the fixes only act outside the finite/representable range: bytes of ordinary inputs stay put
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    s = lowbit.quantize(x, "nf4", block_size=64, double_quant=True)
    q, a2, off = codebook.double_quantize(codebook.quantize_blockwise(x, codebook.NF4, 64)[1])
    assert torch.equal(s.nested.data, q) and torch.equal(s.nested.scales, a2) and s.offset == float(off)
    assert math.isfinite(s.offset)


@pytest.mark.parametrize("scheme", ["fp8_e5m2", "fp8_e4m3", "int8", "int4_asym"])
def test_double_quant_all_zero_blocks_do_not_cost_the_others_their_precision(scheme):
    # pruned (all-zero) rows hold a placeholder scale of 1; in the nested quantization it used to widen the
    # range so much that small rows came back hundreds of times too large (fp8: x = 5e-39 -> 8.5)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=g) * 1e-3
    x[::2] = 0
    y = lowbit.dequantize(lowbit.quantize(x, scheme, axis=0, double_quant=True, double_quant_block_size=64))
    assert (y[::2] == 0).all()
    assert ((y - x).abs().amax(1) <= 0.1 * x.abs().amax(1)).all()
    xs = torch.tensor([0.0, 5e-39, -1e-45, 3e-44] * 8)  # subnormal blocks whose fp8 scale underflows
    ys = lowbit.dequantize(lowbit.quantize(xs, scheme, block_size=1, double_quant=True))
    assert ((ys - xs).abs() <= 1e-37).all()
