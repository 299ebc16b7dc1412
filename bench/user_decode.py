"""What a user sees: ``model.generate`` of a Llama-3-8B-shaped model, bf16 vs lowbit variants vs peers (GPU).

A transformers ``LlamaForCausalLM`` with the Llama-3-8B shape (hidden 4096, intermediate 14336, GQA 32/8,
vocab 128256; ``--layers`` of them, 32 = the full model) and random bf16 weights (one seed, the same
weights for every variant), quantized through each library's public API except ``lm_head``:

* bf16 (reference); lowbit ``method="bnb-nf4"`` (Linear4bit); ``method="rtn"`` int4 g128 asym (QLinear);
  GPTQ-format int4 g128 (the rtn model written by ``lowbit.io.gptq.export_gptq`` and re-loaded with
  ``load_gptq``); GGUF Q4_0 blocks (``lowbit.quantize(model, weights="q4_0")``: the same QLinear +
  ``layout="gguf"`` state ``load_gguf_model`` builds); int8 weight-only (``weights=qint8``); ``method=
  "int8-dynamic"``; fp8 weights + dynamic fp8 activations (``weights=qfloat8, activations=qfloat8,
  act_dynamic=True``);
* peers where importable: torchao int4 g128 (``Int4WeightOnlyConfig``), bitsandbytes nf4.

Per variant, after a warm-up model: eager ``generate`` (dynamic cache), batch 1, 64 new tokens after 128
(decode tok/s = 64 / (t(1 + 64 new) - t(1 new))); prefill of 1 x 512 (one forward, ms); weight GB (memory
allocated once built); peak GB during ``generate``; optionally the compiled ``generate`` (static cache and
``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs). Medians of ``--reps``.

    python bench/user_decode.py --layers 8 --out-dir bench/results [--compiled bf16,nf4,int4]

Writes ``user_decode.md`` / ``user_decode.json`` / ``user_decode.png`` (rewritten after each variant).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402

VARIANTS = ["bf16", "lowbit nf4", "lowbit int4 g128", "lowbit GPTQ-format int4 g128", "lowbit GGUF Q4_0",
            "lowbit int8 weight-only", "lowbit int8-dynamic", "lowbit fp8 dynamic", "torchao int4 g128",
            "bitsandbytes nf4"]
SHORT = {"bf16": "bf16", "nf4": "lowbit nf4", "int4": "lowbit int4 g128", "gptq": "lowbit GPTQ-format int4 g128",
         "gguf": "lowbit GGUF Q4_0", "int8": "lowbit int8 weight-only", "int8dyn": "lowbit int8-dynamic",
         "fp8": "lowbit fp8 dynamic", "torchao": "torchao int4 g128", "bnb": "bitsandbytes nf4"}


DEV = "cuda"
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def master_model(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, max_position_embeddings=2048,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # modest random weights (std 0.02, as HF init) -> finite logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model.cpu()


def build(name: str, master, workdir: Path):
    m = copy.deepcopy(master).to(DEV)
    if name == "bf16":
        return m
    if name == "lowbit nf4":
        return lowbit.quantize(m, method="bnb-nf4")
    if name in ("lowbit int4 g128", "lowbit GPTQ-format int4 g128"):
        lowbit.quantize(m, method="rtn", bits=4, group_size=128, sym=False, device=DEV, progress=False)
        if name == "lowbit int4 g128":
            return m
        from lowbit.io.gptq import export_gptq, load_gptq

        d = workdir / "gptq"
        m = m.cpu()
        export_gptq(m, d)
        del m
        gc.collect()
        return load_gptq(d, dtype=torch.bfloat16, device=DEV).eval()
    if name == "lowbit GGUF Q4_0":
        lowbit.quantize(m, weights="q4_0")
        return lowbit.freeze(m) or m
    if name == "lowbit int8 weight-only":
        lowbit.quantize(m, weights=lowbit.qint8)
        return lowbit.freeze(m) or m
    if name == "lowbit int8-dynamic":
        return lowbit.quantize(m, method="int8-dynamic")
    if name == "lowbit fp8 dynamic":
        lowbit.quantize(m, weights=lowbit.qfloat8, activations=lowbit.qfloat8, act_dynamic=True)
        return lowbit.freeze(m) or m
    if name == "torchao int4 g128":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        def flt(mod, fqn):
            return isinstance(mod, nn.Linear) and "lm_head" not in fqn

        try:
            cfg = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        except TypeError:
            cfg = Int4WeightOnlyConfig(group_size=128)
        quantize_(m, cfg, filter_fn=flt)
        return m
    if name == "bitsandbytes nf4":
        import bitsandbytes as bnb

        for pname, mod in list(m.named_modules()):
            for cname, child in list(mod.named_children()):
                full = f"{pname}.{cname}" if pname else cname
                if isinstance(child, nn.Linear) and "lm_head" not in full:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(mod, cname, q.cuda())
        return m
    raise ValueError(name)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


@torch.no_grad()
def measure(model, prompt, prefill_ids, reps: int, new: int, static: bool = False):
    kw = dict(do_sample=False, use_cache=True)
    if static:
        kw["cache_implementation"] = "static"

    def gen(n):
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == prompt.shape[1] + n

    gen(2)
    gen(new + 1)  # warm-up (compiles under torch.compile, prepares layouts)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dec = []
    for _ in range(reps):
        t1 = _sync_time(lambda: gen(1))
        tn = _sync_time(lambda: gen(new + 1))
        dec.append(new / max(tn - t1, 1e-9))
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else 0.0
    pre = []
    if not static:
        model(prefill_ids)
        for _ in range(reps):
            pre.append(_sync_time(lambda: model(prefill_ids, use_cache=False)) * 1e3)
    return statistics.median(dec), (statistics.median(pre) if pre else None), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated short names: " + ",".join(SHORT))
    ap.add_argument("--compiled", default="", help="short names also timed with static cache + torch.compile")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds; variants after it are skipped")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny model on the CPU (checks the script only)")
    ap.add_argument("--report-only", default=None, metavar="JSON", help="re-render user_decode.md from a json")
    ap.add_argument("--note", action="append", default=[], help="a line for the notes section (with --report-only)")
    args = ap.parse_args(argv)
    if args.report_only:
        d = json.loads(Path(args.report_only).read_text())
        d["info"]["notes"] = args.note
        write(d["rows"], d["info"], Path(args.out_dir))
        return 0
    global DEV
    if args.smoke_cpu:
        DEV = "cpu"
        SHAPE.update(TINY)
    t_start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [SHORT[s] for s in args.only.split(",")] if args.only else list(VARIANTS)
    compiled = {SHORT[s] for s in args.compiled.split(",") if s}
    master = master_model(args.layers)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 128), generator=g).to(DEV)
    prefill_ids = torch.randint(0, SHAPE["vocab_size"], (1, 512), generator=g).to(DEV)
    info = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__, "layers": args.layers,
            "command": "python bench/user_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    rows = []
    # warm-up model: the first model timed in a process reads slow
    with tempfile.TemporaryDirectory() as tmp:
        w = build("bf16", master, Path(tmp))
        measure(w, prompt, prefill_ids, 1, 8)
        del w
        gc.collect()
        torch.cuda.empty_cache()
        for name in names:
            if time.perf_counter() - t_start > args.time_budget:
                rows.append({"variant": name, "error": "skipped: time budget of this run"})
                continue
            row = {"variant": name}
            try:
                t = time.perf_counter()
                model = build(name, master, Path(tmp) / name.replace(" ", "_"))
                gc.collect()
                torch.cuda.empty_cache()
                row["build_s"] = time.perf_counter() - t
                row["weight_gb"] = torch.cuda.memory_allocated() / 1e9 if DEV == "cuda" else 0.0
                dec, pre, peak = measure(model, prompt, prefill_ids, args.reps, args.new)
                row.update(decode=dec, prefill_ms=pre, peak_gb=peak)
                print(f"{name}: decode {dec:.1f} tok/s, prefill {pre:.1f} ms, weights {row['weight_gb']:.2f} GB, "
                      f"peak {peak:.2f} GB", flush=True)
                del model
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            rows.append(row)
            write(rows, info, out)
        # compiled generate (static cache + torch.compile reduce-overhead = CUDA graphs) after the eager table
        for name in [n for n in names if n in compiled]:
            row = next(r for r in rows if r["variant"] == name)
            if "decode" not in row:
                continue
            if time.perf_counter() - t_start > args.time_budget:
                row["compiled_error"] = "skipped: time budget of this run"
                continue
            try:
                model = build(name, master, Path(tmp) / ("c_" + name.replace(" ", "_")))
                with torch.no_grad():  # one eager step: kernel layouts are prepared before tracing
                    model(prompt[:, :8])
                torch._dynamo.reset()
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
                cdec, _, cpeak = measure(model, prompt, prefill_ids, args.reps, args.new, static=True)
                row.update(decode_compiled=cdec, peak_compiled_gb=cpeak)
                print(f"{name} compiled: decode {cdec:.1f} tok/s", flush=True)
                del model
            except Exception as e:  # noqa: BLE001 - recorded in the table
                row["compiled_error"] = f"compiled: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            write(rows, info, out)
    write(rows, info, out)
    return 0


def write(rows, info, out: Path) -> None:
    base = next((r for r in rows if r["variant"] == "bf16" and "decode" in r), None)
    lines = [
        "# `generate` on a Llama-3-8B-shaped model: bf16 vs lowbit vs peers (GPU)",
        "",
        "Written by `bench/user_decode.py` (numbers from the run, never edited).",
        "",
        f"GPU: {info['gpu']}; torch {info['torch']}; transformers {info.get('transformers', '?')}; "
        f"{info['layers']} decoder layers of the Llama-3-8B shape (hidden 4096, intermediate 14336, GQA 32/8, "
        "vocab 128256), random bf16 weights, `lm_head` kept bf16 in every variant. Batch 1, 64 new tokens after a "
        "128-token prompt, greedy; decode tok/s excludes the prefill; prefill = one forward of 1 x 512. Medians.",
        "",
        f"Command: `{info['command']}`",
        "",
        "| variant | decode tok/s (eager) | × bf16 | decode tok/s (compiled) | × bf16 compiled | prefill 512 ms | "
        "weights GB | peak GB | note (compiled run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "decode" not in r:
            lines.append(f"| {r['variant']} | — | — | — | — | — | — | — | {r.get('error', '')} |")
            continue
        x = f"{r['decode'] / base['decode']:.2f}" if base else "—"
        c = f"{r['decode_compiled']:.1f}" if "decode_compiled" in r else "—"
        cx = (f"{r['decode_compiled'] / base['decode_compiled']:.2f}"
              if "decode_compiled" in r and base and "decode_compiled" in base else "—")
        pre = f"{r['prefill_ms']:.1f}" if r.get("prefill_ms") else "—"
        lines.append(f"| {r['variant']} | {r['decode']:.1f} | {x} | {c} | {cx} | {pre} | {r['weight_gb']:.2f} | "
                     f"{r['peak_gb']:.2f} | {r.get('compiled_error', '')} |")
    if info.get("notes"):
        lines += ["", "Notes (added when rendering the report, `--note`):", ""] + [f"- {n}" for n in info["notes"]]
    (out / "user_decode.md").write_text("\n".join(lines) + "\n")
    (out / "user_decode.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if "decode" in r]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.5))
        ax.barh([r["variant"] for r in ok], [r["decode"] for r in ok], label="eager")
        comp = [r.get("decode_compiled", 0) for r in ok]
        if any(comp):
            ax.barh([r["variant"] for r in ok], comp, alpha=0.5, label="compiled")
        ax.set_xlabel("decode tokens/s (batch 1)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "user_decode.png", dpi=100)
    except Exception:  # noqa: BLE001 - plotting is optional
        pass


if __name__ == "__main__":
    sys.exit(main())
