"""Quantization grids for the PTQ algorithms: how a group of weights gets its scale and zero point.

A *grid* maps a group of ``g`` consecutive input columns of each output row to the affine levels
``w = (q - z) * s`` (:mod:`lowbit.formats.affine`). The algorithms (RTN, GPTQ, AWQ, HQQ) only ask
a grid two things: ``fit`` the per-row parameters of one group, and ``quantize`` values against
them. This is what makes GPTQ's quantizer pluggable (an affine int grid here; a GGUF Q4_0 grid
plugs in the same way).

Fitting is either plain min/max (``search="minmax"``) or a search over shrink factors of the
min/max range that minimises a quadratic error, the "MSE grid" of GPTQ's reference code
(Frantar et al., 2022, ``quant.py``: ``mse=True``) generalised to a weighted objective::

    loss_r(p) = e_r S e_r^T,   e_r = w_r - deq(quant(w_r; p * min, p * max))

with ``S`` the identity (plain MSE), a diagonal of per-column importances, or a full ``g x g``
matrix such as a block of the Hessian ``X^T X`` (the layer-output error of that group, used by
AWQ's clip search) or the Schur complement that GPTQ uses (the error left after the columns still
to come have compensated it). A least-squares refinement of the scale with the codes fixed then
polishes the winner.

Example::

    >>> w = torch.randn(64, 256)
    >>> grid = AffineGrid(bits=4, sym=False, search="mse")
    >>> scale, zero = grid.fit(w[:, :128])
    >>> q = grid.quantize(w[:, :128], scale, zero)       # uint8 codes
    >>> w_hat = grid.dequantize(q, scale, zero)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from lowbit.formats import affine
from lowbit.tensor.granularity import Grouping

SEARCHES = ("minmax", "mse")


def columns(in_features: int, group_size, rows: int = 0) -> Grouping:
    """The :class:`~lowbit.tensor.granularity.Grouping` of the input columns of a ``[rows, in_features]``
    weight (``group_size``: positive, ``-1``/None for one group per row, or a Grouping, passed through).

    >>> columns(576, 128).n_groups, columns(576, 128).tail
    (5, 64)
    """
    return Grouping.of_columns(in_features, group_size, rows)


def group_bounds(in_features: int, group_size) -> list:
    """``[(start, stop), ...]`` of the column groups, the last one possibly ragged.

    >>> group_bounds(576, 128)[-1]
    (512, 576)
    """
    return columns(in_features, group_size).bounds()


def check_bits(bits: int) -> None:
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits={bits!r}: expected an integer between 2 and 8 (2, 3, 4 and 8 are the usual ones)")


_FACTORS: dict = {}


def _factors_tensor(factors: list, device: torch.device) -> torch.Tensor:
    """``torch.tensor(factors)`` (float32) on ``device``, cached: a host-to-device copy of a Python list
    waits for the device (a stream sync), and GPTQ fits one group per block of its sweep."""
    key = (tuple(factors), str(device))
    t = _FACTORS.get(key)
    if t is None:
        t = _FACTORS[key] = torch.tensor(factors, dtype=torch.float32, device=device)
    return t


def _bmm_losses(err: torch.Tensor, Ss: list) -> bool:
    """Whether :meth:`AffineGrid.fit_groups` computes the groups' losses with one batched product: on CUDA with a
    ``[g, g]`` objective per group, unless ``LOWBIT_GPTQ_FIT_LOSS=loop`` (one product per group, as before session
    10 and on the CPU, whose recorded outputs are unchanged)."""
    import os

    mode = os.environ.get("LOWBIT_GPTQ_FIT_LOSS", "bmm")
    if mode not in ("bmm", "loop"):
        raise ValueError(f"LOWBIT_GPTQ_FIT_LOSS={mode!r}: expected bmm or loop")
    return mode == "bmm" and err.is_cuda and all(S is not None and S.dim() == 2 for S in Ss)


def group_losses(err: torch.Tensor, Ss: list, bmm: bool = False) -> torch.Tensor:
    """Row losses ``[C, R, G]`` of the groups' errors ``err [G, C, R, g]`` under their objectives ``Ss`` (one
    :func:`quadratic_loss` per group). ``bmm`` (``[g, g]`` objectives): every group's product in one batched GEMM
    (each batch entry the group's own product: checked bit for bit on the H200 against one product per group for 1-11
    groups and 1024-14336 rows, ``bench/dp_bits_probe.py``), then the same elementwise product and row sums."""
    if not bmm:
        return torch.stack([quadratic_loss(err[j].contiguous(), Ss[j]) for j in range(err.shape[0])], -1)
    G, C, R, g = err.shape
    prod = torch.bmm(err.reshape(G, C * R, g), torch.stack(Ss)).view(G, C, R, g)
    return (prod * err).sum(-1).permute(1, 2, 0).contiguous()


def quadratic_loss(err: torch.Tensor, S: Optional[torch.Tensor]) -> torch.Tensor:
    """Row losses ``e_r S e_r^T`` for ``err [..., R, g]``; ``S`` None (identity), ``[g]`` or ``[g, g]``."""
    if S is None:
        return err.square().sum(-1)
    if S.dim() == 1:
        return (err.square() * S).sum(-1)
    return ((err @ S) * err).sum(-1)


@dataclass
class AffineGrid:
    """Integer affine grid of ``bits`` levels per group, symmetric (implicit zero) or asymmetric.

    ``search``: ``"minmax"`` (the range of the group) or ``"mse"`` (shrink-factor search with the
    weighted objective given to :meth:`fit`); ``n_grid`` candidates between 1 and ``1 - max_shrink``;
    ``refine`` least-squares scale updates with the codes fixed. ``two_sided`` (asymmetric grids
    only): after the common shrink, that many coordinate passes shrinking the minimum and the
    maximum independently (each pass keeps the current range as a candidate, so it never loses).
    """

    bits: int = 4
    sym: bool = True
    search: str = "mse"
    n_grid: int = 20
    max_shrink: float = 0.5
    refine: int = 1
    two_sided: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.search not in SEARCHES:
            raise ValueError(f"search={self.search!r}: expected one of {SEARCHES}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink={self.max_shrink!r}: expected a value in [0, 1)")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    # -- the levels ------------------------------------------------------------------------------
    def params_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` as float tensors of the shape of ``xmin`` (zero is integer-valued)."""
        scale, zero = affine.affine_qparams(xmin, xmax, self.bits, self.sym)
        zero = zero.to(torch.float32)
        if zero.dim() == 0:
            zero = zero.to(scale.device).expand_as(scale)
        return scale, zero.to(scale.device)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes (float, integer-valued) of ``w [..., R, n]`` for per-row ``scale``/``zero`` ``[..., R]``."""
        return torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, self.maxq)

    def quantize_column(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes of one column ``w [..., R]`` (GPTQ's inner loop); parameters of the same shape."""
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``(q - z) * s`` with per-row ``scale``/``zero`` ``[..., R]``."""
        return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)

    def fake_quant(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w, scale, zero), scale, zero)

    # -- fitting ---------------------------------------------------------------------------------
    def shrink_factors(self) -> list:
        """The range shrink factors tried by the search (1.0 = plain min/max)."""
        if self.search == "minmax":
            return [1.0]
        return [1.0 - self.max_shrink * i / self.n_grid for i in range(self.n_grid + 1)]

    def candidates(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Candidate ``(scales, zeros)`` ``[C, ...]`` for the groups ``w [..., g]`` (one per shrink factor)."""
        w = w.float()
        xmin, xmax = w.amin(-1), w.amax(-1)
        ps = _factors_tensor(self.shrink_factors(), w.device)
        ps = ps.reshape(-1, *([1] * xmin.dim()))
        return self.params_from_range(xmin * ps, xmax * ps)

    def fit(self, w: torch.Tensor, S: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(scale, zero)`` ``[R]`` for the group ``w [R, g]`` minimising ``e S e^T``.

        ``S`` is None (plain squared error), per-column weights ``[g]`` or a ``[g, g]`` matrix.
        ``w`` may carry more leading dims (``[R, G, g]``: all groups at once); ``mask`` (broadcast
        against ``w``) zeroes padded elements out of the objective.
        """
        w = w.float()
        cs, cz = self.candidates(w)
        if cs.shape[0] == 1:
            return cs[0], cz[0]
        xmin, xmax = w.amin(-1), w.amax(-1)
        ps = _factors_tensor(self.shrink_factors(), w.device)
        ps = ps.reshape(-1, *([1] * xmin.dim()))
        best, idx = self._losses(w, cs, cz, S, mask).min(0)
        p = ps.expand(-1, *xmin.shape).gather(0, idx.unsqueeze(0))[0]
        lo, hi = xmin * p, xmax * p
        scale = cs.gather(0, idx.unsqueeze(0))[0]
        zero = cz.gather(0, idx.unsqueeze(0))[0]
        if self.two_sided and not self.sym:
            for _ in range(self.two_sided):
                for side in (0, 1):
                    cand_lo = torch.cat([lo.unsqueeze(0), xmin * ps]) if side == 0 else lo.unsqueeze(0).expand(
                        ps.shape[0] + 1, *lo.shape)
                    cand_hi = torch.cat([hi.unsqueeze(0), xmax * ps]) if side == 1 else hi.unsqueeze(0).expand(
                        ps.shape[0] + 1, *hi.shape)
                    cs2, cz2 = self.params_from_range(cand_lo, cand_hi)
                    best, idx = self._losses(w, cs2, cz2, S, mask).min(0)  # index 0 = current: never worse
                    lo = cand_lo.gather(0, idx.unsqueeze(0))[0]
                    hi = cand_hi.gather(0, idx.unsqueeze(0))[0]
                    scale = cs2.gather(0, idx.unsqueeze(0))[0]
                    zero = cz2.gather(0, idx.unsqueeze(0))[0]
        for _ in range(self.refine):
            scale, zero, best = self._refine_scale(w, scale, zero, best, S, mask)
        return scale, zero

    def fit_groups(self, w: torch.Tensor, Ss: list) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fit` of ``G`` groups at once: ``w [R, G, g]`` (group ``j`` is ``w[:, j]``), ``Ss`` the groups'
        objectives (``None``, ``[g]`` or ``[g, g]`` each); per-row ``(scale, zero)`` ``[R, G]``, bit for bit what
        ``G`` calls of :meth:`fit` give (without ``refine``/``two_sided``, which fall back to them). The candidates
        and the fake quantization are elementwise (the same values batched or not); each group's loss is the same
        call on the same contiguous ``[C, R, g]`` tensor as in :meth:`fit`; ``min(0)`` returns the first minimum
        either way. About 10 tensor operations per group instead of about 60: GPTQ's per-group fits were most of
        its solve's kernel launches on a GPU (``bench/results/multi_gpu.md``, run 10)."""
        if self.refine or (self.two_sided and not self.sym):
            outs = [self.fit(w[:, j], Ss[j]) for j in range(w.shape[1])]
            return torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)
        w = w.float()
        cs, cz = self.candidates(w)  # [C, R, G]
        if cs.shape[0] == 1:
            return cs[0], cz[0]
        # the errors laid out [G, C, R, g] (session 10; [C, R, G, g] before): each group's [C, R, g] block is
        # contiguous already instead of copied out, one launch fewer per group. Elementwise operations on the same
        # values: the same errors, and the same loss call on each group's block.
        wt = w.transpose(0, 1).contiguous().unsqueeze(1)  # [G, 1, R, g]
        err = wt - self.fake_quant(wt, cs.permute(2, 0, 1).contiguous(), cz.permute(2, 0, 1).contiguous())
        del wt
        losses = group_losses(err, Ss, _bmm_losses(err, Ss))
        del err
        idx = losses.min(0)[1].unsqueeze(0)
        return cs.gather(0, idx)[0], cz.gather(0, idx)[0]

    def _losses(self, w, cs, cz, S, mask) -> torch.Tensor:
        err = w - self.fake_quant(w, cs, cz)
        return quadratic_loss(err if mask is None else err * mask, S)  # [C, R...]

    def _refine_scale(self, w, scale, zero, best, S, mask=None):
        """One least-squares update of the scale with the codes and zero fixed; kept where it helps."""
        q = self.quantize(w, scale, zero)
        c = q - zero.unsqueeze(-1)  # centred codes: w_hat = s * c
        if mask is not None:
            c, w = c * mask, w * mask
        if S is None:
            num, den = (c * w).sum(-1), c.square().sum(-1)
        elif S.dim() == 1:
            num, den = (c * w * S).sum(-1), (c.square() * S).sum(-1)
        else:
            cS = c @ S
            num, den = (cS * w).sum(-1), (cS * c).sum(-1)
        s_new = torch.where(den > 0, num / den.clamp_min(1e-30), scale)
        s_new = torch.where(s_new > 0, s_new, scale)
        err = w - self.fake_quant(w, s_new, zero)
        loss = quadratic_loss(err if mask is None else err * mask, S)
        better = loss < best
        return torch.where(better, s_new, scale), zero, torch.where(better, loss, best)


def make_grid(bits: int = 4, sym: bool = True, search: str = "mse", **kw) -> AffineGrid:
    """The default affine grid for the PTQ algorithms (see :class:`AffineGrid`)."""
    return AffineGrid(bits=bits, sym=sym, search=search, **kw)


def quantize_groups(w: torch.Tensor, grid: AffineGrid, group_size,
                    S_blocks: Optional[list] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit and quantize every group of ``w [R, K]`` independently (round to nearest on the grid).

    ``S_blocks``: optional per-group objective matrices (``[g]`` or ``[g, g]`` each); without them
    all groups are fitted at once on the padded ``[R, G, g]`` view (the ragged tail is padded with
    the row's last value and masked out of the search).
    Returns ``(codes uint8 [R, K], scales fp32 [R, G], zeros fp32 [R, G])``.
    """
    w = w.float()
    R, K = w.shape
    cols = columns(K, group_size, R)
    bounds = cols.bounds()
    if S_blocks is None:
        # all groups at once; one group per row is fitted at its own length (no padding)
        lay = cols if cols.n_groups > 1 else Grouping(R, K, K)
        wg = lay.pad_rows(w)
        scales, zeros = grid.fit(wg, None, lay.mask(w.device))
        codes = lay.unpad(grid.quantize(wg, scales, zeros)).to(torch.uint8)
        return codes, scales, zeros
    codes = torch.empty(R, K, dtype=torch.uint8, device=w.device)
    scales = torch.empty(R, len(bounds), dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    for gi, (a, b) in enumerate(bounds):
        s, z = grid.fit(w[:, a:b], S_blocks[gi])
        codes[:, a:b] = grid.quantize(w[:, a:b], s, z).to(torch.uint8)
        scales[:, gi], zeros[:, gi] = s, z
    return codes, scales, zeros


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (float32 ``[R, K]``)."""
    R, K = codes.shape
    idx = columns(K, group_size).group_index(codes.device)
    return (codes.float() - zeros[:, idx]) * scales[:, idx]


def to_state(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size,
             sym: bool, dtype: torch.dtype = torch.float32):
    """Wrap grid output as a :class:`~lowbit.tensor.state.QuantState` in the canonical layout: ``group``, or
    ``channel`` (axis 0) for one group per row (``group_size=-1``, or a group as long as the row).
    The same as ``AffineWeight.from_grid(...).to_state(symmetric=sym)`` (:mod:`lowbit.tensor.integer`)."""
    from lowbit.tensor.integer import AffineWeight

    return AffineWeight.from_grid(codes, scales, zeros, bits, group_size, sym, dtype).to_state(symmetric=sym)


def n_groups(in_features: int, group_size) -> int:
    return columns(in_features, group_size).n_groups


@dataclass
class GGUFGrid(AffineGrid):
    """llama.cpp block grids (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; blocks of 32) for error-compensated GGUF.

    The candidate parameters follow llama.cpp's reference rule (:func:`lowbit.formats.gguf.block_params`)
    applied to the shrunk range, with ``d`` (and ``m``) rounded to fp16 as stored, so that the codes
    GPTQ picks dequantize exactly as the GGUF file will. In the ``(q - z) * s`` convention ``s = d``
    and ``z = 2**(b-1)`` (``_0`` types, Q8_0: 128) or ``z = -m / d`` (``_1`` types, fractional).
    """

    qtype: str = "q4_0"

    def __post_init__(self) -> None:
        from lowbit.formats.gguf import gguf_type

        t = gguf_type(self.qtype)
        self.qtype = t.name.lower()
        self.bits = t.bits
        self.sym = not t.asymmetric
        super().__post_init__()

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def params_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        xmin, xmax = xmin.float(), xmax.float()
        if not self.sym:  # q * d + m
            d = ((xmax - xmin) / self.maxq).half().float()
            m = xmin.half().float()
            scale = torch.where(d != 0, d, torch.ones_like(d))
            zero = torch.where(d != 0, -m / scale, torch.zeros_like(m))
            return scale, zero
        if self.bits == 8:
            d = (torch.maximum(xmin.abs(), xmax.abs()) / 127.0).half().float()
            zero = torch.full_like(d, 128.0)
        else:
            signed_max = torch.where(xmin.abs() > xmax.abs(), xmin, xmax)
            d = (signed_max / -float(1 << (self.bits - 1))).half().float()
            zero = torch.full_like(d, float(1 << (self.bits - 1)))
        return torch.where(d != 0, d, torch.ones_like(d)), zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, self.maxq)

    def quantize_column(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale + zero), 0, self.maxq)

    def gguf_state(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32):
        """A ``layout="gguf"`` QuantState holding the raw llama.cpp blocks (``in`` a multiple of 32)."""
        from lowbit.formats.gguf import pack_blocks
        from lowbit.tensor.state import QuantState

        R, K = codes.shape
        if K % 32:
            raise ValueError(f"GGUF blocks need in_features divisible by 32, got {K}")
        d = scales.half()
        m = None if self.sym else (-zeros * scales).half()
        raw = pack_blocks(codes.to(torch.uint8), d, m, self.qtype)
        return QuantState(scheme=self.qtype, bits=self.bits, shape=(R, K), dtype=dtype, layout="gguf",
                          block_size=32, data=raw)


@dataclass
class KQuantGrid:
    """llama.cpp K-quant super-block grid (Q2_K ... Q6_K; super-blocks of 256) for error-compensated K-quants.

    A super-block's parameters (fp16 ``d``/``dmin`` and the 4/6-bit integer sub-block scales and mins)
    come from llama.cpp's reference search (:func:`lowbit.formats.kquants.quantize_params`) run on the
    weights as they are when the algorithm reaches the super-block, so the sub-block scale quantization
    is part of the grid the codes are chosen on: a code ``q`` of sub-block ``j`` stands for exactly the
    value the GGUF file dequantizes to, ``step_j * q - offset_j`` (or ``step_j * (q - zero)``).
    """

    qtype: str = "q4_k"

    def __post_init__(self) -> None:
        from lowbit.formats.kquants import kquant_type

        self.t = kquant_type(self.qtype)
        self.qtype = self.t.name.lower()

    def fit(self, w: torch.Tensor):
        """``(KParams, step [R, n_sub], offset [R, n_sub] | None)`` of super-blocks ``w [R, 256*m]``."""
        from lowbit.formats import kquants as kq

        _, p = kq.quantize_params(w.float().cpu(), self.t)
        step, off = kq.subblock_scale_min(p, self.t)
        return p, step.to(w.device), None if off is None else off.to(w.device)

    def quantize_column(self, w: torch.Tensor, step: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
        """Nearest code (float) of one column ``w [R]`` on the stored grid of its sub-block."""
        safe = torch.where(step == 0, torch.ones_like(step), step)
        if offset is not None:
            q = torch.round((w + offset) / safe)
        else:
            q = torch.round(w / safe) + self.t.zero
        q = torch.where(step == 0, torch.full_like(q, float(self.t.zero)), q)
        return q.clamp_(0, self.t.qmax)

    def value(self, q: torch.Tensor, step: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
        return step * q - offset if offset is not None else step * (q - self.t.zero)


def gptq_kquant(weight: torch.Tensor, H: torch.Tensor, qtype: str = "Q4_K", percdamp: float = 0.01,
                dtype: Optional[torch.dtype] = None):
    """GPTQ onto a K-quant grid: ``(QuantState (layout gguf), loss)`` for ``weight [R, K]`` (K % 256 == 0).

    Columns are quantized in order with GPTQ's error feedback through the upper Cholesky factor of
    ``(H + damp I)^{-1}``; each super-block of 256 columns is fitted (llama.cpp's reference search,
    6-bit scale quantization included) on its *compensated* weights when the sweep reaches it, so the
    errors of earlier super-blocks are absorbed before its scales are chosen. The result packs into
    exactly the blocks llama.cpp reads.

    Example:
        >>> X = torch.randn(2048, 512)
        >>> st, loss = gptq_kquant(torch.randn(64, 512), X.t() @ X / 2048, "Q4_K")
        >>> st.scheme, tuple(st.data.shape)
        ('q4_k', (64, 288))
    """
    from lowbit.algorithms.gptq import damped_inverse_cholesky
    from lowbit.formats import kquants as kq
    from lowbit.tensor.state import QuantState

    grid = KQuantGrid(qtype)
    t = grid.t
    W = weight.detach().float().clone()
    R, K = W.shape
    if K % kq.QK_K:
        raise ValueError(f"gptq_kquant: {K} input columns are not a multiple of {kq.QK_K} ({t.name} super-blocks)")
    H = H.float().to(W.device)
    dead = torch.diag(H) == 0
    H = H.clone()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, _ = damped_inverse_cholesky(H, percdamp)
    codes = torch.empty(R, K, dtype=torch.uint8, device=W.device)
    ds, dmins, scs, ms = [], [], [], []
    loss = 0.0
    B = kq.QK_K
    for a in range(0, K, B):
        b = a + B
        p, step, off = grid.fit(W[:, a:b])
        ds.append(p.d), scs.append(p.sc)
        if p.dmin is not None:
            dmins.append(p.dmin), ms.append(p.m)
        W1 = W[:, a:b].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[a:b, a:b]
        for i in range(B):
            j = i // t.sub
            w = W1[:, i]
            q = grid.quantize_column(w, step[:, j], None if off is None else off[:, j])
            codes[:, a + i] = q.to(torch.uint8)
            err = (w - grid.value(q, step[:, j], None if off is None else off[:, j])) / U1[i, i]
            if i + 1 < B:
                W1[:, i + 1:] -= err.unsqueeze(1) * U1[i, i + 1:].unsqueeze(0)
            Err1[:, i] = err
        loss += float(Err1.double().square().sum()) / 2
        if b < K:
            W[:, b:] -= Err1 @ U[a:b, b:]
    params = kq.KParams(torch.cat(ds, 1), torch.cat(dmins, 1) if dmins else None, torch.cat(scs, 1),
                        torch.cat(ms, 1) if ms else None)
    raw = kq.pack_kblocks(codes.cpu(), params, t)
    st = QuantState(scheme=grid.qtype, bits=t.bits, shape=(R, K), dtype=dtype or weight.dtype, layout="gguf",
                    block_size=kq.QK_K, data=raw)
    return st, loss
