"""lowbit.formats.llm_int8 against bitsandbytes 0.50.2 on CPU, and against float64 math.

Oracles: ``bitsandbytes.functional.int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` for the
quantization, and ``bitsandbytes.nn.Linear8bitLt`` in eval mode on CPU for the forward (bitsandbytes
supports it here: ``MatMul8bitLt`` with its default PyTorch kernels, int8 product in float32, which
is exact for these sizes). The outputs must be bit-identical. Independently of bitsandbytes, the
int32 accumulation is checked against int64 math and the forward against a float64 ``x @ W.T``.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.formats import llm_int8 as li


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def _activations(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal activations with two outlier feature columns (|x| ~ 10-20) and a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 15.0
    x[::2, k // 2] = 9.0
    if m > 1:
        x[1] = 0.0
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# quantization


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [0.0, 6.0, 3.0])
@pytest.mark.parametrize("shape", [(7, 64), (1, 64), (33, 577)])
def test_vectorwise_quant_matches_bnb(bnb, dtype, threshold, shape):
    x = _activations(shape[0], shape[1], dtype, seed=shape[0])
    if shape[0] == 1:
        x[0, 5] = -8.0  # single row: outlier columns are not zeroed, only the outliers
    x_ref = x.clone()  # bnb modifies its input while it works, then restores it
    CB_ref, s_ref, cols_ref = bnb.functional.int8_vectorwise_quant(x_ref, threshold=threshold)
    CB, s, cols = li.int8_vectorwise_quant(x, threshold=threshold)
    assert CB.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(CB, CB_ref) and torch.equal(s, s_ref)
    if threshold == 0.0:
        assert cols is None and cols_ref is None
    else:
        assert torch.equal(cols, cols_ref) and cols.dtype == torch.int64
        assert cols.numel() > 0
    assert torch.equal(x, x_ref)  # our input is untouched
    deq = li.int8_vectorwise_dequant(CB, s)
    assert torch.equal(deq, bnb.functional.int8_vectorwise_dequant(CB_ref, s_ref))


@pytest.mark.oracle
def test_no_outliers_gives_empty_columns(bnb):
    x = torch.randn(4, 16).half() * 0.1
    cols = li.int8_vectorwise_quant(x, threshold=6.0)[2]
    assert cols.numel() == 0 and cols.dtype == torch.int64
    assert torch.equal(cols, bnb.functional.int8_vectorwise_quant(x.clone(), threshold=6.0)[2])


def test_vectorwise_quant_rules_float64():
    """Independent check of the rules: round-half-even of x*127/absmax, outlier masking."""
    x = torch.tensor([[1.0, -2.0, 0.5, 20.0], [0.25, 4.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    CB, s, cols = li.int8_vectorwise_quant(x, threshold=6.0)
    assert cols.tolist() == [3]
    assert s.tolist() == [2.0, 4.0, 0.0]  # the outlier 20 does not inflate row 0's scale
    assert CB.tolist() == [[64, -127, 32, 0], [8, 127, -32, 0], [0, 0, 0, 0]]  # 31.75 -> 32, 7.9375 -> 8
    # ties: 0.5*127/1 = 63.5 -> 64 (even), 1.5*127/3 = 63.5 -> 64, -2.5*127/5 = -63.5 -> -64
    y = torch.tensor([[0.5, 1.0], [1.5, 3.0]], dtype=torch.float64).float()
    assert li.int8_vectorwise_quant(y)[0].tolist() == [[64, 127], [64, 127]]
    with pytest.raises(ValueError, match="threshold=-1"):
        li.int8_vectorwise_quant(x, threshold=-1)
    with pytest.raises(TypeError, match="int8"):
        li.int8_vectorwise_dequant(CB.int(), s)


# ---------------------------------------------------------------------------------------------
# matmul


def test_int32_accumulation_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 4096), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (6, 4096), generator=g, dtype=torch.int8)
    a[0] = 127
    b[0] = 127  # 4096 * 16129 = 66M > 2**24: a float32 accumulator would round this
    ref = torch.matmul(a.long(), b.long().t())
    acc = li.int8_matmul_int32(a, b)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), ref)
    assert acc[0, 0].item() == 4096 * 127 * 127


def _bnb_linear(bnb, w: torch.Tensor, bias, threshold: float):
    lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=bias is not None, has_fp16_weights=False,
                              threshold=threshold)
    sd = {"weight": w} if bias is None else {"weight": w, "bias": bias}
    lin.load_state_dict(sd, strict=True)
    lin = lin.to("cpu")  # Int8Params quantizes the weight here (from fp16)
    return lin.eval()


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mixed_matmul_matches_linear8bitlt(bnb, dtype, threshold, with_bias):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g) * 0.1
    w[5, 7] = 1.5  # a large weight: its row scale is coarse
    bias = torch.randn(48, generator=g) if with_bias else None
    lin = _bnb_linear(bnb, w, bias, threshold)
    CB, SCB, _ = li.int8_vectorwise_quant(w.half())
    assert torch.equal(CB, lin.weight.CB) and torch.equal(SCB, lin.weight.SCB)
    x = _activations(2 * 5, 96, dtype, seed=2).reshape(2, 5, 96)  # 3-D input, like a batch of sequences
    with torch.no_grad():
        y_ref = lin(x)
    b = None if bias is None else bias.to(dtype)  # Linear8bitLt casts its bias to x.dtype
    y = li.int8_mixed_matmul(x, CB, SCB, threshold=threshold, bias=b)
    assert y.shape == y_ref.shape == (2, 5, 48) and y.dtype == y_ref.dtype == dtype
    assert torch.equal(y, y_ref)


def test_mixed_matmul_accuracy_float64():
    """Against float64 x @ W.T: the outlier decomposition removes most of the int8 activation error."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g, dtype=torch.float64) * 0.05
    x = torch.randn(32, 256, generator=g, dtype=torch.float64)
    x[:, [10, 200]] *= 40.0  # systematic outlier features, as in large transformers
    ref = x @ w.t()
    CB, SCB, _ = li.int8_vectorwise_quant(w.float())
    w_deq = li.int8_vectorwise_dequant(CB, SCB).double()
    ref_wq = x @ w_deq.t()  # error floor set by the int8 weight alone
    y_plain = li.int8_mixed_matmul(x.float(), CB, SCB, threshold=0.0).double()
    y_mixed = li.int8_mixed_matmul(x.float(), CB, SCB, threshold=6.0).double()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(y_mixed, ref_wq) < rel(y_plain, ref_wq) / 5
    assert rel(y_mixed, ref) < 0.01 and rel(y_plain, ref) < 0.05
    # threshold 0: the exact integer product, rescaled with bnb's constant 6.200124e-05, which is
    # 1.8e-5 (relative) above 1/127**2
    CA, SCA, _ = li.int8_vectorwise_quant(x.float().half())
    exact = (CA.double() @ CB.double().t()) * SCA.double()[:, None] * SCB.double()[None, :] / 127**2
    assert torch.allclose(y_plain, exact * (li.INV_127_SQ * 127**2), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y_plain, exact, rtol=1e-6, atol=1e-6)
    assert abs(li.INV_127_SQ * 127**2 - 1 - 1.8e-5) < 1e-7


def test_mixed_matmul_errors():
    CB = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="last dim 7"):
        li.int8_mixed_matmul(torch.randn(2, 7), CB, torch.ones(4))
    with pytest.raises(ValueError, match="SCB_w has 3 entries"):
        li.int8_mixed_matmul(torch.randn(2, 8), CB, torch.ones(3))
    with pytest.raises(ValueError, match="2-D int8"):
        li.int8_mixed_matmul(torch.randn(2, 8), CB.float(), torch.ones(4))
