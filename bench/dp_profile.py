"""Where the data-parallel GPTQ solve's time goes on the GPU (issue 20, run 10 profile; ``nvidia-h200-x2``).

Part 1 (``--solve``, one GPU): GPTQ int4 g128 asym of the 8B shapes the 1- and 2-GPU runs solve (the whole linears
and the row pieces of a rank), random weights, a Hessian of random correlated inputs:

* the solve before run 10 (one fit per group, the copying block sweep: ``LOWBIT_GPTQ_FITS=group
  LOWBIT_GPTQ_SWEEP_INTO=0``) against run 10's (batched fits, the in-place sweep): wall per call (synchronised,
  after a warm-up call), codes / scales / zeros identical;
* the parts of run 10's solve: the static fits alone, the block sweeps alone (``K / 128`` kernel launches on the
  same block), the GPU's busy time (kernel durations summed by ``torch.profiler``) against the wall;
* the sweep kernel's launch settings (rows per program, warps, scales read as tiles): microseconds per 128-column
  block of 4096 / 2048 / 14336 rows, outputs identical to the default's.

Part 2 (``--comm``, under ``torchrun --nproc-per-node 2``): NCCL ``all_gather`` / ``broadcast`` seconds for 16-256
MB, the factorisation with its triangular inverse shared out or computed by every rank (k = 4096, 14336).

    python bench/dp_profile.py --solve --out $OUT/solve.json
    torchrun --nproc-per-node 2 bench/dp_profile.py --comm --out $OUT/comm.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = {"q_1gpu": (4096, 4096), "kv_1gpu": (1024, 4096), "gate_up": (14336, 4096), "down_1gpu": (4096, 14336),
          "qkv_rank": (3072, 4096), "o_rank": (2048, 4096), "down_rank": (2048, 14336)}


def _problem(R, K, seed, dev):
    g = torch.Generator(device=dev).manual_seed(seed)
    X = torch.randn(2048, K, generator=g, device=dev)
    X[:, : K // 3] *= 3.0
    X = X @ (torch.eye(K, device=dev) + 0.05 * torch.randn(K, K, generator=g, device=dev))
    H = X.T @ X / X.shape[0]
    W = torch.randn(R, K, generator=g, device=dev) * 0.02
    return W, H


def _sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def solve_profile(out_path):
    from lowbit.algorithms import gptq as G
    from lowbit.algorithms.grid import AffineGrid
    from lowbit.kernels.triton import gptq_sweep as S

    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "shapes": {}, "configs": {}}
    factors = {}
    for name, (R, K) in SHAPES.items():
        W, H = _problem(R, K, 0, dev)
        if K not in factors:
            factors[K] = G.gptq_factor(H.clone(), 0.01, True)
        f = factors[K]
        Hf = f[0]
        row = {"rows": R, "k": K}
        outs = {}
        for label, env in (("before", {"LOWBIT_GPTQ_FITS": "group", "LOWBIT_GPTQ_SWEEP_INTO": "0"}),
                           ("run10", {"LOWBIT_GPTQ_FITS": "batched", "LOWBIT_GPTQ_SWEEP_INTO": "1"})):
            os.environ.update(env)
            G.gptq_quantize(W, Hf, 4, 128, False, factor=f)  # warm-up (compiles)
            ts = []
            for _ in range(2):
                r, t = _sync_time(lambda: G.gptq_quantize(W, Hf, 4, 128, False, factor=f))
                ts.append(t)
            outs[label] = r
            row[f"{label}_s"] = min(ts)
        a, b = outs["before"], outs["run10"]
        row["identical"] = all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("codes", "scales", "zeros"))
        # parts of run 10's solve
        grid = AffineGrid(bits=4, sym=False, search="mse", n_grid=20, max_shrink=0.5, refine=0)
        bounds = [(i, min(i + 128, K)) for i in range(0, K, 128)]
        sc = torch.zeros(R, len(bounds), device=dev)
        zr = torch.zeros_like(sc)
        Wo = W.float().clone()
        for mode in ("group", "batched"):
            os.environ["LOWBIT_GPTQ_FITS"] = mode
            G._fit_static_groups(grid, Wo, Hf, f[4], bounds, "hessian", sc, zr)
            _, t = _sync_time(lambda: G._fit_static_groups(grid, Wo, Hf, f[4], bounds, "hessian", sc, zr))
            row[f"fits_{mode}_s"] = t
        U = f[3]
        Q = torch.zeros(R, K, device=dev)
        E = torch.empty(R, 128, device=dev)
        gidx = torch.arange(K, device=dev) // 128
        Wp = W.float().clone()

        def sweeps():
            for i1 in range(0, K, 128):
                S.sweep_into(Wp, i1, 128, sc, zr, gidx[i1:i1 + 128], U[i1:i1 + 128, i1:i1 + 128], 15, Q, E)
        sweeps()
        _, t = _sync_time(sweeps)
        row["sweeps_s"] = t
        row["sweep_per_block_us"] = t / (K // 128) * 1e6

        def lazy():
            for i1 in range(0, K - 128, 128):
                G._lazy_update(Wp, E, U, i1, i1 + 128)
        _, t = _sync_time(lazy)
        row["lazy_updates_s"] = t
        os.environ["LOWBIT_GPTQ_FITS"] = "batched"
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            G.gptq_quantize(W, Hf, 4, 128, False, factor=f)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        kern = {}
        for e in prof.key_averages():
            dt = getattr(e, "device_time_total", None)
            if dt is None:
                dt = getattr(e, "cuda_time_total", 0)
            if dt:
                kern[e.key] = kern.get(e.key, 0.0) + dt / 1e6
        row["profiled_wall_s"] = wall
        row["gpu_busy_s"] = sum(kern.values())
        row["top_kernels_s"] = dict(sorted(kern.items(), key=lambda kv: -kv[1])[:8])
        res["shapes"][name] = row
        print(name, {k: v for k, v in row.items() if k != "top_kernels_s"}, flush=True)
        del W, H, Q, E, Wp, Wo
    # sweep launch settings
    for R in (4096, 2048, 14336):
        K = 4096
        U = factors[K][3]
        W = torch.randn(R, K, device=dev) * 0.02
        sc = torch.rand(R, 32, device=dev) * 0.01 + 0.002
        zr = torch.randint(0, 16, (R, 32), device=dev).float()
        gidx = torch.arange(K, device=dev) // 128
        ref = None
        for cfg in ((16, 4, 0), (16, 4, 1), (8, 4, 0), (8, 2, 0), (8, 1, 0), (16, 2, 0), (32, 4, 0), (32, 8, 0),
                    (4, 1, 0), (16, 8, 0), (8, 2, 1), (32, 4, 1)):
            Q = torch.zeros(R, K, device=dev)
            E = torch.empty(R, 128, device=dev)
            try:
                for i1 in range(0, 256, 128):  # compile
                    S.sweep_into(W, i1, 128, sc, zr, gidx[i1:i1 + 128], U[i1:i1 + 128, i1:i1 + 128], 15, Q, E, config=cfg)
                st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                st.record()
                for i1 in range(0, K, 128):
                    S.sweep_into(W, i1, 128, sc, zr, gidx[i1:i1 + 128], U[i1:i1 + 128, i1:i1 + 128], 15, Q, E, config=cfg)
                en.record()
                torch.cuda.synchronize()
                us = st.elapsed_time(en) * 1e3 / (K // 128)
                same = None
                if ref is None:
                    ref = (Q.clone(), E.clone())
                else:
                    same = bool(torch.equal(ref[0], Q) and torch.equal(ref[1], E))
                res["configs"][f"{R}x{cfg}"] = {"us_per_block": us, "identical_to_default": same}
                print("sweep", R, cfg, round(us, 1), same, flush=True)
            except Exception as e:  # a setting that does not compile: recorded
                res["configs"][f"{R}x{cfg}"] = {"error": repr(e)[:300]}
                print("sweep", R, cfg, "error", repr(e)[:200], flush=True)
    with open(out_path, "w") as fh:
        json.dump(res, fh, indent=1)


def comm_profile(out_path):
    import torch.distributed as dist

    from lowbit.algorithms import gptq as G
    from lowbit.model import distributed as D

    D.init_from_env(torch.device("cuda"))
    rank, world = D.rank_world()
    dev = torch.device("cuda", torch.cuda.current_device())
    res = {"world": world, "collectives": {}, "factor": {}}
    for mb in (16, 64, 256):
        n = mb * 2 ** 20
        x = torch.full((n,), rank, dtype=torch.uint8, device=dev)
        outs = [torch.empty_like(x) for _ in range(world)]
        for name, fn in (("all_gather", lambda: dist.all_gather(outs, x)), ("broadcast", lambda: dist.broadcast(x, 0))):
            fn()
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t = (time.perf_counter() - t0) / 3
            res["collectives"][f"{name}_{mb}MB"] = {"s": t, "GB_per_s_per_rank": n / t / 1e9}
    for K in (4096, 14336):
        _, H = _problem(8, K, 1, dev)
        for mode in ("every", "shared"):
            share = D.shared_chunks if mode == "shared" else None
            G.gptq_factor(H.clone(), 0.01, True, share=share)
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f = G.gptq_factor(H.clone(), 0.01, True, share=share)
            torch.cuda.synchronize()
            res["factor"][f"k{K}_{mode}_s"] = time.perf_counter() - t0
            del f
    # the per-pass rank agreement's own cost (no imbalance: right after a barrier)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(20):
        D.min_over_ranks(3)
    res["min_over_ranks_s"] = (time.perf_counter() - t0) / 20
    print(rank, res, flush=True)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(res, fh, indent=1)
    dist.barrier()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--solve", action="store_true")
    ap.add_argument("--comm", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.solve:
        solve_profile(a.out)
    if a.comm:
        comm_profile(a.out)


if __name__ == "__main__":
    main()
