"""Session 10 probe (GPU): would two more batched forms keep GPTQ's bits? (1) the block update of fixed 1024-row chunks
as one batched GEMM (``baddbmm_`` over a chunk view) instead of one ``addmm_`` per chunk; (2) the fits' per-group
losses ``((e @ S) * e).sum(-1)`` as one ``bmm`` over the groups instead of one product per group. Both must give every
chunk's / group's result bit for bit as its own call does, whatever the number of chunks or groups batched (the
data-parallel ranks solve other row counts than one process). Prints and writes JSON; changes nothing.

    python bench/dp_bits_probe.py --out DIR
"""
import argparse
import json
import os
import time

import torch


def timed(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def lazy_probe(dev, g):
    out = []
    for K in (4096, 14336):
        U = torch.randn(K, K, device=dev, generator=g) * 0.01
        for R in (1024, 2048, 3072, 4096, 14336):
            W0 = torch.randn(R, K, device=dev, generator=g)
            E = torch.randn(R, 128, device=dev, generator=g)
            for i2 in (128, K // 2, K - 128):
                Ub = U[i2 - 128:i2, i2:]
                a = W0.clone()
                rest = a[:, i2:]
                for r1 in range(0, R, 1024):
                    rest[r1:r1 + 1024].addmm_(E[r1:r1 + 1024], Ub, alpha=-1.0)
                b = W0.clone()
                nc = R // 1024
                rb = b[:, i2:].as_strided((nc, 1024, K - i2), (1024 * K, K, 1), i2)
                rb.baddbmm_(E.view(nc, 1024, 128), Ub.unsqueeze(0).expand(nc, -1, -1), alpha=-1.0)
                t_loop = timed(lambda: [W0[r1:r1 + 1024, i2:].addmm_(E[r1:r1 + 1024], Ub, alpha=-1.0)
                                        for r1 in range(0, R, 1024)])
                rw = W0[:, i2:].as_strided((nc, 1024, K - i2), (1024 * K, K, 1), i2)
                t_b = timed(lambda: rw.baddbmm_(E.view(nc, 1024, 128), Ub.unsqueeze(0).expand(nc, -1, -1), alpha=-1.0))
                out.append({"K": K, "R": R, "i2": i2, "equal": bool(torch.equal(a, b)), "loop_ms": round(t_loop, 3),
                            "batched_ms": round(t_b, 3)})


    return out


def loss_probe(dev, g):
    out = []
    C, gs = 21, 128
    for R in (1024, 2048, 3072, 4096, 14336):
        for G in (1, 2, 5, 7, 11):
            if R * G * C * gs * 4 > 2 ** 31:
                continue
            e = torch.randn(G, C, R, gs, device=dev, generator=g)
            X = torch.randn(G, 256, gs, device=dev, generator=g)
            S = X.transpose(1, 2) @ X
            ref = torch.stack([((e[j] @ S[j]) * e[j]).sum(-1) for j in range(G)], -1)
            bm = torch.bmm(e.view(G, C * R, gs), S)
            got = (bm.view(G, C, R, gs) * e).sum(-1).permute(1, 2, 0)
            prod_eq = all(torch.equal(bm[j].view(C, R, gs), e[j] @ S[j]) for j in range(G))
            t_ref = timed(lambda: torch.stack([((e[j] @ S[j]) * e[j]).sum(-1) for j in range(G)], -1))
            t_b = timed(lambda: (torch.bmm(e.view(G, C * R, gs), S).view(G, C, R, gs) * e).sum(-1))
            out.append({"R": R, "G": G, "products_equal": prod_eq, "losses_equal": bool(torch.equal(got, ref)),
                        "loop_ms": round(t_ref, 3), "batched_ms": round(t_b, 3)})

    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "lazy": lazy_probe(dev, g), "loss": loss_probe(dev, g)}
    for k in ("lazy", "loss"):
        eq = [r for r in res[k] if r.get("equal", r.get("losses_equal"))]
        print(k, f"{len(eq)}/{len(res[k])} equal;", "loop ms", round(sum(r["loop_ms"] for r in res[k]), 2),
              "batched ms", round(sum(r["batched_ms"] for r in res[k]), 2))
    with open(os.path.join(args.out, "dp_bits_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
