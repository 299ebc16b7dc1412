"""Error analysis of quantized tensors: the numbers a quantization user asks for.

MSE, MAE, max error, SQNR (measured and theoretical), outlier impact, scale sensitivity,
comparisons across bit widths and granularities, accuracy retention, and synthetic weight
generators. Everything works on plain tensors and :class:`~lowbit.tensor.state.QuantState`.

Theory used: a b-bit uniform quantizer with step ``Δ`` has error variance ``Δ²/12`` when the
error is uniform over a step; for an input uniform on the full range ``[-A, A]``
(``Δ = 2A / 2**b``) that gives ``SQNR = 6.02·b dB``, and ``6.02·b + 1.76 dB`` for a full-scale
sine. The maximum rounding error of an affine grid is half a step, ``s / 2``, per group.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from lowbit.formats import affine
from lowbit.tensor.functional import dequantize, quantize_tensor
from lowbit.tensor.state import QuantState


# ---- elementary errors ---------------------------------------------------------------------

def _pair(x: torch.Tensor, y) -> tuple:
    if isinstance(y, QuantState):
        y = dequantize(y)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x.double(), y.double()


def mse(x: torch.Tensor, y) -> float:
    """Mean squared error between ``x`` and ``y`` (a tensor or a QuantState)."""
    x, y = _pair(x, y)
    return float(((x - y) ** 2).mean())


def mae(x: torch.Tensor, y) -> float:
    """Mean absolute error."""
    x, y = _pair(x, y)
    return float((x - y).abs().mean())


def max_abs_error(x: torch.Tensor, y) -> float:
    """Largest absolute error."""
    x, y = _pair(x, y)
    return float((x - y).abs().max())


def sqnr_db(x: torch.Tensor, y) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σx² / Σ(x-y)²)`` in dB (inf when exact)."""
    x, y = _pair(x, y)
    noise = float(((x - y) ** 2).sum())
    signal = float((x ** 2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def theoretical_sqnr_db(bits: int, signal: str = "uniform", steps: Optional[int] = None) -> float:
    """SQNR of an ideal b-bit uniform quantizer: ``6.02·b`` (uniform input), ``+1.76`` for a sine.

    ``steps`` is the number of quantization intervals spanning the input range (``2**b`` by
    default; a min/max grid whose end points are levels has ``2**b - 1``): ``SQNR = 20·log10(steps)``.
    """
    if bits <= 0:
        raise ValueError(f"bits={bits}: must be positive")
    base = 20 * math.log10(steps if steps is not None else 2 ** bits)
    if signal == "uniform":
        return base
    if signal == "sine":
        return base + 10 * math.log10(1.5)
    raise ValueError(f"signal={signal!r}: expected 'uniform' or 'sine'")


def theoretical_max_error(state: QuantState) -> float:
    """Upper bound of the rounding error of an affine/fp-free state: half its largest step.

    For integer schemes the bound is exact (``max |x - x̂| <= s/2``); for codebook schemes it is
    half the largest gap between neighbouring code values times the largest absmax.
    """
    if state.layout == "gguf":
        raise ValueError("theoretical_max_error is defined for lowbit's own layouts, not GGUF raw blocks")
    scales = state.scales if state.scales is not None else None
    if scales is None:
        from lowbit.tensor.functional import _scales

        scales = _scales(state)
    smax = float(scales.float().abs().max()) if scales.numel() else 0.0
    if state.code is not None:
        c = torch.sort(state.code.float()).values
        return 0.5 * float((c[1:] - c[:-1]).max()) * smax
    if state.scheme.startswith("fp8"):
        raise ValueError("fp8 has a relative, not absolute, error bound")
    return 0.5 * smax


def error_report(x: torch.Tensor, state: QuantState) -> Dict[str, float]:
    """MSE, MAE, max error, SQNR and storage of one quantized tensor."""
    y = dequantize(state)
    return {
        "mse": mse(x, y), "mae": mae(x, y), "max_error": max_abs_error(x, y), "sqnr_db": sqnr_db(x, y),
        "bits_per_element": state.bits_per_element, "bytes_per_element": state.nbytes / max(state.numel, 1),
    }


# ---- studies -------------------------------------------------------------------------------

def outlier_impact(x: torch.Tensor, scheme: str = "int8", n_outliers: int = 8, magnitude: float = 20.0,
                   seed: int = 0, **granularity) -> Dict[str, float]:
    """Error of the *normal* elements with and without ``n_outliers`` injected outliers.

    Outliers inflate their block's scale, so every other element of the block loses precision:
    ``ratio`` is the MSE on the untouched elements with outliers over without.
    """
    g = torch.Generator().manual_seed(seed)
    flat = x.reshape(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:n_outliers]
    xo = flat.clone()
    xo[idx] = magnitude * flat.abs().max() * torch.sign(torch.randn(n_outliers, generator=g))
    xo = xo.reshape(x.shape)
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[idx] = False
    clean = dequantize(quantize_tensor(x, scheme, **granularity)).reshape(-1)
    dirty = dequantize(quantize_tensor(xo, scheme, **granularity)).reshape(-1)
    m_clean = float(((clean - flat)[mask].double() ** 2).mean())
    m_dirty = float(((dirty - flat)[mask].double() ** 2).mean())
    return {"mse_without": m_clean, "mse_with": m_dirty, "ratio": m_dirty / m_clean if m_clean else math.inf}


def scale_sensitivity(x: torch.Tensor, bits: int = 4, factors: Sequence[float] = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25),
                      group_size: int = 64) -> List[Dict[str, float]]:
    """MSE of symmetric b-bit group quantization when every absmax scale is multiplied by ``factor``.

    ``factor < 1`` clips the largest values and refines the grid; the best factor is usually below 1,
    which is why clipping searches (AWQ, GPTQ's grid search) pay off.
    """
    ref = quantize_tensor(x, f"int{bits}", group_size=group_size)
    r, k = ref.scales.shape[0], x.shape[-1]
    v = x.reshape(r, k).float()
    out = []
    for f in factors:
        s = (ref.scales * f).repeat_interleave(group_size, dim=1)[:, :k]
        z = torch.tensor(float(affine.implicit_zero(bits)))
        q = affine.quantize_affine(v, s, z, bits)
        y = affine.dequantize_affine(q, s, z)
        out.append({"factor": f, "mse": mse(v, y)})
    return out


def compare_bits(x: torch.Tensor, bits: Iterable[int] = (2, 3, 4, 8), symmetric: bool = True,
                 **granularity) -> List[Dict[str, float]]:
    """One row per bit width: error metrics plus the theoretical uniform SQNR for reference."""
    rows = []
    for b in bits:
        st = quantize_tensor(x, f"int{b}" if symmetric else f"int{b}_asym", **granularity)
        rows.append({"bits": b, **error_report(x, st), "theoretical_sqnr_db": theoretical_sqnr_db(b)})
    return rows


def compare_granularity(x: torch.Tensor, scheme: str = "int4",
                        group_sizes: Sequence[int] = (128, 64, 32)) -> List[Dict[str, float]]:
    """Per-tensor vs per-channel vs per-group error of one scheme on a 2-D weight."""
    variants = [("per-tensor", {"block_size": None}), ("per-channel", {"axis": 0})]
    variants += [(f"group {g}", {"group_size": g}) for g in group_sizes]
    return [{"granularity": name, **error_report(x, quantize_tensor(x, scheme, **kw))} for name, kw in variants]


def accuracy_retention(quantized: float, reference: float, higher_is_better: bool = True) -> float:
    """Fraction of the reference metric kept: ``q/ref`` (accuracy) or ``ref/q`` (perplexity, loss)."""
    if reference == 0 or quantized == 0:
        raise ValueError("accuracy_retention needs non-zero metrics")
    return quantized / reference if higher_is_better else reference / quantized


# ---- synthetic weights ---------------------------------------------------------------------

def synthetic(kind: str, shape=(1024, 1024), seed: int = 0, outlier_fraction: float = 0.001,
              outlier_scale: float = 10.0) -> torch.Tensor:
    """Synthetic weights: ``gaussian``, ``uniform``, ``laplace`` (heavy tails), ``outliers``
    (gaussian with a fraction of values scaled by ``outlier_scale``) or ``multichannel``
    (rows with log-uniform scales over two decades, like real linear layers)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(*shape, generator=g)
    if kind == "uniform":
        return torch.rand(*shape, generator=g) * 2 - 1
    if kind == "laplace":
        u = torch.rand(*shape, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "outliers":
        x = torch.randn(*shape, generator=g)
        mask = torch.rand(*shape, generator=g) < outlier_fraction
        return torch.where(mask, x * outlier_scale, x)
    if kind == "multichannel":
        x = torch.randn(*shape, generator=g)
        scales = 10 ** (torch.rand(shape[0], 1, generator=g) * 2 - 1)
        return x * scales
    raise ValueError(f"unknown synthetic kind {kind!r}; expected gaussian, uniform, laplace, outliers, multichannel")


SYNTHETIC_KINDS = ("gaussian", "uniform", "laplace", "outliers", "multichannel")
