"""Every tensor scheme over synthetic weights: MAE, SQNR, max error and bytes per element.

Run: ``python bench/schemes.py [--size 1024] [--out bench/results]``. Writes ``schemes.md`` and
``schemes.png``. CPU only, about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval import metrics as M

ROWS = [  # (label, scheme, granularity)
    ("int8 absmax b64", "int8", {"block_size": 64}),
    ("int8 per-channel", "int8", {"axis": 0}),
    ("int8 asym g128", "int8_asym", {"group_size": 128}),
    ("int4 absmax b64", "int4", {"block_size": 64}),
    ("int4 asym g128", "int4_asym", {"group_size": 128}),
    ("int4 asym g64", "int4_asym", {"group_size": 64}),
    ("int3 asym g128", "int3_asym", {"group_size": 128}),
    ("int2 asym g64", "int2_asym", {"group_size": 64}),
    ("nf4 b64", "nf4", {"block_size": 64}),
    ("nf4 b64 double-quant", "nf4", {"block_size": 64, "double_quant": True}),
    ("fp4 b64", "fp4", {"block_size": 64}),
    ("nf8 b64", "nf8", {"block_size": 64}),
    ("dynamic8 b4096 (bnb 8-bit)", "dynamic8", {"block_size": 4096}),
    ("fp8 e4m3 per-channel", "fp8_e4m3", {"axis": 0}),
    ("fp8 e5m2 per-channel", "fp8_e5m2", {"axis": 0}),
    ("GGUF Q8_0", "q8_0", {}),
    ("GGUF Q5_1", "q5_1", {}),
    ("GGUF Q5_0", "q5_0", {}),
    ("GGUF Q4_1", "q4_1", {}),
    ("GGUF Q4_0", "q4_0", {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024, help="weights are size x size")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    t0 = time.perf_counter()
    for kind in M.SYNTHETIC_KINDS:
        x = M.synthetic(kind, (args.size, args.size), seed=0)
        for label, scheme, kw in ROWS:
            st = lowbit.quantize(x, scheme, **kw)
            results[(kind, label)] = M.error_report(x, st)
    elapsed = time.perf_counter() - t0

    lines = [
        "# Tensor schemes on synthetic weights",
        "",
        f"{args.size}x{args.size} fp32 weights per distribution (seed 0); torch {torch.__version__}, "
        f"{platform.machine()} CPU; produced by `python bench/schemes.py` in {elapsed:.0f} s.",
        "Bytes per element count packed codes plus scales/zero points (fp32 unless the format fixes fp16).",
        "",
        "## Gaussian weights (N(0,1))",
        "",
        "| scheme | bytes/elem | bits/elem | MAE | SQNR dB | max error |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, _ in ROWS:
        r = results[("gaussian", label)]
        lines.append(f"| {label} | {r['bytes_per_element']:.4f} | {r['bits_per_element']:.3f} | {r['mae']:.5f} | "
                     f"{r['sqnr_db']:.2f} | {r['max_error']:.4f} |")
    lines += ["", "## SQNR (dB) by distribution", "",
              "| scheme | " + " | ".join(M.SYNTHETIC_KINDS) + " |", "|---" * (len(M.SYNTHETIC_KINDS) + 1) + "|"]
    for label, _, _ in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{results[(k, label)]['sqnr_db']:.2f}" for k in M.SYNTHETIC_KINDS) + " |")
    x = M.synthetic("gaussian", (args.size, args.size))
    lines += ["", "## Bit widths (symmetric absmax, group 64, Gaussian) vs the uniform-quantizer theory", "",
              "| bits | SQNR dB | theoretical 6.02·b dB | MAE |", "|---|---|---|---|"]
    for r in M.compare_bits(x, (2, 3, 4, 8), group_size=64):
        lines.append(f"| {r['bits']} | {r['sqnr_db']:.2f} | {r['theoretical_sqnr_db']:.2f} | {r['mae']:.5f} |")
    xm = M.synthetic("multichannel", (args.size, args.size))
    lines += ["", "## Granularity (int4 symmetric, multi-channel weights)", "",
              "| granularity | bytes/elem | MSE | SQNR dB |", "|---|---|---|---|"]
    for r in M.compare_granularity(xm, "int4"):
        lines.append(f"| {r['granularity']} | {r['bytes_per_element']:.4f} | {r['mse']:.3e} | {r['sqnr_db']:.2f} |")
    oi = M.outlier_impact(x, "int8", n_outliers=64, block_size=None)
    ob = M.outlier_impact(x, "int8", n_outliers=64, block_size=64)
    lines += ["", "## Outlier impact (64 outliers of 20x absmax injected, int8)", "",
              "| granularity | MSE without | MSE with | ratio |", "|---|---|---|---|",
              f"| per-tensor | {oi['mse_without']:.3e} | {oi['mse_with']:.3e} | {oi['ratio']:.1f} |",
              f"| block 64 | {ob['mse_without']:.3e} | {ob['mse_with']:.3e} | {ob['ratio']:.2f} |"]
    (out / "schemes.md").write_text("\n".join(lines) + "\n")

    from lowbit._deps import available

    if available("matplotlib"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5))
        for label, _, _ in ROWS:
            r = results[("gaussian", label)]
            ax.scatter(r["bits_per_element"], r["sqnr_db"])
            ax.annotate(label, (r["bits_per_element"], r["sqnr_db"]), fontsize=7)
        bits = torch.linspace(2, 9, 50)
        ax.plot(bits, [M.theoretical_sqnr_db(1) * b for b in bits.tolist()], "k--", lw=0.8, label="6.02 dB/bit")
        ax.set_xlabel("bits per element (incl. scales)")
        ax.set_ylabel("SQNR (dB), Gaussian weights")
        ax.set_title("lowbit schemes: quality vs storage")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "schemes.png", dpi=110)
    print((out / "schemes.md").read_text())


if __name__ == "__main__":
    main()
