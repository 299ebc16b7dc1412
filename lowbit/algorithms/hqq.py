"""HQQ: Half-Quadratic Quantization, data-free.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). The
quantization parameters minimise a robust ``l_p`` (``p < 1``) norm of the weight error,

    min_{s, z}  || W - s * (Q(W; s, z) - z) ||_p^p ,

which half-quadratic splitting turns into alternating closed-form steps with an auxiliary error
variable ``W_e`` (the outliers the grid is allowed to miss):

    W_e  <- shrink_p(W - W_r, beta)                       (generalised soft-thresholding)
    z    <- mean(Q - (W - W_e) / s)                        (zero point, as in HQQ)
    s    <- least squares of (W - W_e) on (Q - z)          (scale; ``optimize_scale=True``, off by default:
                                                           it measured worse on SmolLM2)
    beta <- kappa * beta

Each group keeps the iterate with the lowest ``l_p`` error. lowbit stores integer zero points
(``uint8``), so the final zero is rounded and the scale re-solved for it; ``sym=True`` keeps the
implicit zero ``2**(b-1)`` and optimises the scale alone.

Example::

    >>> st = hqq_quantize(torch.randn(64, 576), bits=4, group_size=64, sym=False)
    >>> lowbit.dequantize(st).shape
    torch.Size([64, 576])
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lowbit.algorithms.grid import AffineGrid, check_bits, to_state


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft-thresholding, HQQ's ``shrink_op``)."""
    if p == 1.0:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - (1.0 / beta) * ax.clamp_min(1e-12).pow(p - 1.0))


def lp_error(w: torch.Tensor, w_hat: torch.Tensor, p: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-group ``sum |w - w_hat|^p`` over the last dim (padding masked out)."""
    e = (w - w_hat).abs_().pow_(p)
    if mask is not None:
        e = e * mask
    return e.sum(-1)


def _grouped(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    R, K = weight.shape
    g = K if group_size in (-1, None) else group_size
    if not isinstance(g, int) or g <= 0:
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or -1")
    pad = (-K) % g
    w = weight.float()
    if not pad:  # no padding: no mask (the optimisation skips the multiplications)
        return w.reshape(R, -1, g), None, g
    mask = torch.ones(R, K + pad, device=weight.device)
    w = torch.cat([w, w[:, -1:].expand(R, pad)], 1)
    mask[:, K:] = 0
    return w.reshape(R, -1, g), mask.reshape(R, -1, g), g


def hqq_optimize(w: torch.Tensor, mask: Optional[torch.Tensor], grid: AffineGrid, *, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, iters: int = 20, optimize_scale: bool = True,
                 early_stop: float = 0.0):
    """Half-quadratic optimisation of per-group ``(scale, zero)`` for ``w [R, G, g]`` (all groups at once).

    ``mask`` ``[R, G, g]`` marks real weights (padding 0), or None when there is no padding.
    ``early_stop``: stop once an iteration lowers the total kept ``l_p`` error by less than this
    fraction (0: always ``iters`` iterations).
    Returns ``(scale, zero, history)``: parameters ``[R, G]`` (zero integer-valued) and the total
    ``l_p`` error of the kept parameters after each iteration (non-increasing).
    """
    def m(x):
        return x if mask is None else x * mask

    scale, zero = grid.fit(w, None) if grid.search != "minmax" else grid.params_from_range(w.amin(-1), w.amax(-1))
    best_s, best_z = scale.clone(), zero.clone()
    best = lp_error(w, grid.fake_quant(w, scale, zero), lp_norm, mask)
    history = [float(best.sum())]
    n = mask.sum(-1).clamp_min(1) if mask is not None else float(w.shape[-1])
    for _ in range(iters):
        q = grid.quantize(w, scale, zero)
        w_r = grid.dequantize(q, scale, zero)
        w_e = shrink_lp(w - w_r, beta, lp_norm)
        del w_r
        target = m(w - w_e)
        del w_e
        if not grid.sym:
            zero = m(q - target / scale.unsqueeze(-1)).sum(-1) / n
        if optimize_scale:
            c = m(q - zero.unsqueeze(-1))
            den = c.square().sum(-1)
            s_new = (c * target).sum(-1) / den.clamp_min(1e-30)
            scale = torch.where((den > 0) & (s_new > 0), s_new, scale)
        del q, target
        beta *= kappa
        # candidate with the zero rounded to an integer (what lowbit stores) and its LS scale
        z_int = zero.round().clamp(0, grid.maxq) if not grid.sym else zero
        c2 = m(grid.quantize(w, scale, z_int) - z_int.unsqueeze(-1))
        den2 = c2.square().sum(-1)
        s2 = torch.where(den2 > 0, (c2 * w).sum(-1) / den2.clamp_min(1e-30), scale)
        s2 = torch.where(s2 > 0, s2, scale)
        del c2
        err = lp_error(w, grid.fake_quant(w, s2, z_int), lp_norm, mask)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s2, best_s)
        best_z = torch.where(better, z_int, best_z)
        history.append(float(best.sum()))
        if early_stop > 0 and history[-2] - history[-1] < early_stop * history[-2]:
            break
    return best_s, best_z, history


def hqq_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 64, sym: bool = False, *,
                 lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                 optimize_scale: bool = False, init: str = "minmax", early_stop: float = 0.0):
    """HQQ quantization of ``weight [out, in]`` -> group-layout ``QuantState`` (no data needed).

    ``init``: ``"minmax"`` (as HQQ) or ``"mse"`` (start from the shrink-factor search).
    ``early_stop``: relative improvement of the total ``l_p`` error under which the iterations stop.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    check_bits(bits)
    if init not in ("minmax", "mse"):
        raise ValueError(f"init={init!r}: expected 'minmax' or 'mse'")
    if not 0 < lp_norm <= 1:
        raise ValueError(f"lp_norm={lp_norm!r}: expected 0 < p <= 1")
    R, K = weight.shape
    w, mask, g = _grouped(weight.detach(), group_size)
    grid = AffineGrid(bits=bits, sym=sym, search=init, refine=0)
    scale, zero, _ = hqq_optimize(w, mask, grid, lp_norm=lp_norm, beta=beta, kappa=kappa, iters=iters,
                                  optimize_scale=optimize_scale, early_stop=early_stop)
    codes = grid.quantize(w, scale, zero).reshape(R, -1)[:, :K].to(torch.uint8)
    return to_state(codes, scale, zero, bits, g, sym, dtype=weight.dtype)
