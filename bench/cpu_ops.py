"""CPU operator benchmark: one Linear of SmolLM2-135M's shapes, fp32 against every quantized path, 2 threads.

Per shape (N x K) and M (1 = decode, 256 = prefill), interleaved over rounds, medians of the per-call time
(``perf_counter``) and of the per-call process CPU time (``process_time``, summed over the threads). Every
path runs on ``copies`` independent weights called in turn, together at least ``--cold-mb`` of fp32 weights
(default 96 MB, three times the 32 MB L3), so weights come from memory as in a model's decode step:

* ``fp32``: ``F.linear`` on the float weight (the floor every weight-only path is compared with);
* ``torch qdyn``: the module ``torch.ao.quantization.quantize_dynamic`` builds (FBGEMM
  ``quantized::linear_dynamic``, per-tensor activations);
* ``lowbit int8-dyn``: lowbit's ``method="int8-dynamic"`` ``QLinear`` forward (per-token activations);
* ``int8 FBGEMM op`` / ``int8 _int_mm``: the two integer GEMMs lowbit's int8-dynamic path picks from, alone
  (activations already integer);
* ``int8pack``: ``torch.ops.aten._weight_int8pack_mm`` (int8 per-channel weight-only, float activations);
* ``int4pack gG``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (int4 weight-only, groups of G); these two
  only at M = 1 (at M = 256 they take 0.1-0.7 s per call on this CPU, 10-50x fp32);
* ``lowbit nf4`` / ``lowbit int4 g128`` / ``lowbit Q4_0``: the lowbit module forward (the path ``auto`` picks).
* ``... (state_linear)``: the kernel entry point without the module, to show the per-call Python cost.

    python bench/cpu_ops.py [--threads 2] [--rounds 30] [--cold-mb 96] [--out bench/results/cpu_ops.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.kernels import linear as L  # noqa: E402
from lowbit.kernels.linear import state_linear  # noqa: E402

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576))  # (N out, K in); the last is lm_head


def _module(method, lin, **kw):
    m = torch.nn.Sequential(torch.nn.Linear(lin.in_features, lin.out_features))
    m[0].load_state_dict(lin.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(m, method=method, **kw)[0]


def variants(N, K, M, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    x = torch.randn(M, K)
    w, b = lin.weight.detach(), lin.bias.detach()
    out = {"fp32": lambda: F.linear(x, w, b)}
    if N == 49152:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qd = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0]
    out["torch qdyn"] = lambda: qd(x)
    q8 = _module("int8-dynamic", lin)
    st8 = q8._qstates["weight"]
    out["lowbit int8-dyn"] = lambda: q8(x)
    out["lowbit int8-dyn (state_linear)"] = lambda: state_linear(x, st8, b, "int8")
    with torch.no_grad():
        q8(x)
    p8 = L._prepare_cpu_int8(st8)
    xi = torch.round(x * 10).clamp(-127, 127)
    xq = xi.to(torch.int8)
    out["int8 FBGEMM op"] = lambda: L._fbgemm(xi, p8)
    out["int8 _int_mm"] = lambda: torch._int_mm(xq, p8.wt)
    if M == 1:  # aten's weight-only int8 / int4 CPU matmuls
        sc = w.abs().amax(1) / 127
        w8 = torch.round(w / sc[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        out["int8pack"] = lambda: torch.ops.aten._weight_int8pack_mm(x, w8, sc).add_(b)
        for g in (32, 128):
            if K % g:
                continue
            wg = w.reshape(N, K // g, g)
            mn, mx = wg.amin(-1), wg.amax(-1)
            s = ((mx - mn) / 15).clamp_min(1e-8)
            q = torch.round((wg - mn[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.stack([s, mn + 8 * s], -1).transpose(0, 1).contiguous()  # [K/G, N, 2]
            out[f"int4pack g{g}"] = (lambda packed=packed, g=g, sz=sz:
                                     torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz).add_(b))
    nf4 = _module("bnb-nf4", lin)
    out["lowbit nf4"] = lambda: nf4(x)
    i4 = _module("rtn", lin, bits=4, group_size=128, sym=False, progress=False)
    out["lowbit int4 g128"] = lambda: i4(x)
    sti4 = i4._qstates["weight"]
    out["lowbit int4 g128 (state_linear)"] = lambda: state_linear(x, sti4, b)
    g4 = _module("rtn", lin, gguf_type="Q4_0", progress=False)
    out["lowbit Q4_0"] = lambda: g4(x)
    return out


def _chain(fs):
    def run():
        for f in fs:
            f()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--target-ms", type=float, default=4.0, help="wall time of one timed batch of calls")
    ap.add_argument("--out", default=str(ROOT / "bench/results/cpu_ops.md"))
    ap.add_argument("--ms", default="1,256")
    ap.add_argument("--cold-mb", type=float, default=96.0, help="fp32 MB of weight copies cycled per path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    results = []
    for M in [int(v) for v in args.ms.split(",")]:
        for N, K in SHAPES:
            copies = max(1, -(-int(args.cold_mb * 2**20) // (N * K * 4)))
            per = [variants(N, K, M, seed) for seed in range(copies)]
            fns = {name: _chain([d[name] for d in per]) for name in per[0]}
            n_calls = {}
            with torch.no_grad():
                for name, f in fns.items():  # warm-up + passes over the copies per batch
                    for _ in range(2):
                        f()
                    t = time.perf_counter()
                    f()
                    dt = max(time.perf_counter() - t, 1e-6)
                    n_calls[name] = max(1, int(args.target_ms * 1e-3 / dt))
                wall = {k: [] for k in fns}
                cpu = {k: [] for k in fns}
                for _ in range(args.rounds):
                    for name, f in fns.items():
                        n = n_calls[name]
                        c0, t0 = time.process_time(), time.perf_counter()
                        for _ in range(n):
                            f()
                        t1, c1 = time.perf_counter(), time.process_time()
                        wall[name].append((t1 - t0) / (n * copies) * 1e6)
                        cpu[name].append((c1 - c0) / (n * copies) * 1e6)
            base = statistics.median(wall["fp32"])
            for name in fns:
                wm, cm = statistics.median(wall[name]), statistics.median(cpu[name])
                results.append((M, N, K, name, wm, cm, base / wm))
                print(f"M={M} {N}x{K} {name:34s} {wm:9.1f} us  cpu {cm:9.1f} us  x fp32 {base / wm:5.2f}", flush=True)
    load1 = os.getloadavg()
    lines = [f"# CPU operator benchmark: SmolLM2-135M linear shapes, {args.threads} thread(s)", "",
             "Written by `bench/cpu_ops.py` (numbers from the run, never edited).", "",
             f"Command: `python bench/cpu_ops.py --threads {args.threads} --rounds {args.rounds} --ms {args.ms} "
             f"--cold-mb {args.cold_mb:g} --target-ms {args.target_ms:g}`", "",
             f"torch {torch.__version__}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
             f"{args.threads} threads; variants interleaved over {args.rounds} rounds, medians. The box was shared: "
             f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at the end. 'cpu us' is process CPU time per "
             "call (both threads summed). Each path cycles over independent weight copies (at least "
             f"{args.cold_mb:g} MB of fp32 weights per shape), so the weights are read from memory, as in decode.", "",
             "| M | N x K | path | wall us | cpu us | × fp32 speed |", "|---|---|---|---|---|---|"]
    for M, N, K, name, wm, cm, r in results:
        lines.append(f"| {M} | {N}x{K} | {name} | {wm:.1f} | {cm:.1f} | {r:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
