"""Model-API benchmark: SmolLM2-135M on CPU, memory before/after freeze and WikiText-2 perplexity.

Configurations (issue 3): fp32, bf16, int8 weights, int8 weights + int8 activations (static,
calibrated on WikiText-2 *valid* windows), nf4, fp4 (+ nf4 with double quantization). Perplexity:
the first 48 non-overlapping windows of 512 tokens of ``../shared/data/wikitext-2/test.txt``
(``lowbit.eval.perplexity``). Memory: bytes of the model's unique parameters, buffers and
QuantStates (``lowbit.eval.size.model_size_bytes``), measured right after ``quantize`` (float
weights still held: fake quantization) and after ``freeze`` (packed).

Run from the repository root (CPU, a few minutes per configuration on 2 cores)::

    nice python bench/model_api.py [--windows 48] [--only fp32,nf4] [--batch-size 4] [--resume]

Writes ``bench/results/model_api.md`` (rewritten after every configuration), ``model_api.json``
(the raw rows; ``--resume`` skips configurations already there) and ``model_api.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.eval.size import model_size_bytes  # noqa: E402
from lowbit.model.loading import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "bench" / "results"


def calib_batches(tok, n: int = 4, seq_len: int = 512):
    """``n`` windows of ``seq_len`` tokens from the WikiText-2 validation split (not the test text)."""
    ids = tok((DATA / "valid.txt").read_text(), return_tensors="pt").input_ids[0]
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def apply(name: str, model, tok):
    """Quantize ``model`` for configuration ``name``; returns (model, bytes after quantize, note)."""
    if name == "fp32":
        return model, model_size_bytes(model), "reference"
    if name == "bf16":
        lowbit.quantize(model, method="bf16")
        return model, model_size_bytes(model), 'quantize(method="bf16")'
    if name == "int8 weights":
        lowbit.quantize(model, weights=lowbit.qint8)
        return model, model_size_bytes(model), "quantize(weights=qint8), per-channel"
    if name == "int8 weights + int8 activations":
        lowbit.quantize(model, weights=lowbit.qint8, activations=lowbit.qint8)
        mid = model_size_bytes(model)
        with torch.no_grad(), lowbit.Calibration(momentum=0.9):
            for batch in calib_batches(tok):
                model(batch)
        return model, mid, "quantize(weights=qint8, activations=qint8) + Calibration(momentum=0.9) on 4x512 valid tokens"
    if name == "int8 weights + int8 dynamic activations":
        lowbit.quantize(model, weights=lowbit.qint8, activations=lowbit.qint8, act_dynamic=True)
        return model, model_size_bytes(model), "quantize(weights=qint8, activations=qint8, act_dynamic=True): per-token scales"
    if name == "nf4":
        lowbit.quantize(model, weights="nf4", group_size=64)
        return model, model_size_bytes(model), "quantize(weights='nf4'): groups of 64 (= bnb-nf4 blocks)"
    if name == "fp4":
        lowbit.quantize(model, weights="fp4", group_size=64)
        return model, model_size_bytes(model), "quantize(weights='fp4'): groups of 64"
    if name == "nf4 + double quant (bnb-nf4)":
        before = model_size_bytes(model)
        lowbit.quantize(model, method="bnb-nf4", double_quant=True)  # packs at once (no fake-quant phase)
        return model, before, 'quantize(method="bnb-nf4", double_quant=True)'
    raise ValueError(f"unknown configuration {name!r}")


CONFIGS = ["fp32", "bf16", "int8 weights", "int8 weights + int8 activations",
           "int8 weights + int8 dynamic activations", "nf4", "fp4",
           "nf4 + double quant (bnb-nf4)"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward (same windows and tokens; float rounding only)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of model_api.json, run the others")
    ap.add_argument("--out", default=str(RESULTS / "model_api.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    names = [c for c in CONFIGS if not args.only or c in [s.strip() for s in args.only.split(",")]]
    base, tok = load_model("default", dtype=torch.float32)
    base.eval()
    float_bytes = model_size_bytes(base)
    text = DATA / "test.txt"
    out = Path(args.out)
    raw = out.with_suffix(".json")
    rows = []
    if args.resume and raw.is_file():
        rows = [r for r in json.loads(raw.read_text()) if r["name"] in names and r["windows"] == args.windows]
    done = {r["name"] for r in rows}
    for name in names:
        if name in done:
            continue
        t0 = time.time()
        model = copy.deepcopy(base)
        model, mid_bytes, note = apply(name, model, tok)
        lowbit.freeze(model)
        after = model_size_bytes(model)
        t1 = time.time()
        with torch.no_grad():
            r = perplexity(model, tok, text=str(text), seq_len=args.seq_len, max_windows=args.windows,
                           batch_size=args.batch_size, progress=False)
        t2 = time.time()
        rows.append(dict(name=name, before=float_bytes, mid=mid_bytes, after=after, ppl=r.ppl, nll=r.nll,
                         tokens=r.n_tokens, windows=r.n_windows, t_quant=t1 - t0, t_eval=t2 - t1, note=note))
        print(f"{name:34s} size {after / 2**20:7.1f} MiB  ppl {r.ppl:8.3f}  ({t2 - t0:.0f}s)", flush=True)
        del model
        rows.sort(key=lambda r: CONFIGS.index(r["name"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(rows, indent=1))
        write(rows, args, out, partial=len(rows) < len(names))
    return 0


def write(rows, args, out: Path, partial: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = next((r for r in rows if r["name"] == "fp32"), rows[0])
    mib = 2 ** 20
    lines = [
        "# Model API on SmolLM2-135M (CPU)",
        "",
        f"Generated by `bench/model_api.py` (torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads). Perplexity: first {rows[0]['windows']} non-overlapping windows of "
        f"{args.seq_len} tokens of `../shared/data/wikitext-2/test.txt` ({rows[0]['tokens']} scored tokens), "
        "`lowbit.eval.perplexity`. Memory: unique parameters + buffers + QuantStates "
        "(`lowbit.eval.size.model_size_bytes`); the tied embedding / lm_head (28.3M parameters) stays in the "
        "model's float dtype (lm_head is excluded by default, as in optimum-quanto).",
        "",
    ]
    if partial:
        lines += ["**Partial: the run is still going; rows are added as configurations finish.**", ""]
    lines += [
        "| configuration | float model (MiB) | after quantize (MiB) | after freeze (MiB) | freeze saves | perplexity | "
        "Δ ppl vs fp32 | quantize+freeze (s) | eval (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        saves = 1 - r["after"] / r["mid"] if r["mid"] else 0.0
        lines.append(
            f"| {r['name']} | {r['before'] / mib:.1f} | {r['mid'] / mib:.1f} | {r['after'] / mib:.1f} | "
            f"{saves * 100:.0f}% | {r['ppl']:.3f} | {r['ppl'] - ref['ppl']:+.3f} | {r['t_quant']:.0f} | "
            f"{r['t_eval']:.0f} |"
        )
    lines += ["", "How each row was made:", ""]
    lines += [f"- **{r['name']}**: {r['note']}" for r in rows]
    lines += [
        "",
        "Notes:",
        "",
        "- *after quantize* is the fake-quantization (QAT) phase: float weights are still held, so memory only "
        "drops at `freeze`. `bnb-nf4` packs immediately, so its 'after quantize' column is the float model.",
        "- Weight-only rows keep the tied embedding / lm_head in fp32 (~108 MiB), which bounds their size "
        "from below; bf16 halves every tensor including it.",
    ]
    by = {r["name"]: r for r in rows}
    st, dy = by.get("int8 weights + int8 activations"), by.get("int8 weights + int8 dynamic activations")
    if st and dy:
        lines.append(
            f"- int8 activations: static per-tensor scales (one calibrated scale per layer input) give "
            f"Δ ppl {st['ppl'] - ref['ppl']:+.2f}, dynamic per-token scales {dy['ppl'] - ref['ppl']:+.2f}. LLM "
            "activations have outlier channels (the motivation for LLM.int8() and SmoothQuant), which one "
            "static scale per tensor cannot accommodate."
        )
    lines += [
        "- Times are wall-clock seconds on the 2-core CPU (AMD EPYC Zen 1, AVX2; short test runs overlapped the bf16 row). bf16 "
        "evaluates several times slower than fp32 there: this CPU has no bf16 arithmetic, so every bf16 matmul "
        "is converted (bf16 saves memory on it, not time).",
        "- Static int8 activations (one per-tensor scale per layer input, fixed at calibration) lose most on "
        "this LLM: a few input channels carry outliers far above the rest, so one scale leaves the other "
        "channels a handful of levels (the LLM.int8() observation); per-token dynamic scales keep it within "
        "one point, the remedies for static deployment are `Linear8bitLt`'s outlier decomposition (in lowbit) or SmoothQuant-style scaling (not in lowbit yet).",
        "- Quantized rows dequantize their weights in every forward (reference path, no fused CPU kernel), which "
        "adds to their eval time.",
    ]
    out.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax1 = plt.subplots(figsize=(8, 4))
        xs = range(len(rows))
        ax1.bar(xs, [r["after"] / mib for r in rows], color="tab:blue", alpha=0.6, label="MiB after freeze")
        ax1.set_ylabel("MiB after freeze")
        ax1.set_xticks(list(xs))
        ax1.set_xticklabels([r["name"].replace(" + ", "\n+ ") for r in rows], fontsize=7)
        ax2 = ax1.twinx()
        ax2.plot(list(xs), [r["ppl"] for r in rows], "o-", color="tab:red", label="perplexity")
        ax2.set_ylabel("WikiText-2 perplexity")
        ax1.set_title("SmolLM2-135M on CPU: memory and perplexity")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:
        logging.warning("matplotlib not installed: no plot written")


if __name__ == "__main__":
    raise SystemExit(main())
