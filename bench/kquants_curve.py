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
    ap.add_argument("--methods", default="gptq", help="sensitivities/states the plans use: gptq, rtn or both")
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
        names = [n for n in H if n in params]
        out = {}
        for m in ("rtn", "gptq"):
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
        for m in args.methods.split(","):
            sens = torch.load(v2 / f"sens_{m}.pt")
            states = torch.load(v2 / "states_gptq.pt", weights_only=False) if m == "gptq" else None
            for tag, kw in targets:
                plan = bud.budget_plan(model, None, sens=sens, **kw)
                plan.save(v2 / f"plan-{m}{tag}.json")
                p = work / f"lowbit-budget-{m}{tag}.gguf"
                print(m, tag, plan.summary(), flush=True)
                if not p.exists():
                    gio.export_gguf(model, p, "Q8_0", tokenizer=tok_meta,
                                    quant_states=bud.plan_quant_states(model, plan, states))
                    print(f"  {p.name}: {p.stat().st_size / 1e6:.2f} MB", flush=True)
        return


if __name__ == "__main__":
    main()
