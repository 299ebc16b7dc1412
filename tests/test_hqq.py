"""HQQ (lowbit.algorithms.hqq) against a float64 re-implementation of the published solver and, when
the hqq package is importable, against hqq's own quantizer (bit-identical codes, steps and zeros)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import lowbit
from lowbit.algorithms.grid import AffineGrid
from lowbit.algorithms.hqq import (_grouped, hqq_optimize, hqq_quantize, shrink_lp, shrink_threshold)
from lowbit.algorithms.rtn import rtn_quantize


def _weight(rows, cols, std=0.02, seed=0, outliers=0.01):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * std
    w[torch.rand(w.shape, generator=g) < outliers] *= 6  # heavy tails
    return w


def _reference(weight, bits, group_size, lp_norm=0.7, beta=10.0, kappa=1.0, iters=20, round_zero=None):
    """The published HQQ zero-point solver, written out group by group in float64.

    Per group of the row: inverse step s = (2**b - 1) / (max - min), zero z = -min * s (rounded for
    4 bits); then Q = clamp(round(W s + z)), W_r = (Q - z) / s, W_e = shrink_p(W - W_r, beta),
    z = mean(Q - (W - W_e) s), beta *= kappa; stop after the first iteration whose mean |W - W_r|
    over the layer is not below the best so far (the zero it computed is kept). Ragged last groups
    are simply shorter. Returns (codes [R, K], inverse steps [R, G], zeros [R, G], iterations run).
    """
    W = weight.double()
    R, K = W.shape
    maxq = (1 << bits) - 1
    bounds = [(a, min(a + group_size, K)) for a in range(0, K, group_size)]
    rz = bits == 4 if round_zero is None else round_zero
    s = torch.empty(R, len(bounds), dtype=torch.float64)
    z = torch.empty_like(s)
    for r in range(R):
        for j, (a, b) in enumerate(bounds):
            lo, hi = W[r, a:b].min(), W[r, a:b].max()
            s[r, j] = maxq / (hi - lo)
            z[r, j] = torch.round(-lo * s[r, j]) if rz else -lo * s[r, j]

    def shrink(x):
        ax = x.abs()
        out = ax - ax.pow(lp_norm - 1) / beta if lp_norm != 1 else ax - 1.0 / beta
        return torch.sign(x) * out.clamp_min(0)

    best, n = float("inf"), 0
    for _ in range(iters):
        n += 1
        total = 0.0
        new_z = z.clone()
        for r in range(R):
            for j, (a, b) in enumerate(bounds):
                w = W[r, a:b]
                q = torch.round(w * s[r, j] + z[r, j]).clamp(0, maxq)
                w_r = (q - z[r, j]) / s[r, j]
                total += float((w - w_r).abs().sum())
                w_e = shrink(w - w_r)
                new_z[r, j] = (q - (w - w_e) * s[r, j]).mean()
        z = new_z
        beta *= kappa
        err = total / W.numel()
        if err < best:
            best = err
        else:
            break
    codes = torch.empty(R, K, dtype=torch.float64)
    for j, (a, b) in enumerate(bounds):
        codes[:, a:b] = torch.round(W[:, a:b] * s[:, j:j + 1] + z[:, j:j + 1]).clamp(0, maxq)
    return codes, s, z, n


def _lowbit(weight, bits, group_size, **kw):
    wg, mask, g = _grouped(weight, group_size)
    s, z, hist = hqq_optimize(wg, mask, AffineGrid(bits, False, "minmax"), **kw)
    q = torch.round(wg * s.unsqueeze(-1) + z.unsqueeze(-1)).clamp(0, (1 << bits) - 1)
    return q.reshape(weight.shape[0], -1)[:, :weight.shape[1]], s, z, len(hist)


@pytest.mark.parametrize("case", [
    dict(bits=4, group_size=64, std=0.02),                    # LLM-sized weights: the shrinkage is 0 everywhere
    dict(bits=4, group_size=64, std=1.0),                     # the shrinkage is active
    dict(bits=3, group_size=32, std=1.0, lp_norm=1.0),
    dict(bits=2, group_size=64, std=0.5, kappa=1.01),         # beta growing, float initial zero
    dict(bits=4, group_size=48, std=1.0, cols=136),           # ragged last group (padding masked)
])
def test_hqq_matches_float64_reference(case):
    case = dict(case)
    bits, gs, std, cols = case.pop("bits"), case.pop("group_size"), case.pop("std"), case.pop("cols", 192)
    w = _weight(12, cols, std=std, seed=bits + gs)
    q_ref, s_ref, z_ref, n_ref = _reference(w, bits, gs, **case)
    q, s, z, n = _lowbit(w, bits, gs, **case)
    assert n == n_ref
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-6, atol=0)
    # zeros in code units: float32 sums of 64 terms of size <= 2**b against float64
    torch.testing.assert_close(z.double(), z_ref, rtol=0, atol=2e-5 * (1 << bits))
    # codes: identical except where w * s + z falls within float32 rounding of a half-integer
    mism = (q.double() != q_ref).float().mean().item()
    assert mism <= 1e-3, f"{mism:.2%} of the codes differ from the float64 reference"


def test_hqq_stopping_rules():
    w = _weight(16, 256, std=1.0)
    wg, mask, _ = _grouped(w, 64)
    grid = AffineGrid(4, False, "minmax")
    for never in (False, 0, 0.0):
        *_, full = hqq_optimize(wg, mask, grid, iters=12, early_stop=never)
        assert len(full) == 12
    *_, hist = hqq_optimize(wg, mask, grid, iters=40, early_stop=True)
    # hqq's rule: the error fell at every iteration but the last, which did not fall below the best
    assert all(b < a for a, b in zip(hist[:-1], hist[1:-1]))
    assert len(hist) == 40 or hist[-1] >= min(hist[:-1])
    *_, rel = hqq_optimize(wg, mask, grid, iters=40, early_stop=0.05)
    assert len(rel) <= len(hist)


def test_shrink_threshold_is_where_the_shrinkage_vanishes():
    for p, beta in ((0.7, 10.0), (0.7, 37.0), (1.0, 10.0), (0.3, 2.0)):
        t = shrink_threshold(beta, p)
        x = torch.tensor([t * (1 - 1e-4), -t * (1 - 1e-4), t * (1 + 1e-3), -t * (1 + 1e-3), 0.0])
        y = shrink_lp(x, beta, p)
        assert y[:2].eq(0).all() and y[4] == 0
        assert y[2] > 0 and y[3] < 0


@pytest.mark.parametrize("sym", [True, False])
def test_hqq_state_beats_rtn_on_heavy_tails(sym):
    w = _weight(64, 576, std=1.0)
    st = hqq_quantize(w, 4, 64, sym, **({} if sym else {"zero_rounding": "best"}))
    assert st.scales.shape == (64, 9)
    if not sym:
        assert st.zeros.dtype == torch.uint8 and int(st.zeros.max()) <= 15
    e_hqq = (lowbit.dequantize(st) - w).abs().pow(0.7).sum()
    e_rtn = (lowbit.dequantize(rtn_quantize(w, 4, 64, sym)) - w).abs().pow(0.7).sum()
    assert e_hqq < e_rtn


def test_round_state_is_hqqs_solution_with_the_zero_rounded():
    w = _weight(24, 200, std=0.02, seed=7)  # ragged: 200 = 3 x 64 + 8
    q_ref, s_ref, z_ref, _ = _reference(w, 4, 64)
    st = hqq_quantize(w, 4, 64, False, zero_rounding="round")
    zi = z_ref.round().clamp(0, 15)
    assert torch.equal(st.zeros.reshape(24, -1).double(), zi)
    torch.testing.assert_close(st.scales.reshape(24, -1).double(), 1.0 / s_ref, rtol=1e-6, atol=0)
    w_ref = torch.cat([(torch.round(w.double()[:, a:a + 64] * s_ref[:, j:j + 1] + zi[:, j:j + 1]).clamp(0, 15)
                        - zi[:, j:j + 1]) / s_ref[:, j:j + 1] for j, a in enumerate(range(0, 200, 64))], 1)
    mism = ((lowbit.dequantize(st).double() - w_ref).abs() > 1e-6).float().mean().item()
    assert mism <= 1e-3
    # the default (since issue 18, scale3) keeps the solver's zero fractional, as the hqq package does
    d = hqq_quantize(w, 4, 64, False)
    f = hqq_quantize(w, 4, 64, False, zero_rounding="float")
    assert d.zeros.dtype == torch.float32 and torch.equal(d.zeros, f.zeros) and torch.equal(d.data, f.data)


def test_zero_rounding_refit_lowers_the_squared_error_of_plain_rounding():
    w = _weight(32, 512, std=0.02)
    a = lowbit.dequantize(hqq_quantize(w, 4, 64, False, zero_rounding="round"))
    b = lowbit.dequantize(hqq_quantize(w, 4, 64, False, zero_rounding="refit"))
    assert (b - w).square().sum() < (a - w).square().sum()


def test_hqq_options_are_checked():
    w = _weight(4, 64)
    for kw, msg in ((dict(zero_rounding="floor"), "zero_rounding"), (dict(iters=-1), "iters"),
                    (dict(beta=0.0), "beta"), (dict(lp_norm=1.5), "lp_norm"), (dict(init="x"), "init")):
        with pytest.raises(ValueError, match=msg):
            hqq_quantize(w, 4, 64, False, **kw)


_HQQ = importlib.util.find_spec("hqq") is not None


@pytest.mark.skipif(not _HQQ, reason="the hqq package is not installed (optional oracle: pip install hqq==0.2.8.post1)")
@pytest.mark.parametrize("bits,std", [(4, 0.02), (4, 1.0), (3, 0.5), (2, 0.05), (8, 0.02)])
def test_hqq_matches_the_hqq_package(bits, std):
    from hqq.core.quantize import Quantizer

    w = _weight(256, 384, std=std, seed=bits)
    # hqq's HQQLinear defaults: axis=1 (groups of consecutive inputs), round_zero for 4 bits, optimize=True
    Wq, meta = Quantizer.quantize(w, nbits=bits, group_size=64, optimize=True, round_zero=bits == 4, axis=1,
                                  bitpack=False, device="cpu")
    q, s, z, _ = _lowbit(w, bits, 64)
    # float32 on the CPU, the same operations in the same order: bit-identical
    assert torch.equal(q.reshape(-1, 64), Wq.float())
    assert torch.equal(z.reshape(-1, 1), meta["zero"])
    assert torch.equal((1.0 / s).reshape(-1, 1), meta["scale"])


def test_zero_rounding_best_is_the_lowest_lp_error_per_group():
    w = _weight(16, 320, std=0.02, seed=3)
    wg, _, _ = _grouped(w, 64)

    def per_group(st):
        return (lowbit.dequantize(st) - w).abs().pow(0.7).reshape(16, -1, 64).sum(-1)

    best = per_group(hqq_quantize(w, 4, 64, False, zero_rounding="best"))
    for zr in ("cover", "round", "refit"):
        assert (best <= per_group(hqq_quantize(w, 4, 64, False, zero_rounding=zr)) * (1 + 1e-5)).all(), zr
    rtn = per_group(rtn_quantize(w, 4, 64, False, search="minmax", refine=0))
    assert (best <= rtn * (1 + 1e-5)).all()


def test_zero_rounding_cover_keeps_the_float_grid_range():
    w = _weight(16, 256, std=0.02, seed=5)
    wg, mask, _ = _grouped(w, 64)
    s, z, _ = hqq_optimize(wg, mask, AffineGrid(4, False, "minmax"))
    lo, hi = (-z / s).clamp(max=0), ((15 - z) / s).clamp(min=0)
    st = hqq_quantize(w, 4, 64, False, zero_rounding="cover")
    step, zero = st.scales.reshape(16, -1), st.zeros.reshape(16, -1).float()
    assert (-zero * step <= lo * (1 - 1e-6) + 1e-12).all() and ((15 - zero) * step >= hi * (1 - 1e-6)).all()
    assert ((zero - z).abs() < 1 + 1e-4).all()  # the floor or the ceiling of the float zero
