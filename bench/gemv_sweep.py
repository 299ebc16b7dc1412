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
gv = None  # lowbit.kernels.triton.gemv, imported in main (the report needs no Triton)
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


def report(paths, out_md: Path) -> None:
    """Render the best config per (format, shape, M) of one or more sweep JSONs as a markdown table."""
    lines = ["# Fused low-bit GEMV (lowbit/kernels/triton/gemv.py) vs F.linear at M = 1 and 4, H200", "",
             "Written by `python bench/gemv_sweep.py --report " + " ".join(str(p) for p in paths) + "` from the raw "
             "sweep files (numbers from the runs, never edited). Times: median of CUDA-graph replays, 10 calls "
             "rotating over weight copies larger than L2, bf16 activations; `F.linear` is bf16 x bf16 on the same "
             "shape. 'GB/s' = bytes of codes + float32 scales over the kernel time (the card copies ~4300 GB/s).", ""]
    for path in paths:
        res = json.loads(Path(path).read_text())
        best = {}
        for r in res["rows"]:
            k = (r["fmt"], r["N"], r["K"], r["M"])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
        lines += [f"## {Path(path).name} ({res.get('gpu', '?')})", "",
                  "| format | N x K | M | best config (BN, BK, split, warps, stages[, EW]) | GEMV µs | F.linear µs | "
                  "speed vs F.linear | GB/s |", "|---|---|---|---|---|---|---|---|"]
        for (fmt, N, K, M), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1] * kv[0][2], kv[0][3])):
            fl = res["flinear"].get(f"{N}x{K} M={M}")
            bits = 8 if fmt == "int8" else 4
            group = {"nf4": 64, "int4": 128, "q4_0": 32}.get(fmt, K)
            nbytes = N * K * bits / 8 + N * (K // group) * 4 * (2 if fmt == "int4" else 1)
            lines.append(f"| {fmt} | {N} x {K} | {M} | {tuple(r['cfg'])} | {r['us']:.1f} | {fl:.1f} | "
                         f"{fl / r['us']:.2f}x | {nbytes / (r['us'] * 1e-6) / 1e9:.0f} |")
        lines.append("")
    out_md.write_text("\n".join(lines) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--report":
        report([Path(a) for a in argv[1:]], ROOT / "bench" / "results" / "gemv_sweep.md")
        return
    global gv
    from lowbit.kernels.triton import gemv as gv

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
