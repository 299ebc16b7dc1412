"""Regenerate ``tests/data/kquants_vectors.npz``: inputs and llama.cpp's own K-quant bytes for them.

The expected bytes come from llama.cpp's quantizer itself, called through ctypes:
``ggml_quantize_chunk`` of the ``libggml-base`` that llama-cpp-python ships (what ``llama_model_quantize``
calls per tensor), or, with ``--lib``, ``quantize_row_qX_K_ref`` of a shared library compiled from
llama.cpp's ``ggml/src/ggml-quants.c`` (``gcc -O3 -shared -fPIC``, no ``-march``). Both are the same C
functions; the test checks lowbit's bytes against whichever produced the file (recorded in ``source``).

    python tests/data/make_kquants_vectors.py [--lib /path/libggml-base.so] [--no-smollm2]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
from pathlib import Path

import numpy as np

TYPES = {"Q2_K": (10, 84), "Q3_K": (11, 110), "Q4_K": (12, 144), "Q5_K": (13, 176), "Q6_K": (14, 210)}
OUT = Path(__file__).resolve().parent / "kquants_vectors.npz"


def find_ggml_base() -> str:
    import llama_cpp

    root = Path(llama_cpp.__file__).parent
    libs = sorted(glob.glob(str(root / "**" / "libggml-base.so*"), recursive=True))
    if not libs:
        raise SystemExit(f"no libggml-base.so under {root}")
    return libs[0]


def quantizer(lib_path: str):
    lib = ctypes.CDLL(lib_path)
    if hasattr(lib, "ggml_quantize_chunk"):
        f = lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_void_p]
        if hasattr(lib, "ggml_quantize_init"):
            for _, (tid, _) in TYPES.items():
                lib.ggml_quantize_init(ctypes.c_int(tid))

        def run(x: np.ndarray, name: str) -> np.ndarray:
            tid, size = TYPES[name]
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = np.zeros(x.shape[0] * x.shape[1] // 256 * size, np.uint8)
            f(tid, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
            return out.reshape(x.shape[0], -1)
        return run, f"ggml_quantize_chunk ({os.path.basename(lib_path)})"

    def run(x: np.ndarray, name: str) -> np.ndarray:
        _, size = TYPES[name]
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros(x.size // 256 * size, np.uint8)
        getattr(lib, f"quantize_row_{name[:2].lower()}_K_ref")(ctypes.c_void_p(x.ctypes.data),
                                                               ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(x.size))
        return out.reshape(x.shape[0], -1)
    return run, "quantize_row_qX_K_ref (ggml-quants.c compiled with gcc -O3, no -march)"


def synthetic(rng) -> dict:
    def f16(a):
        return a.astype(np.float16).astype(np.float32)

    cases = {}
    for k in (256, 512, 768, 1280):
        cases[f"gauss_{k}"] = (rng.standard_normal((6, k)) * 0.04).astype(np.float32)
        cases[f"student_{k}"] = (rng.standard_t(2.0, (3, k)) * 0.02).astype(np.float32)
    cases["fp16_768"] = f16(rng.standard_normal((4, 768)) * 0.03)
    cases["positive_512"] = rng.random((3, 512), dtype=np.float32)
    cases["negative_512"] = -rng.random((3, 512), dtype=np.float32)
    sparse = rng.standard_normal((4, 512)).astype(np.float32) * (rng.random((4, 512)) < 0.08)
    cases["sparse_512"] = sparse.astype(np.float32)
    edge = (rng.standard_normal((6, 256)) * 0.05).astype(np.float32)
    edge[0] = 0.0                                   # all-zero super-block
    edge[1, :32] = 0.0                              # zero sub-blocks in a live block
    edge[2] = 0.7                                   # constant block
    edge[3, 17] = 4.0                               # one outlier
    edge[4] = (rng.standard_normal(256) * 1e-6).astype(np.float32)  # tiny magnitudes
    edge[5, ::2] = -0.0                             # signed zeros
    cases["edge_256"] = edge
    cases["int_512"] = rng.integers(-8, 8, (3, 512)).astype(np.float32)
    return cases


def smollm2_slices() -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lowbit.model.loading import load_model

    model, _ = load_model("default", dtype=torch.float32)
    sd = model.state_dict()
    pick = {"smollm2_ffn_down_l0": ("model.layers.0.mlp.down_proj.weight", slice(0, 6), None),
            "smollm2_ffn_down_l17": ("model.layers.17.mlp.down_proj.weight", slice(100, 104), None),
            "smollm2_attn_q_l3": ("model.layers.3.self_attn.q_proj.weight", slice(0, 4), 512),
            "smollm2_embd": ("model.embed_tokens.weight", slice(1000, 1004), 512)}
    out = {}
    for key, (name, rows, cols) in pick.items():
        w = sd[name][rows].half().float().numpy()  # values of the F16 GGUF llama-quantize reads
        out[key] = np.ascontiguousarray(w[:, :cols] if cols else w)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=None)
    ap.add_argument("--no-smollm2", action="store_true")
    args = ap.parse_args()
    run, source = quantizer(args.lib or find_ggml_base())
    cases = synthetic(np.random.default_rng(19))
    if not args.no_smollm2:
        cases.update(smollm2_slices())
    arrays = {"source": np.array(source)}
    for key, x in cases.items():
        arrays[f"x/{key}"] = x
        for name in TYPES:
            arrays[f"q/{key}/{name}"] = run(x, name)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} inputs, source: {source})")


if __name__ == "__main__":
    main()
