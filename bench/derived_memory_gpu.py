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
    ap.add_argument("--json", required=True)
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
