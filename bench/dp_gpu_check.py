"""GPU checks of the data-parallel changes of run 7 (issue 20), on one GPU, in a few seconds; JSON to --out.

* factorisation: ``gptq_factor`` of 8B-shaped Hessians (k = 4096, 14336) with ``method="inverse"`` (two
  Cholesky factorisations and an inverse) and ``"flip"`` (one Cholesky + chunked triangular inverse), warm
  timings and the relative difference of the factors;
* stacked pieces: a rank's q/k/v pieces (1024-row multiples) solved in one ``gptq_quantize`` call against each
  piece alone and against the whole linears (codes, scales, zeros bit-identical?), with the times;
* the fused sweep against its torch emulation (one block), as the earlier calls' smoke check.

    PYTHONPATH=$PWD python bench/dp_gpu_check.py --out $OUT/check.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, reps=2):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from lowbit.algorithms import gptq

    res = {"device": torch.cuda.get_device_name(0)}
    g = torch.Generator(device="cuda").manual_seed(5)
    Hs = {}
    for k in (4096, 14336):
        X = torch.randn(2 * k, k, device="cuda", generator=g)
        X[:, : k // 3] *= 3.0
        H = X.T @ X / X.shape[0]
        Hs[k] = H
        row = {}
        for m in ("inverse", "flip"):
            t, (U, d) = timed(lambda m=m: gptq.damped_inverse_cholesky(H, 0.01, method=m))
            row[m + "_s"] = t
            row[m] = U
        a, b = row.pop("inverse"), row.pop("flip")
        row["rel_diff"] = ((a.double() - b.double()).norm() / a.double().norm()).item()
        t, _ = timed(lambda: gptq.gptq_factor(H))
        row["gptq_factor_auto_s"] = t
        res[f"factor_{k}"] = row
        print("factor", k, row, flush=True)
        del X, a, b
    # stacked pieces (the 2-rank split of the q/k/v stage: rank 1 solves q[3072:], k, v)
    H = Hs[4096]
    f = gptq.gptq_factor(H)
    q = torch.randn(4096, 4096, device="cuda", generator=g) * 0.02
    k_ = torch.randn(1024, 4096, device="cuda", generator=g) * 0.02
    v = torch.randn(1024, 4096, device="cuda", generator=g) * 0.02
    solve = lambda w: gptq.gptq_quantize(w, H, 4, 128, False, factor=f)
    t_whole, whole = timed(lambda: [solve(w) for w in (q, k_, v)])
    t_alone, alone = timed(lambda: [solve(w) for w in (q[3072:], k_, v)])
    t_stack, stack = timed(lambda: solve(torch.cat([q[3072:], k_, v])))
    t_q0, q0 = timed(lambda: solve(q[:3072]))
    same = {}
    for key in ("codes", "scales", "zeros"):
        ref = torch.cat([getattr(whole[0], key), getattr(whole[1], key), getattr(whole[2], key)])
        same[key] = (torch.equal(torch.cat([getattr(q0, key), getattr(stack, key)]), ref)
                     and torch.equal(torch.cat([getattr(q0, key)] + [getattr(a, key) for a in alone]), ref))
    res["stacked"] = {"identical": same, "whole_qkv_3_calls_s": t_whole, "rank1_pieces_3_calls_s": t_alone,
                      "rank1_pieces_stacked_s": t_stack, "rank0_q_3072_s": t_q0}
    print("stacked", res["stacked"], flush=True)
    try:
        from lowbit.kernels.triton.gptq_sweep import sweep_block

        n = 128
        U = gptq.gptq_factor(Hs[4096][:n, :n].contiguous())[3]
        W = torch.randn(300, n, device="cuda")
        S = torch.rand(300, n, device="cuda") * .3 + .05
        Z = torch.randint(0, 16, (300, n), device="cuda").float()
        q1, e1 = sweep_block(W, S, Z, U, 15)
        q2, e2 = gptq.sweep_block_emulated(W, S, Z, U, 15)
        res["sweep_ok"] = {"code_mismatch": (q1 != q2).float().mean().item(), "err_max": (e1 - e2).abs().max().item()}
    except Exception as e:  # pragma: no cover
        res["sweep_ok"] = repr(e)
    print("sweep", res["sweep_ok"], flush=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
