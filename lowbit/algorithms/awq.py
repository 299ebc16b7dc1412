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

from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Union

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
               joint: bool = False, refine: int = 0,
               gguf_type: Optional[Union[str, Sequence[str]]] = None,
               share: Optional[Callable[[int, Callable[[int], float]], List[float]]] = None) -> AWQResult:
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
    the format's). K-quants (``"Q2_K"`` ... ``"Q6_K"``; llama.cpp's 32-block fallback type when
    ``in`` is not a multiple of 256): every candidate ``s`` is scored with llama.cpp's reference
    K-quant round trip of ``W diag(s)`` (its scale/min search, the 4/6-bit sub-block scales and the
    fp16 super-block scales included), and the clip search picks, per row and super-block, the
    sub-block range shrink whose round trip has the smallest output error (the unshrunk one, i.e.
    llama.cpp's own rounding, is a candidate; the clipped weight is kept only where it lowers the
    weight's exact output error). A sequence gives one type per weight (linears sharing an input
    but written with different types, e.g. llama.cpp's recipes giving ``v_proj`` a higher type).
    ``joint``: score every ``alpha`` with the clip search applied (slower, the exact joint optimum
    over the grid) instead of with plain min/max rounding.
    ``share(n, loss)``: returns ``[loss(1), ..., loss(n)]`` computed another way (a data-parallel run
    spreads the grid points over its ranks, :func:`lowbit.model.distributed.shared_values`); each value
    must be ``loss(i)`` itself, so the choice does not depend on who computed it.
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
    ktypes: List[Optional[str]] = [None] * len(Ws)  # per weight: its K-quant type, or None (32-block grids)
    if gguf_type is not None:  # the exact llama.cpp block grid
        from lowbit.algorithms.grid import GGUFGrid
        from lowbit.formats.kquants import is_kquant, kquant_fallback

        types = [gguf_type] * len(Ws) if isinstance(gguf_type, str) else [str(t) for t in gguf_type]
        if len(types) != len(Ws):
            raise ValueError(f"gguf_type lists {len(types)} types for {len(Ws)} weights")
        types = [kquant_fallback(t, K) if is_kquant(t) else t for t in types]
        if K % 32 or "F16" in types:
            raise ValueError(f"GGUF {gguf_type} blocks need in_features divisible by 32, got {K}")
        ktypes = [t if is_kquant(t) else None for t in types]
        rtns = [None if k else GGUFGrid(qtype=t, search="minmax", refine=0) for k, t in zip(ktypes, types)]
        clips = [None if k else GGUFGrid(qtype=t, search="mse" if clip else "minmax", n_grid=clip_grid,
                                         max_shrink=max_shrink, refine=0, two_sided=two_sided if clip else 0)
                 for k, t in zip(ktypes, types)]
        g = 32
    else:
        rtn = AffineGrid(bits=bits, sym=sym, search="minmax")
        clip_grid_obj = AffineGrid(bits=bits, sym=sym, search="mse" if clip else "minmax", n_grid=clip_grid,
                                   max_shrink=max_shrink, refine=refine if clip else 0,
                                   two_sided=two_sided if clip else 0)
        rtns, clips = [rtn] * len(Ws), [clip_grid_obj] * len(Ws)
    bounds = columns(K, g).bounds()

    def fitted(s: torch.Tensor, clipped: bool):
        """Quantize ``W diag(s)`` (the clip search's grids when ``clipped``); the output error in the
        original units."""
        grids = clips if clipped else rtns
        Hs = S_blocks = None
        if clipped and (any(ktypes) or any(o is not None and o.search != "minmax" for o in grids)):
            Hs = H / (s.unsqueeze(0) * s.unsqueeze(1))  # inputs x / s: H' = H / (s s^T)
            S_blocks = [Hs[a:b, a:b] for a, b in bounds]  # one block per group
        total = torch.zeros((), device=dev, dtype=torch.float64)
        out = []
        for w, grid_obj, kt in zip(Ws, grids, ktypes):
            if kt is not None:  # llama.cpp's K-quant round trip (sub-block scales/mins quantized as stored)
                st, ws_hat = _kquant_roundtrip(w * s, kt, Hs if clipped and clip else None, max_shrink, clip_grid)
                w_hat = ws_hat / s
                err = _output_error(w - w_hat, H).double()
                if clipped and clip:  # the clip search's choice, kept only where the weight's exact error drops
                    st0, ws0 = _kquant_roundtrip(w * s, kt, None, max_shrink, clip_grid)
                    err0 = _output_error(w - ws0 / s, H).double()
                    if err0 <= err:
                        st, w_hat, err = st0, ws0 / s, err0
                total += err
                out.append((st, None, None, w_hat))
                continue
            c, sc, z = quantize_groups(w * s, grid_obj, g, S_blocks if grid_obj.search != "minmax" else None)
            w_hat = dequantize_groups(c, sc, z, g) / s
            total += _output_error(w - w_hat, H).double()
            out.append((c, sc, z, w_hat))
        return float(total), out

    search_clipped = joint

    if duo_scaling:
        w_cat = torch.cat(Ws, 0)
        w_mean = _weight_group_mean(w_cat, g).clamp_min(1e-8)
        if tie is not None:
            wm = torch.zeros(n_small, device=dev).index_add_(0, tie, w_mean)
            w_mean = (wm / torch.zeros(n_small, device=dev).index_add_(0, tie, torch.ones_like(w_mean)))[tie]
    ones = torch.ones(K, device=dev)
    losses = [fitted(ones, search_clipped)[0]]
    best_alpha, best_s, best_loss = 0.0, ones, losses[0]
    if scale_search:
        def scales_at(i: int) -> torch.Tensor:
            alpha = i / n_grid
            s = x_mean.pow(alpha) / w_mean.pow(1 - alpha) if duo_scaling else x_mean.pow(alpha)
            return (s / (s.max() * s.min()).sqrt()).clamp_min(1e-4)

        grid_losses = share(n_grid - 1, lambda i: fitted(scales_at(i), search_clipped)[0]) if share is not None \
            else [fitted(scales_at(i), search_clipped)[0] for i in range(1, n_grid)]
        best_i = 0
        for i, loss in enumerate(grid_losses, start=1):
            losses.append(loss)
            if loss < best_loss:
                best_i, best_loss = i, loss
        if best_i:
            best_alpha, best_s = best_i / n_grid, scales_at(best_i)
    s = best_s

    # clip search on W diag(s) with the chosen scales
    total, out = fitted(s, True)
    if gguf_type is not None:
        dt = weights[0].dtype
        states = [replace(c, dtype=dt) if kt is not None else grid_obj.gguf_state(c, sc, z, dtype=dt)
                  for (c, sc, z, _), grid_obj, kt in zip(out, clips, ktypes)]
    else:
        states = [to_state(c, sc, z, bits, g, sym, dtype=weights[0].dtype) for c, sc, z, _ in out]
    eff = [w_hat for _, _, _, w_hat in out]
    tied = None
    if tie is not None:
        tied = torch.ones(n_small, device=dev).index_copy_(0, tie, s)
    return AWQResult(input_scales=s, states=states, alpha=best_alpha, losses=losses, loss=float(total),
                     effective_weights=eff, tied_scales=tied)


def _kquant_roundtrip(x: torch.Tensor, qtype: str, Hs: Optional[torch.Tensor], max_shrink: float, clip_grid: int):
    """``(QuantState, values)`` of ``x [R, K]`` (K % 256 == 0) on the K-quant grid ``qtype``.

    ``Hs`` None: llama.cpp's reference quantization (byte-identical with ``llama-quantize``). Else the clip
    search: candidates shrink every sub-block's range ``[min(x, 0), max(x, 0)]`` by ``1 - max_shrink * i /
    clip_grid`` before llama.cpp's scale/min search, the codes are then the nearest ones on the stored grid
    for the unclipped values, and every (row, super-block) keeps the candidate with the smallest
    ``e Hs_b e^T`` (``Hs_b`` the super-block's diagonal block of the input Hessian in ``x``'s units).
    """
    from lowbit.algorithms.grid import KQuantGrid
    from lowbit.formats import kquants as kq
    from lowbit.tensor.state import QuantState

    t = kq.kquant_type(qtype)
    dev = x.device
    xc = x.detach().float().cpu()
    R, K = xc.shape
    codes, p = kq.quantize_params(xc, t)
    if Hs is not None and clip_grid > 1:
        nsb = K // kq.QK_K
        Hb = torch.stack([Hs[a:a + kq.QK_K, a:a + kq.QK_K] for a in range(0, K, kq.QK_K)]).float().cpu()

        def sb_loss(vals):
            e = (xc - vals).reshape(R, nsb, kq.QK_K)
            return torch.einsum("rbi,bij,rbj->rb", e, Hb, e)

        best = sb_loss(kq.decode_codes(codes, p, t))
        grid = KQuantGrid(t.name)
        xs = xc.reshape(R, K // t.sub, t.sub)
        lo, hi = xs.amin(-1, keepdim=True).clamp_max(0), xs.amax(-1, keepdim=True).clamp_min(0)
        for i in range(1, clip_grid):
            f = 1.0 - max_shrink * i / clip_grid
            xcl = torch.minimum(torch.maximum(xs, lo * f), hi * f).reshape(R, K)
            _, pc = kq.quantize_params(xcl, t)
            step, off = kq.subblock_scale_min(pc, t)
            step = step.repeat_interleave(t.sub, 1)
            off = None if off is None else off.repeat_interleave(t.sub, 1)
            cc = grid.quantize_column(xc, step, off).to(torch.uint8)
            loss = sb_loss(kq.decode_codes(cc, pc, t))
            better = loss < best
            if not bool(better.any()):
                continue
            best = torch.where(better, loss, best)
            codes = torch.where(better.repeat_interleave(kq.QK_K, 1), cc, codes)
            per_sub = better.repeat_interleave(t.n_sub, 1)
            p = kq.KParams(torch.where(better, pc.d, p.d),
                           None if p.dmin is None else torch.where(better, pc.dmin, p.dmin),
                           torch.where(per_sub, pc.sc, p.sc), None if p.m is None else torch.where(per_sub, pc.m, p.m))
    raw = kq.pack_kblocks(codes, p, t)
    st = QuantState(scheme=t.name.lower(), bits=t.bits, shape=(R, K), dtype=x.dtype, layout="gguf",
                    block_size=kq.QK_K, data=raw.to(dev))
    return st, kq.dequantize_rows(raw, t).to(dev)


def _weight_group_mean(w: torch.Tensor, g: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: |w| normalised by its group's max, averaged over rows -> ``[in]``."""
    R, K = w.shape
    out = torch.empty_like(w)
    for a, b in columns(K, g).bounds():
        blk = w[:, a:b].abs()
        out[:, a:b] = blk / blk.amax(-1, keepdim=True).clamp_min(1e-12)
    return out.mean(0)


__all__ = ["awq_search", "AWQResult"]
