"""Host-side cost of one quantized linear on the CUDA dispatch path, measured on the CPU (no GPU needed).

What Python does per call of a frozen ``Linear4bit`` (int4) weight at M = 1 below the module (the CUDA branch
of ``state_linear``: prepared-layout lookup, launch plan, output allocation), with the driver launch stubbed out
(``triton`` must be importable). The v1 path (``prepared_linear_v1``: v1 GEMV launcher) and the v2 path
(``prepared_linear``: per-M plan, direct launch) run interleaved in one process; a bare ``torch.empty`` of the
output is the floor. Medians of rounds; the box may be shared, so read the ratios.

    python bench/dispatch_overhead.py [--out bench/results/dispatch_overhead.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.kernels import linear as L  # noqa: E402
from lowbit.nn import Linear4bit  # noqa: E402


def bench(f, n=3000, rounds=7):
    for _ in range(300):
        f()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            f()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dispatch_overhead.md"))
    args = ap.parse_args(argv)
    from lowbit.kernels.triton import gemv as gv
    from lowbit.kernels.triton import lowbit_mm as lm

    torch.set_num_threads(1)
    m = Linear4bit.from_module(torch.nn.Linear(4096, 4096, bias=False), quant_type="int4")
    m.freeze()
    m = m.to(torch.bfloat16)
    st = m.qstate
    p = L._prepare_cuda(st)  # the CUDA layout, built on the CPU
    L._store(st, "linear", p)
    token = object()
    lm._launch = lambda fn, compiled, *a: token  # stub the driver launch of v2 (after the first call: direct path)
    lm._stream = lambda dev: 0
    gv._launch = lambda *a, **k: None  # and of v1
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16)

    def v2_module():  # Linear4bit.forward -> kernel_linear -> state_linear (CUDA branch) -> prepared_linear
        return L._cuda_linear(x, st, None, None)

    mn = Linear4bit.from_module(torch.nn.Linear(4096, 4096, bias=False), quant_type="nf4")
    mn.freeze()
    mn = mn.to(torch.bfloat16)
    pn = L._prepare_cuda(mn.qstate)  # NF4 at M = 1: TUNED_MM row ("v1",) -> the v1 GEMV

    rows = []
    with torch.no_grad():
        for _ in range(2):  # interleaved twice
            rows.append(("floor: torch.empty of the [1, 4096] output", bench(lambda: torch.empty((1, 4096),
                                                                                                    dtype=torch.bfloat16))))
            rows.append(("v1: prepared_linear_v1 (config lookup, v1 launcher)", bench(lambda: L.prepared_linear_v1(x, p))))
            rows.append(("v2: prepared_linear (plan dict hit, direct launch)", bench(lambda: L.prepared_linear(x, p))))
            rows.append(("v2: _cuda_linear (prepared-layout lookup + above)", bench(v2_module)))
            rows.append(("nf4 b64, v1 GEMV: prepared_linear_v1 (config lookup, v1 launcher; the dispatch before)",
                         bench(lambda: L.prepared_linear_v1(x, pn))))
            rows.append(("nf4 b64, v1 GEMV: prepared_linear (cached gemv.GemvPlan, direct launch; the dispatch now)",
                         bench(lambda: L.prepared_linear(x, pn))))
    agg = {}
    for k, v in rows:
        agg.setdefault(k, []).append(v)
    lines = ["# Host cost of one quantized linear on the CUDA dispatch path (CPU, launch stubbed)", "",
             "Written by `python bench/dispatch_overhead.py` (numbers from the run, never edited). int4 (Linear4bit, block 64) "
             "4096 x 4096 unless the row says nf4, "
             "M = 1, bf16; the driver launch itself is stubbed out, so this is the Python work per call. Shared "
             f"2-core box (load varied): compare rows within the run. torch {torch.__version__}.", "",
             "| path | µs per call (median of two interleaved passes) |", "|---|---|"]
    for k, v in agg.items():
        lines.append(f"| {k} | {statistics.median(v):.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
