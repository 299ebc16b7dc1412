"""The 8B down_proj factor's Cholesky on one GPU: ``split_cholesky`` (session 11) against ``cholesky_ex``, both on the
same damped, act-order-permuted Hessian of random inputs (K = 14336): times (after a warm-up, CUDA-synchronised, 5 runs
each, the median) and the largest difference of the factors relative to the largest entry.

    python bench/chol_split_probe.py --out DIR        # writes DIR/chol_split_probe.json
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    from lowbit.algorithms.gptq import split_cholesky

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=14336)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(4096, args.k, device=dev, generator=g)
    X[:, : args.k // 2] *= 3.0
    H = X.T @ X / X.shape[0]
    del X
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    H = H.flip((0, 1)).contiguous()

    def timed(fn):
        out = []
        for _ in range(6):
            A = H.clone()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            L, info = fn(A)
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return statistics.median(out[1:]), L, int(info)

    t_whole, Lw, iw = timed(torch.linalg.cholesky_ex)
    t_split, Ls, is_ = timed(split_cholesky)
    res = {"k": args.k, "device": torch.cuda.get_device_name(0), "whole_ms": t_whole * 1e3, "split_ms": t_split * 1e3,
           "info": [iw, is_], "max_rel_diff": float((Lw - Ls).abs().max() / Lw.abs().max())}
    print("chol_split_probe", json.dumps(res), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "chol_split_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
