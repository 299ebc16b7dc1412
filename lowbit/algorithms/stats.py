"""Calibration statistics kept as sums over samples, so that shards can be all-reduced.

GPTQ needs the Hessian of the layer-wise squared error, ``H = 2 X^T X / n`` (Frantar et al., 2022);
AWQ needs the mean absolute activation per input channel (Lin et al., 2023). Both are kept here as
plain sums plus a token count: adding the sums of several processes (``torch.distributed.all_reduce``)
gives exactly the statistics of the union of their samples, without changing the algorithms.

Example::

    >>> st = InputStats(576)
    >>> st.add(torch.randn(4, 512, 576))
    >>> st.hessian().shape, st.count
    (torch.Size([576, 576]), 2048)
"""
from __future__ import annotations

from typing import Optional

import torch


def gram(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``x^T x`` for ``x [n, k]``, computing only the block upper triangle and mirroring it.

    The Gram matrix is symmetric, so about half of a plain ``x.t() @ x`` is redundant: with blocks of
    ``block`` columns this does ``k (k + block) / 2`` instead of ``k^2`` dot products per row (40% less
    work; measured on the 2-core CPU: 39% less time for a 1536-wide input, 28% for 576); the result
    is exactly symmetric.

    >>> x = torch.randn(100, 600, dtype=torch.float64)
    >>> torch.allclose(gram(x), x.t() @ x)
    True
    """
    if x.dim() != 2:
        raise ValueError(f"gram expects a 2-D [n, k] tensor, got shape {tuple(x.shape)}")
    k = x.shape[1]
    if k <= block:
        return x.t() @ x
    out = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for a in range(0, k, block):
        b = min(a + block, k)
        out[a:b, a:] = x[:, a:b].t() @ x[:, a:]
        out[b:, a:b] = out[a:b, b:].t()
    return out


def half_gram(x: torch.Tensor) -> bool:
    """Whether :meth:`InputStats.add_samples` forms the per-sample ``x^T x`` of ``x`` from its bf16/fp16
    values directly (CUDA: a half-precision GEMM with fp32 accumulation and an fp32 result, ``bmm(...,
    out_dtype=float32)``) instead of an fp32 GEMM of the upcast values. The products of two half-precision
    values are exact in fp32, so both are fp32 sums of the same exact terms (in the GEMM's own order); on
    the H200 the fp32 GEMM of the 14,336-wide down_proj input made the Hessians 2.7 s of an 8B layer's
    10.5 s. ``LOWBIT_HESSIAN_GEMM=fp32`` keeps the fp32 GEMM."""
    import os

    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("LOWBIT_HESSIAN_GEMM", "auto") != "fp32")


_TRI = 128  # column block of the per-sample triangular products (add_samples)


class InputStats:
    """Sums over the inputs ``x [..., in]`` of one linear layer: ``X^T X``, ``sum |x|`` and the count."""

    def __init__(self, in_features: int, *, hessian: bool = True, absmean: bool = True,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, device=device, dtype=dtype) if hessian else None
        self.abs_sum = torch.zeros(in_features, device=device, dtype=dtype) if absmean else None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``[..., in_features]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.reshape(-1, self.in_features)
        dtype = self.xtx.dtype if self.xtx is not None else self.abs_sum.dtype
        if self.xtx is not None and self.xtx.device != x.device:
            self.to(x.device)
        x = x.to(dtype)
        if self.xtx is not None:
            self.xtx += gram(x)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    def add_samples(self, x: torch.Tensor) -> None:
        """Accumulate ``x [samples, ..., in]`` one sample at a time, in order (``[rows, in]``: one row
        per sample), each sample's ``x^T x`` computed alone in fp32 and added to the sums.

        With float64 sums (``dtype=torch.float64``) the result does not depend on how the samples were
        batched (micro-batch 1, 7 or all give the same bits, given the same per-sample inputs)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.detach()
        if x.dim() < 2:
            x = x.reshape(1, -1)
        samples = x.reshape(x.shape[0], -1, self.in_features)
        k = self.in_features
        dev = samples.device
        if self.xtx is not None and self.xtx.device != dev or self.abs_sum is not None and self.abs_sum.device != dev:
            self.to(dev)
        # per-sample products, a few samples per batched matmul (how many depends on k only, so the
        # same samples give the same bits whatever the micro-batch). Only the upper block triangle is
        # computed and summed (as :func:`gram` does): column blocks of ``_TRI`` against the columns from
        # the block's start on, then mirrored. Each element is the same fp32 dot product over the sample's
        # rows as in a full product; the float64 sums are added sample after sample, element-wise, so the
        # order of the additions (and the bits) do not depend on how the work is cut.
        per = max(1, (64 * 2 ** 20) // (k * k * 4))
        half = half_gram(samples)
        # on CUDA the full product (one GEMM per few samples: fewer launches, measured on the H200); on the
        # CPU the upper block triangle (half the flops)
        tri = not samples.is_cuda
        blk = _TRI if k > _TRI else k
        # the fp32 product added to the float64 sums: on CUDA in one add (the elementwise kernel converts each
        # element as it reads it; session 9: the row slices below cost 100 launches per sample at k = 14336 and
        # made the accumulation wait for the host), elsewhere in row slices (the CPU converts a whole operand
        # first: no k x k float64 temporary). The same element-wise sums either way.
        rows = k if samples.is_cuda else max(1, (16 * 2 ** 20) // (k * 8))
        need_fp32 = not half or tri or self.abs_sum is not None
        for a in range(0, samples.shape[0], per):
            xh = samples[a:a + per]
            xs = xh.float() if need_fp32 else None
            if self.xtx is not None:
                if not tri:
                    if half:  # bf16/fp16 inputs: tensor-core products, fp32 accumulation and output
                        g = torch.bmm(xh.transpose(1, 2), xh, out_dtype=torch.float32)
                    else:
                        g = torch.bmm(xs.transpose(1, 2), xs)
                    for i in range(g.shape[0]):
                        for r in range(0, k, rows):
                            self.xtx[r:r + rows] += g[i, r:r + rows]
                    del g
                else:
                    for c in range(0, k, blk):
                        d = min(c + blk, k)
                        g = torch.bmm(xs[:, :, c:d].transpose(1, 2), xs[:, :, c:])  # [per, d - c, k - c]
                        tgt = self.xtx[c:d, c:]
                        for i in range(g.shape[0]):
                            tgt += g[i]
                        del g
            if self.abs_sum is not None:
                sa = xs.abs().sum(1)
                for i in range(sa.shape[0]):
                    self.abs_sum += sa[i]
            self.count += xh.shape[0] * xh.shape[1]
        if self.xtx is not None and tri:  # the lower triangle: a copy of the upper one (exactly symmetric)
            for c in range(0, k, blk):
                d = min(c + blk, k)
                self.xtx[d:, c:d] = self.xtx[c:d, d:].t()

    def to(self, device) -> "InputStats":
        if self.xtx is not None:
            self.xtx = self.xtx.to(device)
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum.to(device)
        return self

    def hessian(self) -> torch.Tensor:
        """``X^T X / n`` (GPTQ's ``H`` up to the factor 2, which cancels in every use)."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the Hessian (hessian=False)")
        if self.count == 0:
            raise ValueError("no calibration inputs reached this layer (count=0)")
        return self.xtx / self.count

    def hessian_as(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``hessian().to(dtype)`` computed in row slices: the same values without the full-size temporary of
        the division (a ``K x K`` float64 matrix: 6.6 GB for the 70B class's MLP width)."""
        if self.xtx is None or self.count == 0:
            return self.hessian().to(dtype)
        k = self.xtx.shape[0]
        out = torch.empty(self.xtx.shape, dtype=dtype, device=self.xtx.device)
        step = max(1, (64 * 2 ** 20) // max(k * 8, 1))
        for r in range(0, k, step):
            out[r:r + step] = (self.xtx[r:r + step] / self.count).to(dtype)
        return out

    def act_absmean(self) -> torch.Tensor:
        """Mean absolute activation per input channel (AWQ's ``s_x``)."""
        if self.abs_sum is None:
            raise ValueError("these statistics were collected without absolute means (absmean=False)")
        if self.count == 0:
            raise ValueError("no calibration inputs reached this layer (count=0)")
        return self.abs_sum / self.count

    def all_reduce(self, group=None) -> "InputStats":
        """Sum the statistics over a ``torch.distributed`` process group (no-op when not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        for t in (self.xtx, self.abs_sum):
            if t is not None:
                dist.all_reduce(t, group=group)
        n = torch.tensor([float(self.count)], device=(self.xtx if self.xtx is not None else self.abs_sum).device)
        dist.all_reduce(n, group=group)
        self.count = int(n.item())
        return self
