"""PTQ algorithms (RTN, GPTQ, AWQ, HQQ) on small layers: output error against round-to-nearest,
search monotonicity, ragged groups, every bit width, per-channel groups, sym/asym."""
import math

import pytest
import torch

import lowbit
from lowbit.algorithms.awq import awq_search
from lowbit.algorithms.gptq import gptq_quantize, layer_output_error, refit_scales
from lowbit.algorithms.grid import AffineGrid, dequantize_groups, group_bounds, quantize_groups
from lowbit.algorithms.hqq import _grouped, hqq_optimize, hqq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.stats import InputStats


def _correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, k, generator=g) / math.sqrt(k)
    X = torch.randn(n, k, generator=g) @ A + 0.05 * torch.randn(n, k, generator=g)
    X[:, : k // 16] *= 8  # a few outlier channels, as in LLM activations
    return X


def _weight(out, k, seed=1):
    return torch.randn(out, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _levels_ok(state, bits):
    from lowbit.tensor.functional import codes as state_codes

    codes = state_codes(state)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1


def test_group_bounds_ragged():
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert group_bounds(576, -1) == [(0, 576)]
    with pytest.raises(ValueError, match="group_size=0"):
        group_bounds(576, 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [128, -1])
def test_rtn_matches_minmax_reference(bits, sym, group_size):
    w = _weight(24, 576)
    st = rtn_quantize(w, bits, group_size, sym)
    _levels_ok(st, bits)
    # float64 reference of the min/max affine grid, ragged last group (576 = 4 * 128 + 64)
    g = 576 if group_size == -1 else group_size
    ref = torch.empty_like(w, dtype=torch.float64)
    for a, b in group_bounds(576, g):
        blk = w[:, a:b].double()
        lo, hi = blk.amin(1).clamp(max=0), blk.amax(1).clamp(min=0)
        if sym:
            s = torch.maximum(lo.abs(), hi) / (2 ** (bits - 1) - 1)
            z = torch.full_like(s, 2 ** (bits - 1))
        else:
            s = (hi - lo) / (2 ** bits - 1)
            z = torch.round(-lo / s)
        q = torch.clamp(torch.round(blk / s[:, None]) + z[:, None], 0, 2 ** bits - 1)
        ref[:, a:b] = (q - z[:, None]) * s[:, None]
    torch.testing.assert_close(lowbit.dequantize(st).double(), ref, rtol=0, atol=1e-6)
    if group_size == 128:
        assert st.scales.shape == (24, 5)


@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_never_worse_than_minmax(sym):
    w = _weight(32, 256)
    w[0, 3] = 1.0  # an outlier: the search should clip it
    for bits in (3, 4):
        e_mm = (lowbit.dequantize(rtn_quantize(w, bits, 64, sym)) - w).square().sum(1)
        e_mse = (lowbit.dequantize(rtn_quantize(w, bits, 64, sym, search="mse")) - w).square().sum(1)
        assert bool((e_mse <= e_mm + 1e-7).all())
        assert float(e_mse.sum()) < float(e_mm.sum())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_gptq_beats_rtn_on_correlated_inputs(sym, group_size):
    X = _correlated_inputs(2048, 192)
    H = X.T @ X / X.shape[0]
    w = _weight(48, 192)
    e_rtn = layer_output_error(w, lowbit.dequantize(rtn_quantize(w, 4, group_size, sym)), H)
    e_rtn_mse = layer_output_error(w, lowbit.dequantize(rtn_quantize(w, 4, group_size, sym, search="mse")), H)
    for objective in ("minmax", "hessian"):
        res = gptq_quantize(w, H, 4, group_size, sym, group_objective=objective)
        st = res.state
        _levels_ok(st, 4)
        e = layer_output_error(w, lowbit.dequantize(st), H)
        assert e < 0.6 * min(e_rtn, e_rtn_mse), (objective, e, e_rtn, e_rtn_mse)
        torch.testing.assert_close(lowbit.dequantize(st), res.dequantize())


def test_gptq_objectives_and_act_order_ragged():
    X = _correlated_inputs(2048, 320)
    H = X.T @ X / X.shape[0]
    w = _weight(40, 320)
    errs = {}
    for obj in ("minmax", "mse", "hessian", "sweep"):
        for ao in (False, True):
            res = gptq_quantize(w, H, 4, 128, False, group_objective=obj, act_order=ao, blocksize=64)
            assert res.scales.shape == (40, 3)  # 320 = 2 * 128 + 64 (ragged)
            errs[obj, ao] = layer_output_error(w, res.dequantize(), H)
    assert errs["hessian", False] < errs["minmax", False]
    assert errs["sweep", False] <= errs["mse", False]
    res = gptq_quantize(w, H, 4, 128, False, act_order=True, static_groups=True)
    assert layer_output_error(w, res.dequantize(), H) < layer_output_error(
        w, lowbit.dequantize(rtn_quantize(w, 4, 128, False)), H)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_gptq_bits(bits):
    X = _correlated_inputs(1024, 128)
    H = X.T @ X / X.shape[0]
    w = _weight(16, 128)
    res = gptq_quantize(w, H, bits, 32, True)
    _levels_ok(res.state, bits)
    assert layer_output_error(w, res.dequantize(), H) < layer_output_error(
        w, lowbit.dequantize(rtn_quantize(w, bits, 32, True)), H)


def test_gptq_dead_columns_and_damping_retry():
    X = _correlated_inputs(512, 64)
    X[:, 5] = 0  # a dead input channel
    H = X.T @ X / X.shape[0]
    w = _weight(8, 64)
    res = gptq_quantize(w, H, 4, 32, False)
    assert bool((res.dequantize()[:, 5] == 0).all())
    singular = torch.ones(64, 64)  # rank one: needs more dampening than 0
    with pytest.warns(RuntimeWarning, match="Cholesky"):
        gptq_quantize(w, singular, 4, 32, False, percdamp=0.0)


def test_gptq_refit_scales_lowers_output_error():
    X = _correlated_inputs(2048, 128)
    H = X.T @ X / X.shape[0]
    w = _weight(16, 128)
    res = gptq_quantize(w, H, 4, 32, False, group_objective="minmax")
    new = refit_scales(w, H, res.codes, res.scales, res.zeros, 32)
    e0 = layer_output_error(w, dequantize_groups(res.codes, res.scales, res.zeros, 32), H)
    e1 = layer_output_error(w, dequantize_groups(res.codes, new, res.zeros, 32), H)
    assert e1 <= e0


@pytest.mark.parametrize("sym", [True, False])
def test_awq_never_worse_than_alpha_zero(sym):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 256, generator=g) * (torch.rand(256, generator=g) ** 3 * 10 + 0.1)
    H = X.T @ X / X.shape[0]
    ws = [_weight(64, 256, 2), _weight(32, 256, 3)]
    res = awq_search(ws, H, X.abs().mean(0), 4, 128, sym, clip=False)
    assert res.losses[0] == pytest.approx(sum(layer_output_error(w, lowbit.dequantize(rtn_quantize(w, 4, 128, sym)), H)
                                              for w in ws), rel=1e-4)
    assert res.loss <= res.losses[0] * (1 + 1e-6)
    assert res.alpha > 0  # these activations have strong outlier channels: scaling must help
    clipped = awq_search(ws, H, X.abs().mean(0), 4, 128, sym, clip=True)
    assert clipped.loss <= res.loss * (1 + 1e-6)
    # the state quantizes W * s; W_hat = dequant / s
    s = clipped.input_scales
    torch.testing.assert_close(lowbit.dequantize(clipped.states[0]) / s, clipped.effective_weights[0])


def test_awq_grid_shared_out_gives_the_same_search(monkeypatch):
    """``awq_search(share=...)`` (a data-parallel run's grid of exponents spread over its ranks): handed the points
    ``1 .. n_grid - 1`` and the loss function, whatever order it computes them in, the same exponent, losses, scales
    and states as the search alone; ``distributed.shared_values`` in one process is the plain loop."""
    from lowbit.model import distributed as D

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, generator=g) * (torch.rand(256, generator=g) ** 3 * 10 + 0.1)
    H = X.T @ X / X.shape[0]
    ws = [_weight(64, 256, 2), _weight(32, 256, 3)]
    ref = awq_search(ws, H, X.abs().mean(0), 4, 128, False, n_grid=10)
    asked = []

    def backwards(n, loss):
        asked.append(n)
        return [loss(i) for i in range(n, 0, -1)][::-1]

    got = awq_search(ws, H, X.abs().mean(0), 4, 128, False, n_grid=10, share=backwards)
    assert asked == [9] and ref.alpha > 0 and got.alpha == ref.alpha and got.losses == ref.losses
    assert torch.equal(got.input_scales, ref.input_scales) and got.loss == ref.loss
    assert all(torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales) for a, b in zip(got.states, ref.states))
    assert D.shared_values(4, lambda i: i * 0.5) == [0.5, 1.0, 1.5, 2.0]
    monkeypatch.setenv("LOWBIT_DP_AWQ", "some")
    from lowbit.model._ptq_blocks import _Stage
    from lowbit.model._ptq_solve import _awq_stage

    st = _Stage(["a"])
    st.stats = InputStats(256, hessian=True, absmean=True, dtype=torch.float64)
    st.stats.add(X[:64])
    with pytest.raises(ValueError, match="LOWBIT_DP_AWQ='some'"):
        _awq_stage(st, {"a": torch.nn.Linear(256, 64)}, 4, 128, False, {})


def test_awq_ragged_and_per_channel():
    X = torch.randn(1024, 576) * (torch.rand(576) + 0.1)
    H = X.T @ X / X.shape[0]
    for gs in (128, -1):
        res = awq_search([_weight(8, 576)], H, X.abs().mean(0), 3, gs, False, n_grid=5, clip_grid=5)
        assert res.states[0].shape == (8, 576)


@pytest.mark.parametrize("sym", [True, False])
def test_hqq_objective_decreases_and_beats_rtn(sym):
    w = _weight(64, 576)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.01] *= 8  # heavy tails
    wg, mask, _ = _grouped(w, 64)
    _, _, hist = hqq_optimize(wg, mask, AffineGrid(4, sym, "minmax"), iters=15)
    assert all(b <= a + 1e-6 for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]
    # asym: the integer zero chosen by lowest l_p error (the default rounds hqq's float zero, which on
    # heavy tails can land a hair above RTN's l_p error)
    st = hqq_quantize(w, 4, 64, sym, **({} if sym else {"zero_rounding": "best"}))
    assert st.scales.shape == (64, 9)
    e_hqq = (lowbit.dequantize(st) - w).abs().pow(0.7).sum()
    e_rtn = (lowbit.dequantize(rtn_quantize(w, 4, 64, sym)) - w).abs().pow(0.7).sum()
    assert e_hqq < e_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_bits_and_ragged(bits):
    st = hqq_quantize(_weight(8, 576), bits, 128, False, iters=5)
    _levels_ok(st, bits)
    assert st.zeros.shape == (8, 5)
    per_channel = hqq_quantize(_weight(8, 100), bits, -1, True, iters=3)  # canonical: channel layout, one scale per row
    assert per_channel.layout == "channel" and per_channel.axis == 0 and per_channel.scales.shape == (8,)


def test_input_stats_sums_merge_exactly():
    X = torch.randn(3, 100, 32, dtype=torch.float64)
    a, b, full = (InputStats(32, dtype=torch.float64) for _ in range(3))
    a.add(X[:2])
    b.add(X[2:])
    full.add(X)
    a.xtx += b.xtx
    a.abs_sum += b.abs_sum
    a.count += b.count
    torch.testing.assert_close(a.hessian(), full.hessian())
    torch.testing.assert_close(full.hessian(), X.reshape(-1, 32).T @ X.reshape(-1, 32) / 300)
    torch.testing.assert_close(full.act_absmean(), X.reshape(-1, 32).abs().mean(0))


def test_grid_errors():
    with pytest.raises(ValueError, match="bits=1"):
        AffineGrid(bits=1)
    with pytest.raises(ValueError, match="search='foo'"):
        AffineGrid(search="foo")
    with pytest.raises(ValueError, match="expected"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7))
    codes, s, z = quantize_groups(torch.zeros(3, 10), AffineGrid(4, False), 4)
    assert bool((dequantize_groups(codes, s, z, 4) == 0).all())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gptq_on_exact_gguf_grid(qtype):
    X = _correlated_inputs(1024, 128)
    H = X.T @ X / X.shape[0]
    w = _weight(16, 128)
    res = gptq_quantize(w, H, gguf_type=qtype)
    st = res.state
    assert st.layout == "gguf" and st.scheme == qtype.lower()
    # the raw blocks dequantize (llama.cpp rule, fp16 d/m) to exactly what GPTQ optimised
    torch.testing.assert_close(lowbit.dequantize(st), res.dequantize(), rtol=0, atol=1e-6)
    ref = lowbit.dequantize(lowbit.quantize(w, qtype.lower()))  # llama.cpp's own quantizer
    assert layer_output_error(w, lowbit.dequantize(st), H) < 0.8 * layer_output_error(w, ref, H)
