"""GPU memory and eager decode of lowbit variants with / without the derived layouts beside the state (one process).

A small ``bench/user_decode.py`` (its ``build`` / ``measure``): ``--layers`` Llama-3-8B-shaped layers, eager
``generate`` (dynamic cache) of ``--new`` tokens after 128, per variant: memory allocated once built (``weight GB``),
the allocator's requested bytes (``requested GB``: the tensors' own sizes, without the 512-byte / block rounding)
and bytes of live tensors (``tensor GB``), peak during generate, resident after generate, decode tok/s. Variant
names as ``user_decode.py``'s short names, plus ``gguf0`` (``LOWBIT_GGUF_RESIDENT=0``: the blocks and the kernel
layout both kept, as before) and ``gguf1`` (the layout replaces the blocks). ``LOWBIT_TREE`` = a directory whose
``lowbit`` is imported instead of this repository's (to time the code before a change in the same call).

    python bench/derived_memory_gpu.py --layers 4 --only bf16,bnb,nf4,gguf0,gguf1,int8dyn,fp8 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("LOWBIT_TREE") or str(ROOT))
sys.path.insert(1, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--only", default="bf16,bnb,nf4,gguf0,gguf1,int8dyn,fp8")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; variants after it are skipped")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON", help="render these runs' JSON to --out")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "derived_memory_gpu.md"))
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, Path(args.out), args.note)
    import lowbit
    from bench import user_decode as ud

    t0 = time.perf_counter()
    master = ud.master_model(args.layers)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, ud.SHAPE["vocab_size"], (1, 128), generator=g).to("cuda")
    prefill = torch.randint(0, ud.SHAPE["vocab_size"], (1, 512), generator=g).to("cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        w = ud.build("bf16", master, Path(tmp))  # warm-up model
        ud.measure(w, prompt, prefill, 1, 4)
        del w
        for short in args.only.split(","):
            if time.perf_counter() - t0 > args.budget:
                rows.append({"variant": short, "error": "skipped: budget"})
                continue
            row = {"variant": short, "lowbit": str(Path(lowbit.__file__).parent)}
            try:
                os.environ["LOWBIT_GGUF_RESIDENT"] = "0" if short == "gguf0" else "1"
                name = ud.SHORT[short[:-1] if short in ("gguf0", "gguf1") else short]
                gc.collect()
                torch.cuda.empty_cache()
                model = ud.build(name, master, Path(tmp) / short)
                gc.collect()
                torch.cuda.empty_cache()
                row["weight_gb"] = torch.cuda.memory_allocated() / 1e9
                row["requested_gb"] = torch.cuda.memory_stats().get("requested_bytes.all.current", 0) / 1e9
                row["tensor_gb"] = ud.tensor_bytes() / 1e9
                dec, pre, peak, toks = ud.measure(model, prompt, prefill, args.reps, args.new)
                gc.collect()
                row.update(decode=dec, prefill_ms=pre, peak_gb=peak, resident_gb=torch.cuda.memory_allocated() / 1e9,
                           resident_requested_gb=torch.cuda.memory_stats().get("requested_bytes.all.current", 0) / 1e9,
                           resident_tensor_gb=ud.tensor_bytes() / 1e9, tokens=toks[:8])
                print(args.label, short, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
                      flush=True)
                del model
            except Exception as e:  # noqa: BLE001 - recorded
                import traceback

                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            Path(args.json).write_text(json.dumps({"label": args.label, "layers": args.layers, "rows": rows},
                                                  indent=1))
    return 0


NAMES = {"bf16": "bf16", "bnb": "bitsandbytes nf4 (Params4bit default: absmax double-quantized)",
         "nf4": "lowbit nf4 (method bnb-nf4: float32 absmax)", "gguf0": "lowbit GGUF Q4_0, blocks + kernel layout "
         "(LOWBIT_GGUF_RESIDENT=0: as before)", "gguf1": "lowbit GGUF Q4_0, kernel layout replaces the blocks (now)",
         "gguf": "lowbit GGUF Q4_0", "int8dyn": "lowbit int8-dynamic", "fp8": "lowbit fp8 dynamic"}


def report(paths, out: Path, notes) -> int:
    lines = ["# GPU memory of lowbit variants with and without derived layouts beside the state", "",
             "Written by `python bench/derived_memory_gpu.py --report <run JSONs>` from runs of "
             "`bench/derived_memory_gpu.py` "
             "(numbers from the runs, never edited). Eager `generate` (dynamic cache), batch 1, Llama-3-8B-shaped "
             "layers with random bf16 weights, `lm_head` bf16. weight GB = `torch.cuda.memory_allocated()` once built; "
             "requested GB = the allocator's `requested_bytes` (tensor sizes before rounding); tensor GB = distinct "
             "live CUDA storages; peak GB = `max_memory_allocated` during the timed generates; resident GB = allocated "
             "after them (derived layouts included: they are made at the first call).", ""]
    for pth in paths:
        d = json.loads(Path(pth).read_text())
        lines += [f"## run `{d.get('label') or Path(pth).stem}` ({d['layers']} layers; lowbit from "
                  f"`{next((r.get('lowbit') for r in d['rows'] if r.get('lowbit')), '?')}`)", "",
                  "| variant | weight GB | requested GB | tensor GB | peak GB (generate) | resident GB after | "
                  "resident − weight GB | decode tok/s (eager) | prefill 512 ms | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            if "weight_gb" not in r or "resident_gb" not in r:
                lines.append(f"| {NAMES.get(r['variant'], r['variant'])} | | | | | | | | | "
                             f"{r.get('error', 'not reached')} |")
                continue
            lines.append(f"| {NAMES.get(r['variant'], r['variant'])} | {r['weight_gb']:.3f} | "
                         f"{r['requested_gb']:.3f} | "
                         f"{r['tensor_gb']:.3f} | {r['peak_gb']:.3f} | {r['resident_gb']:.3f} | "
                         f"{r['resident_gb'] - r['weight_gb']:+.3f} | {r['decode']:.1f} | {r['prefill_ms']:.1f} | |")
        lines.append("")
    if notes:
        lines += ["Notes (added when rendering, `--note`):", ""] + [f"- {n}" for n in notes]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    main()
