"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (MLSys 2024). The input channels that see large activations matter
most; scaling them up before quantization (``W' = W diag(s)``) and the activations down
(``x' = x / s``, folded into the preceding norm or linear) protects them:

* scale search: ``s = s_x^alpha`` (``s_x`` the mean absolute activation per input channel,
  normalised by ``sqrt(max * min)``), ``alpha`` on a grid of ``n_grid`` points in ``[0, 1)``; the
  ``alpha`` with the smallest output error of all the linears that share the input wins.
  ``alpha = 0`` (no scaling, plain round-to-nearest) is one of the points, so the search is never
  worse than it. ``duo_scaling`` uses ``s_x^alpha / s_w^(1-alpha)`` (AutoAWQ).
* clip search: per group, the min/max range shrink that minimises the group's output error
  (asymmetric grids: then the minimum and the maximum shrunk independently, ``two_sided``).

The output error of a linear is measured exactly from the calibration Hessian ``H = X^T X / n``:
``||X W^T - X W_hat^T||^2 / n = tr((W - W_hat) H (W - W_hat)^T)``, so one pass over the
calibration data is enough (no re-running of the layer per candidate).

Example::

    >>> X = torch.randn(4096, 256) * torch.rand(256) * 4
    >>> res = awq_search([torch.randn(64, 256)], X.T @ X / 4096, X.abs().mean(0), bits=4, group_size=64)
    >>> res.input_scales.shape, len(res.states)
    (torch.Size([256]), 1)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from lowbit.algorithms.grid import AffineGrid, columns, dequantize_groups, quantize_groups, to_state


@dataclass
class AWQResult:
    """Output of :func:`awq_search`.

    ``input_scales`` ``s [in]``: the layers' inputs are divided by ``s`` (folded upstream); the
    ``states`` quantize ``W diag(s)``. ``alpha`` is the chosen exponent, ``losses`` the output error
    at every grid point (the first is ``alpha = 0``), ``loss`` the final error after clipping.
    """

    input_scales: torch.Tensor
    states: list
    alpha: float
    losses: List[float] = field(default_factory=list)
    loss: float = 0.0
    effective_weights: list = field(default_factory=list)
    tied_scales: Optional[torch.Tensor] = None


def _output_error(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return ((E @ H) * E).sum()


def awq_search(weights: Sequence[torch.Tensor], H: torch.Tensor, act_absmean: torch.Tensor, bits: int = 4,
               group_size: int = 128, sym: bool = True, *, n_grid: int = 20, duo_scaling: bool = False,
               clip: bool = True, max_shrink: float = 0.5, clip_grid: int = 20,
               scale_search: bool = True, tie: Optional[torch.Tensor] = None, two_sided: int = 1,
               joint: bool = False, refine: int = 0, gguf_type: Optional[str] = None) -> AWQResult:
    """Search the per-input-channel scale shared by ``weights`` (``[out_i, in]`` each, one input).

    ``H = X^T X / n`` and ``act_absmean = mean |x|`` are statistics of the shared input.
    ``scale_search=False`` keeps ``s = 1`` (clip search only, for layers whose input cannot be
    rescaled upstream). ``tie [in]`` (long): input channels that must share a scale, e.g. the
    channels of o_proj fed by one v_proj row repeated over the query heads of a GQA group; the
    result then also carries ``tied_scales`` (one per tie index) to fold into that row.
    ``two_sided``: coordinate passes of the clip search that shrink the minimum and the maximum of
    an asymmetric group independently (see :class:`~lowbit.algorithms.grid.AffineGrid`); the
    default 1 measured SmolLM2 int4 g128 asym 30.07 -> 29.42 (``bench/results/ptq.md``).
    ``gguf_type`` (``"Q4_0"`` ... ``"Q8_0"``): search on llama.cpp's exact block grid (blocks of
    32, fp16 ``d``/``m``); the states are then raw GGUF blocks (``bits``/``group_size``/``sym`` are
    the format's).
    ``joint``: score every ``alpha`` with the clip search applied (slower, the exact joint optimum
    over the grid) instead of with plain min/max rounding.
    """
    if not weights:
        raise ValueError("awq_search needs at least one weight")
    K = weights[0].shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K:
            raise ValueError(f"all weights must be [out, {K}], got {tuple(w.shape)}")
    if tuple(H.shape) != (K, K) or act_absmean.shape != (K,):
        raise ValueError(f"H {tuple(H.shape)} / act_absmean {tuple(act_absmean.shape)} do not match in={K}")
    dev = weights[0].device
    Ws = [w.detach().float() for w in weights]
    H = H.float().to(dev)
    x_mean = act_absmean.float().to(dev).clamp_min(1e-8)
    if tie is not None:
        tie = tie.to(dev).long()
        n_small = int(tie.max()) + 1
        small = torch.zeros(n_small, device=dev).index_add_(0, tie, x_mean)
        small = small / torch.zeros(n_small, device=dev).index_add_(0, tie, torch.ones_like(x_mean))
        x_mean = small[tie]
    g = columns(K, group_size).group  # validated once; -1: one group per row
    if gguf_type is not None:  # the exact llama.cpp block grid
        from lowbit.algorithms.grid import GGUFGrid

        if K % 32:
            raise ValueError(f"GGUF {gguf_type} blocks need in_features divisible by 32, got {K}")
        rtn = GGUFGrid(qtype=gguf_type, search="minmax", refine=0)
        clip_grid_obj = GGUFGrid(qtype=gguf_type, search="mse" if clip else "minmax", n_grid=clip_grid,
                                 max_shrink=max_shrink, refine=0, two_sided=two_sided if clip else 0)
        g, bits, sym = 32, rtn.bits, rtn.sym
    else:
        rtn = AffineGrid(bits=bits, sym=sym, search="minmax")
        clip_grid_obj = AffineGrid(bits=bits, sym=sym, search="mse" if clip else "minmax", n_grid=clip_grid,
                                   max_shrink=max_shrink, refine=refine if clip else 0,
                                   two_sided=two_sided if clip else 0)
    bounds = columns(K, g).bounds()

    def fitted(s: torch.Tensor, grid_obj: AffineGrid):
        """Quantize ``W diag(s)`` on ``grid_obj``; the output error in the original units."""
        S_blocks = None
        if grid_obj.search != "minmax":  # inputs x / s: H' = H / (s s^T), one block per group
            Hs = H / (s.unsqueeze(0) * s.unsqueeze(1))
            S_blocks = [Hs[a:b, a:b] for a, b in bounds]
        total = torch.zeros((), device=dev, dtype=torch.float64)
        out = []
        for w in Ws:
            c, sc, z = quantize_groups(w * s, grid_obj, g, S_blocks)
            w_hat = dequantize_groups(c, sc, z, g) / s
            total += _output_error(w - w_hat, H).double()
            out.append((c, sc, z, w_hat))
        return float(total), out

    search_grid = clip_grid_obj if joint else rtn

    if duo_scaling:
        w_cat = torch.cat(Ws, 0)
        w_mean = _weight_group_mean(w_cat, g).clamp_min(1e-8)
        if tie is not None:
            wm = torch.zeros(n_small, device=dev).index_add_(0, tie, w_mean)
            w_mean = (wm / torch.zeros(n_small, device=dev).index_add_(0, tie, torch.ones_like(w_mean)))[tie]
    ones = torch.ones(K, device=dev)
    losses = [fitted(ones, search_grid)[0]]
    best_alpha, best_s, best_loss = 0.0, ones, losses[0]
    if scale_search:
        for i in range(1, n_grid):
            alpha = i / n_grid
            s = x_mean.pow(alpha) / w_mean.pow(1 - alpha) if duo_scaling else x_mean.pow(alpha)
            s = (s / (s.max() * s.min()).sqrt()).clamp_min(1e-4)
            loss = fitted(s, search_grid)[0]
            losses.append(loss)
            if loss < best_loss:
                best_alpha, best_s, best_loss = alpha, s, loss
    s = best_s

    # clip search on W diag(s) with the chosen scales
    total, out = fitted(s, clip_grid_obj)
    if gguf_type is not None:
        states = [clip_grid_obj.gguf_state(c, sc, z, dtype=weights[0].dtype) for c, sc, z, _ in out]
    else:
        states = [to_state(c, sc, z, bits, g, sym, dtype=weights[0].dtype) for c, sc, z, _ in out]
    eff = [w_hat for _, _, _, w_hat in out]
    tied = None
    if tie is not None:
        tied = torch.ones(n_small, device=dev).index_copy_(0, tie, s)
    return AWQResult(input_scales=s, states=states, alpha=best_alpha, losses=losses, loss=float(total),
                     effective_weights=eff, tied_scales=tied)


def _weight_group_mean(w: torch.Tensor, g: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: |w| normalised by its group's max, averaged over rows -> ``[in]``."""
    R, K = w.shape
    out = torch.empty_like(w)
    for a, b in columns(K, g).bounds():
        blk = w[:, a:b].abs()
        out[:, a:b] = blk / blk.amax(-1, keepdim=True).clamp_min(1e-12)
    return out.mean(0)


__all__ = ["awq_search", "AWQResult"]
