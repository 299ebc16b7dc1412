"""GPU time model of the calibrated PTQ pipeline (GPTQ, AWQ) on ``world`` GPUs of one host.

:func:`lowbit.model.plan.plan` predicts CPU seconds from a CPU GFLOP/s figure; on a GPU the costs are of
other kinds, so each part of a block's work has its own term (seconds per decoder block):

* **forward passes** (the block over the calibration tokens, the replay of its stages, the activation
  store and its offload): ``forward_flops x (serial + parallel / world)``, with ``forward_flops = 2 x
  block params x tokens``; the serial part is what every rank repeats (weights to the device, installing
  the quantized linears). Constants fitted on the H200 (``bench/results/scale_gpu_run4.json``, the time
  left after the timed parts: 8B-shaped 1 GPU 2.26 s per block, 2 GPUs 1.36 s; the 70B-class slice on
  2 GPUs, 5.3 s per block, agrees within 3%).
* **Hessian accumulation** (per-sample ``x^T x`` then the float64 sums; each rank its share of the
  samples): ``tokens / world x sum over the stages' inputs of 2 k^2 / gemm_rate`` plus
  ``samples / world x 20 bytes x k^2 / bandwidth`` (the fp32 product read, the float64 sum read and
  written).
* **factorisation** (the damped inverse Cholesky of each stage's Hessian; every rank does it):
  ``a + b k^3`` per stage (constants per method: ``"flip"``, one Cholesky and a chunked triangular inverse,
  the CUDA default since run 7; ``"inverse"``, runs 1-6).
* **GPTQ solve**: per linear (or row piece, see :func:`lowbit.model._ptq_solve._row_pieces`) ``K / 128``
  blocks of ``block_s + row_s x rows`` (the fused sweep and the group fits; per-block launches dominate
  below a few thousand rows) plus the lazy updates ``rows x K^2 x 2`` flops at the fp32 GEMM rate; with
  several ranks each rank solves its pieces (stacked into one call where they are 1024-row aligned, run 7 on),
  so the stage takes the slowest rank's time.
* **AWQ search**: ``20 x 2 x out x in x min(tokens, 4096)`` flops per linear at a fitted rate (one rank
  per stage: it does not shrink with ``world``).
* **collectives**: the float64 statistics all-reduced (``8 k^2`` bytes per stage) and the solved codes,
  scales and zeros broadcast, at the NVLink rate measured in run 4 (8.2 GB in 0.07 s).

:func:`measure_rates` replaces the GEMM, bandwidth and sweep constants by a short measurement (about 2 s,
plus the sweep kernel's compilation) on the CUDA device; :data:`H200` holds the values of such a
measurement and the fitted constants, with where they came from.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

#: rates and constants for the H200 (141 GB, NVLink), used when nothing is measured
H200: Dict[str, Any] = {
    "hess_gemm_flops": 4.0e14,    # bf16 bmm, fp32 accumulate, [2048 x k]^T [2048 x k] (assumed: ~60% of peak)
    "fp32_gemm_flops": 4.5e13,    # fp32 GEMM of the lazy block updates (cuBLAS SGEMM, TF32 off)
    "bandwidth": 3.0e12,          # bytes/s of the float64 += fp32 sums (HBM3e, ~70% of 4.8 TB/s)
    "sweep_block_s": 4.0e-4,      # per block of 128 columns: the fused sweep's launch, group fit, bookkeeping
    "sweep_row_s": 2.0e-8,        # per block and row
    # the forward passes with the activations offloaded to pinned host memory (runs 3-8: the reserve of the CPU
    # era left the store little device memory)
    "forward_serial_s_per_flop": 4.0e-15,    # fitted, scale_gpu_run4.json (see the module doc)
    "forward_parallel_s_per_flop": 1.58e-14,  # fitted, scale_gpu_run4.json
    # run 8 on (the pipeline of this model): the forward passes, the activation store and the rank agreement per
    # block, from the timers. Activations on the device (run 9: the GPU reserve from the modelled working set): a
    # constant per block (launches, installs) plus a part that shares out, fitted on scale_gpu_run9.json's 8B
    # runs (0.567 s per block on 1 GPU, 0.383 on 2); in pinned host memory (run 8, the CPU-era reserve): fitted
    # on scale_gpu_run8.json's 8B runs (1.165 / 0.737 s per block once the device share is taken out). The
    # 70B-class runs are out of sample (multi_gpu.md)
    "forward_block_s": 0.199,
    "forward_device_s_per_flop": 3.22e-15,
    "forward_host_serial_s_per_flop": 2.71e-15,
    "forward_host_parallel_s_per_flop": 7.48e-15,
    # share of the flip factorisation that is the chunked triangular inverse (shared out over the ranks, run 8
    # on): 8B 0.100 s per block on 1 GPU, 0.084 on 2 (scale_gpu_run9.json)
    "flip_inverse_share": 0.4,
    "awq_forward_s_per_flop": 2.58e-14,      # fitted, scale_gpu_run3.json (AWQ 8B 1 GPU: 2.95 s per block)
    # per stage, factor "inverse" (runs 1-6): fitted, run 4 (8B 0.30 s, 70B 1.73 s per block)
    "factor_a_s": 0.024,
    "factor_b_s_per_k3": 6.49e-14,
    # per stage, factor "flip" (the CUDA default from run 7): bench/results/run7_logs/check.json
    # (k 4096: 5.5 ms, 14336: 78 ms; run 7 measured 0.41 s per 4 8B blocks)
    "flip_factor_a_s": 0.006,
    "flip_factor_b_s_per_k3": 2.52e-14,
    "awq_search_s_per_flop": 6.6e-14,  # fitted, scale_gpu_run3.json (2.36 s per 8B block)
    "nvlink_bytes_s": 1.17e11,    # scale_gpu_run4.json: 8.2 GB of float64 Hessians all-reduced in 0.07 s
    "source": "constants (H200, bench/results/scale_gpu_run3/4.json and assumed GEMM rates)",
}

_MEASURED: Dict[str, Dict[str, Any]] = {}


def _timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(device: Any = "cuda") -> Dict[str, Any]:
    """:data:`H200` with the GEMM rates, the bandwidth and the sweep constants measured on ``device``
    (cached per device; the fitted constants stay)."""
    dev = torch.device(device)
    key = str(dev)
    if key in _MEASURED:
        return _MEASURED[key]
    from lowbit.algorithms.gptq import gptq_factor, gptq_quantize

    r = dict(H200)
    with torch.cuda.device(dev):
        k = 4096
        x = torch.randn(1, 2048, k, device=dev).bfloat16()
        from lowbit.algorithms.stats import half_gram

        if half_gram(x):
            t = _timed(lambda: torch.bmm(x.transpose(1, 2), x, out_dtype=torch.float32))
        else:
            xf = x.float()
            t = _timed(lambda: torch.bmm(xf.transpose(1, 2), xf))
        r["hess_gemm_flops"] = 2 * 2048 * k * k / t
        g = torch.randn(k, k, device=dev)
        acc = torch.zeros(k, k, device=dev, dtype=torch.float64)
        t = _timed(lambda: acc.add_(g))
        r["bandwidth"] = 20 * k * k / t
        a = torch.randn(4096, 128, device=dev)
        b = torch.randn(128, 8192, device=dev)
        t = _timed(lambda: a @ b)
        r["fp32_gemm_flops"] = 2 * 4096 * 128 * 8192 / t
        K = 1024
        X = torch.randn(2 * K, K, device=dev)
        H = X.T @ X / X.shape[0]
        f = gptq_factor(H)
        times = {}
        for R in (256, 4096):
            W = torch.randn(R, K, device=dev) * 0.02
            times[R] = _timed(lambda W=W: gptq_quantize(W, H, 4, 128, False, factor=f), repeats=2)
        blocks = K // 128
        gemm = [R * K * K / r["fp32_gemm_flops"] for R in (256, 4096)]  # sum over blocks of 2 R 128 (K - i2)
        row = max((times[4096] - gemm[1] - times[256] + gemm[0]) / (4096 - 256) / blocks, 0.0)
        r["sweep_row_s"] = row
        r["sweep_block_s"] = max((times[256] - gemm[0]) / blocks - row * 256, 1e-5)
        del x, g, acc, a, b, X, H, f
    r["source"] = f"measured on {torch.cuda.get_device_name(dev)} (GEMM, bandwidth, sweep); fitted constants of H200"
    _MEASURED[key] = r
    return r


def _block_structure(model: nn.Module, exclude=("lm_head",)) -> Tuple[int, int, List[List[Tuple[int, int]]]]:
    """``(number of blocks, params of one block, the first block's stages as [(in, out) per linear]])``."""
    from lowbit.model._ptq_blocks import _block_stages, _select_linears, find_blocks

    name, blocks = find_blocks(model)
    if blocks is None:
        raise ValueError("the GPU time model needs a list of decoder blocks")
    selected = _select_linears(model, None, list(exclude))
    prefix = f"{name}.0."
    stages = _block_stages(blocks[0], selected, prefix)
    shapes = [[(selected[n].in_features, selected[n].out_features) for n in st.names] for st in stages]
    params = sum(p.numel() for p in blocks[0].parameters())
    return len(blocks), params, shapes


def _pieces(outs: List[int], world: int, align: int = 1024) -> List[List[int]]:
    """Rows each rank solves of a stage's linears (the cut of :func:`lowbit.model._ptq_solve._row_pieces`):
    ``[[rows of each piece] per rank]``."""
    total = sum(outs)
    cuts = [min(total, int(round(total * r / world / align)) * align) for r in range(world)] + [total]
    per = [[] for _ in range(world)]
    off = 0
    for R in outs:
        for r in range(world):
            lo, hi = max(cuts[r], off), min(cuts[r + 1], off + R)
            if lo < hi:
                per[r].append(hi - lo)
        off += R
    return per


def _batched(rows: List[int], align: int = 1024) -> List[int]:
    """A rank's pieces as solved (:func:`lowbit.model._ptq_solve._solve_batches`): consecutive pieces stacked
    into one call while every piece but the last of a call is a multiple of ``align`` rows."""
    out, cur = [], 0
    for R in rows:
        cur += R
        if R % align:
            out.append(cur)
            cur = 0
    return out + ([cur] if cur else [])


def gpu_seconds(model: nn.Module, method: str, n_samples: int = 128, seq_len: int = 2048, world: int = 1,
                rates: Optional[Dict[str, Any]] = None, n_blocks: Optional[int] = None, factor: str = "flip",
                batch_pieces: bool = True, host_fraction: float = 0.0,
                shared_factor: bool = True, legacy_forward: bool = False) -> Dict[str, Any]:
    """Predicted seconds of ``quantize_model_ptq`` (GPTQ or AWQ, ``device="cuda"``) on ``world`` GPUs,
    per block and for ``n_blocks`` blocks (default: the model's), with the parts of a block.

    ``factor``: the factorisation (:data:`lowbit.algorithms.gptq.FACTORS`; ``"flip"``, the CUDA default since
    run 7, or ``"inverse"``, runs 1-6); ``batch_pieces``: a rank's row pieces solved in one call each where
    aligned (run 7 on; ``False``: one call per piece, runs 1-6). ``host_fraction``: the share of the activations
    the store keeps in pinned host memory (0: all on the device, as run 9 on for the 8B shape at 16 GB and the 70B
    class at 40 GB; 1: runs 3-8, whose forward constants are kept); ``shared_factor``: the flip factorisation's
    triangular inverse shared out over the ranks (run 8 on); ``legacy_forward``: the forward constants of runs 3-7
    (fitted on run 4, whose pipeline also spent about 2.5 s outside the blocks), for those runs' checks."""
    if factor not in ("flip", "inverse"):
        raise ValueError(f"factor={factor!r}: expected 'flip' or 'inverse'")
    factor_method = factor
    method = method.lower()
    if method not in ("gptq", "awq"):
        raise ValueError(f"the GPU time model covers the calibrated methods gptq and awq, not {method!r}")
    if world < 1:
        raise ValueError(f"world={world!r}: at least one GPU")
    r = rates or H200
    blocks, params, stages = _block_structure(model)
    n_blocks = blocks if n_blocks is None else n_blocks
    tokens = n_samples * seq_len
    fwd_flops = 2.0 * params * tokens
    if not 0.0 <= host_fraction <= 1.0:
        raise ValueError(f"host_fraction={host_fraction!r}: expected a share between 0 and 1")
    def c(key):
        return r.get(key, H200[key])

    if legacy_forward:
        host = fwd_flops * (r["forward_serial_s_per_flop"] + r["forward_parallel_s_per_flop"] / world)
    else:
        host = fwd_flops * (c("forward_host_serial_s_per_flop") + c("forward_host_parallel_s_per_flop") / world)
    dev = c("forward_block_s") + fwd_flops * c("forward_device_s_per_flop") / world
    forward = host * host_fraction + dev * (1.0 - host_fraction)
    if method == "awq":  # AWQ's passes (the absolute means too): the ratio fitted on run 3 (host store)
        forward *= r["awq_forward_s_per_flop"] / (r["forward_serial_s_per_flop"] + r["forward_parallel_s_per_flop"])
    ks = [st[0][0] for st in stages]
    hessian = sum(2.0 * tokens / world * k * k / r["hess_gemm_flops"]
                  + n_samples / world * 20.0 * k * k / r["bandwidth"] for k in ks)
    comm = sum(8.0 * k * k for k in ks) / r["nvlink_bytes_s"] if world > 1 else 0.0
    factor = solve = 0.0
    if method == "gptq":
        if factor_method == "flip":
            fa = r.get("flip_factor_a_s", H200["flip_factor_a_s"])
            fb = r.get("flip_factor_b_s_per_k3", H200["flip_factor_b_s_per_k3"])
        else:
            fa, fb = r["factor_a_s"], r["factor_b_s_per_k3"]
        share = r.get("flip_inverse_share", H200["flip_inverse_share"]) if factor_method == "flip" and \
            shared_factor and world > 1 else 0.0
        factor = sum(fa + fb * k ** 3 * (1.0 - share + share / world) for k in ks)
        for st in stages:
            K = st[0][0]
            nblk = -(-K // 128)
            per_rank = _pieces([o for _, o in st], world) if world > 1 else [[o for _, o in st]]
            if world > 1 and batch_pieces:
                per_rank = [_batched(rows) for rows in per_rank]
            cost = [sum(nblk * (r["sweep_block_s"] + r["sweep_row_s"] * R) + R * K * K / r["fp32_gemm_flops"]
                        for R in rows) for rows in per_rank]
            solve += max(cost)
            if world > 1:  # codes (1 byte) + fp32 scales and zeros per group of 128, from every owner
                comm += sum(o * K * (1 + 8 / 128) for _, o in st) / r["nvlink_bytes_s"]
    else:
        solve = sum(20 * 2.0 * o * i * min(tokens, 4096) for st in stages for i, o in st) * r["awq_search_s_per_flop"]
    per_block = forward + hessian + factor + solve + comm
    return {"method": method, "world": world, "n_blocks": n_blocks, "per_block_s": per_block,
            "seconds": per_block * n_blocks, "forward_s": forward, "hessian_s": hessian, "factor_s": factor,
            "solve_s": solve, "comm_s": comm, "rates_source": r.get("source", "")}


__all__ = ["H200", "measure_rates", "gpu_seconds"]
