"""lowbit.kernels.linear (the path every frozen module's forward takes) on the CPU.

* the dequantize-once cache is bit-identical to the reference, bounded by its budget, invalidated by
  in-place edits and moves, and never reaches a saved file;
* int8 x int8 with dynamic per-token activations (FBGEMM at small M, ``torch._int_mm`` above) equals the
  module's fake-quantized reference up to float32 rounding, including codes of +-127 everywhere (no 16-bit
  saturation) -- skipped where the CPU lacks VNNI (the path is not used there);
* the CUDA layouts (``PreparedLinear``) dequantize to ``lowbit.dequantize`` for every format, and the
  ``lowbit::gemv_lowbit`` op's CPU implementation equals ``F.linear`` on that weight.
"""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.kernels import linear as L
from lowbit.nn import Linear4bit, QLinear
from lowbit.tensor.functional import quantize_tensor


def _lin(n=48, k=128, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("weights", ["qint2", "qint4", "qint8", "qfloat8", "nf4"])
def test_dense_cache_bit_identical_and_not_saved(weights, monkeypatch):
    q = QLinear.from_module(_lin(), weights=weights)
    x = torch.randn(5, 128)
    before = q(x)
    q.freeze()
    buf0 = io.BytesIO()
    torch.save(q.state_dict(), buf0)
    with torch.no_grad():
        y1 = q(x)
        y2 = q(x)  # from the cache
    assert torch.equal(y1, before) and torch.equal(y2, before)
    assert L._cached(q.qstate, ("dense", torch.float32)) is not None
    buf1 = io.BytesIO()
    torch.save(q.state_dict(), buf1)
    keys = set(q.state_dict())
    assert {"weight.data", "weight.scales", "weight.meta", "bias"} <= keys
    assert keys <= {"weight.data", "weight.scales", "weight.zeros", "weight.code", "weight.meta", "bias"}
    assert buf0.getvalue() == buf1.getvalue()


def test_dense_cache_budget_and_invalidation(monkeypatch):
    lin = _lin()
    st = quantize_tensor(lin.weight.detach(), "int4_asym", group_size=32)
    q = QLinear.from_quant_state(lin, st)
    x = torch.randn(3, 128)
    monkeypatch.setenv("LOWBIT_DEQUANT_CACHE_MB", "0")
    with torch.no_grad():
        y = q(x)
    assert L._cached(st, ("dense", torch.float32)) is None  # budget 0: nothing kept
    assert torch.equal(y, F.linear(x, lowbit.dequantize(st), lin.bias))
    monkeypatch.delenv("LOWBIT_DEQUANT_CACHE_MB")
    with torch.no_grad():
        q(x)
        assert L._cached(st, ("dense", torch.float32)) is not None
        st.scales.mul_(2)  # an in-place edit (as AWQ's scale folding does) invalidates the cached weight
        y2 = q(x)
    assert torch.equal(y2, F.linear(x, lowbit.dequantize(st), lin.bias))
    monkeypatch.setenv("LOWBIT_DEQUANT_CACHE_MB", "x")
    with pytest.raises(ValueError, match="LOWBIT_DEQUANT_CACHE_MB"):
        L.cache_budget()


def test_kernel_path_keeps_autograd():
    m = Linear4bit.from_module(_lin(), quant_type="nf4")
    m.freeze()
    x = torch.randn(4, 128, requires_grad=True)
    y = m(x)
    y.sum().backward()
    w = lowbit.dequantize(m.qstate)
    torch.testing.assert_close(x.grad, torch.ones(4, 48) @ w)


needs_vnni = pytest.mark.skipif(not L.cpu_has_vnni(), reason="int8 CPU path needs VNNI (not used without it)")


@needs_vnni
@pytest.mark.parametrize("M", [1, 3, 40])
def test_int8_dynamic_cpu_matches_fake_quant(M):
    q = QLinear.from_module(_lin(96, 256), weights="qint8", activations="qint8", act_dynamic=True)
    torch.manual_seed(M)
    x = torch.randn(M, 256)
    x[0] *= 30
    ref = q(x)  # unfrozen: fake quantization + F.linear
    q.freeze()
    with torch.no_grad():
        got = q(x)
    assert L._cached(q.qstate, "cpu_int8") is not None
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@needs_vnni
@pytest.mark.parametrize("M", [1, 40])
def test_int8_dynamic_cpu_no_saturation(M):
    # every activation and weight code at +-127: u8 x s8 pair sums overflow int16 without VNNI
    lin = nn.Linear(512, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.where(torch.rand(64, 512) < 0.5, -1.0, 1.0))
    q = QLinear.from_module(lin, weights="qint8", activations="qint8", act_dynamic=True)
    q.freeze()
    x = torch.where(torch.rand(M, 512) < 0.5, -1.0, 1.0)
    x[:, 0] = 1.0
    with torch.no_grad():
        got = q(x)
    exact = x.double() @ lin.weight.double().T
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-3)


def _prepared_cpu(state):
    """A PreparedLinear built on the CPU (the CUDA prepare path, without the device check)."""
    N, K = state.shape
    if state.layout == "gguf":
        return L._prepare_gguf(state)
    if state.scheme == "int8":
        return L.PreparedLinear(L._words(state.data, N, K, 8), state.scales.reshape(N, 1).float(), None, None, 8, K,
                                1, 128.0, N, K)
    from lowbit.kernels import api

    p4 = api.prepare_4bit(state)
    return L.PreparedLinear(L._words(state.data, N, K, 4), p4.scales, p4.zeros,
                            p4.values.float() if p4.kind == 0 else None, 4, p4.group, p4.kind, 8.0, N, K, p4=p4)


@pytest.mark.parametrize("scheme,kw", [("nf4", dict(block_size=64)), ("fp4", dict(block_size=64)),
                                       ("nf4", dict(block_size=64, double_quant=True)),
                                       ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=32)),
                                       ("int8", dict(axis=0)), ("q4_0", {}), ("q4_1", {}), ("q8_0", {})])
def test_prepared_layout_dequantizes_exactly(scheme, kw):
    import lowbit.kernels.ops  # noqa: F401

    w = torch.randn(40, 256)
    st = quantize_tensor(w, scheme, **kw)
    p = _prepared_cpu(st)
    ref = lowbit.dequantize(st).float()
    got = p.dequantize(torch.float32)
    if scheme == "q4_1":  # q * d + m vs (q * d) + m: the same float32 operations
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, ref)
    x = torch.randn(3, 256)
    y = torch.ops.lowbit.gemv_lowbit(x, p.words, p.scales, p.zeros, p.table, None, p.n, p.k, p.bits, p.group, p.kind,
                                     p.zero, [16, 64, 2, 4, 1, 1])
    torch.testing.assert_close(y, F.linear(x, ref), rtol=1e-5, atol=1e-5)


def test_gemv_op_fake_and_opcheck():
    import lowbit.kernels.ops  # noqa: F401

    st = quantize_tensor(torch.randn(16, 64), "int4", group_size=32)
    p = _prepared_cpu(st)
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.lowbit.gemv_lowbit.default,
                          (x, p.words, p.scales, p.zeros, p.table, None, p.n, p.k, p.bits, p.group, p.kind, p.zero,
                           [16, 32, 2, 4, 1, 1]))


def _int8_exact(q, x):
    """float64 of the reference's integer computation: codes round(x / s) (float32, as the reference) times
    the stored weight codes, exact in int64, then * sw * s + bias."""
    st = q.qstate
    N, K = st.shape
    wq = st.data.view(N, K).long() - 128
    x2 = x.reshape(-1, K)
    s = x2.abs().amax(-1, keepdim=True) / 127.0
    s = torch.where(s > 0, s, 1.0)
    out = (torch.round(x2 / s).long() @ wq.T).double() * st.scales.reshape(-1).double() * s.double()
    if q.bias is not None:
        out = out + q.bias.detach().double()
    return out.reshape(*x.shape[:-1], N)


@needs_vnni
@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256), (2, 3, 256), (40, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_dynamic_cpu_exact_integer_products(shape, bias):
    torch.manual_seed(len(shape) + shape[0])
    q = QLinear.from_module(nn.Linear(256, 96, bias=bias), weights="qint8", activations="qint8", act_dynamic=True)
    q.freeze()
    x = torch.randn(shape) * 3
    with torch.no_grad():
        got = q(x)
    assert got.shape == (*shape[:-1], 96) and got.dtype == torch.float32
    # the codes are the reference's and the products exact: only the float32 rescale rounds
    torch.testing.assert_close(got.double(), _int8_exact(q, x), rtol=2e-6, atol=1e-6)


@needs_vnni
def test_int8_dynamic_cpu_special_rows():
    q = QLinear.from_module(_lin(96, 256), weights="qint8", activations="qint8", act_dynamic=True)
    rows = {
        "zero": torch.zeros(1, 256),  # s = 1 (the reference's all-zero rule): the general path
        "subnormal": torch.full((1, 256), 1e-41),  # absmax / 127 below float32's normal range
        "tiny": torch.randn(1, 256) * 1e-30,
        "large": torch.randn(1, 256) * 1e30,
        "mixed": torch.cat([torch.zeros(1, 256), torch.randn(1, 256)]),
    }
    refs = {k: q(x) for k, x in rows.items()}  # unfrozen: fake quantization + F.linear
    q.freeze()
    with torch.no_grad():
        for k, x in rows.items():
            got = q(x)
            torch.testing.assert_close(got, refs[k], rtol=1e-5, atol=1e-4, msg=k)
            torch.testing.assert_close(got.double(), _int8_exact(q, x), rtol=2e-6, atol=1e-6, msg=k)


@needs_vnni
def test_cpu_hot_path_follows_selection(monkeypatch):
    from lowbit.kernels import select

    q = QLinear.from_module(_lin(96, 256), weights="qint8", activations="qint8", act_dynamic=True)
    x = torch.randn(2, 256)
    ref = q(x)  # unfrozen: the reference (fake-quantized activations, dequantized weight)
    q.freeze()
    with torch.no_grad():
        fast = q(x)  # derives and caches the int8 layout
        assert L._cached(q.qstate, "cpu_int8") is not None
        with select.use("reference", "int8_linear"):  # the cached layout must not bypass the choice
            assert torch.equal(q(x), ref)
        monkeypatch.setenv("LOWBIT_KERNELS", "reference")
        assert select.get_backend("int8_linear") == "reference"
        assert torch.equal(q(x), ref)
        monkeypatch.delenv("LOWBIT_KERNELS")
        assert select.get_backend("int8_linear") == "auto"
        assert torch.equal(q(x), fast)
        q.qstate.scales.mul_(2)  # in-place edit: the int8 layout is derived again
        torch.testing.assert_close(q(x).double(), _int8_exact(q, x), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("cls", ["QLinear", "Linear4bit"])
def test_module_hot_path_bit_identical_to_reference(cls):
    from lowbit.kernels import select

    lin = _lin(40, 128)
    m = QLinear.from_module(lin, weights="qint4") if cls == "QLinear" else Linear4bit.from_module(lin, quant_type="nf4")
    m.freeze()
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        with select.use("reference"):
            ref = F.linear(x, lowbit.dequantize(m.qstate), lin.bias)
        for _ in range(2):  # the second call takes the cached hot path
            assert torch.equal(m(x), ref)
    x.requires_grad_(True)
    m(x).sum().backward()  # autograd still goes through the frozen-weight function
    torch.testing.assert_close(x.grad, torch.ones(1, 3, 40) @ lowbit.dequantize(m.qstate))


@needs_vnni
@pytest.mark.parametrize("M,K", [(1, 128), (3, 128), (40, 128), (1, 576), (1, 1536), (40, 1536)])
def test_int8_dynamic_cpu_codes_exact_at_rounding_ties(M, K):
    # activations a hair (1-2 ulp) off k + 0.5 code steps: the kernel's codes must be round(x / s) exactly,
    # as the reference's (FBGEMM's own quantization adds the zero point before rounding and flips ~1/4 of them)
    lin = nn.Linear(K, K, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(K))  # per-channel scale 1/127, code 127: output = code(x) * s
    q = QLinear.from_module(lin, weights="qint8", activations="qint8", act_dynamic=True)
    q.freeze()
    g = torch.Generator().manual_seed(M)
    amax = torch.rand(M, 1, generator=g) * 50 + 0.1
    s = amax / 127.0
    k = torch.randint(-126, 126, (M, K), generator=g).float() + 0.5
    x = k * s
    for _ in range(2):  # nudge each value by 0, 1 or 2 ulp either way
        step = torch.randint(-1, 2, (M, K), generator=g)
        x = torch.nextafter(x, torch.where(step > 0, torch.inf, torch.where(step < 0, -torch.inf, x)))
    x[:, 0] = amax[:, 0]  # the row's absmax fixes s
    with torch.no_grad():
        got = q(x)
    s = x.abs().amax(-1, keepdim=True) / 127.0
    codes = torch.round(x / s)
    torch.testing.assert_close(got, codes * s, rtol=1e-6, atol=0)


def _int8_dyn(n, k, seed, bias=False):
    q = QLinear.from_module(_lin(n, k, seed) if bias else nn.Linear(k, n, bias=False), weights="qint8",
                            activations="qint8", act_dynamic=True)
    q.freeze()
    return q


@needs_vnni
@pytest.mark.parametrize("bias", [False, True])
def test_int8_dynamic_cpu_shared_input_groups(bias):
    # q / k / v on one input (decode): after the first step the three GEMMs run as one; every output stays the
    # exact integer product of its own weight, and equal to the same module on a copy of the input
    import copy

    torch.manual_seed(1)
    mods = [_int8_dyn(48, 64, 1, bias), _int8_dyn(16, 64, 2, bias), _int8_dyn(16, 64, 3, bias)]
    alone = copy.deepcopy(mods)  # the same weights, each called on its own copy of the input: never grouped
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(1, 1, 64) * (step + 1)
            outs = [m(x) for m in mods]
            s = x.abs().max() / 127.0
            codes = torch.round(x / s).reshape(1, 64)
            for m, a, y in zip(mods, alone, outs):
                assert y.shape == (1, 1, m.out_features)
                torch.testing.assert_close(y.double(), _int8_exact(m, x), rtol=2e-6, atol=1e-6)
                assert torch.equal(y, a(x.clone()))
                # bit for bit (acc * sw) * s (+ bias): the rescale order of the ungrouped path
                want = L._fbgemm(codes, L._cached(m.qstate, "cpu_int8")) * s
                assert torch.equal(y.reshape(want.shape), want + m.bias if bias else want)
        head = L._cached(mods[0].qstate, "cpu_int8")
        assert head.group is not None and len(head.group.members) == 3
        # an in-place edit of a member's weight: its layout is derived again and the grouped output not used
        mods[1].qstate.scales.mul_(2)
        x = torch.randn(1, 1, 64)
        outs = [m(x) for m in mods]
        for m, y in zip(mods, outs):
            torch.testing.assert_close(y.double(), _int8_exact(m, x), rtol=2e-6, atol=1e-6)
        # the input edited in place between two linears: its codes are computed again
        x = torch.randn(1, 1, 64)
        y0 = mods[0](x)
        x.mul_(-3)
        torch.testing.assert_close(mods[1](x).double(), _int8_exact(mods[1], x), rtol=2e-6, atol=1e-6)
        assert y0.shape == (1, 1, 48)


@needs_vnni
def test_int8_dynamic_cpu_group_dropped_when_sequence_changes():
    mods = [_int8_dyn(32, 64, 4), _int8_dyn(32, 64, 5)]
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 64)
            [m(x) for m in mods]
        x = torch.randn(1, 64)
        mods[0](x)  # computes mods[1]'s output ahead; it is never asked for
        head = L._cached(mods[0].qstate, "cpu_int8")
        for _ in range(3):  # the head alone on new inputs: the group is dropped, not learned again
            x = torch.randn(1, 64)
            y = mods[0](x)
            torch.testing.assert_close(y.double(), _int8_exact(mods[0], x), rtol=2e-6, atol=1e-6)
        assert head.group is None and head.misses >= 1
        for m in mods:  # results never depend on the grouping
            x = torch.randn(1, 64)
            torch.testing.assert_close(m(x).double(), _int8_exact(m, x), rtol=2e-6, atol=1e-6)


@needs_vnni
@pytest.mark.parametrize("M", [1, 5, 40])
def test_int8_dynamic_cpu_inference_mode(M):
    # inference tensors have no version counter: their codes are never reused, results unchanged
    mods = [_int8_dyn(24, 64, 6), _int8_dyn(24, 64, 7)]
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(M, 64)
            ys = [m(x) for m in mods]
            x.mul_(2)  # in place between the calls: no version counter would see it
            ys.append(mods[1](x))
            for m, y, xx in zip(mods + mods[1:], ys, (x / 2, x / 2, x)):
                torch.testing.assert_close(y.double(), _int8_exact(m, xx), rtol=2e-6, atol=1e-6)


def _one_row_formula(q, x):
    """The one-row path's float32 computation spelled out: codes round(x / s) with the reference's 0-d scale
    s = max|x| / 127, FBGEMM's exact products times sw, then * s (+ bias)."""
    s = torch.div(x.abs().max(), torch.tensor(127.0))
    codes = torch.round(x / s).reshape(1, -1)
    out = L._fbgemm(codes, L._cached(q.qstate, "cpu_int8")) * s
    return (out + q.bias if q.bias is not None else out).reshape(*x.shape[:-1], -1)


@needs_vnni
@pytest.mark.parametrize("K", [256, 576, 1536])
def test_int8_dynamic_cpu_one_row_scale_from_either_sign(K):
    # one row: the scale comes from max or from -min (one aminmax); rows whose absmax is the minimum, equal
    # magnitudes of both signs, and scales around the general-path threshold give the codes and scale of the
    # reference, bit for bit the formula of the one-row path
    q = QLinear.from_module(_lin(64, K, seed=K), weights="qint8", activations="qint8", act_dynamic=True)
    g = torch.Generator().manual_seed(K)
    base = torch.randn(1, 1, K, generator=g)
    rows = {"max": base.abs() + 0.1, "min": -(base.abs() + 0.1), "mixed": base}
    tie = base.clone()
    tie[..., 0], tie[..., 1] = 3.0, -3.0  # |min| == max
    rows["tie"] = tie
    neg = base.clone()
    neg[..., 2] = -50.0
    rows["negative absmax"] = neg
    for scale in (2.0 ** -119, 2.0 ** -118, 2.0 ** -120, 1e-36, 3e38 / 8):  # around L._AMAX_LO; large finite
        r = base / base.abs().max() * scale
        rows[f"absmax {scale:g}"] = r
        rows[f"absmax -{scale:g}"] = -r
    refs = {k: q(x) for k, x in rows.items()}  # unfrozen: fake quantization + F.linear
    q.freeze()
    with torch.no_grad():
        for k, x in rows.items():
            got = q(x)
            assert torch.equal(got, _one_row_formula(q, x)), k
            torch.testing.assert_close(got.double(), _int8_exact(q, x), rtol=2e-6, atol=1e-30, msg=k)
            if x.abs().max() < 1e30:
                torch.testing.assert_close(got, refs[k], rtol=1e-5, atol=1e-4 * float(x.abs().max()), msg=k)


@needs_vnni
@pytest.mark.parametrize("M", [1, 40])
def test_int8_dynamic_cpu_nonfinite_rows_as_reference(M):
    # NaN / inf in a row: the one-row shortcut is not taken; the output's NaN pattern is the reference's
    q = QLinear.from_module(_lin(32, 576, seed=3), weights="qint8", activations="qint8", act_dynamic=True)
    rows = []
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(M, 576)
        x[0, 5] = bad
        rows.append(x)
    refs = [q(x) for x in rows]
    q.freeze()
    with torch.no_grad():
        for x, ref in zip(rows, refs):
            got = q(x)
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4, equal_nan=True)


@needs_vnni
@pytest.mark.parametrize("K", [576, 1536])
def test_int8_dynamic_cpu_rows_negative_absmax(K):
    # many rows (torch._int_mm path): per-row absmax = max(row max, -row min) equals max|x| (rows dominated by
    # their minimum, by their maximum, all zero, ties); products exact, rescale (acc * sw) * s
    q = QLinear.from_module(_lin(48, K, seed=K), weights="qint8", activations="qint8", act_dynamic=True)
    g = torch.Generator().manual_seed(K + 1)
    x = torch.randn(40, K, generator=g) * torch.logspace(-3, 3, 40).unsqueeze(1)
    x[::3] = -x[::3].abs()
    x[1::3] = x[1::3].abs()
    x[5] = 0
    x[7, 0], x[7, 1] = 9.0, -9.0
    ref = q(x)
    q.freeze()
    with torch.no_grad():
        got = q(x)
    p = L._cached(q.qstate, "cpu_int8")
    s = x.abs().amax(-1, keepdim=True) / 127.0
    s = torch.where(s > 0, s, 1.0)
    codes = torch.round(x / s).to(torch.int8)
    want = (torch._int_mm(codes, p.w.t()).float() * p.sw) * s + q.bias
    assert torch.equal(got, want)
    torch.testing.assert_close(got.double(), _int8_exact(q, x), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


@needs_vnni
def test_int8_dynamic_cpu_fbgemm_entry_is_the_op():
    # the FBGEMM op is called through its C++ entry (no Python argument scan): same results as torch.ops
    q = _int8_dyn(40, 576, 8)
    p = L._prepare_cpu_int8(q.qstate)
    v = torch.randint(-127, 128, (3, 576)).float()
    want = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(v, 1.0, 128, p.packed)
    assert torch.equal(L._fbgemm(v, p), want)
    assert L._fbgemm_op() is not torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
