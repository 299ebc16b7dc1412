"""Checkpoint sizes per format for SmolLM2-135M, all written from the same quantized weights.

For each quantization (round-to-nearest through ``lowbit.quantize`` with fp16 scales, every Linear of
the 30 blocks; embeddings / tied ``lm_head`` and norms unquantized), :func:`lowbit.io.multi.export_all`
writes the native lowbit checkpoint, a GGUF file (quantized weights converted losslessly, unquantized
tensors in F16), a compressed-tensors directory and a GPTQ directory (fp16 for the unquantized tensors,
as GPTQ writers do). The table gives each one's size on disk, bits per parameter of the whole file,
the GGUF block types chosen, write time, and two checks:

* ``weights exact``: every quantized weight read back from the file (lowbit's own readers for native /
  GPTQ / compressed-tensors, ``gguf.GGUFReader`` + ``gguf.quants`` for GGUF) equals lowbit's
  dequantized weight bit for bit;
* ``max |dlogit|``: the largest logit difference on one 64-token window between the reloaded file
  (lowbit for native / GPTQ, transformers for compressed-tensors and GGUF) and the lowbit model.
  Non-zero values come from the unquantized tensors stored in fp16 (GGUF F16, GPTQ fp16), not from
  the quantized weights.

The fp16 safetensors size of the float model is the reference row. GGUF perplexities per type are in
``bench/gguf_export.py`` (the GGUF engineer's benchmark); this one does not duplicate them.

Run from the repository root (about 3 minutes per scheme on 2 CPU cores)::

    python bench/formats.py [--schemes int4:64,int4_asym:64,int8:-1]

Writes ``bench/results/formats.md``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import n_params  # noqa: E402

import lowbit  # noqa: E402
from lowbit.io import compressed_tensors as ctio  # noqa: E402
from lowbit.io import gptq, native  # noqa: E402
from lowbit.io.multi import export_all  # noqa: E402
from lowbit.model.loading import load_model  # noqa: E402
from lowbit.nn import QLinear  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def dir_bytes(p: Path) -> int:
    p = Path(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.name.startswith("tokenizer")
               and f.name not in ("vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja"))


def quantize(model, scheme: str, group: int):
    for name, mod in list(model.named_modules()):
        for cn, c in list(mod.named_children()):
            if type(c) is nn.Linear and cn != "lm_head":
                st = lowbit.quantize(c.weight.detach(), scheme, group_size=group, scale_dtype=torch.float16)
                setattr(mod, cn, QLinear.from_quant_state(c, st))
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


def check_gguf(path: Path, model) -> bool:
    import gguf

    from lowbit.io.gguf import load_gguf_quant_states

    states = load_gguf_quant_states(path)
    for name, m in model.named_modules():
        if isinstance(m, QLinear) and m.qstate is not None:
            e = states[f"{name}.weight"]
            got = gguf.quants.dequantize(e.data.numpy().astype(np.uint8), gguf.GGMLQuantizationType[e.qtype])
            if not torch.equal(bits(torch.from_numpy(got.copy())), bits(lowbit.dequantize(m.qstate))):
                return False
    return True


def check_ck(ck, model) -> bool:
    return all(torch.equal(bits(w.dequantize()), bits(lowbit.dequantize(model.get_submodule(n).qstate)))
               for n, w in ck.weights.items())


def check_native(path: Path, model) -> tuple:
    m2 = native.load(path)
    ok = all(torch.equal(bits(lowbit.dequantize(m.qstate)), bits(lowbit.dequantize(m2.get_submodule(n).qstate)))
             for n, m in model.named_modules() if isinstance(m, QLinear) and m.qstate is not None)
    return ok, m2


def max_dlogit(model, other, ids) -> float:
    with torch.no_grad():
        return float((model(ids).logits.float() - other(ids).logits.float()).abs().max())


def run(scheme: str, group: int, tok, ids, base_sd, cfg):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(base_sd, strict=False)
    model.tie_weights()
    P = n_params(model)
    quantize(model, scheme, group)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = export_all(model, d, ["native", "gguf", "compressed-tensors", "gptq"],
                             gguf_requantize_type="F16")
        total = time.perf_counter() - t0
        ok, m2 = check_native(d / "native", model)
        rows.append(("native", dir_bytes(d / "native"), ok, max_dlogit(model, m2, ids), "-"))
        del m2
        g = rep["gguf"]
        types = sorted({st for st in _gguf_types(d / "model.gguf").values()})
        hf = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="model.gguf", dtype=torch.float32).eval()
        rows.append(("gguf", dir_bytes(d / "model.gguf"), check_gguf(d / "model.gguf", model) and
                     set(g["summary"]) == {"exact"}, max_dlogit(model, hf, ids), "+".join(types)))
        del hf
        from transformers import CompressedTensorsConfig

        # dequantize=True: transformers' compressed path mis-sizes packed asymmetric zero points (5.23)
        hf = AutoModelForCausalLM.from_pretrained(str(d / "compressed-tensors"), dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        rows.append(("compressed-tensors", dir_bytes(d / "compressed-tensors"),
                     check_ck(ctio.read_compressed_tensors(d / "compressed-tensors"), model),
                     max_dlogit(model, hf, ids), "-"))
        del hf
        mg, ck = gptq.load_gptq(d / "gptq", dtype=torch.float32, return_checkpoint=True)
        rows.append(("gptq", dir_bytes(d / "gptq"), check_ck(ck, model), max_dlogit(model, mg, ids), "-"))
    return P, total, rows


def _gguf_types(path: Path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in r.tensors if t.name.startswith("blk.") and t.name.endswith("weight")
            and "norm" not in t.name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="int4:64,int4_asym:64,int8:-1",
                    help="comma-separated scheme:group_size list (group -1: per output channel)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    src, tok = load_model("default", dtype=torch.float32)
    cfg = src.config
    base_sd = {k: v.clone() for k, v in src.state_dict().items()}
    P = n_params(src)
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
              "structure in Paris.", return_tensors="pt").input_ids[:, :64]
    with tempfile.TemporaryDirectory() as d:
        src.half().save_pretrained(d, safe_serialization=True)
        fp16_bytes = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
    del src
    lines = [
        "# Checkpoint formats for SmolLM2-135M, written from the same quantized weights",
        "",
        f"Produced by `python bench/formats.py` (torch {torch.__version__}, {platform.machine()}, CPU). "
        f"{P / 1e6:.1f} M parameters; RTN with fp16 scales on every Linear of the 30 blocks (embeddings, "
        "tied `lm_head`, norms unquantized). Sizes exclude tokenizer files. `weights exact`: every quantized "
        "weight read back from the file equals lowbit's dequantized weight bit for bit. `max |dlogit|`: reloaded "
        "file vs the lowbit model on one window (lowbit loader for native/GPTQ, transformers for "
        "compressed-tensors/GGUF); non-zero values come from unquantized tensors stored as fp16.",
        "",
        f"Reference: fp16 safetensors of the float model: {fp16_bytes / 2**20:.1f} MiB "
        f"({8 * fp16_bytes / P:.2f} bits/param).",
        "",
        "| scheme | format | size (MiB) | bits/param | GGUF block types | weights exact | max \\|dlogit\\| |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    times = []
    for spec in args.schemes.split(","):
        scheme, group = spec.split(":")
        P2, total, rows = run(scheme, int(group), tok, ids, base_sd, cfg)
        label = f"{scheme} g{group}" if int(group) > 0 else f"{scheme} per-channel"
        for fmt, size, ok, dl, types in rows:
            lines.append(f"| {label} | {fmt} | {size / 2**20:.1f} | {8 * size / P2:.2f} | {types} | "
                         f"{'yes' if ok else 'NO'} | {dl:.2e} |")
        times.append(f"{label}: {total:.1f} s")
        print(lines[-4:], flush=True)
    lines += ["", "Time to write all four formats (export_all): " + "; ".join(times) + ".", ""]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "formats.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
