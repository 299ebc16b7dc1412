"""One-process (1 rank) CPU wall time of GPTQ calibration before and after issue 20's run-11 change (the static groups
fitted beside the factorisation, the 2-rank exchange sum): the change must not slow the single process down. The
baseline is the code of another checkout (``--baseline``: a copy of the ``lowbit`` package of the commit before, e.g.
``git archive 072739f lowbit | tar -x -C /tmp/base``); the variants run in turn, one subprocess each, interleaved
(the box is shared: only the ratios within one run mean anything). Writes ``bench/results/dp_cpu_regress.md``.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/dp_cpu_regress.py --baseline /tmp/base --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORKER = r'''
import hashlib, json, sys, time, torch, transformers
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=384, intermediate_size=1024, num_hidden_layers=3,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=True)
model = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 256, (32, 128), generator=torch.Generator().manual_seed(1))
from lowbit.model.sequential import quantize_model_ptq
import lowbit
t0 = time.perf_counter()
quantize_model_ptq(model, method="gptq", bits=4, group_size=64, sym=False, calib_dataset=ids, micro_batch=4,
                   progress=False)
wall = time.perf_counter() - t0
h = hashlib.sha256()
for n, m in sorted(model.named_modules(), key=lambda x: x[0]):
    st = getattr(m, "qstate", None)
    if st is not None:
        for t in (st.data, st.scales, st.zeros):
            h.update(t.contiguous().numpy().tobytes())
ops = None
if len(sys.argv) > 1 and sys.argv[1] == "count":  # the tensor operations the run dispatches (deterministic)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    import lowbit.model._ptq_staged as PS
    import lowbit.model.sequential as SQ

    for mod in (PS, SQ):  # the calibration in this thread: a dispatch mode is per thread
        if hasattr(mod, "_in_worker"):
            mod._in_worker = lambda fn, *a, device=None: fn(*a)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with Count():
        quantize_model_ptq(model, method="gptq", bits=4, group_size=64, sym=False, calib_dataset=ids, micro_batch=4,
                           progress=False)
    ops = Count.n
print(json.dumps({"wall_s": wall, "digest": h.hexdigest()[:16], "lowbit": lowbit.__file__, "ops": ops}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="a directory holding the baseline's lowbit package")
    ap.add_argument("--baseline-commit", default="072739f")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "dp_cpu_regress.md"))
    args = ap.parse_args()
    variants = [("before (baseline)", args.baseline, {}), ("after (default: no overlap on the CPU)", ROOT, {}),
                ("after, LOWBIT_GPTQ_OVERLAP=1 (fits before the Cholesky's result is read)", ROOT,
                 {"LOWBIT_GPTQ_OVERLAP": "1"})]
    res = {v[0]: [] for v in variants}
    digests = {}
    ops = {}
    for rnd in range(args.rounds):
        for name, path, env in variants:
            e = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **env)
            # cwd outside both checkouts: `python -c` puts the working directory first on sys.path
            p = subprocess.run([sys.executable, "-c", WORKER] + (["count"] if rnd == 0 else []), env=e,
                               capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
            if p.returncode:
                raise SystemExit(p.stderr[-2000:])
            r = json.loads(p.stdout.strip().splitlines()[-1])
            if not r["lowbit"].startswith(os.path.abspath(path)):
                raise SystemExit(f"{name}: imported {r['lowbit']}, not the checkout {path}")
            res[name].append(r["wall_s"])
            if r.get("ops") is not None:
                ops[name] = r["ops"]
            digests.setdefault(name, set()).add(r["digest"])
            print(name, r, flush=True)
    base = statistics.median(res[variants[0][0]])
    lines = ["# One-process CPU wall time before / after the run-11 change (issue 20)", "",
             f"Written by `bench/dp_cpu_regress.py` (`PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/dp_cpu_regress.py "
             f"--baseline <lowbit of {args.baseline_commit}> --rounds {args.rounds}`), {time.strftime('%Y-%m-%d')}. "
             "GPTQ int4 g64 asym of a random 3-layer Llama (hidden 384, MLP 1024, 8/2 heads), 32 x 128 tokens, "
             "micro-batch 4, one thread, one process; each variant a fresh subprocess, the variants interleaved "
             f"round by round. The box was shared with other jobs (2 cores): only the ratios mean anything.", "",
             "| variant | wall per round | median | vs before | fastest | vs before | tensor operations dispatched "
             "(a second run in round 1's process) | codes digest |",
             "|---|---|---|---|---|---|---|---|"]
    bmin = min(res[variants[0][0]])
    for name, _, _ in variants:
        m, lo = statistics.median(res[name]), min(res[name])
        lines.append(f"| {name} | {' / '.join(f'{x:.2f}' for x in res[name])} s | {m:.2f} s | {m / base:.3f} | "
                     f"{lo:.2f} s | {lo / bmin:.3f} | {ops.get(name, '-'):,} | `{' '.join(sorted(digests[name]))}` |")
    same = len({d for v in digests.values() for d in v}) == 1
    lines += ["", f"Codes: {'identical in every variant and round' if same else 'DIFFERENT between variants'}.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
