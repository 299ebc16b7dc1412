"""One integer-weight type beside QuantState (issue 16): exact conversions between AffineWeight, QuantState, the
PTQ grids' (codes, scales, zeros) output, GPTQResult and GGUF Q4_0/Q8_0 blocks."""
import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.grid import make_grid, quantize_groups, to_state
from lowbit.tensor.integer import AffineWeight, UnsupportedWeight


def _w(R=16, K=200, seed=0):
    return torch.randn(R, K, generator=torch.Generator().manual_seed(seed))


def _same_state(a, b):
    assert (a.scheme, a.layout, a.block_size, a.axis, tuple(a.shape), a.dtype) == \
        (b.scheme, b.layout, b.block_size, b.axis, tuple(b.shape), b.dtype)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_reexported_where_it_was():
    import lowbit.io._affine as old

    assert old.AffineWeight is AffineWeight and old.UnsupportedWeight is UnsupportedWeight


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [64, 128, -1])
def test_grid_output_round_trips_exactly(sym, gs):
    w = _w()
    codes, scales, zeros = quantize_groups(w, make_grid(4, sym, "mse"), gs)
    aw = AffineWeight.from_grid(codes, scales, zeros, 4, gs, sym)
    st = to_state(codes, scales, zeros, 4, gs, sym)
    _same_state(aw.to_state(symmetric=sym), st)
    # QuantState -> AffineWeight -> QuantState is the identity, and both dequantize to the same bits
    back = AffineWeight.from_state(st)
    assert torch.equal(back.codes, aw.codes) and torch.equal(back.scales, aw.scales)
    assert (back.zeros is None) == (aw.zeros is None) and (back.zeros is None or torch.equal(back.zeros, aw.zeros))
    _same_state(back.to_state(symmetric=sym), st)
    assert torch.equal(back.dequantize(), lowbit.dequantize(st))


def test_gptq_result_weight_is_its_state():
    w = _w(8, 96)
    X = torch.randn(128, 96, generator=torch.Generator().manual_seed(2))
    res = gptq_quantize(w, X.t() @ X / 128, 4, 32, False)
    _same_state(res.weight.to_state(symmetric=False), res.state)
    q = gptq_quantize(w, X.t() @ X / 128, gguf_type="Q4_0")
    assert q.state.layout == "gguf"
    assert torch.equal(q.weight.dequantize(), lowbit.dequantize(q.state).float())
    with pytest.raises(UnsupportedWeight, match="Q4_1"):
        _ = gptq_quantize(w, X.t() @ X / 128, gguf_type="Q4_1").weight


@pytest.mark.parametrize("scheme,kw", [("int4", {"group_size": 50}), ("int8_asym", {"group_size": -1}),
                                       ("int4", {"axis": 0}), ("int2_asym", {"block_size": 100}),
                                       ("int4", {"block_size": None}), ("q4_0", {}), ("q8_0", {})])
def test_quant_state_layouts_convert_exactly(scheme, kw):
    w = _w(6, 200)
    st = lowbit.quantize(w, scheme, **kw)
    aw = AffineWeight.from_state(st)
    assert torch.equal(aw.dequantize(), lowbit.dequantize(st).float())
    assert torch.equal(lowbit.dequantize(aw.to_state()).float(), lowbit.dequantize(st).float())


def test_unsupported_layouts_say_why():
    with pytest.raises(UnsupportedWeight, match="not an integer affine"):
        AffineWeight.from_state(lowbit.quantize(_w(), "nf4"))
    with pytest.raises(UnsupportedWeight, match="do not align"):
        AffineWeight.from_state(lowbit.quantize(_w(6, 200), "int4", block_size=64))
