"""Comparison tables and plots: ``lowbit compare`` and the benchmark scripts share these.

``compare_methods`` quantizes a fresh copy of the model with each method and measures perplexity,
the difference to the float model, size, bits per weight and time to quantize; it writes a
Markdown table and a PNG bar plot.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Missing values print as an em dash."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "---|" * len(columns)
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("—" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


COMPARE_COLUMNS = (
    ("method", "method", ""), ("ppl", "perplexity", ".3f"), ("delta", "Δ vs float", "+.3f"),
    ("size_mb", "size (MB)", ".1f"), ("bits_per_weight", "bits/weight", ".3f"),
    ("seconds", "time to quantize (s)", ".1f"),
)


def plot_compare(rows: Sequence[Dict[str, Any]], path: Path, title: str = "") -> bool:
    """Perplexity and size per method as a PNG; False when matplotlib is missing."""
    from lowbit._deps import available

    if not available("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar(names, [r["ppl"] for r in rows], color="tab:blue")
    a1.set_ylabel("perplexity (lower is better)")
    a2.bar(names, [r["size_mb"] for r in rows], color="tab:orange")
    a2.set_ylabel("size (MB)")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


FLOAT_METHODS = ("fp32", "fp16", "bf16")  # the built-in float baselines (the method table says which rows are)


def is_quantized(method: str) -> bool:
    """Whether ``method`` yields a quantized model (the method table's ``quantized``; False for fp32/fp16/bf16)."""
    from lowbit.model.methods import METHODS

    return method.lower() not in METHODS or METHODS.get(method).quantized


def _best_quantized(rows: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The quantized row with the lowest perplexity (None when there is none)."""
    return min((r for r in rows if is_quantized(r["method"])), key=lambda r: r["ppl"], default=None)


def compare_methods(args, methods: Sequence[str], load: Callable, apply: Callable, ppl: Callable,
                    size: Callable, log: Callable[[str], None] = lambda s: None) -> Tuple[List[Dict[str, Any]], str]:
    """Run every method on a fresh model; returns the rows and the Markdown text (also written to disk)."""
    rows: List[Dict[str, Any]] = []
    float_ppl = None
    from lowbit.model.methods import METHODS

    baseline = METHODS.get("fp32").name
    for m in [baseline] + [m for m in methods if METHODS.get(m).name != baseline]:
        model, tok = load()
        log(f"[{m}] quantizing ...")
        t0 = time.perf_counter()
        model, seconds = apply(model, tok, m, args)
        seconds = seconds if m != baseline else 0.0
        log(f"[{m}] evaluating perplexity ...")
        p = ppl(model, tok, args)
        if m == baseline:
            float_ppl = p
        row = {"method": m, "ppl": p, "delta": p - float_ppl if float_ppl is not None else None,
               "seconds": seconds, **size(model)}
        rows.append(row)
        log(f"[{m}] ppl {p:.3f}, {row['size_mb']:.1f} MB, {time.perf_counter() - t0:.0f} s")
        save_dir = getattr(args, "save", None)
        if save_dir and is_quantized(m) and _best_quantized(rows) is row:
            from lowbit.io.native import save

            save(model, save_dir)  # atomic: replaces the previous best only once complete
            if tok is not None:
                tok.save_pretrained(str(save_dir))
            log(f"[{m}] best so far: saved to {save_dir}")
        del model
        gc.collect()
    grid = ", ".join(x for x in (f"{args.bits}-bit" if getattr(args, "bits", None) else "",
                                 f"group {args.group_size}" if getattr(args, "group_size", None) else "") if x)
    title = (f"{args.model}: {grid or 'each method at its defaults'}, perplexity on "
             f"{args.dataset or 'the built-in corpus'} ({args.max_windows} x {args.seq_len} tokens)"
             + (f", on {args.device}" if getattr(args, "device", "cpu") not in (None, "cpu") else ""))
    md = f"# lowbit compare\n\n{title}\n\n" + markdown_table(rows, COMPARE_COLUMNS) + "\n"
    if getattr(args, "save", None):
        best = _best_quantized(rows)
        if best is not None:
            md += f"\nBest quantized model ({best['method']}) saved to `{args.save}` (lowbit native format).\n"
    out = Path(args.output_dir) if args.output_dir else Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md)
    plot_compare(rows, out / "compare.png", title)
    return rows, md
