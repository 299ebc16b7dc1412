"""GPTQ: accurate post-training quantization from second-order information.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023), following the structure of the reference ``gptq.py``
(IST-DASLab): the columns of ``W [out, in]`` are quantized one at a time; the error of each is
spread over the columns not yet quantized through the upper Cholesky factor of ``H^{-1}``, with
``H = X^T X / n`` the Hessian of the layer's output error on calibration inputs ``X``.

* ``percdamp``: dampening ``lambda = percdamp * mean(diag(H))`` added to the diagonal; raised
  (x10, with a warning) when the Cholesky factorisation fails.
* ``blocksize``: lazy batch updates, the rest of the matrix is updated once per block of columns.
* ``act_order`` (``desc_act``): columns in order of decreasing ``diag(H)``. Groups stay the
  contiguous column ranges of the original order (so the result is a plain group-wise state);
  ``static_groups=True`` fits every group's grid up front from the original weights, otherwise a
  group's grid is fitted when the sweep first reaches one of its columns, from the weights as the
  sweep has updated them.
* ``group_objective``: what a group's grid (scale, zero) minimises when it is fitted:
  ``"minmax"`` (no search), ``"mse"`` (plain squared weight error), ``"hessian"`` (the error left
  after the columns still to come have compensated it: ``e S e^T`` with
  ``S = [(H_rest^{-1})_{GG}]^{-1}``, the Schur complement, read off the Cholesky factor), or
  ``"sweep"`` (the exact GPTQ loss of the group: every candidate grid runs the group's column sweep
  and each row keeps the best; needs contiguous groups, i.e. no ``act_order``).
* ``gguf_type`` (``"Q4_0"``, ``"Q4_1"``, ``"Q5_0"``, ``"Q5_1"``, ``"Q8_0"``): GPTQ on the exact
  llama.cpp block grid (blocks of 32, fp16 ``d``/``m``); ``.state`` is then a ``layout="gguf"``
  QuantState of raw blocks, ready for a GGUF file. K-quants (``"Q2_K"`` ... ``"Q6_K"``) run
  :func:`lowbit.algorithms.grid.gptq_kquant` (super-blocks of 256, natural column order; llama.cpp's
  fallback type, e.g. Q5_0 for Q4_K, on rows that are not a multiple of 256).
* ``refit_scales``: after the sweep, the scales are re-solved by least squares with the codes and
  zero points fixed, minimising ``tr((W - W_hat) (H + lambda I) (W - W_hat)^T)`` (kept per row
  only where it lowers that error).

The grid is pluggable (:mod:`lowbit.algorithms.grid`): anything with ``candidates``, ``fit``,
``quantize_column`` and ``dequantize`` works.

Example::

    >>> X = torch.randn(2048, 256) @ torch.randn(256, 256)   # correlated inputs
    >>> H = X.T @ X / X.shape[0]
    >>> res = gptq_quantize(torch.randn(64, 256), H, bits=4, group_size=64, sym=False)
    >>> res.state.shape, res.codes.dtype
    ((64, 256), torch.uint8)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from lowbit.algorithms.grid import AffineGrid, columns, to_state

GROUP_OBJECTIVES = ("minmax", "mse", "hessian", "sweep")


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`: codes ``[out, in]`` (original column order), per-group
    ``scales``/``zeros`` ``[out, n_groups]``, the summed GPTQ loss and the dampening used."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    loss: float
    damp: float
    bits: int
    group_size: int
    sym: bool
    dtype: torch.dtype = torch.float32
    grid: Optional[object] = None

    @property
    def state(self):
        """Group-layout QuantState (``layout="gguf"`` raw blocks when GPTQ ran on a GGUF grid)."""
        if self.grid is not None and hasattr(self.grid, "gguf_state"):
            return self.grid.gguf_state(self.codes, self.scales, self.zeros, self.dtype)
        return to_state(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.sym, self.dtype)

    @property
    def weight(self):
        """The integer weight (:class:`~lowbit.tensor.integer.AffineWeight`) of an affine-grid result; GGUF-grid
        results (fractional zero points) have none: use :attr:`state`."""
        from lowbit.tensor.integer import AffineWeight

        if self.grid is not None and hasattr(self.grid, "gguf_state"):
            return AffineWeight.from_state(self.state)  # Q4_0 / Q8_0 blocks; UnsupportedWeight for the others
        return AffineWeight.from_grid(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.sym,
                                      self.dtype)

    def dequantize(self) -> torch.Tensor:
        from lowbit.algorithms.grid import dequantize_groups

        return dequantize_groups(self.codes, self.scales, self.zeros, self.group_size)


#: how :func:`damped_inverse_cholesky` factors: ``"auto"`` (``"flip"`` on CUDA, ``"inverse"`` elsewhere),
#: ``"inverse"`` (Cholesky, the inverse from it, Cholesky of the inverse: GPTQ's reference recipe) or
#: ``"flip"`` (one Cholesky of the reversed matrix and the inverse of its triangular factor, in column
#: chunks: about a quarter of the flops; the same ``U`` up to rounding, so GPU codes differ in rounding ties
#: from the ``"inverse"`` ones). Set by the environment variable ``LOWBIT_GPTQ_FACTOR``.
FACTORS = ("auto", "inverse", "flip")

#: columns per triangular solve of the ``"flip"`` factorisation (fixed: the bits do not depend on who solves)
FACTOR_CHUNK = 2048


def _factor_method(device: torch.device) -> str:
    import os

    mode = os.environ.get("LOWBIT_GPTQ_FACTOR", "auto")
    if mode not in FACTORS:
        raise ValueError(f"LOWBIT_GPTQ_FACTOR={mode!r}: expected one of {FACTORS}")
    if mode == "auto":
        return "flip" if torch.device(device).type == "cuda" else "inverse"
    return mode


def triangular_inverse_chunk(L: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Columns ``[a, b)`` of ``L^{-1}`` from row ``a`` on (``[K - a, b - a]``): ``L[a:, a:] X = I[a:, a:b]``."""
    K = L.shape[0]
    rhs = torch.zeros(K - a, b - a, dtype=L.dtype, device=L.device)
    rhs.diagonal().fill_(1.0)
    return torch.linalg.solve_triangular(L[a:, a:], rhs, upper=False)


def lower_triangular_inverse(L: torch.Tensor, chunk: Optional[int] = None,
                             share: Optional[Callable[..., None]] = None) -> torch.Tensor:
    """``L^{-1}`` of a lower triangular ``L`` in column chunks of ``chunk`` (:data:`FACTOR_CHUNK`): the
    columns ``[a, b)`` of the inverse are zero above row ``a`` and solve ``L[a:, a:] X = I[a:, a:b]`` (the
    trailing block of a triangular inverse is the inverse of the trailing block), so the chunks together cost a
    third of one solve against the whole identity.

    ``share(L, out, spans)``: computes the chunks ``spans`` (``[(a, b)]``) into ``out[a:, a:b]`` another way
    (a data-parallel run spreads them over its ranks, :func:`lowbit.model.distributed.shared_chunks`); each
    chunk must be :func:`triangular_inverse_chunk`'s result, so the bits do not depend on who computed it."""
    chunk = chunk or FACTOR_CHUNK
    K = L.shape[0]
    out = torch.zeros_like(L)
    spans = [(a, min(a + chunk, K)) for a in range(0, K, chunk)]
    if share is not None and len(spans) > 1:
        share(L, out, spans)
        return out
    for a, b in spans:
        out[a:, a:b] = triangular_inverse_chunk(L, a, b)
    return out


def _damped(H: torch.Tensor, damp: float, inplace: bool = False) -> torch.Tensor:
    """``H + damp * I`` without the identity matrix (two fewer ``K x K`` temporaries on the GPU), bit for bit:
    ``h + damp * 0`` is ``h + 0.0`` off the diagonal (which also turns ``-0.0`` into ``+0.0``, as the sum with
    the identity did) and ``h + damp * 1`` on it. ``inplace``: ``H`` itself is changed and returned."""
    A = H if inplace else H.clone()
    A.add_(0.0)
    A.diagonal().add_(damp)
    return A


def _damp_on_device(device: torch.device) -> bool:
    """Whether the ``"flip"`` factorisation keeps its first dampening on the device: on CUDA (where reading it is a
    host wait) unless ``LOWBIT_GPTQ_DAMP=host`` (read before the factorisation, as before session 10)."""
    import os

    mode = os.environ.get("LOWBIT_GPTQ_DAMP", "device")
    if mode not in ("device", "host"):
        raise ValueError(f"LOWBIT_GPTQ_DAMP={mode!r}: expected device or host")
    return mode == "device" and torch.device(device).type == "cuda"


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float, max_tries: int = 6,
                            method: Optional[str] = None, share: Optional[Callable[..., None]] = None,
                            during: Optional[Callable[[float], Optional[Callable[[], None]]]] = None):
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^{-1}`` (``H^{-1} = U^T U``) and ``lambda``.

    The dampening starts at ``percdamp * mean(diag(H))`` and grows x10 (with a warning) until the
    factorisation succeeds. ``method`` (default :data:`FACTORS`' ``"auto"``): ``"inverse"`` factors the
    explicit inverse; ``"flip"`` uses ``J A J = L L^T`` (``J`` the reversal), whence ``A^{-1} = (J L^{-1} J)^T
    (J L^{-1} J)`` with ``J L^{-1} J`` upper triangular: one Cholesky and one triangular inverse (its chunks
    spread by ``share``, see :func:`lower_triangular_inverse`).

    ``during(damp)``: called once, with the first dampening (a float64 scalar tensor on the device where
    :func:`_damp_on_device`, else a float), before the first Cholesky factorisation is queued
    (the matrix and whatever the caller queued before are the work queued so far); if it returns a callable, that
    is called right after the factorisation is queued and before its outcome is read (a host synchronisation): on
    a GPU the caller queues work that needs no factor on another stream, made to wait for the work queued before
    the factorisation only, and the two run at the same time.
    """
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp!r}: must be >= 0")
    method = _factor_method(H.device) if method is None else method
    if method not in FACTORS[1:]:
        raise ValueError(f"method={method!r}: expected one of {FACTORS[1:]}")
    mean_t = torch.diag(H).mean()
    if method == "flip" and _damp_on_device(H.device):
        # session 10: the first dampening stays on the device (read with the factorisation's outcome): reading the mean
        # diagonal here made the host wait for everything queued before it (a data-parallel run's statistics exchange
        # included) before it could queue the factorisation and the fits. The same double product, rounded to float32
        # where it is added, as the host value: the same bits.
        mean_diag = None
        damp = mean_t.double() * percdamp
    else:
        mean_diag = mean_t.item()
        damp = percdamp * mean_diag
    then = during(damp) if during is not None else None
    for attempt in range(max_tries):
        # "flip": the reversal keeps the diagonal on the diagonal
        A = _damped(H.flip((0, 1)) if method == "flip" else H, damp)
        # one cuSOLVER call, replicated on every rank of a data-parallel run (session 11 tried a two-level split
        # whose off-diagonal solve and Schur complement two ranks shared: 42.5 ms against 31.1 ms for the whole
        # K = 14336 factor on one H200, and 0.605 against 0.595-0.599 s per 2-GPU 8B block, run 28; removed)
        L, info = torch.linalg.cholesky_ex(A)
        del A
        if callable(then):
            # (session 11 tried queuing these after the triangular inverse instead, where the main stream had waited
            # 7 ms per 8B down_proj stage for the host's fit launches: run 25, 0.601 against 0.597 s per 2-GPU block)
            then()
        then = None
        if method == "flip":
            # the triangular inverse is queued before the factorisation's outcome is read: one host wait for both
            # (a failed factorisation leaves garbage in L, and so a non-finite or discarded U)
            Linv = lower_triangular_inverse(L, share=share)
            del L
            U = Linv.flip((0, 1))
            del Linv
            ok = (info == 0) & torch.isfinite(U).all()
            if isinstance(damp, torch.Tensor):  # one read for the outcome and the dampening
                ok, damp = torch.stack([ok.double(), damp]).tolist()
            if bool(ok):
                return U, damp
        elif int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        if mean_diag is None:
            mean_diag = float(mean_t)
        new = max(damp * 10.0, 1e-6 * max(mean_diag, 1e-12), 1e-8)
        warnings.warn(f"GPTQ: Cholesky of the damped Hessian failed with dampening {damp:.3g}; "
                      f"retrying with {new:.3g}", RuntimeWarning, stacklevel=3)
        damp = new
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite even with dampening {damp:.3g}")


#: rows per product in the lazy block update of :func:`gptq_quantize`. GPU GEMM kernels are chosen by shape,
#: so the bits of a row of ``Err @ U`` could depend on the number of rows multiplied with it; products over
#: fixed chunks make a linear solved in pieces whose cuts are multiples of this (data-parallel runs) give
#: the codes of the whole. On the CPU the chunked and whole products were identical.
ROW_CHUNK = 1024


def gptq_factor(H: torch.Tensor, percdamp: float = 0.01, act_order: bool = True,
                share: Optional[Callable[..., None]] = None, inplace: bool = False,
                during: Optional[Callable[[torch.Tensor, torch.Tensor, float], Any]] = None) -> tuple:
    """What :func:`gptq_quantize` derives from ``H`` alone: ``(H with dead inputs fixed, dead mask,
    column order, upper Cholesky factor of the damped inverse, dampening)``. Pass it as ``factor=``
    to quantize several weights that share ``H`` (q/k/v) without repeating the factorisation.
    ``share``: see :func:`damped_inverse_cholesky` (the ``"flip"`` factorisation's chunks spread over ranks).
    ``inplace``: ``H`` (float32) is used and changed (dead inputs) instead of copied: one ``K x K`` matrix less
    on the device, for callers that hand it over. ``during(H, dead, damp)``: see :func:`damped_inverse_cholesky`
    (``H`` with its dead inputs fixed, as returned; e.g. :func:`gptq_static_groups` while the Cholesky runs; what it
    returns is called once the Cholesky is queued)."""
    H = H.detach()
    H = H if inplace and H.dtype == torch.float32 else H.float().clone()
    K = H.shape[0]
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1.0)  # H[dead, dead] = 1.0 without its host wait (a boolean index's nonzero)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(K, device=H.device)
    Hp = torch.empty_like(H)  # H[perm][:, perm], gathered in row slices (no second K x K temporary)
    step = max(1, (64 * 2 ** 20) // max(K * H.element_size(), 1))
    for r in range(0, K, step):
        Hp[r:r + step] = H[perm[r:r + step]][:, perm]
    U, damp = damped_inverse_cholesky(Hp, percdamp, share=share,
                                      during=None if during is None else (lambda d: during(H, dead, d)))
    return H, dead, perm, U, damp


#: the column sweep of a block: ``"auto"`` (the fused Triton kernel on CUDA when Triton is installed, else
#: torch), ``"torch"`` (the column loop below), ``"triton"`` (the kernel; an error where it cannot run) or
#: ``"emulate"`` (:func:`sweep_block_emulated`, the kernel's per-tile algorithm in torch: CPU tests). Set by
#: the environment variable ``LOWBIT_GPTQ_SWEEP``.
SWEEPS = ("auto", "torch", "triton", "emulate")


def _block_sweep(dev: torch.device, grid) -> tuple:
    """``(sweep function or None, widest block it takes)`` for this device and grid (affine grids only:
    ``clamp(round(w / s) + z, 0, maxq)``, both symmetric and asymmetric)."""
    import os

    mode = os.environ.get("LOWBIT_GPTQ_SWEEP", "auto")
    if mode not in SWEEPS:
        raise ValueError(f"LOWBIT_GPTQ_SWEEP={mode!r}: expected one of {SWEEPS}")
    if mode == "torch" or type(grid) is not AffineGrid:
        return None, 0
    if mode == "emulate":
        return sweep_block_emulated, 1 << 30
    from lowbit.kernels import select

    if not select.available("triton", dev):
        if mode == "triton":
            raise RuntimeError(f"LOWBIT_GPTQ_SWEEP=triton needs Triton and a CUDA device (got {dev})")
        return None, 0
    from lowbit.kernels.triton.gptq_sweep import MAX_COLUMNS, sweep_block

    return sweep_block, MAX_COLUMNS


#: how :func:`_lazy_update` updates on CUDA (``LOWBIT_GPTQ_LAZY``): ``"batched"`` (the default since session 10: the
#: ROW_CHUNK-row chunks as one batched GEMM), ``"addmm"`` (one ``addmm_`` per chunk, session 9) or ``"sub"`` (the
#: product, then ``sub_``: runs 5-12 and the CPU)
LAZY_MODES = ("batched", "addmm", "sub")


def _lazy_mode(dev: torch.device) -> str:
    """:func:`_lazy_update`'s mode (:data:`LAZY_MODES`) on ``dev``: ``LOWBIT_GPTQ_LAZY`` on CUDA (default
    ``"batched"``); the CPU keeps ``"sub"`` (its recorded outputs are unchanged)."""
    import os

    mode = os.environ.get("LOWBIT_GPTQ_LAZY", "batched")
    if mode not in LAZY_MODES:
        raise ValueError(f"LOWBIT_GPTQ_LAZY={mode!r}: expected one of {LAZY_MODES}")
    return mode if torch.device(dev).type == "cuda" else "sub"


def _lazy_update(W: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, i1: int, i2: int, mode: str = "sub") -> None:
    """``W[:, i2:] -= Err1 @ U[i1:i2, i2:]``, the block's error carried to the columns after it, in fixed chunks of
    :data:`ROW_CHUNK` rows: a row's result does not depend on how many rows are solved together (data-parallel runs
    solve a linear in row pieces). In place on views (``sub_``: the same kernel as ``-=`` without its
    ``__setitem__``), the slices taken once. ``mode``: see :data:`LAZY_MODES` (``W`` and ``Err1`` row-major)."""
    R = W.shape[0]
    Ub = U[i1:i2, i2:]
    if mode in ("addmm", "batched"):
        # session 9: the product subtracted in the GEMM's epilogue (``W - acc`` rounded once, as ``sub_`` of the
        # fp32 product rounds it), one launch per chunk instead of two and no product temporary: the solve's
        # block loop was bound by the host's launches. LOWBIT_GPTQ_LAZY=sub: the product, then sub_.
        rest = W[:, i2:]
        r0 = 0
        nc = R // ROW_CHUNK
        if mode == "batched" and nc > 1 and W.stride() == (W.shape[1], 1) and Err1.is_contiguous():
            # session 10: the whole chunks as one batched GEMM (each batch entry the chunk's own product; checked bit
            # for bit against one addmm_ per chunk on the H200 for 1-14 chunks, bench/dp_bits_probe.py): one launch
            # per block of columns instead of R / ROW_CHUNK
            n = W.shape[1] - i2
            view = rest.as_strided((nc, ROW_CHUNK, n), (ROW_CHUNK * W.shape[1], W.shape[1], 1), rest.storage_offset())
            view.baddbmm_(Err1[:nc * ROW_CHUNK].view(nc, ROW_CHUNK, -1), Ub.unsqueeze(0).expand(nc, -1, -1),
                          alpha=-1.0)
            r0 = nc * ROW_CHUNK
        for r1 in range(r0, R, ROW_CHUNK):
            rest[r1:r1 + ROW_CHUNK].addmm_(Err1[r1:r1 + ROW_CHUNK], Ub, alpha=-1.0)
        return
    if R <= ROW_CHUNK:
        W[:, i2:].sub_(Err1 @ Ub)
        return
    rest = W[:, i2:]
    for r1 in range(0, R, ROW_CHUNK):
        rest[r1:r1 + ROW_CHUNK].sub_(Err1[r1:r1 + ROW_CHUNK] @ Ub)


def _sweep_in_place(sweep):
    """:func:`lowbit.kernels.triton.gptq_sweep.sweep_into` where ``sweep`` is the Triton block sweep (the same
    codes and errors without the block's copies and gathers; ``LOWBIT_GPTQ_SWEEP_INTO=0``: the copying call)."""
    import os

    if sweep is None or sweep is sweep_block_emulated or os.environ.get("LOWBIT_GPTQ_SWEEP_INTO", "1") == "0":
        return None
    from lowbit.kernels.triton.gptq_sweep import sweep_block, sweep_into  # imported already: sweep is one of them

    return sweep_into if sweep is sweep_block else None


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32 (the exact product and sum in float64, then one rounding;
    differs from a true fma only by a double rounding in rare ties)."""
    return (a.double() * b.double() + c.double()).float()


def sweep_block_emulated(W1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, U1: torch.Tensor, maxq: int):
    """The fused kernel's sweep of one block (:mod:`lowbit.kernels.triton.gptq_sweep`) in torch: codes and
    errors ``[R, count]``. Same operations in the same order per row (IEEE divisions, half-to-even
    rounding, the update as one fused multiply-add)."""
    W = W1.float().clone()
    R, count = W.shape
    Q = torch.empty_like(W)
    E = torch.empty_like(W)
    for i in range(count):
        w, s, z = W[:, i], S1[:, i], Z1[:, i]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        err = (w - (q - z) * s) / U1[i, i]
        if i + 1 < count:
            W[:, i + 1:] = _fma32(-err[:, None], U1[i, i + 1:][None, :], W[:, i + 1:])
        Q[:, i], E[:, i] = q, err
    return Q, E


def _schur_objective(U: torch.Tensor, pos: torch.Tensor, start: int) -> torch.Tensor:
    """``[(H_rest^{-1})_{PP}]^{-1}`` for the sweep positions ``pos`` once ``start`` columns are done."""
    A = U[start:int(pos.max()) + 1][:, pos]
    C = A.t() @ A
    C = C + 1e-8 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        return torch.diag(1.0 / C.diagonal().clamp_min(1e-12))
    return torch.cholesky_inverse(L)


def _sweep_select(grid, Wg: torch.Tensor, Ug: torch.Tensor):
    """Exact GPTQ loss of the contiguous group ``Wg [R, g]`` for every candidate grid; best per row."""
    cs, cz = grid.candidates(Wg)  # [C, R]
    if cs.shape[0] == 1:
        return cs[0], cz[0]
    Wc = Wg.unsqueeze(0).repeat(cs.shape[0], 1, 1)
    loss = torch.zeros_like(cs)
    g = Wg.shape[1]
    for j in range(g):
        w = Wc[:, :, j]
        q = grid.quantize_column(w, cs, cz)
        err = (w - (q - cz) * cs) / Ug[j, j]
        loss += err.square()
        if j + 1 < g:
            Wc[:, :, j + 1:] -= err.unsqueeze(-1) * Ug[j, j + 1:]
    idx = loss.argmin(0, keepdim=True)
    return cs.gather(0, idx)[0], cz.gather(0, idx)[0]


def refit_scales(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Least-squares scales for fixed codes and zeros: ``min_s tr(E H E^T)``, ``E = W - s * (q - z)``.

    Solved per row (a ``G x G`` system, ``G`` groups); rows where it does not lower the error, or
    gives a non-positive scale, keep their scales.
    """
    R, K = W.shape
    bounds = columns(K, group_size).bounds()
    G = len(bounds)
    gidx = torch.cat([torch.full((b - a,), i, dtype=torch.long, device=W.device) for i, (a, b) in enumerate(bounds)])
    c = codes.float() - zeros[:, gidx]
    T = torch.stack([c[:, a:b] @ H[a:b, :] for a, b in bounds], dim=1)  # [R, G, K]
    M = torch.zeros(R, G, G, dtype=W.dtype, device=W.device)
    M.index_add_(2, gidx, T * c.unsqueeze(1))  # M[r, h, g] = sum_{j in g} T[r, h, j] c[r, j]
    rhs = torch.zeros(R, G, dtype=W.dtype, device=W.device).index_add_(1, gidx, c * (W @ H))
    M = M + 1e-9 * M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None] * torch.eye(
        G, dtype=W.dtype, device=W.device)
    new, info = torch.linalg.solve_ex(M, rhs.unsqueeze(-1))
    new = new.squeeze(-1)

    def row_loss(s):
        E = W - c * s[:, gidx]
        return ((E @ H) * E).sum(-1)

    ok = (info == 0) & torch.isfinite(new).all(-1) & (new > 0).all(-1)
    new = torch.where(ok.unsqueeze(-1), new, scales)
    better = row_loss(new) < row_loss(scales)
    return torch.where(better.unsqueeze(-1), new, scales)


#: bytes of the largest temporary (``[candidates, rows, groups, g]`` fp32) of one batch of static group fits
FIT_BATCH_BYTES = 256 * 2 ** 20

#: how the static groups are fitted: ``"auto"`` (``"batched"`` on CUDA, ``"group"`` elsewhere), ``"batched"``
#: (:meth:`lowbit.algorithms.grid.AffineGrid.fit_groups`, several groups per call, the same bits) or ``"group"`` (one
#: :meth:`~lowbit.algorithms.grid.AffineGrid.fit` per group). On a GPU the per-group fits were launch-bound (run 10:
#: a down_proj solve 194 -> 104 ms batched); on the CPU the batches' larger temporaries leave the caches and the
#: solve took 2-2.5x as long (one thread, SmolLM2 shapes). Set by the environment variable ``LOWBIT_GPTQ_FITS``.
FITS = ("auto", "batched", "group")


def _group_objectives(H: torch.Tensor, damp, bounds: list) -> Dict[int, torch.Tensor]:
    """Each group's objective ``H[a:b, a:b] + damp I`` (:func:`_damped` of the slice), keyed by its first column
    ``a``: each run of consecutive equal-width groups as one strided view of ``H``'s diagonal blocks, copied and
    damped in three launches (session 10; three per group before, a quarter of the fits' launches on a GPU). The
    same elementwise operations on the same values: the same bits."""
    out: Dict[int, torch.Tensor] = {}
    K = H.shape[-1]
    i = 0
    while i < len(bounds):
        a, b = bounds[i]
        g = b - a
        j = i
        while j < len(bounds) and bounds[j][1] - bounds[j][0] == g and bounds[j][0] == a + (j - i) * g:
            j += 1
        if H.dim() != 2 or H.stride() != (K, 1):
            for k in range(i, j):
                out[bounds[k][0]] = _damped(H[bounds[k][0]:bounds[k][1], bounds[k][0]:bounds[k][1]], damp)
        else:
            # a copy always (one whole-width group's view is contiguous already: .contiguous() would return H itself)
            S = H.as_strided((j - i, g, g), (g * K + g, K, 1), H.storage_offset() + a * K + a).clone(
                memory_format=torch.contiguous_format)
            S.add_(0.0)
            S.diagonal(dim1=1, dim2=2).add_(damp)
            for k, blk in enumerate(S.unbind(0)):
                out[a + k * g] = blk
        i = j
    return out


def _fit_static_groups(grid, W_orig: torch.Tensor, H: torch.Tensor, damp: float, bounds: list, objective: str,
                       scales: torch.Tensor, zeros: torch.Tensor) -> None:
    """Every group's ``(scale, zero)`` from the original weights into ``scales``/``zeros`` ``[R, G]``: the groups'
    objectives are their blocks of ``H + damp I`` (``objective="mse"``: none). Runs of equal-width groups go through
    :meth:`~lowbit.algorithms.grid.AffineGrid.fit_groups` in batches of at most :data:`FIT_BATCH_BYTES` of
    temporaries (the same bits as one fit per group)."""
    import os

    mode = os.environ.get("LOWBIT_GPTQ_FITS", "auto")
    if mode not in FITS:
        raise ValueError(f"LOWBIT_GPTQ_FITS={mode!r}: expected one of {FITS}")
    if mode == "auto":
        mode = "batched" if W_orig.is_cuda else "group"
    R = W_orig.shape[0]
    blocks = None if objective == "mse" else _group_objectives(H, damp, bounds)

    def objective_of(a, b):
        return None if blocks is None else blocks[a]

    if mode == "group" or type(grid) is not AffineGrid or not hasattr(grid, "fit_groups"):
        for gi, (a, b) in enumerate(bounds):
            scales[:, gi], zeros[:, gi] = grid.fit(W_orig[:, a:b], objective_of(a, b))
        return
    n_cand = len(grid.shrink_factors())
    gi = 0
    while gi < len(bounds):
        a, b = bounds[gi]
        g = b - a
        per = max(1, FIT_BATCH_BYTES // max(n_cand * R * g * 4, 1))
        gj = gi
        while gj < len(bounds) and gj - gi < per and bounds[gj][1] - bounds[gj][0] == g:
            gj += 1
        if gj - gi == 1:
            scales[:, gi], zeros[:, gi] = grid.fit(W_orig[:, a:b], objective_of(a, b))
        else:
            end = bounds[gj - 1][1]
            w = W_orig[:, a:end].reshape(R, gj - gi, g)
            scales[:, gi:gj], zeros[:, gi:gj] = grid.fit_groups(w, [objective_of(*bounds[k]) for k in range(gi, gj)])
        gi = gj


def _grid_and_columns(R: int, K: int, bits: int, group_size, sym: bool, group_objective: str, grid, n_grid,
                      max_shrink, two_sided: int):
    """The affine grid (unless given) and the column groups :func:`gptq_quantize` uses."""
    cols = columns(K, group_size, R)  # validated once; -1: one group per row
    # grid search range: at 3 bits and below a wider, finer range measured better on SmolLM2
    # (int3 g128 asym ppl 36.2 -> 35.0); at 4 bits 20 steps down to 0.5 x the range
    if n_grid is None:
        n_grid = 40 if bits <= 3 else 20
    if max_shrink is None:
        max_shrink = 0.7 if bits <= 3 else 0.5
    if grid is None:
        grid = AffineGrid(bits=bits, sym=sym, search="minmax" if group_objective == "minmax" else "mse",
                          n_grid=n_grid, max_shrink=max_shrink, refine=0, two_sided=two_sided)
    return grid, cols


def _group_objective(group_objective: str, act_order: bool, g: int, K: int, blocksize: int) -> str:
    """What a group's fit minimises in :func:`gptq_quantize` (``"sweep"`` falls back to ``"hessian"`` where the
    groups are not whole blocks of the sweep)."""
    objective = group_objective
    if objective == "sweep" and (act_order or g > blocksize and g != K):
        objective = "hessian"
    if objective == "sweep" and g == K:
        objective = "hessian"
    return objective


def _check_inputs(weight: torch.Tensor, H: torch.Tensor, group_objective: str):
    """``(out, in)`` of a 2-D ``weight`` whose Hessian ``H`` is ``[in, in]``; ValueError naming what is off."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    R, K = weight.shape
    if tuple(H.shape) != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(K, K)} for a weight with {K} input columns")
    if group_objective not in GROUP_OBJECTIVES:
        raise ValueError(f"group_objective={group_objective!r}: expected one of {GROUP_OBJECTIVES}")
    return R, K


def gptq_static_groups(weight: torch.Tensor, H: torch.Tensor, dead: torch.Tensor, damp: float, bits: int = 4,
                       group_size: int = 128, sym: bool = True, *, blocksize: int = 128, act_order: bool = True,
                       group_objective: str = "hessian", grid: Optional[AffineGrid] = None,
                       n_grid: Optional[int] = None, max_shrink: Optional[float] = None,
                       two_sided: int = 0) -> tuple:
    """The static groups' ``(scales, zeros, damp)`` ``[R, G]`` that :func:`gptq_quantize` fits from the original
    weights (``static_groups=True``, affine grids), given ``H`` with its dead inputs fixed and ``dead`` (the first
    two entries of :func:`gptq_factor`'s result) and the dampening. They need no Cholesky factor, so a caller can
    fit them while the factorisation runs (``damp`` is then the first dampening tried,
    ``percdamp * mean(diag(H))``) and hand them to :func:`gptq_quantize` as ``groups=``: the same function on the
    same inputs, the same bits."""
    R, K = _check_inputs(weight, H, group_objective)
    grid, cols = _grid_and_columns(R, K, bits, group_size, sym, group_objective, grid, n_grid, max_shrink, two_sided)
    bounds = cols.bounds()
    W_orig = weight.detach().float().clone()
    W_orig.masked_fill_(dead, 0.0)  # W_orig[:, dead] = 0.0 without a host wait
    scales = torch.zeros(R, len(bounds), dtype=torch.float32, device=weight.device)
    zeros = torch.zeros(R, len(bounds), dtype=torch.float32, device=weight.device)
    _fit_static_groups(grid, W_orig, H, damp, bounds, _group_objective(group_objective, act_order, cols.group, K,
                                                                       blocksize), scales, zeros)
    return scales, zeros, damp


def _sweep_step(into, W, i1: int, i2: int, scales, zeros, gidx_dev, U, maxq, Q, Ebuf, sweep_cfg, lazy: str,
                total_loss: Optional[torch.Tensor] = None):
    """One block of columns ``[i1, i2)`` through the in-place fused sweep (reads W's block, the scales through the
    group index, writes ``Q``), then its error carried to the columns after it (:func:`_lazy_update`); its squared
    errors added to ``total_loss`` (in place) when given. ``Ebuf``: the errors' buffer of the previous block (``None``
    at first); returns the buffer used (a new one when the block's padded width changed)."""
    R, K = W.shape
    count = i2 - i1
    bc = max(16, 1 << (count - 1).bit_length())
    fresh = Ebuf is None or Ebuf.shape[1] != bc
    if fresh:
        Ebuf = torch.empty(R, bc, dtype=torch.float32, device=W.device)
    E = into(W, i1, count, scales, zeros, gidx_dev[i1:i2], U[i1:i2, i1:i2], maxq, Q, Ebuf, config=sweep_cfg,
             checked=not fresh)
    Err1 = E if bc == count else E[:, :count].contiguous()
    if total_loss is not None:
        total_loss += Err1.double().square().sum()
    if i2 < K:
        _lazy_update(W, Err1, U, i1, i2, lazy)
    return Ebuf


def _column_loop(into, W, U, scales, zeros, gidx_dev, Q, maxq, blocksize: int, sweep_cfg, lazy: str) -> None:
    """The whole column loop of :func:`gptq_quantize` when every block goes through the in-place fused sweep (static
    groups fitted, no loss summed): a fixed sequence of kernels for a given shape (what :class:`_SolveGraph`
    captures)."""
    K = W.shape[1]
    Ebuf = None
    for i1 in range(0, K, blocksize):
        Ebuf = _sweep_step(into, W, i1, min(i1 + blocksize, K), scales, zeros, gidx_dev, U, maxq, Q, Ebuf, sweep_cfg,
                           lazy)


#: the most bytes of input/output copies the solve's CUDA graphs keep per process (``cuda_graph=True`` of
#: :func:`gptq_quantize`; ``LOWBIT_GPTQ_GRAPH_BYTES``): a shape past it is solved without a graph
GRAPH_BYTES = 3 * 2 ** 30


def graph_bytes(rows: int, k: int, groups: int) -> int:
    """Bytes one solve graph keeps (:class:`_SolveGraph`) for a ``rows x k`` solve with ``groups`` groups per row: fp32
    copies of the permuted weight and of the codes, ``U`` (``k x k``), the scales and zeros, the int64 group index."""
    return 2 * rows * k * 4 + k * k * 4 + 2 * rows * groups * 4 + k * 8


def graph_cap() -> int:
    """The most bytes the solve graphs may keep per process: ``LOWBIT_GPTQ_GRAPH_BYTES``, default :data:`GRAPH_BYTES`."""
    import os

    return int(os.environ.get("LOWBIT_GPTQ_GRAPH_BYTES", GRAPH_BYTES))


_SOLVE_GRAPHS: Dict[tuple, "_SolveGraph"] = {}
_SOLVE_SEEN: set = set()
_GRAPH_STREAMS: Dict[Any, Any] = {}


class _SolveGraph:
    """:func:`_column_loop` of one shape captured as a CUDA graph over fixed copies of its inputs (``W`` permuted,
    ``U``, the scales and zeros, the group index) and its codes ``Q``: a call copies the inputs in and replays the
    graph, one launch instead of about three per block of 128 columns (session 11: with a data-parallel run's rows
    split, a rank's solve was bound by the host's launches, the GPU idle between them). The captured kernels are
    the loop's own, on the same shapes and values: the same bits (checked on the H200)."""

    def __init__(self, into, W, U, scales, zeros, gidx_dev, maxq, blocksize: int, sweep_cfg, lazy: str) -> None:
        dev = W.device
        self.W, self.U = torch.empty_like(W), torch.empty_like(U)
        self.S, self.Z = scales.contiguous().clone(), zeros.contiguous().clone()
        self.gidx = gidx_dev.clone()
        self.Q = torch.zeros_like(W)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.W, self.U, self.S, self.Z, self.gidx, self.Q))
        side = _GRAPH_STREAMS.get(dev)
        if side is None:
            side = _GRAPH_STREAMS[dev] = torch.cuda.Stream(dev)
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            # thread-local: the block prefetch's copies on other threads go on meanwhile
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                _column_loop(into, self.W, self.U, self.S, self.Z, self.gidx, self.Q, maxq, blocksize, sweep_cfg, lazy)
            finally:
                self.graph.capture_end()
        main.wait_stream(side)

    def __call__(self, W, U, scales, zeros, gidx_dev) -> torch.Tensor:
        """The codes (sweep order) of the loop on these inputs (``W`` is not changed); valid until the next call."""
        for dst, src in ((self.W, W), (self.U, U), (self.S, scales), (self.Z, zeros), (self.gidx, gidx_dev)):
            dst.copy_(src)
        self.graph.replay()
        return self.Q


def clear_solve_graphs() -> None:
    """Drop the solve's CUDA graphs and their buffers (the pipelines call it when a run ends)."""
    _SOLVE_GRAPHS.clear()
    _SOLVE_SEEN.clear()


def _graphed_loop(into, W, U, scales, zeros, gidx_dev, Q, maxq, blocksize: int, sweep_cfg, lazy: str) -> torch.Tensor:
    """:func:`_column_loop`, replayed from a CUDA graph where one of this shape was made: the first solve of a shape runs
    the loop itself (its kernels compiled and warmed), the second captures it, later ones replay it. Returns the codes
    (``Q`` itself, or the graph's copy)."""
    key = (W.device, tuple(W.shape), tuple(U.shape), tuple(scales.shape), maxq, blocksize, sweep_cfg, lazy, into)
    g = _SOLVE_GRAPHS.get(key)
    if g is None:
        if key not in _SOLVE_SEEN:
            _SOLVE_SEEN.add(key)
            _column_loop(into, W, U, scales, zeros, gidx_dev, Q, maxq, blocksize, sweep_cfg, lazy)
            return Q
        need = graph_bytes(W.shape[0], W.shape[1], scales.shape[1])
        if sum(x.nbytes for x in _SOLVE_GRAPHS.values()) + need > graph_cap():
            _column_loop(into, W, U, scales, zeros, gidx_dev, Q, maxq, blocksize, sweep_cfg, lazy)
            return Q
        g = _SOLVE_GRAPHS[key] = _SolveGraph(into, W, U, scales, zeros, gidx_dev, maxq, blocksize, sweep_cfg, lazy)
    return g(W, U, scales, zeros, gidx_dev)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, *,
                  percdamp: float = 0.01, blocksize: int = 128, act_order: bool = True, static_groups: bool = True,
                  group_objective: str = "hessian", refit: bool = False, grid: Optional[AffineGrid] = None,
                  n_grid: Optional[int] = None, max_shrink: Optional[float] = None,
                  gguf_type: Optional[str] = None, two_sided: int = 0,
                  factor: Optional[tuple] = None, groups: Optional[tuple] = None,
                  compute_loss: bool = True, cuda_graph: bool = False) -> GPTQResult:
    """Quantize ``weight [out, in]`` with GPTQ given ``H = X^T X / n`` ``[in, in]``.

    See the module docstring for the options. Returns a :class:`GPTQResult` (``.state`` is the
    group-layout QuantState, ``.dequantize()`` the float weight). ``groups``: the static groups'
    ``(scales, zeros, damp)`` from :func:`gptq_static_groups` with the same weight, options and ``factor``'s
    ``H`` (a caller fits them while the factorisation runs); used when ``damp`` is the factor's, else refitted.
    ``compute_loss=False``: the result's ``loss`` is ``nan`` (the pipelines do not read it; summing it cost four
    kernel launches per block of columns and a host wait at the end).
    ``cuda_graph``: on CUDA, with static groups given or fitted and no loss summed, the column loop is replayed from a
    CUDA graph kept per shape (:class:`_SolveGraph`: the same kernels, the same bits; for many solves of a few shapes,
    as a data-parallel run's blocks are; the graphs keep copies of their inputs until :func:`clear_solve_graphs`, at
    most :data:`GRAPH_BYTES`). Ignored elsewhere.
    """
    R, K = _check_inputs(weight, H, group_objective)
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize={blocksize!r}: must be a positive integer")
    if gguf_type is not None:  # K-quants (super-blocks of 256; llama.cpp's fallback type on other rows)
        from lowbit.formats.kquants import is_kquant, kquant_fallback

        gguf_type = kquant_fallback(gguf_type, K) if is_kquant(gguf_type) else gguf_type
        if is_kquant(gguf_type):
            return _gptq_kquant_result(weight, H, gguf_type, percdamp)
    if gguf_type is not None:  # error-compensated GGUF: the exact llama.cpp block grid, blocks of 32
        from lowbit.algorithms.grid import GGUFGrid

        grid = GGUFGrid(qtype=gguf_type, search="minmax" if group_objective == "minmax" else "mse", refine=0,
                        n_grid=n_grid or 20, max_shrink=0.5 if max_shrink is None else max_shrink)
        group_size, bits, sym = 32, grid.bits, grid.sym
    grid, cols = _grid_and_columns(R, K, bits, group_size, sym, group_objective, grid, n_grid, max_shrink, two_sided)
    g = cols.group
    bounds = cols.bounds()
    dev = weight.device
    W = weight.detach().float().clone()
    if factor is None:
        factor = gptq_factor(H.detach().float().to(dev), percdamp, act_order)

    H, dead, perm, U, damp = factor
    W.masked_fill_(dead, 0.0)  # W[:, dead] = 0.0 without a host wait
    W_orig = W.clone()
    invperm = torch.argsort(perm)
    W = W[:, perm]

    G = len(bounds)
    scales = torch.zeros(R, G, dtype=torch.float32, device=dev)
    zeros = torch.zeros(R, G, dtype=torch.float32, device=dev)
    fitted = [False] * G
    gidx_orig = cols.group_index()
    gidx_dev = gidx_orig.to(dev)[perm]  # group of each sweep position, on the device (no host copy per block)
    contiguous = not act_order
    objective = _group_objective(group_objective, act_order, g, K, blocksize)
    if contiguous and g < K:
        blocksize = max(g, (blocksize // g) * g)  # blocks made of whole groups

    if static_groups and groups is not None and gguf_type is None and groups[2] == damp:
        # fitted by gptq_static_groups while the factorisation ran (the same function on the same inputs); a
        # dampening raised by a failed Cholesky since then makes them stale: fitted again below
        if tuple(groups[0].shape) != (R, G) or tuple(groups[1].shape) != (R, G):
            raise ValueError(f"groups: scales {tuple(groups[0].shape)} / zeros {tuple(groups[1].shape)}, expected "
                             f"{(R, G)} for a weight of shape {(R, K)}")
        scales, zeros = groups[0], groups[1]
        fitted = [True] * G
    elif static_groups:  # each group's block of H + damp I (the same values as slices of the whole sum)
        _fit_static_groups(grid, W_orig, H, damp, bounds, objective, scales, zeros)
        fitted = [True] * G

    Q = torch.zeros(R, K, dtype=torch.float32, device=dev)  # codes, sweep order
    sweep, sweep_cols = _block_sweep(dev, grid)
    total_loss = torch.zeros((), dtype=torch.float64, device=dev) if compute_loss else None

    into = _sweep_in_place(sweep)
    lazy = _lazy_mode(dev)
    Ebuf = None  # the in-place sweep's errors, one buffer for every block
    sweep_cfg = None  # the in-place sweep's launch settings, read once
    all_fitted = all(fitted)
    if all_fitted:  # static groups: the host needs no group index (its copy would wait for the queued work)
        gidx = group_pos = None
    else:
        gidx = gidx_dev.tolist()  # group of each sweep position, on the host
        group_pos = [invperm[a:b] for a, b in bounds]  # sweep positions of each group
    if into is not None:
        from lowbit.kernels.triton.gptq_sweep import sweep_config

        sweep_cfg = sweep_config()
    if cuda_graph and dev.type == "cuda" and into is not None and all_fitted and total_loss is None and \
            blocksize <= sweep_cols:
        # every block through the in-place sweep: the loop is a fixed sequence of kernels, replayed from a graph
        Q = _graphed_loop(into, W, U, scales, zeros, gidx_dev, Q, grid.maxq, blocksize, sweep_cfg, lazy)
        K_done = K
    else:
        K_done = 0
    for i1 in range(K_done, K, blocksize):
        i2 = min(i1 + blocksize, K)
        count = i2 - i1
        ready = all_fitted or all(fitted[gi] for gi in gidx[i1:i2])  # every group the block touches is fitted
        if into is not None and count <= sweep_cols and ready:  # the fused sweep without the copies
            Ebuf = _sweep_step(into, W, i1, i2, scales, zeros, gidx_dev, U, grid.maxq, Q, Ebuf, sweep_cfg, lazy,
                               total_loss)
            continue
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        # per-column scale/zero of this block, gathered once (refreshed when a group is fitted)
        cols = gidx_dev[i1:i2]
        S1, Z1 = scales[:, cols], zeros[:, cols]
        # the whole block in one fused sweep when every group it touches is already fitted (static groups)
        fused = sweep is not None and count <= sweep_cols and ready
        if fused:
            Qb, Err1 = sweep(W1, S1, Z1, U1, grid.maxq)
            Q[:, i1:i2] = Qb
        Ut = None if fused else U1.t().contiguous()  # Ut[:, i] = U1[i, :] as a contiguous column
        for i in range(0 if fused else count):
            gi = None if all_fitted else gidx[i1 + i]
            if gi is not None and not fitted[gi]:
                pos = group_pos[gi]
                # current values of the group's columns (lazy updates of later blocks applied here)
                cur = torch.empty(R, pos.numel(), dtype=W.dtype, device=dev)
                inside = (pos >= i1) & (pos < i2)
                if bool(inside.any()):
                    cur[:, inside] = W1[:, pos[inside] - i1]
                if bool((~inside).any()):
                    later = pos[~inside]
                    cur[:, ~inside] = W[:, later] - Err1[:, :i] @ U[i1:i1 + i][:, later]
                if objective == "sweep":
                    p0 = int(pos.min())
                    s, z = _sweep_select(grid, cur, U[p0:p0 + pos.numel(), p0:p0 + pos.numel()])
                elif objective == "hessian":
                    s, z = grid.fit(cur, _schur_objective(U, pos, i1 + i))
                else:
                    s, z = grid.fit(cur, None)
                scales[:, gi], zeros[:, gi] = s, z
                fitted[gi] = True
                S1, Z1 = scales[:, cols], zeros[:, cols]
            w = W1[:, i]
            sc, zc = S1[:, i], Z1[:, i]
            q = grid.quantize_column(w, sc, zc)
            Q[:, i1 + i] = q
            err = (w - (q - zc) * sc) / U1[i, i]
            if i + 1 < count:  # rank-1 update of the rest of the block
                W1[:, i + 1:].addr_(err, Ut[i + 1:, i], alpha=-1.0)
            Err1[:, i] = err
        if total_loss is not None:
            total_loss += Err1.double().square().sum()
        if i2 < K:
            _lazy_update(W, Err1, U, i1, i2, lazy)

    codes = Q[:, invperm]
    if refit:
        Hd = H + damp * torch.eye(K, dtype=H.dtype, device=dev)
        scales = refit_scales(W_orig, Hd, codes, scales, zeros, g)
    return GPTQResult(codes=codes.to(torch.uint8), scales=scales, zeros=zeros,
                      loss=float(total_loss) / 2 if total_loss is not None else float("nan"),
                      damp=damp, bits=grid.bits, group_size=g, sym=grid.sym, dtype=weight.dtype,
                      grid=grid if gguf_type is not None else None)


@dataclass
class _KQuantResult(GPTQResult):
    """GPTQ on a K-quant grid (:func:`lowbit.algorithms.grid.gptq_kquant`): ``kstate`` is the
    ``layout="gguf"`` QuantState of the super-blocks; ``codes`` holds its raw bytes."""

    kstate: Optional[object] = None

    @property
    def state(self):
        return self.kstate

    def dequantize(self) -> torch.Tensor:
        from lowbit.formats.kquants import dequantize_rows

        return dequantize_rows(self.kstate.data.cpu(), self.kstate.scheme).reshape(self.kstate.shape)


def _gptq_kquant_result(weight: torch.Tensor, H: torch.Tensor, qtype: str, percdamp: float) -> GPTQResult:
    from lowbit.algorithms.grid import gptq_kquant
    from lowbit.formats.kquants import QK_K, kquant_type

    st, loss = gptq_kquant(weight, H, qtype, percdamp=percdamp, dtype=weight.dtype)
    t = kquant_type(qtype)
    empty = torch.zeros(weight.shape[0], 0)
    return _KQuantResult(codes=st.data, scales=empty, zeros=empty, loss=loss, damp=0.0, bits=t.bits,
                         group_size=QK_K, sym=not t.has_min, dtype=weight.dtype, kstate=st)


def layer_output_error(weight: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the mean squared output error of the layer on the
    inputs that gave ``H = X^T X / n`` (summed over outputs)."""
    E = (weight.float() - w_hat.float())
    return float(((E @ H.float()) * E).sum())


__all__ = ["gptq_quantize", "gptq_factor", "gptq_static_groups", "GPTQResult", "refit_scales", "damped_inverse_cholesky", "layer_output_error",
           "GROUP_OBJECTIVES", "clear_solve_graphs"]
