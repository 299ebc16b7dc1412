import math

import pytest
import torch

import lowbit
from lowbit.eval import metrics as M


def test_basic_metrics_against_hand_values():
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    y = torch.tensor([1.5, -2.0, 2.0, 0.0])
    assert M.mse(x, y) == pytest.approx((0.25 + 1) / 4)
    assert M.mae(x, y) == pytest.approx(1.5 / 4)
    assert M.max_abs_error(x, y) == 1.0
    assert M.sqnr_db(x, y) == pytest.approx(10 * math.log10(14 / 1.25))
    assert M.sqnr_db(x, x) == math.inf


def test_theoretical_sqnr_matches_uniform_input():
    # uniform input on the full range of a symmetric b-bit grid: measured SQNR ~ 6.02 b
    x = M.synthetic("uniform", (512, 512), seed=1)
    for bits in (4, 8):
        st = lowbit.quantize(x, f"int{bits}_asym", block_size=None)
        assert M.sqnr_db(x, st) == pytest.approx(M.theoretical_sqnr_db(bits, steps=2**bits - 1), abs=0.1)
    assert M.theoretical_sqnr_db(4) == pytest.approx(24.08, abs=0.01)
    assert M.theoretical_sqnr_db(8, "sine") == pytest.approx(49.92, abs=0.01)


@pytest.mark.parametrize("scheme", ["int8", "int4_asym", "int3", "nf4", "fp4"])
def test_theoretical_max_error_is_a_bound(scheme):
    x = M.synthetic("laplace", (64, 256), seed=2)
    st = lowbit.quantize(x, scheme, block_size=64)
    assert M.max_abs_error(x, st) <= M.theoretical_max_error(st) * (1 + 1e-6)


def test_outlier_impact_grows_error():
    x = M.synthetic("gaussian", (256, 256))
    r = M.outlier_impact(x, "int8", n_outliers=16, block_size=None)
    assert r["ratio"] > 100
    r_blk = M.outlier_impact(x, "int8", n_outliers=16, block_size=64)
    assert 1 < r_blk["ratio"] < r["ratio"]  # blockwise scales confine the damage


def test_scale_sensitivity_has_optimum_below_one_for_int3():
    x = M.synthetic("gaussian", (256, 512))
    rows = M.scale_sensitivity(x, bits=3, factors=(0.6, 0.8, 1.0, 1.2))
    best = min(rows, key=lambda r: r["mse"])
    assert best["factor"] < 1.0
    assert rows[-1]["mse"] > rows[2]["mse"]


def test_bit_and_granularity_comparisons_are_ordered():
    x = M.synthetic("multichannel", (128, 512))
    bits = M.compare_bits(x, (2, 3, 4, 8), group_size=64)
    s = [r["sqnr_db"] for r in bits]
    assert s == sorted(s)
    gran = {r["granularity"]: r["mse"] for r in M.compare_granularity(x, "int4")}
    assert gran["per-tensor"] > gran["per-channel"] > gran["group 128"] > gran["group 32"]


def test_accuracy_retention_and_errors():
    assert M.accuracy_retention(0.9, 1.0) == pytest.approx(0.9)
    assert M.accuracy_retention(30.0, 25.0, higher_is_better=False) == pytest.approx(25 / 30)
    with pytest.raises(ValueError, match="unknown synthetic"):
        M.synthetic("cauchy")
    with pytest.raises(ValueError, match="shapes differ"):
        M.mse(torch.zeros(3), torch.zeros(4))


def test_lazy_metrics_attribute():
    assert lowbit.metrics.sqnr_db is M.sqnr_db
