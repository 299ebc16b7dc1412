"""Tensor-level fuzzing of ``lowbit.quantize``/``lowbit.dequantize``: the "Fuzzed tensors" section of
``bench/results/reliability.md``.

Run (the figures in the results file; ~8 min single-threaded for 10,000 inputs x 19 schemes):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/reliability_fuzz.py --n 10000 \\
        --json bench/results/reliability_fuzz.json

and, for the "before" column, the same harness against an older checkout of the library (the harness is
``tests/fuzz_tensors.py``; it reaches lowbit only through its public tensor API):

    git archive <old-commit> lowbit | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old OMP_NUM_THREADS=1 python bench/reliability_fuzz.py --n 10000 \\
        --json bench/results/reliability_fuzz_before.json --no-report
    PYTHONPATH=$PWD python bench/reliability_fuzz.py --report-only \\
        --json bench/results/reliability_fuzz.json --before bench/results/reliability_fuzz_before.json

The report replaces only the text between ``<!-- fuzz:begin -->`` and ``<!-- fuzz:end -->`` in
``reliability.md``; other sections (written by other programs) are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BEGIN, END = "<!-- fuzz:begin -->", "<!-- fuzz:end -->"


def _affected(case) -> bool:
    """Cases whose outcome the last fixes (double quant of all-zero blocks, underflowing scales) can change."""
    return bool(case.kwargs.get("double_quant")) or case.values in ("subnormal", "tiny", "mixed")


def run(n: int, schemes, json_path: Path | None = None, only=None) -> dict:
    import torch

    import fuzz_tensors as F
    import lowbit

    torch.set_num_threads(1)
    out = {"n_per_scheme": n, "lowbit": str(Path(lowbit.__file__).parent), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "schemes": {}}
    try:
        out["commit"] = subprocess.run(["git", "-C", str(Path(lowbit.__file__).parent), "rev-parse", "--short",
                                        "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        out["commit"] = None
    t0 = time.time()
    for sch in schemes:
        t1 = time.time()
        s = F.fuzz_scheme(sch, n, only=only)
        out["schemes"][sch] = {"n": s.n, "classes": dict(s.classes), "causes": dict(s.causes),
                               "errors": dict(s.errors), "examples": s.examples, "roundtrips": s.roundtrips,
                               "max_seconds": s.max_seconds, "seconds": time.time() - t1}
        print(f"{sch}: {dict(s.classes)} {dict(s.causes)} ({time.time() - t1:.0f} s)", flush=True)
        out["seconds"] = time.time() - t0
        if json_path is not None:  # after every scheme, so that a long run can be split or interrupted
            json_path.write_text(json.dumps(out, indent=1))
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(after: dict, before: dict | None, recheck: dict | None = None, notes: str = "") -> str:
    L = [BEGIN, "## Fuzzed tensors (`lowbit.quantize` / `lowbit.dequantize`)", ""]
    n = after["n_per_scheme"]
    total = sum(s["n"] for s in after["schemes"].values())
    L.append(f"{n:,} seeded inputs per scheme, {len(after['schemes'])} schemes, {total:,} inputs in all "
             f"(harness `tests/fuzz_tensors.py`; its docstring derives every error bound). Each input draws a "
             "shape (0-D to 4-D, empty and size-1 dims, ragged against the block), a dtype (float32/16, bfloat16, "
             "float64, or an integer/bool tensor), values (normal, uniform, heavy-tailed to 1e30, near the dtype's "
             "largest value, beyond float32 for float64, all-zero, constant, subnormal, tiny), a granularity (default "
             "blocks, block sizes 1..4096, per-tensor, groups incl. ragged and -1, any axis, invalid arguments), "
             "double quantization (nested blocks 2..256), scale dtype (float32/16, bfloat16), and NaN/+Inf/-Inf "
             "injected in 8% of inputs. "
             "*clean*: shape and dtype kept, all finite, no sign flip, every element within the derived bound, "
             "`state_dict` round trip through safetensors bit-identical; *clear error*: ValueError/TypeError raised by "
             "lowbit's own code for an input that deserves one; *defect*: anything else.")
    L.append("")
    L.append(f"Machine: {_cpu()}, torch {after['torch']}, Python {after['python']}; "
             f"{after['seconds']:.0f} s of single-threaded runs (wall time, summed over the runs the schemes were "
             "split into) on a 2-core box shared with other jobs.")
    L.append("")
    head = "| scheme | inputs | clean | clear error | defects (after) |" + (" defects (before) |" if before else "")
    L += [head, "|" + "---|" * (head.count("|") - 1)]
    tot_a, tot_b = Counter(), Counter()
    for sch, s in after["schemes"].items():
        c = s["classes"]
        tot_a.update(c)
        row = f"| {sch} | {s['n']:,} | {c.get('clean', 0):,} | {c.get('clear_error', 0):,} | {c.get('defect', 0):,} |"
        if before:
            b = before["schemes"].get(sch, {}).get("classes", {})
            tot_b.update(b)
            row += f" {b.get('defect', 0):,} |"
        L.append(row)
    row = (f"| **all** | {total:,} | {tot_a.get('clean', 0):,} | {tot_a.get('clear_error', 0):,} | "
           f"**{tot_a.get('defect', 0):,}** |")
    if before:
        row += f" {tot_b.get('defect', 0):,} |"
    L += [row, ""]
    rts = sum(s["roundtrips"] for s in after["schemes"].values())
    slow = max(s["max_seconds"] for s in after["schemes"].values())
    L.append(f"`state_dict` round trips checked (every successful call): {rts:,}, all bit-identical unless listed "
             f"below. Slowest single call: {slow:.2f} s (no hang).")
    L.append("")
    causes_a, causes_b = Counter(), Counter()
    for s in after["schemes"].values():
        causes_a.update(s["causes"])
    if before:
        for s in before["schemes"].values():
            causes_b.update(s["causes"])
    L += ["### Defects by cause", "", "| cause | before | after | fixed in |", "|---|---|---|---|"]
    where = {
        "GGUF fp16 block scale/offset overflow": "`formats/gguf.py` `block_params`: a clear error naming the block and the format's limit",
        "float64 beyond the float32 range": "`tensor/functional.py` input check: a clear error (lowbit quantizes in float32)",
        "float16/bfloat16 dequantized output not saturated": "`tensor/functional.py` `dequantize`: output clamped to the dtype's finite range",
        "scale_dtype overflow/underflow": "`tensor/functional.py` `_store_scales`: a clear error when a scale overflows or a nonzero one flushes to 0",
        "asymmetric max - min overflow": "`formats/affine.py` `affine_qparams`: the scale of a range beyond float32 computed in float64",
        "double-quant offset overflow": "`formats/codebook.py` `double_quantize`: float64 mean when the float32 one overflows; nested scales clamped to [0, float32 max]",
        "IndexError for a 0-d tensor with axis": "`tensor/granularity.py` `resolve_layout`: ValueError",
        "double quant of subnormal scales flips signs": "`formats/codebook.py` `quantize_blockwise_lut`: divide when 1/absmax overflows; reconstructed scales clamped at 0; `tensor/functional.py` `_double_quantize`: all-zero affine/fp8 blocks enter the nested quantization with scale 0, not their placeholder 1; `formats/affine.py`, `formats/fp8.py`: an underflowing scale of a nonzero block is the smallest float32 subnormal, not 1",
        "fp8 scale underflowing to 0 in float16 (NaN)": "`tensor/functional.py` `_store_scales` (as scale_dtype above)",
    }
    for cause in sorted(set(causes_a) | set(causes_b) | set(where), key=lambda c: -causes_b.get(c, 0)):
        L.append(f"| {cause} | {causes_b.get(cause, 0):,} | {causes_a.get(cause, 0):,} | {where.get(cause, '')} |")
    L.append("")
    if before:
        L.append(f"*Before*: the same harness and seeds against lowbit at commit `{before.get('commit') or 'n/a'}` "
                 f"(`{before['lowbit']}`), {before['n_per_scheme']:,} inputs per scheme.")
        L.append("")
    ex = [(c, e) for s in after["schemes"].values() for c, e in s["examples"].items()]
    if ex:
        L += ["Defect examples of the after run (see the re-check below):", ""] + [f"- {c}: `{e}`" for c, e in ex[:20]] + [""]
    if recheck:
        rn = sum(s["n"] for s in recheck["schemes"].values())
        rc, rd = Counter(), Counter()
        for s in recheck["schemes"].values():
            rc.update(s["classes"])
            rd.update(s["causes"])
        L += ["### Re-check after the last fix", "",
              f"Seeds whose outcome the last fix can change (double quant, or subnormal/tiny/mixed values) of "
              f"{', '.join(recheck['schemes'])}, out of the same {recheck['n_per_scheme']:,} per scheme, re-run on the "
              f"fixed code: {rn:,} inputs, {rc.get('clean', 0):,} clean, {rc.get('clear_error', 0):,} clear errors, "
              f"**{rc.get('defect', 0):,} defects**" + (f" ({dict(rd)})" if rd else "") + ".", ""]
    if notes:
        L += [notes, ""]
    errs = Counter()
    for s in after["schemes"].values():
        errs.update(s["errors"])
    L.append("Clear errors by type: " + ", ".join(f"{k} {v:,}" for k, v in errs.most_common()) + ".")
    L.append("")
    L.append("Reproduce: see the docstring of `bench/reliability_fuzz.py` (after: `PYTHONPATH=$PWD OMP_NUM_THREADS=1 "
             f"python bench/reliability_fuzz.py --n {n} --json bench/results/reliability_fuzz.json`).")
    L += ["", END]
    return "\n".join(L)


def write_report(md: Path, text: str) -> None:
    old = md.read_text() if md.exists() else "# Reliability\n\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    md.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="inputs per scheme")
    ap.add_argument("--schemes", default=None, help="comma-separated subset (default: all 19)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/reliability_fuzz.json")
    ap.add_argument("--before", type=Path, default=None, help="JSON of a run against the old code")
    ap.add_argument("--recheck", type=Path, nargs="*", default=None, help="JSONs of --affected-only re-runs")
    ap.add_argument("--notes", default="", help="a paragraph added to the section")
    ap.add_argument("--md", type=Path, default=ROOT / "bench/results/reliability.md")
    ap.add_argument("--no-report", action="store_true", help="only write the JSON")
    ap.add_argument("--affected-only", action="store_true",
                    help="only the seeds with double quant or subnormal/tiny/mixed values (re-check after a fix there)")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="JSONs of runs over other schemes (split runs) to merge into the report")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from --json (and --before)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.report_only:
        after = json.loads(a.json.read_text())
    else:
        import fuzz_tensors as F

        a.json.parent.mkdir(parents=True, exist_ok=True)
        after = run(a.n, a.schemes.split(",") if a.schemes else F.SCHEMES, a.json,
                    only=_affected if a.affected_only else None)
    if a.merge:
        for extra in a.merge:
            part = json.loads(extra.read_text())
            after["schemes"].update(part["schemes"])
            after["seconds"] = after.get("seconds", 0) + part.get("seconds", 0)
        import fuzz_tensors as F

        after["schemes"] = {k: after["schemes"][k] for k in F.SCHEMES if k in after["schemes"]}
    if not a.no_report:
        before = json.loads(a.before.read_text()) if a.before else None
        recheck = None
        for part in a.recheck or []:
            d = json.loads(part.read_text())
            if recheck is None:
                recheck = d
            else:
                recheck["schemes"].update(d["schemes"])
        write_report(a.md, report(after, before, recheck, a.notes))
        print(f"wrote {a.md}")


if __name__ == "__main__":
    main()
