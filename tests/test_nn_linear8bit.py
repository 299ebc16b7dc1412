"""Linear8bitLt: LLM.int8() numerics (bitsandbytes-identical on CPU), outliers, state_dict, gradients."""
import pytest
import torch
from torch import nn

from lowbit.formats.llm_int8 import int8_mixed_matmul, int8_vectorwise_dequant, int8_vectorwise_quant
from lowbit.nn import Linear8bitLt


def _lin(in_f=64, out_f=32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def _x(rows=5, in_f=64, seed=1, outlier_col=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g)
    if outlier_col is not None:
        x[:, outlier_col] *= 20  # above the 6.0 threshold
    return x


def test_frozen_equals_fake_quant_and_reference_matmul():
    lin = _lin()
    m = Linear8bitLt.from_module(lin, threshold=6.0)
    x = _x()
    y0 = m(x)
    m.freeze()
    assert m.weight.dtype == torch.int8 and m.SCB.shape == (32,)
    assert torch.equal(m(x), y0)
    CB, SCB, _ = int8_vectorwise_quant(lin.weight.detach().half())
    assert torch.equal(m.weight, CB) and torch.equal(m.SCB, SCB)
    assert torch.equal(y0, int8_mixed_matmul(x, CB, SCB, 6.0, lin.bias.detach()))


@pytest.mark.oracle
def test_matches_bitsandbytes_linear8bitlt():
    bnb = pytest.importorskip("bitsandbytes")
    lin = _lin().half()
    ref = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu").eval()
    m = Linear8bitLt.from_module(lin, threshold=6.0)
    m.freeze()
    x = _x().half()
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
    sd = ref.state_dict()
    assert torch.equal(m.state_dict()["weight"], sd["weight"]) and torch.equal(m.state_dict()["SCB"], sd["SCB"])


def test_outlier_columns_are_computed_in_float():
    lin = _lin()
    x = _x(outlier_col=7)
    x[:, 7] *= 10  # a very large column: int8 on the activation would crush everything else
    exact = lin(x)
    with_outliers = Linear8bitLt.from_module(lin, threshold=6.0)
    without = Linear8bitLt.from_module(lin, threshold=0.0)
    e1 = (with_outliers(x) - exact).abs().max()
    e0 = (without(x) - exact).abs().max()
    assert e1 < 0.25 * e0


def test_state_dict_and_requantize_style_loading():
    m = Linear8bitLt.from_module(_lin())
    m.freeze()
    sd = m.state_dict()
    assert set(sd) == {"weight", "SCB", "bias"}
    fresh = Linear8bitLt(64, 32)  # float module: switches to the int8 layout while loading
    fresh.load_state_dict(sd)
    x = _x()
    assert fresh.frozen and torch.equal(fresh(x), m(x))
    with torch.device("meta"):
        empty = Linear8bitLt(64, 32)
    empty.load_state_dict(sd, assign=True)
    assert torch.equal(empty(x), m(x))
    assert m.qstate.nbytes == 64 * 32 + 4 * 32
    torch.testing.assert_close(m.qstate.scales * 127, m.SCB)


def test_gradients_to_input_and_straight_through_weight():
    lin = _lin()
    m = Linear8bitLt.from_module(lin, threshold=6.0)
    x = _x().requires_grad_()
    g = torch.randn(5, 32)
    m(x).backward(g)
    CB, SCB, _ = int8_vectorwise_quant(lin.weight.detach().half())
    torch.testing.assert_close(x.grad, g @ int8_vectorwise_dequant(CB, SCB))
    torch.testing.assert_close(lin.weight.grad, g.t() @ x.detach())
    torch.testing.assert_close(lin.bias.grad, g.sum(0))
    m.freeze()
    x2 = x.detach().clone().requires_grad_()
    m(x2).backward(g)
    torch.testing.assert_close(x2.grad, x.grad)


@pytest.mark.cuda
def test_cuda_int_mm_path_matches_cpu():
    lin = _lin(64, 32).half()
    m = Linear8bitLt.from_module(lin, threshold=6.0)
    m.freeze()
    x = _x(rows=40).half()
    y_cpu = m(x)
    m.cuda()
    y = m(x.cuda())
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-3, atol=1e-3)
    y1 = m(x[:1].cuda())  # fewer than 17 rows: padded for torch._int_mm
    torch.testing.assert_close(y1.cpu(), y_cpu[:1], rtol=1e-3, atol=1e-3)
