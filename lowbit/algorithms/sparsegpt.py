"""N:M semi-structured pruning (2:4): by magnitude, and Hessian-aware (SparseGPT), optionally with
joint quantization of the kept weights.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023), section 3 and Algorithm 1, with the N:M variant of section 3.5: the columns of
``W [out, in]`` are visited left to right in blocks of ``B`` columns, with ``H = X^T X / n`` the
layer Hessian and ``U`` the upper Cholesky factor of ``(H + lambda I)^{-1}`` (the same
``H^{-1}`` rows GPTQ uses, :func:`lowbit.algorithms.gptq.damped_inverse_cholesky`):

* **mask selection** (N:M): when the sweep reaches the first column ``j`` of a group of ``M``
  consecutive input columns, each row keeps the ``N`` weights of the group with the largest OBS
  saliency ``w_j**2 / [H^{-1}]_jj**2`` (with ``[H^{-1}]_jj`` read off the Cholesky factor as
  ``U_jj``, exactly as in the paper's reference implementation), computed on the weights as the
  sweep has updated them so far; the ``M - N`` others are pruned;
* **OBS update**: column ``j`` becomes ``q_j`` (0 where pruned; the quantized kept weight when
  quantizing jointly), and its error ``(w_j - q_j) / U_jj`` is spread over the columns not yet
  visited through row ``j`` of ``U`` (lazily, block by block, like GPTQ).

:func:`magnitude_prune` is the data-free baseline: each group of ``M`` keeps its ``N`` largest
``|w|``. Both return weights with at most ``N`` non-zeros in every group of ``M`` (a kept weight
may itself be zero) and the boolean ``mask`` (``True`` = kept), which has exactly ``N`` ``True``
per group.

Joint quantization (``bits=8`` or ``4``): the kept weights are rounded to a symmetric (or
asymmetric) affine grid with one scale per output channel (``group_size=-1``) or per group of
input columns, fitted up front on the dense weights; pruned weights are the grid's exact zero.
The int8 per-channel grid is the one :class:`lowbit.nn.sparse.SparseLinear` runs on the sparse
int8 tensor cores.

Example::

    >>> W = torch.randn(64, 256); X = torch.randn(1024, 256)
    >>> res = sparsegpt_prune(W, X.T @ X / 1024)
    >>> bool(check_nm(res.weight, 2, 4))
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.algorithms.gptq import damped_inverse_cholesky
from lowbit.algorithms.grid import AffineGrid, columns, group_bounds


@dataclass
class SparseGPTResult:
    """Output of :func:`sparsegpt_prune`: the pruned (and, with ``bits``, quantized) weight
    ``[out, in]`` in float32, the kept ``mask``, and with ``bits`` the integer ``codes``
    (``w = (q - z) * s``), per-group ``scales``/``zeros`` ``[out, n_groups]``; ``loss`` is the
    summed OBS loss ``sum (w_j - q_j)**2 / U_jj**2 / 2``."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    damp: float
    n: int = 2
    m: int = 4
    bits: Optional[int] = None
    group_size: int = -1
    sym: bool = True
    codes: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None


def _check_nm(K: int, n: int, m: int, what: str = "weight") -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity needs integers 0 < N < M, got {n}:{m}")
    if K % m:
        raise ValueError(f"{what} has {K} input columns, not a multiple of M={m}: {n}:{m} sparsity groups "
                         f"{m} consecutive input columns")


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask ``[out, in]`` keeping, in every group of ``m`` consecutive input columns of each
    row, the ``n`` entries with the largest ``scores`` (ties go to the lower index)."""
    R, K = scores.shape
    _check_nm(K, n, m, "scores")
    g = scores.reshape(R, K // m, m)
    idx = torch.topk(g, n, dim=-1, largest=True, sorted=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(R, K)


def check_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive input columns of every row has at most ``n`` non-zeros."""
    R, K = weight.shape
    if K % m:
        return False
    nz = (weight.reshape(R, K // m, m) != 0).sum(-1)
    return bool((nz <= n).all())


def magnitude_prune(weight: torch.Tensor, n: int = 2, m: int = 4):
    """Data-free N:M pruning: ``(pruned weight, mask)``, each group of ``m`` input columns keeping
    its ``n`` largest ``|w|``. The weight keeps its dtype."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    mask = nm_mask(weight.detach().float().abs(), n, m)
    return weight.detach() * mask.to(weight.dtype), mask


def _quant_grid(bits: int, sym: bool) -> AffineGrid:
    # int8: the plain absmax grid (what the int8 kernels assume); lower bit widths: MSE shrink search
    return AffineGrid(bits=bits, sym=sym, search="minmax" if bits >= 8 else "mse", refine=0)


def _low_code(bits: int, sym: bool) -> int:
    # symmetric int8 stays in [-127, 127] (code 1..255), the range of lowbit's and vLLM's int8 kernels
    return 1 if (bits == 8 and sym) else 0


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, n: int = 2, m: int = 4, *, blocksize: int = 128,
                    percdamp: float = 0.01, bits: Optional[int] = None, group_size: int = -1,
                    sym: bool = True) -> SparseGPTResult:
    """SparseGPT N:M pruning of ``weight [out, in]`` given ``H = X^T X / n`` ``[in, in]``.

    ``bits`` (``None``, 8 or 4 ... 2): quantize the kept weights jointly (see the module doc);
    ``group_size`` (``-1`` = one scale per output channel) and ``sym`` shape the grid.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    R, K = weight.shape
    _check_nm(K, n, m)
    if tuple(H.shape) != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(K, K)} for a weight with {K} input columns")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize={blocksize!r}: must be a positive integer")
    blocksize = max(m, blocksize // m * m)  # N:M groups never straddle two blocks
    dev = weight.device
    W = weight.detach().float().clone()
    H = H.detach().float().clone().to(dev)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, damp = damped_inverse_cholesky(H, percdamp)
    d = torch.diagonal(U)

    grid, scales, zeros, gidx, lo = None, None, None, None, 0
    if bits is not None:
        grid = _quant_grid(bits, sym)
        bounds = group_bounds(K, group_size)
        G = len(bounds)
        scales = torch.zeros(R, G, dtype=torch.float32, device=dev)
        zeros = torch.zeros(R, G, dtype=torch.float32, device=dev)
        for gi, (a, b) in enumerate(bounds):
            scales[:, gi], zeros[:, gi] = grid.fit(W[:, a:b], None)
        gidx = torch.cat([torch.full((b - a,), i, dtype=torch.long, device=dev) for i, (a, b) in enumerate(bounds)])
        lo = _low_code(bits, sym)
        Q = torch.zeros(R, K, dtype=torch.float32, device=dev)

    mask = torch.zeros(R, K, dtype=torch.bool, device=dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        Ut = U1.t().contiguous()
        d1 = d[i1:i2]
        M1 = mask[:, i1:i2]
        for i in range(count):
            if i % m == 0:  # choose this group's mask from the current (updated) weights
                sal = W1[:, i:i + m].square() / d1[i:i + m].square().unsqueeze(0)
                M1[:, i:i + m] = nm_mask(sal, n, m)
            w = W1[:, i]
            keep = M1[:, i]
            if grid is not None:
                sc, zc = scales[:, gidx[i1 + i]], zeros[:, gidx[i1 + i]]
                qc = grid.quantize_column(w, sc, zc)
                if lo:
                    qc = qc.clamp_min(lo)
                qc = torch.where(keep, qc, zc)  # pruned: the grid's exact zero
                Q[:, i1 + i] = qc
                q = (qc - zc) * sc
            else:
                q = torch.where(keep, w, torch.zeros_like(w))
            err = (w - q) / d1[i]
            W1[:, i] = q
            if i + 1 < count:
                W1[:, i + 1:].addr_(err, Ut[i + 1:, i], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        total += Err1.double().square().sum()
        if i2 < K:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    res = SparseGPTResult(weight=W, mask=mask, loss=float(total) / 2, damp=damp, n=n, m=m)
    if grid is not None:
        res.bits, res.group_size, res.sym = bits, columns(K, group_size).group, sym
        res.codes, res.scales, res.zeros = Q.to(torch.uint8), scales, zeros
    return res


def quantize_kept(weight: torch.Tensor, mask: torch.Tensor, bits: int = 8, group_size: int = -1,
                  sym: bool = True):
    """Round-to-nearest quantization of an already pruned weight, pruned positions exactly zero:
    ``(w_hat float32, codes uint8, scales [out, G], zeros [out, G])`` (magnitude 2:4 + int8)."""
    grid = _quant_grid(bits, sym)
    W = weight.detach().float()
    R, K = W.shape
    bounds = group_bounds(K, group_size)
    scales = torch.zeros(R, len(bounds), dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    codes = torch.zeros(R, K, dtype=torch.float32, device=W.device)
    for gi, (a, b) in enumerate(bounds):
        s, z = grid.fit(W[:, a:b], None)
        scales[:, gi], zeros[:, gi] = s, z
        q = grid.quantize(W[:, a:b], s, z).clamp_min(_low_code(bits, sym))
        codes[:, a:b] = torch.where(mask[:, a:b], q, z.unsqueeze(-1).expand_as(q))
    gidx = torch.cat([torch.full((b - a,), i, dtype=torch.long, device=W.device) for i, (a, b) in enumerate(bounds)])
    w_hat = (codes - zeros[:, gidx]) * scales[:, gidx]
    return w_hat, codes.to(torch.uint8), scales, zeros


__all__ = ["sparsegpt_prune", "SparseGPTResult", "magnitude_prune", "nm_mask", "check_nm", "quantize_kept"]
