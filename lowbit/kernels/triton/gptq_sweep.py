"""Triton fused GPTQ column sweep: one block of columns of ``W`` quantized in one kernel launch.

:func:`lowbit.algorithms.gptq.gptq_quantize` sweeps the columns of a block one at a time; in torch that is
about 15 small kernels per column, so on a GPU the solve is bound by kernel launches and takes the same
time for 1,024 or 4,096 rows (``bench/results/multi_gpu.md``). Here one program holds a tile of
``BLOCK_R`` rows x the block's columns (up to 256) in registers and runs the whole sweep over them:

    for each column i of the block (sweep order):
        q   = clamp(rint(w_i / s_i) + z_i, 0, maxq)        # the grid's quantize_column
        err = (w_i - (q - z_i) * s_i) / U[i, i]
        w_j = fma(-err, U[i, j], w_j)   for the columns j > i of the block

and stores the codes and the errors; the lazy update of the columns beyond the block stays one cuBLAS
product in the caller. Every row is solved on its own, so a row's result does not depend on how many rows
are solved together (data-parallel runs cut the rows between the ranks).

Shapes and dtypes: ``W1``, ``S1``, ``Z1`` fp32 ``[R, count]`` (the per-column scale and zero of the
column's group, already fitted), ``U1`` fp32 ``[count, count]`` upper triangular (any row stride, unit
column stride); returns codes (fp32, integer-valued) and errors, fp32 ``[R, count]``.

Numerics: divisions are ``div_rn`` (IEEE, as torch's), rounding half-to-even, no floating-point
contraction except the explicit ``fma`` of the update (torch's CUDA ``addr_`` computes ``self + alpha *
v1 * v2`` with one rounding under nvcc's default contraction). The torch sweep is the reference; codes can
differ where a value lands within a rounding of a grid midpoint (``tests/test_gptq_sweep.py`` measures the
fraction on the GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_COLUMNS = 256  # the widest block kept in registers


@triton.jit
def _rint(x):
    # round half to even for |x| < 2**22 (float32 magic number; compiled without fp contraction). Larger
    # |x| only occurs far outside the grid, where the clamp decides the code.
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _sweep_kernel(w_ptr, s_ptr, z_ptr, u_ptr, q_ptr, e_ptr, R, stride_w, stride_s, stride_u, maxq,
                  COUNT: tl.constexpr, BLOCK_R: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BC)
    cmask = cols < COUNT
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * stride_w + cols[None, :]
    W = tl.load(w_ptr + offs, mask=m2, other=0.0)
    Q = tl.zeros([BLOCK_R, BC], dtype=tl.float32)
    E = tl.zeros([BLOCK_R, BC], dtype=tl.float32)
    for i in range(0, COUNT):
        sel = cols[None, :] == i
        w = tl.sum(tl.where(sel, W, 0.0), axis=1)  # column i (one non-zero term per row: exact)
        s = tl.load(s_ptr + rows * stride_s + i, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows * stride_s + i, mask=rmask, other=0.0)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(w, s)) + z, 0.0), maxq)
        d = tl.load(u_ptr + i * stride_u + i)
        err = tl.math.div_rn(w - (q - z) * s, d)
        u = tl.load(u_ptr + i * stride_u + cols, mask=cmask & (cols > i), other=0.0)
        W = tl.fma(-err[:, None], u[None, :], W)
        Q = tl.where(sel, q[:, None], Q)
        E = tl.where(sel, err[:, None], E)
    out = rows[:, None] * BC + cols[None, :]
    tl.store(q_ptr + out, Q, mask=m2)
    tl.store(e_ptr + out, E, mask=m2)


@triton.jit
def _sweep_into_kernel(w_ptr, s_ptr, z_ptr, g_ptr, u_ptr, q_ptr, e_ptr, R, stride_w, stride_s, stride_u, stride_q,
                       maxq, COUNT: tl.constexpr, BLOCK_R: tl.constexpr, BC: tl.constexpr, PRELOAD: tl.constexpr):
    # _sweep_kernel reading the block in place (``w_ptr``: its first column, row stride ``stride_w``), each
    # column's scale and zero gathered from the ``[R, G]`` tables through the block's group index ``g_ptr``,
    # the codes written into the caller's code matrix (``q_ptr``: the block's first column, row stride
    # ``stride_q``) and the errors into ``e_ptr`` ``[R, BC]``. The same operations per row as _sweep_kernel.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BC)
    cmask = cols < COUNT
    m2 = rmask[:, None] & cmask[None, :]
    W = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=m2, other=0.0)
    gcol = tl.load(g_ptr + cols, mask=cmask, other=0)
    if PRELOAD:  # the block's scales and zeros as tiles, read once (a column is then picked like w)
        St = tl.load(s_ptr + rows[:, None] * stride_s + gcol[None, :], mask=m2, other=1.0)
        Zt = tl.load(z_ptr + rows[:, None] * stride_s + gcol[None, :], mask=m2, other=0.0)
    Q = tl.zeros([BLOCK_R, BC], dtype=tl.float32)
    E = tl.zeros([BLOCK_R, BC], dtype=tl.float32)
    for i in range(0, COUNT):
        sel = cols[None, :] == i
        w = tl.sum(tl.where(sel, W, 0.0), axis=1)  # column i (one non-zero term per row: exact)
        if PRELOAD:
            s = tl.sum(tl.where(sel, St, 0.0), axis=1)
            z = tl.sum(tl.where(sel, Zt, 0.0), axis=1)
        else:
            gi = tl.load(g_ptr + i)
            s = tl.load(s_ptr + rows * stride_s + gi, mask=rmask, other=1.0)
            z = tl.load(z_ptr + rows * stride_s + gi, mask=rmask, other=0.0)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(w, s)) + z, 0.0), maxq)
        d = tl.load(u_ptr + i * stride_u + i)
        err = tl.math.div_rn(w - (q - z) * s, d)
        u = tl.load(u_ptr + i * stride_u + cols, mask=cmask & (cols > i), other=0.0)
        W = tl.fma(-err[:, None], u[None, :], W)
        Q = tl.where(sel, q[:, None], Q)
        E = tl.where(sel, err[:, None], E)
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], Q, mask=m2)
    tl.store(e_ptr + rows[:, None] * BC + cols[None, :], E, mask=m2)


#: launch settings of :func:`sweep_into` (rows per program, warps, scales/zeros read as tiles), from the
#: environment variable ``LOWBIT_GPTQ_SWEEP_CFG`` (``"rows,warps,preload"``, e.g. ``"16,4,0"``); the bits do not
#: depend on them (every row is swept on its own)
def sweep_config() -> tuple:
    import os

    cfg = os.environ.get("LOWBIT_GPTQ_SWEEP_CFG", "")
    if not cfg:
        return DEFAULT_CONFIG
    try:
        r, w, p = (int(x) for x in cfg.split(","))
    except ValueError:
        raise ValueError(f"LOWBIT_GPTQ_SWEEP_CFG={cfg!r}: expected 'rows,warps,preload', e.g. '16,4,0'") from None
    if r < 1 or r & (r - 1) or w not in (1, 2, 4, 8, 16) or p not in (0, 1):
        raise ValueError(f"LOWBIT_GPTQ_SWEEP_CFG={cfg!r}: rows a power of two, warps 1-16, preload 0 or 1")
    return r, w, p


#: rows per program, warps, preload: 8 rows / 4 warps measured fastest on the H200 (run 10 profile: 100 us per
#: 128-column block of 4096 rows, 117 us with 16 rows / 4 warps; 209 against 236 us at 14336 rows)
DEFAULT_CONFIG = (8, 4, 0)


def sweep_into(W: torch.Tensor, i1: int, count: int, scales: torch.Tensor, zeros: torch.Tensor,
               gidx: torch.Tensor, U1: torch.Tensor, maxq: int, Q: torch.Tensor, E: torch.Tensor,
               config: tuple = None, checked: bool = False) -> torch.Tensor:
    """One GPTQ block swept in place: columns ``[i1, i1 + count)`` of ``W`` (fp32 ``[R, K]``, unit column
    stride) with the per-group ``scales``/``zeros`` (fp32 ``[R, G]``) of the columns' groups ``gidx``
    (int64 ``[count]``); the codes go into ``Q[:, i1:i1 + count]`` (fp32 ``[R, K]``), the errors into
    ``E[:, :count]`` (fp32 ``[R, BC]``, BC the next power of two >= count, at least 16), which is returned.
    The same codes and errors as :func:`sweep_block` of the gathered block, with none of its copies.
    ``checked``: the caller already passed these ``W``, ``Q``, ``scales``, ``zeros`` and ``E`` through a checked call
    (a solve's later blocks: the checks were a good part of the host's time per block)."""
    R = W.shape[0]
    if count > MAX_COLUMNS:
        raise ValueError(f"sweep_into: {count} columns, at most {MAX_COLUMNS}")
    bc = max(16, triton.next_power_of_2(count))
    if U1.stride(-1) != 1:
        U1 = U1.contiguous()
    if not checked:
        for name, t in (("W", W), ("Q", Q), ("scales", scales), ("zeros", zeros), ("U1", U1), ("E", E)):
            if t.dtype != torch.float32 or t.stride(-1) != 1:
                raise ValueError(f"sweep_into: {name} must be float32 with unit column stride")
        if scales.stride() != zeros.stride() or tuple(E.shape) != (R, bc) or not E.is_contiguous():
            raise ValueError("sweep_into: scales/zeros of equal strides and E [R, BC] contiguous expected")
    elif U1.dtype != torch.float32:
        raise ValueError("sweep_into: U1 must be float32")
    rows, warps, preload = config or sweep_config()
    grid = (triton.cdiv(R, rows),)
    _sweep_into_kernel[grid](W[:, i1:], scales, zeros, gidx, U1, Q[:, i1:], E, R, W.stride(0), scales.stride(0),
                             U1.stride(0), Q.stride(0), float(maxq), COUNT=count, BLOCK_R=rows, BC=bc,
                             PRELOAD=bool(preload), num_warps=warps, enable_fp_fusion=False)
    return E


def sweep_block(W1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, U1: torch.Tensor, maxq: int,
                block_rows: int = 16, num_warps: int = 4):
    """Codes and errors (fp32 ``[R, count]`` each) of one GPTQ block; see the module doc."""
    R, count = W1.shape
    if count > MAX_COLUMNS:
        raise ValueError(f"sweep_block: {count} columns, at most {MAX_COLUMNS}")
    W1, S1, Z1 = (t.float().contiguous() for t in (W1, S1, Z1))
    if U1.stride(1) != 1:
        U1 = U1.contiguous()
    bc = max(16, triton.next_power_of_2(count))
    Q = torch.empty(R, bc, dtype=torch.float32, device=W1.device)
    E = torch.empty(R, bc, dtype=torch.float32, device=W1.device)
    grid = (triton.cdiv(R, block_rows),)
    _sweep_kernel[grid](W1, S1, Z1, U1, Q, E, R, W1.stride(0), S1.stride(0), U1.stride(0), float(maxq),
                        COUNT=count, BLOCK_R=block_rows, BC=bc, num_warps=num_warps, enable_fp_fusion=False)
    if bc != count:
        Q, E = Q[:, :count], E[:, :count].contiguous()
    return Q, E
