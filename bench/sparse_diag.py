"""Which cuSPARSELt call combinations run correctly on this GPU (issue 21, run on the lent H200).

A first device run of the tuned 2:4 path (cuSPARSELt's algorithm search for both output layouts) left
cuSPARSELt in an error state ("internal error" at ``cusparseLtMatmulAlgSelectionInit``, then an illegal
instruction) and the process unusable. An illegal instruction cannot be caught, so each combination runs
in its own process: for each dtype (bf16, fp16, int8 with the per-row alpha vector and bf16 output) and
mode (``F0``, ``Fs``, ``FsT``, ``Ts``, ``TsF``: see :data:`lowbit.kernels.sparse.MODES`) the process
multiplies a 2:4 weight N = K = 4096 at M = 4096, 1024, 256, 64, 16, 1 (largest first), checks each
product against a float64 (int8: exact integer) reference, and after each one runs algorithm 0 on a
fresh product (a canary for a poisoned cuSPARSELt state). Each step is appended to the JSON-lines file as
it finishes, so a crash still leaves the steps before it. The driver prints ``LOWBIT_CSLT_MODES`` made of
the modes that passed every dtype from some M on.

    python bench/sparse_diag.py --out $OUT/sparse_diag.jsonl        # all processes, on the current GPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DTYPES = ("bf16", "fp16", "int8")
MODES = ("F0", "Fs", "FsT", "Ts", "TsF")
MS = (4096, 1024, 256, 64, 16, 1)


def child(dtype: str, mode: str, path: str) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lowbit.algorithms.sparsegpt import magnitude_prune

    torch.manual_seed(0)
    N = K = 4096
    w = magnitude_prune(torch.randn(N, K, device="cuda"))[0]
    if dtype == "int8":
        wq = (w * 40).round().clamp(-127, 127).to(torch.int8)
        alpha = (torch.rand(N, device="cuda") * 0.01 + 0.001).float()
        packed = torch._cslt_compress(wq)
        kw = {"alpha": alpha, "out_dtype": torch.bfloat16}
    else:
        dt = torch.bfloat16 if dtype == "bf16" else torch.float16
        wq = w.to(dt)
        packed = torch._cslt_compress(wq)
        kw = {}
    cw = torch.randn(256, 512, device="cuda").to(torch.bfloat16)
    cw = magnitude_prune(cw.float())[0].to(torch.bfloat16)
    cpk = torch._cslt_compress(cw)

    def log(rec):
        with open(path, "a") as f:
            f.write(json.dumps(dict(rec, dtype=dtype, mode=mode)) + "\n")

    for M in MS:
        Mp = M + (-M) % (16 if dtype == "int8" else 8)
        rec = {"M": M}
        try:
            if dtype == "int8":
                x = torch.randint(-127, 128, (Mp, K), device="cuda", dtype=torch.int8)
                ref = (x.double() @ wq.double().T) * alpha.double()[None, :]
            else:
                x = torch.randn(Mp, K, device="cuda", dtype=wq.dtype)
                ref = x.double() @ wq.double().T
            bT = x.t()
            s_tr = mode.startswith("T")
            if mode.endswith("0"):
                aid = 0
            else:
                aid = torch._cslt_sparse_mm_search(packed, bT, transpose_result=s_tr, **kw)
                aid = int(aid[0] if isinstance(aid, (tuple, list)) else aid)
                torch.cuda.synchronize()
            run_tr = {"T0": True, "F0": False, "Fs": False, "FsT": True, "Ts": True, "TsF": False}[mode]
            rec.update(alg_id=aid, run_transpose_result=run_tr)
            y = torch._cslt_sparse_mm(packed, bT, transpose_result=run_tr, alg_id=aid, **kw)
            torch.cuda.synchronize()
            y = y if run_tr else y.t()
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            rec["rel_err"] = err
            t0 = time.perf_counter()
            for _ in range(5):
                torch._cslt_sparse_mm(packed, bT, transpose_result=run_tr, alg_id=aid, **kw)
            torch.cuda.synchronize()
            rec["us"] = (time.perf_counter() - t0) / 5 * 1e6
            xc = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
            yc = torch._cslt_sparse_mm(cpk, xc.t(), transpose_result=True)
            torch.cuda.synchronize()
            rc = xc.double() @ cw.double().T
            rec["canary_err"] = float((yc.double() - rc).abs().max() / rc.abs().max())
            rec["ok"] = err < 2e-2 and rec["canary_err"] < 2e-2
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            log(rec)
            return  # the state may be poisoned: stop this process
        log(rec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", nargs=2, default=None)
    ap.add_argument("--parallel", type=int, default=15)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.out)
        return
    if os.path.exists(args.out):
        os.remove(args.out)
    jobs = [(d, m) for d in DTYPES for m in MODES]
    procs = []
    t0 = time.perf_counter()
    for d, m in jobs:
        while sum(p.poll() is None for _, p in procs) >= args.parallel:
            time.sleep(0.2)
        procs.append(((d, m), subprocess.Popen([sys.executable, __file__, "--out", args.out, "--child", d, m],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    rcs = {}
    for (d, m), p in procs:
        try:
            _, err = p.communicate(timeout=max(5.0, 120 - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            err = b"timeout"
        rcs[f"{d}/{m}"] = {"rc": p.returncode, "stderr": err.decode(errors="replace")[-400:] if p.returncode else ""}
    recs = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    # per mode: the smallest M from which every larger M passed for every dtype
    allowed = ["T0"]
    for m in MODES:
        ok_from = None
        for M in MS:  # descending
            if all(any(r["dtype"] == d and r["mode"] == m and r["M"] == M and r.get("ok") for r in recs)
                   for d in DTYPES):
                ok_from = M
            else:
                break
        if ok_from is not None:
            allowed.append(m if ok_from == min(MS) else f"{m}@{ok_from}")
    summary = {"LOWBIT_CSLT_MODES": ",".join(allowed), "processes": rcs, "wall_s": time.perf_counter() - t0}
    with open(args.out, "a") as f:
        f.write(json.dumps({"summary": summary}) + "\n")
    print(json.dumps(summary), flush=True)
    print(summary["LOWBIT_CSLT_MODES"])


if __name__ == "__main__":
    main()
