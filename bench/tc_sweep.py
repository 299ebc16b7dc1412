"""The tensor-core low-bit GEMM "tc" (lowbit/kernels/triton/lowbit_mm.py ``_tc_kernel``) on the GPU: correctness,
a config sweep per (format, N x K, M) beside ``F.linear`` and dequantize + cuBLAS, winners as ``TUNED_MM`` rows.

    python bench/tc_sweep.py --out OUT_DIR [--budget 200] [--jobs 12]
    python bench/tc_sweep.py --report bench/results/raw/tc_sweep_run1.json   # -> bench/results/tc_sweep.md
    python bench/tc_sweep.py --tc5 --out OUT_DIR [--budget 120] [--jobs 15]   # packed-pair "tcb" vs shipped
    python bench/tc_sweep.py --report-tc5 RAW1.json,RAW2.json   # -> the "Run tc5" section of tc_sweep.md

One run: (1) compiles every candidate in ``--jobs`` worker processes first (Triton's on-disk cache; the kernel's
constexprs do not depend on N / K, so one compile serves every shape); (2) checks every weight format through
``lowbit.kernels.linear.prepared_linear`` with a "tc" row at several M, bf16 / fp16, with bias, against
``x @ dequantize(state).T`` in float32; (3) times the candidates (CUDA-graph medians over weight copies larger
than L2, each checked against the reference first) with ``F.linear`` bf16 and the dense path in the same process.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(8192, 8192), (28672, 8192), (4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]
FORMATS = {"nf4": ("nf4", dict(block_size=64)), "int4": ("int4_asym", dict(group_size=128)), "q4_0": ("q4_0", {}),
           "int8": ("int8", dict(axis=0))}
CHECK = [("nf4", dict(block_size=64)), ("fp4", dict(block_size=64)), ("int4", dict(group_size=32)),
         ("int4", dict(group_size=64)), ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=32)),
         ("int4_asym", dict(group_size=64)), ("int4_asym", dict(group_size=128)), ("q4_0", {}), ("q4_1", {}),
         ("q8_0", {}), ("int8", dict(axis=0))]
# (BM, BN, BKW, warps, stages) per M; splits tried per M
TILES = {
    16: [(16, 64, 16, 4, 3), (16, 128, 16, 4, 3), (16, 128, 32, 4, 3), (16, 256, 16, 8, 3), (16, 128, 16, 4, 4),
         (16, 64, 32, 4, 4), (16, 128, 16, 8, 3)],
    64: [(64, 64, 16, 4, 3), (64, 128, 16, 4, 3), (64, 128, 32, 8, 3), (64, 256, 16, 8, 3), (64, 128, 16, 8, 4),
         (32, 128, 16, 4, 3)],
    256: [(128, 128, 16, 8, 3), (128, 128, 32, 8, 3), (128, 256, 16, 8, 3), (64, 128, 16, 4, 3),
          (64, 256, 16, 8, 3), (256, 128, 16, 8, 3)],
    512: [(128, 128, 16, 8, 3), (128, 256, 16, 8, 3), (256, 128, 16, 8, 3), (128, 128, 32, 8, 3)],
}
SPLITS = {16: (1, 2, 4, 8), 64: (1, 2, 4), 256: (1, 2), 512: (1,)}


def cands(M):
    return [("tc", bm, bn, bkw, sk, w, st) for (bm, bn, bkw, w, st) in TILES[M] for sk in SPLITS[M]]


def _warm(job, prefix=""):
    """Compile (one launch on a small weight, bf16) the given (format, M, config) list in this worker process; the
    errors as strings (``prefix`` first)."""
    import torch
    from lowbit.kernels import linear as L
    from lowbit.kernels.triton import lowbit_mm as lm
    from lowbit.tensor.functional import quantize_tensor

    out = []
    for fmt, M, cfg in job:
        scheme, kw = FORMATS[fmt]
        st = quantize_tensor(torch.randn(256, 4096, device="cuda") * 0.02, scheme, **kw)
        p = L.prepare_linear(st)
        x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
        try:
            plan = lm.make_tc_plan(M, 256, 4096, p.bits, p.group, p.kind, p.zero, False, cfg, p.table, x.dtype)
            # split=1 and split>1 differ in FIX: compile the split the sweep will use on the large shapes too
            lm.run_tc(plan, x, p.words, p.scales, p.zeros, p.table, None, 256, 4096, 4096 // p.group, 32 // p.bits)
            torch.cuda.synchronize()
            out.append(None)
        except Exception as ex:  # noqa: BLE001
            out.append(f"{prefix}{fmt} M={M} {cfg}: {type(ex).__name__}: {str(ex)[:300]}")
    return out


def warm_all(ms, jobs, formats):
    work = [(fmt, M, c) for fmt in formats for M in ms for c in cands(M)]
    # FIX (split > 1) compiles a second variant: keep one split-1 and one split-2 config per tile
    seen, todo = set(), []
    for fmt, M, c in work:
        key = (fmt, c[1:4] + c[5:], c[4] > 1)
        if key not in seen:
            seen.add(key)
            todo.append((fmt, M, c[:4] + ((2 if c[4] > 1 else 1),) + c[5:]))
    chunks = [todo[i::jobs] for i in range(jobs)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        errs = [e for r in pool.map(_warm, chunks) for e in r if e]
    return len(todo), errs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=200.0)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--ms", default="16,64,256,512")
    ap.add_argument("--formats", default="nf4,int4,int8")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--report", default="")
    ap.add_argument("--note", action="append", default=[], help="a line for the notes section (with --report)")
    ap.add_argument("--tc5", action="store_true", help="the packed-pair 'tcb' candidates vs the shipped selection")
    ap.add_argument("--report-tc5", default="")
    ap.add_argument("--tiles", default="", help="(--tc5) a Python literal replacing TC5_TILES")
    ap.add_argument("--names", default="", help="(--tc5) comma-separated kernel names of the candidates")
    ap.add_argument("--wait-file", default="", help="(--tc5) before timing, wait up to 90 s for this file to exist "
                    "(a test run sharing the GPU during the compile phase)")
    a = ap.parse_args(argv)
    if a.report:
        return report(a.report, a.note)
    if a.report_tc5:
        return report_tc5(a.report_tc5, a.note)
    if a.tc5:
        global TC5_TILES, TC5_NAMES
        if a.tiles:
            import ast

            TC5_TILES = ast.literal_eval(a.tiles)
        if a.names:
            TC5_NAMES = tuple(a.names.split(","))
        return sweep_tc5(a)
    t0 = time.perf_counter()
    ms = [int(m) for m in a.ms.split(",")]
    import torch

    res = {"cmd": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "check": [], "rows": [], "errors": []}
    n, errs = warm_all(ms, a.jobs, a.formats.split(","))
    res["warm"] = {"kernels": n, "seconds": time.perf_counter() - t0}
    res["errors"] += errs
    print(f"warm: {n} kernels in {time.perf_counter() - t0:.0f} s, {len(errs)} errors", flush=True)
    for e in errs[:10]:
        print("  ", e, flush=True)
    import torch.nn.functional as F

    from bench.gemv_sweep import rel, rotated_weights, time_graph
    from lowbit.kernels import linear as L
    from lowbit.kernels import triton_configs as TC
    from lowbit.kernels.triton import lowbit_mm as lm
    from lowbit.tensor.functional import quantize_tensor

    # correctness through the dispatch
    torch.manual_seed(0)
    N, K = 384, 1024
    for scheme, kw in CHECK:
        st = quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw)
        p = L.prepare_linear(st)
        wref = L.dequantize_state(st).float()
        key = (p.bits, "codebook" if p.kind == 0 else "int")
        saved = TC.TUNED_MM.get(key)
        ok = 0
        for M, cfg in ((5, ("tc", 16, 64, 16, 1, 4, 3)), (16, ("tc", 16, 128, 16, 4, 4, 3)),
                       (64, ("tc", 64, 128, 16, 2, 4, 3)), (200, ("tc", 128, 128, 32, 1, 8, 3))):
            for dt in (torch.bfloat16, torch.float16):
                TC.TUNED_MM[key] = [(256, 1 << 30, 1 << 30, cfg)]
                p.plans.clear()
                x = torch.randn(M, K, device="cuda").to(dt)
                b = (torch.randn(N, device="cuda") * 0.1).to(dt)
                ref = x.float() @ wref.T + b.float()
                try:
                    y = L.prepared_linear(x, p, b)
                    assert any(getattr(v, "tc", False) for v in p.plans.values())
                    e = rel(y, ref)
                except Exception as ex:  # noqa: BLE001
                    e = float("inf")
                    res["errors"].append(f"check {scheme} {kw} M={M} {dt}: {type(ex).__name__}: {str(ex)[:200]}")
                good = e < (1e-2 if dt == torch.bfloat16 else 2e-3)
                ok += good
                res["check"].append({"fmt": f"{scheme} {kw}", "M": M, "dtype": str(dt), "err": e, "ok": good})
        if saved is None:
            TC.TUNED_MM.pop(key, None)
        else:
            TC.TUNED_MM[key] = saved
        p.plans.clear()
        print(f"check {scheme} {kw}: {ok}/8 ok", flush=True)

    shapes = SHAPES if not a.shapes else [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    for (N, K) in shapes:
        for fmt in a.formats.split(","):
            scheme, kw = FORMATS[fmt]
            ps, wref, Wb, nbytes = rotated_weights(N, K, scheme, kw)
            p = ps[0]
            for M in ms:
                if time.perf_counter() - t0 > a.budget:
                    res["errors"].append(f"budget before {fmt} {N}x{K} M={M}")
                    break
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ wref.T
                row = {"fmt": fmt, "N": N, "K": K, "M": M, "bytes": nbytes}
                row["flinear"] = time_graph([lambda w=w: F.linear(x, w) for w in Wb])
                row["dense"] = time_graph([lambda q=q: F.linear(x, q.dense(x.dtype)) for q in ps])
                tried = []
                for cfg in cands(M):
                    try:
                        plan = lm.make_tc_plan(M, N, K, p.bits, p.group, p.kind, p.zero, False, cfg, p.table)

                        def call(q, plan=plan):
                            return lm.run_tc(plan, x, q.words, q.scales, q.zeros, q.table, None, N, K,
                                             K // q.group, 32 // q.bits)
                        e = rel(call(p), ref)
                        if not e < 1e-2:
                            res["errors"].append(f"{fmt} {N}x{K} M={M} {cfg}: rel err {e}")
                            continue
                        tried.append((cfg, time_graph([lambda q=q: call(q) for q in ps])))
                    except Exception as ex:  # noqa: BLE001
                        res["errors"].append(f"{fmt} {N}x{K} M={M} {cfg}: {type(ex).__name__}: {str(ex)[:160]}")
                row["tried"] = tried
                if tried:
                    row["best_cfg"], row["best"] = min(tried, key=lambda r: r[1])
                res["rows"].append(row)
                bt = row.get("best", float("nan"))
                print(f"{fmt:4s} {N:5d}x{K:5d} M={M:3d} F.linear {row['flinear']:7.1f} dense {row['dense']:7.1f} "
                      f"tc {bt:7.1f} us  {row['flinear'] / bt:.2f}x F.linear, {row['dense'] / bt:.2f}x dense, "
                      f"{nbytes / (bt * 1e-6) / 1e9:.0f} GB/s  {row.get('best_cfg')}", flush=True)
            del ps, Wb
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tc_sweep.json").write_text(json.dumps(res, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s; {len(res['errors'])} errors", flush=True)
    for e in res["errors"][:20]:
        print("  ", e, flush=True)


def report(path, notes=()):
    res = json.loads(Path(path).read_text())
    n_oor = sum(1 for e in res["errors"] if e.startswith("check") and "OutOfResources" in e)
    lines = ["# Tensor-core low-bit GEMM \"tc\" (lowbit/kernels/triton/lowbit_mm.py) vs F.linear and dequantize + cuBLAS",
             "", "Written by `python bench/tc_sweep.py --report " + path + "` from the raw file of the run (numbers "
             "from the run, never edited). CUDA-graph medians in µs over weight copies larger than L2, bf16 "
             "activations; 'dense' = the weight dequantized by one Triton pass + cuBLAS (whole weight); GB/s = "
             "codes + float32 scales (+ uint8 zeros) over the tc time.", "",
             f"Run: `{res['cmd']}` on {res['gpu']}, torch {res['torch']}.", "",
             f"Correctness (through `prepared_linear` with a tc row, bias, bf16 and fp16, M = 5 / 16 / 64 / 200, "
             f"vs float32 reference): {sum(c['ok'] for c in res['check'])}/{len(res['check'])} within tolerance"
             + (f"; the other {n_oor}: Triton OutOfResources (shared memory) of the config tried, no numeric failure"
                if n_oor and n_oor == len(res['check']) - sum(c['ok'] for c in res['check']) else "") + ".", "",
             "| format | N x K | M | F.linear | dense | tc best | × F.linear | × dense | GB/s | config |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        b = r.get("best")
        lines.append(f"| {r['fmt']} | {r['N']} x {r['K']} | {r['M']} | {r['flinear']:.1f} | {r['dense']:.1f} | "
                     + (f"{b:.1f} | {r['flinear'] / b:.2f}x | {r['dense'] / b:.2f}x | {r['bytes'] / b / 1e3:.0f} | "
                        f"{tuple(r['best_cfg'])} |" if b else "— | — | — | — | — |"))
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if res["errors"]:
        lines += ["", "Errors / skips of the run:", ""] + [f"- {e[:200]}" for e in res["errors"][:30]]
    Path(ROOT / "bench/results/tc_sweep.md").write_text("\n".join(lines) + "\n")




def tuned_rows(path, ms=(16, 64)):
    """TUNED_MM rows from a run: per class and M bucket, per shape (increasing N * K) the faster of the best tc
    config and dequantize + cuBLAS ("dense"), then a catch-all row repeating the largest shape's choice."""
    res = json.loads(Path(path).read_text())
    out = {}
    for fmt, key in (("nf4", (4, "codebook")), ("int4", (4, "int")), ("int8", (8, "int"))):
        rows = []
        for M in ms:
            rm = sorted((r for r in res["rows"] if r["fmt"] == fmt and r["M"] == M),
                        key=lambda r: (r["N"] * r["K"], r["N"]))
            for r in rm:
                cfg = tuple(r["best_cfg"]) if r.get("best") and r["best"] < r["dense"] else ("dense",)
                rows.append((M, r["N"], r["K"], cfg))
            if rm:
                rows.append((M, 1 << 30, 1 << 30, rows[-1][3]))
        out[key] = rows
    return out


# ---------------------------------------------------------------------------------------------
# run of helper tc5 (issue 15): the packed-pair "tcb" configs against the shipped selection, dense and F.linear

TC5_SHAPES = [(8192, 8192), (28672, 8192), (4096, 14336), (14336, 4096)]
TC5_TILES = {
    16: [((16, 128, 16, 4, 3), (2, 4, 8)), ((16, 128, 16, 4, 4), (2, 4, 8)), ((16, 128, 16, 4, 5), (4, 8)),
         ((16, 64, 16, 4, 3), (4, 8)), ((16, 64, 16, 4, 4), (8,)), ((16, 256, 16, 8, 3), (4,))],
    64: [((64, 128, 16, 4, 3), (1, 2, 4)), ((64, 128, 16, 4, 4), (2, 4)), ((64, 64, 16, 4, 3), (2, 4)),
         ((64, 128, 16, 8, 3), (2, 4)), ((32, 128, 16, 4, 3), (2, 4))],
    256: [((128, 128, 16, 8, 3), (1, 2)), ((128, 256, 16, 8, 3), (1,)), ((64, 128, 16, 4, 3), (1, 2)),
          ((256, 128, 16, 8, 3), (1,))],
    512: [((128, 128, 16, 8, 3), (1,)), ((128, 256, 16, 8, 3), (1,)), ((256, 128, 16, 8, 3), (1,))],
}
# correctness of "tcb" through prepared_linear (4-bit integer kinds 1-3 and NF4)
TC5_CHECK = [("int4", dict(group_size=128)), ("int4", dict(group_size=32)), ("int4_asym", dict(group_size=128)),
             ("int4_asym", dict(group_size=32)), ("q4_0", {}), ("q4_1", {}), ("nf4", dict(block_size=64))]
TC5_CHECK_CFGS = ((5, ("tcb", 16, 64, 16, 1, 4, 3)), (16, ("tcb", 16, 128, 16, 4, 4, 3)),
                  (64, ("tcb", 64, 128, 16, 2, 4, 3)), (200, ("tcb", 64, 128, 16, 1, 4, 3)),
                  (5, ("tcbd", 16, 128, 16, 1, 4, 3)), (16, ("tcbd", 16, 128, 16, 4, 4, 3)),
                  (64, ("tcbd", 64, 128, 16, 2, 4, 3)), (200, ("tcbd", 64, 128, 16, 1, 4, 3)))
TC5_CHUNKS = (16, 32)  # MiB of dequantized weight per block, dequantize + cuBLAS at M >= 256


TC5_NAMES = ("tcb", "tcbd")


def tc5_cands(M):
    return [(name, bm, bn, bkw, sk, w, st) for name in TC5_NAMES for (bm, bn, bkw, w, st), sks in TC5_TILES[M]
            for sk in sks]


def _tc5_check(job):
    """In a worker: each (scheme, kwargs) of ``job`` through prepared_linear with "tcb" rows, bias, bf16 / fp16,
    against ``x @ dequantize(state).T + b`` in float32; returns result dicts (compiles as it goes)."""
    import torch

    from bench.gemv_sweep import rel
    from lowbit.kernels import linear as L
    from lowbit.kernels import triton_configs as TC
    from lowbit.kernels.triton import lowbit_mm as lm
    from lowbit.tensor.functional import quantize_tensor

    out = []
    for scheme, kw in job:
        torch.manual_seed(0)
        N, K = 384, 1024
        st = quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw)
        p = L.prepare_linear(st)
        wref = L.dequantize_state(st).float()
        key = (p.bits, "codebook" if p.kind == 0 else "int")
        for M, cfg in TC5_CHECK_CFGS:
            for dt in (torch.bfloat16, torch.float16):
                TC.TUNED_MM[key] = [(256, 1 << 30, 1 << 30, cfg)]
                p.plans.clear()
                x = torch.randn(M, K, device="cuda").to(dt)
                b = (torch.randn(N, device="cuda") * 0.1).to(dt)
                ref = x.float() @ wref.T + b.float()
                err, msg, packed = float("inf"), "", False
                try:
                    y = L.prepared_linear(x, p, b)
                    plans = [v for v in p.plans.values() if isinstance(v, lm.TcPlan)]
                    assert plans, "the tc kernel did not run"
                    packed = bool(plans[0].consts["PASM"])
                    err = rel(y, ref)
                except Exception as ex:  # noqa: BLE001
                    msg = f"{type(ex).__name__}: {str(ex)[:200]}"
                good = err < (1e-2 if dt == torch.bfloat16 else 2e-3)
                out.append({"fmt": f"{scheme} {kw}", "M": M, "dtype": str(dt), "err": err, "ok": good,
                            "packed": packed, "msg": msg})
    return out


def sweep_tc5(a):
    import os

    import torch

    t0 = time.perf_counter()
    ms = [int(m) for m in a.ms.split(",")]
    fmts = a.formats.split(",")
    res = {"cmd": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "check": [], "rows": [], "errors": []}
    from lowbit.kernels import triton_configs as TC

    work, seen = [], set()
    for fmt in fmts:
        for M in ms:
            for N, K in TC5_SHAPES:
                p_bits = 8 if fmt == "int8" else 4
                kind = 0 if fmt == "nf4" else 2
                cur = TC.config_mm(p_bits, kind, M, N, K)
                if cur[0] in ("tc", "tcb", "tcbd"):
                    work.append((fmt, M, cur))
            work += [(fmt, M, c) for c in tc5_cands(M)]
    todo = []
    for fmt, M, c in work:
        key = (fmt, c[0], c[1:4] + c[5:], c[4] > 1)
        if key not in seen:
            seen.add(key)
            todo.append((fmt, M, c[:4] + ((2 if c[4] > 1 else 1),) + c[5:]))
    jobs = a.jobs
    ctx = mp.get_context("spawn")
    checks = [[c] for c in TC5_CHECK]
    with ctx.Pool(jobs) as pool:
        chk = pool.map_async(_tc5_check, checks)
        warm = pool.map_async(functools.partial(_warm, prefix="warm "),
                              [todo[i::jobs - len(checks)] for i in range(jobs - len(checks))])
        res["check"] = [r for part in chk.get() for r in part]
        res["errors"] += [e for part in warm.get() for e in part if e]
    res["warm"] = {"kernels": len(todo), "seconds": time.perf_counter() - t0}
    print(f"warm + check: {len(todo)} kernels, {time.perf_counter() - t0:.0f} s; check "
          f"{sum(c['ok'] for c in res['check'])}/{len(res['check'])} ok", flush=True)
    for c in res["check"]:
        if not c["ok"]:
            print("  CHECK FAIL", c, flush=True)
    bad = {(c["fmt"].split()[0], c["dtype"]) for c in res["check"] if not c["ok"]}
    if a.wait_file:
        tw = time.perf_counter()
        while not Path(a.wait_file).exists() and time.perf_counter() - tw < 90:
            time.sleep(0.5)
        res["waited"] = time.perf_counter() - tw
        print(f"waited {res['waited']:.0f} s for {a.wait_file}", flush=True)
    import torch.nn.functional as F

    from bench.gemv_sweep import rel, rotated_weights, time_graph
    from lowbit.kernels import linear as L
    from lowbit.kernels.triton import lowbit_mm as lm

    for (N, K) in TC5_SHAPES:
        for fmt in fmts:
            if time.perf_counter() - t0 > a.budget:
                res["errors"].append(f"budget before {fmt} {N}x{K}")
                continue
            scheme, kw = FORMATS[fmt]
            ps, wref, Wb, nbytes = rotated_weights(N, K, scheme, kw)
            p = ps[0]
            for M in ms:
                if time.perf_counter() - t0 > a.budget:
                    res["errors"].append(f"budget before {fmt} {N}x{K} M={M}")
                    break
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ wref.T
                row = {"fmt": fmt, "N": N, "K": K, "M": M, "bytes": nbytes}
                row["flinear"] = time_graph([lambda w=w: F.linear(x, w) for w in Wb])
                os.environ["LOWBIT_DENSE_CHUNK_MB"] = "0"
                row["dense"] = time_graph([lambda q=q: L.dense_linear(x, q) for q in ps])
                if M >= 256:
                    for mb in TC5_CHUNKS:
                        os.environ["LOWBIT_DENSE_CHUNK_MB"] = str(mb)
                        e = rel(L.dense_linear(x, p), ref)
                        if e < 1e-2:
                            row[f"dense{mb}"] = time_graph([lambda q=q: L.dense_linear(x, q) for q in ps])
                os.environ.pop("LOWBIT_DENSE_CHUNK_MB", None)
                cur = TC.config_mm(p.bits, p.kind, M, N, K, p.group)
                row["shipped_cfg"] = cur
                cands = [cur] if cur[0] in ("tc", "tcb", "tcbd") else []
                if (scheme, "torch.bfloat16") not in bad:
                    cands += tc5_cands(M)
                tried = []
                for cfg in cands:
                    try:
                        plan = lm.make_tc_plan(M, N, K, p.bits, p.group, p.kind, p.zero, False, cfg, p.table,
                                               x.dtype)

                        def call(q, plan=plan):
                            return lm.run_tc(plan, x, q.words, q.scales, q.zeros, q.table, None, N, K,
                                             K // q.group, 32 // q.bits)
                        e = rel(call(p), ref)
                        if not e < 1e-2:
                            res["errors"].append(f"{fmt} {N}x{K} M={M} {cfg}: rel err {e}")
                            continue
                        tried.append((cfg, time_graph([lambda q=q: call(q) for q in ps])))
                    except Exception as ex:  # noqa: BLE001
                        res["errors"].append(f"{fmt} {N}x{K} M={M} {cfg}: {type(ex).__name__}: {str(ex)[:160]}")
                row["tried"] = tried
                if cur[0] in ("tc", "tcb", "tcbd"):
                    row["shipped"] = next((t for c, t in tried if tuple(c) == tuple(cur)), None)
                else:
                    row["shipped"] = row["dense"]
                new = [(c, t) for c, t in tried if c[0] in ("tcb", "tcbd")]
                if new:
                    row["best_cfg"], row["best"] = min(new, key=lambda r: r[1])
                for nm in ("tcb", "tcbd"):
                    got = [(c, t) for c, t in tried if c[0] == nm]
                    if got:
                        row[f"best_{nm}"] = min(got, key=lambda r: r[1])
                if new and M <= 64 and (N, K) == (8192, 8192):
                    # what limits the best config: (a) the same launch with the dequantisation replaced by moves of
                    # the raw words (loads + MMAs + epilogue only; wrong results, not checked); (b) the weight read
                    # from L2 (one copy, 8192^2: 36 MB < 50 MB L2) instead of DRAM
                    cfg = tuple(row["best_cfg"])
                    try:
                        plan = lm.make_tc_plan(M, N, K, p.bits, p.group, p.kind, p.zero, False, cfg, p.table,
                                               x.dtype)
                        plan.consts["PASM"] = "{ " + " ".join(f"mov.b32 ${e}, ${8 + e % 2};" for e in range(8)) + " }"
                        plan.cvals = tuple(plan.consts.values())

                        def call0(q, plan=plan):
                            return lm.run_tc(plan, x, q.words, q.scales, q.zeros, q.table, None, N, K,
                                             K // q.group, 32 // q.bits)
                        row["abl_nodeq"] = time_graph([lambda q=q: call0(q) for q in ps])
                        if N * K == 8192 * 8192:
                            plan = lm.make_tc_plan(M, N, K, p.bits, p.group, p.kind, p.zero, False, cfg, p.table,
                                                   x.dtype)
                            row["abl_l2"] = time_graph([lambda: lm.run_tc(plan, x, p.words, p.scales, p.zeros,
                                                                          p.table, None, N, K, K // p.group, 8)])
                    except Exception as ex:  # noqa: BLE001
                        res["errors"].append(f"ablation {fmt} {N}x{K} M={M}: {type(ex).__name__}: {str(ex)[:160]}")
                res["rows"].append(row)
                bt = row.get("best", float("nan"))
                sh = row["shipped"] or float("nan")
                ch = " ".join(f"dense{mb} {row[f'dense{mb}']:.1f}" for mb in TC5_CHUNKS if f"dense{mb}" in row)
                ab = " ".join(f"{k} {row[k]:.1f}" for k in ("abl_nodeq", "abl_l2") if k in row)
                print(f"{fmt:4s} {N:5d}x{K:5d} M={M:3d} F.linear {row['flinear']:7.1f} dense {row['dense']:7.1f} {ch} "
                      f"shipped {sh:7.1f} {cur} tcb {bt:7.1f} ({row['flinear'] / bt:.2f}x F.linear) "
                      f"{row.get('best_cfg')} {ab}", flush=True)
            del ps, Wb
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tc_sweep_tc5.json").write_text(json.dumps(res, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s; {len(res['errors'])} errors", flush=True)
    for e in res["errors"][:20]:
        print("  ", e, flush=True)


def report_tc5(paths, notes=()):
    """Append (or replace) the "run tc5" section of bench/results/tc_sweep.md from the raw files of the runs
    (``paths``: comma-separated), one table per run."""
    head = "## Run tc5: packed-pair dequantisation (\"tcb\") and one MMA per step (\"tcbd\") against the shipped selection"
    lines = [head, "", f"Written by `python bench/tc_sweep.py --report-tc5 {paths}` from the raw files of the runs "
             "(numbers from the runs, never edited). CUDA-graph medians in µs over weight copies larger than L2, bf16 "
             "activations. 'shipped' = what `TUNED_MM` selected before these runs (a tc config, or dequantize + "
             "cuBLAS); 'dense' = dequantize + cuBLAS of the whole weight, 'dense16' / 'dense32' in row blocks of 16 / "
             "32 MiB of bf16; 'new best' = the fastest tcb / tcbd config of the run; × F.linear = F.linear over the "
             "fastest of shipped, new and dense; GB/s = codes + scales (+ zeros) over the fastest fused time; "
             "'no dequant' = the best new launch with its dequantisation replaced by register moves of the raw words "
             "(loads, MMAs and epilogue only), 'from L2' = the best new config on one weight copy (36 MB: "
             "L2-resident)."]

    def f(v):
        return f"{v:.1f}" if isinstance(v, (int, float)) else "—"
    for i, path in enumerate(paths.split(",")):
        res = json.loads(Path(path).read_text())
        ok = sum(c["ok"] for c in res["check"])
        cfgs = sorted({c["fmt"] for c in res["check"]})
        lines += ["", f"### Run {i + 1} (`{Path(path).name}`)", "", "Run: `" + res["cmd"] + f"` on {res['gpu']}, "
                  f"torch {res['torch']}.", "",
                  f"Correctness of the new configs through `prepared_linear` ({', '.join(cfgs)}; bias, bf16 and fp16, "
                  f"M = 5 / 16 / 64 / 200, vs float32 reference): {ok}/{len(res['check'])} within tolerance (bf16 "
                  "1e-2, fp16 2e-3 relative)" + ("" if ok == len(res["check"]) else ": " + "; ".join(
                      f"{c['fmt']} M={c['M']} {c['dtype']} err {c['err']:.3g} {c['msg']}" for c in res["check"]
                      if not c["ok"])[:600]) + ".", "",
                  "| format | N x K | M | F.linear | dense | dense16 | dense32 | shipped | new best | × F.linear | "
                  "GB/s | new config | no dequant | from L2 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            sh = r.get("shipped")
            best = min([v for v in (sh, r.get("best"), r.get("dense"), r.get("dense16"), r.get("dense32"))
                        if isinstance(v, (int, float))])
            fused = min([v for v in (sh if (r.get("shipped_cfg") or ("dense",))[0] != "dense" else None,
                                     r.get("best")) if isinstance(v, (int, float))] or [float("nan")])
            lines.append(f"| {r['fmt']} | {r['N']} x {r['K']} | {r['M']} | {f(r['flinear'])} | {f(r['dense'])} | "
                         f"{f(r.get('dense16'))} | {f(r.get('dense32'))} | {f(sh)} "
                         f"{tuple(r.get('shipped_cfg') or ())} | {f(r.get('best'))} | {r['flinear'] / best:.2f}x | "
                         f"{r['bytes'] / fused / 1e3:.0f} | {tuple(r['best_cfg']) if r.get('best_cfg') else '—'} | "
                         f"{f(r.get('abl_nodeq'))} | {f(r.get('abl_l2'))} |")
        if res["errors"]:
            lines += ["", "Errors / skips of the run:", ""] + [f"- {e[:200]}" for e in res["errors"][:12]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md = ROOT / "bench/results/tc_sweep.md"
    text = md.read_text() if md.exists() else ""
    if head in text:
        text = text[:text.index(head)].rstrip("\n") + "\n"
    md.write_text(text + "\n" + "\n".join(lines) + "\n")


def tuned_rows_tc5(paths, names=("tcb",), keep=((1024, 4096), (4096, 4096))):
    """TUNED_MM rows from the tc5 runs (``paths``: raw files, the last one the final run), ``{(4, "int"): rows,
    (4, "codebook"): rows}`` (int4 asym g128 measured for the integer class, NF4 b64 for codebooks): at M = 16 and
    64 per shape (increasing N * K) the fastest of the final run's shipped and dense times and the fastest tried
    config named in ``names`` in any run; at M = 256 such a config only where it beat the final run's dense time by
    5% or more (none did for "tcb": no rows then); a catch-all row per bucket repeating the largest shape's choice
    (M = 256: dense). Rows of the shapes in ``keep`` (not measured here) and the M <= 4 rows are kept as they are."""
    from lowbit.kernels import triton_configs as TC

    runs = [json.loads(Path(p).read_text()) for p in paths]
    maps = [{(r["fmt"], r["N"], r["K"], r["M"]): r for r in res["rows"]} for res in runs]
    out = {}
    for fmt, key in (("int4", (4, "int")), ("nf4", (4, "codebook"))):
        old = TC.TUNED_MM[key]
        rows = [r for r in old if r[0] <= 4]
        for M in (16, 64, 256):
            rm = sorted((r for k, r in maps[-1].items() if k[0] == fmt and k[3] == M),
                        key=lambda r: (r["N"] * r["K"], r["N"]))
            new_rows = []
            for r in rm:
                k = (fmt, r["N"], r["K"], M)
                fused = [(t, tuple(c)) for m in maps if k in m for c, t in m[k]["tried"] if c[0] in names]
                if M <= 64:
                    opts = [(r["dense"], ("dense",))] + fused
                    if r.get("shipped") and (r.get("shipped_cfg") or ("dense",))[0] != "dense":
                        opts.append((r["shipped"], tuple(r["shipped_cfg"])))
                    cfg = min(opts)[1]
                else:
                    bf = min(fused) if fused else None
                    cfg = bf[1] if bf and bf[0] <= 0.95 * r["dense"] else ("dense",)
                new_rows.append((M, r["N"], r["K"], cfg))
            if M == 256 and all(r[3] == ("dense",) for r in new_rows):
                continue  # M > 64 without rows: dequantize + cuBLAS (the default)
            rows += [r for r in old if r[0] == M and (r[1], r[2]) in keep]
            if M == 256:
                rows.append((256, 4096, 4096, ("dense",)))
            rows += new_rows
            if new_rows:
                rows.append((M, 1 << 30, 1 << 30, new_rows[-1][3] if M <= 64 else ("dense",)))
        out[key] = rows
    return out


if __name__ == "__main__":
    main()
