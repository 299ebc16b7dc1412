"""HQQ with its float zero kept (``zero_rounding="float"``): float32 zero points in a group state, HQQ's codes for
them, dequantization, modules, native files; the integer views (exports, fused kernels) refuse such states."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.grid import AffineGrid
from lowbit.algorithms.hqq import _grouped, hqq_optimize, hqq_quantize
from lowbit.tensor.integer import AffineWeight, UnsupportedWeight


def _weight(rows=24, cols=200, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02 + torch.randn(rows, cols, generator=g).pow(3) * 0.004


def test_float_zero_state_holds_hqqs_solution():
    w = _weight()  # ragged: 200 = 3 x 64 + 8
    wg, mask, g = _grouped(w, 64)
    s, z, _ = hqq_optimize(wg, mask, AffineGrid(4, False, "minmax"))
    st = hqq_quantize(w, 4, 64, False, zero_rounding="float")
    assert st.layout == "group" and st.zeros.dtype == torch.float32 and st.scales.dtype == torch.float32
    z16 = z.float()
    assert torch.equal(st.zeros.reshape(24, -1), z16)  # the solver's zero, as is
    assert torch.equal(st.scales.reshape(24, -1), (1.0 / s).float())
    # float64 reference: codes for the stored zero, then (q - z) * step
    zz, ss = z16.double(), s.double()
    ref = torch.cat([(torch.round(wg[:, j].double() * ss[:, j:j + 1] + zz[:, j:j + 1]).clamp(0, 15) - zz[:, j:j + 1])
                     / ss[:, j:j + 1] for j in range(wg.shape[1])], 1)[:, :200]
    mism = ((lowbit.dequantize(st).double() - ref).abs() > 1e-6).float().mean().item()
    assert mism <= 1e-3
    # the fractional zero is what lowers the error against the rounded one
    r = hqq_quantize(w, 4, 64, False, zero_rounding="round")
    assert (lowbit.dequantize(st) - w).square().sum() < (lowbit.dequantize(r) - w).square().sum()
    assert st.nbytes == 24 * 200 // 2 + 24 * 4 * 4 + 24 * 4 * 4  # 4-bit codes, fp32 steps, fp32 zeros


def test_float_zero_model_runs_saves_and_loads(tmp_path):
    from lowbit.model.loading import tiny_llama
    from lowbit.model.sequential import quantize_model_ptq

    model = tiny_llama(hidden=64, layers=2, intermediate=96)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    quantize_model_ptq(model, method="hqq", bits=4, group_size=32, sym=False, zero_rounding="float", progress=False)
    lin = model.model.layers[0].mlp.down_proj
    st = lin.qstate
    assert st.zeros.dtype == torch.float32 and not torch.equal(st.zeros, st.zeros.round())
    x = torch.randn(3, 96)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ lowbit.dequantize(st).T, rtol=1e-5, atol=1e-6)
        logits = model(input_ids=ids).logits
    lowbit.save(model, tmp_path / "m")
    back = lowbit.load(tmp_path / "m")
    st2 = back.model.layers[0].mlp.down_proj.qstate
    assert st2.zeros.dtype == torch.float32 and torch.equal(st2.zeros, st.zeros) and torch.equal(st2.data, st.data)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, logits)
    with pytest.raises(UnsupportedWeight, match="fractional"):
        AffineWeight.from_state(st)
    from lowbit.io.gptq import export_gptq

    with pytest.raises(Exception, match="fractional|zero"):
        export_gptq(model, tmp_path / "gptq")


def test_integer_valued_float_zeros_still_have_an_integer_view():
    st = hqq_quantize(_weight(), 4, 64, False, zero_rounding="round")  # uint8 zeros
    st2 = hqq_quantize(_weight(), 4, 64, False, zero_rounding="round")
    st2.zeros = st2.zeros.to(torch.float16)
    assert torch.equal(AffineWeight.from_state(st2).zeros, AffineWeight.from_state(st).zeros)
