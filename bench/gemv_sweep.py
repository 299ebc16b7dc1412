"""Fused low-bit GEMV/GEMM v2 (lowbit/kernels/triton/lowbit_mm.py) on the GPU: correctness, sweep, report.

One GPU run (``--out DIR``) does, inside ``--budget`` seconds:

1. correctness of the v2 kernels through ``lowbit.kernels.linear.prepared_linear`` (the module dispatch) for
   every weight format (nf4 / fp4 b64, int4 g32/64/128 sym and asym, GGUF q4_0 / q4_1 / q8_0, int8 per
   channel) at several M, bf16 and fp16, with and without bias, against ``x @ dequantize(state).T`` in float32;
   the Triton dequantize of the word layout against ``lowbit.dequantize`` (bit-exact);
2. a sweep of launch configs (CUDA-graph medians, 10+ calls rotating over weight copies larger than L2) for
   nf4 b64 and int4 g128 asym at M in {1, 4, 16, 64, 256} on the Llama-3-8B / issue shapes, each candidate
   checked against the reference before it is timed; beside it ``F.linear`` bf16, the v1 dispatch
   (``prepared_linear_v1``) and the v2 dispatch with the winners (graph and eager);
3. writes ``mm_sweep.json`` (everything) and ``mm_tuned.json`` (winners as ``TUNED_MM`` rows).

``--report JSON`` renders ``bench/results/gemv_sweep.md`` and ``gemv_sweep.png`` from such a file.

Runs 6 / 7 (``--run6 [--round 2]``, helper gemv5): the multi-group GEMV ("gemvq*") at M = 1 beside the committed
config, F.linear and torchao int4 g128; ``--prewarm N`` compiles every candidate first in N processes (Triton's
on-disk cache; ``--prewarm-only`` stops there), ``--check-m1`` checks the shipped M = 1 rows for every format (one
process per format) and writes ``check_m1.json``. The device calls: ``bench/gemv5_call.sh``, ``bench/gemv5_check.sh``.

    python bench/gemv_sweep.py --out OUT_DIR [--budget 240]
    python bench/gemv_sweep.py --run6 --round 2 --prewarm 10 --skip-check --out OUT_DIR --budget 75
    python bench/gemv_sweep.py --report bench/results/raw/mm_sweep.json
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

import lowbit  # noqa: E402,F401
from lowbit.kernels import linear as L  # noqa: E402
from lowbit.kernels import triton_configs as TC  # noqa: E402
from lowbit.tensor.functional import quantize_tensor  # noqa: E402

# (N, K): issue shapes (8192², 28672 x 8192) and Llama-3-8B decode shapes
SHAPES = [(4096, 4096), (8192, 8192), (28672, 8192), (4096, 14336), (14336, 4096)]
SWEEP_FORMATS = {"nf4": ("nf4", dict(block_size=64)), "int4": ("int4_asym", dict(group_size=128))}
CHECK_FORMATS = [("nf4", dict(block_size=64)), ("fp4", dict(block_size=64)), ("int4", dict(group_size=32)),
                 ("int4", dict(group_size=64)), ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=32)),
                 ("int4_asym", dict(group_size=64)), ("int4_asym", dict(group_size=128)), ("q4_0", {}), ("q4_1", {}),
                 ("q8_0", {}), ("int8", dict(axis=0))]
MS = (1, 4, 16, 64, 256)
GEMV = [(32, 32, 4, 2), (64, 32, 4, 2), (16, 32, 4, 2), (32, 64, 4, 2), (64, 16, 4, 2), (128, 16, 8, 2)]
GEMV_SPLITS = (0, 1, 2, 4, 8, 16)
# run 2 (--gemvg): the group-step GEMV with transposed scales, beside v1 and the best v2 layout of run 1
GEMVG = [("gemvg", 128, 8, 4, 2), ("gemvg", 64, 8, 4, 2), ("gemvg", 256, 8, 8, 2), ("gemvg", 128, 16, 4, 2),
         ("gemvg", 64, 4, 4, 2), ("gemv", 16, 32, 4, 2)]
GEMVG_SPLITS = (0, 1, 2, 4, 8)
GEMM = {16: [(16, 64, 32, 4, 2), (16, 128, 32, 4, 3), (16, 64, 16, 4, 3), (16, 32, 32, 4, 2)],
        64: [(64, 64, 32, 4, 2), (64, 128, 32, 8, 3), (32, 64, 32, 4, 2), (64, 64, 16, 4, 3)],
        256: [(64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)]}
GEMM_SPLITS = (0, 1, 2, 4)
GEMVG_MODE = False
# run 3 (--run3): NF4 at M = 1 through the group-step GEMV with the byte-pair table ("gemvgp"), and M = 8 / 16
# through the v1 tensor-core GEMM with explicit configs ("v1gemm", BN, kstep, split, warps, stages), beside the
# v1 dispatch and dequantize + cuBLAS
RUN3 = False
RUN7 = False  # --run6 --round 2: run 7's candidates (run7_candidates)
RUN6 = False  # --run6: M = 1 multi-group GEMVs ("gemvq*") vs the committed config and torchao int4 (helper gemv5)
RUN5 = False  # --run5: M = 1 NF4 through the shuffle-codebook GEMV ("gemvgs*"), scale layouts, M = 16 / 64 re-timed
COMMITTED = False  # --committed: only the shipped TUNED_MM choice per (format, shape, M), re-timed beside F.linear / v1
GEMVGP = [("gemvgp", 128, 8, 4, 2), ("gemvgp", 64, 8, 4, 2), ("gemvgp", 128, 16, 4, 2), ("gemvgp", 64, 4, 4, 2),
          ("gemvgp", 256, 8, 8, 2), ("gemvg", 64, 4, 4, 2)]
V1GEMM = [(bn, ks, 4, st) for bn in (32, 64, 128) for ks in (128, 256) for st in (2, 3)]
V1GEMM_SPLITS = (1, 2, 4, 8)


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


def time_eager(calls, rounds=5, reps=3):
    for c in calls:
        c()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            for c in calls:
                c()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (reps * len(calls)))
    return statistics.median(ts)


def rotated_weights(N, K, scheme, kw):
    """A random bf16 ``[N, K]`` weight for timing: ``(prepared layouts of quantized row-rotated copies, the first
    copy's dequantized float32 weight, bf16 rotated copies, bytes one quantized copy reads)``; enough copies of
    each (2-8) that successive calls do not find the weight in the 50 MB L2."""
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    ncopy = max(2, min(8, int(3 * 60e6 // (N * K // 2)) + 1))
    sts = [quantize_tensor(W.roll(i, 0), scheme, **kw) for i in range(ncopy)]
    ps = [L.prepare_linear(s) for s in sts]
    p = ps[0]
    wref = L.dequantize_state(sts[0]).float()
    Wb = [W.roll(i, 0).contiguous() for i in range(max(2, min(8, int(3 * 60e6 // (N * K * 2)) + 1)))]
    nbytes = N * K * p.bits // 8 + p.scales.numel() * p.scales.element_size() + (
        p.zeros.numel() * p.zeros.element_size() if p.zeros is not None else 0)
    return ps, wref, Wb, nbytes


def rel(y, ref):
    y = y.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm()).item()


def check(res, t0, budget):
    """Every format x M x dtype through prepared_linear (default or tuned configs) vs float32 reference."""
    torch.manual_seed(0)
    N, K = 384, 1024
    for scheme, kw in CHECK_FORMATS:
        W = torch.randn(N, K, device="cuda") * 0.02
        st = quantize_tensor(W, scheme, **kw)
        p = L.prepare_linear(st)
        name = f"{scheme} {kw}"
        if p is None:
            res["check"].append({"fmt": name, "error": "no prepared layout"})
            continue
        wref = L.dequantize_state(st).float()
        for dt in (torch.bfloat16, torch.float16):
            d = p.dense(dt)
            res["check"].append({"fmt": name, "what": f"dense {dt}", "exact": bool(torch.equal(d, wref.to(dt)))})
        for M in (1, 2, 3, 4, 16, 64, 256):
            for dt in ((torch.bfloat16, torch.float16) if M in (1, 16) else (torch.bfloat16,)):
                if time.perf_counter() - t0 > budget * 0.3:
                    res["errors"].append("check: budget")
                    return
                x = torch.randn(M, K, device="cuda").to(dt)
                b = (torch.randn(N, device="cuda") * 0.1).to(dt) if M in (3, 16) else None
                ref = x.float() @ wref.T + (b.float() if b is not None else 0)
                try:
                    y = L.prepared_linear(x, p, b)
                    e = rel(y, ref)
                except Exception as ex:  # noqa: BLE001
                    e = float("inf")
                    res["errors"].append(f"check {name} M={M} {dt}: {type(ex).__name__}: {str(ex)[:200]}")
                tol = 1e-2 if dt == torch.bfloat16 else 2e-3
                res["check"].append({"fmt": name, "M": M, "dtype": str(dt), "bias": b is not None, "err": e,
                                     "ok": e < tol})
        print(f"check {name}: {sum(r.get('ok', r.get('exact', False)) for r in res['check'] if r['fmt'] == name)}/"
              f"{sum(1 for r in res['check'] if r['fmt'] == name)} ok", flush=True)


def sweep(res, t0, budget):
    from lowbit.kernels.triton import lowbit_mm as lm

    saved = {k: list(v) for k, v in TC.TUNED_MM.items()}  # the committed table (run 6 restores it after each row)
    for (N, K) in SHAPES:
        for fmt, (scheme, kw) in SWEEP_FORMATS.items():
            if time.perf_counter() - t0 > budget:
                res["errors"].append(f"sweep: budget before {fmt} {N}x{K}")
                return
            if RUN7 and fmt not in ("nf4", "int4", "int8") and (N, K) not in SHAPES[:2]:
                continue  # int4 sym / Q4_0: the shapes only
            ps, wref, Wb, nbytes = rotated_weights(N, K, scheme, kw)
            p = ps[0]
            for M in MS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ wref.T
                key = f"{N}x{K} M={M}"
                row = {"fmt": fmt, "N": N, "K": K, "M": M, "bytes": nbytes}
                row["flinear_graph"] = time_graph([lambda w=w: F.linear(x, w) for w in Wb])
                row["flinear_eager"] = time_eager([lambda w=w: F.linear(x, w) for w in Wb])
                try:
                    if RUN6:  # v1 measured in earlier runs; run 6 times the committed config instead
                        raise StopIteration
                    row["v1_graph"] = time_graph([lambda q=q: L.prepared_linear_v1(x, q) for q in ps])
                    row["v1_eager"] = time_eager([lambda q=q: L.prepared_linear_v1(x, q) for q in ps])
                except StopIteration:
                    pass
                except Exception as ex:  # noqa: BLE001
                    res["errors"].append(f"v1 {fmt} {key}: {type(ex).__name__}: {str(ex)[:160]}")
                cands = []
                if RUN6:
                    committed = TC.config_mm(p.bits, p.kind, M, N, K, p.group)
                    cands = (run7_candidates if RUN7 else run6_candidates)(fmt, M, committed)
                    cands = list(dict.fromkeys(tuple(c) for c in cands))
                    if fmt == "int4" and M == 1 and "torchao" not in row:  # the peer, same x, same weight copies
                        mods, why = torchao_int4(N, K, Wb)
                        if mods is None:
                            res["errors"].append(why)
                        else:
                            try:
                                yt = mods[0](x)
                                row["torchao_err"] = rel(yt, x.float() @ Wb[0].float().T)
                                row["torchao_graph"] = time_graph([lambda m=m: m(x) for m in mods])
                                row["torchao_eager"] = time_eager([lambda m=m: m(x) for m in mods])
                                row["torchao"] = True
                            except Exception as ex:  # noqa: BLE001
                                res["errors"].append(f"torchao {key}: {type(ex).__name__}: {str(ex)[:160]}")
                        del mods
                elif COMMITTED:
                    cands = [TC.config_mm(p.bits, p.kind, M, N, K, p.group)]
                elif RUN5:
                    committed = TC.config_mm(p.bits, p.kind, M, N, K, p.group)
                    if M == 1 and fmt == "nf4":
                        cands = [("gemvgsf", bn, bkw, sk, 4 if bn <= 128 else 8, 2) for bn in (64, 128, 256)
                                 for bkw in (8, 4) for sk in (4, 8, 16)]
                        cands += [("gemvgs", 128, 8, sk, 4, 2) for sk in (4, 8, 16)]
                        cands += [("gemvgsft", 128, 8, 8, 4, 2), ("gemvgf", 128, 8, 8, 4, 2), ("v1",)]
                    elif M == 1 and fmt == "int4":
                        cands = [(nm, 128, 16, sk, 4, st) for nm in ("gemvgf", "gemvgft") for sk in (4, 8, 16)
                                 for st in (2, 3)]
                        cands += [("gemvg", 128, 16, 8, 4, 2), ("gemvgf", 64, 16, 8, 4, 2), ("gemvgf", 256, 16, 8, 8, 2)]
                        cands += [("gemvgsf", bn, bkw, sk, 4 if bn <= 128 else 8, 2) for bn in (128, 256)
                                  for bkw in (16, 8) for sk in (4, 8, 16)]  # exact code values by shuffles
                    elif M == 1:
                        cands = [committed, ("gemvgf", 128, 8, 8, 4, 2), ("gemvg", 128, 16, 8, 4, 2)]
                    else:
                        cands = [committed, ("dense",)] + ([("v1",)] if fmt != "int8" else [])
                    cands = list(dict.fromkeys(tuple(c) for c in cands))
                elif RUN3:
                    if M == 1 and fmt == "nf4":
                        cands = [(c[0], c[1], c[2], sk, c[3], c[4]) for c in GEMVGP for sk in (0, 2, 4, 8)]
                        cands += [("gemvgpf", bn, bkw, sk, 4, 2) for bn, bkw in ((128, 8), (64, 4)) for sk in (4, 8)]
                        cands.append(("v1",))
                    elif M == 1 and fmt == "int8":
                        cands = [(nm, bn, bkw, sk, 4, 2) for nm in ("gemvg", "gemvgf") for bn in (64, 128)
                                 for bkw in (8, 16) for sk in (4, 8)]
                    elif M == 1:
                        cands = [(nm, bn, bkw, sk, 4, st) for nm in ("gemvg", "gemvgf") for bn in (64, 128)
                                 for bkw in (8, 16) for st in (2, 3) for sk in (4, 8, 16)]
                    elif M > 4 and fmt != "int8":
                        cands = [("v1gemm", bn, ks, sk, w, st) for (bn, ks, w, st) in V1GEMM for sk in V1GEMM_SPLITS]
                        cands += [("v1",), ("dense",)]
                    if not cands:
                        continue
                elif GEMVG_MODE:
                    cands = [(c[0], c[1], c[2], sk, c[3], c[4]) for c in GEMVG for sk in GEMVG_SPLITS] + [("v1",)]
                elif M <= 4:
                    for (bn, bkw, w, s) in GEMV:
                        for sk in GEMV_SPLITS:
                            cands.append(("gemv", bn, bkw, sk, w, s))
                else:
                    for (bm, bn, bkw, w, s) in GEMM[M]:
                        for sk in GEMM_SPLITS:
                            cands.append(("gemm", bm, bn, bkw, sk, w, s))
                    cands.append(("dense",))
                best = None
                tried = []
                for cfg in cands:
                    if time.perf_counter() - t0 > budget:
                        break
                    try:
                        if cfg[0] == "dense":
                            def call(q, cfg=cfg):
                                return F.linear(x, q.dense(x.dtype))
                        elif cfg[0] == "v1":
                            def call(q, cfg=cfg):
                                return L.prepared_linear_v1(x, q)
                        elif cfg[0] == "v1gemm":
                            from lowbit.kernels.triton import gemm_4bit as gk

                            def call(q, cfg=cfg):
                                r = q.p4
                                return gk.launch(x, r.qweight, r.scales, r.zeros, r.values, None, N, K, r.group,
                                                 r.kind, ("gemm",) + cfg[1:], r.launch_cache)
                        else:
                            full = TC.config_mm(p.bits, p.kind, M, N, K) if False else cfg
                            if full[0].startswith("gemv") and full[3] == 0:
                                full = full[:3] + (TC._auto_split(-(-N // full[1]), (K // 8) // full[2],
                                                                  8 * TC.SM_COUNT),) + full[4:]
                            if full[0] == "gemm" and full[4] == 0:
                                full = full[:4] + (TC._auto_split(-(-M // full[1]) * -(-N // full[2]),
                                                                  (K // 8) // full[3], 2 * TC.SM_COUNT),) + full[5:]
                            plan = lm.make_plan(M, N, K, p.bits, p.group, p.kind, p.zero, x.dtype, False, full)
                            if plan.tsc:
                                for q in ps:
                                    q.transposed()

                            def call(q, plan=plan):
                                if plan.tr:
                                    s_, z_ = (q.sT, q.zT) if plan.tsc else (q.scales, q.zeros)
                                    t_ = q.table2 if plan.pair else (q.table if q.table is not None else q.itable)
                                    return lm.run_plan(plan, x, q.words, s_, z_, t_, None, N, K, K // q.group,
                                                       32 // q.bits)
                                return lm.run_plan(plan, x, q.words, q.scales, q.zeros, q.table2, None, N, K,
                                                   K // q.group, 32 // q.bits)
                        e = rel(call(p), ref)
                        if not e < 1e-2:
                            res["errors"].append(f"{fmt} {key} {cfg}: rel err {e}")
                            continue
                        t = time_graph([lambda q=q: call(q) for q in ps])
                    except Exception as ex:  # noqa: BLE001
                        res["errors"].append(f"{fmt} {key} {cfg}: {type(ex).__name__}: {str(ex)[:160]}")
                        continue
                    tried.append((cfg, t))
                    if RUN6 and cfg == cands[0]:
                        row["committed_cfg"], row["committed_graph"] = cfg, t
                    if best is None or t < best[1]:
                        best = (cfg, t)
                row["tried"] = tried
                if best:
                    row["best_cfg"], row["best_graph"] = best
                    if not COMMITTED:  # the dispatch with the winner (COMMITTED: the committed table as it is)
                        TC.TUNED_MM[(p.bits, "codebook" if p.kind == 0 else "int")] = [(M, N, K, best[0])]
                    for q in ps:
                        q.plans.clear()
                    try:
                        row["v2_eager"] = time_eager([lambda q=q: L.prepared_linear(x, q) for q in ps])
                        row["v2_graph"] = time_graph([lambda q=q: L.prepared_linear(x, q) for q in ps])
                    except Exception as ex:  # noqa: BLE001
                        res["errors"].append(f"dispatch {fmt} {key} {best[0]}: {type(ex).__name__}: {str(ex)[:160]}")
                    if not COMMITTED:
                        TC.TUNED_MM.clear()
                        if RUN6:
                            TC.TUNED_MM.update({k: list(v) for k, v in saved.items()})
                    for q in ps:
                        q.plans.clear()
                res["rows"].append(row)
                fl = row["flinear_graph"]
                bg = row.get("best_graph")
                print(f"{fmt:4s} {key:18s} F.linear {fl:7.1f} | v1 {row.get('v1_graph', float('nan')):7.1f} | "
                      f"v2 {bg if bg else float('nan'):7.1f} us ({fl / bg if bg else 0:.2f}x, "
                      f"{nbytes / (bg * 1e-6) / 1e9 if bg else 0:.0f} GB/s) eager v2 {row.get('v2_eager', 0):.1f} "
                      f"vs F.linear {row['flinear_eager']:.1f}  {row.get('best_cfg')}", flush=True)
            del ps, Wb
            torch.cuda.empty_cache()


def run7_candidates(fmt, M, committed):
    """Run 7 (helper gemv5's second call): run 6's winning families beside register prefetch two steps deep ("ff")
    and TMA with 16-bit activation loads ("mx", no shared-memory staging of the activations), 8-warp tiles; int4
    sym g128 ("int4s") and GGUF Q4_0 ("q4_0") through the integer class's candidates."""
    if fmt == "int8":
        fams = [("gemvqm", 128, 32, 4, 3), ("gemvqmx", 128, 32, 4, 3), ("gemvqm", 128, 64, 4, 3),
                ("gemvqm", 256, 32, 8, 3), ("gemvqm", 128, 32, 4, 4), ("gemvqmx", 256, 32, 8, 3)]
        splits = (4, 8, 16)
    elif fmt == "nf4":
        fams = [("gemvqs", 64, 32, 4, 1), ("gemvqsff", 128, 8, 4, 1), ("gemvqsff", 256, 8, 8, 1),
                ("gemvqsf", 128, 16, 4, 1), ("gemvqsmx", 128, 16, 4, 3), ("gemvqsmx", 64, 32, 4, 3),
                ("gemvqsmx", 128, 8, 4, 4), ("gemvqs", 128, 32, 4, 1), ("gemvqs", 64, 32, 2, 1)]
        splits = (4, 8, 16)
    elif fmt in ("int4s", "q4_0"):
        fams = [("gemvqf", 128, 16, 4, 1), ("gemvqm", 128, 16, 4, 3), ("gemvqff", 128, 16, 4, 1),
                ("gemvqmx", 128, 16, 4, 3)]
        splits = (4, 8)
    else:
        fams = [("gemvqf", 128, 16, 4, 1), ("gemvqm", 128, 16, 4, 3), ("gemvq", 64, 64, 4, 1),
                ("gemvqf", 256, 16, 8, 1), ("gemvqff", 128, 16, 4, 1), ("gemvqff", 256, 16, 8, 1),
                ("gemvqmx", 128, 16, 4, 3), ("gemvqmx", 128, 16, 4, 4), ("gemvqmx", 128, 32, 4, 3),
                ("gemvqmx", 256, 16, 8, 3), ("gemvqm", 256, 16, 8, 3), ("gemvqmx", 64, 64, 4, 3),
                ("gemvqf", 64, 16, 2, 1), ("gemvqff", 64, 16, 2, 1)]
        splits = (2, 4, 8, 16)
    return [committed] + [(nm, bn, bkw, sk, wp, st) for sk in splits for nm, bn, bkw, wp, st in fams]


def run6_candidates(fmt, M, committed):
    """Run 6 (helper gemv5): the multi-group GEMV ("gemvq": 1, 2 or 4 scale groups per step, exact integer decode
    with about one integer op per weight; suffix s = codebook by warp shuffles, f = register prefetch, m = words by
    tensor-descriptor (TMA) loads; last field = the loop's pipelining depth: 1 none, 3-4 loads that many steps - 1
    ahead through shared memory, TMA or cp.async) beside the committed config."""
    s = "s" if fmt == "nf4" else ""
    if fmt == "int8":
        return [committed] + ([("gemvq", 128, 16, 8, 4, 1), ("gemvq", 128, 32, 8, 4, 1), ("gemvqf", 128, 16, 8, 4, 1),
                               ("gemvq", 128, 32, 8, 4, 3), ("gemvqm", 128, 32, 8, 4, 3), ("gemvqm", 64, 64, 8, 4, 4)]
                              if M == 1 else [])
    if M > 1:
        return [committed, (f"gemvq{s}", 128, 16, 8, 4, 1), (f"gemvq{s}", 64, 32, 8, 4, 3),
                (f"gemvq{s}m", 128, 16, 4, 4, 3)]
    w = 16 if fmt == "int4" else 8  # words of one scale group (g128 int4 / b64 nf4)
    shapes = [(f"gemvq{s}", 128, w, 4, 1), (f"gemvq{s}", 128, 2 * w, 4, 1), (f"gemvq{s}", 64, 4 * w, 4, 1),
              (f"gemvq{s}", 256, w, 8, 1),
              (f"gemvq{s}f", 128, w, 4, 1), (f"gemvq{s}f", 128, 2 * w, 4, 1), (f"gemvq{s}f", 256, w, 8, 1),
              (f"gemvq{s}", 128, w, 4, 3), (f"gemvq{s}", 128, w, 4, 4), (f"gemvq{s}", 128, 2 * w, 4, 3),
              (f"gemvq{s}", 64, 4 * w, 4, 3),
              (f"gemvq{s}m", 128, w, 4, 3), (f"gemvq{s}m", 128, w, 4, 4), (f"gemvq{s}m", 128, 2 * w, 4, 3),
              (f"gemvq{s}m", 64, 4 * w, 4, 3), (f"gemvq{s}m", 64, 4 * w, 4, 4), (f"gemvq{s}m", 256, w, 8, 4)]
    return [committed] + [(nm, bn, bkw, sk, wp, st) for sk in (8, 4, 16) for nm, bn, bkw, wp, st in shapes]


def prewarm_jobs():
    """(format, config) of every run-6 candidate at M = 1 (the committed ones included)."""
    out, seen = [], set()
    for fmt in SWEEP_FORMATS:
        bits, kind = (8, 1) if fmt == "int8" else (4, 0 if fmt == "nf4" else 2)
        for (N, K) in (SHAPES if fmt in ("nf4", "int4", "int8") else SHAPES[:2]):
            for c in (run7_candidates if RUN7 else run6_candidates)(fmt, 1, TC.config_mm(bits, kind, 1, N, K, 128)):
                k = (fmt, c[:3] + c[4:], c[3] > 1)  # one compile per config up to the split count
                if k not in seen:
                    seen.add(k)
                    out.append((fmt, tuple(c)))
    return out


def prewarm_worker(i, n):
    """Compile (into Triton's on-disk cache) job i, i + n, ... of prewarm_jobs() by one launch each on a small weight
    with the same specialization as the timed shapes (256 x 8192: every size a multiple of 16)."""
    from lowbit.kernels.triton import lowbit_mm as lm

    jobs = prewarm_jobs()[i::n]
    done = 0
    for fmt in SWEEP_FORMATS:
        mine = [c for f, c in jobs if f == fmt]
        if not mine:
            continue
        scheme, kw = SWEEP_FORMATS[fmt]
        N, K = 256, 8192
        q = L.prepare_linear(quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw))
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for c in mine:
            try:
                plan = lm.make_plan(1, N, K, q.bits, q.group, q.kind, q.zero, x.dtype, False, c)
                if plan.tsc:
                    q.transposed()
                s_, z_ = (q.sT, q.zT) if plan.tsc else (q.scales, q.zeros)
                t_ = q.table2 if plan.pair else (q.table if q.table is not None else q.itable)
                lm.run_plan(plan, x, q.words, s_, z_, t_, None, N, K, K // q.group, 32 // q.bits)
                done += 1
            except Exception as ex:  # noqa: BLE001 - the sweep reports it
                print(f"prewarm {fmt} {c}: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
    torch.cuda.synchronize()
    print(f"prewarm worker {i}/{n}: {done}/{len(jobs)} compiled", flush=True)


def prewarm(n, extra):
    import subprocess

    t = time.perf_counter()
    argv = [sys.executable, __file__, "--run6", "--prewarm-worker"]
    procs = [subprocess.Popen(argv + [f"{i}/{n}"] + extra) for i in range(n)]
    for pr in procs:
        pr.wait()
    print(f"prewarm: {len(prewarm_jobs())} configs in {n} processes, {time.perf_counter() - t:.0f} s", flush=True)


CHECK_M1_SHAPES = [(384, 1024), (8192, 8192), (9000, 8192)]  # the shipped rows (4096, 4096), (8192, 8192), the last


def check_m1_worker(i):
    """The shipped M = 1 rows through prepared_linear for CHECK_FORMATS[i] on CHECK_M1_SHAPES (the rows of 4096^2,
    8192^2 and above 8192 rows: ragged N = 9000, TMA where the row has it): bf16 without bias and fp16 with bias
    against x @ dequantize(state).T in float32, then a CUDA-graph replay equal to the eager call. One JSON line."""
    scheme, kw = CHECK_FORMATS[i]
    out = []
    for N, K in CHECK_M1_SHAPES:
        torch.manual_seed(N)
        st = quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw)
        p = L.prepare_linear(st)
        if p is None:
            out.append({"fmt": f"{scheme} {kw}", "N": N, "K": K, "error": "no prepared layout"})
            continue
        wref = L.dequantize_state(st).float()
        for dt, bias in ((torch.bfloat16, False), (torch.float16, True)):
            x = torch.randn(1, K, device="cuda").to(dt)
            b = (torch.randn(N, device="cuda") * 0.1).to(dt) if bias else None
            ref = x.float() @ wref.T + (b.float() if b is not None else 0)
            r = {"fmt": f"{scheme} {kw}", "N": N, "K": K, "dtype": str(dt), "bias": bias,
                 "cfg": list(TC.config_mm(p.bits, p.kind, 1, N, K, p.group))}
            try:
                y = L.prepared_linear(x, p, b)
                y = L.prepared_linear(x, p, b)  # the direct launch
                r["err"] = rel(y, ref)
                r["ok"] = r["err"] < (1e-2 if dt == torch.bfloat16 else 2e-3)
                plan = next(v for k, v in p.plans.items() if k[0] == 1 and k[1] == dt)
                r["plan"] = getattr(plan, "consts", None) and {k: plan.consts[k] for k in ("BKW", "WPG", "PF", "TMA", "LS")
                                                                if k in plan.consts}
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    yg = L.prepared_linear(x, p, b)
                yg.zero_()
                g.replay()
                torch.cuda.synchronize()
                r["graph_equal"] = bool(torch.equal(yg, y))
            except Exception as ex:  # noqa: BLE001
                r["ok"], r["error"] = False, f"{type(ex).__name__}: {str(ex)[:200]}"
            out.append(r)
    print("CHECKM1 " + json.dumps(out, default=str), flush=True)


def check_m1(res):
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, "--check-m1-worker", str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(len(CHECK_FORMATS))]
    for pr in procs:
        got, _ = pr.communicate()
        for line in got.splitlines():
            if line.startswith("CHECKM1 "):
                res["check_m1"] += json.loads(line[len("CHECKM1 "):])
    bad = [r for r in res["check_m1"] if not r.get("ok") or not r.get("graph_equal", False)]
    print(f"check M = 1 (shipped rows): {len(res['check_m1']) - len(bad)}/{len(res['check_m1'])} ok", flush=True)
    for r in bad:
        print("NOT OK", r, flush=True)


def torchao_int4(N, K, Wb):
    """torchao int4 g128 (``Int4WeightOnlyConfig``, tile_packed_to_4d: tinygemm) modules of the bf16 copies, or
    (None, reason)."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        return None, f"torchao: {e!r}"[:200]
    mods = []
    try:
        for W in Wb:
            lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(W)
            try:
                quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
            except Exception:  # noqa: BLE001 - older torchao: its default packing
                quantize_(lin, Int4WeightOnlyConfig(group_size=128))
            mods.append(lin)
    except Exception as e:  # noqa: BLE001
        return None, f"torchao int4 setup: {e!r}"[:200]
    return mods, None


def tuned_rows(res):
    """Winners as TUNED_MM rows: per (class, M) the shapes in increasing N*K, then a catch-all of the largest."""
    out = {}
    for fmt, key in (("nf4", "4,codebook"), ("int4", "4,int"), ("int8", "8,int")):
        rows = [r for r in res["rows"] if r["fmt"] == fmt and "best_cfg" in r]
        if not rows:
            continue
        table = []
        for M in sorted({r["M"] for r in rows}):
            rm = sorted((r for r in rows if r["M"] == M), key=lambda r: r["N"] * r["K"])
            for r in rm:
                table.append([M, r["N"], r["K"], r["best_cfg"]])
            if rm:
                table.append([M, 1 << 30, 1 << 30, rm[-1]["best_cfg"]])
        out[key] = table
    return out


def merged_rows(res, base):
    """Run 3's winners merged into the committed table ``base`` (TUNED_MM as it was before the sweep): run 3's
    M = 1 rows replace the committed ones where run 3 has them, the committed M = 4 rows stay, run 3's M = 8 / 16
    rows follow (the first matching row applies, so rows stay in increasing M)."""
    new = tuned_rows(res)
    out = {}
    for key in ("4,codebook", "4,int", "8,int"):
        b, cls = key.split(",")
        old = [list(r[:3]) + [list(r[3])] for r in base.get((int(b), cls), [])]
        got = new.get(key, [])
        big = 1 << 30
        m1 = {(r[1], r[2]): r for r in old if r[0] == 1 and r[1] < big}
        m1.update({(r[1], r[2]): r for r in got if r[0] == 1 and r[1] < big})  # run 3's shapes win
        tail = [r for r in got if r[0] == 1 and r[1] >= big] or [r for r in old if r[0] == 1 and r[1] >= big]
        rows1 = sorted(m1.values(), key=lambda r: r[1] * r[2]) + tail
        out[key] = rows1 + [r for r in old if r[0] == 4] + [r for r in got if r[0] > 4]
    return out


def merged_rows6(res, base):
    """Run 6's M = 1 winners merged into the committed table ``base``: per shape the run's winner replaces the
    committed M = 1 row (shapes the run did not reach keep theirs; the catch-all M = 1 row takes the largest shape's
    winner), every row above M = 1 stays as committed."""
    new = tuned_rows(res)
    out = {}
    big = 1 << 30
    for key in ("4,codebook", "4,int", "8,int"):
        b, cls = key.split(",")
        old = [list(r[:3]) + [list(r[3])] for r in base.get((int(b), cls), [])]
        got = [r for r in new.get(key, []) if r[0] == 1]
        m1 = {(r[1], r[2]): r for r in old if r[0] == 1 and r[1] < big}
        m1.update({(r[1], r[2]): r for r in got if r[1] < big})
        tail = [r for r in got if r[1] >= big] or [r for r in old if r[0] == 1 and r[1] >= big]
        out[key] = sorted(m1.values(), key=lambda r: r[1] * r[2]) + tail + [r for r in old if r[0] > 1]
    return out


def check3(res):
    """Run 3's new paths through prepared_linear on the GPU (bf16 and fp16, with and without bias): the byte-pair
    group-step GEMV for codebooks at M <= 4, the register-prefetch group-step GEMVs, the v1 GEMM with explicit
    configs at M = 5 / 8 / 16."""
    torch.manual_seed(0)
    N, K = 384, 1024
    saved = {k: list(v) for k, v in TC.TUNED_MM.items()}
    try:
        for scheme, kw in (("nf4", dict(block_size=64)), ("int4", dict(group_size=128)),
                           ("int4_asym", dict(group_size=32))):  # kinds 0, 1, 2
            W = torch.randn(N, K, device="cuda") * 0.02
            st = quantize_tensor(W, scheme, **kw)
            p = L.prepare_linear(st)
            name = f"{scheme} {kw}"
            wref = L.dequantize_state(st).float()
            cls = "codebook" if p.kind == 0 else "int"
            cases = [(1, ("gemvgp", 64, 4, 2, 4, 2)), (3, ("gemvgp", 64, 4, 2, 4, 2)),
                     (1, ("gemvgpf", 128, 8, 4, 4, 2))] if p.kind == 0 else [(4, ("gemvgf", 64, 16, 2, 4, 2))]
            cases += [(1, ("gemvgf", 128, 8, 4, 4, 3)), (5, ("v1gemm", 64, 128, 1, 4, 2)),
                      (16, ("v1gemm", 64, 128, 4, 4, 2))]
            for M, cfg in cases:
                for dt in ((torch.bfloat16, torch.float16) if M == 1 else (torch.bfloat16,)):
                    TC.TUNED_MM[(4, cls)] = [(16, 1 << 30, 1 << 30, cfg)]
                    p.plans.clear()
                    x = torch.randn(M, K, device="cuda").to(dt)
                    b = (torch.randn(N, device="cuda") * 0.1).to(dt) if M in (3, 5) else None
                    ref = x.float() @ wref.T + (b.float() if b is not None else 0)
                    try:
                        e = rel(L.prepared_linear(x, p, b), ref)
                    except Exception as ex:  # noqa: BLE001
                        e = float("inf")
                        res["errors"].append(f"check3 {name} M={M} {cfg} {dt}: {type(ex).__name__}: {str(ex)[:200]}")
                    tol = 1e-2 if dt == torch.bfloat16 else 2e-3
                    res["check"].append({"fmt": name, "M": M, "cfg": cfg, "dtype": str(dt), "bias": b is not None,
                                         "err": e, "ok": e < tol})
            p.plans.clear()
            print(f"check3 {name}: {sum(r['ok'] for r in res['check'] if r['fmt'] == name and 'cfg' in r)}/"
                  f"{sum(1 for r in res['check'] if r['fmt'] == name and 'cfg' in r)} ok", flush=True)
    finally:
        TC.TUNED_MM.clear()
        TC.TUNED_MM.update(saved)


def _fmt(v):
    return f"{v:.1f}" if isinstance(v, (int, float)) else "—"


def _section(res, path: Path):
    lines = [f"## {path.name}: `{res.get('command', '?')}` ({res.get('gpu', '?')}, copy "
             f"{res.get('copy_gbs', 0):.0f} GB/s read + write)", ""]
    ok = [r for r in res.get("check", []) if "ok" in r]
    ex = [r for r in res.get("check", []) if "exact" in r]
    c3 = [r for r in ok if "cfg" in r]
    if c3:
        lines += [f"Correctness of run 3's new paths through the dispatch ({len(c3)} cases: nf4 b64, int4 g128, "
                  "int4_asym g32 x 'gemvgp' / 'gemvgpf' (codebook) / 'gemvgf' at M = 1, 3, 4 and 'v1gemm' at M = 5, 16, "
                  f"bf16 (+ fp16 at M = 1), bias at M = 3, 5): {sum(r['ok'] for r in c3)} within tolerance (bf16 1e-2, "
                  f"fp16 2e-3 relative Frobenius vs float32), worst {max(r['err'] for r in c3):.2e}.", ""]
        for r in [r for r in c3 if not r["ok"]]:
            lines.append(f"- NOT OK: {r}")
        ok = [r for r in ok if "cfg" not in r]
    if ok or ex:
        lines += [f"Correctness through the dispatch ({len(ok)} cases: 12 formats x M in 1, 2, 3, 4, 16, 64, 256 x "
                  f"bf16 (+ fp16 at M = 1, 16) x bias at M = 3, 16): {sum(r['ok'] for r in ok)} within tolerance "
                  f"(bf16 1e-2, fp16 2e-3 relative Frobenius vs float32), worst "
                  f"{max((r['err'] for r in ok), default=float('nan')):.2e}; dequantize of the word layout bit-exact vs "
                  f"`lowbit.dequantize`: {sum(r['exact'] for r in ex)}/{len(ex)}.", ""]
        for r in [r for r in ok if not r["ok"]] + [r for r in ex if not r["exact"]]:
            lines.append(f"- NOT OK: {r}")
    if res.get("run6"):
        return lines + _table6(res) + [""]
    lines += ["| format | N x K | M | F.linear graph | v1 graph | best graph | × F.linear (graph) | GB/s | "
              "F.linear eager | v1 eager | dispatch eager | × F.linear (eager) | best config |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        g = r.get("v2_graph") or r.get("best_graph")
        e = r.get("v2_eager")
        if not g:
            lines.append(f"| {r['fmt']} | {r['N']} x {r['K']} | {r['M']} | {_fmt(r['flinear_graph'])} | — | — | — | — | "
                         "— | — | — | — | — |")
            continue
        lines.append(f"| {r['fmt']} | {r['N']} x {r['K']} | {r['M']} | {_fmt(r['flinear_graph'])} | "
                     f"{_fmt(r.get('v1_graph'))} | {_fmt(g)} | {r['flinear_graph'] / g:.2f}x | "
                     f"{r['bytes'] / (g * 1e-6) / 1e9:.0f} | {_fmt(r['flinear_eager'])} | {_fmt(r.get('v1_eager'))} | "
                     f"{_fmt(e)} | {(r['flinear_eager'] / e) if e else 0:.2f}x | {tuple(r.get('best_cfg', ()))} |")
    if res.get("errors"):
        lines += ["", f"Errors / skipped candidates ({len(res['errors'])}; first 10):", ""]
        lines += [f"- {e}" for e in res["errors"][:10]]
    return lines + [""]


def _table6(res):
    """Run 6's table: the committed config and the run's best beside F.linear and torchao int4 g128 (same x, same
    bf16 weight copies), graph and eager."""
    lines = ["| format | N x K | M | F.linear graph | committed graph | best graph | × F.linear (graph) | GB/s | "
             "torchao int4 graph | × F.linear (torchao) | F.linear eager | dispatch eager | × F.linear (eager) | "
             "torchao eager | best config | committed config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        g = r.get("best_graph")
        fl, fe = r["flinear_graph"], r["flinear_eager"]
        tg, te = r.get("torchao_graph"), r.get("torchao_eager")
        e = r.get("v2_eager")
        lines.append(
            f"| {r['fmt']} | {r['N']} x {r['K']} | {r['M']} | {_fmt(fl)} | {_fmt(r.get('committed_graph'))} | "
            f"{_fmt(g)} | {(fl / g) if g else 0:.2f}x | {(r['bytes'] / (g * 1e-6) / 1e9) if g else 0:.0f} | "
            f"{_fmt(tg)} | {f'{fl / tg:.2f}x' if tg else '—'} | {_fmt(fe)} | {_fmt(e)} | {(fe / e) if e else 0:.2f}x | "
            f"{_fmt(te)} | {tuple(r.get('best_cfg', ()))} | {tuple(r.get('committed_cfg', ()))} |")
    tried = [(r, c, t) for r in res["rows"] for c, t in r.get("tried", [])]
    if tried:
        lines += ["", "Every candidate of the run (CUDA graph µs; each checked against the float32 reference first):", ""]
        for r in res["rows"]:
            ts = sorted(r.get("tried", []), key=lambda ct: ct[1])
            lines.append(f"- {r['fmt']} {r['N']} x {r['K']} M = {r['M']}: " +
                         ", ".join(f"{tuple(c)} {t:.1f}" for c, t in ts))
    if res.get("errors"):
        lines += ["", f"Errors / skipped candidates ({len(res['errors'])}; first 10):", ""]
        lines += [f"- {e}" for e in res["errors"][:10]]
    return lines


def report(paths, notes=()) -> None:
    md = ROOT / "bench" / "results" / "gemv_sweep.md"
    rel_paths = [str(p.relative_to(ROOT)) if p.is_absolute() else str(p) for p in paths]
    lines = ["# Fused low-bit GEMV / GEMM v2 (lowbit/kernels/triton/lowbit_mm.py) vs F.linear and v1, H200", "",
             f"Written by `python bench/gemv_sweep.py --report {' '.join(rel_paths)}` from the raw files of the runs "
             "(numbers from the runs, never edited). Times in µs: CUDA-graph replays (median) over weight copies "
             "larger than L2, and eager launches (median of rounds); bf16 activations; `F.linear` = bf16 x bf16 on "
             "the same shape; v1 = the previous dispatch (v1 GEMV at M <= 4, the v1 4-bit GEMM table / dequantize "
             "above); best = the fastest candidate of the run (checked against the float32 reference before timing; "
             "'dense' = dequantize once + F.linear, 'v1' = the v1 path); 'dispatch eager' = "
             "`lowbit.kernels.linear.prepared_linear` with that winner (the module path minus the module). GB/s = "
             "bytes of codes + float32 scales (+ zeros) over the best graph time.", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for p in paths:
        lines += _section(json.loads(p.read_text()), p)
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        res = json.loads(paths[0].read_text())  # the first file named: the newest run
        fmts = [f for f in ("nf4", "int4", "int8") if any(r["fmt"] == f for r in res["rows"])]
        fig, axes = plt.subplots(1, len(fmts), figsize=(6 * len(fmts), 4.5), sharey=True)
        for ax, fmt in zip(axes, fmts):
            for src, tag in ((res, ""),):
                for M in sorted({r["M"] for r in src["rows"]}):
                    rr = [r for r in src["rows"] if r["fmt"] == fmt and r["M"] == M and r.get("best_graph")]
                    ax.plot([f"{r['N']}x{r['K']}" for r in rr], [r["flinear_graph"] / r["best_graph"] for r in rr],
                            marker="o", label=f"M={M}{tag}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(f"{fmt}: best lowbit path vs F.linear (CUDA graph)")
            ax.set_ylabel("speed-up over bf16 F.linear")
            ax.tick_params(axis="x", rotation=30)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(md.with_suffix(".png"), dpi=100)
    except Exception:  # noqa: BLE001
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--report":
        paths = [Path(a) for a in argv[1:] if not a.startswith("--note=")]
        report(paths, [a[len("--note="):] for a in argv[1:] if a.startswith("--note=")])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--gemvg", action="store_true", help="run 2: M in {1, 4}, group-step GEMV vs v1 / v2")
    ap.add_argument("--run3", action="store_true", help="run 3: M = 1 prefetch / byte-pair GEMVs; M = 16 v1 GEMM")
    ap.add_argument("--ms", default="", help="M values (run 3 default: 1,16)")
    ap.add_argument("--run5", action="store_true", help="run 5: M = 1 NF4 shuffle-codebook GEMVs, int4 scale "
                    "layouts (state's own vs transposed), M = 16 / 64 committed vs dense / v1")
    ap.add_argument("--run6", action="store_true", help="run 6: M = 1 multi-group GEMVs (gemvq*) vs the committed "
                    "config and torchao int4 g128 (nf4 b64, int4 asym g128, int8 per channel)")
    ap.add_argument("--round", type=int, default=1, help="run 6 candidates (1) or run 7's (2)")
    ap.add_argument("--prewarm", type=int, default=0, help="run 6: compile every candidate first in N processes")
    ap.add_argument("--prewarm-worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--check-m1", action="store_true", help="only: the shipped M = 1 rows, every format, through "
                    "prepared_linear (one process per format), eager + CUDA graph, vs the float32 reference")
    ap.add_argument("--check-m1-worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prewarm-only", action="store_true", help="compile the candidates (--prewarm N), then stop")
    ap.add_argument("--formats", default="", help="subset of nf4,int4,int8 (default: all of the mode)")
    ap.add_argument("--committed", action="store_true", help="re-time the committed TUNED_MM choice only (M 1, 4, 16; "
                    "nf4, int4, int8) beside F.linear and v1")
    ap.add_argument("--shapes", default="", help="N x K list, e.g. 8192x8192,28672x8192 (default: all)")
    args = ap.parse_args(argv)
    global GEMVG_MODE, MS, RUN3, SHAPES, COMMITTED, RUN5, RUN6, RUN7
    if args.gemvg:
        GEMVG_MODE, MS = True, (1, 4)
    if args.run3:  # the Llama-3-8B decode shapes first (the generate table uses them), then the issue's
        RUN3, MS = True, (1, 16)
        SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]
        SWEEP_FORMATS["int8"] = ("int8", dict(axis=0))
    if args.run5:  # the decode shapes first (the generate table uses them), then the issue's
        RUN5, MS = True, (1, 16, 64)
        SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (8192, 8192), (28672, 8192)]
        SWEEP_FORMATS["int8"] = ("int8", dict(axis=0))
    if args.run6:  # the shapes first, then the Llama-3-8B decode shapes
        RUN6, MS = True, (1,)
        SHAPES = [(8192, 8192), (28672, 8192), (4096, 14336), (14336, 4096), (4096, 4096)]
        SWEEP_FORMATS["int8"] = ("int8", dict(axis=0))
        if args.round == 2:
            RUN7 = True
            SWEEP_FORMATS["int4s"] = ("int4", dict(group_size=128))
            SWEEP_FORMATS["q4_0"] = ("q4_0", {})
    if args.committed:
        COMMITTED, MS = True, (1, 4, 16)
        SHAPES = [(8192, 8192), (28672, 8192), (4096, 4096), (14336, 4096), (4096, 14336)]
        SWEEP_FORMATS["int8"] = ("int8", dict(axis=0))
    if args.ms:
        MS = tuple(int(v) for v in args.ms.split(","))
    if args.formats:
        for f in list(SWEEP_FORMATS):
            if f not in args.formats.split(","):
                del SWEEP_FORMATS[f]
    if args.shapes:
        SHAPES = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    if args.prewarm_worker:
        i, n = (int(v) for v in args.prewarm_worker.split("/"))
        prewarm_worker(i, n)
        return
    if args.check_m1_worker:
        check_m1_worker(int(args.check_m1_worker))
        return
    if args.check_m1:
        res = {"gpu": torch.cuda.get_device_name(), "command": "python bench/gemv_sweep.py " + " ".join(argv),
               "check_m1": []}
        try:
            check_m1(res)
        finally:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "check_m1.json").write_text(json.dumps(res, default=str))
        return
    t0 = time.perf_counter()
    if args.prewarm:
        prewarm(args.prewarm, ["--round", str(args.round)] + (["--formats", args.formats] if args.formats else [])
                + (["--shapes", args.shapes] if args.shapes else []))
        if args.prewarm_only:
            return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "run6": RUN6,
           "round": args.round,
           "command": "python bench/gemv_sweep.py " + " ".join(argv), "rows": [], "check": [], "errors": []}
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(5):
        b.copy_(a)
    ev1.record()
    ev1.synchronize()
    res["copy_gbs"] = 2 * 5 * a.numel() / (ev0.elapsed_time(ev1) * 1e-3) / 1e9
    del a, b
    print(f"copy {res['copy_gbs']:.0f} GB/s", flush=True)
    base = {k: list(v) for k, v in TC.TUNED_MM.items()}
    try:
        if RUN3:
            check3(res)
        if not args.skip_check:
            check(res, t0, args.budget)
        (out / "mm_sweep.json").write_text(json.dumps(res, default=str))
        sweep(res, t0, args.budget)
    finally:
        (out / "mm_sweep.json").write_text(json.dumps(res, default=str))
        if not COMMITTED:
            rows = (merged_rows6(res, base) if RUN6 else merged_rows(res, base) if (RUN3 or RUN5)
                    else tuned_rows(res))
            (out / "mm_tuned.json").write_text(json.dumps(rows, default=str, indent=1))
    nok = sum(1 for r in res["check"] if r.get("ok") is False or r.get("exact") is False)
    print(f"check failures: {nok}; errors: {len(res['errors'])}; first: {res['errors'][:6]}")
    print(f"took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
