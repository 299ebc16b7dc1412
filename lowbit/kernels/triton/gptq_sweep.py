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
