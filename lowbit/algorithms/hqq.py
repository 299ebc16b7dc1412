"""HQQ: Half-Quadratic Quantization, data-free.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). The zero
points minimise a robust ``l_p`` (``p < 1``) norm of the weight error with the scale held fixed,

    min_z  || W - (Q(W; s, z) - z) / s ||_p^p        (``s`` here is the inverse step, as in HQQ),

which half-quadratic splitting turns into alternating closed-form steps with an auxiliary error
variable ``W_e`` (the outliers the grid is allowed to miss):

    Q    <- clamp(round(W * s + z), 0, 2**b - 1)
    W_e  <- shrink_p(W - (Q - z) / s, beta)                (generalised soft-thresholding)
    z    <- mean over the group of (Q - (W - W_e) * s)
    beta <- kappa * beta

As in the hqq package's default solver (hqq 0.2.8, ``optimize_weights_proximal_legacy``), every
group of a layer is solved at once, in float32, starting from the group's min/max range (not
widened to contain 0) with the zero rounded for 4 bits, and the iterations stop at the first one
whose mean absolute weight error over the whole layer does not decrease (the zero updated in that
iteration is kept, as there). Defaults: ``p = 0.7``, ``beta = 10``, 20 iterations, and ``kappa = 1``:
hqq 0.2.8's default solver takes ``kappa = 1.01`` but never applies it (beta stays 10), and the
codes, steps and zeros here are bit-identical to that solver's on CPU (tests/test_hqq.py).

lowbit stores integer zero points (``uint8``), where HQQ keeps float ones, and the float zero is
what HQQ's gain rests on: on SmolLM2 int4 g64, rounding it (or re-fitting the step for the rounded
zero) measured no better than round-to-nearest (bench/results/hqq_compare.md). The integer zero is
chosen per group (``zero_rounding``; the default since issue 18's scale3 work is ``"float"``, HQQ's own
storage: the float zero kept, float32 zero points, no integer form): ``"round"`` rounds the zero and keeps the step;
``"cover"`` takes the integer zero (floor or ceiling) and smallest step whose grid covers the float
grid's range; ``"refit"`` rounds it and re-fits the step by least squares; ``"best"`` keeps, of
lowbit's min/max grid and those three, the one of lowest ``l_p`` error. Perplexity on SmolLM2 (8
windows): round 34.33, best 35.40, refit 35.41, lowbit's previous HQQ 34.44, RTN 34.34. ``sym=True`` keeps the implicit zero
``2**(b-1)`` and updates the step instead (the least-squares fit of ``W - W_e`` on the codes).

Implementation notes: ``W_e`` is exactly zero wherever ``|W - W_r|**(2-p) <= 1/beta``; when no
weight of the layer is above that threshold (the usual case: the threshold is about 0.17 at
``beta = 10``), the shrinkage (a ``pow`` per weight) is skipped, with bit-identical results.
Degenerate groups (max == min) get step 1 instead of hqq's half-precision guards (inverse step 1
for ranges <= 1e-4, inverse step <= 2e4), so tiny-magnitude layers keep their resolution.

Example::

    >>> st = hqq_quantize(torch.randn(64, 576), bits=4, group_size=64, sym=False)
    >>> lowbit.dequantize(st).shape
    torch.Size([64, 576])
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from lowbit.algorithms.grid import AffineGrid, check_bits, columns, to_state

ZERO_ROUNDINGS = ("best", "cover", "round", "refit", "float")
# storage of zero_rounding="float"'s zero points: float32, as the hqq package keeps them on the CPU (WikiText-2,
# 8 windows: float32 32.23 = the hqq package's; float16 32.42; bfloat16 33.20; bench/results/hqq_float_zero_dtype.jsonl)
FLOAT_ZERO_DTYPE = torch.float32


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft-thresholding, HQQ's ``shrink_op``)."""
    if p == 1.0:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - (1.0 / beta) * ax.clamp_min(1e-12).pow(p - 1.0))


def shrink_threshold(beta: float, p: float) -> float:
    """``|x|`` at or below which :func:`shrink_lp` returns exactly 0: ``beta ** (-1 / (2 - p))``."""
    return beta ** (-1.0 / (2.0 - p))


def lp_error(w: torch.Tensor, w_hat: torch.Tensor, p: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-group ``sum |w - w_hat|^p`` over the last dim (padding masked out)."""
    e = (w - w_hat).abs_().pow_(p)
    if mask is not None:
        e = e * mask
    return e.sum(-1)


def _grouped(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
    R, K = weight.shape
    g = columns(K, group_size).group  # validated and resolved once (-1/None: one group per row)
    pad = (-K) % g
    w = weight.float()
    if not pad:  # no padding: no mask (the optimisation skips the multiplications)
        return w.reshape(R, -1, g), None, g
    mask = torch.ones(R, K + pad, device=weight.device)
    w = torch.cat([w, w[:, -1:].expand(R, pad)], 1)
    mask[:, K:] = 0
    return w.reshape(R, -1, g), mask.reshape(R, -1, g), g


def _stop(early_stop: Union[bool, float], history: list) -> bool:
    """The stopping rule after an iteration's error was appended to ``history``."""
    if early_stop is None or (early_stop is not True and float(early_stop) <= 0):  # False / 0: never
        return False
    if early_stop is True:  # hqq's rule: the error did not decrease below the best so far
        return len(history) > 1 and not history[-1] < min(history[:-1])
    return len(history) > 1 and history[-2] - history[-1] < float(early_stop) * history[-2]


def _init_range(w: torch.Tensor, bits: int, round_zero: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """HQQ's start: inverse step ``(2**b - 1) / (max - min)`` and zero ``-min * s`` per group."""
    lo, hi = w.amin(-1), w.amax(-1)
    s = ((1 << bits) - 1) / (hi - lo)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))  # degenerate group: step 1
    z = -lo * s
    return s, (torch.round(z) if round_zero else z)


def hqq_optimize(w: torch.Tensor, mask: Optional[torch.Tensor], grid: AffineGrid, *, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.0, iters: int = 20, optimize_scale: bool = False,
                 early_stop: Union[bool, float] = True, init: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 round_zero: Optional[bool] = None):
    """Half-quadratic optimisation of per-group ``(inverse step, zero)`` for ``w [R, G, g]`` (all groups at once).

    ``mask`` ``[R, G, g]`` marks real weights (padding 0), or None when there is no padding.
    ``early_stop``: True (hqq's rule: stop at the first iteration whose mean absolute error over the
    whole layer is not below the best so far), a float ``f`` (stop once an iteration lowers it by
    less than the fraction ``f``), or False / 0 (always ``iters`` iterations).
    ``optimize_scale``: also re-fit the step by least squares on ``W - W_e`` each iteration (not in
    HQQ; always on for ``grid.sym``, whose zero is fixed). ``init``: ``(inverse step, zero)`` to
    start from (default: the group's min/max, as HQQ). ``round_zero``: round the initial zero
    (default: for 4 bits, as hqq's ``BaseQuantizeConfig``).
    Returns ``(inv_scale, zero, history)``: float parameters ``[R, G]`` (codes are
    ``clamp(round(w * inv_scale + zero))``, weights ``(codes - zero) / inv_scale``; zero is not
    rounded unless ``grid.sym``) and the layer's mean ``|w - w_r|`` at each iteration.
    """
    maxq = grid.maxq
    if grid.sym:
        scale, zero = grid.params_from_range(w.amin(-1), w.amax(-1))
        s, z = 1.0 / scale, zero
        optimize_scale = True
    elif init is not None:
        s, z = init
    else:
        s, z = _init_range(w, grid.bits, grid.bits == 4 if round_zero is None else round_zero)
    s, z = s.unsqueeze(-1).float(), z.unsqueeze(-1).float()
    n = float(w.shape[-1]) if mask is None else mask.sum(-1, keepdim=True).clamp_min(1)
    n_all = float(w.numel()) if mask is None else float(mask.sum())
    thr = shrink_threshold(beta, lp_norm) * (1 - 1e-4)  # margin: below it the shrinkage is 0 by far
    history = []
    for _ in range(iters):
        ws = w * s
        q = torch.round(ws + z).clamp_(0, maxq)
        w_r = (q - z) / s
        d = w - w_r
        a = d.abs()
        if mask is not None:
            a.mul_(mask)
        history.append(float(a.sum() / n_all))
        if float(a.max()) > thr:  # some weights are beyond the threshold: the full shrinkage
            target = w - shrink_lp(d, beta, lp_norm)
            ws = target * s
        else:  # W_e == 0 exactly: target == w (and ws is already w * s)
            target = w
        del a, d, w_r
        if not grid.sym:
            e = q - ws
            if mask is not None:
                e.mul_(mask)
            z = e.sum(-1, keepdim=True) / n if mask is not None else e.mean(-1, keepdim=True)
            del e
        if optimize_scale:  # least-squares step for the current zero, inverted
            c = q - z
            if mask is not None:
                c.mul_(mask)
            num, den = c.square().sum(-1, keepdim=True), (c * target).sum(-1, keepdim=True)
            s = torch.where((num > 0) & (den > 0), num / den.clamp_min(1e-30), s)
            del c
        del q, ws, target
        beta *= kappa
        if _stop(early_stop, history):
            break
    return s.squeeze(-1), z.squeeze(-1), history


def _cover(lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer zero and the smallest step whose grid ``(k - z) * t``, ``k = 0..maxq``, covers ``[lo, hi]``.

    The zero is the floor or the ceiling of the float zero ``-lo / (hi - lo) * maxq``, whichever needs
    the smaller step; a range on one side of 0 gets zero 0 (or ``maxq``).
    """
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    zf = (-lo / (hi - lo) * maxq).nan_to_num_(0.0).clamp_(0, maxq)
    best_t = best_z = None
    for zi in (zf.floor(), zf.ceil()):
        t = torch.maximum(torch.where(zi > 0, -lo / zi, torch.where(lo < 0, math.inf, 0.0)),
                          torch.where(zi < maxq, hi / (maxq - zi), torch.where(hi > 0, math.inf, 0.0)))
        if best_t is None:
            best_t, best_z = t, zi
        else:
            better = t < best_t
            best_t, best_z = torch.where(better, t, best_t), torch.where(better, zi, best_z)
    best_t = torch.where(torch.isfinite(best_t) & (best_t > 0), best_t, torch.ones_like(best_t))
    return best_t, best_z


def _best_candidate(w, mask, s, z, maxq, lp_norm):
    grid = AffineGrid(bits=int(math.log2(maxq + 1)), sym=False, search="minmax", refine=0)
    cands = [grid.params_from_range(w.amin(-1), w.amax(-1))]  # lowbit's RTN grid (0 in the range)
    for how in ("cover", "round", "refit"):
        _, step, zi = _integer_zero(w, mask, s, z, maxq, how, lp_norm)
        cands.append((step, zi))
    best = best_s = best_z = None
    for step, zi in cands:
        err = lp_error(w, grid.fake_quant(w, step, zi), lp_norm, mask)
        if best is None:
            best, best_s, best_z = err, step, zi
        else:
            b = err < best
            best, best_s, best_z = torch.where(b, err, best), torch.where(b, step, best_s), torch.where(b, zi, best_z)
    return grid.quantize(w, best_s, best_z), best_s, best_z


def _integer_zero(w: torch.Tensor, mask: Optional[torch.Tensor], s: torch.Tensor, z: torch.Tensor, maxq: int,
                  zero_rounding: str, lp_norm: float = 0.7) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, step and integer zero for HQQ's float ``(inverse step s, zero z)`` ``[R, G]``."""
    if zero_rounding == "best":  # per group, the candidate of lowest l_p error (the min/max grid included)
        return _best_candidate(w, mask, s, z, maxq, lp_norm)
    if zero_rounding == "cover":  # the float grid's range [-z / s, (maxq - z) / s], covered with an integer zero
        step, zi = _cover(-z / s, (maxq - z) / s, maxq)
        q = torch.round(w / step.unsqueeze(-1) + zi.unsqueeze(-1)).clamp_(0, maxq)
        return q, step, zi
    zi = z.round().clamp_(0, maxq).unsqueeze(-1)
    s = s.unsqueeze(-1)
    q = torch.round(w * s + zi).clamp_(0, maxq)
    step = 1.0 / s
    if zero_rounding == "refit":  # least-squares step for the integer zero and these codes; codes again
        c = q - zi
        if mask is not None:
            c.mul_(mask)
        den, num = c.square().sum(-1, keepdim=True), (c * w).sum(-1, keepdim=True)
        ls = num / den.clamp_min(1e-30)
        step = torch.where((den > 0) & (ls > 0) & torch.isfinite(ls), ls, step)
        q = torch.round(w / step + zi).clamp_(0, maxq)
    return q, step.squeeze(-1), zi.squeeze(-1)


def _float_zero_state(w, s, z, maxq, bits, g, R, K, dtype):
    """Codes ``clamp(round(W s + z))`` for HQQ's float zero, stored as :data:`FLOAT_ZERO_DTYPE` zero points (the
    zero rounded to that dtype first, so that the codes are those of the stored zero)."""
    from lowbit.tensor.functional import affine_state

    zf = z.to(FLOAT_ZERO_DTYPE)
    codes = torch.round(w * s.unsqueeze(-1) + zf.float().unsqueeze(-1)).clamp_(0, maxq)
    codes = codes.reshape(R, -1)[:, :K].to(torch.uint8)
    step = (1.0 / s).float()
    st = affine_state(codes, step, torch.zeros(step.shape, dtype=torch.uint8), bits, g, dtype=dtype, symmetric=False,
                      canonical=True)
    st.zeros = zf.reshape(st.zeros.shape).contiguous()
    return st


def hqq_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 64, sym: bool = False, *,
                 lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.0, iters: int = 20,
                 optimize_scale: bool = False, init: str = "minmax", early_stop: Union[bool, float] = True,
                 zero_rounding: str = "float"):
    """HQQ quantization of ``weight [out, in]`` -> group-layout ``QuantState`` (no data needed).

    ``init``: ``"minmax"`` (as HQQ) or ``"mse"`` (start from the shrink-factor search).
    ``early_stop``: True (hqq's rule, the default), a relative-improvement threshold, or False
    (always ``iters`` iterations); see :func:`hqq_optimize`.
    ``zero_rounding``: how HQQ's float zero becomes lowbit's integer one: ``"round"``, ``"cover"``,
    ``"refit"`` or ``"best"`` (see the module docstring); ``"float"`` keeps it as HQQ does, stored as float32 zero
    points beside the fp32 steps (a group state whose ``zeros`` are float32: it dequantizes like any group state,
    but has no integer zero-point form, so GPTQ / compressed-tensors exports and the fused integer kernels refuse or
    skip it).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    check_bits(bits)
    if init not in ("minmax", "mse"):
        raise ValueError(f"init={init!r}: expected 'minmax' or 'mse'")
    if not 0 < lp_norm <= 1:
        raise ValueError(f"lp_norm={lp_norm!r}: expected 0 < p <= 1")
    if zero_rounding not in ZERO_ROUNDINGS:
        raise ValueError(f"zero_rounding={zero_rounding!r}: expected one of {ZERO_ROUNDINGS}")
    if not (isinstance(iters, int) and iters >= 0):
        raise ValueError(f"iters={iters!r}: expected a non-negative integer")
    if not (beta > 0 and kappa > 0 and math.isfinite(beta) and math.isfinite(kappa)):
        raise ValueError(f"beta={beta!r}, kappa={kappa!r}: expected positive finite numbers")
    R, K = weight.shape
    w, mask, g = _grouped(weight.detach(), group_size)
    grid = AffineGrid(bits=bits, sym=sym, search=init, refine=0)
    start = None
    if init == "mse" and not sym:
        scale, zero = grid.fit(w, None)
        start = (1.0 / scale, zero)
    s, z, _ = hqq_optimize(w, mask, grid, lp_norm=lp_norm, beta=beta, kappa=kappa, iters=iters,
                           optimize_scale=optimize_scale, early_stop=early_stop, init=start)
    if sym:
        step = 1.0 / s
        codes = grid.quantize(w, step, z)
    elif zero_rounding == "float":  # HQQ's own storage: the optimised zero kept fractional
        return _float_zero_state(w, s, z, grid.maxq, bits, g, R, K, weight.dtype)
    else:
        codes, step, z = _integer_zero(w, mask, s, z, grid.maxq, zero_rounding, lp_norm)
    codes = codes.reshape(R, -1)[:, :K].to(torch.uint8)
    return to_state(codes, step, z, bits, g, sym, dtype=weight.dtype)
