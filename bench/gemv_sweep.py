"""Sweep of the fused low-bit GEMV's launch configurations (lowbit/kernels/triton/gemv.py) on the GPU.

For each format (nf4 b64, int4 g128 asym, GGUF q4_0, int8 per channel), M in {1, 4} and Llama-3-8B /
issue shapes, every ``(BN, BK, num_warps, num_stages)`` x ``split_k`` candidate is checked against the
float32 reference once and timed under a CUDA graph (10 calls rotating over weight copies larger than
L2, median of rounds). Prints and writes the winners as ``TUNED_GEMV`` rows for
``lowbit/kernels/triton_configs.py`` plus ``F.linear`` bf16 times for the speed-up.

    python bench/gemv_sweep.py --out OUT_DIR [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.kernels import linear as L  # noqa: E402
from lowbit.kernels.triton import gemv as gv  # noqa: E402
from lowbit.tensor.functional import quantize_tensor  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (1024, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]
FORMATS = {"nf4": ("nf4", dict(block_size=64)), "int4": ("int4_asym", dict(group_size=128)),
           "q4_0": ("q4_0", {}), "int8": ("int8", dict(axis=0))}
# (BN, BK, num_warps, num_stages, EW)
CONFIGS = [(16, 128, 4, 2, 1), (32, 128, 4, 2, 1), (32, 256, 4, 2, 1), (16, 256, 4, 2, 1), (8, 256, 4, 2, 1),
           (64, 128, 8, 2, 1), (32, 128, 4, 1, 1), (64, 64, 4, 2, 0), (128, 128, 8, 2, 0)]
CLASS = {"nf4": (4, "codebook", 64), "int4": (4, "int", 128), "q4_0": (4, "int", 32), "int8": (8, "int", 0)}
SPLITS = (1, 2, 4, 8, 16)
if True:
    SPLITS = (2, 4, 8, 16)


def time_graph(calls, rounds=5, reps=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for c in calls:
                c()
    g.replay()
    ts = []
    for _ in range(rounds):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (reps * len(calls)))
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda"
    res = {"gpu": torch.cuda.get_device_name(), "rows": [], "flinear": {}, "errors": []}
    shapes = SHAPES[:4] if args.quick else SHAPES
    for (N, K) in shapes:
        for fmt, (scheme, kw) in [(f, FORMATS[f]) for f in args.formats.split(",")]:
            if time.perf_counter() - t0 > args.budget:
                res["errors"].append(f"budget reached before {fmt} {N}x{K}")
                break
            nbytes = N * K // 2 if fmt != "int8" else N * K
            ncopy = max(2, min(8, int(3 * 60e6 // nbytes) + 1))
            W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            st = quantize_tensor(W, scheme, **kw)
            ps = []
            for i in range(ncopy):
                s2 = quantize_tensor(W.roll(i, 0), scheme, **kw) if i else st
                ps.append(L.prepare_linear(s2))
            wref = lowbit.dequantize(st).float()
            Wb = [W.roll(i, 0).contiguous() for i in range(ncopy)]
            for M in (1, 4):
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                key = f"{N}x{K} M={M}"
                if key not in res["flinear"]:
                    res["flinear"][key] = time_graph([lambda w=w: F.linear(x, w) for w in Wb])
                ref = x.float() @ wref.T
                best = None
                for cfg in CONFIGS:
                    p = ps[0]
                    bk = min(cfg[1], L._pow2_divisor(p.group))
                    for sk in SPLITS:
                        full = (cfg[0], bk, sk, cfg[2], cfg[3], cfg[4])
                        try:
                            y = gv.gemv(x, p.words, p.scales, p.zeros, p.table, None, N, K, p.bits, p.group, p.kind,
                                        p.zero, full, p.launch_cache)
                            err = ((y.float() - ref).norm() / ref.norm()).item()
                            if not err < 1e-2:
                                res["errors"].append(f"{fmt} {key} {full}: rel err {err}")
                                continue
                            t = time_graph([lambda q=q: gv.gemv(x, q.words, q.scales, q.zeros, q.table, None, N, K,
                                                                 q.bits, q.group, q.kind, q.zero, full, q.launch_cache)
                                            for q in ps])
                        except Exception as e:  # noqa: BLE001
                            res["errors"].append(f"{fmt} {key} {full}: {type(e).__name__}: {str(e)[:120]}")
                            continue
                        res["rows"].append({"fmt": fmt, "N": N, "K": K, "M": M, "cfg": full, "us": t})
                        if best is None or t < best[1]:
                            best = (full, t)
                if best:
                    res.setdefault("best", []).append({"fmt": fmt, "N": N, "K": K, "M": M, "cfg": best[0], "us": best[1]})
                    fl = res["flinear"][key]
                    bw = (nbytes + ps[0].scales.numel() * 4) / (best[1] * 1e-6) / 1e9
                    print(f"{fmt:5s} {key:18s} best {best[0]} {best[1]:7.1f} us  F.linear {fl:7.1f} us  "
                          f"x{fl / best[1]:.2f}  weight read {bw:.0f} GB/s", flush=True)
            del ps, Wb, W, st
            torch.cuda.empty_cache()
            (out / "gemv_sweep.json").write_text(json.dumps(res))
    (out / "gemv_sweep.json").write_text(json.dumps(res))
    tuned = {}
    for fmt, (b, cls, g) in CLASS.items():
        rows = sorted((r for r in res.get("best", []) if r["fmt"] == fmt), key=lambda r: (r["N"] * r["K"], r["M"]))
        if not rows:
            continue
        table = [[r["N"], r["K"], r["M"], r["cfg"]] for r in rows]
        big = max(r["N"] * r["K"] for r in rows)
        for m in (1, 4):
            last = [r for r in rows if r["N"] * r["K"] == big and r["M"] == m]
            if last:
                table.append([1 << 30, 1 << 30, m, last[0]["cfg"]])
        tuned[f"{b},{cls},{g}"] = table
        if g:
            tuned.setdefault(f"{b},{cls},0", table)
    (out / "gemv_tuned.json").write_text(json.dumps(tuned, indent=1))
    print(f"errors: {len(res['errors'])}; first: {res['errors'][:5]}")
    print(f"sweep took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
